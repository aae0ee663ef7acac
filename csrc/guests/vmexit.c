/*
 * vmexit: the cost of one VM exit of each kind, in TSC cycles, in the style of
 * kvm-unit-tests' x86/vmexit.c ("<name> <cycles>" per test): like it, each row doubles its
 * iteration count from 32 until one timed loop takes at least goal= cycles (default 2^26,
 * not 2^30: on an emulating KVM backend such as PVM one exit costs ~10^5 cycles), then
 * runs the timed loop once more with that count, bracketed for the host (below); n=N
 * fixes the count instead.
 *
 * Rows, in the order run (the CPL-0 rows first: the switch to CPL 3 is one-way):
 *   lapic-timer  arm the LAPIC timer one-shot (1 tick), sleep in HLT until it fires, EOI
 *                (CPL 0: interrupts are taken only at CPL 0 in this runtime)
 *   self-ipi     fixed IPI to self through the ICR, take it in "sti; hlt", EOI (CPL 0)
 *   ipi          fixed IPI from CPU 0 to CPU 1, which sleeps in "sti; hlt", takes it and
 *                EOIs; CPU 0 spins until it was taken (kvm-unit-tests' "ipi"; CPL 0;
 *                needs two CPUs, fw_cfg key 0x05 — with one the row says "skipped")
 *   cpuid        CPUID leaf 0 (CPL 3 unless cpl=0)
 *   hypercall    the TIME hypercall, outl to port 0x501 (under QEMU an unassigned port,
 *                which still exits to QEMU's user space)
 *   pio          outb to pc-testdev's scratch port 0xe0 (a device in the VMM's user space)
 *   mmio         32-bit write to pc-testdev's iomem at 0xff000000 (a device in the VMM)
 * rows=MASK (bit i = row i above, default all) picks rows; the pio and mmio rows need
 * pc-testdev (QEMU -device pc-testdev, the runner's --device pc-testdev).
 *
 * Output: one "vmexit: <row> <cycles per op> cycles cpl <c> n <n>" line per row, then
 * "vmexit: done".  For a host-side cross-check each row's loop is bracketed by two
 * MARK hypercalls labelled "row-start"/"row-end" (outside the timed region), and, with
 * stamps=1, by one '@' byte on the debug console each (so a host reading QEMU's console
 * pipe can time the loop with its own clock).
 */
#include "pc.h"

#define VEC_TIMER 0x30
#define VEC_IPI 0x31
#define VEC_REMOTE 0x32
#define LAPIC_ICR_HIGH 0x310
#define ICR_FIXED_PHYSICAL 0x00004000u /* fixed delivery, physical destination, assert */
#define ICR_SELF_FIXED 0x00040000u /* destination shorthand "self", fixed delivery */
#define TESTDEV_PORT 0xe0
#define TESTDEV_IOMEM 0xff000000UL
#define NROWS 7

static u64 fixed_n, goal, rows, stamps;
static volatile u32 ap_apic_id, ap_ready;

static const char *const names[NROWS] = {"lapic-timer", "self-ipi", "ipi", "cpuid",
                                         "hypercall",   "pio",      "mmio"};

/* CPU 1: take remote IPIs forever (the handler EOIs; kk_irq_count[] counts them). */
void kk_ap_main(u32 index)
{
    kk_load_idt();
    lapic_enable(0);
    if (index == 1) {
        ap_apic_id = lapic_read(LAPIC_ID) >> 24;
        __atomic_store_n(&ap_ready, 1, __ATOMIC_RELEASE);
        for (;;)
            kk_wait_for_interrupt();
    }
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void op_lapic_timer(void)
{
    u32 before = kk_irq_count[VEC_TIMER];
    lapic_write(LAPIC_TIMER_INITIAL, 1);
    while (kk_irq_count[VEC_TIMER] == before)
        kk_wait_for_interrupt();
}

static void op_self_ipi(void)
{
    u32 before = kk_irq_count[VEC_IPI];
    lapic_write(LAPIC_ICR_LOW, ICR_SELF_FIXED | VEC_IPI);
    while (kk_irq_count[VEC_IPI] == before)
        kk_wait_for_interrupt();
}

static void op_ipi(void)
{
    u32 before = __atomic_load_n(&kk_irq_count[VEC_REMOTE], __ATOMIC_ACQUIRE);
    lapic_write(LAPIC_ICR_HIGH, ap_apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, ICR_FIXED_PHYSICAL | VEC_REMOTE);
    while (__atomic_load_n(&kk_irq_count[VEC_REMOTE], __ATOMIC_ACQUIRE) == before)
        kk_pause();
}

static void op_cpuid(void)
{
    u32 a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
}

static void op_hypercall(void)
{
    static struct kk_hc_time t;
    kk_hypercall(KK_HC_TIME, &t);
}

static void op_pio(void) { kk_outb(TESTDEV_PORT, 0x5a); }

static void op_mmio(void) { kk_mmio_write32(TESTDEV_IOMEM, 0x5a5a5a5a); }

static void (*const ops[NROWS])(void) = {op_lapic_timer, op_self_ipi, op_ipi, op_cpuid,
                                         op_hypercall,   op_pio,      op_mmio};

static void run_row(int i)
{
    if (!(rows & (1UL << i)))
        return;
    void (*op)(void) = ops[i];
    u64 n = fixed_n, t1, t2;
    if (!n) /* calibrate, untimed by the host */
        for (n = 32;; n *= 2) {
            t1 = kk_rdtsc();
            for (u64 k = 0; k < n; k++)
                op();
            if (kk_rdtsc() - t1 >= goal || n >= (1UL << 40))
                break;
        }
    kk_mark("row-start");
    if (stamps)
        kk_putc('@');
    t1 = kk_rdtsc();
    for (u64 k = 0; k < n; k++)
        op();
    t2 = kk_rdtsc();
    if (stamps)
        kk_putc('@');
    kk_mark("row-end");
    kk_printf("vmexit: %s %lu cycles cpl %u n %lu\n", names[i], (t2 - t1) / n, kk_cpl(), n);
}

__attribute__((noreturn)) static void user_rows(void)
{
    for (int i = 3; i < NROWS; i++)
        run_row(i);
    kk_puts("vmexit: done\n");
    kk_exit(0);
}

int main(void)
{
    fixed_n = kk_arg_u64("n", 0);
    goal = kk_arg_u64("goal", 1UL << 26);
    rows = kk_arg_u64("rows", (1UL << NROWS) - 1);
    stamps = kk_arg_u64("stamps", 0);
    unsigned cpl = kk_arg_cpl();
    lapic_enable(0);
    kk_set_irq_handler(VEC_TIMER, eoi_lapic_handler);
    kk_set_irq_handler(VEC_IPI, eoi_lapic_handler);
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, VEC_TIMER);
    run_row(0);
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    run_row(1);
    u16 cpus = 1;
    kk_fw_cfg_read(KK_FW_CFG_NB_CPUS, &cpus, sizeof(cpus));
    if (rows & (1UL << 2)) {
        if (cpus < 2) {
            kk_puts("vmexit: ipi skipped (one cpu)\n");
        } else {
            kk_set_irq_handler(VEC_REMOTE, eoi_lapic_handler);
            pc_start_aps();
            u64 start = kk_rdtsc();
            while (!__atomic_load_n(&ap_ready, __ATOMIC_ACQUIRE))
                if (kk_rdtsc() - start > (1UL << 36))
                    kk_fail(1, "vmexit: cpu 1 never came up\n");
            run_row(2);
        }
    }
    kk_run_at_cpl(cpl, user_rows);
}
