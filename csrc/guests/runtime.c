/*
 * The runtime every guest links: console, exit, hypercalls, command line, IDT and fault
 * reports, CPL 3 entry, fw_cfg, spinlocks.  entry.S calls kk_start() in long mode.
 */
#include <stdarg.h>

#include "kvmkit_guest.h"

#define MB_BOOT_MAGIC 0x2badb002
#define MB_INFO_CMDLINE (1u << 2)

struct kk_fault_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern const char kk_idt_ptr[], kk_empty_idt_ptr[];
extern char kk_user_stack_top[];
void kk_enter_user(void (*fn)(void), void *stack) __attribute__((noreturn));

/* Next AP index, handed out by kk_ap_long_entry with lock xadd; the BSP is 0. */
volatile u32 kk_ap_next = 1;

static char cmdline[512];
static int console_puts;
static void (*user_fn)(void);

/* String instructions: KVM's emulator runs a whole rep loop in the kernel, so at CPL 0 on a
 * PVM host one of these costs about what one ordinary instruction does. */
void *memset(void *d, int c, u64 n)
{
    void *p = d;
    __asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    void *p = d;
    __asm__ volatile("rep movsb" : "+D"(p), "+S"(s), "+c"(n)::"memory");
    return d;
}

/* Index of the first byte c in s[0, max), or max. */
static u64 find_byte(const char *s, char c, u64 max)
{
    const char *p = s;
    u64 n = max;
    if (!max)
        return 0;
    __asm__ volatile("repne scasb" : "+D"(p), "+c"(n) : "a"(c) : "cc", "memory");
    return p[-1] == c ? (u64)(p - s) - 1 : max;
}

u64 strlen(const char *s)
{
    u64 n = 0;
    while (s[n])
        n++;
    return n;
}

/* ---- console, exit, hypercalls --------------------------------------------------------- */

void kk_write(const char *s, u64 len)
{
    if (console_puts) {
        struct kk_hc_puts a = {(u64)s, len};
        kk_hypercall(KK_HC_PUTS, &a);
        return;
    }
    /* One instruction for the whole string: at CPL 0 on a PVM host each instruction is
     * emulated, so this saves ~4 per byte.  KVM still exits once per byte (count = 1). */
    __asm__ volatile("rep outsb" : "+S"(s), "+c"(len) : "d"(KK_PORT_DEBUGCON) : "memory");
}

void kk_putc(char c) { kk_write(&c, 1); }

u64 kk_time_ns(void)
{
    struct kk_hc_time a = {0};
    kk_hypercall(KK_HC_TIME, &a);
    return a.nsecs;
}

void kk_exit(u32 code)
{
    kk_mark("done");
    kk_outl(KK_PORT_EXIT, code);
    /* Still here: no isa-debug-exit device.  Try the hypercall, then stop. */
    struct kk_hc_exit a = {code};
    kk_hypercall(KK_HC_EXIT, &a);
    for (;;) {
        if (kk_cpl() == 0)
            __asm__ volatile("cli; hlt");
        else
            kk_pause();
    }
}

/* ---- formatting -------------------------------------------------------------------------- */

struct outbuf {
    char buf[256];
    u64 len;
};

static void ob_putc(struct outbuf *o, char c)
{
    if (o->len == sizeof(o->buf)) {
        kk_write(o->buf, o->len);
        o->len = 0;
    }
    o->buf[o->len++] = c;
}

static void ob_write(struct outbuf *o, const char *s, u64 n)
{
    if (o->len + n > sizeof(o->buf)) {
        kk_write(o->buf, o->len);
        o->len = 0;
        if (n > sizeof(o->buf)) {
            kk_write(s, n);
            return;
        }
    }
    memcpy(o->buf + o->len, s, n);
    o->len += n;
}

static void ob_putu(struct outbuf *o, u64 v, unsigned base)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n)
        ob_putc(o, tmp[--n]);
}

