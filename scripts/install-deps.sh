#!/usr/bin/env bash
# Install the system packages Cowbird's build and tests need.
#
# Target: Debian 12 (bookworm), run as root. Idempotent: when everything is
# already installed it only checks (no `apt-get update`, no install) and
# finishes in well under a second.
#
# QEMU must be 10.0.x for every binary the tests use (qemu-img, qemu-io,
# qemu-storage-daemon, qemu-system-x86_64). Bookworm ships 7.2, so all QEMU
# packages come from bookworm-backports, installed together in ONE
# `apt-get install -t bookworm-backports` command: installing plain-bookworm
# qemu-system-x86 (7.2) next to backports qemu-utils (10.0) would downgrade
# or mismatch them.
set -euo pipefail

# ---------------------------------------------------------------------------
# Package lists. Later issues: add new system packages to PACKAGES.
# ---------------------------------------------------------------------------

# Installed from plain bookworm (no -t).
# NOTE: libblkio-dev (libblkio) is NOT packaged in bookworm nor in
# bookworm-backports (`apt-cache policy libblkio-dev` is empty for both, and
# `apt-cache search blkio` finds nothing), so it is deliberately left out.
PACKAGES=(
    busybox-static
    cpio
    lz4
    iproute2
    dpdk-dev
    iperf3
    bc
    pkg-config
    iputils-ping
    # dnsmasq binary (no system service) for vhost-net's QEMU/iPXE DHCP test
    dnsmasq-base
    # test guest kernel build (tests/guest/build.sh)
    linux-source-6.1
    flex
    bison
    make
    gcc
    libc6-dev
    libelf-dev
    perl
    xz-utils
    patch
    # vhost-blk/benches/vs_qsd.sh: the ceiling on the image file, and its JSON reports
    fio
    jq
    # losetup: vhost-blk serves a loop device in its block-device test
    mount
    # mkfs.ext4: qcow2's lost-write test builds a failing disk on a loop device
    e2fsprogs
)

# Installed together with `-t bookworm-backports` (QEMU 10.0.x).
# qemu-system-data, qemu-system-common, seabios and ipxe-qemu are hard
# dependencies of backports qemu-system-x86 anyway; they are listed so the
# firmware needed by `qemu-system-x86_64 -nographic -accel tcg -kernel ...`
# (SeaBIOS, linuxboot_dma.bin, vgabios) and virtio-net's iPXE option ROM
# (efi-virtio.rom from ipxe-qemu) is explicit and checked. ipxe-qemu only
# exists in plain bookworm; -t only raises backports' priority, so apt still
# takes it from bookworm.
QEMU_PACKAGES=(
    qemu-utils
    qemu-system-x86
    qemu-block-extra
    qemu-system-common
    qemu-system-data
    seabios
    ipxe-qemu
)

QEMU_SERIES="10.0"
QEMU_BINARIES=(qemu-img qemu-io qemu-storage-daemon qemu-system-x86_64)

# Firmware files qemu-system-x86_64 loads for a -kernel boot of the default
# pc machine (SeaBIOS, linuxboot_dma, std VGA BIOS) and for a virtio-net-pci
# NIC (its default iPXE romfile). Looked up in qemu's own firmware search path
# (`qemu-system-x86_64 -L help`: /usr/share/qemu, /usr/share/seabios,
# /usr/lib/ipxe/qemu on Debian).
QEMU_FIRMWARE=(
    bios-256k.bin
    linuxboot_dma.bin
    vgabios-stdvga.bin
    efi-virtio.rom
)

BASE_SUITE="bookworm"
BACKPORTS_SUITE="bookworm-backports"
DEB822_SOURCE="/etc/apt/sources.list.d/debian.sources"
CLASSIC_SOURCE="/etc/apt/sources.list"
BACKPORTS_FILE="/etc/apt/sources.list.d/bookworm-backports.sources"

