/*
 * kvmkit guest ABI and the tiny runtime every guest program links against.
 *
 * A guest image is a multiboot v1 ELF32 file loaded at 1 MiB.  It boots the way QEMU's
 * `-kernel` starts it (32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the
 * multiboot info), switches itself to long mode and calls the program's `main`.  The same
 * image runs under kvmkit's minimal runner and under QEMU; everything a guest needs for
 * correctness uses devices both provide, and the kvmkit-only hypercalls are harmless
 * under QEMU (writes to unassigned ports are ignored there, reads return all ones).
 *
 * This header is the reference for the ABI.  kvmkit/guests.py mirrors every constant
 * below as a Python constant; keep the two in step.
 *
 * Ports
 *   0x00e9  debug console (QEMU isa-debugcon): one byte per write.  The runtime writes a
 *           string with `rep outsb`; KVM still makes that one I/O exit per byte (count 1).
 *   0x00f4  exit (QEMU isa-debug-exit, iosize=4): `outl` of v ends the run.  QEMU's process
 *           exits with (v << 1) | 1, kvmkit's runner with v.  Only if the guest is still
 *           running after that does it try the EXIT hypercall, then halts.
 *   0x0500 + nr  hypercalls, Solo5 hvt style: `outl` of the 32-bit guest-physical address
 *           of the argument struct (layouts below, little endian, 8-byte fields).
 *             nr 1 TIME  { u64 nsecs; }                out: host monotonic clock, ns
 *             nr 2 PUTS  { u64 data_gpa; u64 len; }    console output, one exit per call
 *             nr 3 EXIT  { u64 code; }                 end the run with `code`
 *             nr 4 MARK  { u64 label_gpa; u64 label_len; }  host records (time, label)
 *           Marks, in order: "entry" (first instruction, 32-bit), "long-mode", "main",
 *           "user-mode" (after the switch to CPL 3), the program's own ("sieve-start",
 *           "sieve-end", "storm-start", "storm-end", "sipi", "all-cpus-up", "xfer-start",
 *           "xfer-end"), "done" (right
 *           before the exit write).  Label strings are not NUL-terminated.
 *   0x0510  fw_cfg selector (16-bit write); 0x0511 fw_cfg data (byte reads).
 *           keys: 0x05 number of CPUs (u16 LE), 0x03 RAM size (u64 LE).
 *   0x03f8  COM1, an 8250 UART (pvio's phase=uart writes its THR).
 *   0x0720  pvio's ring set-up: `outl` of the ring header's guest-physical address;
 *   0x0724  its doorbell (`outl`, a KVM_IOEVENTFD: no exit); the ring header sits at
 *           KK_PVRING_ADDR (4 MiB), ABI in kvmkit/runner/devices/pvring.py.
 *   0x0700  io-storm's port: written with `outb`, nothing reads it (unassigned on QEMU's pc and
 *           on the runner: 0x600-0x60b are the ACPI PM registers).  The runner should
 *           claim it as a counting sink (or leave it unclaimed; then --strict trips on it).
 *
 * Memory (guest-physical, identity-mapped by the guest's own page tables)
 *   0x00008000  smp's AP real-mode trampoline (SIPI vector 0x08), copied there by the BSP
 *               after it has read the multiboot info and command line.
 *   0x00100000  the image: .text (multiboot header, entry, exception stubs), .rodata,
 *               .data (page tables, GDT, IDT, TSS with I/O bitmap), .bss (16 KiB kernel
 *               stack = TSS.RSP0, 16 KiB user stack, 64 x 4 KiB AP stacks, buffers) up to
 *               the symbol `_end` (below 2 MiB, checked at link time; give guests >= 4 MiB).
 *   The multiboot info: the guest reads only `flags` and `cmdline` (and copies the command
 *   line) before anything else, so the loader may put it anywhere outside the image.
 *   0 - 1 GiB   mapped write-back with 2 MiB pages, user-accessible.
 *   1 - 3 GiB   not mapped: any access is a page fault (fault=pf uses 0x80000000).
 *   3 - 4 GiB   mapped uncacheable (PCD|PWT), user-accessible: MMIO.
 *     0xd0000000  mmio-storm's target; nothing backs it (the runner sees MMIO exits).
 *     0xfee00000  local APIC (xAPIC), used by smp.
 *
 * CPL 3: entered with iretq, RFLAGS.IOPL = 3 and a TSS whose I/O permission bitmap allows
 * every port, so port I/O (console, exit, hypercalls) works from user mode on VT-x, AMD-V,
 * TCG and PVM (which ignores IOPL for user code and checks only the bitmap).
 *
 * Faults: the IDT is built by the assembler (no run-time set-up); vectors 0-31 go to stubs
 * in .text (below 0x110000, as the IDT assumes), then to a handler that prints
 *   "fault: vector N at RIP 0x..., error 0x..., cpl C[, cr2 0x...]\n"
 * on the debug console and exits with KK_FAULT_EXIT_CODE.
 *
 * Interrupts: the IDT has KK_IDT_VECTORS entries; vectors 32 and up (KK_IRQ_FIRST..) go
 * through stubs to kk_irq_dispatch(), which counts the vector in kk_irq_count[] and calls
 * the handler a program set with kk_set_irq_handler() (the handler sends the EOI).  IF=0
 * from entry to exit except inside kk_wait_for_interrupt() ("sti; hlt; cli": the CPU
 * sleeps until an interrupt, runs its handler, and goes on with IF=0), at CPL 0 only.  An
 * interrupt on a vector beyond the IDT is a #GP and reported as a fault.
 *
 * Platform (QEMU's pc, and the runner's pc platform): 8259 PICs at 0x20/0xa0, 8254 PIT at
 * 0x40-0x43 (IRQ 0; the MADT routes it to IOAPIC pin 2), IOAPIC at 0xfec00000, CMOS RTC
 * at 0x70/0x71 (IRQ 8), PCI configuration at 0xcf8/0xcfc, ACPI tables from an RSDP in
 * 0xe0000-0xfffff, the ACPI PM timer at the port the FADT names (0x608 on both).
 *
 * SMP: the BSP starts the APs with INIT, SIPI, SIPI (vector 0x08) broadcast to all but
 * itself; each AP runs the trampoline at 0x8000 (real mode straight to long mode), reports
 * and then halts with IF=0 for good.  Halted APs never exit on their own: the host must
 * stop them when the BSP exits.
 *
 * Exit codes: 0 success, 1 the program's own check failed, 2 a bad command-line value,
 * 3 a CPU exception (KK_FAULT_EXIT_CODE).
 *
 * Command line (multiboot cmdline; QEMU passes "<image> args"): whitespace-separated
 * key=value tokens.  A first token without '=' (the image name) is dropped; any other
 * token that is not key=value is ignored.
 *   n=N          workload size (compute, io-storm, mmio-storm)
 *   cpl=0|3      privilege level for the workload (compute, io-storm, mmio-storm; default 3)
 *   console=puts use the PUTS hypercall instead of port 0xe9 (kvmkit runner only)
 *   fault=ud|pf|gp|triple         raise that fault at CPL 0 before main (triple: with an
 *                                 empty IDT, so the CPU shuts down)
 *   fault=user-ud|user-pf|user-gp raise it right after switching to CPL 3
 */
