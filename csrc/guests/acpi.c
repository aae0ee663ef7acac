/*
 * acpi: finds the RSDP in 0xe0000-0xfffff as a kernel does, walks the RSDT (and the XSDT
 * when the RSDP has one) and checks every table's checksum, then reads the FADT (SCI
 * interrupt, PM timer port, DSDT checksum) and the MADT (enabled local APICs, the IOAPIC,
 * the override for ISA IRQ 0), compares the LAPIC count with fw_cfg's CPU count, and reads
 * the PM timer until it has advanced.  Prints what it checked; exits 0 when all passed.
 */
#include "pc.h"

struct sdt {
    char sig[4];
    u32 length;
    u8 revision, checksum;
    char oem[6], oem_table[8];
    u32 oem_rev, creator, creator_rev;
} __attribute__((packed));

static int sum_ok(const void *p, u32 len)
{
    u8 s = 0;
    for (u32 i = 0; i < len; i++)
        s += ((const u8 *)p)[i];
    return s == 0;
}

static int sig_is(const char *p, const char *want)
{
    return p[0] == want[0] && p[1] == want[1] && p[2] == want[2] && p[3] == want[3];
}

static const u8 *find_rsdp(void)
{
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        const char *p = (const char *)a;
        if (sig_is(p, "RSD ") && sig_is(p + 4, "PTR ") && sum_ok(p, 20))
            return (const u8 *)p;
    }
    return 0;
}

static const struct sdt *check(u64 addr, int *ok)
{
    const struct sdt *t = (const struct sdt *)addr;
    if (!addr || addr >= (1UL << 30) || t->length < sizeof(*t) || !sum_ok(t, t->length))
        *ok = 0;
    return t;
}

int main(void)
{
    const u8 *rsdp = find_rsdp();
    if (!rsdp)
        kk_fail(1, "acpi: no rsdp in 0xe0000-0xfffff\n");
    int ok = 1;
    const struct sdt *fadt = 0, *madt = 0;
    const struct sdt *rsdt = check(*(const u32 *)(rsdp + 16), &ok);
    u32 n = ok ? (rsdt->length - sizeof(*rsdt)) / 4 : 0;
    for (u32 i = 0; i < n; i++) {
        const struct sdt *t = check(((const u32 *)(rsdt + 1))[i], &ok);
        if (ok && sig_is(t->sig, "FACP"))
            fadt = t;
        if (ok && sig_is(t->sig, "APIC"))
            madt = t;
    }
    if (rsdp[15] >= 2) { /* ACPI 2.0+: the extended checksum and the XSDT */
        ok &= sum_ok(rsdp, *(const u32 *)(rsdp + 20));
        const struct sdt *xsdt = check(*(const u64 *)(rsdp + 24), &ok);
        u32 nx = ok ? (xsdt->length - sizeof(*xsdt)) / 8 : 0;
        for (u32 i = 0; i < nx; i++)
            check(((const u64 *)(xsdt + 1))[i], &ok);
    }
    kk_printf("acpi: rsdp found, root table checksums valid: %s\n", ok ? "yes" : "no");
    if (!ok || !fadt || !madt)
        kk_fail(1, "acpi: fadt %s, madt %s\n", fadt ? "found" : "missing",
                madt ? "found" : "missing");

    const u8 *f = (const u8 *)fadt;
    u32 pm_port = *(const u32 *)(f + 76);
    int dsdt_ok = 1;
    check(*(const u32 *)(f + 40), &dsdt_ok);
    kk_printf("acpi: fadt: sci irq %u, pm timer at port 0x%x, dsdt checksum valid: %s\n",
              *(const u16 *)(f + 46), pm_port, dsdt_ok ? "yes" : "no");
    ok &= dsdt_ok;

    u32 lapics = 0, ioapics = 0, ioapic_addr = 0, irq0_gsi = 0;
    const u8 *e = (const u8 *)madt + sizeof(struct sdt) + 8, *end = (const u8 *)madt + madt->length;
    for (; e + 2 <= end && e[1] >= 2; e += e[1]) {
        if (e[0] == 0 && (*(const u32 *)(e + 4) & 1))
            lapics++;
        if (e[0] == 1) {
            ioapics++;
            ioapic_addr = *(const u32 *)(e + 4);
        }
        if (e[0] == 2 && e[3] == 0)
            irq0_gsi = *(const u32 *)(e + 4);
    }
    u16 cpus = 0;
    kk_fw_cfg_read(KK_FW_CFG_NB_CPUS, &cpus, sizeof(cpus));
    kk_printf("acpi: madt: %u local apics (%s fw_cfg's cpu count), %u ioapic at 0x%x, "
              "isa irq 0 -> gsi %u\n",
              lapics, lapics == cpus ? "matches" : "differs from", ioapics, ioapic_addr, irq0_gsi);
    ok &= lapics == cpus && ioapics == 1;

    u32 t0 = kk_inl((u16)pm_port) & 0xffffff, t1 = t0, reads = 0;
    while (t1 == t0 && reads < 1000000) {
        t1 = kk_inl((u16)pm_port) & 0xffffff;
        reads++;
    }
    u32 delta = (t1 - t0) & 0xffffff;
    int advances = t1 != t0 && delta < 0x800000;
    kk_printf("acpi: pm timer advances: %s\n", advances ? "yes" : "no");
    ok &= advances;
    return ok ? 0 : 1;
}
