/*
 * pvio: the same bytes sent through an emulated device and through a paravirtual one.
 *
 *   phase=uart  n= bytes (default 1 MiB) to the 8250 UART's THR at 0x3f8, one `outb` each:
 *               every byte is one port-I/O exit.  The guest just writes THR (the runner's
 *               UART, like QEMU's, transmits at once, so THRE is always set); poll=1 reads
 *               LSR and waits for THRE before each byte, as a driver for real hardware
 *               does (then two exits per byte).
 *   phase=ring  n= bytes through the pvring (KK_PVRING_PORT, kvmkit/runner/devices/pvring.py):
 *               a ring of ring= bytes (default 128 KiB) at KK_PVRING_ADDR in guest RAM.
 *               The guest fills batch= bytes (default 4096), publishes `produced` and
 *               rings the doorbell (one `outl` to KK_PVRING_DOORBELL, a KVM_IOEVENTFD:
 *               no exit to the VMM), then waits (polling `consumed`) for room for the next
 *               batch; at the end it waits until everything is consumed and compares the
 *               host's CRC-32 of what it consumed with its own.
 *   phase=none  everything but the transfer (the baseline whose exits the others subtract).
 *
 * The data is a fixed pseudo-random stream (xorshift32 from seed 1); the guest prints
 *   "pvio: <phase> <n> bytes crc32 0x<crc> ..." and exits 0, or 1 when the host's checksum
 * or byte count differs.  Marks "xfer-start" and "xfer-end" bracket the transfer.  All of
 * it runs at CPL 3 (cpl=0 runs it in kernel mode, which PVM emulates).
 *
 * hostile=index|size|addr makes it break the ring ABI on purpose (tests): produced beyond
 * the ring, a ring larger than the device's limit, a ring address outside RAM.
 */
#include "kvmkit_guest.h"

#define MAX_RING (1UL << 20)

struct pvring {
    u64 magic;
    u64 size;
    volatile u64 produced;
    volatile u64 consumed;
    volatile u64 checksum;
    volatile u64 status;
    u64 reserved[2];
    u8 data[];
};

static u32 crc_table[256];
static u64 n, batch, ring_size, poll;
static const char *phase;

static int is(const char *v, const char *word)
{
    if (!v)
        return 0;
    u64 i = 0;
    for (; word[i]; i++)
        if (v[i] != word[i])
            return 0;
    return v[i] == 0 || v[i] == ' ' || v[i] == '\t';
}

static void crc_init(void)
{
    for (u32 i = 0; i < 256; i++) {
        u32 c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static inline u32 crc_byte(u32 crc, u8 b) { return crc_table[(crc ^ b) & 0xff] ^ (crc >> 8); }

static inline u8 next_byte(u32 *x)
{
    u32 v = *x;
    v ^= v << 13;
    v ^= v >> 17;
    v ^= v << 5;
    *x = v;
    return (u8)v;
}

static void barrier(void) { __asm__ volatile("" ::: "memory"); }

static u32 send_uart(void)
{
    u32 x = 1, crc = ~0U;
    for (u64 i = 0; i < n; i++) {
        u8 b = next_byte(&x);
        crc = crc_byte(crc, b);
        if (poll)
            while (!(kk_inb(KK_PORT_COM1 + 5) & 0x20))
                kk_pause();
        kk_outb(KK_PORT_COM1, b);
    }
    return ~crc;
}

static void wait_for(volatile struct pvring *r, u64 target)
{
    while (r->consumed < target) {
        if (r->status)
            kk_fail(1, "pvio: the host rejected the ring (status %lu)\n", r->status);
        kk_pause();
    }
}

static u32 send_ring(struct pvring *r)
{
    u32 x = 1, crc = ~0U;
    u64 sent = 0;
    while (sent < n) {
        u64 chunk = n - sent < batch ? n - sent : batch;
        wait_for(r, sent + chunk > ring_size ? sent + chunk - ring_size : 0);
        u64 at = sent % ring_size;
        for (u64 i = 0; i < chunk; i++) {
            u8 b = next_byte(&x);
            crc = crc_byte(crc, b);
            r->data[at] = b;
            if (++at == ring_size)
                at = 0;
        }
        barrier(); /* the data before the index (x86 keeps stores in order) */
        sent += chunk;
        r->produced = sent;
        kk_outl(KK_PVRING_DOORBELL, 1);
    }
    wait_for(r, n);
    return ~crc;
}

__attribute__((noreturn)) static void hostile(struct pvring *r, const char *how)
{
    if (is(how, "addr")) {
        kk_outl(KK_PVRING_PORT, 0x3ff00000U); /* beyond the RAM of any test VM */
    } else if (is(how, "size")) {
        r->size = 1UL << 30;
        kk_outl(KK_PVRING_PORT, (u32)(u64)r);
    } else if (is(how, "index")) {
        kk_outl(KK_PVRING_PORT, (u32)(u64)r);
        r->produced = r->size + 1; /* more than the ring holds */
        kk_outl(KK_PVRING_DOORBELL, 1);
        for (u64 spins = 0; !r->status && spins < (1UL << 32); spins++)
            kk_pause();
        kk_printf("pvio: host status %lu after a bad index\n", r->status);
        kk_outl(KK_PVRING_DOORBELL, 1); /* the device now ends the run */
    }
    kk_fail(2, "pvio: hostile=%s: the host accepted it\n", how);
}

__attribute__((noreturn)) static void work(void)
{
    crc_init();
    struct pvring *r = (struct pvring *)KK_PVRING_ADDR;
    r->magic = KK_PVRING_MAGIC;
    r->size = ring_size;
    r->produced = 0;
    const char *how = kk_arg("hostile");
    if (how)
        hostile(r, how);
    int ring = is(phase, "ring");
    if (ring)
        kk_outl(KK_PVRING_PORT, (u32)(u64)r);
    u32 crc = 0;
    kk_mark("xfer-start");
    if (is(phase, "uart"))
        crc = send_uart();
    else if (ring)
        crc = send_ring(r);
    kk_mark("xfer-end");
    kk_printf("pvio: %s %lu bytes crc32 0x%x", ring ? "ring" : is(phase, "uart") ? "uart" : "none",
              n, crc);
    if (ring) {
        kk_printf(" batch %lu ring %lu host-crc32 0x%lx host-bytes %lu\n", batch, ring_size,
                  r->checksum, r->consumed);
        if (r->checksum != crc || r->consumed != n)
            kk_fail(1, "pvio: the host consumed other data than the guest sent\n");
    } else {
        kk_printf("\n");
    }
    kk_exit(0);
}

int main(void)
{
    phase = kk_arg("phase");
    if (!phase)
        phase = "none";
    if (!is(phase, "uart") && !is(phase, "ring") && !is(phase, "none"))
        kk_fail(2, "pvio: phase=uart|ring|none\n");
    n = kk_arg_u64("n", 1UL << 20);
    batch = kk_arg_u64("batch", 4096);
    ring_size = kk_arg_u64("ring", 128UL << 10);
    poll = kk_arg_u64("poll", 0);
    if (!ring_size || ring_size > MAX_RING || !batch || batch > ring_size)
        kk_fail(2, "pvio: give 0 < batch <= ring <= %lu\n", MAX_RING);
    kk_run_at_cpl(kk_arg_cpl(), work);
}