#ifndef KVMKIT_GUEST_H
#define KVMKIT_GUEST_H

#define KK_PORT_DEBUGCON 0x00e9
#define KK_PORT_EXIT 0x00f4
#define KK_HYPERCALL_BASE 0x0500
#define KK_HC_TIME 1
#define KK_HC_PUTS 2
#define KK_HC_EXIT 3
#define KK_HC_MARK 4
#define KK_PORT_FW_CFG_SELECTOR 0x0510
#define KK_PORT_FW_CFG_DATA 0x0511
#define KK_FW_CFG_RAM_SIZE 0x03
#define KK_FW_CFG_NB_CPUS 0x05
#define KK_IO_STORM_PORT 0x0700
#define KK_PORT_COM1 0x03f8
/* pvio's paravirtual ring (kvmkit/runner/devices/pvring.py documents the ABI). */
#define KK_PVRING_PORT 0x0720
#define KK_PVRING_DOORBELL 0x0724
#define KK_PVRING_ADDR 0x00400000UL
#define KK_PVRING_MAGIC 0x474e495256504b4bUL /* "KKPVRING" */
#define KK_MMIO_STORM_ADDR 0xd0000000UL
#define KK_LAPIC_BASE 0xfee00000UL
#define KK_AP_TRAMPOLINE_ADDR 0x8000
#define KK_UNMAPPED_ADDR 0x80000000UL
#define KK_FAULT_EXIT_CODE 3
#define KK_MAX_CPUS 64
#define KK_IOAPIC_BASE 0xfec00000UL
/* IDT size: exceptions 0-31, interrupts 32-63 (spurious LAPIC vector: KK_SPURIOUS_VECTOR). */
#define KK_IDT_VECTORS 64
#define KK_IRQ_FIRST 32
#define KK_SPURIOUS_VECTOR 0x3f

