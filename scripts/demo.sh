#!/usr/bin/env bash
# Cowbird's main job: a VM booted by `vmm` on a qcow2 disk served by `vhost-blk`.
#
# Builds the release binaries and the test guest (kernel + busybox initramfs, cached under
# ~/.cache/cowbird/guest), creates a qcow2 disk with `qimg` on top of a raw backing file,
# serves it with `vhost-blk` (2 queues), boots the guest with 2 vCPUs, and shows its console
# while it writes and reads back data on /dev/vda and a filesystem on it, then powers off.
# Afterwards `qimg info` and `qimg check` (and qemu-img check, as a second opinion) inspect
# the disk, and the host verifies the bytes the guest wrote.
#
# env: KEEP=1 keeps the work directory; CPUS, MEMORY override the VM size.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mDEMO FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

[ -r /dev/kvm ] && [ -w /dev/kvm ] || fail "/dev/kvm is not usable (KVM missing or no permission)"
command -v qemu-img >/dev/null || fail "qemu-img is missing: run scripts/install-deps.sh"

say "building release binaries (vmm, vhost-blk, qimg)"
cargo build --release --quiet -p vmm -p vhost-blk -p tools
BIN=target/release

say "building the test guest (first time: ~5-15 min; cached afterwards)"
GUEST=$(tests/guest/build.sh | tail -n 1)
echo "guest artefacts: $GUEST"

work=$(mktemp -d /tmp/cowbird-demo.XXXXXX)
backend=
cleanup() {
  [ -n "$backend" ] && kill "$backend" 2>/dev/null && wait "$backend" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "qimg create: a 256 MiB qcow2 disk over a raw backing file"
head -c $((1 << 20)) /dev/urandom > "$work/base.raw"
truncate -s 256M "$work/base.raw"
$BIN/qimg create -f qcow2 -b base.raw -F raw "$work/disk.qcow2" 256M

say "vhost-blk serving disk.qcow2 on $work/blk.sock"
$BIN/vhost-blk --socket "$work/blk.sock" --image "$work/disk.qcow2" --format qcow2 \
  --num-queues 2 2> "$work/vhost-blk.log" &
backend=$!
for _ in $(seq 100); do [ -S "$work/blk.sock" ] && break; sleep 0.05; done
[ -S "$work/blk.sock" ] || fail "vhost-blk did not start: $(cat "$work/vhost-blk.log")"

say "booting the VM (2 vCPUs; the guest's console follows)"
start=$(date +%s.%N)
set +e
$BIN/vmm --kernel "$GUEST/vmlinux" --initramfs "$GUEST/initrd.cpio" \
  --cpus "${CPUS:-2}" --memory "${MEMORY:-256M}" \
  --disk "socket=$work/blk.sock,num_queues=2" \
  --cmdline "console=ttyS0 reboot=k panic=-1 quiet cowbird.test=cpus,blk,fs" \
  --serial stdio < /dev/null | tee "$work/console.log"
status=${PIPESTATUS[0]}
set -e
secs=$(echo "$(date +%s.%N) - $start" | bc)
printf '\nvmm exited with status %s after %.1f s\n' "$status" "$secs"
[ "$status" = 0 ] || fail "vmm exited with status $status"
for marker in COWBIRD-CPUS-OK COWBIRD-BLK-OK COWBIRD-FS-OK COWBIRD-DONE; do
  grep -q "$marker" "$work/console.log" || fail "the guest did not print $marker"
done

say "stopping vhost-blk (it flushes and marks the image clean)"
kill -TERM "$backend"; wait "$backend" || fail "vhost-blk exited with an error: $(tail -3 "$work/vhost-blk.log")"
backend=

say "qimg info disk.qcow2"
$BIN/qimg info "$work/disk.qcow2"
say "qimg check disk.qcow2"
$BIN/qimg check "$work/disk.qcow2" || fail "qimg check found problems"
qemu-img check -q "$work/disk.qcow2" || fail "qemu-img check disagrees"

say "host-side check of the guest's write ([1 MiB, 2 MiB) = first MiB of the guest's busybox)"
qemu-img convert -O raw "$work/disk.qcow2" "$work/flat.raw"
cmp -n $((1 << 20)) -i $((1 << 20)):0 "$work/flat.raw" "$GUEST/busybox" \
  || fail "the data the guest wrote is not in the image"
cmp -n $((1 << 20)) "$work/flat.raw" "$work/base.raw" >/dev/null && true
echo "data verified"

say "SUCCESS: VM booted by vmm on a qcow2 disk served by vhost-blk; disk checked clean"
