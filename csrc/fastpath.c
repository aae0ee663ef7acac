/*
 * The runner's C fast path: KVM_RUN in a loop, in C, with the GIL released (cffi releases
 * it around every call).  It answers the exits that need no Python — debug console bytes,
 * the exit port, the exit and boot-timer-mark hypercalls, each only when Python set its
 * port because the bus gives that port to the standard device; MMIO writes to addresses no
 * bus device claims (Python passes the claimed ranges; the write is dropped and counted per
 * address, as the Python loop does, in a few slots); HLT when Python asked for the bare
 * machine's "resume after HLT" (benchmarks) — and counts every exit exactly
 * as the Python loop does (kinds, ports, KVM_RUN calls, time in KVM_RUN), then returns to
 * Python only for the exits it does not handle, when the guest asked to exit, when it was
 * interrupted, or when its console or mark buffer needs draining.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define KVMKIT_FP_UNHANDLED 1
#define KVMKIT_FP_GUEST_EXIT 2
#define KVMKIT_FP_INTERRUPTED 3
#define KVMKIT_FP_FLUSH 4

/* Exit kinds: the statistics' vocabulary, shared with kvmkit/runner/stats.py. */
#define KVMKIT_KIND_IO_OUT 0
#define KVMKIT_KIND_IO_IN 1
#define KVMKIT_KIND_MMIO_READ 2
#define KVMKIT_KIND_MMIO_WRITE 3
#define KVMKIT_KIND_HLT 4
#define KVMKIT_KIND_SHUTDOWN 5
#define KVMKIT_KIND_DEBUG 6
#define KVMKIT_KIND_FAIL_ENTRY 7
#define KVMKIT_KIND_INTERNAL_ERROR 8
#define KVMKIT_KIND_SYSTEM_EVENT 9
#define KVMKIT_KIND_INTERRUPTED 10
#define KVMKIT_KIND_IRQ_WINDOW_OPEN 11
#define KVMKIT_KIND_UNKNOWN 12
#define KVMKIT_NR_KINDS 13

#define KVMKIT_MAX_REGIONS 8
#define KVMKIT_MAX_MARKS 64
#define KVMKIT_MARK_LABEL 48
#define KVMKIT_CONSOLE_BUF 4096
#define KVMKIT_MAX_CLAIMED 32
#define KVMKIT_SINK_SLOTS 16

struct kvmkit_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *hva;
};

struct kvmkit_mark {
    uint64_t ns;
    uint32_t len;
    char label[KVMKIT_MARK_LABEL];
};

struct kvmkit_range {
    uint64_t start;
    uint64_t end; /* exclusive */
};

struct kvmkit_count {
    uint64_t addr;
    uint64_t n;
};

struct kvmkit_fastpath {
    /* set by Python */
    int vcpu_fd;
    struct kvm_run *run;
    int console_port;           /* -1: not handled in C */
    int exit_port;
    int exit_hypercall_port;
    int mark_port;
    struct kvmkit_region regions[KVMKIT_MAX_REGIONS];
    uint32_t nregions;
    int hlt_resume;             /* 1: HLT exits resume the guest (no irqchip, benchmarks) */
    int mmio_sink;              /* 1: writes outside claimed[] are dropped and counted here */
    struct kvmkit_range claimed[KVMKIT_MAX_CLAIMED]; /* the bus's MMIO ranges */
    uint32_t nclaimed;
    /* filled by C, drained by Python */
    uint8_t console[KVMKIT_CONSOLE_BUF];
    uint32_t console_len;
    struct kvmkit_mark marks[KVMKIT_MAX_MARKS];
    uint32_t nmarks;
    uint64_t run_calls;
    uint64_t ns_in_run;
    uint64_t exits[KVMKIT_NR_KINDS];
    uint64_t *port_counts;      /* 65536 counters, or NULL */
    uint16_t *touched;          /* ports whose counter went from 0 to 1 (65536 slots) */
    uint32_t ntouched;
    struct kvmkit_count sink[KVMKIT_SINK_SLOTS]; /* unclaimed MMIO writes, per address */
    uint32_t nsink;
    uint64_t exit_value;
    int err;
};

uint64_t kvmkit_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int kvmkit_exit_kind(struct kvm_run *run, int rc, int err)
{
    if (rc < 0)
        return (err == EINTR || err == EAGAIN) ? KVMKIT_KIND_INTERRUPTED : KVMKIT_KIND_UNKNOWN;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return run->io.direction == KVM_EXIT_IO_OUT ? KVMKIT_KIND_IO_OUT : KVMKIT_KIND_IO_IN;
    case KVM_EXIT_MMIO:
        return run->mmio.is_write ? KVMKIT_KIND_MMIO_WRITE : KVMKIT_KIND_MMIO_READ;
    case KVM_EXIT_HLT: return KVMKIT_KIND_HLT;
    case KVM_EXIT_SHUTDOWN: return KVMKIT_KIND_SHUTDOWN;
    case KVM_EXIT_DEBUG: return KVMKIT_KIND_DEBUG;
    case KVM_EXIT_FAIL_ENTRY: return KVMKIT_KIND_FAIL_ENTRY;
    case KVM_EXIT_INTERNAL_ERROR: return KVMKIT_KIND_INTERNAL_ERROR;
    case KVM_EXIT_SYSTEM_EVENT: return KVMKIT_KIND_SYSTEM_EVENT;
    case KVM_EXIT_INTR: return KVMKIT_KIND_INTERRUPTED;
    case KVM_EXIT_IRQ_WINDOW_OPEN: return KVMKIT_KIND_IRQ_WINDOW_OPEN;
    default: return KVMKIT_KIND_UNKNOWN;
    }
}

