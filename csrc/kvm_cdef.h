/*
 * cffi cdef for kvmkit._kvm: the <linux/kvm.h> structures, ioctl numbers and the few libc
 * calls kvmkit needs.  Structures are declared partially ("...;") so the C compiler fills
 * in sizes and offsets; nothing here is laid out by hand.
 *
 * The members of kvm_run's exit union are anonymous struct types in the kernel header;
 * the C prelude names them with __typeof__ so they can be declared here.
 */

typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;

/* ---- registers and CPU state ---- */
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
    ...;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
    ...;
};

struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8 ftwx;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr;
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};

struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
    ...;
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    ...;
};

struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_lapic_state {
    char regs[1024];
    ...;
};

typedef struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; ...; } kvmkit_events_exception;
typedef struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; ...; } kvmkit_events_interrupt;
typedef struct { __u8 injected; __u8 pending; __u8 masked; ...; } kvmkit_events_nmi;
typedef struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; ...; } kvmkit_events_smi;

struct kvm_vcpu_events {
    kvmkit_events_exception exception;
    kvmkit_events_interrupt interrupt;
    kvmkit_events_nmi nmi;
    __u32 sipi_vector;
    __u32 flags;
    kvmkit_events_smi smi;
    ...;
};

struct kvm_mp_state {
    __u32 mp_state;
    ...;
};

struct kvm_debug_exit_arch {
    __u32 exception;
    __u64 pc;
    __u64 dr6;
    __u64 dr7;
    ...;
};

struct kvm_guest_debug_arch {
    __u64 debugreg[8];
    ...;
};

struct kvm_guest_debug {
    __u32 control;
    struct kvm_guest_debug_arch arch;
    ...;
};

/* ---- complete vCPU and VM state (snapshot/migration) ---- */
struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 flags;
    __u64 pdptrs[4];
    ...;
};

struct kvm_xsave {
    __u32 region[1024];
    ...;
};

struct kvm_xcr {
    __u32 xcr;
    __u32 reserved;
    __u64 value;
    ...;
};

struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[16];
    ...;
};

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    ...;
};

struct kvm_irqchip {
    __u32 chip_id;
    ...;
};

struct kvm_pit_state2 {
    __u32 flags;
    ...;
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    ...;
};

struct kvm_clear_dirty_log {
    __u32 slot;
    __u32 num_pages;
    __u64 first_page;
    void *dirty_bitmap;
    ...;
};

struct kvm_dirty_gfn {
    __u32 flags;
    __u32 slot;
    __u64 offset;
    ...;
};

/* ---- the shared kvm_run page and its exit union ---- */
typedef struct { __u64 hardware_exit_reason; ...; } kvmkit_run_hw;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; } kvmkit_run_fail_entry;
typedef struct { __u32 exception; __u32 error_code; ...; } kvmkit_run_ex;
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; ...; } kvmkit_run_io;
typedef struct { struct kvm_debug_exit_arch arch; ...; } kvmkit_run_debug;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; ...; } kvmkit_run_mmio;
typedef struct { __u64 nr; __u64 args[6]; __u64 ret; __u32 longmode; ...; } kvmkit_run_hypercall;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; ...; } kvmkit_run_internal;
typedef struct { __u32 type; __u32 ndata; __u64 data[16]; ...; } kvmkit_run_system_event;

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    kvmkit_run_hw hw;
    kvmkit_run_fail_entry fail_entry;
    kvmkit_run_ex ex;
    kvmkit_run_io io;
    kvmkit_run_debug debug;
    kvmkit_run_mmio mmio;
    kvmkit_run_hypercall hypercall;
    kvmkit_run_internal internal;
    kvmkit_run_system_event system_event;
    ...;
};

/* ---- VM-level structures ---- */
struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    ...;
};

struct kvm_dirty_log {
    __u32 slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
    ...;
};

struct kvm_pit_config {
    __u32 flags;
    ...;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    ...;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    int fd;
    __u32 flags;
    ...;
};

struct kvm_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    __u32 flags;
    __u32 devid;
    ...;
};

struct kvm_irq_routing_irqchip {
    __u32 irqchip;
    __u32 pin;
    ...;
};

struct kvm_irq_routing_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    ...;
};

typedef struct {
    struct kvm_irq_routing_irqchip irqchip;
    struct kvm_irq_routing_msi msi;
    ...;
} kvmkit_irq_routing_u;

struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    kvmkit_irq_routing_u u;
    ...;
};

struct kvm_irq_routing {
    __u32 nr;
    __u32 flags;
    struct kvm_irq_routing_entry entries[];
    ...;
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    ...;
};

/* ---- constants ---- */
#define KVM_API_VERSION ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_EXIT_IO_IN ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_EXIT_IO_OUT ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_EXIT_DIRTY_RING_FULL ...

/* ioctl request numbers as the header computes them; kvmkit computes its own with
   ioctl-opt and the tests compare the two. */
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_VCPU ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_IRQ_LINE ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SIGNAL_MSI ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_CPUID2 ...
#define KVM_SET_GUEST_DEBUG ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_SREGS2 ...
#define KVM_SET_SREGS2 ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XSAVE2 ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_SET_TSC_KHZ ...
#define KVM_KVMCLOCK_CTRL ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_ENABLE_CAP ...
#define KVM_CLEAR_DIRTY_LOG ...
#define KVM_RESET_DIRTY_RINGS ...

/* ---- libc ---- */
int ioctl(int fd, unsigned long request, ...);

/* ---- kvmkit helpers (kvm_helpers.c) ---- */
int kvmkit_kick_signal(void);
int kvmkit_install_kick_handler(void);
int kvmkit_kvm_run(int vcpu_fd);
