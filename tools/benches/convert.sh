#!/usr/bin/env bash
# Benchmark: `qimg convert` vs `qemu-img convert`, alternating on the same inputs.
# Prints the median wall time and the median user+sys CPU time of each, and the ratios
# qimg/qemu-img (lower is better). Both tools write through the page cache without a final
# flush (qemu-img convert's default `-t unsafe`, which qimg follows).
#
# Cases: a SIZE_GIB disk with every other MiB allocated (raw <-> qcow2, then compressed), and a
# mostly-empty 100 GiB disk (raw <-> qcow2).
#
# Usage: tools/benches/convert.sh [SIZE_GIB (default 2)] [RUNS (default 3)] [CASE_FILTER]
# CASE_FILTER (a grep -E pattern on the case name) runs only matching cases. The qimg binary
# is built into $CARGO_TARGET_DIR (default target/). With QIMG_BASE=/path/to/an/older/qimg,
# that binary runs too, alternating with the other two, and gets its own rows ("(base)"), for
# before/after comparisons on a noisy machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
size_gib=${1:-2}
runs=${2:-3}
filter=${3:-.}
cargo build --release --quiet -p tools
QIMG=${CARGO_TARGET_DIR:-$PWD/target}/release/qimg
work=$(mktemp -d -p "${TMPDIR:-/var/tmp}")
trap 'rm -rf "$work"' EXIT

# A half-allocated disk: every other MiB holds compressible-but-not-trivial data.
python3 - "$work/src.raw" "$size_gib" <<'PY'
import os, random, sys
path, gib = sys.argv[1], int(sys.argv[2])
random.seed(1)
words = [bytes(random.choice(b"abcdefghijklmnop") for _ in range(random.randint(3, 9))) for _ in range(4096)]
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for mib in range(0, gib << 10, 2):
        f.seek(mib << 20)
        buf = bytearray()
        while len(buf) < 1 << 20:
            buf += random.choice(words) + b" "
        f.write(bytes(buf[: 1 << 20]))
PY
qemu-img convert -O qcow2 "$work/src.raw" "$work/src.qcow2"
# A mostly-empty 100 GiB disk: 1 MiB of the same kind of data at the start of every GiB
# (100 MiB in all), the rest a hole.
python3 - "$work/sparse.raw" "$work/src.raw" <<'PY'
import sys
path, src = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    data = f.read(1 << 20)
with open(path, "wb") as f:
    f.truncate(100 << 30)
    for gib in range(100):
        f.seek(gib << 30)
        f.write(data)
PY
qemu-img convert -O qcow2 "$work/sparse.raw" "$work/sparse.qcow2"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Wall time, then user+sys CPU time, of one run.
timeit() {
  local s e
  s=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$work/cpu" "$@" >/dev/null
  e=$(date +%s.%N)
  echo "$(echo "$e - $s" | bc) $(awk '{print $1 + $2}' "$work/cpu")"
}

# Prints the medians of the runs in the array named $2 against qemu-img's (`theirs`).
row() {
  local -n runs_=$2
  local o t oc tc
  o=$(printf '%s\n' "${runs_[@]}" | cut -d' ' -f1 | median)
  t=$(printf '%s\n' "${theirs[@]}" | cut -d' ' -f1 | median)
  oc=$(printf '%s\n' "${runs_[@]}" | cut -d' ' -f2 | median)
  tc=$(printf '%s\n' "${theirs[@]}" | cut -d' ' -f2 | median)
  printf '%-28s %10.2f %10.2f %8.2f %10.2f %10.2f %8.2f\n' "$1" "$o" "$t" "$(echo "$o / $t" | bc -l)" \
    "$oc" "$tc" "$(echo "$oc / $tc" | bc -l)"
}

printf '%-28s %10s %10s %8s %10s %10s %8s\n' case qimg_s qemu_s ratio qimg_cpu qemu_cpu ratio
for case in "raw->qcow2|-O qcow2|src.raw" "qcow2->raw|-O raw|src.qcow2" \
            "sparse 100G raw->qcow2|-O qcow2|sparse.raw" "sparse 100G qcow2->raw|-O raw|sparse.qcow2" \
            "raw->qcow2 -c zlib|-O qcow2 -c|src.raw" \
            "raw->qcow2 -c zstd|-O qcow2 -c -o compression_type=zstd|src.raw"; do
  IFS='|' read -r name args src <<<"$case"
  grep -qE -- "$filter" <<<"$name" || continue
  ours=(); theirs=(); base=()
  for _ in $(seq "$runs"); do
    rm -f "$work/out"; sync
    # shellcheck disable=SC2086
    ours+=("$(timeit "$QIMG" convert $args "$work/$src" "$work/out")")
    rm -f "$work/out"; sync
    # shellcheck disable=SC2086
    theirs+=("$(timeit qemu-img convert $args "$work/$src" "$work/out")")
    if [ -n "${QIMG_BASE:-}" ]; then
      rm -f "$work/out"; sync
      # shellcheck disable=SC2086
      base+=("$(timeit "$QIMG_BASE" convert $args "$work/$src" "$work/out")")
    fi
  done
  row "$name" ours
  [ -z "${QIMG_BASE:-}" ] || row "$name (base)" base
done
