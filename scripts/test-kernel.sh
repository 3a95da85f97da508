#!/usr/bin/env bash
# Runs the integration suites inside a QEMU guest booted from Debian's kernel, which has the
# wireguard module this host lacks. Backend "kernel" runs every suite (plugin, gateway,
# hardening, bad input, security, the kill -9 part of abuse at a tenth of its rounds (TCG is
# slow), and two cross-node tests of multinode with etcd inside the guest); backend "auto"
# (which must pick the kernel there) runs plugin and gateway.
# The same test executables as on the host; only WG_CNI_TEST_BACKEND differs. Fails unless
# the guest reports success.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Build the plugin and the integration test executables; ask cargo where they are.
cargo build --quiet
# WG_CNI_VM_SUITES="a b" runs only those suites (while working on them).
read -r -a names <<<"${WG_CNI_VM_SUITES:-plugin gateway hardening bad_input security abuse multinode}"
args=()
for name in "${names[@]}"; do args+=(--test "$name"); done
mapfile -t suites < <(cargo test "${args[@]}" --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and (.target.kind | index("test"))) | .executable')
((${#suites[@]} == ${#names[@]})) || { echo "could not build the integration tests" >&2; exit 1; }
guest_path() { # the guest path of suite NAME's executable
  for exe in "${suites[@]}"; do
    [[ $(basename "$exe") == "$1"-* ]] && { echo "/opt/wgcni/bin/$(basename "$exe")"; return; }
  done
}

# The node gateway needs iptables (nft flavour) in the guest: the binary, its extensions
# (dlopen'ed from the xtables directory) and the netfilter modules behind them.
# The harness copies executables only: stage the extensions with the execute bit.
xtables_dir=/usr/lib/x86_64-linux-gnu/xtables
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$xtables_dir"/*.so "$stage"/
chmod +x "$stage"/*.so
# Debug builds without their debug info: the initramfs lives in the guest's memory.
bins=$(mktemp -d)
trap 'rm -rf "$stage" "$bins"' EXIT
for exe in target/x86_64-unknown-linux-gnu/debug/wg-cni target/x86_64-unknown-linux-gnu/debug/wg-cni-agent "${suites[@]}"; do
  strip --strip-debug -o "$bins/$(basename "$exe")" "$exe"
done
export VM_MEMORY=${VM_MEMORY:-1536}
export VM_BINARIES="$(echo "$bins"/*) /usr/bin/tcpdump /usr/bin/ping /usr/bin/etcd /usr/bin/etcdctl /usr/sbin/xtables-nft-multi $(echo "$stage"/*.so)"
export VM_EXTRA_MODULES="bridge nf_tables nft_compat nft_chain_nat nf_nat nf_conntrack xt_comment xt_MASQUERADE xt_nat xt_tcpudp"
export VM_ENV="WG_CNI_BIN=/opt/wgcni/bin/wg-cni CNI_PLUGIN_DIR=/usr/lib/cni RUST_BACKTRACE=1"

kernel_runs="" auto_runs=""
for name in "${names[@]}"; do
  filter=""
  [[ $name == abuse ]] && filter="killed"
  # Two of the cross-node tests (the others need python for TCP servers, absent here).
  [[ $name == multinode ]] && filter="pods_on_three_nodes killing_an_agent"
  kernel_runs+="WG_CNI_ABUSE_SCALE=0.1 WG_CNI_TEST_BACKEND=kernel $(guest_path "$name") --test-threads=1 $filter; "
done
for name in plugin gateway; do
  [[ " ${names[*]} " == *" $name "* ]] || continue
  auto_runs+="WG_CNI_TEST_BACKEND=auto $(guest_path "$name") --test-threads=1; "
done
scripts/kernel-vm/run-tests.sh --timeout "${VM_TIMEOUT:-1500}" -- /bin/sh -c "
  set -e
  mkdir -p $xtables_dir
  cp /opt/wgcni/bin/lib*.so $xtables_dir/ 2>/dev/null || true
  for tool in iptables ip6tables iptables-save iptables-restore ip6tables-save ip6tables-restore; do ln -sf /opt/wgcni/bin/xtables-nft-multi /usr/sbin/\$tool; done
  for tool in tcpdump etcd etcdctl; do ln -sf /opt/wgcni/bin/\$tool /usr/sbin/\$tool; done
  for dir in /bin /usr/bin /sbin /usr/sbin; do [ -e \$dir/ping ] && ln -sf /opt/wgcni/bin/ping \$dir/ping; done; true
  echo \"== integration tests in the guest, backend kernel\"
  $kernel_runs
  echo \"== integration tests in the guest, backend auto\"
  $auto_runs"
