#!/usr/bin/env bash
# `make image`: builds the wg-cni container image offline (no registry pull) and writes it to
# target/image/wg-cni.tar (OCI layout + docker-archive), tagged localhost/wg-cni:<crate version>.
#
# The image is one layer, FROM nothing:
#   /usr/local/bin/wg-cni, wg-cni-agent, wg-cni-wgd   our static release binaries
#   iptables (legacy + nft) and its libraries          Debian 12 packages: the agent runs
#                                                      iptables-save/-restore and ip6tables-*
#   /usr/sbin/iptables-wrapper                         picks the host's backend (legacy or nft)
#   busybox (static)                                   /bin/sh for the wrapper, sleep, a shell
# The Debian packages are unpacked by mmdebstrap (--variant=extract: files only, no maintainer
# scripts, no apt or dpkg in the image) and kept in target/image/base/ (delete it to pick up
# Debian updates). The agent execs nothing else: conntrack entries go over netlink, and the
# plugin's IPAM (host-local) runs on the host, not here.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PATH="$HOME/.cargo/bin:$PATH"

here=deploy/kubernetes/image
out=target/image
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
name=localhost/wg-cni:$version
packages=(iptables netbase busybox-static)
suite=bookworm
mirrors=(
  "deb http://deb.debian.org/debian $suite main"
  "deb http://deb.debian.org/debian $suite-updates main"
  "deb http://deb.debian.org/debian-security $suite-security main"
)

scripts/apt-install.sh mmdebstrap binutils python3

# 1. The binaries, static: nothing in the image has to match a shared library of theirs.
cargo build --release --quiet
(cd wgd && cargo build --release --locked --quiet)
bins=(target/x86_64-unknown-linux-gnu/release/wg-cni
  target/x86_64-unknown-linux-gnu/release/wg-cni-agent
  wgd/target/x86_64-unknown-linux-gnu/release/wg-cni-wgd)
for bin in "${bins[@]}"; do
  if ldd "$bin" >/dev/null 2>&1; then
    echo "$bin is dynamically linked (ldd: $(ldd "$bin" | head -3 | tr '\n' ' ')); expected static" >&2
    exit 1
  fi
done

# 2. The Debian part, extracted once per package list.
mkdir -p "$out"
stamp="$suite ${packages[*]}"
base=$out/base
if [ "$(cat "$base/.wg-cni-packages" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$base" "$base.tmp"
  mkdir -p "$base.tmp"
  # Documentation is left out except each package's copyright file (their licences).
  mmdebstrap --quiet --variant=extract --include="$(
    IFS=,
    echo "${packages[*]}"
  )" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' --dpkgopt='path-exclude=/usr/share/initramfs-tools/*' \
    "$suite" "$base.tmp/root" "${mirrors[@]}" </dev/null
  echo "$stamp" >"$base.tmp/.wg-cni-packages"
  mv "$base.tmp" "$base" # base/ is complete or absent
fi

# 3. The root file system: the Debian files minus what nothing here uses, plus ours.
rootfs=$out/rootfs
rm -rf "$rootfs"
cp -a "$base/root" "$rootfs"
rm -rf "$rootfs"/usr/lib/x86_64-linux-gnu/gconv "$rootfs"/var/cache/* "$rootfs"/var/lib/apt \
  "$rootfs"/var/lib/dpkg "$rootfs"/var/log/* "$rootfs"/etc/apt "$rootfs"/etc/dpkg \
  "$rootfs"/dev/* "$rootfs"/tmp/* "$rootfs"/usr/share/man
find "$rootfs" -name '*.a' -delete
install -m 0755 "${bins[@]}" -D -t "$rootfs/usr/local/bin"
# Without their symbol tables (-4.7 MB, -1 MB compressed); a panic still prints its message.
strip "$rootfs"/usr/local/bin/*
install -m 0755 "$here/iptables-wrapper" "$rootfs/usr/sbin/iptables-wrapper"
for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sfn iptables-wrapper "$rootfs/usr/sbin/$tool"
done
install -d -m 0755 "$rootfs/var/lib/wg-cni-image" "$rootfs/run" "$rootfs/root" "$rootfs/proc" "$rootfs/sys"
install -d -m 1777 "$rootfs/tmp"
ln -sfn /run "$rootfs/var/run"
ln -sfn busybox "$rootfs/bin/sh"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"
# The agent is static glibc: a host name (an etcd endpoint) is resolved through the NSS modules
# of the image's glibc, which is Debian 12's, as on the build host.
printf 'hosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' >"$rootfs/etc/nsswitch.conf"
install -d "$rootfs/usr/share/doc/wg-cni"
sed -n '/^## Licences/,$p' README.md >"$rootfs/usr/share/doc/wg-cni/LICENCES.md"
printf 'NAME="wg-cni"\nVERSION="%s"\nID=wg-cni\nID_LIKE=debian\nVERSION_CODENAME=%s\n' \
  "$version" "$suite" >"$rootfs/etc/os-release"

# 4. The archive.
python3 "$here/oci-archive.py" "$rootfs" "$out/wg-cni.tar" "$name" "$version" '["wg-cni-agent", "--help"]'
echo "image $name: $out/wg-cni.tar ($(du -h "$out/wg-cni.tar" | cut -f1)); load it with"
echo "  podman load -i $out/wg-cni.tar   or   ctr -n k8s.io images import $out/wg-cni.tar"
