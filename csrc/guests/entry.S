/*
 * Multiboot v1 entry, long-mode switch, exception stubs, CPL 3 entry and the AP trampoline.
 *
 * Under kvmkit's runner on a PVM host every CPL 0 and real-mode instruction is emulated
 * (~3 us each), so this file does as little as it can at run time: the page tables, GDT
 * and TSS are built by the assembler and linker, and the entry path is ~30 instructions.
 */
#include "kvmkit_guest.h"

#define MB_MAGIC 0x1badb002
#define MB_FLAGS 0x00000003 /* bit 0: modules page-aligned, bit 1: memory info wanted */
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR4_PAE 0x20
#define CR0_PE 0x1
#define CR0_ET 0x10
#define CR0_PG 0x80000000
#define PORT_MARK (KK_HYPERCALL_BASE + KK_HC_MARK)
#define STACK_SIZE 16384
#define AP_STACK_SIZE 4096

/* ---- multiboot header: must sit in the first 8 KiB of the file ---------------------- */
        .section .multiboot, "a"
        .balign 4
        .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

/* ---- 32-bit entry: protected mode, paging off, EAX = magic, EBX = multiboot info ------ */
        .section .text.boot, "ax"
        .code32
        .globl _start
_start:
        cli                             /* multiboot promises IF = 0 but leaves DF undefined; */
        cld                             /* the runtime's rep string instructions need DF = 0 */
        movl    %eax, %edi              /* kk_start(magic, mbi) */
        movl    %ebx, %esi
        movl    $kk_mark_entry, %eax
        movw    $PORT_MARK, %dx
        outl    %eax, %dx
        lgdt    kk_gdt_ptr
        /* The TSS base is split over the descriptor; the linker cannot do that for us. */
        movl    $kk_tss, %eax
        movw    %ax, kk_gdt_tss + 2
        shrl    $16, %eax
        movb    %al, kk_gdt_tss + 4
        movb    %ah, kk_gdt_tss + 7
        movl    $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $kk_pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        xorl    %edx, %edx
        movl    $EFER_LME, %eax
        wrmsr
        movl    %cr0, %eax
        orl     $(CR0_PG | CR0_PE), %eax
        movl    %eax, %cr0
        ljmp    $KK_SEL_KERNEL_CODE, $kk_long_entry

        .code64
kk_long_entry:
        movl    $KK_SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $KK_SEL_TSS, %eax
        ltr     %ax
        lidt    kk_idt_ptr
        movq    $kk_boot_stack_top, %rsp
        movl    $kk_mark_long_mode, %eax
        movw    $PORT_MARK, %dx
        outl    %eax, %dx
        movl    %edi, %edi              /* upper halves are undefined after the switch */
        movl    %esi, %esi
        call    kk_start
1:      cli
        hlt
        jmp     1b

/* ---- CPL 3 entry: kk_enter_user(fn = rdi, stack = rsi), never returns -------------------- */
        .text
        .globl kk_enter_user
kk_enter_user:
        subq    $8, %rsi                /* as if called: RSP + 8 16-byte aligned at fn */
        pushq   $KK_SEL_USER_DATA       /* SS */
        pushq   %rsi                    /* RSP */
        pushq   $0x3002                 /* RFLAGS: IOPL=3 (port I/O allowed), IF=0 */
        pushq   $KK_SEL_USER_CODE       /* CS */
        pushq   %rdi                    /* RIP */
        iretq

/* ---- exception and interrupt stubs: push (error code or 0, vector); vectors 0-31 go to
 * kk_fault(frame), 32 to KK_IDT_VECTORS - 1 to kk_irq_dispatch(vector) ---------------------- */
/* They sit in .text.boot, right after the entry code, so all of them lie below 0x110000 and
 * the IDT below can be built by the assembler and linker (the linker script checks it). */
        .macro ISR vec
kk_isr\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $\vec
        .if \vec < 32
        jmp     kk_isr_common
        .else
        jmp     kk_irq_common
        .endif
        .endm

        .section .text.boot, "ax"
        .altmacro
        .set vec, 0
        .rept KK_IDT_VECTORS
        ISR %vec
        .set vec, vec + 1
        .endr
        .noaltmacro

kk_isr_common:
        movq    %rsp, %rdi              /* struct kk_fault_frame * */
        andq    $-16, %rsp
        call    kk_fault
1:      cli
        hlt
        jmp     1b

/* Interrupts (vectors 32 and up): save the registers a C call may clobber, call
 * kk_irq_dispatch(vector), return to the interrupted code.  The CPU aligned RSP to 16
 * before pushing its 5-word frame; with the 2 words above and 9 here RSP is aligned again. */
kk_irq_common:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        pushq   %r9
        pushq   %r10
        pushq   %r11
        movl    72(%rsp), %edi          /* the vector the stub pushed */
        cld
        call    kk_irq_dispatch
        popq    %r11
        popq    %r10
        popq    %r9
        popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        addq    $16, %rsp               /* vector and dummy error code */
        iretq
        .globl kk_isr_end
kk_isr_end:

/* 64-bit interrupt gates, DPL 0, offsets 31:16 = 0x0010 and 63:32 = 0 (see above). */
        .macro IDT_GATE vec
        .word   kk_isr\vec - 0x100000
        .word   KK_SEL_KERNEL_CODE
        .byte   0, 0x8e
        .word   0x0010
        .long   0, 0
        .endm

        .data
        .balign 16
kk_idt:
        .altmacro
        .set vec, 0
        .rept KK_IDT_VECTORS
        IDT_GATE %vec
        .set vec, vec + 1
        .endr
        .noaltmacro
