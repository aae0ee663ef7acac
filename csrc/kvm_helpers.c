/* Small C helpers compiled into kvmkit._kvm next to the cdef'd declarations. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* Name the anonymous member types of kvm_run's exit union and kvm_vcpu_events so the
   cdef can declare them (their layout is still the compiler's). */
typedef __typeof__(((struct kvm_run *)0)->hw) kvmkit_run_hw;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) kvmkit_run_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->ex) kvmkit_run_ex;
typedef __typeof__(((struct kvm_run *)0)->io) kvmkit_run_io;
typedef __typeof__(((struct kvm_run *)0)->debug) kvmkit_run_debug;
typedef __typeof__(((struct kvm_run *)0)->mmio) kvmkit_run_mmio;
typedef __typeof__(((struct kvm_run *)0)->hypercall) kvmkit_run_hypercall;
typedef __typeof__(((struct kvm_run *)0)->internal) kvmkit_run_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) kvmkit_run_system_event;
typedef __typeof__(((struct kvm_irq_routing_entry *)0)->u) kvmkit_irq_routing_u;
typedef __typeof__(((struct kvm_vcpu_events *)0)->exception) kvmkit_events_exception;
typedef __typeof__(((struct kvm_vcpu_events *)0)->interrupt) kvmkit_events_interrupt;
typedef __typeof__(((struct kvm_vcpu_events *)0)->nmi) kvmkit_events_nmi;
typedef __typeof__(((struct kvm_vcpu_events *)0)->smi) kvmkit_events_smi;

/*
 * Kicking a vCPU out of KVM_RUN, as kvmtool and Firecracker do: the kicker sets
 * kvm_run->immediate_exit and sends this signal to the vCPU's thread.  The handler does
 * nothing; its only job is to exist without SA_RESTART so KVM_RUN returns EINTR.
 * immediate_exit covers the window where the signal lands before KVM_RUN is entered.
 */
static void kvmkit_kick_noop(int sig) { (void)sig; }

int kvmkit_kick_signal(void) { return SIGRTMIN + 2; }

int kvmkit_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kvmkit_kick_noop;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(kvmkit_kick_signal(), &sa, NULL);
}

/* KVM_RUN for the Python side: a plain (non-variadic) call is cheaper through cffi than
   ioctl(), and the error comes back as -errno, so no second call to read errno. */
int kvmkit_kvm_run(int vcpu_fd)
{
    int rc = ioctl(vcpu_fd, KVM_RUN, 0);
    return rc < 0 ? -errno : rc;
}
