#!/usr/bin/env bash
# Client 1: libcni 1.1.2 (Debian's golang-github-appc-cni-dev) through wgc-cnitool, a cnitool
# built from it: conflist loading, ADD of two netns, ping by IP, CHECK with the cached
# prevResult (and a CHECK that must fail), DEL with the cached prevResult, a repeated DEL
# without it, the result cache, and nothing left behind.
# shellcheck disable=SC2317 # cleanup and timed are called indirectly
set -euo pipefail
# shellcheck source=scripts/clients/lib.sh
source "$(dirname "$0")/lib.sh"

net=wgc-libcni
subnet_prefix=10.123.1.
port_range=55000-55099 # host UDP ports of this step
work=$(mktemp -d /tmp/wgc-clients-libcni.XXXXXX)
store=$work/store
ipam_dir=$work/ipam
pods=("wgcl-a-$$" "wgcl-b-$$")
cnitool=$WGC_TOOLS/wgc-cnitool

cleanup() {
  set +e
  local p
  for p in "${pods[@]}"; do
    if [ -e "/var/run/netns/$p" ]; then
      "$cnitool" del "$net" "/var/run/netns/$p" >/dev/null 2>&1
      ip netns del "$p"
    fi
  done
  force_cleanup "$net"
  remove_tree "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

mkdir -p "$work/net.d" "$work/cache"
make_bin_dir
conflist "$work/net.d/10-$net.conflist" "$net" "${subnet_prefix}0/24" "$port_range"
export NETCONFPATH=$work/net.d CNI_PATH=$work/cni-bin CNI_CACHE_DIR=$work/cache CNI_IFNAME=eth0
unset CNI_ARGS CAP_ARGS

tool() { # tool add|check|del POD [CNI_ARGS]
  CNI_ARGS=${3-} "$cnitool" "$1" "$net" "/var/run/netns/$2"
}
cid_of() { # the container ID cnitool derives from the netns path
  printf 'cnitool-%s' "$(printf '%s' "/var/run/netns/$1" | sha512sum | cut -c1-20)"
}
cache_file() { echo "$work/cache/results/$net-$(cid_of "$1")-eth0"; }
record_of() { find "$store/$net" -name "$(cid_of "$1"):eth0.json" | head -1; }
links_in() { ip -n "$1" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort | xargs; }
timed() { # timed LABEL CMD...: run CMD, log its duration
  local t0 rc=0
  t0=$(now_ms)
  "$@" || rc=$?
  log "      $1 $2 ${3-}: $(($(now_ms) - t0)) ms"
  return "$rc"
}

declare -A addr
for p in "${pods[@]}"; do
  ip netns add "$p"
  must "cnitool add $p" timed tool add "$p" \
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=wgc;K8S_POD_NAME=$p" >"$work/$p.result"
  r=$work/$p.result
  addr[$p]=$(jq -r '.ips[0].address' "$r" | cut -d/ -f1)
  check "$p: result is cniVersion 1.0.0" test "$(jq -r .cniVersion "$r")" = 1.0.0
  check "$p: result interface is eth0 in $p" \
    test "$(jq -c '.interfaces[0] | [.name, .sandbox]' "$r")" = "[\"eth0\",\"/var/run/netns/$p\"]"
  check "$p: address ${addr[$p]} from the subnet on interface 0" \
    test "${addr[$p]#"$subnet_prefix"}" != "${addr[$p]}" -a "$(jq '.ips[0].interface' "$r")" = 0
  check "$p: only lo and eth0 in the pod" test "$(links_in "$p")" = "eth0 lo"
  check "$p: libcni cached the result" \
    test "$(jq -r '.result.ips[0].address' "$(cache_file "$p")" 2>/dev/null)" = "$(jq -r '.ips[0].address' "$r")"
  check "$p: store record names the pod from CNI_ARGS" \
    test "$(jq -r .pod "$(record_of "$p")" 2>/dev/null)" = "wgc/$p"
done
remember_records
# The positive control for the final "nothing listens in port_range" check.
check "wg show finds both pods' WireGuard devices by their ports" \
  test "$(ours_listening | grep -c '^wgc')" -ge 2

a=${pods[0]} b=${pods[1]}
check "$a pings $b (${addr[$b]})" ip netns exec "$a" ping -c 2 -W 2 "${addr[$b]}" >/dev/null
check "$b pings $a (${addr[$a]})" ip netns exec "$b" ping -c 2 -W 2 "${addr[$a]}" >/dev/null

for p in "${pods[@]}"; do
  check "cnitool check $p" timed tool check "$p"
done
check "libcni sent the cached prevResult on both CHECKs" \
  test "$(trace_count '.cmd == "CHECK" and .prevResult and .rc == 0')" = 2

# CHECK must notice a change: the pod's MTU.
mtu=$(jq -r .mtu "$(record_of "$a")")
ip -n "$a" link set dev eth0 mtu 1280
if tool check "$a" 2>"$work/check.err"; then
  check "cnitool check $a fails after the MTU changed" false
else
  check "cnitool check $a fails after the MTU changed, naming it" grep -qi mtu "$work/check.err"
  log "      $(head -c 300 "$work/check.err")"
fi
ip -n "$a" link set dev eth0 mtu "$mtu"
check "cnitool check $a passes again with MTU $mtu" tool check "$a"

for p in "${pods[@]}"; do
  check "cnitool del $p" timed tool del "$p"
  check "$p: libcni removed its cached result" test ! -e "$(cache_file "$p")"
done
check "libcni sent the cached prevResult on both DELs" \
  test "$(trace_count '.cmd == "DEL" and .prevResult and .rc == 0')" = 2
check "a repeated DEL (no cached result, so no prevResult) succeeds" tool del "$a"
check "the repeated DEL had no prevResult" \
  test "$(jq -s '[.[] | select(.cmd == "DEL")] | last | .prevResult' "$work/trace.jsonl")" = false
for p in "${pods[@]}"; do ip netns del "$p"; done
check "a DEL after the netns is gone succeeds" tool del "$b"

assert_clean "$net"
check "libcni result cache is empty" test -z "$(ls -A "$work/cache/results" 2>/dev/null)"
show_trace libcni
exit $((failures > 0))