/* Host pointer for [gpa, gpa+len) if one region holds all of it, else NULL. */
static uint8_t *kvmkit_gpa(struct kvmkit_fastpath *fp, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < fp->nregions; i++) {
        struct kvmkit_region *r = &fp->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

static uint64_t kvmkit_io_value(struct kvm_run *run)
{
    uint64_t v = 0;
    memcpy(&v, (uint8_t *)run + run->io.data_offset, run->io.size);
    return v;
}

/* The MARK hypercall: {u64 label_gpa; u64 label_len}.  Returns 0 when it could not be
   decoded here (Python then handles it and reports the fault). */
static int kvmkit_mark(struct kvmkit_fastpath *fp, uint64_t now)
{
    uint8_t *arg = kvmkit_gpa(fp, kvmkit_io_value(fp->run), 16);
    if (!arg)
        return 0;
    uint64_t label_gpa, label_len;
    memcpy(&label_gpa, arg, 8);
    memcpy(&label_len, arg + 8, 8);
    if (label_len > KVMKIT_MARK_LABEL)
        label_len = KVMKIT_MARK_LABEL;
    uint8_t *label = kvmkit_gpa(fp, label_gpa, label_len);
    if (!label)
        return 0;
    struct kvmkit_mark *m = &fp->marks[fp->nmarks++];
    m->ns = now;
    m->len = (uint32_t)label_len;
    memcpy(m->label, label, label_len);
    return 1;
}

/* An MMIO write no bus device claims: count it in a slot (1) or leave it to Python (0)
   when the address is claimed, or new and every slot is taken. */
static int kvmkit_mmio_sink(struct kvmkit_fastpath *fp, uint64_t addr)
{
    for (uint32_t i = 0; i < fp->nclaimed; i++)
        if (addr >= fp->claimed[i].start && addr < fp->claimed[i].end)
            return 0;
    for (uint32_t i = 0; i < fp->nsink; i++)
        if (fp->sink[i].addr == addr) {
            fp->sink[i].n++;
            return 1;
        }
    if (fp->nsink == KVMKIT_SINK_SLOTS)
        return 0;
    fp->sink[fp->nsink].addr = addr;
    fp->sink[fp->nsink++].n = 1;
    return 1;
}

int kvmkit_fast_run(struct kvmkit_fastpath *fp)
{
    struct kvm_run *run = fp->run;
    for (;;) {
        uint64_t t0 = kvmkit_now_ns();
        int rc = ioctl(fp->vcpu_fd, KVM_RUN, 0);
        int err = rc < 0 ? errno : 0;
        uint64_t t1 = kvmkit_now_ns();
        fp->run_calls++;
        fp->ns_in_run += t1 - t0;
        int kind = kvmkit_exit_kind(run, rc, err);
        if (rc < 0) {
            if (kind == KVMKIT_KIND_INTERRUPTED) {
                fp->exits[kind]++;
                run->immediate_exit = 0;
                return KVMKIT_FP_INTERRUPTED;
            }
            fp->err = err;
            return -err;
        }
        fp->exits[kind]++;
        if (run->exit_reason != KVM_EXIT_IO) {
            if (kind == KVMKIT_KIND_MMIO_WRITE && fp->mmio_sink &&
                kvmkit_mmio_sink(fp, run->mmio.phys_addr))
                continue;
            if (kind == KVMKIT_KIND_HLT && fp->hlt_resume)
                continue;
            return KVMKIT_FP_UNHANDLED;
        }
        int port = run->io.port;
        if (fp->port_counts && fp->port_counts[port]++ == 0)
            fp->touched[fp->ntouched++] = (uint16_t)port;
        if (kind != KVMKIT_KIND_IO_OUT || run->io.count != 1)
            return KVMKIT_FP_UNHANDLED;
        if (port == fp->console_port) {
            fp->console[fp->console_len++] = *((uint8_t *)run + run->io.data_offset);
            if (fp->console_len == KVMKIT_CONSOLE_BUF || fp->console[fp->console_len - 1] == '\n')
                return KVMKIT_FP_FLUSH;
            continue;
        }
        if (port == fp->exit_port) {
            fp->exit_value = kvmkit_io_value(run);
            return KVMKIT_FP_GUEST_EXIT;
        }
        if (port == fp->exit_hypercall_port) {
            uint8_t *arg = kvmkit_gpa(fp, kvmkit_io_value(run), 8);
            if (!arg)
                return KVMKIT_FP_UNHANDLED;
            memcpy(&fp->exit_value, arg, 8);
            return KVMKIT_FP_GUEST_EXIT;
        }
        if (port == fp->mark_port) {
            if (!kvmkit_mark(fp, t1))
                return KVMKIT_FP_UNHANDLED;
            if (fp->nmarks == KVMKIT_MAX_MARKS)
                return KVMKIT_FP_FLUSH;
            continue;
        }
        return KVMKIT_FP_UNHANDLED;
    }
}
