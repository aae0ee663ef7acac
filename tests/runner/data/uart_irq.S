/* An interrupt-driven serial console: the 8250's received-data interrupt (IRQ 4,
   through the in-kernel IOAPIC to vector 0x41) echoes each byte typed on COM1 to the
   debug console; 'q' exits with 7.  An IIR that does not say "received data" when the
   interrupt comes exits with 3.  Long mode, CPL 0, entered by the kvmkit runner. */
        .text
        .code64
        .globl _start
_start:
        movb    $0xff, %al              /* mask both PICs: KVM starts LINT0 as ExtINT */
        outb    %al, $0x21
        outb    %al, $0xa1
        sidt    idtr(%rip)              /* the runner's IDT: put a gate at 0x41 */
        movq    idtr+2(%rip), %rdi
        leaq    isr(%rip), %rax
        movw    %ax, 0x410(%rdi)
        movw    %cs, %dx
        movw    %dx, 0x412(%rdi)
        movw    $0x8e00, 0x414(%rdi)
        shrq    $16, %rax
        movw    %ax, 0x416(%rdi)
        shrq    $16, %rax
        movl    %eax, 0x418(%rdi)
        movl    $0, 0x41c(%rdi)
        movl    $0xfee000f0, %eax       /* LAPIC on, spurious vector 0xff */
        movl    $0x1ff, (%rax)
        movl    $0xfec00000, %eax       /* IOAPIC pin 4 -> vector 0x41, edge, CPU 0 */
        movl    $0x18, (%rax)
        movl    $0x41, 0x10(%rax)
        movl    $0x19, (%rax)
        movl    $0, 0x10(%rax)
        movw    $0x3f9, %dx             /* IER: received-data interrupt */
        movb    $1, %al
        outb    %al, %dx
        leaq    ready(%rip), %rsi
        movl    $ready_len, %ecx
1:      lodsb
        outb    %al, $0xe9
        loop    1b
        sti
2:      hlt
        jmp     2b

isr:
        movw    $0x3fa, %dx             /* IIR: must say "received data" (0x04) */
        inb     %dx, %al
        andb    $0x0f, %al
        cmpb    $0x04, %al
        jne     bad
3:      movw    $0x3fd, %dx             /* LSR: data ready? */
        inb     %dx, %al
        testb   $1, %al
        jz      4f
        movw    $0x3f8, %dx             /* RBR */
        inb     %dx, %al
        cmpb    $'q', %al
        je      quit
        outb    %al, $0xe9
        jmp     3b
4:      movl    $0xfee000b0, %eax       /* EOI */
        movl    $0, (%rax)
        iretq
quit:   movl    $7, %eax
        outl    %eax, $0xf4
bad:    movl    $3, %eax
        outl    %eax, $0xf4
5:      jmp     5b

        .data
ready:  .ascii  "ready\n"
        .set    ready_len, . - ready
idtr:   .skip   10
