/*
 * Helpers for the guests that drive the pc platform (timers, rtc, acpi, pci): the local
 * APIC, the IOAPIC, the 8259 PICs, the 8254 PIT, CMOS and PCI configuration mechanism #1.
 * Everything is static inline: each program pays only for what it uses.
 */
#ifndef KVMKIT_PC_H
#define KVMKIT_PC_H

#include "kvmkit_guest.h"

/* Local APIC (xAPIC MMIO) registers. */
#define LAPIC_ID 0x020
#define LAPIC_TPR 0x080
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LOW 0x300
#define ICR_DELIVERY_PENDING (1u << 12)
#define ICR_INIT_OTHERS 0x000c4500 /* all excluding self, level assert, INIT */
#define ICR_SIPI_OTHERS 0x000c4600 /* all excluding self, level assert, start-up | vector */
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3e0
#define LVT_MASKED 0x10000
#define LVT_EXTINT 0x700
#define LVT_NMI 0x400
#define LAPIC_DIVIDE_16 0x3
/* With the divider at 16, ticks per second of the LAPIC timer on a 1 GHz APIC bus (KVM's
 * and QEMU's); the exact rate does not matter to the programs, only that it runs. */
#define LAPIC_TICKS_PER_SEC_DIV16 62500000u

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI 0x20
#define PIC1_VECTOR 0x20 /* IRQs 0-7 on vectors 0x20-0x27 */
#define PIC2_VECTOR 0x28 /* IRQs 8-15 on vectors 0x28-0x2f */

#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_HZ 1193182u

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71

#define PCI_ADDR 0xcf8
#define PCI_DATA 0xcfc

static inline u32 lapic_read(u32 reg) { return kk_mmio_read32(KK_LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { kk_mmio_write32(KK_LAPIC_BASE + reg, v); }
static inline void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

/* Software-enable the LAPIC with the spurious vector inside the IDT; LINT0/LINT1 as the
 * BIOS leaves them (ExtINT from the PIC when `extint`, else masked; NMI). */
static inline void lapic_enable(int extint)
{
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, 0x100 | KK_SPURIOUS_VECTOR);
    lapic_write(LAPIC_LVT_LINT0, extint ? LVT_EXTINT : (LVT_EXTINT | LVT_MASKED));
    lapic_write(LAPIC_LVT_LINT1, LVT_NMI);
}

/* One-shot LAPIC timer: `ticks` at divide-by-16 on `vector` (0 ticks stops it). */
static inline void lapic_timer_oneshot(u32 vector, u32 ticks)
{
    lapic_write(LAPIC_TIMER_DIVIDE, LAPIC_DIVIDE_16);
    lapic_write(LAPIC_LVT_TIMER, vector);
    lapic_write(LAPIC_TIMER_INITIAL, ticks);
}

static inline void ioapic_write(u32 reg, u32 v)
{
    kk_mmio_write32(KK_IOAPIC_BASE, reg);
    kk_mmio_write32(KK_IOAPIC_BASE + 0x10, v);
}

static inline u32 ioapic_read(u32 reg)
{
    kk_mmio_write32(KK_IOAPIC_BASE, reg);
    return kk_mmio_read32(KK_IOAPIC_BASE + 0x10);
}

/* Route IOAPIC `pin` to `vector` on the CPU with APIC id `dest` (fixed, physical, edge,
 * active high), or mask it. */
static inline void ioapic_route(u32 pin, u32 vector, u32 dest)
{
    ioapic_write(0x11 + 2 * pin, dest << 24);
    ioapic_write(0x10 + 2 * pin, vector);
}

static inline void ioapic_mask(u32 pin) { ioapic_write(0x10 + 2 * pin, LVT_MASKED); }

/* Initialise both PICs with IRQs on PIC1_VECTOR/PIC2_VECTOR, all lines masked. */
static inline void pic_init(void)
{
    kk_outb(PIC1_CMD, 0x11);
    kk_outb(PIC2_CMD, 0x11);
    kk_outb(PIC1_DATA, PIC1_VECTOR);
    kk_outb(PIC2_DATA, PIC2_VECTOR);
    kk_outb(PIC1_DATA, 0x04); /* slave on IRQ 2 */
    kk_outb(PIC2_DATA, 0x02);
    kk_outb(PIC1_DATA, 0x01); /* 8086 mode */
    kk_outb(PIC2_DATA, 0x01);
    kk_outb(PIC1_DATA, 0xff);
    kk_outb(PIC2_DATA, 0xff);
}

/* PIT channel 0, mode 0 (interrupt on terminal count) after `count` input ticks. */
static inline void pit_oneshot(u16 count)
{
    kk_outb(PIT_CMD, 0x30);
    kk_outb(PIT_CH0, (u8)count);
    kk_outb(PIT_CH0, (u8)(count >> 8));
}

static inline u8 cmos_read(u8 reg)
{
    kk_outb(CMOS_INDEX, reg);
    return kk_inb(CMOS_DATA);
}

static inline void cmos_write(u8 reg, u8 v)
{
    kk_outb(CMOS_INDEX, reg);
    kk_outb(CMOS_DATA, v);
}

static inline u32 pci_read32(u32 slot, u32 fn, u32 reg)
{
    kk_outl(PCI_ADDR, 0x80000000u | (slot << 11) | (fn << 8) | (reg & 0xfc));
    return kk_inl(PCI_DATA);
}

static inline void pci_write32(u32 slot, u32 fn, u32 reg, u32 v)
{
    kk_outl(PCI_ADDR, 0x80000000u | (slot << 11) | (fn << 8) | (reg & 0xfc));
    kk_outl(PCI_DATA, v);
}

/* Wait, with IF=1 only in HLT, until kk_irq_count[vector] moves or the LAPIC watchdog
 * (`watchdog_vector`, ~`seconds` s) fires; returns 1 if `vector` came.  The watchdog keeps
 * a missing interrupt from hanging the program. */
static inline int wait_irq_or_watchdog(u32 vector, u32 watchdog_vector, u32 seconds)
{
    u32 before = kk_irq_count[vector], wd = kk_irq_count[watchdog_vector];
    lapic_timer_oneshot(watchdog_vector, seconds * LAPIC_TICKS_PER_SEC_DIV16);
    while (kk_irq_count[vector] == before && kk_irq_count[watchdog_vector] == wd)
        kk_wait_for_interrupt();
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    return kk_irq_count[vector] != before;
}

extern const u8 kk_trampoline_start[], kk_trampoline_end[];

/* Start every other CPU with INIT, SIPI, SIPI (broadcast to all but self): each runs the
 * runtime's trampoline and then the program's kk_ap_main(index). */
static inline void pc_start_aps(void)
{
    memcpy((void *)KK_AP_TRAMPOLINE_ADDR, kk_trampoline_start,
           (u64)(kk_trampoline_end - kk_trampoline_start));
    u32 icrs[3] = {ICR_INIT_OTHERS, ICR_SIPI_OTHERS | (KK_AP_TRAMPOLINE_ADDR >> 12),
                   ICR_SIPI_OTHERS | (KK_AP_TRAMPOLINE_ADDR >> 12)};
    for (int i = 0; i < 3; i++) {
        lapic_write(LAPIC_ICR_LOW, icrs[i]);
        for (int j = 0; j < 1000 && (lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING); j++)
            kk_pause();
    }
}

static inline void eoi_lapic_handler(u32 vector)
{
    (void)vector;
    lapic_eoi();
}

#endif /* KVMKIT_PC_H */
