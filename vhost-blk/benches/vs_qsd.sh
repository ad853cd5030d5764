#!/usr/bin/env bash
# vhost-blk vs qemu-storage-daemon (issue 5): the same client, tools' `vhost-bench`
# (libblkio's virtio-blk-vhost-user driver, one thread per queue, event-driven completions),
# drives both servers alternately on the same image files with the same cache mode, by
# default O_DIRECT on both sides (vhost-blk --direct; qsd cache.direct=on; aio=io_uring, one
# iothread, which is all QEMU 10.0's vhost-user-blk export takes) and the same queue count;
# `fio --ioengine=io_uring` on the raw file itself is the ceiling. CACHE=writeback runs
# both through the host's page cache instead (each server's default: vhost-blk without
# --direct, qsd cache.direct=off, fio --direct=0), with the images read into it first, so
# that the servers' own cost shows rather than the disk's.
#
# Matrix: 4 KiB randread QD1 and QD32, 4 KiB randwrite QD32, 1 MiB sequential read QD8, on
# a raw image filled with random data, a preallocated qcow2 converted from it (every cluster
# allocated and filled) and an empty qcow2 (16 times larger, recreated before every run, so
# that writes keep allocating and reads see unallocated clusters). Every run starts a fresh
# server; the order of the servers rotates from case to case and from run to run. Prints
# the medians of RUNS runs as a markdown table on stdout, then the issue's targets with the
# measured ratios; progress goes to stderr.
#
# Usage: vhost-blk/benches/vs_qsd.sh     (about 8 minutes with the defaults)
# Environment (defaults): RUNS=3 RUNTIME=3 RAMP=0.5 (seconds per run) SIZE_MIB=1024
#   QUEUES=1 IMAGES="raw prealloc empty"
#   WORKLOADS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 randwrite-4k-qd32-fsync4
#   read-1m-qd8" (RW-BS-qdN[-fsyncM]: with -fsyncM, a flush after every M writes, fio's fsync)
#   OURS_ARGS="" (extra vhost-blk flags, e.g. --pin-memory or --poll-us=0) QSD=qemu-storage-daemon
#   CACHE=direct|writeback
#   DIR=/var/tmp (for the images; must support O_DIRECT, so not tmpfs)
#   RESULTS=FILE (keep every run as a JSON line)
#   OURS_BASE=/path/to/an/older/vhost-blk: that binary runs too, alternating with the others
#   (same flags), and a second table compares the two builds (before/after A/B on a noisy
#   machine)
# Needs qemu-img, qemu-storage-daemon, fio and jq (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

RUNS=${RUNS:-3} RUNTIME=${RUNTIME:-3} RAMP=${RAMP:-0.5} SIZE_MIB=${SIZE_MIB:-1024}
QUEUES=${QUEUES:-1} IMAGES=${IMAGES:-raw prealloc empty}
WORKLOADS=${WORKLOADS:-randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd32 randwrite-4k-qd32-fsync4 read-1m-qd8}
OURS_ARGS=${OURS_ARGS:-} QSD=${QSD:-qemu-storage-daemon} CACHE=${CACHE:-direct}
case $CACHE in
  direct) ours_cache=--direct qsd_direct=on fio_cache=(--direct=1) ;;
  # fio drops a file's cached pages before a job unless told not to (invalidate=0).
  writeback) ours_cache= qsd_direct=off fio_cache=(--direct=0 --invalidate=0) ;;
  *) echo "CACHE must be direct or writeback, not $CACHE" >&2; exit 1 ;;
esac

cargo build --release --quiet -p vhost-blk --bin vhost-blk -p tools --bin vhost-bench
BIN=$(cargo metadata --no-deps --format-version 1 | jq -r .target_directory)/release
work=$(mktemp -d -p "${DIR:-/var/tmp}" vs-qsd.XXXXXX)
pid=
cleanup() {
  [ -z "$pid" ] || kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
sock=$work/server.sock results=$work/results.jsonl

image() { # KIND -> path
  case $1 in
    raw) echo "$work/raw.img" ;;
    prealloc) echo "$work/prealloc.qcow2" ;;
    empty) echo "$work/empty.qcow2" ;;
    *) echo "unknown image kind $1" >&2; exit 1 ;;
  esac
}

prepare_images() {
  echo "writing a ${SIZE_MIB} MiB raw image of random data in $work" >&2
  head -c "${SIZE_MIB}M" /dev/urandom >"$(image raw)"
  if [[ " $IMAGES " == *" prealloc "* ]]; then
    qemu-img convert -f raw -O qcow2 -o preallocation=metadata "$(image raw)" "$(image prealloc)"
  fi
  # The first runs would otherwise read from the disk while it writes the new images back.
  sync
  if [ "$CACHE" = writeback ]; then
    for kind in raw prealloc; do [ ! -e "$(image $kind)" ] || cat "$(image $kind)" >/dev/null; done
  fi
}

