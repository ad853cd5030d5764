#!/usr/bin/env bash
# Build the Cowbird test guest: a patched Debian linux-source-6.1 kernel and a
# small busybox initramfs whose /init runs the steps named on the kernel command
# line (see ./init and README.md).
#
# usage: tests/guest/build.sh
#   Prints the artefact directory as the last line of stdout (progress goes to
#   stderr). It holds:
#     vmlinux      ELF kernel with a PVH entry (boot this: no decompressor)
#     bzImage      the same kernel as a bzImage
#     initrd.cpio  uncompressed newc initramfs
#     busybox      the exact busybox binary inside the initramfs
#     config, build.log, manifest.txt
#
# env:
#   COWBIRD_GUEST_CACHE       cache root (default $HOME/.cache/cowbird/guest)
#   COWBIRD_GUEST_JOBS        make -j (default: nproc)
#   COWBIRD_GUEST_KEEP_BUILD  1 = keep the ~1.5 GB kernel source/object tree
#
# Idempotent: the artefacts live in <cache>/<hash>, hash = sha256 of guest.config,
# guest.patch, init and this script, so it rebuilds only when one of them
# changes. The kernel itself is cached one level down, in <cache>/kernel-<khash>
# (khash = guest.config + guest.patch + KERNEL_RECIPE below), so editing ./init
# or this script only rebuilds the initramfs (a second), not the kernel (~15 min).
# Concurrent callers (parallel tests) serialise on flocks and the later ones
# reuse the first one's result. Nothing is written under the repo.
set -Eeuo pipefail

# Bump when the kernel build steps below change in a way that changes the kernel.
KERNEL_RECIPE=1

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${COWBIRD_GUEST_CACHE:-${HOME:-/root}/.cache/cowbird/guest}
JOBS=${COWBIRD_GUEST_JOBS:-$(nproc)}
TARBALL=/usr/src/linux-source-6.1.tar.xz

log() { echo "guest-build: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- cache keys --------------------------------------------------------------------
INPUTS=(guest.config guest.patch init build.sh)
HASH=$(cd "$HERE" && sha256sum "${INPUTS[@]}" | sha256sum | cut -c1-16)
KHASH=$( (cd "$HERE" && sha256sum guest.config guest.patch; echo "recipe $KERNEL_RECIPE") | sha256sum | cut -c1-16)
OUT=$CACHE_ROOT/$HASH
KOUT=$CACHE_ROOT/kernel-$KHASH

# Fast path, no lock: finished directories are only ever created by an atomic
# rename, so if .complete is there everything is.
if [[ -f $OUT/.complete ]]; then
	echo "$OUT"
	exit 0
fi

mkdir -p "$CACHE_ROOT"
# take_lock FD NAME: flock on <cache>/NAME.lock, saying so if we have to wait.
take_lock() {
	eval "exec $1>\"\$CACHE_ROOT/$2.lock\""
	if ! flock -n "$1"; then
		log "another build of $2 is running; waiting for it"
		flock "$1"
	fi
}
take_lock 9 "$HASH"
if [[ -f $OUT/.complete ]]; then   # built by whoever held the lock
	echo "$OUT"
	exit 0
fi

START=$(date +%s)
WORK=$CACHE_ROOT/$HASH.build
rm -rf "$WORK" "$OUT" "$OUT.new"
mkdir -p "$WORK"
LOG=$WORK/build.log
: >"$LOG"

# Any failing command from here on: show where and the end of the log.
on_err() {
	local rc=$? line=$1
	log "FAILED (exit $rc, build.sh line $line). Last lines of $LOG:"
	tail -n 30 "$LOG" >&2 || true
	# With make -j the first real error is often far above the tail.
	if grep -q -E 'error:|Error [0-9]' "$LOG"; then
		log "error lines in the log:"
		grep -n -m 15 -E 'error:|Error [0-9]' "$LOG" >&2 || true
	fi
	log "build tree left in $(dirname "$LOG")"
	exit "$rc"
}
trap 'on_err $LINENO' ERR

# --- build dependencies: apt-get only when something is missing -------------------
# What this kernel config really needs: gcc/binutils/make, flex + bison
# (kconfig), bc (timeconst), perl, libelf headers (objtool: CONFIG_OBJTOOL=y),
# xz + patch for the source. No libssl: the config has no module signing and
# no trusted keyring. busybox-static for the initramfs (which has no libc).
need_pkgs=()
pkg_installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }
for p in busybox-static; do pkg_installed "$p" || need_pkgs+=("$p"); done
if [[ ! -f $KOUT/.complete ]]; then
	for p in linux-source-6.1 flex bison bc make gcc binutils libc6-dev libelf-dev perl xz-utils patch; do
		pkg_installed "$p" || need_pkgs+=("$p")
	done
