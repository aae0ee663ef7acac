/*
 * testdev: drives QEMU's pc-testdev (run with -device pc-testdev / --device pc-testdev):
 * its 32-bit scratch register at 0xe0 (written as a dword, read back by word and byte
 * through 0xe0 and 0xe8; not 0xe9, which stays the debug console), its 64 KiB of memory at 0xff000000, and an interrupt line the
 * guest raises itself: ISA IRQ 14 (edge, no MADT override) through the IOAPIC, pin 14,
 * vector 0x3e, raised with a write of 1 to port 0x200e and lowered with 0.  A LAPIC
 * watchdog (~2 s) ends a wait whose interrupt never comes.  Exits 0 when all passed.
 */
#include "pc.h"

#define TESTDEV_IOPORT 0xe0
#define TESTDEV_IOPORT_BYTE 0xe8
#define TESTDEV_IRQ_BASE 0x2000
#define TESTDEV_IOMEM 0xff000000UL
#define LINE 14
#define VEC_LINE 0x3e
#define VEC_WATCHDOG 0x31

static int report(const char *what, int ok)
{
    kk_printf("testdev: %s: %s\n", what, ok ? "yes" : "no");
    return ok;
}

int main(void)
{
    int ok = 1;
    kk_outl(TESTDEV_IOPORT, 0x11223344);
    ok &= report("scratch register reads back by dword, word and byte",
                 kk_inl(TESTDEV_IOPORT) == 0x11223344 && kk_inw(TESTDEV_IOPORT + 2) == 0x1122 &&
                     kk_inb(TESTDEV_IOPORT_BYTE) == 0x44 && kk_inb(TESTDEV_IOPORT_BYTE + 3) == 0x11);

    volatile u32 *mem = (volatile u32 *)TESTDEV_IOMEM;
    mem[0] = 0xcafef00d;
    mem[0x3fff] = 0x600d600d; /* the last dword of the 64 KiB */
    ok &= report("iomem keeps what is written", mem[0] == 0xcafef00d && mem[0x3fff] == 0x600d600d);

    pic_init();
    lapic_enable(0);
    kk_set_irq_handler(VEC_LINE, eoi_lapic_handler);
    kk_set_irq_handler(VEC_WATCHDOG, eoi_lapic_handler);
    ioapic_route(LINE, VEC_LINE, lapic_read(LAPIC_ID) >> 24);
    kk_outb(TESTDEV_IRQ_BASE + LINE, 1);
    int fired = wait_irq_or_watchdog(VEC_LINE, VEC_WATCHDOG, 2);
    kk_outb(TESTDEV_IRQ_BASE + LINE, 0);
    ioapic_mask(LINE);
    ok &= report("irq 14 raised by the guest arrives through the ioapic", fired);
    return ok ? 0 : 1;
}