start_server() { # SERVER KIND -> $pid, listening on $sock
  local img fmt=raw node=file0 fmtdev=() deadline
  img=$(image "$2")
  [ "$2" = raw ] || { fmt=qcow2 node=fmt0 fmtdev=(--blockdev driver=qcow2,node-name=fmt0,file=file0); }
  rm -f "$sock"
  if [ "$1" = vhost-blk ] || [ "$1" = base ]; then
    local bin=$BIN/vhost-blk
    [ "$1" = vhost-blk ] || bin=$OURS_BASE
    # shellcheck disable=SC2086 # OURS_ARGS is a list of flags, ours_cache one or none
    RUST_LOG=warn "$bin" --socket "$sock" --image "$img" --format "$fmt" \
      --num-queues "$QUEUES" $ours_cache $OURS_ARGS 2>"$work/server.log" &
  else
    "$QSD" --blockdev "driver=file,node-name=file0,filename=$img,cache.direct=$qsd_direct,aio=io_uring" \
      "${fmtdev[@]}" --object iothread,id=iot0 \
      --export "type=vhost-user-blk,id=exp0,node-name=$node,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES,iothread=iot0" \
      2>"$work/server.log" &
  fi
  pid=$!
  deadline=$((SECONDS + 20))
  until [ -S "$sock" ]; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
      echo "$1 did not start:" >&2; cat "$work/server.log" >&2; exit 1
    fi
    sleep 0.01
  done
}

stop_server() {
  kill -TERM "$pid"
  wait "$pid" || true
  pid=
}

