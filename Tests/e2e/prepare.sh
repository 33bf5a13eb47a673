#!/usr/bin/env bash
# Prepare the guest for the vhost-user-blk end-to-end tests: a Debian kernel
# and a busybox initramfs, both in a cache directory. Idempotent: a second run
# downloads nothing and rebuilds nothing unless an input changed.
#
#   Tests/e2e/prepare.sh [--cache DIR] [--kernel-package NAME] [--quiet]
#
# Prints, on stdout, the lines
#   KERNEL=/path/to/vmlinuz
#   INITRD=/path/to/initramfs.cpio.gz
#   KVER=<kernel release>
# (everything else goes to stderr), so callers can `eval "$(prepare.sh)"`.
#
# Environment:
#   DATAPLANE_E2E_CACHE   cache directory (default /var/tmp/dataplane-e2e-cache)
#   DATAPLANE_E2E_KERNEL  Debian kernel package to use instead of the newest
#                         linux-image-<version>-amd64 apt knows about
#
# Host requirements (nothing is installed here): apt-get, apt-cache, dpkg-deb,
# busybox-static (/bin/busybox), cpio, gzip, xz-utils (for .ko.xz modules).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${DATAPLANE_E2E_CACHE:-/var/tmp/dataplane-e2e-cache}
kpkg=${DATAPLANE_E2E_KERNEL:-}
quiet=0

die() { echo "prepare.sh: error: $*" >&2; exit 1; }
trap 'echo "prepare.sh: error: unexpected failure at line $LINENO: $BASH_COMMAND" >&2' ERR
# First existing path among the arguments (unmatched globs stay literal).
first() { local p; for p in "$@"; do if [[ -e $p ]]; then echo "$p"; return 0; fi; done; }
log() { if [[ $quiet == 0 ]]; then echo "prepare.sh: $*" >&2; fi; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --cache) cache=${2:?--cache needs a directory}; shift 2 ;;
        --kernel-package) kpkg=${2:?--kernel-package needs a name}; shift 2 ;;
        --quiet|-q) quiet=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found; install the Debian package '$2'"
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
busybox_bin=/bin/busybox
[[ -x $busybox_bin ]] || die "$busybox_bin not found; install the Debian package 'busybox-static'"
# The initramfs has no libc: the busybox in it must be static.
if command -v file >/dev/null 2>&1 && file -L "$busybox_bin" | grep -q 'dynamically linked'; then
    die "$busybox_bin is dynamically linked; install 'busybox-static' (not 'busybox')"
fi

mkdir -p "$cache" || die "cannot create cache directory $cache"
cache=$(cd "$cache" && pwd)

# Serialize concurrent prepare runs (tests may start in parallel).
exec 9>"$cache/.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9 || die "cannot lock $cache/.lock"
fi

apt_updated=0
apt_update_once() {
    [[ $apt_updated == 0 ]] || return 1
    apt_updated=1
    log "apt lists look missing or stale; running apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed (are you root / online?)"
}

# The newest linux-image-<ver>-amd64 (signed, generic flavour) apt knows about.
# Excludes the linux-image-X.Y-amd64 meta packages, -cloud, -rt, -dbg, -unsigned.
newest_kernel_package() {
    apt-cache search --names-only '^linux-image-[0-9].*-amd64$' 2>/dev/null \
        | awk '{print $1}' \
        | grep -E '^linux-image-[0-9]+\.[0-9]+\.[0-9]+[^ ]*-amd64$' \
        | grep -Ev -- '-(cloud|rt|dbg|unsigned)-|-(dbg|unsigned)$' \
        | sort -V | tail -n 1
}

# apt-cache takes ~1s; its answer only changes when the package lists do, so
# remember it keyed by the lists' newest mtime.
lists_key() {
    local d=/var/lib/apt/lists newest
    newest=$(find "$d" -maxdepth 1 -name '*Packages*' -printf '%T@\n' 2>/dev/null | sort -n | tail -n 1)
    echo "${newest:-none}"
}
if [[ -z $kpkg ]]; then
    key=$(lists_key)
    if [[ $key != none && -f $cache/newest ]] && read -r k p <"$cache/newest" && [[ $k == "$key" && -n $p ]]; then
        kpkg=$p
    else
        kpkg=$(newest_kernel_package || true)
        if [[ -z $kpkg ]]; then
            apt_update_once || true
            kpkg=$(newest_kernel_package || true)
        fi
        [[ -n $kpkg ]] || die "apt-cache knows no linux-image-<version>-amd64 package"
        echo "$(lists_key) $kpkg" >"$cache/newest"
    fi
