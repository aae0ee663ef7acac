/*
 * timers: interrupts from the three PC timers, each waited for with HLT.
 *   1. the local APIC timer (one-shot, vector 0x30): HLT returns only once it has fired,
 *      and the timer's current count is then 0;
 *   2. the 8254 PIT's IRQ 0 through the 8259 PIC (vector 0x20, LAPIC LINT0 as ExtINT);
 *   3. the same IRQ 0 through the IOAPIC, pin 2 as the MADT's override says (vector 0x32).
 * A LAPIC watchdog (vector 0x31, ~2 s) ends a wait whose interrupt never comes.
 * With more than one CPU (fw_cfg key 0x05), the BSP then starts the others; each arms its
 * own LAPIC timer, sleeps in HLT until it fires and checks in, and the BSP reports whether
 * every CPU's timer fired (waiting at most ~2^33 TSC cycles).
 * Prints one "yes"/"no" line per check; exits 0 when all passed, 1 otherwise.
 */
#include "pc.h"

#define VEC_LAPIC_TIMER 0x30
#define VEC_WATCHDOG 0x31
#define VEC_PIT_IOAPIC 0x32
#define VEC_PIT_PIC (PIC1_VECTOR + 0)
#define PIT_PIN 2
#define PIT_10MS (PIT_HZ / 100)

static void pic_eoi_handler(u32 vector)
{
    (void)vector;
    kk_outb(PIC1_CMD, PIC_EOI);
}

#define WAIT_CYCLES (1UL << 33)

static volatile u32 aps_fired;

/* Each AP: arm its own LAPIC timer and sleep until it has expired (kk_irq_count[] is shared
 * by all CPUs, so an AP looks at its own timer's current count instead), then check in. */
void kk_ap_main(u32 index)
{
    (void)index;
    kk_load_idt();
    lapic_enable(0);
    lapic_timer_oneshot(VEC_LAPIC_TIMER, LAPIC_TICKS_PER_SEC_DIV16 / 64);
    do
        kk_wait_for_interrupt();
    while (lapic_read(LAPIC_TIMER_CURRENT) != 0);
    __atomic_add_fetch(&aps_fired, 1, __ATOMIC_RELEASE);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static int report(const char *what, int ok)
{
    kk_printf("timers: %s: %s\n", what, ok ? "yes" : "no");
    return ok;
}

int main(void)
{
    int ok = 1;
    pic_init(); /* every PIC line masked and off the exception vectors */
    lapic_enable(0);
    kk_set_irq_handler(VEC_LAPIC_TIMER, eoi_lapic_handler);
    kk_set_irq_handler(VEC_WATCHDOG, eoi_lapic_handler);
    kk_set_irq_handler(VEC_PIT_IOAPIC, eoi_lapic_handler);
    kk_set_irq_handler(VEC_PIT_PIC, pic_eoi_handler);

    /* 1. LAPIC timer: ~16 ms, then sleep in HLT until it fires. */
    lapic_timer_oneshot(VEC_LAPIC_TIMER, LAPIC_TICKS_PER_SEC_DIV16 / 64);
    u32 halts = 0;
    while (!kk_irq_count[VEC_LAPIC_TIMER]) {
        kk_wait_for_interrupt();
        halts++;
    }
    ok &= report("lapic timer interrupt on vector 0x30", kk_irq_count[VEC_LAPIC_TIMER] == 1);
    ok &= report("hlt returned once the timer had expired",
                 halts >= 1 && lapic_read(LAPIC_TIMER_CURRENT) == 0);

    /* 2. PIT IRQ 0 through the PIC: unmask IRQ 0, LINT0 as ExtINT. */
    lapic_enable(1);
    kk_outb(PIC1_DATA, 0xfe);
    pit_oneshot(PIT_10MS);
    ok &= report("pit irq 0 through the pic on vector 0x20",
                 wait_irq_or_watchdog(VEC_PIT_PIC, VEC_WATCHDOG, 2));
    kk_outb(PIC1_DATA, 0xff);
    lapic_enable(0);

    /* 3. PIT IRQ 0 through the IOAPIC, pin 2 (ISA IRQ 0 -> GSI 2). */
    ioapic_route(PIT_PIN, VEC_PIT_IOAPIC, lapic_read(LAPIC_ID) >> 24);
    pit_oneshot(PIT_10MS);
    ok &= report("pit irq 0 through the ioapic pin 2 on vector 0x32",
                 wait_irq_or_watchdog(VEC_PIT_IOAPIC, VEC_WATCHDOG, 2));
    ioapic_mask(PIT_PIN);

    /* 4. The other CPUs' LAPIC timers. */
    u16 cpus = 1;
    kk_fw_cfg_read(KK_FW_CFG_NB_CPUS, &cpus, sizeof(cpus));
    if (cpus > 1 && cpus <= KK_MAX_CPUS) {
        pc_start_aps();
        u64 start = kk_rdtsc();
        while (__atomic_load_n(&aps_fired, __ATOMIC_ACQUIRE) < (u32)cpus - 1u &&
               kk_rdtsc() - start < WAIT_CYCLES)
            kk_pause();
        kk_printf("timers: lapic timer interrupt on each of the other %u cpus: %s\n", cpus - 1u,
                  aps_fired == cpus - 1u ? "yes" : "no");
        ok &= aps_fired == cpus - 1u;
    }
    return ok ? 0 : 1;
}
