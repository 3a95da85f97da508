#!/usr/bin/env bash
# run-tests.sh — run test executables inside a QEMU guest booted from Debian's
# linux-image-amd64 kernel (which ships wireguard.ko, unlike the host kernel).
#
# Usage:
#   scripts/kernel-vm/run-tests.sh [--timeout SECONDS] [--kvm] -- CMD...
#
#   The guest runs CMD... (cwd /, stdin /dev/null) once its /init has mounted
#   the usual file systems and loaded the kernel modules, prints one result line
#       WGCNI-VM-RESULT: exit=N run=<per-run token>
#   and powers off.  This script streams the guest console to stdout, waits for
#   that line and exits with N.
#
# Options:
#   --timeout SECONDS  kill QEMU after this many seconds, counted from QEMU's
#                      start (default 900).  A timeout is a failure (exit 124).
#   --kvm              use KVM (-accel kvm -cpu host) instead of TCG
#                      (-accel tcg -cpu max).  Only for hosts with real VT-x/SVM:
#                      a nested /dev/kvm may be unable to run Debian's kernel.
#
# Environment:
#   VM_BINARIES    space-separated host paths of executables, copied into the
#                  guest as /opt/wgcni/bin/<basename>; ELF binaries get every
#                  shared library ldd reports (plus the loader and libgcc_s).
#   VM_ENV         space-separated NAME=VALUE pairs exported in the guest
#                  before CMD runs (values cannot contain spaces).
#   VM_CACHE_DIR   cache for the extracted vmlinux and modules, keyed by kernel
#                  version (default /var/cache/wg-cni-vm).
#   VM_EXTRA_MODULES  more kernel module names to load at boot (deps-first).
#   VM_MEMORY      guest memory in MiB (default 1024).
#   VM_SMP         guest CPUs (default 2).
#   VM_KERNEL_VERSION  kernel to use, e.g. 6.1.0-56-amd64 (default: the one
#                  linux-image-amd64 depends on, else the newest *-amd64).
#   VM_KERNEL_ARGS extra kernel command line (e.g. "loglevel=7" to see boot).
#   VM_INITRD_COMPRESS=gzip  gzip the initramfs (default none: the guest
#                  unpacks a plain cpio faster than it inflates one under TCG).
#   VM_KEEP_TMP=1  keep the temporary build directory (initramfs, console log).
#
# Exit status: CMD's exit status; 124 on timeout; 125 when the guest stopped
# without a result line or the harness could not set it up (the guest prints
# "WGCNI-VM-SETUP-FAILED ..." if e.g. a module fails to load); 2 on usage errors.
# The last lines on stderr give the boot time (QEMU start -> guest starts CMD),
# CMD's run time, and the QEMU and script totals.
#
# Guest contents: busybox-static applets (without busybox's `ip` applets, so
# `ip` on PATH is the real /usr/sbin/ip), /bin/sh = dash (busybox ash would
# still run its own `ip` applet; `ash` remains), /usr/sbin/ip, /usr/bin/wg,
# /usr/lib/cni/{host-local,ptp}, wireguard/tun/veth modules with their
# dependencies, /proc /sys /dev(devtmpfs) /run(tmpfs, /var/run -> /run)
# /tmp(tmpfs), writable /var/lib/cni, minimal /etc/passwd, lo up. No NIC.
set -euo pipefail

readonly PROG=wg-cni-vm
readonly SCRIPT_START_US=${EPOCHREALTIME/./}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { local rc=$1; shift; log "ERROR: $*"; exit "$rc"; }

usage() {
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2
}

# Microseconds (from ${EPOCHREALTIME/./}) -> "S.s" seconds.
fmt_us() { local us=$1; printf '%d.%01d' $((us / 1000000)) $((us % 1000000 / 100000)); }

