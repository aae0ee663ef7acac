/* A multiboot kernel written for QEMU's -kernel, not for kvmkit: console on the 8250 UART
   (polling LSR), CPU count from fw_cfg, the command line from the multiboot info, exit
   code 7 through isa-debug-exit.  Prints:  "uart kernel: N cpus\n<cmdline>\n". */
        .set    MB_MAGIC, 0x1BADB002
        .set    MB_FLAGS, 0x3                   /* page-align modules, want memory info */
        .text                                   /* header first in .text: within 8 KiB */
        .code32
        .align  4
        .long   MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
        .globl  _start
_start:
        mov     $stack_top, %esp
        cmp     $0x2BADB002, %eax
        jne     fail
        mov     %ebx, %edi                      /* multiboot info */
        mov     $banner, %esi
        call    puts
        mov     $0x510, %dx                     /* fw_cfg selector: FW_CFG_NB_CPUS */
        mov     $0x05, %ax
        outw    %ax, %dx
        mov     $0x511, %dx
        inb     %dx, %al
        add     $'0', %al
        call    putc
        mov     $cpus, %esi
        call    puts
        testl   $4, (%edi)                      /* flags: cmdline present? */
        jz      fail
        mov     16(%edi), %esi
        call    puts
        mov     $'\n', %al
        call    putc
        mov     $7, %eax
        mov     $0xf4, %dx
        outl    %eax, %dx
fail:   mov     $1, %eax
        mov     $0xf4, %dx
        outl    %eax, %dx
1:      hlt
        jmp     1b

putc:   mov     %al, %bl                        /* wait until THR is empty, then send */
        mov     $0x3fd, %dx
1:      inb     %dx, %al
        test    $0x20, %al
        jz      1b
        mov     $0x3f8, %dx
        mov     %bl, %al
        outb    %al, %dx
        ret

puts:   lodsb
        test    %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

        .data
banner: .asciz  "uart kernel: "
cpus:   .asciz  " cpus\n"
        .bss
        .align  16
        .space  4096
stack_top:
