/*
 * pci: scans bus 0 through configuration mechanism #1 (0xcf8/0xcfc), prints the host
 * bridge at 00:00.0 (vendor, device, class, header type) and whether an empty slot (31)
 * reads as all ones.  With "testdev=1" it also finds QEMU's pci-testdev (1b36:0005), runs
 * its first MMIO test and first port-I/O test through the BARs the firmware assigned, and
 * prints the counts.  Exits 0 when every check passed.
 */
#include "pc.h"

static u32 testdev_count(u64 mmio, u16 port, int is_port)
{
    /* Test 0 of the BAR's kind (no-eventfd): a write of any value at the header's offset
     * counts; offset at +4, data at +8, count at +12 of the header. */
    if (is_port) {
        kk_outb(port, 0);
        u32 off = kk_inl((u16)(port + 4));
        kk_outb((u16)(port + off), kk_inb((u16)(port + 8)));
        return kk_inl((u16)(port + 12));
    }
    *(volatile u8 *)mmio = 0;
    u32 off = kk_mmio_read32(mmio + 4);
    *(volatile u8 *)(mmio + off) = *(volatile u8 *)(mmio + 8);
    return kk_mmio_read32(mmio + 12);
}

int main(void)
{
    u32 found = 0, testdev_slot = 0;
    for (u32 slot = 0; slot < 32; slot++) {
        u32 id = pci_read32(slot, 0, 0);
        if ((id & 0xffff) == 0xffff)
            continue;
        found++;
        if (id == 0x00051b36)
            testdev_slot = slot;
    }
    u32 id = pci_read32(0, 0, 0), cls = pci_read32(0, 0, 8) >> 16;
    u32 header = (pci_read32(0, 0, 0x0c) >> 16) & 0xff;
    kk_printf("pci: 00:00.0 %x:%x class %x header type %u\n", id & 0xffff, id >> 16, cls, header);
    int ok = id == 0x12378086 && cls == 0x0600;
    kk_printf("pci: host bridge is an i440fx: %s\n", ok ? "yes" : "no");
    int empty = pci_read32(31, 0, 0) == 0xffffffff;
    kk_printf("pci: empty slot 00:1f.0 reads all ones: %s\n", empty ? "yes" : "no");
    ok &= empty && found >= 1;

    if (kk_arg_u64("testdev", 0)) {
        if (!testdev_slot)
            kk_fail(1, "pci: no pci-testdev on bus 0\n");
        u32 bar0 = pci_read32(testdev_slot, 0, 0x10), bar1 = pci_read32(testdev_slot, 0, 0x14);
        u32 cmd = pci_read32(testdev_slot, 0, 0x04) & 3;
        int bars_ok = !(bar0 & 1) && (bar1 & 1) && (bar0 & ~0xfu) && cmd == 3;
        kk_printf("pci: pci-testdev found, bars assigned and enabled: %s\n", bars_ok ? "yes" : "no");
        if (!bars_ok)
            return 1;
        u32 mmio = testdev_count(bar0 & ~0xfu, 0, 0);
        u32 port = testdev_count(0, (u16)(bar1 & ~3u), 1);
        kk_printf("pci: pci-testdev mmio test count %u, portio test count %u\n", mmio, port);
        ok &= mmio == 1 && port == 1;
    }
    return ok ? 0 : 1;
}
