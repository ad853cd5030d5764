#!/usr/bin/env bash
# Cowbird's main job, as far as it is built today.
#
# The goal (issue 8) is a VM booted by `vmm` on a qcow2 disk served by `vhost-blk`. The VMM
# cannot boot yet, so this runs the most complete path that exists: it builds the release
# binaries, creates a qcow2 disk with `qimg`, fills it from a raw image (compressed and not),
# and has QEMU's own tools verify every result (qemu-img check and compare).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf '\nDEMO FAILED: %s\n' "$*" >&2; exit 1; }

command -v qemu-img >/dev/null || fail "qemu-img is missing: run scripts/install-deps.sh"

say "building release binaries"
cargo build --release --quiet -p tools -p vhost-blk
QIMG=target/release/qimg

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

say "making a 256 MiB raw disk, half of it data"
head -c $((128 << 20)) /dev/urandom > "$work/data.bin"
cp "$work/data.bin" "$work/disk.raw"
truncate -s 256M "$work/disk.raw"

say "qimg create + convert into qcow2 (plain, zlib and zstd compressed)"
$QIMG create -f qcow2 "$work/empty.qcow2" 1G
$QIMG convert -p -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
$QIMG convert -c -O qcow2 "$work/disk.raw" "$work/disk-zlib.qcow2"
$QIMG convert -c -O qcow2 -o compression_type=zstd "$work/disk.raw" "$work/disk-zstd.qcow2"

for img in empty disk disk-zlib disk-zstd; do
  say "qimg info / check: $img.qcow2"
  $QIMG info "$work/$img.qcow2"
  $QIMG check "$work/$img.qcow2" || fail "qimg check $img.qcow2"
  qemu-img check -q "$work/$img.qcow2" || fail "qemu-img check disagrees on $img.qcow2"
done

for img in disk disk-zlib disk-zstd; do
  say "qemu-img compare disk.raw $img.qcow2"
  qemu-img compare "$work/disk.raw" "$work/$img.qcow2" || fail "$img.qcow2 differs from disk.raw"
done

say "SUCCESS: qcow2 images written by Cowbird are clean and identical according to qemu-img"