kk_idt_end:
        .balign 2
        .word   0, 0, 0
        .globl kk_idt_ptr, kk_empty_idt_ptr
kk_idt_ptr:
        .word   kk_idt_end - kk_idt - 1
        .quad   kk_idt
kk_empty_idt_ptr:                      /* fault=triple: every vector out of bounds */
        .word   0
        .quad   kk_idt

/* ---- AP trampoline: copied to KK_AP_TRAMPOLINE_ADDR, entered in real mode by SIPI -------- */
/* Goes straight from real mode to long mode (PE and PG set together), which the SDM allows
 * and KVM and QEMU implement: a dozen emulated instructions instead of two mode switches. */
#define TRAMP(sym) (KK_AP_TRAMPOLINE_ADDR + ((sym) - kk_trampoline_start))
        .section .rodata
        .balign 16
        .globl kk_trampoline_start, kk_trampoline_end
        .code16
kk_trampoline_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        lgdtl   TRAMP(kk_tramp_gdt_ptr)
        movl    $CR4_PAE, %eax
        movl    %eax, %cr4
        movl    $kk_pml4, %eax
        movl    %eax, %cr3
        movl    $MSR_EFER, %ecx
        xorl    %edx, %edx
        movl    $EFER_LME, %eax
        wrmsr
        movl    $(CR0_PG | CR0_ET | CR0_PE), %eax
        movl    %eax, %cr0
        ljmpl   $KK_SEL_KERNEL_CODE, $kk_ap_long_entry
        .balign 4
kk_tramp_gdt_ptr:
        .word   kk_gdt_end - kk_gdt - 1
        .long   kk_gdt
kk_trampoline_end:
        .code64

        .text
kk_ap_long_entry:
        movl    $KK_SEL_KERNEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    $1, %eax
        lock xaddl %eax, kk_ap_next(%rip)
        cmpl    $KK_MAX_CPUS, %eax
        jae     2f                      /* no stack for it: park it */
        movl    %eax, %edi              /* kk_ap_main(index) */
        shlq    $12, %rax
        leaq    kk_ap_stacks + AP_STACK_SIZE(%rax), %rsp
        call    kk_ap_main
2:      cli
        hlt
        jmp     2b

/* ---- data: GDT, TSS, marks -------------------------------------------------------------- */
        .data
        .balign 16
        .globl kk_gdt, kk_gdt_end
kk_gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf92000000ffff      /* 0x10 kernel data */
        .quad   0x00affa000000ffff      /* 0x18 user code, 64-bit, DPL 3 */
        .quad   0x00cff2000000ffff      /* 0x20 user data, DPL 3 */
kk_gdt_tss:                             /* 0x28 64-bit TSS, base filled in by _start */
        .word   kk_tss_end - kk_tss - 1
        .word   0
        .byte   0
        .byte   0x89
        .byte   0
        .byte   0
        .quad   0
kk_gdt_end:
        .balign 4
        .word   0
kk_gdt_ptr:
        .word   kk_gdt_end - kk_gdt - 1
        .long   kk_gdt

        .balign 16
kk_tss:
        .long   0
        .quad   kk_boot_stack_top       /* RSP0: where faults from CPL 3 land */
        .fill   88, 1, 0                /* RSP1, RSP2, IST1-7, reserved */
        .word   0
        .word   kk_tss_iomap - kk_tss   /* I/O permission bitmap offset */
/* Every port allowed at CPL 3.  VT-x, AMD-V and TCG already allow it through IOPL = 3, but
 * PVM runs user code with the hardware IOPL at 0 and emulates the trapped in/out, which it
 * allows only when this bitmap does. */
kk_tss_iomap:
        .fill   65536 / 8, 1, 0
        .byte   0xff                    /* the CPU may read one byte past the bitmap */
kk_tss_end:

        .balign 8
kk_mark_entry:
        .quad   kk_label_entry, 5
kk_mark_long_mode:
        .quad   kk_label_long_mode, 9
        .section .rodata
kk_label_entry:
        .ascii  "entry"
kk_label_long_mode:
        .ascii  "long-mode"

/* ---- page tables: 0-1 GiB write-back, 3-4 GiB uncacheable, 2 MiB pages, all user ------ */
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80
        .section .data.pagetables, "aw"
        .balign 4096
        .globl kk_pml4
kk_pml4:
        .quad   kk_pdpt + (PTE_P | PTE_RW | PTE_US)
        .fill   511, 8, 0
kk_pdpt:
        .quad   kk_pd_low + (PTE_P | PTE_RW | PTE_US)
        .quad   0, 0
        .quad   kk_pd_high + (PTE_P | PTE_RW | PTE_US)
        .fill   508, 8, 0
kk_pd_low:
        .set i, 0
        .rept 512
        .quad   (i << 21) | (PTE_P | PTE_RW | PTE_US | PTE_PS)
        .set i, i + 1
        .endr
kk_pd_high:
        .set i, 0
        .rept 512
        .quad   (0xc0000000 + (i << 21)) | (PTE_P | PTE_RW | PTE_US | PTE_PWT | PTE_PCD | PTE_PS)
        .set i, i + 1
        .endr

/* ---- stacks ------------------------------------------------------------------------------ */
        .bss
        .balign 16
kk_boot_stack:
        .skip   STACK_SIZE
        .globl kk_boot_stack_top
kk_boot_stack_top:
        .globl kk_user_stack_top
kk_user_stack:
        .skip   STACK_SIZE
kk_user_stack_top:
        .globl kk_ap_stacks
        .balign 4096
kk_ap_stacks:
        .skip   AP_STACK_SIZE * KK_MAX_CPUS
