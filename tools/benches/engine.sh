#!/usr/bin/env bash
# Benchmark: the qcow2 engine (through `qimg bench`) vs QEMU's block layer (`qemu-img bench`),
# alternating on the same images. 4 KiB requests at a 64 KiB stride (every request hits a
# different cluster, so writes to an empty image allocate), QD1 and QD32, reads and writes,
# on a preallocated (metadata) image and on an empty one (recreated before every run).
# Both go through the host page cache (qemu-img -t writeback -i io_uring) and keep the
# requests in flight from one thread with io_uring, so this compares the two block layers'
# CPU paths on the same data, not the disk. Prints median times and ratio qimg/qemu-img
# (< 1: faster).
#
# Usage: tools/benches/engine.sh [RUNS (default 3)] [REQUESTS (default 20000)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
runs=${1:-3}; count=${2:-20000}
cargo build --release --quiet -p tools
QIMG=$PWD/target/release/qimg
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'rm -rf "$work"' EXIT
img=$work/img.qcow2
size=$(( count * 65536 / (1 << 20) + 64 ))M

make_image() { # prealloc|empty
  rm -f "$img"
  if [ "$1" = prealloc ]; then
    qemu-img create -q -f qcow2 -o preallocation=metadata "$img" "$size"
    # Real data in every cluster, so reads hit the disk rather than holes.
    qemu-img bench -q -c "$count" -d 32 -s 65536 -w -f qcow2 "$img" >/dev/null
  else
    qemu-img create -q -f qcow2 "$img" "$size"
  fi
}

one() { # TOOL MODE DEPTH IMAGE -> seconds
  local tool=$1 mode=$2 depth=$3 kind=$4 extra=()
  [ "$mode" = write ] && extra+=(-w)
  [ "$tool" = qemu-img ] && extra+=(-i io_uring -t writeback)
  if [ "$kind" = empty ] || [ "$mode" = write ]; then make_image "$kind"; fi
  local bin=$QIMG; [ "$tool" = qemu-img ] && bin=qemu-img
  "$bin" bench -c "$count" -d "$depth" -s 4096 -S 65536 -f qcow2 "${extra[@]}" "$img" \
    | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

printf '%-8s %-6s %-9s %10s %10s %7s\n' mode depth image "qimg s" "qemu-img s" ratio
for kind in prealloc empty; do
  [ "$kind" = prealloc ] && make_image prealloc
  for mode in read write; do
    for depth in 1 32; do
      ours=(); theirs=()
      for _ in $(seq "$runs"); do
        ours+=("$(one qimg $mode $depth $kind)")
        theirs+=("$(one qemu-img $mode $depth $kind)")
        [ "$kind" = prealloc ] && [ "$mode" = write ] && make_image prealloc
      done
      a=$(printf '%s\n' "${ours[@]}" | median); b=$(printf '%s\n' "${theirs[@]}" | median)
      printf '%-8s %-6s %-9s %10.3f %10.3f %7.2f\n' $mode $depth $kind "$a" "$b" "$(echo "$a / $b" | bc -l)"
    done
  done
done