fi
if ((${#need_pkgs[@]})); then
	log "installing missing packages: ${need_pkgs[*]}"
	[[ $(id -u) == 0 ]] || die "need root to apt-get install ${need_pkgs[*]}"
	{
		apt-get update -q
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
	} >>"$LOG" 2>&1
fi
BUSYBOX=$(command -v busybox || echo /bin/busybox)
if readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'program interpreter'; then
	die "$BUSYBOX is dynamically linked; the initramfs needs busybox-static"
fi

# --- kernel (cached separately, see top) -----------------------------------------------
build_kernel() {
	local kwork=$KOUT.build klog
	rm -rf "$kwork" "$KOUT.new"
	mkdir -p "$kwork"
	klog=$kwork/build.log
	LOG=$klog   # for on_err
	: >"$klog"
	log "building kernel $KHASH in $kwork (log: $klog)"
	[[ -f $TARBALL ]] || die "$TARBALL missing (package linux-source-6.1)"

	log "unpacking $TARBALL"
	nice -n 10 tar -xf "$TARBALL" -C "$kwork" >>"$klog" 2>&1
	local src=$kwork/linux-source-6.1
	patch -d "$src" -p1 --forward --batch <"$HERE/guest.patch" >>"$klog" 2>&1

	cp "$HERE/guest.config" "$src/.config"
	local kmake=(nice -n 10 make -C "$src" ARCH=x86_64
		# Reproducible version string: no user/host/date of this machine.
		KBUILD_BUILD_USER=cowbird KBUILD_BUILD_HOST=cowbird
		KBUILD_BUILD_TIMESTAMP="$(date -u -d @0)")
	"${kmake[@]}" olddefconfig >>"$klog" 2>&1
	# guest.config is a full .config; olddefconfig should only differ in the
	# toolchain-derived lines. Anything else means the source or compiler
	# changed under us: warn, since the result may not boot on the kvm-pvm host.
	local tc='^CONFIG_(CC|AS|LD|GCC|CLANG|PAHOLE|RUSTC)_'
	if ! diff <(grep -v -E "$tc" "$HERE/guest.config") <(grep -v -E "$tc" "$src/.config") >>"$klog" 2>&1; then
		log "WARNING: olddefconfig changed guest.config (diff in $klog)"
	fi

	log "make -j$JOBS vmlinux bzImage (nice 10; ~10-20 min on 2 cores)"
	local kstart=$SECONDS
	"${kmake[@]}" -j"$JOBS" vmlinux bzImage >>"$klog" 2>&1
	log "kernel built in $((SECONDS - kstart)) s"
	# The kernel's own initramfs tool: device nodes without root, fixed mtimes.
	gcc -O2 -o "$kwork/gen_init_cpio" "$src/usr/gen_init_cpio.c" >>"$klog" 2>&1

	mkdir -p "$KOUT.new"
	cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$kwork/gen_init_cpio" "$KOUT.new/"
	cp "$src/.config" "$KOUT.new/config"
	{
		echo "kernel: $(make -s --no-print-directory -C "$src" kernelrelease) from linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
		echo "gcc: $(gcc --version | head -1)"
		echo "kernel build: $((SECONDS - kstart)) s with -j$JOBS"
	} >"$KOUT.new/manifest.txt"
	cp "$klog" "$KOUT.new/build.log"
	touch "$KOUT.new/.complete"
	mv "$KOUT.new" "$KOUT"
	if [[ ${COWBIRD_GUEST_KEEP_BUILD:-0} != 1 ]]; then
		rm -rf "$kwork"
	fi
	LOG=$WORK/build.log
}

if [[ ! -f $KOUT/.complete ]]; then
	take_lock 8 "kernel-$KHASH"
	[[ -f $KOUT/.complete ]] || build_kernel
	exec 8>&-
else
	log "reusing kernel $KOUT"
fi
cat "$KOUT/build.log" >>"$LOG"

# --- initramfs ------------------------------------------------------------------------
# Uncompressed on purpose: the guest kernel's instructions are emulated (~1 us
# each) on the test host, so gunzip of ~1 MB in the guest would cost tens of
# seconds. Only the applets ./init uses get a symlink: "busybox --install" would
# cost hundreds of (emulated, slow) syscalls at boot.
log "initramfs"
APPLETS=(sh mount umount cat dd sync head md5sum mke2fs mkdir blockdev blkdiscard ip ping setsid cttyhack reboot sleep)
{
	echo "dir /bin 755 0 0"
	echo "dir /dev 755 0 0"
	echo "dir /proc 755 0 0"
	echo "dir /sys 755 0 0"
	echo "dir /tmp 1777 0 0"
	echo "dir /mnt 755 0 0"
	echo "nod /dev/console 600 0 0 c 5 1"
	echo "nod /dev/null 666 0 0 c 1 3"
	echo "file /bin/busybox $BUSYBOX 755 0 0"
	for a in "${APPLETS[@]}"; do echo "slink /bin/$a busybox 777 0 0"; done
	echo "file /init $HERE/init 755 0 0"
} >"$WORK/initrd.list"
"$KOUT/gen_init_cpio" -t 0 "$WORK/initrd.list" >"$WORK/initrd.cpio" 2>>"$LOG"

# --- publish ------------------------------------------------------------------------------
mkdir -p "$OUT.new"
# Hard links to the kernel cache (same filesystem): an init change costs no
# second 17 MB vmlinux. The artefacts are never modified in place.
cp -l "$KOUT/vmlinux" "$KOUT/bzImage" "$KOUT/config" "$OUT.new/" 2>/dev/null ||
	cp "$KOUT/vmlinux" "$KOUT/bzImage" "$KOUT/config" "$OUT.new/"
cp "$WORK/initrd.cpio" "$OUT.new/"
cp "$BUSYBOX" "$OUT.new/busybox"
{
	echo "hash: $HASH"
	(cd "$HERE" && sha256sum "${INPUTS[@]}")
	echo "kernel dir: $KOUT"
	cat "$KOUT/manifest.txt"
	echo "busybox-static: $(dpkg-query -W -f='${Version}' busybox-static)"
	echo "built: $(date -u +%FT%TZ)"
} >"$OUT.new/manifest.txt"
cp "$LOG" "$OUT.new/build.log"
touch "$OUT.new/.complete"
mv "$OUT.new" "$OUT"
trap - ERR
rm -rf "$WORK"
log "done in $(($(date +%s) - START)) s"
echo "$OUT"
