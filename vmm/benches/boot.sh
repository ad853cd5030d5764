#!/usr/bin/env bash
# Boot time and memory overhead: Cowbird's `vmm` vs `qemu-system-x86_64` (KVM), same test
# guest kernel (PVH vmlinux), initramfs, vCPUs and memory, runs alternating.
#
# usage: vmm/benches/boot.sh [RUNS] [CPUS]      (defaults: 5 runs, 1 vCPU, 256 MiB)
#
# Per run it records
#   - wall time from process start to the guest's COWBIRD-USERSPACE line on the serial port,
#   - the guest's own uptime at that line (kernel boot as the guest sees it),
#   - the VMM's memory overhead while the guest idles: RssAnon + RssFile from
#     /proc/PID/status, i.e. resident memory that is not guest RAM. Both VMMs get guest RAM
#     from a shared memfd (QEMU: memory-backend-memfd), which the kernel counts as RssShmem,
#     so guest pages are left out the same way for both.
# and prints medians and the ratio vmm/QEMU (< 1 means Cowbird is faster / smaller).
# QEMU uses its `pc` machine with qboot (-kernel loads the vmlinux through PVH, like vmm).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
RUNS=${1:-5}; CPUS=${2:-1}; MEM=256
GUEST=$(tests/guest/build.sh | tail -n 1)
cargo build --release --quiet -p vmm
VMM=target/release/vmm
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
CMDLINE="console=ttyS0 reboot=k panic=-1 quiet cowbird.test=pause cowbird.pause=4"

# run_one NAME -> prints "wall_s uptime_s overhead_kib"
run_one() {
  local serial=$work/$1.serial; rm -f "$serial"; : > "$serial"
  local start; start=$(date +%s.%N)
  if [ "$1" = vmm ]; then
    $VMM --kernel "$GUEST/vmlinux" --initramfs "$GUEST/initrd.cpio" --cpus "$CPUS" \
      --memory ${MEM}M --cmdline "$CMDLINE" --serial "file=$serial" </dev/null 2>/dev/null &
  else
    qemu-system-x86_64 -enable-kvm -machine pc -cpu qemu64,-cx16,+xsaveerptr -smp "$CPUS" \
      -object memory-backend-memfd,id=mem,size=${MEM}M,share=on -machine memory-backend=mem \
      -m ${MEM} -nodefaults -nographic -no-reboot -bios /usr/share/qemu/qboot.rom \
      -kernel "$GUEST/vmlinux" -initrd "$GUEST/initrd.cpio" -append "$CMDLINE" \
      -serial "file:$serial" </dev/null >/dev/null 2>&1 &
  fi
  local pid=$!
  until grep -q COWBIRD-USERSPACE "$serial" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || { echo "$1 exited before userspace" >&2; return 1; }
    sleep 0.02
  done
  local wall; wall=$(echo "$(date +%s.%N) - $start" | bc)
  sleep 1   # the guest idles in its pause step
  local overhead; overhead=$(awk '/^RssAnon|^RssFile/ {s += $2} END {print s}' /proc/$pid/status)
  wait $pid || true
  local up; up=$(sed -n 's/.*COWBIRD-USERSPACE uptime=\([0-9.]*\).*/\1/p' "$serial")
  echo "$wall $up $overhead"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

for i in $(seq "$RUNS"); do
  for who in vmm qemu; do
    r=$(run_one $who); echo "$who $r" >> "$work/results"
    echo "run $i $who: wall ${r%% *} s, guest uptime $(echo $r | cut -d' ' -f2) s, overhead $(echo $r | cut -d' ' -f3) KiB" >&2
  done
done

printf '\n%-28s %12s %12s %8s\n' "median of $RUNS runs ($CPUS vCPU, ${MEM} MiB)" vmm qemu ratio
for col in 2:"wall to userspace (s)" 3:"guest uptime at userspace (s)" 4:"VMM memory overhead (KiB)"; do
  n=${col%%:*}; label=${col#*:}
  a=$(awk -v c=$n '$1=="vmm" {print $c}' "$work/results" | median)
  b=$(awk -v c=$n '$1=="qemu" {print $c}' "$work/results" | median)
  printf '%-28s %12s %12s %8.2f\n' "$label" "$a" "$b" "$(echo "$a / $b" | bc -l)"
done
