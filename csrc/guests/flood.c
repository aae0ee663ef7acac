/*
 * flood: floods one channel to the host, at CPL 3, until the host stops it (run it with a
 * timeout).  channel= picks it:
 *   debugcon  bytes to the debug console (port 0xe9), a newline every 64
 *   puts      the PUTS hypercall, 4 KiB per call
 *   marks     MARK hypercalls, a new label each time
 *   mmio      32-bit writes to unclaimed MMIO, a new address each time (16 MiB at 0xd0000000)
 *   ports     byte writes to unclaimed ports 0x3000-0x3fff, a new port each time
 *   uart      bytes to the 8250's transmit register (0x3f8), a newline every 64
 * Exits 2 for a missing or unknown channel.  Nothing it does is meant to be kept whole by
 * the host: a host that keeps every byte, address or label grows without bound.
 */
#include "kvmkit_guest.h"

#define UART_THR 0x3f8
#define FLOOD_MMIO_SPAN (16UL << 20)

static char buf[4096];

static int is(const char *v, const char *want)
{
    while (*want && *v == *want) {
        v++;
        want++;
    }
    return *want == 0 && (unsigned char)*v <= ' ';
}

static void to_port(u16 port)
{
    for (u64 i = 0;; i++)
        kk_outb(port, (i & 63) == 63 ? '\n' : (u8)('a' + i % 26));
}

static const char *channel;

__attribute__((noreturn)) static void flood(void)
{
    if (is(channel, "debugcon"))
        to_port(KK_PORT_DEBUGCON);
    if (is(channel, "uart"))
        to_port(UART_THR);
    if (is(channel, "puts")) {
        memset(buf, 'p', sizeof(buf));
        buf[sizeof(buf) - 1] = '\n';
        struct kk_hc_puts a = {(u64)buf, sizeof(buf)};
        for (;;)
            kk_hypercall(KK_HC_PUTS, &a);
    }
    if (is(channel, "marks")) {
        char label[24] = "flood-mark-";
        for (u64 i = 0;; i++) {
            u64 v = i;
            for (int d = 0; d < 12; d++, v /= 10)
                label[11 + 11 - d] = (char)('0' + v % 10);
            struct kk_hc_mark a = {(u64)label, 23};
            kk_hypercall(KK_HC_MARK, &a);
        }
    }
    if (is(channel, "mmio"))
        for (u64 i = 0;; i++)
            kk_mmio_write32(KK_MMIO_STORM_ADDR + (i * 4) % FLOOD_MMIO_SPAN, (u32)i);
    if (is(channel, "ports"))
        for (u64 i = 0;; i++)
            kk_outb((u16)(0x3000 + (i & 0xfff)), (u8)i);
    kk_fail(2, "flood: channel= must be debugcon, puts, marks, mmio, ports or uart\n");
}

int main(void)
{
    channel = kk_arg("channel");
    if (!channel)
        kk_fail(2, "flood: give channel=debugcon|puts|marks|mmio|ports|uart\n");
    kk_run_at_cpl(3, flood);
}