/* %s %c %d %u %x with an optional l; enough for these programs. */
static void kk_vprintf(const char *fmt, va_list ap)
{
    struct outbuf o;
    o.len = 0;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            const char *run = fmt;
            while (fmt[1] && fmt[1] != '%')
                fmt++;
            ob_write(&o, run, (u64)(fmt - run) + 1);
            continue;
        }
        int is_long = 0;
        if (*++fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *str = va_arg(ap, const char *);
            ob_write(&o, str, strlen(str));
            break;
        }
        case 'c':
            ob_putc(&o, (char)va_arg(ap, int));
            break;
        case 'd': {
            i64 v = is_long ? va_arg(ap, i64) : va_arg(ap, int);
            if (v < 0) {
                ob_putc(&o, '-');
                v = -v;
            }
            ob_putu(&o, (u64)v, 10);
            break;
        }
        case 'u':
        case 'x':
            ob_putu(&o, is_long ? va_arg(ap, u64) : va_arg(ap, u32), *fmt == 'u' ? 10 : 16);
            break;
        case '%':
            ob_putc(&o, '%');
            break;
        default:
            ob_putc(&o, '?');
            break;
        }
        if (!*fmt)
            break;
    }
    if (o.len)
        kk_write(o.buf, o.len);
}

void kk_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kk_vprintf(fmt, ap);
    va_end(ap);
}

void kk_fail(u32 code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kk_vprintf(fmt, ap);
    va_end(ap);
    kk_exit(code);
}

/* ---- command line ------------------------------------------------------------------------ */

static int is_space(char c) { return (unsigned char)c <= ' '; } /* and NUL */

const char *kk_arg(const char *key)
{
    u64 klen = strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (*p && is_space(*p))
            p++;
        const char *tok = p;
        while (!is_space(*p))
            p++;
        u64 i = 0;
        while (i < klen && tok + i < p && tok[i] == key[i])
            i++;
        if (i == klen && tok + klen < p && tok[klen] == '=')
            return tok + klen + 1;
    }
    return 0;
}

static int arg_is(const char *v, const char *want)
{
    while (*want && *v == *want) {
        v++;
        want++;
    }
    return *want == 0 && is_space(*v);
}

u64 kk_arg_u64(const char *key, u64 def)
{
    const char *v = kk_arg(key);
    if (!v)
        return def;
    unsigned base = 10;
    if (v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
        base = 16;
        v += 2;
    }
    u64 r = 0;
    int digits = 0, bad = 0;
    for (; !is_space(*v); v++, digits++) {
        unsigned d;
        if (*v >= '0' && *v <= '9')
            d = (unsigned)(*v - '0');
        else if (base == 16 && *v >= 'a' && *v <= 'f')
            d = (unsigned)(*v - 'a' + 10);
        else if (base == 16 && *v >= 'A' && *v <= 'F')
            d = (unsigned)(*v - 'A' + 10);
        else
            d = 99;
        if (d >= base || r > (~0UL - d) / base)
            bad = 1;
        r = r * base + d;
    }
    if (bad || !digits)
        kk_fail(2, "bad value for %s=: expected a decimal or 0x-hex number below 2^64\n", key);
    return r;
}

unsigned kk_arg_cpl(void)
{
    const char *v = kk_arg("cpl");
    if (!v || arg_is(v, "3"))
        return 3;
    if (arg_is(v, "0"))
        return 0;
    kk_fail(2, "bad value for cpl=: expected 0 or 3\n");
}

/* ---- faults ------------------------------------------------------------------------------ */

void kk_fault(struct kk_fault_frame *f)
{
    /* A fault while printing from CPL 3 may leave the PUTS path half done; use the port. */
    console_puts = 0;
    kk_printf("fault: vector %lu at RIP 0x%lx, error 0x%lx, cpl %lu", f->vector, f->rip,
              f->error, f->cs & 3);
    if (f->vector == 14) {
        u64 cr2;
        __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
        kk_printf(", cr2 0x%lx", cr2);
    }
    kk_puts("\n");
    kk_exit(KK_FAULT_EXIT_CODE);
}

void kk_load_idt(void) { __asm__ volatile("lidt %0" ::"m"(*kk_idt_ptr)); }

/* ---- interrupts -------------------------------------------------------------------------- */

volatile u32 kk_irq_count[KK_IDT_VECTORS];
static kk_irq_handler irq_handlers[KK_IDT_VECTORS];

void kk_set_irq_handler(u32 vector, kk_irq_handler fn)
{
    if (vector < KK_IRQ_FIRST || vector >= KK_IDT_VECTORS)
        kk_fail(1, "kk_set_irq_handler: vector %u is outside %u-%u\n", vector, KK_IRQ_FIRST,
                KK_IDT_VECTORS - 1);
    irq_handlers[vector] = fn;
}

