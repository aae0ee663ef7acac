"""Teaching demos: the same guest under emulation and under hardware-assisted
virtualization, the anatomy of a VM exit, and a full QEMU guest hot-plugged and migrated."""
