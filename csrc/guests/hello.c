/* hello: the smallest guest.  Prints one line and exits 0. */
#include "kvmkit_guest.h"

int main(void)
{
    kk_puts("Hello from kvmkit guest\n");
    return 0;
}