fi
kver=${kpkg#linux-image-}
[[ $kver != "$kpkg" && -n $kver ]] || die "not a linux-image-* package name: $kpkg"

kdir=$cache/kernel/$kver
if [[ ! -f $kdir/.complete ]]; then
    log "fetching $kpkg (first run for this kernel; later runs use $kdir)"
    rm -rf "$kdir"
    work=$(mktemp -d "$cache/.work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    apt_opts=(-q)
    # As root apt drops to the _apt user, which cannot write into our work dir.
    if [[ $(id -u) == 0 ]]; then apt_opts+=(-o APT::Sandbox::User=root); fi
    if ! (cd "$work" && apt-get "${apt_opts[@]}" download "$kpkg" >&2); then
        apt_update_once || die "apt-get download $kpkg failed"
        (cd "$work" && apt-get "${apt_opts[@]}" download "$kpkg" >&2) \
            || die "apt-get download $kpkg failed even after apt-get update"
    fi
    deb=$(first "$work"/*.deb)
    [[ -n $deb ]] || die "apt-get download produced no .deb"
    dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
    vmlinuz=$(first "$work"/root/boot/vmlinuz-*)
    [[ -n $vmlinuz ]] || die "$deb has no /boot/vmlinuz-*"
    release=${vmlinuz##*/vmlinuz-}
    moddir=$(first "$work"/root/lib/modules/* "$work"/root/usr/lib/modules/*)
    [[ -n $moddir ]] || die "$deb has no lib/modules/<release>"

    mkdir -p "$work/keep/modules"
    cp "$vmlinuz" "$work/keep/vmlinuz"
    cp "$work"/root/boot/config-* "$work/keep/config" 2>/dev/null || true
    cp "$moddir/modules.builtin" "$work/keep/modules.builtin" 2>/dev/null || : >"$work/keep/modules.builtin"
    echo "$release" >"$work/keep/release"
    echo "$kpkg $(dpkg-deb -f "$deb" Version)" >"$work/keep/package"

    # Module file for a name (virtio_pci -> .../virtio_pci.ko[.xz|.gz|.zst]);
    # module names may use '-' or '_' interchangeably in file names.
    find_module() {
        local n=$1 alt=${1//_/-}
        find "$moddir/kernel" \( -name "$n.ko" -o -name "$n.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) \
            -print -quit 2>/dev/null
    }
    # Copy a module, decompressed (busybox insmod reads plain ELF reliably;
    # its xz support depends on build options), plus its dependencies first.
    declare -A seen=()
    : >"$work/keep/modules/order"
    add_module() {
        local n=$1 f plain deps d
        n=${n//-/_}
        [[ -z ${seen[$n]:-} ]] || return 0
        seen[$n]=1
        f=$(find_module "$n")
        if [[ -z $f ]]; then
            if grep -Eq "/${n//_/[-_]}\.ko$" "$work/keep/modules.builtin"; then
                log "module $n: built into $release"
            else
                log "module $n: not in $release (neither module nor built-in); skipped"
            fi
            return 0
        fi
        plain=$work/keep/modules/$n.ko
        case $f in
            *.ko) cp "$f" "$plain" ;;
            *.ko.xz) command -v xz >/dev/null || die "xz not found; install 'xz-utils'"; xz -dc "$f" >"$plain" ;;
            *.ko.gz) gzip -dc "$f" >"$plain" ;;
            *.ko.zst) command -v zstd >/dev/null || die "zstd not found; install 'zstd'"; zstd -qdc "$f" >"$plain" ;;
            *) die "unknown module compression: $f" ;;
        esac
        deps=$(tr '\0' '\n' <"$plain" | sed -n 's/^depends=//p')
        deps=${deps%%$'\n'*}
        for d in ${deps//,/ }; do add_module "$d"; done
        echo "$n" >>"$work/keep/modules/order"
        log "module $n: ${f#"$moddir"/} (depends: ${deps:-none})"
    }
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
        add_module "$m"
    done
    grep -qx virtio_blk "$work/keep/modules/order" || grep -Eq '/virtio_blk\.ko$' "$work/keep/modules.builtin" \
        || die "$release has no virtio_blk driver"

    mkdir -p "$cache/kernel"
    mv "$work/keep" "$kdir"
    touch "$kdir/.complete"
    rm -rf "$work"
    trap - EXIT
fi
release=$(cat "$kdir/release")

# ---- initramfs ---------------------------------------------------------------
# Rebuilt when busybox, the guest scripts or the module set change.
inputs_hash=$(
    {
        sha256sum "$busybox_bin" "$here/guest/init" "$here/guest/pattern.awk"
        cat "$kdir/modules/order"
        (cd "$kdir/modules" && sha256sum -- *.ko 2>/dev/null || true)
    } | sha256sum | cut -c1-16
)
initrd=$cache/initramfs-$kver-$inputs_hash.cpio.gz
if [[ ! -s $initrd ]]; then
    log "building initramfs $initrd"
    stage=$(mktemp -d "$cache/.initramfs.XXXXXX")
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules,etc,e2e}
    cp "$busybox_bin" "$stage/bin/busybox"
    # Applet links made here: `busybox --install` in the guest costs ~1s of TCG.
    for a in $("$busybox_bin" --list); do
        [[ $a == busybox ]] || ln -s busybox "$stage/bin/$a"
    done
    cp "$here/guest/init" "$stage/init"
    chmod 0755 "$stage/init"
    cp "$here/guest/pattern.awk" "$stage/e2e/pattern.awk"
    cp "$kdir/modules/order" "$stage/lib/modules/order"
    if [[ -s $kdir/modules/order ]]; then cp "$kdir"/modules/*.ko "$stage/lib/modules/"; fi
    echo "$release" >"$stage/etc/kernel-release"
    # The kernel needs /dev/console in the initramfs to give /init a console
    # before devtmpfs is mounted; cpio of a device node needs root.
    if [[ $(id -u) == 0 ]]; then mknod -m 600 "$stage/dev/console" c 5 1; fi
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
        | gzip -1 >"$initrd.tmp" || die "cpio/gzip of the initramfs failed"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$stage"
    trap - EXIT
    # Old initramfs images for this kernel are stale now.
    for old in "$cache"/initramfs-"$kver"-*.cpio.gz; do
        [[ $old == "$initrd" ]] || rm -f "$old"
    done
fi

echo "KERNEL=$kdir/vmlinuz"
echo "INITRD=$initrd"
echo "KVER=$release"
