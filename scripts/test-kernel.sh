#!/usr/bin/env bash
# Runs the integration suites inside a QEMU guest booted from Debian's kernel, which has the
# wireguard module this host lacks. Backend "kernel" runs every suite (plugin, gateway,
# hardening, bad input, security, the kill -9 part of abuse at a tenth of its rounds (TCG is
# slow), nine cross-node tests of multinode with etcd inside the guest, and flows: NFLOG and
# ctnetlink on Debian's kernel); backend "auto" (which must pick the kernel there) runs four
# tests of plugin and gateway.
# The same test executables as on the host; only WG_CNI_TEST_BACKEND differs. Tests of the
# userspace backend only (tests/backend-only.txt) are skipped, and say so. Every run is counted:
# the tests a run should pass are listed here (`--list`, same arguments) before the guest boots,
# a run that selects none fails at once, and the guest fails a run that passed any other number
# (a renamed test must not turn into a run of 0 tests that passes). Fails unless the guest
# reports success.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Build the plugin and the integration test executables; ask cargo where they are.
cargo build --quiet
# WG_CNI_VM_SUITES="a b" runs only those suites (while working on them); WG_CNI_VM_DRY_RUN=1
# below shows what the guest would run.
read -r -a names <<<"${WG_CNI_VM_SUITES:-plugin gateway hardening bad_input security abuse multinode flows}"
args=()
for name in "${names[@]}"; do args+=(--test "$name"); done
mapfile -t suites < <(cargo test "${args[@]}" --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .executable != null and (.target.kind | index("test"))) | .executable')
((${#suites[@]} == ${#names[@]})) || { echo "could not build the integration tests" >&2; exit 1; }
host_path() { # the host path of suite NAME's executable
  for exe in "${suites[@]}"; do
    [[ $(basename "$exe") == "$1"-* ]] && { echo "$exe"; return; }
  done
}
guest_path() { # the guest path of suite NAME's executable
  echo "/opt/wgcni/bin/$(basename "$(host_path "$1")")"
}
# Where cargo put the plugin (CARGO_TARGET_DIR or ./target).
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/x86_64-unknown-linux-gnu/debug

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
for exe in "$target_dir"/wg-cni "$target_dir"/wg-cni-agent "${suites[@]}"; do
  strip --strip-debug -o "$bins/$(basename "$exe")" "$exe"
done
export VM_MEMORY=${VM_MEMORY:-1536}
export VM_BINARIES="$(echo "$bins"/*) /usr/bin/tcpdump /usr/bin/ping /usr/bin/etcd /usr/bin/etcdctl /usr/sbin/xtables-nft-multi $(echo "$stage"/*.so)"
# xt_NFLOG (nft_log: iptables-nft turns -j NFLOG into an nft log expression), nfnetlink_log,
# xt_hashlimit: the relay watch of on-demand gateways (nat.rs);
# nf_conntrack_netlink: conntrack::forget_pair (tests/flows.rs).
export VM_EXTRA_MODULES="bridge nf_tables nft_compat nft_chain_nat nf_nat nf_conntrack xt_comment xt_conntrack xt_MASQUERADE xt_nat xt_tcpudp xt_NFLOG nft_log nfnetlink_log xt_hashlimit nf_conntrack_netlink"
export VM_ENV="WG_CNI_BIN=/opt/wgcni/bin/wg-cni CNI_PLUGIN_DIR=/usr/lib/cni RUST_BACKTRACE=1"

# counted_run BACKEND SUITE [ENV=VALUE...] [-- TEST...]: one guest run of SUITE's executable
# with WG_CNI_TEST_BACKEND=BACKEND, limited to the TESTs (exact names) if any, skipping the
# tests of the other backend. Appends to `runs` the guest command that fails unless exactly the
# tests listed here passed.
runs=""
counted_run() {
  local backend=$1 suite=$2 exe env=() tests=() skips=() test listed ignored
  shift 2
  while (($#)) && [[ $1 != -- ]]; do env+=("$1"); shift; done
  (($#)) && shift
  tests=("$@")
  exe=$(host_path "$suite")
  local effective=$backend
  [[ $backend == auto ]] && effective=kernel # the guest has the module
  local skip_words
  skip_words=$(scripts/backend-skips.sh "$effective" "$suite")
  [[ -z $skip_words ]] || mapfile -t skips <<<"$skip_words"
  for test in "${tests[@]}"; do
    listed=$("$exe" --list --exact "$test" | grep -c ': test$' || true)
    ((listed == 1)) || { echo "$suite has no test named $test (renamed?)" >&2; exit 1; }
  done
  local args=(--test-threads=1 --exact "${tests[@]}" "${skips[@]}")
  listed=$("$exe" --list "${args[@]}" | grep -c ': test$' || true)
  ignored=$("$exe" --list --ignored "${args[@]}" | grep -c ': test$' || true)
  local want=$((listed - ignored))
  ((want >= 1)) || { echo "$suite: no test to run with backend $backend" >&2; exit 1; }
  echo "guest run: $suite, backend $backend, $want tests" >&2
  runs+="counted $want $suite-$backend env WG_CNI_TEST_BACKEND=$backend ${env[*]} $(guest_path "$suite") ${args[*]}; "
}
for name in "${names[@]}"; do
  case $name in
    abuse) counted_run kernel abuse WG_CNI_ABUSE_SCALE=0.1 -- adds_killed_at_random_moments_leave_nothing_after_del ;;
    # Cross-node tests that need no python (for TCP servers) nor conntrack, absent here.
    multinode) counted_run kernel multinode -- pods_on_three_nodes_talk_and_follow_adds_and_dels \
      killing_an_agent_does_not_cut_its_pods_off pods_without_a_host_gateway_reach_pods_on_other_nodes \
      the_agents_memory_holds_no_pod_private_key_after_10_resyncs_and_scrapes \
      on_demand_pods_talk_through_the_gateway_relay \
      on_demand_pairs_go_direct_when_traffic_flows_and_back_when_idle \
      a_rotation_in_mesh_mode_keeps_traffic_flowing \
      a_rotation_of_a_direct_on_demand_pair_keeps_traffic_flowing \
      a_rotation_killed_anywhere_leaves_the_pod_reachable_or_cleanly_deletable ;;
    # Not in the default list (WG_CNI_VM_SUITES=flood): the handshake floods scaled down,
    # figures only, printed (libtest's RUST_TEST_NOCAPTURE): the figures are the point.
    flood) counted_run kernel flood RUST_TEST_NOCAPTURE=1 -- handshake_floods_with_a_valid_mac1 ;;
    *) counted_run kernel "$name" WG_CNI_ABUSE_SCALE=0.1 ;;
  esac
done
# "auto" must pick the kernel here: a few tests show it does and that its links work (with
# the kernel picked, everything else is what the kernel runs above showed).
[[ " ${names[*]} " == *" plugin "* ]] && counted_run auto plugin -- \
  two_pods_talk_over_the_tunnel_and_del_removes_everything mesh_follows_adds_and_dels \
  a_failure_after_the_link_exists_rolls_everything_back
[[ " ${names[*]} " == *" gateway "* ]] && counted_run auto gateway -- \
  the_host_reaches_pods_and_a_service_dnat_hairpins_between_pods
# WG_CNI_VM_DRY_RUN=1: show the counted runs and stop before the guest boots.
[[ ${WG_CNI_VM_DRY_RUN:-0} == 1 ]] && { tr ';' '\n' <<<"$runs"; exit 0; }
scripts/kernel-vm/run-tests.sh --timeout "${VM_TIMEOUT:-1500}" -- /bin/sh -c "
  set -e
  mkdir -p $xtables_dir
  cp /opt/wgcni/bin/lib*.so $xtables_dir/ 2>/dev/null || true
  for tool in iptables ip6tables iptables-save iptables-restore ip6tables-save ip6tables-restore; do ln -sf /opt/wgcni/bin/xtables-nft-multi /usr/sbin/\$tool; done
  for tool in tcpdump etcd etcdctl; do ln -sf /opt/wgcni/bin/\$tool /usr/sbin/\$tool; done
  for dir in /bin /usr/bin /sbin /usr/sbin; do [ -e \$dir/ping ] && ln -sf /opt/wgcni/bin/ping \$dir/ping; done; true
  # counted WANT LABEL CMD...: CMD (a test executable) must exit 0 having passed WANT tests.
  counted() {
    want=\$1; label=\$2; shift 2
    echo \"== \$label: \$*\"
    rm -f /tmp/counted.rc
    { rc=0; \"\$@\" 2>&1 || rc=\$?; echo \$rc >/tmp/counted.rc; } | tee /tmp/counted.out
    rc=\$(cat /tmp/counted.rc 2>/dev/null || echo lost)
    passed=\$(sed -n 's/^test result: [A-Za-z]*\\. \\([0-9]*\\) passed;.*/\\1/p' /tmp/counted.out | head -n 1)
    if [ \"\$rc\" != 0 ]; then
      echo \"FAILED: \$label (exit \$rc)\"; failed=\"\$failed \$label\"
    elif [ \"\${passed:-0}\" != \"\$want\" ]; then
      echo \"FAILED: \$label passed \${passed:-0} tests, expected \$want\"; failed=\"\$failed \$label\"
    else
      echo \"counted: \$label passed \$passed of \$want tests\"
    fi
  }
  failed=''
  $runs
  [ -z \"\$failed\" ] || { echo \"failed runs:\$failed\"; exit 1; }
  echo 'all guest runs passed their counted tests'"
