/* An ELF64 guest written to kvmkit's conventions, not built by kvmkit: entered in long
   mode, prints on the debug console (0xe9) and exits with 42 through port 0xf4. */
        .text
        .code64
        .globl _start
_start:
        lea     msg(%rip), %rsi
        mov     $msg_len, %ecx
1:      lodsb
        outb    %al, $0xe9
        loop    1b
        movl    $42, %eax
        outl    %eax, $0xf4
2:      jmp     2b

        .data
msg:    .ascii  "elf64 says hi\n"
        .set    msg_len, . - msg
