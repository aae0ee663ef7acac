/* cdef of the C fast path (fastpath.c): KVM_RUN in a C loop with the GIL released. */

#define KVMKIT_FP_UNHANDLED ...
#define KVMKIT_FP_GUEST_EXIT ...
#define KVMKIT_FP_INTERRUPTED ...
#define KVMKIT_FP_FLUSH ...

#define KVMKIT_KIND_IO_OUT ...
#define KVMKIT_KIND_IO_IN ...
#define KVMKIT_KIND_MMIO_READ ...
#define KVMKIT_KIND_MMIO_WRITE ...
#define KVMKIT_KIND_HLT ...
#define KVMKIT_KIND_SHUTDOWN ...
#define KVMKIT_KIND_DEBUG ...
#define KVMKIT_KIND_FAIL_ENTRY ...
#define KVMKIT_KIND_INTERNAL_ERROR ...
#define KVMKIT_KIND_SYSTEM_EVENT ...
#define KVMKIT_KIND_INTERRUPTED ...
#define KVMKIT_KIND_IRQ_WINDOW_OPEN ...
#define KVMKIT_KIND_UNKNOWN ...
#define KVMKIT_NR_KINDS ...
#define KVMKIT_MAX_REGIONS ...
#define KVMKIT_MAX_MARKS ...
#define KVMKIT_MARK_LABEL ...
#define KVMKIT_CONSOLE_BUF ...
#define KVMKIT_MAX_CLAIMED ...
#define KVMKIT_SINK_SLOTS ...

struct kvmkit_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *hva;
};

struct kvmkit_mark {
    uint64_t ns;
    uint32_t len;
    char label[];
    ...;
};

struct kvmkit_range {
    uint64_t start;
    uint64_t end;
};

struct kvmkit_count {
    uint64_t addr;
    uint64_t n;
};

struct kvmkit_fastpath {
    int vcpu_fd;
    struct kvm_run *run;
    int console_port;
    int exit_port;
    int exit_hypercall_port;
    int mark_port;
    struct kvmkit_region regions[];
    uint32_t nregions;
    int hlt_resume;
    int mmio_sink;
    struct kvmkit_range claimed[];
    uint32_t nclaimed;
    uint8_t console[];
    uint32_t console_len;
    struct kvmkit_mark marks[];
    uint32_t nmarks;
    uint64_t run_calls;
    uint64_t ns_in_run;
    uint64_t exits[];
    uint64_t *port_counts;
    uint16_t *touched;
    uint32_t ntouched;
    struct kvmkit_count sink[];
    uint32_t nsink;
    uint64_t exit_value;
    int err;
    ...;
};

int kvmkit_fast_run(struct kvmkit_fastpath *fp);
int kvmkit_exit_kind(struct kvm_run *run, int rc, int err);
uint64_t kvmkit_now_ns(void);
