#!/usr/bin/env bash
# Cowbird's main job: a VM booted by `vmm` on a qcow2 disk served by `vhost-blk`.
#
# Builds the release binaries and the test guest (kernel + busybox initramfs, cached under
# ~/.cache/cowbird/guest), creates a qcow2 disk with `qimg` on top of a raw backing file,
# and boots the guest with 2 vCPUs in one command: `vmm` itself starts `vhost-blk` for the
# disk (2 queues) and `vhost-net` for a NIC on a TAP (in a private network namespace, so the
# demo touches nothing on the host). The guest's console shows it writing and reading back
# data on /dev/vda and a filesystem on it, and pinging the host over the NIC; then it powers
# off, `vmm` stops its backends, and `qimg info` / `qimg check` (and qemu-img check, as a
# second opinion) inspect the disk while the host verifies the bytes the guest wrote.
#
# env: KEEP=1 keeps the work directory; CPUS, MEMORY override the VM size.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mDEMO FAILED: %s\033[0m\n' "$*" >&2; exit 1; }

[ -r /dev/kvm ] && [ -w /dev/kvm ] || fail "/dev/kvm is not usable (KVM missing or no permission)"
[ "$(id -u)" = 0 ] || fail "run as root (network namespace, TAP device, system packages)"
say "system packages (installed on first use; a check afterwards)"
scripts/install-deps.sh >/dev/null || fail "scripts/install-deps.sh failed"

say "building release binaries (vmm, vhost-blk, vhost-net, qimg)"
cargo build --release --quiet -p vmm -p vhost-blk -p vhost-net -p tools
BIN=target/release

say "building the test guest (first time: ~5-15 min; cached afterwards)"
GUEST=$(tests/guest/build.sh | tail -n 1)
echo "guest artefacts: $GUEST"

work=$(mktemp -d /tmp/cowbird-demo.XXXXXX)
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

say "qimg create: a 256 MiB qcow2 disk over a raw backing file"
head -c $((1 << 20)) /dev/urandom > "$work/base.raw"
truncate -s 256M "$work/base.raw"
$BIN/qimg create -f qcow2 -b base.raw -F raw "$work/disk.qcow2" 256M

netns=cowbird-demo-$$
ip netns add "$netns" || fail "cannot create a network namespace (needs root and iproute2)"
trap 'ip netns del "$netns" 2>/dev/null; cleanup' EXIT

say "booting: vmm starts vhost-blk (disk.qcow2) and vhost-net (TAP cbdemo0); the guest's console follows"
start=$(date +%s.%N)
set +e
ip netns exec "$netns" $BIN/vmm --kernel "$GUEST/vmlinux" --initramfs "$GUEST/initrd.cpio" \
  --cpus "${CPUS:-2}" --memory "${MEMORY:-256M}" \
  --disk "path=$work/disk.qcow2,format=qcow2,num_queues=2" \
  --net "tap=cbdemo0,ip=10.79.0.1/24" \
  --cmdline "console=ttyS0 reboot=k panic=-1 quiet cowbird.test=cpus,blk,fs,net cowbird.ip=10.79.0.2/24 cowbird.peer=10.79.0.1" \
  --serial stdio < /dev/null 2> >(tee "$work/vmm.log" >&2) | tee "$work/console.log"
status=${PIPESTATUS[0]}
set -e
secs=$(echo "$(date +%s.%N) - $start" | bc)
printf '\nvmm exited with status %s after %.1f s\n' "$status" "$secs"
[ "$status" = 0 ] || fail "vmm exited with status $status"
for marker in COWBIRD-CPUS-OK COWBIRD-BLK-OK COWBIRD-FS-OK COWBIRD-NET-OK COWBIRD-DONE; do
  grep -q "$marker" "$work/console.log" || fail "the guest did not print $marker"
done
pgrep -f "$work/disk.qcow2" >/dev/null && fail "a backend is still running after vmm exited"

say "qimg info disk.qcow2"
$BIN/qimg info "$work/disk.qcow2"
say "qimg check disk.qcow2"
$BIN/qimg check "$work/disk.qcow2" || fail "qimg check found problems"
qemu-img check -q "$work/disk.qcow2" || fail "qemu-img check disagrees"

say "host-side check of the guest's write ([1 MiB, 2 MiB) = first MiB of the guest's busybox)"
qemu-img convert -O raw "$work/disk.qcow2" "$work/flat.raw"
cmp -n $((1 << 20)) -i $((1 << 20)):0 "$work/flat.raw" "$GUEST/busybox" \
  || fail "the data the guest wrote is not in the image"
echo "data verified"

say "SUCCESS: VM booted by vmm on a qcow2 disk served by vhost-blk (and a NIC by vhost-net); disk checked clean"
