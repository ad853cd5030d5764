#!/usr/bin/env bash
# Benchmark: `qimg convert`, `compare` and `map` vs qemu-img's, alternating on the same inputs.
# Prints the median wall time and the median user+sys CPU time of each, and the ratios
# qimg/qemu-img (lower is better). Both tools write through the page cache without a final
# flush (qemu-img convert's default `-t unsafe`, which qimg follows).
#
# Cases: a SIZE_GIB disk with every other MiB allocated (raw <-> qcow2 with the source in the
# page cache, and again read from the disk ("cold": caches dropped before each run, which
# needs root), then compressed), and a
# mostly-empty 100 GiB disk (raw <-> qcow2); then the qcow2 and raw forms of each compared
# (case names "compare ..."), and the 100 GiB disk with extended L2 entries (subclusters)
# mapped and compared.
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
qemu-img convert -O qcow2 -o extended_l2=on "$work/sparse.raw" "$work/sparse-xl2.qcow2"

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
# Each case: its name and the subcommand's arguments, where @NAME is the file NAME in $work.
for case in "raw->qcow2|convert -O qcow2 @src.raw @out" "qcow2->raw|convert -O raw @src.qcow2 @out" \
            "cold raw->qcow2|convert -O qcow2 @src.raw @out" \
            "cold qcow2->raw|convert -O raw @src.qcow2 @out" \
            "sparse 100G raw->qcow2|convert -O qcow2 @sparse.raw @out" \
            "sparse 100G qcow2->raw|convert -O raw @sparse.qcow2 @out" \
            "raw->qcow2 -c zlib|convert -O qcow2 -c @src.raw @out" \
            "raw->qcow2 -c zstd|convert -O qcow2 -c -o compression_type=zstd @src.raw @out" \
            "compare qcow2 raw|compare @src.qcow2 @src.raw" \
            "compare sparse 100G qcow2 raw|compare @sparse.qcow2 @sparse.raw" \
            "map sparse 100G extended L2|map @sparse-xl2.qcow2" \
            "compare sparse 100G extended L2|compare @sparse-xl2.qcow2 @sparse.raw"; do
  IFS='|' read -r name args <<<"$case"
  grep -qE -- "$filter" <<<"$name" || continue
  argv=()
  # shellcheck disable=SC2086
  for a in $args; do argv+=("${a/#@/$work/}"); done
  ours=(); theirs=(); base=()
  # Before each run: no target, nothing dirty, and for "cold" cases no source in the cache.
  fresh() {
    rm -f "$work/out"; sync
    if [[ $name == cold* ]]; then echo 3 > /proc/sys/vm/drop_caches; fi
  }
  for _ in $(seq "$runs"); do
    fresh
    ours+=("$(timeit "$QIMG" "${argv[@]}")")
    fresh
    theirs+=("$(timeit qemu-img "${argv[@]}")")
    if [ -n "${QIMG_BASE:-}" ]; then
      fresh
      base+=("$(timeit "$QIMG_BASE" "${argv[@]}")")
    fi
  done
  row "$name" ours
  [ -z "${QIMG_BASE:-}" ] || row "$name (base)" base
done
