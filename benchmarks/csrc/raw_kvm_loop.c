/*
 * Baseline for the exit-cost figures: the tightest user-space KVM_RUN loop there is.
 * kvmkit sets the VM up; this loop then runs the vCPU until the guest writes the exit
 * port, touching nothing but the kvm_run page.  When the guest writes the mark port it
 * records CLOCK_MONOTONIC (the clock kvmkit's marks use), so the time between two guest
 * marks covers only the exits between them: no set-up on either side.
 * Built by kvmkit/demos/exits.py (for the benchmarks and the demo alike).
 */
#include <stdint.h>
#include <time.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* Returns the number of exits, or -1 if KVM_RUN failed or the guest stopped otherwise.
 * mark_ns[0..max_marks) receives the time of each mark exit; *nmarks how many there were. */
long raw_kvm_loop(int vcpu_fd, struct kvm_run *run, int exit_port, int mark_port,
                  uint64_t *mark_ns, int max_marks, int *nmarks)
{
    long exits = 0;
    struct timespec ts;
    *nmarks = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0)
            return -1;
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.port == exit_port)
                return exits;
            if (run->io.port == mark_port && *nmarks < max_marks) {
                clock_gettime(CLOCK_MONOTONIC, &ts);
                mark_ns[(*nmarks)++] = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
            }
            break;
        case KVM_EXIT_MMIO:
        case KVM_EXIT_HLT:
            break;
        default:
            return -1;
        }
    }
}