# Quote a string for a POSIX shell (busybox ash): 'it'\''s'.
shquote() { local s=${1//\'/\'\\\'\'}; printf "'%s'" "$s"; }

# ------------------------------------------------------------------ arguments
TIMEOUT=900
USE_KVM=0
while (($#)); do
    case $1 in
        --timeout)
            (($# >= 2)) || die 2 "--timeout needs a value"
            TIMEOUT=$2; shift 2 ;;
        --timeout=*) TIMEOUT=${1#*=}; shift ;;
        --kvm) USE_KVM=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) usage; die 2 "unknown option: $1" ;;
        *) break ;;                       # first word of CMD (no "--" given)
    esac
done
if ! [[ $TIMEOUT =~ ^[0-9]+$ ]] || ((TIMEOUT == 0)); then
    die 2 "--timeout must be a positive integer, got '$TIMEOUT'"
fi
(($#)) || { usage; die 2 "no command given (… -- CMD...)"; }

MEMORY=${VM_MEMORY:-1024}
SMP=${VM_SMP:-2}
CACHE_DIR=${VM_CACHE_DIR:-/var/cache/wg-cni-vm}

# ------------------------------------------------------------------ cleanup
TMP=""
QEMU_PID=""
TAIL_PID=""
# shellcheck disable=SC2317  # invoked through trap
cleanup() {
    local rc=$?
    # Kill QEMU (and the console follower) by pid if they are still running.
    if [[ -n $QEMU_PID ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        sleep 0.5
        kill -KILL "$QEMU_PID" 2>/dev/null || true
    fi
    if [[ -n $TAIL_PID ]] && kill -0 "$TAIL_PID" 2>/dev/null; then
        kill "$TAIL_PID" 2>/dev/null || true
    fi
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ ${VM_KEEP_TMP:-0} == 1 ]]; then
            log "kept temporary directory $TMP"
        else
            rm -rf -- "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# ------------------------------------------------------------------ packages
# Debian packages the harness needs.  xz-utils/zstd decompress the kernel.
PACKAGES=(qemu-system-x86 linux-image-amd64 busybox-static wireguard-tools cpio
          containernetworking-plugins iproute2 xz-utils zstd)

pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

ensure_packages() {
    command -v dpkg-query >/dev/null || { log "no dpkg: assuming the tools are present"; return 0; }
    local missing=() p
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    ((${#missing[@]})) || return 0
    (($(id -u) == 0)) || die 125 "missing packages (${missing[*]}) and not root: install them with apt-get"
    log "installing ${missing[*]}"
    # Wait for a concurrent apt/dpkg instead of failing on its lock.
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=900 install "${missing[@]}")
    if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2; then
        log "install failed; running apt-get update and retrying"
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 update >&2
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" >&2 || die 125 "apt-get install ${missing[*]} failed"
    fi
}

# ------------------------------------------------------------------ kernel
pick_kernel_version() {
    if [[ -n ${VM_KERNEL_VERSION:-} ]]; then echo "$VM_KERNEL_VERSION"; return; fi
    local dep
    # linux-image-amd64 depends on exactly one linux-image-<ver>-amd64.
    dep=$(dpkg-query -W -f='${Depends}' linux-image-amd64 2>/dev/null || true)
    if [[ $dep =~ linux-image-([0-9][^ ,]*-amd64) ]] && [[ -f /boot/vmlinuz-${BASH_REMATCH[1]} ]]; then
        echo "${BASH_REMATCH[1]}"; return
    fi
    local v
    v=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' -printf '%f\n' 2>/dev/null \
        | sed 's/^vmlinuz-//' | sort -V | tail -n 1)
    [[ -n $v ]] || die 125 "no /boot/vmlinuz-*-amd64 found (is linux-image-amd64 installed?)"
    echo "$v"
}

is_elf() { [[ -s $1 && $(head -c 4 "$1" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; }

# Extract the uncompressed ELF vmlinux from a bzImage: find the payload's
# compression magic and decompress from there (like the kernel's
# scripts/extract-vmlinux).  QEMU boots the ELF through its PVH entry point,
# which is about twice as fast under TCG as letting the guest decompress.
extract_vmlinux() {
    local in=$1 out=$2 spec tool magic off
    for spec in 'xz|\xFD7zXZ\x00' 'zstd|\x28\xB5\x2F\xFD' 'gzip|\x1F\x8B\x08'; do
        tool=${spec%%|*}; magic=${spec#*|}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$in" | cut -d: -f1 | head -n 8); do
            case $tool in
                xz)   tail -c +$((off + 1)) "$in" | xz -dc --single-stream >"$out" 2>/dev/null || true ;;
                zstd) tail -c +$((off + 1)) "$in" | zstd -dcq >"$out" 2>/dev/null || true ;;
                gzip) tail -c +$((off + 1)) "$in" | gzip -dc >"$out" 2>/dev/null || true ;;
            esac
            is_elf "$out" && return 0
        done
    done
    rm -f "$out"
    return 1
}

# Decompress a module file (.ko, .ko.xz, .ko.zst, .ko.gz) to a plain .ko
# (busybox insmod does not take compressed modules).
copy_module() {
    local src=$1 dst=$2
    mkdir -p "$(dirname "$dst")"
    case $src in
        *.ko.xz)  xz -dc "$src" >"$dst.tmp" ;;
        *.ko.zst) zstd -dcq "$src" >"$dst.tmp" ;;
        *.ko.gz)  gzip -dc "$src" >"$dst.tmp" ;;
        *)        cp "$src" "$dst.tmp" ;;
    esac
    mv -f "$dst.tmp" "$dst"
}

# Resolve the requested modules (and their dependencies) from modules.dep in
# load order, deps first; "pre:"/"post:" soft dependencies from
# modules.softdep are loaded before/after their module (the guest has no
# modprobe set-up, so the kernel cannot pull them in on demand).  Sets
# MODULE_ORDER (paths relative to /lib/modules/KVER, as in modules.dep).
declare -A MOD_DEPS=() MOD_PATH=() MOD_SEEN=() SOFT_PRE=() SOFT_POST=()
MODULE_ORDER=()
MODS_KDIR=""

# Module name or alias (e.g. "crc32c") -> modules.dep path; empty when it is
# built in or unknown.  Among several alias providers prefer a *_generic one,
# which loads on any CPU.
module_path_for() {
    local name=${1//-/_} cands c
    if [[ -n ${MOD_PATH[$name]:-} ]]; then echo "${MOD_PATH[$name]}"; return; fi
    mapfile -t cands < <(awk -v a="$1" '$1 == "alias" && $2 == a { print $3 }' "$MODS_KDIR/modules.alias" 2>/dev/null)
    for c in "${cands[@]}"; do
        [[ $c == *_generic && -n ${MOD_PATH[${c//-/_}]:-} ]] && { echo "${MOD_PATH[${c//-/_}]}"; return; }
    done
    for c in "${cands[@]}"; do
        [[ -n ${MOD_PATH[${c//-/_}]:-} ]] && { echo "${MOD_PATH[${c//-/_}]}"; return; }
    done
    return 0
}
visit_module() {
    local m=$1 d p name deps soft
    [[ -n ${MOD_SEEN[$m]:-} ]] && return 0
    MOD_SEEN[$m]=1
    name=${m##*/}; name=${name%%.ko*}; name=${name//-/_}
    read -r -a soft <<<"${SOFT_PRE[$name]:-}"
    for d in "${soft[@]}"; do p=$(module_path_for "$d"); [[ -z $p ]] || visit_module "$p"; done
    read -r -a deps <<<"${MOD_DEPS[$m]}"
    for d in "${deps[@]}"; do visit_module "$d"; done
    MODULE_ORDER+=("$m")
    read -r -a soft <<<"${SOFT_POST[$name]:-}"
    for d in "${soft[@]}"; do p=$(module_path_for "$d"); [[ -z $p ]] || visit_module "$p"; done
}
resolve_modules() {
    MODS_KDIR=$1; shift
    local line mod deps b name rest words w mode
    while IFS= read -r line; do
        mod=${line%%:*}; deps=${line#*:}
        MOD_DEPS[$mod]=$deps
        b=${mod##*/}; b=${b%%.ko*}; MOD_PATH[${b//-/_}]=$mod
    done <"$MODS_KDIR/modules.dep"
    # "softdep MOD pre: A B post: C"
    while read -r -a words; do
        [[ ${words[0]:-} == softdep && ${#words[@]} -ge 3 ]] || continue
        name=${words[1]//-/_}; mode=""; rest=("${words[@]:2}")
        for w in "${rest[@]}"; do
            case $w in
                pre:) mode=pre ;; post:) mode=post ;;
                *) if [[ $mode == pre ]]; then SOFT_PRE[$name]+=" $w"
                   elif [[ $mode == post ]]; then SOFT_POST[$name]+=" $w"; fi ;;
            esac
        done
    done < <(cat "$MODS_KDIR/modules.softdep" 2>/dev/null || true)
    for name in "$@"; do
        name=${name//-/_}
        if [[ -n ${MOD_PATH[$name]:-} ]]; then
            visit_module "${MOD_PATH[$name]}"
        elif grep -qE "/${name//_/[-_]}\.ko\$" "$MODS_KDIR/modules.builtin" 2>/dev/null; then
            log "module $name is built into the kernel"
        else
            die 125 "kernel module '$name' not found in $MODS_KDIR/modules.dep"
        fi
    done
}

# ------------------------------------------------------------------ initramfs helpers
# Copy an executable into the guest root at DEST, plus the shared libraries
# ldd reports (at the same paths, which the guest's merged-/usr layout mirrors).
copy_with_libs() {
    local src=$1 dest=$2 lib
    mkdir -p "$ROOT$(dirname "$dest")"
    rm -f "$ROOT$dest"
    cp -L "$src" "$ROOT$dest"
    chmod 0755 "$ROOT$dest"
    is_elf "$src" || return 0                     # scripts: nothing to resolve
    # ldd lines: "libx.so.1 => /path/libx.so.1 (0x...)" or "/lib64/ld-linux... (0x...)".
    while IFS= read -r lib; do
        [[ -e $ROOT$lib ]] && continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done < <(ldd "$src" 2>/dev/null | grep -oE '(^|[[:space:]])/[^[:space:]]+' | tr -d '[:blank:]' | sort -u || true)
    if ldd "$src" 2>/dev/null | grep -q 'not found'; then
        die 125 "$src: ldd reports missing libraries: $(ldd "$src" | grep 'not found' | tr -s '\t\n' '  ')"
    fi
}

# ================================================================== main
ensure_packages

KVER=$(pick_kernel_version)
KDIR=/lib/modules/$KVER
VMLINUZ=/boot/vmlinuz-$KVER
[[ -f $VMLINUZ ]] || die 125 "$VMLINUZ not found"
[[ -f $KDIR/modules.dep ]] || die 125 "$KDIR/modules.dep not found"

# Cache key: kernel ABI version plus package version (Debian sometimes rebuilds
# the same ABI), so a kernel upgrade never reuses a stale vmlinux.
PKGVER=$(dpkg-query -W -f='${Version}' "linux-image-$KVER" 2>/dev/null || stat -c %Y "$VMLINUZ")
KEY="$KVER"_"$PKGVER"
KEY=${KEY//[^A-Za-z0-9._+-]/_}
if ! mkdir -p "$CACHE_DIR" 2>/dev/null || [[ ! -w $CACHE_DIR ]]; then
    CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/wg-cni-vm
    mkdir -p "$CACHE_DIR"
fi
KCACHE=$CACHE_DIR/$KEY
mkdir -p "$KCACHE/modules"

read -r -a EXTRA_MODULES <<<"${VM_EXTRA_MODULES:-}"
resolve_modules "$KDIR" wireguard tun veth "${EXTRA_MODULES[@]}"

# Populate the cache under a lock so that concurrent runs do not race.
exec {LOCK_FD}>"$KCACHE.lock"
flock "$LOCK_FD"
if [[ ! -f $KCACHE/vmlinux ]]; then
    log "extracting vmlinux from $VMLINUZ into $KCACHE"
    extract_vmlinux "$VMLINUZ" "$KCACHE/vmlinux.tmp" || die 125 "could not extract an ELF vmlinux from $VMLINUZ"
    mv -f "$KCACHE/vmlinux.tmp" "$KCACHE/vmlinux"
fi
LOAD_ORDER=()
for mod in "${MODULE_ORDER[@]}"; do
    plain=${mod%.xz}; plain=${plain%.zst}; plain=${plain%.gz}
    [[ -f $KCACHE/modules/$plain ]] || copy_module "$KDIR/$mod" "$KCACHE/modules/$plain"
    LOAD_ORDER+=("$plain")
done
flock -u "$LOCK_FD"

# ------------------------------------------------------------------ build initramfs
TMP=$(mktemp -d "${TMPDIR:-/tmp}/wg-cni-vm.XXXXXX")
ROOT=$TMP/root
RUN_TOKEN=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
BUILD_START_US=${EPOCHREALTIME/./}

# Merged-/usr layout like Debian 12, so library paths from ldd work as-is.
mkdir -p "$ROOT"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/lib/cni,opt/wgcni/bin} \
         "$ROOT"/{dev,proc,sys,run,tmp,root,etc/wgcni,var/lib/cni,var/log,mnt}
ln -s usr/bin "$ROOT/bin"; ln -s usr/sbin "$ROOT/sbin"
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"; chmod 0700 "$ROOT/root"

# busybox applets as symlinks; leave out busybox's ip applets so that `ip` on
# PATH is the real iproute2 (busybox's applet knows neither netns nor wireguard).
BUSYBOX=$(command -v busybox || echo /bin/busybox)
is_elf "$BUSYBOX" || die 125 "busybox not found"
cp "$BUSYBOX" "$ROOT/usr/bin/busybox"
while IFS= read -r applet; do
    case ${applet##*/} in
        busybox|ip|ipaddr|iplink|ipneigh|iproute|iprule|iptunnel) continue ;;
    esac
    [[ -e $ROOT/$applet || -L $ROOT/$applet ]] || ln -s /usr/bin/busybox "$ROOT/$applet"
done < <("$BUSYBOX" --list-full)

# /bin/sh is dash when the host has it (Debian always does): busybox ash runs
# its own applets before PATH (even for `ip`, with no symlink), so scripts that
# call plain `ip` would get busybox's netns/wireguard-less applet.  busybox's
# shell stays available as `ash`.
if is_elf /usr/bin/dash; then
    copy_with_libs /usr/bin/dash /usr/bin/dash
    ln -sf dash "$ROOT/usr/bin/sh"
fi

# Real tools (with their libraries).
copy_with_libs /usr/sbin/ip /usr/sbin/ip
copy_with_libs /usr/bin/wg /usr/bin/wg
for plugin in host-local ptp; do
    [[ -x /usr/lib/cni/$plugin ]] || die 125 "/usr/lib/cni/$plugin missing (containernetworking-plugins)"
    copy_with_libs "/usr/lib/cni/$plugin" "/usr/lib/cni/$plugin"
done

# Test executables.
declare -A SEEN_BASENAMES=()
read -r -a BINARIES <<<"${VM_BINARIES:-}"
for bin in "${BINARIES[@]}"; do
    [[ -f $bin && -x $bin ]] || die 2 "VM_BINARIES: '$bin' is not an executable file"
    base=${bin##*/}
    [[ -z ${SEEN_BASENAMES[$base]:-} ]] || die 2 "VM_BINARIES: two files named '$base'"
    SEEN_BASENAMES[$base]=1
    copy_with_libs "$bin" "/opt/wgcni/bin/$base"
done
# glibc dlopens libgcc_s for unwinding/pthread_cancel even when not linked.
for d in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu; do
    if [[ -f $d/libgcc_s.so.1 && ! -e $ROOT$d/libgcc_s.so.1 ]]; then
        mkdir -p "$ROOT$d"; cp -L "$d/libgcc_s.so.1" "$ROOT$d/"; break
    fi
done

# Modules.
for mod in "${LOAD_ORDER[@]}"; do
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$mod")"
    cp "$KCACHE/modules/$mod" "$ROOT/lib/modules/$KVER/$mod"
done
printf '%s\n' "${LOAD_ORDER[@]}" >"$ROOT/etc/wgcni/modules"

# Minimal /etc.
cat >"$ROOT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$ROOT/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$ROOT/etc/nsswitch.conf"
echo wgcni-vm >"$ROOT/etc/hostname"
: >"$ROOT/etc/resolv.conf"

# Environment for CMD: defaults first, then VM_ENV (which may override them).
{
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "export HOME=/root TERM=dumb WG_COLOR_MODE=never RUST_BACKTRACE=1"
    read -r -a ENV_PAIRS <<<"${VM_ENV:-}"
    for pair in "${ENV_PAIRS[@]}"; do
        name=${pair%%=*}
        [[ $pair == *=* && $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die 2 "VM_ENV: bad entry '$pair' (want NAME=VALUE)"
        echo "export $name=$(shquote "${pair#*=}")"
    done
} >"$ROOT/etc/wgcni/env"

# The command, as a quoted `set --` line.
{
    printf 'set --'
    for arg in "$@"; do printf ' %s' "$(shquote "$arg")"; done
    printf '\n'
} >"$ROOT/etc/wgcni/cmd"

# /init: runs as pid 1 under busybox ash.
cat >"$ROOT/init" <<EOF
#!/bin/sh
# Generated by scripts/kernel-vm/run-tests.sh for one run.
RUN=$RUN_TOKEN
KVER=$KVER
EOF
cat >>"$ROOT/init" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
setup_failed() {
    printf '\nWGCNI-VM-SETUP-FAILED run=%s: %s\n' "$RUN" "$*"
    poweroff -f; sleep 5; echo o >/proc/sysrq-trigger
}

mount -t proc -o nosuid,nodev,noexec proc /proc || setup_failed "mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || setup_failed "mount /sys"
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev || setup_failed "mount /dev"
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || setup_failed "mount /run"
mkdir -p /run/netns /run/lock
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp || setup_failed "mount /tmp"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname wgcni-vm

# Kernel modules, dependencies first (order computed from modules.dep).
while read -r mod; do
    name=${mod##*/}; name=${name%.ko}; name=$(echo "$name" | tr - _)
    grep -q "^$name " /proc/modules && continue
    insmod "/lib/modules/$KVER/$mod" || setup_failed "insmod $mod"
done </etc/wgcni/modules

/usr/sbin/ip link set lo up || setup_failed "ip link set lo up"

. /etc/wgcni/env
. /etc/wgcni/cmd
read -r up _ </proc/uptime
printf 'WGCNI-VM-START run=%s uptime=%s\n' "$RUN" "$up"
cd /
"$@" </dev/null
rc=$?
printf '\nWGCNI-VM-RESULT: exit=%d run=%s\n' "$rc" "$RUN"
sync
poweroff -f
sleep 5
echo o >/proc/sysrq-trigger
EOF
chmod 0755 "$ROOT/init"

# Pack.  The kernel unpacks an uncompressed cpio fastest under TCG (no
# decompression in the emulated CPU); gzip is available for huge payloads.
INITRD=$TMP/initramfs.cpio
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$INITRD"
if [[ ${VM_INITRD_COMPRESS:-none} == gzip ]]; then
    gzip -1 "$INITRD"; INITRD=$INITRD.gz
fi
BUILD_US=$((${EPOCHREALTIME/./} - BUILD_START_US))
log "kernel $KVER, initramfs $(( $(stat -c %s "$INITRD") / 1024 )) KiB built in $(fmt_us "$BUILD_US") s, modules: $(printf '%s ' "${LOAD_ORDER[@]##*/}")"

# ------------------------------------------------------------------ run QEMU
if ((USE_KVM)); then
    [[ -w /dev/kvm ]] || die 125 "--kvm given but /dev/kvm is not usable"
    ACCEL=(-accel kvm -cpu host)
else
    ACCEL=(-accel tcg -cpu max)
fi
CONSOLE=$TMP/console.log
: >"$CONSOLE"
QEMU=(qemu-system-x86_64 -M pc "${ACCEL[@]}" -m "$MEMORY" -smp "$SMP"
      -nodefaults -no-reboot -display none -monitor none
      -chardev "file,id=con,path=$CONSOLE" -serial chardev:con
      -kernel "$KCACHE/vmlinux" -initrd "$INITRD"
      -append "console=ttyS0 panic=-1 quiet ${VM_KERNEL_ARGS:-}")

log "starting QEMU ($([[ $USE_KVM == 1 ]] && echo KVM || echo TCG), ${MEMORY} MiB, ${SMP} CPU, timeout ${TIMEOUT} s): $*"
QEMU_START_US=${EPOCHREALTIME/./}
QEMU_ERR=$TMP/qemu.err
"${QEMU[@]}" </dev/null >"$QEMU_ERR" 2>&1 &
QEMU_PID=$!
# Stream the console to our stdout; tail exits by itself once QEMU is gone.
tail -n +1 -s 0.1 -f --pid="$QEMU_PID" "$CONSOLE" &
TAIL_PID=$!

DEADLINE_US=$((QEMU_START_US + TIMEOUT * 1000000))
BOOT_US="" RESULT="" TIMED_OUT=0 KVM_FAILED=0
while :; do
    now=${EPOCHREALTIME/./}
    if [[ -z $BOOT_US ]] && grep -aq "WGCNI-VM-START run=$RUN_TOKEN" "$CONSOLE"; then
        BOOT_US=$((now - QEMU_START_US))
    fi
    if line=$(grep -m1 -aoE "WGCNI-VM-RESULT: exit=[0-9]+ run=$RUN_TOKEN" "$CONSOLE"); then
        RESULT=${line#*exit=}; RESULT=${RESULT%% *}
        CMD_END_US=$now
        break
    fi
    kill -0 "$QEMU_PID" 2>/dev/null || break
    if ((now >= DEADLINE_US)); then TIMED_OUT=1; break; fi
    # On a KVM emulation failure QEMU pauses the guest instead of exiting.
    if grep -q 'KVM internal error' "$QEMU_ERR"; then KVM_FAILED=1; break; fi
    sleep 0.1
done

if ((TIMED_OUT || KVM_FAILED)); then
    kill -TERM "$QEMU_PID" 2>/dev/null || true
    sleep 1
    kill -KILL "$QEMU_PID" 2>/dev/null || true
else
    # The guest powers off right after the result line; give it a moment.
    for _ in $(seq 100); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$QEMU_PID" 2>/dev/null; then
        log "warning: guest did not power off after its result; killing QEMU"
        kill -KILL "$QEMU_PID" 2>/dev/null || true
    fi
fi
QEMU_RC=0
wait "$QEMU_PID" 2>/dev/null || QEMU_RC=$?
QEMU_PID=""
wait "$TAIL_PID" 2>/dev/null || true      # flush the rest of the console
TAIL_PID=""
END_US=${EPOCHREALTIME/./}
# QEMU's own messages (errors, register dumps), after the console output.
if [[ -s $QEMU_ERR ]]; then
    log "QEMU said:"
    sed 's/^/    /' "$QEMU_ERR" >&2
fi

TIMES="boot $( [[ -n $BOOT_US ]] && echo "$(fmt_us "$BOOT_US") s" || echo "n/a") (QEMU start -> guest starts CMD)"
if [[ -n $BOOT_US && -n $RESULT ]]; then
    TIMES+=", CMD $(fmt_us $((CMD_END_US - QEMU_START_US - BOOT_US))) s"
fi
TIMES+=", QEMU total $(fmt_us $((END_US - QEMU_START_US))) s, script total $(fmt_us $((END_US - SCRIPT_START_US))) s"

echo >&2
if ((TIMED_OUT)); then
    log "$TIMES"
    die 124 "TIMEOUT: the guest reported no result within ${TIMEOUT} s; QEMU killed. Command: $*"
fi
if ((KVM_FAILED)); then
    log "$TIMES"
    die 125 "KVM could not run the guest (see above); run without --kvm to use TCG"
fi
if [[ -z $RESULT ]]; then
    log "$TIMES"
    reason=$(grep -aoE "WGCNI-VM-SETUP-FAILED run=$RUN_TOKEN: .*" "$CONSOLE" | head -n 1 | tr -d '\r' || true)
    [[ -n $reason ]] && die 125 "guest setup failed: ${reason#*: }"
    die 125 "QEMU exited (status $QEMU_RC) without a result line from the guest (kernel panic or init failure?)"
fi
log "$TIMES"
log "guest command exited with status $RESULT"
exit "$RESULT"