/* Called by the interrupt stubs in entry.S with IF=0. */
void kk_irq_dispatch(u32 vector)
{
    if (vector >= KK_IDT_VECTORS)
        return;
    __atomic_add_fetch(&kk_irq_count[vector], 1, __ATOMIC_RELAXED);
    if (irq_handlers[vector])
        irq_handlers[vector](vector);
}

static int is_user_fault(const char *kind) { return kind[0] == 'u' && kind[1] == 's'; }

/* fault=KIND: ud, pf, gp, or the same with "user-" in front (raised at CPL 3). */
static void raise_fault(const char *kind)
{
    if (is_user_fault(kind))
        kind += 5;
    if (arg_is(kind, "ud"))
        __asm__ volatile("ud2");
    if (arg_is(kind, "pf"))
        (void)*(volatile u64 *)KK_UNMAPPED_ADDR;
    if (arg_is(kind, "gp"))
        (void)*(volatile u64 *)0x8000000000000000UL; /* non-canonical */
}

/* ---- CPL 3 ----------------------------------------------------------------------------- */

static void user_entry(void)
{
    kk_mark("user-mode");
    const char *f = kk_arg("fault");
    if (f && is_user_fault(f))
        raise_fault(f);
    user_fn();
    kk_exit(0); /* fn is noreturn; this only keeps the compiler honest */
}

void kk_run_at_cpl(unsigned cpl, void (*fn)(void))
{
    if (cpl == 0) {
        fn();
        kk_exit(0);
    }
    user_fn = fn;
    kk_enter_user(user_entry, kk_user_stack_top);
}

/* ---- SMP support --------------------------------------------------------------------------- */

void kk_spin_lock(volatile u32 *lock)
{
    while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE))
        while (*lock)
            kk_pause();
}

void kk_spin_unlock(volatile u32 *lock) { __atomic_store_n(lock, 0, __ATOMIC_RELEASE); }

/* Only smp starts APs; any other image parks one that shows up anyway. */
__attribute__((weak)) void kk_ap_main(u32 index)
{
    (void)index;
    for (;;)
        __asm__ volatile("cli; hlt");
}

void kk_fw_cfg_read(u16 key, void *buf, u32 len)
{
    kk_outw(KK_PORT_FW_CFG_SELECTOR, key);
    for (u32 i = 0; i < len; i++)
        ((u8 *)buf)[i] = kk_inb(KK_PORT_FW_CFG_DATA);
}

/* ---- entry from entry.S ------------------------------------------------------------------ */

/* Copies the command line without its first token when that is not key=value (QEMU and
 * kvmkit pass "<image> args"), so later look-ups need not walk the image's path. */
static void copy_cmdline(const char *src)
{
    u64 len = find_byte(src, 0, sizeof(cmdline) - 1);
    u64 first = find_byte(src, ' ', len);
    if (find_byte(src, '=', first) == first)
        src += first, len -= first;
    memcpy(cmdline, src, len);
    cmdline[len] = 0;
}

void kk_start(u32 magic, u32 mbi)
{
    /* Copy the command line first: it lives wherever the loader put it (QEMU: after the
     * image; smp later overwrites low memory with its trampoline). */
    if (magic == MB_BOOT_MAGIC && (*(volatile u32 *)(u64)mbi & MB_INFO_CMDLINE))
        copy_cmdline((const char *)(u64) * (volatile u32 *)(u64)(mbi + 16));
    const char *console = kk_arg("console");
    console_puts = console && arg_is(console, "puts");
    if (magic != MB_BOOT_MAGIC)
        kk_printf("warning: not started by a multiboot loader (eax=0x%x); no command line\n",
                  magic);

    const char *f = kk_arg("fault");
    if (f && !(arg_is(f, "ud") || arg_is(f, "pf") || arg_is(f, "gp") || arg_is(f, "triple") ||
               arg_is(f, "user-ud") || arg_is(f, "user-pf") || arg_is(f, "user-gp")))
        kk_fail(2, "bad value for fault=: expected ud, pf, gp, triple, user-ud, user-pf or "
                   "user-gp\n");
    if (f && arg_is(f, "triple")) {
        /* Every vector is now out of bounds: #UD -> #GP -> #DF -> shutdown. */
        __asm__ volatile("lidt %0; ud2" ::"m"(*kk_empty_idt_ptr));
    }
    if (f && !is_user_fault(f))
        raise_fault(f);

    kk_mark("main");
    kk_exit((u32)main());
}
