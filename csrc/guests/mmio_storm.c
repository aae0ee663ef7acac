/*
 * mmio-storm: n= (default 10000) 32-bit writes to KK_MMIO_STORM_ADDR (uncacheable, nothing
 * behind it), plus one 32-bit read of the same address after every 16th write; at CPL 3
 * unless cpl=0.  Every access is one MMIO exit under KVM.  Read values are not printed: an unbacked address reads as all ones
 * under kvmkit's runner and as zero under QEMU, and the output must be the same under both.
 */
#include "kvmkit_guest.h"

static u64 n;

__attribute__((noreturn)) static void storm(void)
{
    unsigned cpl = kk_cpl();
    u64 reads = 0;
    kk_mark("storm-start");
    for (u64 i = 0; i < n; i++) {
        kk_mmio_write32(KK_MMIO_STORM_ADDR, (u32)i);
        if ((i & 15) == 15) {
            (void)kk_mmio_read32(KK_MMIO_STORM_ADDR);
            reads++;
        }
    }
    kk_mark("storm-end");
    kk_printf("mmio-storm: %lu writes, %lu reads at 0x%lx at cpl %u\n", n, reads,
              KK_MMIO_STORM_ADDR, cpl);
    kk_exit(0);
}

int main(void)
{
    n = kk_arg_u64("n", 10000);
    kk_run_at_cpl(kk_arg_cpl(), storm);
}
