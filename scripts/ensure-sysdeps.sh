#!/usr/bin/env bash
# Make sure the system packages kvmkit needs are present.
# As root, missing ones are installed with apt-get; otherwise the exact command is printed
# and the script fails, so `make test` / `make demo` never run on a half-equipped host.
set -euo pipefail

# command-or-file  ->  Debian package that provides it
declare -A need=(
    [gcc]=gcc
    [make]=make
    [qemu-system-x86_64]=qemu-system-x86
    [qemu-img]=qemu-utils
    [cpio]=cpio
    [/bin/busybox]=busybox-static
    [dpkg-deb]=dpkg
    [apt-get]=apt
    [iasl]=acpica-tools  # tests disassemble the runner's ACPI tables with it
    [lxc-create]=lxc
    [ip]=iproute2
    # kvmkit guest iso: the installer ISO and what its installer runs
    [xorriso]=xorriso
    [/usr/lib/ISOLINUX/isolinux.bin]=isolinux
    [/usr/lib/syslinux/modules/bios/ldlinux.c32]=syslinux-common
    [extlinux]=extlinux
    [/usr/sbin/sfdisk]=fdisk  # sbin: not on a user's PATH
    [/usr/sbin/mke2fs]=e2fsprogs
)
missing=()
for thing in "${!need[@]}"; do
    if [[ "$thing" == /* ]]; then
        [[ -e "$thing" ]] || missing+=("${need[$thing]}")
    else
        command -v "$thing" >/dev/null 2>&1 || missing+=("${need[$thing]}")
    fi
done
# Debian's python3 splits venv/ensurepip and the headers cffi compiles against.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
if ! python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    missing+=(python3-dev)
fi
[[ -f /usr/include/linux/kvm.h ]] || missing+=(linux-libc-dev)

if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
cmd="apt-get update && apt-get install -y ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
    echo "kvmkit: missing system packages: ${missing[*]}" >&2
    echo "kvmkit: run as root:  $cmd" >&2
    echo "kvmkit: (Fedora: dnf install gcc make qemu-system-x86 qemu-img cpio busybox python3-devel lxc iproute)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "kvmkit: missing ${missing[*]} and no apt-get here; install them with your distribution's tools" >&2
    exit 1
fi
echo "kvmkit: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}"