export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-deps] %s\n' "$*"; }
die() { printf '[install-deps] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Sanity checks
# ---------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "must run as root"
codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
[[ $codename == "$BASE_SUITE" ]] \
    || die "expected Debian 12 ($BASE_SUITE), found VERSION_CODENAME='$codename'"

# ---------------------------------------------------------------------------
# bookworm-backports apt source (no network; rewritten only if it changes)
# ---------------------------------------------------------------------------

# Print a deb822 stanza for bookworm-backports, derived from the first enabled
# deb stanza of a deb822 file whose Suites contain exactly "bookworm" (so not
# bookworm-security / bookworm-updates-only stanzas). Signed-By is copied
# verbatim, including continuation lines (inline keys).
backports_stanza_from_deb822() {
    awk -v base="$BASE_SUITE" -v bpo="$BACKPORTS_SUITE" '
        function reset() { types = ""; uris = ""; suites = ""; enabled = ""; signed = ""; last = "" }
        function has_word(list, w,    n, a, i) {
            n = split(list, a, /[ \t]+/)
            for (i = 1; i <= n; i++) if (a[i] == w) return 1
            return 0
        }
        function flush(    a) {
            if (!done && has_word(types, "deb") && has_word(suites, base) && tolower(enabled) != "no" && uris != "") {
                split(uris, a, /[ \t]+/)
                print "Types: deb"
                print "URIs: " a[1]
                print "Suites: " bpo
                print "Components: main"
                if (signed != "") print "Signed-By:" signed
                done = 1
            }
            reset()
        }
        BEGIN { reset(); done = 0 }
        /^#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]/ { if (last == "signed-by") signed = signed "\n" $0; next }
        {
            i = index($0, ":"); if (i == 0) next
            name = tolower(substr($0, 1, i - 1)); value = substr($0, i + 1)
            last = name
            v = value; gsub(/^[ \t]+|[ \t]+$/, "", v)
            if (name == "types") types = v
            else if (name == "uris") uris = v
            else if (name == "suites") suites = v
            else if (name == "enabled") enabled = v
            else if (name == "signed-by") signed = value
        }
        END { flush() }
    ' "$1"
}

# Same, from a classic one-line-style sources.list:
#   deb [signed-by=... arch=...] URI bookworm main ...
backports_stanza_from_classic() {
    awk -v base="$BASE_SUITE" -v bpo="$BACKPORTS_SUITE" '
        /^[ \t]*#/ || $1 != "deb" { next }
        {
            signed = ""; i = 2
            if (substr($2, 1, 1) == "[") {
                opts = ""
                for (; i <= NF; i++) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } }
                gsub(/[\[\]]/, " ", opts)
                n = split(opts, o, /[ \t]+/)
                for (k = 1; k <= n; k++) if (o[k] ~ /^signed-by=/) signed = substr(o[k], 11)
            }
            uri = $i; suite = $(i + 1)
            if (suite != base) next
            print "Types: deb"
            print "URIs: " uri
            print "Suites: " bpo
            print "Components: main"
            if (signed != "") print "Signed-By: " signed
            exit
        }
    ' "$1"
}

ensure_backports_source() {
    # Some other source already provides bookworm-backports: adding a second
    # entry would only produce duplicate-source warnings (or Signed-By
    # conflicts), so leave the configuration alone.
    local f
    for f in "$CLASSIC_SOURCE" /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f && $f != "$BACKPORTS_FILE" ]] || continue
        if grep -Eq "^[^#]*[[:space:]]${BACKPORTS_SUITE}([[:space:]]|$)" "$f"; then
            log "apt source for $BACKPORTS_SUITE already present in $f"
            return 0
        fi
    done

    local stanza=""
    if [[ -f $DEB822_SOURCE ]]; then
        stanza=$(backports_stanza_from_deb822 "$DEB822_SOURCE")
        [[ -n $stanza ]] || die "no enabled 'deb' stanza with Suites '$BASE_SUITE' in $DEB822_SOURCE"
    elif [[ -f $CLASSIC_SOURCE ]]; then
        stanza=$(backports_stanza_from_classic "$CLASSIC_SOURCE")
        [[ -n $stanza ]] || die "no 'deb ... $BASE_SUITE ...' line in $CLASSIC_SOURCE"
    else
        die "neither $DEB822_SOURCE nor $CLASSIC_SOURCE exists; cannot derive the Debian mirror"
    fi

    if [[ -f $BACKPORTS_FILE ]] && [[ $(cat "$BACKPORTS_FILE") == "$stanza" ]]; then
        log "apt source $BACKPORTS_FILE up to date"
        return 0
    fi
    printf '%s\n' "$stanza" > "$BACKPORTS_FILE.tmp"
    mv "$BACKPORTS_FILE.tmp" "$BACKPORTS_FILE"
    log "wrote $BACKPORTS_FILE:"
    sed 's/^/    /' "$BACKPORTS_FILE"
}

# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

# "X.Y.Z" from `<binary> --version`, or empty if missing / unparsable.
qemu_version() {
    local out
    out=$("$1" --version 2>/dev/null) || return 0
    sed -n '1s/.*[Vv]ersion \([0-9][0-9.]*\).*/\1/p' <<<"$out"
}

is_wanted_series() { [[ $1 == "$QEMU_SERIES".* ]]; }

# Sets MISSING to the reasons the fast path cannot be taken (empty = all good).
check_installed() {
    MISSING=()
    local p status version b f d
    for p in "${QEMU_PACKAGES[@]}" "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
        if [[ $status != installed ]]; then
            MISSING+=("package $p not installed")
            continue
        fi
        # QEMU's own packages must all be 10.0 (epoch 1:10.0.x...).
        if [[ $p == qemu-* ]]; then
            version=$(dpkg-query -W -f='${Version}' "$p")
            [[ ${version#*:} == "$QEMU_SERIES".* ]] || MISSING+=("package $p is $version, want $QEMU_SERIES.x")
        fi
    done
    for b in "${QEMU_BINARIES[@]}"; do
        version=$(qemu_version "$b")
        is_wanted_series "$version" || MISSING+=("$b reports '${version:-<none>}', want $QEMU_SERIES.x")
    done
    local -a fw_dirs=()
    mapfile -t fw_dirs < <(qemu-system-x86_64 -L help 2>/dev/null || true)
    for f in "${QEMU_FIRMWARE[@]}"; do
        local found=""
        for d in "${fw_dirs[@]}"; do
            if [[ -e $d/$f ]]; then found=1; break; fi
        done
        [[ -n $found ]] || MISSING+=("firmware $f not in qemu's search path (${fw_dirs[*]:-qemu-system-x86_64 missing})")
    done
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
ensure_backports_source

check_installed
if ((${#MISSING[@]} == 0)); then
    log "all packages present and QEMU is $QEMU_SERIES.x; nothing to install"
else
    log "installing, because:"
    printf '    %s\n' "${MISSING[@]}"

    apt-get update

    apt_install=(apt-get install -y --no-install-recommends
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

    # All QEMU packages in ONE command, from backports.
    "${apt_install[@]}" -t "$BACKPORTS_SUITE" "${QEMU_PACKAGES[@]}"

    # Everything else from plain bookworm.
    "${apt_install[@]}" "${PACKAGES[@]}"

    check_installed
fi

# ---------------------------------------------------------------------------
# Report and verify
# ---------------------------------------------------------------------------
log "QEMU versions:"
bad=()
for b in "${QEMU_BINARIES[@]}"; do
    v=$(qemu_version "$b")
    printf '    %-22s %s\n' "$b" "${v:-<not found>}"
    is_wanted_series "$v" || bad+=("$b")
done
if ((${#bad[@]} > 0)); then
    die "QEMU $QEMU_SERIES.x required, but these are missing or another version: ${bad[*]}"
fi
if ((${#MISSING[@]} > 0)); then
    printf '    %s\n' "${MISSING[@]}" >&2
    die "dependencies still incomplete after install (see above)"
fi
# The failing-media tests serve files over FUSE (tests/src/unreadable_file.rs): the kernel's
# fuse driver and its device, no package (they mount with the mount system call, as root).
if [[ ! -e /dev/fuse ]]; then
    modprobe fuse 2>/dev/null || true
    [[ -e /dev/fuse ]] || mknod -m 666 /dev/fuse c 10 229 || die "no /dev/fuse for the FUSE tests"
fi
log "OK"
