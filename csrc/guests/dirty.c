/*
 * dirty: a guest to snapshot and migrate.  It runs `ticks=` ticks of a periodic LAPIC
 * timer (vector 0x30, `hz=` per second, default 100) and in each tick writes `rate=`
 * 8-byte words (default 256), each on a pseudo-random 4 KiB page of a `mem=` MiB span
 * (default 16) at 4 MiB, so it dirties up to rate pages per tick (rate * hz * 4 KiB/s).
 * Each value written depends on the word it overwrites, so a page lost or torn in a
 * snapshot or migration changes the result.  At the end it sums the whole span and
 * prints "dirty: checksum 0x..." (the same under every VMM: the work per tick is fixed,
 * only its pace follows the timer) and exits 0.
 *
 * The work and the waits run at CPL 3 (`cpl=3`, the default, natively on PVM) with
 * interrupts on: the timer interrupt enters the CPL-0 handler through the TSS stack and
 * returns to user mode.  `cpl=0` keeps it all at CPL 0.  With more CPUs (fw_cfg), the
 * others are started and halt, so their state is part of every snapshot.
 * `print=N` prints "dirty: tick T" every N ticks (0, the default: never).
 * `mark=1` makes the waits issue MARK hypercalls ("tick") instead of PAUSE, so the host
 * sees the guest run within microseconds of a restore (benchmarks/bench_snapshot.py).
 * Exits 2 for a bad argument (span beyond RAM or 1 GiB, zero ticks or rate).
 */
#include "pc.h"

#define VEC_TICK 0x30
#define SPAN_BASE (4UL << 20)
#define MAX_SPAN_END (1UL << 30) /* the guests map 0-1 GiB */
#define PAGE 4096UL

extern char kk_user_stack_top[];

static u64 span_pages, rate, ticks, marks, every;
static volatile u64 *span;

static inline u64 mix(u64 x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdUL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53UL;
    x ^= x >> 33;
    return x;
}

static void work(void)
{
    u64 state = 0x9e3779b97f4a7c15UL, sum = 0;
    for (u64 t = 0; t < ticks; t++) {
        while (kk_irq_count[VEC_TICK] <= t) { /* pace: wait for tick t */
            if (marks)
                kk_mark("tick");
            else
                kk_pause();
        }
        if (every && t % every == 0)
            kk_printf("dirty: tick %lu\n", t);
        for (u64 i = 0; i < rate; i++) {
            state = state * 6364136223846793005UL + 1442695040888963407UL;
            u64 page = (state >> 17) % span_pages;
            volatile u64 *w = span + page * (PAGE / 8) + (i & 511);
            u64 v = mix(*w ^ state ^ t);
            *w = v;
            sum += v;
        }
    }
    u64 total = sum;
    for (u64 i = 0; i < span_pages * (PAGE / 8); i++)
        total = total * 31 + span[i];
    kk_printf("dirty: %lu ticks, %lu words per tick over %lu pages, checksum 0x%lx\n", ticks,
              rate, span_pages, total);
    kk_exit(0);
}

/* CPL 3 with IF=1 (kk_run_at_cpl enters with IF=0), IOPL=3 for the console port. */
__attribute__((noreturn)) static void enter_user_with_interrupts(void (*fn)(void))
{
    u64 stack = (u64)kk_user_stack_top - 8;
    __asm__ volatile("pushq %0; pushq %1; pushq $0x3202; pushq %2; pushq %3; iretq" ::"i"(
                         KK_SEL_USER_DATA),
                     "r"(stack), "i"(KK_SEL_USER_CODE), "r"((u64)fn)
                     : "memory");
    __builtin_unreachable();
}

int main(void)
{
    u64 mem = kk_arg_u64("mem", 16), hz = kk_arg_u64("hz", 100);
    rate = kk_arg_u64("rate", 256);
    ticks = kk_arg_u64("ticks", 100);
    marks = kk_arg_u64("mark", 0);
    every = kk_arg_u64("print", 0);
    unsigned cpl = kk_arg_cpl();
    u64 ram = 0;
    kk_fw_cfg_read(KK_FW_CFG_RAM_SIZE, &ram, sizeof(ram));
    u64 end = SPAN_BASE + (mem << 20);
    if (!mem || !rate || !ticks || !hz || hz > 10000 || end > MAX_SPAN_END || (ram && end > ram))
        kk_fail(2, "dirty: need mem= MiB within RAM and 1 GiB, ticks=, rate= > 0, hz=1..10000\n");
    span_pages = (mem << 20) / PAGE;
    span = (volatile u64 *)SPAN_BASE;
    kk_printf("dirty: %lu ticks at %lu Hz, %lu words per tick over %lu MiB at cpl %u\n", ticks,
              hz, rate, mem, cpl);

    u16 cpus = 1;
    kk_fw_cfg_read(KK_FW_CFG_NB_CPUS, &cpus, sizeof(cpus));
    if (cpus > 1 && cpus <= KK_MAX_CPUS)
        pc_start_aps(); /* each halts for good (the runtime's kk_ap_main) */

    pic_init();
    lapic_enable(0);
    kk_set_irq_handler(VEC_TICK, eoi_lapic_handler);
    lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_16);
    lapic_write(LAPIC_LVT_TIMER, VEC_TICK | (1u << 17)); /* periodic */
    lapic_write(LAPIC_TIMER_INITIAL, (u32)(LAPIC_TICKS_PER_SEC_DIV16 / hz));
    if (cpl == 3)
        enter_user_with_interrupts(work);
    __asm__ volatile("sti" ::: "memory");
    work();
    return 0;
}
