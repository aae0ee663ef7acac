/*
 * smp: starts every CPU that fw_cfg reports (key 0x05) with INIT/SIPI/SIPI through the
 * local APIC, broadcast to all but self.  APs enter the real-mode trampoline at
 * KK_AP_TRAMPOLINE_ADDR, switch to long mode, take an index (1, 2, ... in arrival order)
 * and a stack, and report "cpu N up (apic id X)" under a console spinlock, then halt with
 * interrupts off.  The BSP (cpu 0) waits for all of them (bounded by the TSC, ~2^33 cycles),
 * prints "all N cpus up" and the sorted APIC ids, and exits 0; exit 1 if some never came.
 *
 * The order of the AP lines and which index goes with which APIC id vary from run to run;
 * the last two lines do not.
 */
#include "kvmkit_guest.h"

#define LAPIC_ID 0x020
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LOW 0x300
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_INIT 0x000c4500 /* all excluding self, level assert, INIT */
#define ICR_SIPI 0x000c4600 /* all excluding self, level assert, start-up | vector */
#define WAIT_CYCLES (1UL << 33)

extern const u8 kk_trampoline_start[], kk_trampoline_end[];

static volatile u32 console_lock;
static volatile u32 cpus_up;
static volatile u32 apic_ids[KK_MAX_CPUS];

static u32 lapic_read(u32 reg) { return kk_mmio_read32(KK_LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { kk_mmio_write32(KK_LAPIC_BASE + reg, v); }

static void report(u32 index, u32 apic_id)
{
    apic_ids[index] = apic_id;
    kk_spin_lock(&console_lock);
    kk_printf("cpu %u up (apic id %u)\n", index, apic_id);
    kk_spin_unlock(&console_lock);
    __atomic_add_fetch(&cpus_up, 1, __ATOMIC_RELEASE);
}

void kk_ap_main(u32 index)
{
    kk_load_idt();
    report(index, lapic_read(LAPIC_ID) >> 24);
    for (;;)
        __asm__ volatile("cli; hlt");
}

static void send_ipi(u32 icr)
{
    lapic_write(LAPIC_ICR_LOW, icr);
    for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING); i++)
        kk_pause();
}

int main(void)
{
    u16 ncpus = 0;
    kk_fw_cfg_read(KK_FW_CFG_NB_CPUS, &ncpus, sizeof(ncpus));
    if (ncpus == 0 || ncpus > KK_MAX_CPUS)
        kk_fail(1, "smp: fw_cfg key 0x05 says %u cpus; expected 1 to %u "
                   "(is fw_cfg on ports 0x510/0x511?)\n", ncpus, KK_MAX_CPUS);
    kk_printf("smp: %u cpus from fw_cfg\n", ncpus);
    report(0, lapic_read(LAPIC_ID) >> 24);

    if (ncpus > 1) {
        memcpy((void *)KK_AP_TRAMPOLINE_ADDR, kk_trampoline_start,
               (u64)(kk_trampoline_end - kk_trampoline_start));
        lapic_write(LAPIC_SVR, 0x1ff); /* software-enable the APIC, spurious vector 0xff */
        kk_mark("sipi");
        send_ipi(ICR_INIT);
        send_ipi(ICR_SIPI | (KK_AP_TRAMPOLINE_ADDR >> 12));
        send_ipi(ICR_SIPI | (KK_AP_TRAMPOLINE_ADDR >> 12));
        u64 start = kk_rdtsc();
        while (__atomic_load_n(&cpus_up, __ATOMIC_ACQUIRE) < ncpus) {
            if (kk_rdtsc() - start > WAIT_CYCLES) {
                kk_spin_lock(&console_lock);
                kk_fail(1, "smp: only %u of %u cpus came up\n", cpus_up, ncpus);
            }
            kk_pause();
        }
    }
    kk_mark("all-cpus-up");

    /* Sorted APIC ids: deterministic whatever order the APs arrived in. */
    u32 ids[KK_MAX_CPUS];
    for (u32 i = 0; i < ncpus; i++) {
        u32 v = apic_ids[i], j = i;
        for (; j > 0 && ids[j - 1] > v; j--)
            ids[j] = ids[j - 1];
        ids[j] = v;
    }
    kk_spin_lock(&console_lock);
    kk_printf("all %u cpus up\n", ncpus);
    kk_puts("apic ids:");
    for (u32 i = 0; i < ncpus; i++)
        kk_printf(" %u", ids[i]);
    kk_puts("\n");
    kk_spin_unlock(&console_lock);
    return 0;
}
