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

struct idt_entry {
    u16 offset0;
    u16 selector;
    u8 ist;
    u8 type;
    u16 offset1;
    u32 offset2;
    u32 reserved;
};

struct __attribute__((packed)) table_ptr {
    u16 limit;
    u64 base;
};

extern const u64 kk_isr_table[32];
extern char kk_user_stack_top[];
void kk_enter_user(void (*fn)(void), void *stack) __attribute__((noreturn));

/* Next AP index, handed out by kk_ap_long_entry with lock xadd; the BSP is 0. */
volatile u32 kk_ap_next = 1;

static char cmdline[512];
static int console_puts;
static struct idt_entry idt[32] __attribute__((aligned(16)));
static struct table_ptr idt_ptr;
static void (*user_fn)(void);

void *memset(void *d, int c, u64 n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

u64 kk_strlen(const char *s)
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
    for (u64 i = 0; i < len; i++)
        kk_outb(KK_PORT_DEBUGCON, (u8)s[i]);
}

void kk_putc(char c) { kk_write(&c, 1); }

void kk_puts(const char *s) { kk_write(s, kk_strlen(s)); }

void kk_mark(const char *label)
{
    struct kk_hc_mark a = {(u64)label, kk_strlen(label)};
    kk_hypercall(KK_HC_MARK, &a);
}

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
            ob_putc(&o, *fmt);
            continue;
        }
        int is_long = 0;
        if (*++fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's':
            for (const char *s = va_arg(ap, const char *); *s; s++)
                ob_putc(&o, *s);
            break;
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

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

const char *kk_arg(const char *key)
{
    u64 klen = kk_strlen(key);
    const char *p = cmdline;
    while (*p) {
        while (is_space(*p))
            p++;
        const char *tok = p;
        while (*p && !is_space(*p))
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
    return *want == 0 && (*v == 0 || is_space(*v));
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
    int digits = 0;
    for (; *v && !is_space(*v); v++, digits++) {
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
            digits = -1000;
        r = r * base + d;
    }
    if (digits <= 0)
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

void kk_load_idt(void) { __asm__ volatile("lidt %0" ::"m"(idt_ptr)); }

static void build_idt(void)
{
    for (int i = 0; i < 32; i++) {
        u64 a = kk_isr_table[i];
        idt[i].offset0 = (u16)a;
        idt[i].selector = KK_SEL_KERNEL_CODE;
        idt[i].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
        idt[i].offset1 = (u16)(a >> 16);
        idt[i].offset2 = (u32)(a >> 32);
    }
    idt_ptr.limit = sizeof(idt) - 1;
    idt_ptr.base = (u64)idt;
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

void kk_start(u32 magic, u32 mbi)
{
    /* Copy the command line first: it lives wherever the loader put it (QEMU: after the
     * image; smp later overwrites low memory with its trampoline). */
    if (magic == MB_BOOT_MAGIC && (*(volatile u32 *)(u64)mbi & MB_INFO_CMDLINE)) {
        const char *src = (const char *)(u64) * (volatile u32 *)(u64)(mbi + 16);
        u64 i = 0;
        for (; src[i] && i < sizeof(cmdline) - 1; i++)
            cmdline[i] = src[i];
        cmdline[i] = 0;
    }
    const char *console = kk_arg("console");
    console_puts = console && arg_is(console, "puts");
    build_idt();
    kk_load_idt();
    if (magic != MB_BOOT_MAGIC)
        kk_printf("warning: not started by a multiboot loader (eax=0x%x); no command line\n",
                  magic);

    const char *f = kk_arg("fault");
    if (f && !(arg_is(f, "ud") || arg_is(f, "pf") || arg_is(f, "gp") || arg_is(f, "triple") ||
               arg_is(f, "user-ud") || arg_is(f, "user-pf") || arg_is(f, "user-gp")))
        kk_fail(2, "bad value for fault=: expected ud, pf, gp, triple, user-ud, user-pf or "
                   "user-gp\n");
    if (f && arg_is(f, "triple")) {
        idt_ptr.limit = 0; /* every vector is now out of bounds: #UD -> #GP -> #DF -> shutdown */
        kk_load_idt();
        __asm__ volatile("ud2");
    }
    if (f && !is_user_fault(f))
        raise_fault(f);

    kk_mark("main");
    kk_exit((u32)main());
}
