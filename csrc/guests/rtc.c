/*
 * rtc: reads the CMOS clock as a PC kernel does (wait for update-in-progress to clear,
 * read until two readings agree, decode BCD or binary and 12- or 24-hour as register B
 * says) and prints "rtc: YYYY-MM-DD HH:MM:SS" (the host's UTC time under QEMU's default
 * -rtc base=utc and under kvmkit).  Then enables the update-ended interrupt, routes IRQ 8
 * through the IOAPIC (pin 8, vector 0x38) and waits for it in HLT (watchdog ~3 s); the
 * handler reads register C, which must show IRQF and UF.  Exits 0 when every check passed.
 */
#include "pc.h"

#define VEC_RTC 0x38
#define VEC_WATCHDOG 0x31
#define RTC_PIN 8
#define REG_A 0x0a
#define REG_B 0x0b
#define REG_C 0x0c
#define REG_D 0x0d
#define UIP 0x80
#define REG_B_UIE 0x10
#define REG_B_BINARY 0x04
#define REG_B_24H 0x02

struct rtc_time {
    u8 sec, min, hour, mday, mon, year, century;
};

static volatile u8 last_reg_c;

static void rtc_handler(u32 vector)
{
    (void)vector;
    last_reg_c = cmos_read(REG_C); /* acknowledges the interrupt and lowers IRQ 8 */
    lapic_eoi();
}

static void read_raw(struct rtc_time *t)
{
    for (u32 i = 0; i < 1000000 && (cmos_read(REG_A) & UIP); i++)
        kk_pause();
    t->sec = cmos_read(0x00);
    t->min = cmos_read(0x02);
    t->hour = cmos_read(0x04);
    t->mday = cmos_read(0x07);
    t->mon = cmos_read(0x08);
    t->year = cmos_read(0x09);
    t->century = cmos_read(0x32);
}

static u32 bcd(u8 v, int binary) { return binary ? v : (u32)(v >> 4) * 10 + (v & 0xf); }

int main(void)
{
    struct rtc_time a, b;
    read_raw(&a);
    for (int tries = 0; tries < 5; tries++) {
        read_raw(&b);
        if (a.sec == b.sec && a.min == b.min && a.hour == b.hour && a.mday == b.mday &&
            a.mon == b.mon && a.year == b.year && a.century == b.century)
            break;
        a = b;
    }
    u8 regb = cmos_read(REG_B);
    int binary = regb & REG_B_BINARY;
    u32 hour = bcd(a.hour & 0x7f, binary);
    if (!(regb & REG_B_24H))
        hour = hour % 12 + ((a.hour & 0x80) ? 12 : 0);
    kk_printf("rtc: %u%s%u-%s%u-%s%u %s%u:%s%u:%s%u\n", bcd(a.century, binary),
              bcd(a.year, binary) < 10 ? "0" : "", bcd(a.year, binary),
              bcd(a.mon, binary) < 10 ? "0" : "", bcd(a.mon, binary),
              bcd(a.mday, binary) < 10 ? "0" : "", bcd(a.mday, binary), hour < 10 ? "0" : "",
              hour, bcd(a.min, binary) < 10 ? "0" : "", bcd(a.min, binary),
              bcd(a.sec, binary) < 10 ? "0" : "", bcd(a.sec, binary));
    int ok = 1;
    int valid = (cmos_read(REG_D) & 0x80) != 0;
    kk_printf("rtc: register d says the time is valid: %s\n", valid ? "yes" : "no");
    ok &= valid;

    pic_init();
    lapic_enable(0);
    kk_set_irq_handler(VEC_RTC, rtc_handler);
    kk_set_irq_handler(VEC_WATCHDOG, eoi_lapic_handler);
    ioapic_route(RTC_PIN, VEC_RTC, lapic_read(LAPIC_ID) >> 24);
    (void)cmos_read(REG_C); /* drop stale flags */
    cmos_write(REG_B, regb | REG_B_UIE);
    int fired = wait_irq_or_watchdog(VEC_RTC, VEC_WATCHDOG, 3);
    cmos_write(REG_B, regb);
    ioapic_mask(RTC_PIN);
    kk_printf("rtc: update-ended interrupt on irq 8: %s\n", fired ? "yes" : "no");
    kk_printf("rtc: register c said update-ended: %s\n", (last_reg_c & 0x90) == 0x90 ? "yes" : "no");
    ok &= fired && (last_reg_c & 0x90) == 0x90;
    return ok ? 0 : 1;
}