one() { # SERVER KIND WORKLOAD -> the run's JSON on stdout
  local server=$1 kind=$2 rw bs qd fsync
  IFS=- read -r rw bs qd fsync <<<"$3"
  qd=${qd#qd} fsync=${fsync#fsync}
  fsync=${fsync:-0}
  [ "$kind" != empty ] || qemu-img create -q -f qcow2 "$(image empty)" "$((SIZE_MIB * 16))M"
  if [ "$server" = fio ]; then
    fio --name=ceiling --filename="$(image raw)" --ioengine=io_uring "${fio_cache[@]}" --rw="$rw" \
      --bs="$bs" --iodepth="$qd" --fsync="$fsync" --numjobs="$QUEUES" --group_reporting --time_based \
      --runtime="$(jq -n "$RUNTIME * 1000 | floor")ms" --ramp_time="$(jq -n "$RAMP * 1000 | floor")ms" \
      --output-format=json >"$work/fio.json"
    jq '.jobs[0] | (if .write.io_bytes > 0 then .write else .read end) as $d
        | {iops: $d.iops, mib_s: ($d.bw_bytes / 1048576),
           lat_us: {p50: ($d.clat_ns.percentile["50.000000"] / 1000)},
           client_cpu_s: ((.usr_cpu + .sys_cpu) / 100 * .job_runtime / 1000),
           iops_per_server_cpu_s: null}' "$work/fio.json"
  else
    start_server "$server" "$kind"
    "$BIN/vhost-bench" --socket "$sock" --rw "$rw" --bs "$bs" --iodepth "$qd" --fsync "$fsync" \
      --queues "$QUEUES" --runtime "$RUNTIME" --ramp "$RAMP" --server-pid "$pid" \
      --output-format json || { cat "$work/server.log" >&2; exit 1; }
    stop_server
  fi
}

# The table of medians and the targets, from the runs' JSON lines.
report() {
  local cache="O_DIRECT on both servers"
  [ "$CACHE" = direct ] || cache="both servers through the page cache (images cached)"
  jq -s -r --argjson runs "$RUNS" --arg runtime "$RUNTIME" --arg queues "$QUEUES" --arg cache "$cache" '
    def median: sort | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def of($s; f): map(select(.server == $s) | f) | median;
    def fmt($d): if . == null then "–" else (. * pow(10; $d) | round | tostring
      | if $d == 0 then . else ([range($d + 1 - length)] | map("0") | join("")) + . | .[:-$d] + "." + .[-$d:] end) end;
    def ratio($a; $b): if $a == null or $b == null or $b == 0 then null else $a / $b end;
    [group_by([.i, .w])[] | {
      workload: .[0].workload, image: .[0].image, big: (.[0].workload | test("-1m-|-[0-9]+m-")),
      o: of("vhost-blk"; .iops), q: of("qsd"; .iops), f: of("fio"; .iops),
      om: of("vhost-blk"; .mib_s), qm: of("qsd"; .mib_s), fm: of("fio"; .mib_s),
      oc: of("vhost-blk"; .per_cpu), qc: of("qsd"; .per_cpu),
      ol: of("vhost-blk"; .p50), ql: of("qsd"; .p50), fl: of("fio"; .p50)
    }] as $rows
    | "\(now | strftime("%Y-%m-%d %H:%M UTC")): medians of \($runs) runs x \($runtime) s, \($queues) queue(s), \($cache)\n",
      "| workload | image | vhost-blk | qsd | ratio | IOPS per server CPU-s ours / qsd | ratio | p50 µs ours / qsd | ratio | fio on the file | ours / fio |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
      ($rows[] | . as $r
        | def rate($iops; $mib): if $r.big then "\($mib | fmt(0)) MiB/s" else "\($iops | fmt(0))" end;
        "| \(.workload) | \(.image) | \(rate(.o; .om)) | \(rate(.q; .qm)) | \(ratio(.o; .q) | fmt(2)) | \(.oc | fmt(0)) / \(.qc | fmt(0)) | \(ratio(.oc; .qc) | fmt(2)) | \(.ol | fmt(1)) / \(.ql | fmt(1)) | \(ratio(.ol; .ql) | fmt(2)) | \(if .f == null then "–" else "\(rate(.f; .fm)), p50 \(.fl | fmt(1)) µs" end) | \(ratio(.o; .f) | fmt(2)) |"),
      "\n| target | workload | image | measured | met |", "|---|---|---|---|---|",
      ($rows[] | select(.image != "raw") | (
        {t: "IOPS >= 1.2x qsd (qcow2)", v: ratio(.o; .q), ok: (ratio(.o; .q) >= 1.2)},
        {t: "IOPS per server CPU-s >= 1.5x qsd (qcow2)", v: ratio(.oc; .qc), ok: (ratio(.oc; .qc) >= 1.5)}
      ) + {w: .workload, im: .image}),
      ($rows[] | select(.image == "raw" and (.workload | startswith("randread-4k")) and .f != null)
        | {t: "IOPS >= 0.9x fio (raw 4 KiB randread)", v: ratio(.o; .f), ok: (ratio(.o; .f) >= 0.9), w: .workload, im: .image}),
      ($rows[] | select(.workload | endswith("-qd1"))
        | {t: "p50 latency <= 0.8x qsd (QD1)", v: ratio(.ol; .ql), ok: (ratio(.ol; .ql) <= 0.8), w: .workload, im: .image})
    | if type == "object" then "| \(.t) | \(.w) | \(.im) | \(.v | fmt(2)) | \(if .ok then "yes" else "**no**" end) |" else . end
  ' "$results"
}

# With OURS_BASE: this build against that one, per case.
report_base() {
  jq -s -r '
    def median: sort | if length == 0 then null
      elif length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def of($s; f): map(select(.server == $s) | f) | median;
    def r0: if . == null then "–" else round | tostring end;
    def r2: if . == null then "–" else . * 100 | round / 100 | tostring end;
    "\nvhost-blk against the OURS_BASE build (medians):\n",
    "| workload | image | IOPS ours / base | ratio | IOPS per server CPU-s ours / base | ratio |",
    "|---|---|---|---|---|---|",
    (group_by([.i, .w])[] | {w: .[0].workload, im: .[0].image,
        o: of("vhost-blk"; .iops), b: of("base"; .iops),
        oc: of("vhost-blk"; .per_cpu), bc: of("base"; .per_cpu)}
      | "| \(.w) | \(.im) | \(.o | r0) / \(.b | r0) | \(.o / .b | r2) | \(.oc | r0) / \(.bc | r0) | \(.oc / .bc | r2) |")
  ' "$results"
}

prepare_images
read -ra images <<<"$IMAGES"
read -ra workloads <<<"$WORKLOADS"
echo "$("$QSD" --version | head -1); $(fio --version); vhost-blk $OURS_ARGS; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for ((run = 0; run < RUNS; run++)); do
  case_no=0
  for i in "${!images[@]}"; do
    for w in "${!workloads[@]}"; do
      servers=(vhost-blk qsd)
      [ -z "${OURS_BASE:-}" ] || servers+=(base)
      [ "${images[i]}" != raw ] || servers+=(fio)
      shift_by=$(((run + case_no) % ${#servers[@]}))
      servers=("${servers[@]:shift_by}" "${servers[@]:0:shift_by}")
      for server in "${servers[@]}"; do
        one "$server" "${images[i]}" "${workloads[w]}" >"$work/run.json"
        jq -c --arg s "$server" --arg im "${images[i]}" --arg w "${workloads[w]}" \
            --argjson i "$i" --argjson wi "$w" \
            '{server: $s, image: $im, workload: $w, i: $i, w: $wi, iops, mib_s,
              p50: .lat_us.p50, per_cpu: .iops_per_server_cpu_s, client_cpu: .client_cpu_s}' \
          "$work/run.json" >>"$results"
        tail -1 "$results" | jq -r --argjson run "$((run + 1))" \
          '"run \($run) \(.workload) \(.image) \(.server): \(.iops | round) IOPS, p50 \(.p50 | round) µs, \(.per_cpu // 0 | round) IOPS/CPU-s"' >&2
      done
      case_no=$((case_no + 1))
    done
  done
done
echo "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
[ -z "${RESULTS:-}" ] || cp "$results" "$RESULTS"
report
[ -z "${OURS_BASE:-}" ] || report_base
