/*
 * io-storm: n= (default 10000) one-byte `outb` writes to KK_IO_STORM_PORT, at CPL 3 unless
 * cpl=0.  Each write is one port-I/O exit under KVM; the program checks nothing else.
 */
#include "kvmkit_guest.h"

static u64 n;

__attribute__((noreturn)) static void storm(void)
{
    unsigned cpl = kk_cpl();
    kk_mark("storm-start");
    for (u64 i = 0; i < n; i++)
        kk_outb(KK_IO_STORM_PORT, (u8)i);
    kk_mark("storm-end");
    kk_printf("io-storm: %lu writes to port 0x%x at cpl %u\n", n, KK_IO_STORM_PORT, cpl);
    kk_exit(0);
}

int main(void)
{
    n = kk_arg_u64("n", 10000);
    kk_run_at_cpl(kk_arg_cpl(), storm);
}
