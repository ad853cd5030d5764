#!/usr/bin/env bash
# Benchmark: `qimg convert` vs `qemu-img convert`, alternating on the same inputs.
# Prints the median wall time of each and the ratio qimg/qemu-img (lower is better).
#
# Usage: tools/benches/convert.sh [SIZE_GIB (default 2)] [RUNS (default 3)]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
size_gib=${1:-2}
runs=${2:-3}
cargo build --release --quiet -p tools
QIMG=$PWD/target/release/qimg
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

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }

printf '%-28s %10s %10s %8s\n' case qimg_s qemu_s ratio
for case in "raw->qcow2|-O qcow2|src.raw" "qcow2->raw|-O raw|src.qcow2" \
            "raw->qcow2 -c zlib|-O qcow2 -c|src.raw" \
            "raw->qcow2 -c zstd|-O qcow2 -c -o compression_type=zstd|src.raw"; do
  IFS='|' read -r name args src <<<"$case"
  ours=(); theirs=()
  for _ in $(seq "$runs"); do
    rm -f "$work/out"; sync
    # shellcheck disable=SC2086
    ours+=("$(timeit "$QIMG" convert $args "$work/$src" "$work/out")")
    rm -f "$work/out"; sync
    # shellcheck disable=SC2086
    theirs+=("$(timeit qemu-img convert $args "$work/$src" "$work/out")")
  done
  o=$(printf '%s\n' "${ours[@]}" | median)
  t=$(printf '%s\n' "${theirs[@]}" | median)
  printf '%-28s %10.2f %10.2f %8.2f\n' "$name" "$o" "$t" "$(echo "$o / $t" | bc -l)"
done