/* Segment selectors of the guest's GDT (built in entry.S). */
#define KK_SEL_KERNEL_CODE 0x08
#define KK_SEL_KERNEL_DATA 0x10
#define KK_SEL_USER_CODE 0x1b
#define KK_SEL_USER_DATA 0x23
#define KK_SEL_TSS 0x28

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

struct kk_hc_time {
    u64 nsecs;
};
struct kk_hc_puts {
    u64 data_gpa;
    u64 len;
};
struct kk_hc_exit {
    u64 code;
};
struct kk_hc_mark {
    u64 label_gpa;
    u64 label_len;
};

static inline void kk_outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void kk_outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void kk_outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 kk_inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Guest memory is identity-mapped, so a pointer is its own guest-physical address.  The
 * "memory" clobber makes the compiler store the argument struct before the exit. */
static inline void kk_hypercall(u32 nr, void *arg)
{
    __asm__ volatile("outl %0, %1" ::"a"((u32)(u64)arg), "Nd"((u16)(KK_HYPERCALL_BASE + nr))
                     : "memory");
}

static inline void kk_pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 kk_rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline unsigned kk_cpl(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}

static inline void kk_mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u32 kk_mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline u16 kk_inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 kk_inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Sleep until an interrupt has been handled (sti's one-instruction shadow makes "sti; hlt"
 * atomic: an interrupt pending at the sti is taken after the hlt, which then returns). */
static inline void kk_wait_for_interrupt(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

/* Interrupts (runtime.c). */
typedef void (*kk_irq_handler)(u32 vector);
extern volatile u32 kk_irq_count[KK_IDT_VECTORS];
void kk_set_irq_handler(u32 vector, kk_irq_handler fn);

/* runtime.c */
void kk_putc(char c);
void kk_write(const char *s, u64 len);
void kk_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Inline so that the length of a literal is computed by the compiler, not the guest. */
static inline void kk_puts(const char *s) { kk_write(s, __builtin_strlen(s)); }
static inline void kk_mark(const char *label)
{
    struct kk_hc_mark a = {(u64)label, __builtin_strlen(label)};
    kk_hypercall(KK_HC_MARK, &a);
}
u64 kk_time_ns(void); /* 0 when no kvmkit runner answers (under QEMU) */
__attribute__((noreturn)) void kk_exit(u32 code);
__attribute__((noreturn)) void kk_fail(u32 code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* The command line with the image name left in; returns the value after "key=", or 0. */
const char *kk_arg(const char *key);
/* key=N as a decimal or 0x-hex number; `def` if absent; exits 2 on a malformed value. */
u64 kk_arg_u64(const char *key, u64 def);
/* cpl=0|3, default 3; exits 2 on anything else. */
unsigned kk_arg_cpl(void);

/* Runs fn at CPL 0 (a plain call) or CPL 3 (iretq with IOPL=3, IF=0, on the user stack).
 * fn must end with kk_exit(): from CPL 3 there is no way back. */
__attribute__((noreturn)) void kk_run_at_cpl(unsigned cpl, void (*fn)(void));

void kk_spin_lock(volatile u32 *lock);
void kk_spin_unlock(volatile u32 *lock);

/* fw_cfg: select `key` and read `len` bytes of its item. */
void kk_fw_cfg_read(u16 key, void *buf, u32 len);

void kk_load_idt(void);

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
u64 strlen(const char *s);

/* Provided by each program. */
int main(void);

#endif /* __ASSEMBLER__ */
#endif /* KVMKIT_GUEST_H */
