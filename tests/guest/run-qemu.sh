#!/usr/bin/env bash
# Boot the Cowbird test guest under QEMU + KVM: the reference to compare the
# Cowbird VMM against, and the boot-time baseline.
#
# usage: tests/guest/run-qemu.sh [KERNEL-ARGS...]
#   e.g. tests/guest/run-qemu.sh cowbird.test=cpus,blk,fs
#        DISK=/tmp/d.raw tests/guest/run-qemu.sh cowbird.test=blk
#        NET=user tests/guest/run-qemu.sh cowbird.test=net cowbird.ip=10.0.2.15/24 cowbird.peer=10.0.2.2
#        tests/guest/run-qemu.sh cowbird.test=shell         (interactive; ^A x quits QEMU)
#
# env:
#   GUEST_DIR  artefact dir (default: whatever tests/guest/build.sh prints; builds if needed)
#   KERNEL     vmlinux (default: ELF, PVH entry, no decompressor: fastest) | bzImage
#   SMP=2  MEM=128 (MiB)
#   DISK       raw image for /dev/vda (virtio-blk-pci); none if unset
#   DISK2      raw image for /dev/vdb
#   NET        "user" = virtio-net-pci on QEMU's slirp (guest 10.0.2.15/24, peer 10.0.2.2)
#   TIMEOUT    seconds before QEMU is killed (default: none)
#   QEMU_ARGS  extra QEMU arguments (word-split)
#
# The guest ends with "reboot -f" and this kernel has no ACPI: reboot=k makes it
# reset through the i8042, and -no-reboot turns that reset into a QEMU exit.
# panic=-1 makes a guest panic take the same way out.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST_DIR=${GUEST_DIR:-$("$HERE/build.sh" | tail -n 1)}
KERNEL=${KERNEL:-vmlinux}
[[ $KERNEL == */* ]] || KERNEL=$GUEST_DIR/$KERNEL

# CPU model: on the kvm-pvm host only some CPUID bits are VMM-controlled (the
# guest patch clears the passed-through ones itself). qemu64 already lacks most
# of what the host's CPL0 emulator cannot run; -cx16 and +xsaveerptr are
# VMM-controlled (cx16 = cmpxchg16b is fatal there; xsaveerptr avoids the AMD
# FXSAVE-leak workaround's x87 instructions). QEMU warns it cannot provide
# "pni": harmless.
CPU=${CPU:-qemu64,-cx16,+xsaveerptr}

args=(
	-enable-kvm -machine pc -cpu "$CPU"
	-m "${MEM:-128}" -smp "${SMP:-2}"
	# qboot: a tiny firmware, much faster than SeaBIOS under this slow KVM.
	-bios /usr/share/qemu/qboot.rom
	-nodefaults -nographic -serial mon:stdio -no-reboot
	-kernel "$KERNEL" -initrd "$GUEST_DIR/initrd.cpio"
	-append "console=ttyS0 reboot=k panic=-1 $*"
)
if [[ -n ${DISK:-} ]]; then
	args+=(-drive "file=$DISK,if=none,id=d0,format=raw,cache=none,aio=threads" -device virtio-blk-pci,drive=d0)
fi
if [[ -n ${DISK2:-} ]]; then
	args+=(-drive "file=$DISK2,if=none,id=d1,format=raw,cache=none,aio=threads" -device virtio-blk-pci,drive=d1)
fi
if [[ ${NET:-} == user ]]; then
	# romfile=: no iPXE option ROM (qboot would not use it; saves loading it).
	args+=(-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=)
fi
# shellcheck disable=SC2206  # QEMU_ARGS is meant to be word-split
args+=(${QEMU_ARGS:-})

if [[ -n ${TIMEOUT:-} ]]; then
	exec timeout --foreground "$TIMEOUT" qemu-system-x86_64 "${args[@]}"
fi
exec qemu-system-x86_64 "${args[@]}"
