/*
 * compute: counts the primes below n= (default 10^9) with a segmented,
 * odd-only sieve of Eratosthenes, at CPL 3 unless cpl=0.  Memory stays small (one 32 KiB
 * segment and the base primes) whatever n is; n is limited to 2^32.
 */
#include "kvmkit_guest.h"

#define DEFAULT_N 1000000000UL /* 50847534 primes; ~0.5 s natively on the development host */
#define MAX_N (1UL << 32)
#define SEG 32768             /* odd numbers per segment */
#define MAX_BASE 6542         /* odd primes <= 65536 = sqrt(MAX_N) */

static u8 seg[SEG];
static u8 small[SEG + 2];
static u32 base_primes[MAX_BASE];
static u64 next_multiple[MAX_BASE];
static u64 n;

static u64 isqrt(u64 x)
{
    u64 r = 0;
    for (u64 bit = 1UL << 31; bit; bit >>= 1)
        if ((r + bit) * (r + bit) <= x)
            r += bit;
    return r;
}

static u64 count_primes_below(u64 limit)
{
    if (limit <= 2)
        return 0;
    /* Odd base primes up to sqrt(limit - 1); small[i] stands for 2i + 1. */
    u64 r = isqrt(limit - 1);
    u64 nbase = 0;
    memset(small, 0, r / 2 + 1);
    for (u64 i = 1; 2 * i + 1 <= r; i++) {
        if (small[i])
            continue;
        u64 p = 2 * i + 1;
        base_primes[nbase] = (u32)p;
        next_multiple[nbase++] = p * p;
        for (u64 j = p * p / 2; 2 * j + 1 <= r; j += p)
            small[j] = 1;
    }

    u64 count = 1; /* 2 */
    for (u64 low = 1; low < limit; low += 2 * SEG) {
        u64 high = limit - low > 2 * SEG ? low + 2 * SEG : limit; /* seg[i]: low + 2i < high */
        u64 cells = (high - low + 1) / 2;
        memset(seg, 0, cells);
        if (low == 1)
            seg[0] = 1; /* 1 is not prime */
        for (u64 k = 0; k < nbase; k++) {
            u64 p = base_primes[k];
            if (p * p >= high)
                break;
            u64 m = next_multiple[k];
            for (; m < high; m += 2 * p)
                seg[(m - low) / 2] = 1;
            next_multiple[k] = m;
        }
        for (u64 i = 0; i < cells; i++)
            count += !seg[i];
    }
    return count;
}

__attribute__((noreturn)) static void work(void)
{
    kk_printf("compute: counting primes below %lu at cpl %u\n", n, kk_cpl());
    kk_mark("sieve-start");
    u64 count = count_primes_below(n);
    kk_mark("sieve-end");
    kk_printf("compute: %lu primes below %lu\n", count, n);
    kk_exit(0);
}

int main(void)
{
    n = kk_arg_u64("n", DEFAULT_N);
    if (n > MAX_N)
        kk_fail(2, "compute: n=%lu is too large; the limit is %lu\n", n, MAX_N);
    kk_run_at_cpl(kk_arg_cpl(), work);
}
