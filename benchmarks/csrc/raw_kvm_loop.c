/*
 * Baseline for the exit-cost benchmark: the tightest user-space KVM_RUN loop there is.
 * kvmkit sets the VM up; this loop then runs the vCPU until the guest writes the exit
 * port, touching nothing but the kvm_run page.  Built by benchmarks/bench_exits.py.
 */
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* Returns the number of exits, or -1 if KVM_RUN failed or the guest stopped otherwise. */
long raw_kvm_loop(int vcpu_fd, struct kvm_run *run, int exit_port)
{
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -1;
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.port == exit_port)
                return exits;
            break;
        case KVM_EXIT_MMIO:
        case KVM_EXIT_HLT:
            break;
        default:
            return -1;
        }
    }
}
