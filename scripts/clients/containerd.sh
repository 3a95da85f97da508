#!/usr/bin/env bash
# Client 3: containerd 1.6's CRI plugin (go-cni/libcni inside containerd), driven by a Python CRI
# client as kubelet would: two pod sandboxes get wg-cni addresses, a container in one pings the
# other sandbox, StopPodSandbox (DEL with netns and prevResult) and RemovePodSandbox (DEL again,
# CNI_NETNS="" and no prevResult) leave nothing behind; containerd is stopped at the end.
# shellcheck disable=SC2317 # cleanup and timed are called indirectly
set -euo pipefail
# shellcheck source=scripts/clients/lib.sh
source "$(dirname "$0")/lib.sh"

net=wgc-cri
subnet_prefix=10.123.3.
image=localhost/wgc-busybox:test
port_range=55200-55299 # host UDP ports of this step
work=$(mktemp -d /tmp/wgc-clients-containerd.XXXXXX)
store=$work/store
ipam_dir=$work/ipam
sock=$work/containerd/containerd.sock
pods=(wgc-pod-a wgc-pod-b)
containerd_pid=""
export WGC_CRI_STUBS=$WGC_TOOLS/cri

cri() { "$WGC_TOOLS/venv/bin/python" "$clients_dir/cri_client.py" --endpoint "unix://$sock" "$@"; }
ctr_() { ctr --address "$sock" --namespace k8s.io "$@"; }
alive() { [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; }
timed() { # timed CMD...: run CMD, log its duration
  local t0 rc=0
  t0=$(now_ms)
  "$@" || rc=$?
  log "      $1 $2 ${3:0:12}: $(($(now_ms) - t0)) ms"
  return "$rc"
}

# Shims outlive a stopped containerd; they stay in its session (we started it with setsid), and
# the sandbox and container processes are their children.
shims_and_tasks() {
  [ -n "$containerd_pid" ] || return 0
  ps -eo pid=,ppid=,sid= | awk -v s="$containerd_pid" '
    $3 == s && $1 != s {shim[$1] = 1; print $1} {parent[$1] = $2}
    END {for (p in parent) if (parent[p] in shim) print p}'
}

stop_containerd() { # TERM, then KILL after 15 s
  alive || return 0
  kill -TERM "$containerd_pid"
  for _ in $(seq 150); do
    alive || break
    sleep 0.1
  done
  alive && kill -KILL "$containerd_pid"
  wait "$containerd_pid" 2>/dev/null
  true
}

cleanup() {
  set +e
  local pid ns leftover
  alive && cri remove-all >/dev/null 2>&1
  leftover=$(shims_and_tasks)
  stop_containerd
  for pid in $leftover; do kill -KILL "$pid" 2>/dev/null; done
  force_cleanup "$net"
  [ -f "$work/netns.list" ] && while read -r ns; do
    [ -e "$ns" ] && ip netns del "$(basename "$ns")" 2>/dev/null
  done <"$work/netns.list"
  cleanup_default_cache "$net"
  remove_new_netns
  remove_new_dirs
  remove_tree "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

mkdir -p "$work/cni-conf" "$work/containerd" "$work/logs"
cache_dir_existed
snapshot_netns cni-
# containerd leaves its cgroup parent (the namespace) and the shim socket dir behind, empty.
mapfile -t cgroups < <(cgroup_dirs k8s.io)
note_new_dirs "${cgroups[@]}" /run/containerd
make_bin_dir
conflist "$work/cni-conf/10-$net.conflist" "$net" "${subnet_prefix}0/24" "$port_range"
render containerd.toml.in "$work/containerd/config.toml"

setsid containerd --config "$work/containerd/config.toml" >"$work/containerd/log" 2>&1 </dev/null &
containerd_pid=$!
for _ in $(seq 100); do
  cri version >/dev/null 2>&1 && break
  sleep 0.2
done
must "containerd is up on its private socket" cri version >"$work/version.json"
log "containerd $(jq -r .version "$work/version.json"), CRI API $(jq -r .api "$work/version.json")"

make_rootfs "$work/rootfs"
"$WGC_TOOLS/venv/bin/python" "$clients_dir/mkimage.py" "$work/rootfs" "$work/image.tar" "$image" \
  '["/bin/sleep", "2147483647"]'
must "ctr imports the sandbox image (no registry)" ctr_ images import "$work/image.tar" >/dev/null

declare -A sandbox addr
for p in "${pods[@]}"; do
  uid=$(cat /proc/sys/kernel/random/uuid)
  must "RunPodSandbox $p" timed cri run-sandbox "$p" wgc "$uid" "$work/logs/$p" >"$work/$p.id"
  sandbox[$p]=$(cat "$work/$p.id")
  cri sandbox-status "${sandbox[$p]}" >"$work/$p.status"
  jq -r .netns "$work/$p.status" >>"$work/netns.list"
  addr[$p]=$(jq -r .ip "$work/$p.status")
  check "$p: PodSandboxStatus is SANDBOX_READY" test "$(jq -r .state "$work/$p.status")" = SANDBOX_READY
  check "$p: PodSandboxStatus IP ${addr[$p]} is from the wg-cni subnet" \
    test "${addr[$p]#"$subnet_prefix"}" != "${addr[$p]}"
  check "$p: store record names the pod from CNI_ARGS" \
    test "$(find "$store/$net" -name "${sandbox[$p]}:eth0.json" -exec jq -r .pod {} \;)" = "wgc/$p"
done
remember_records
# The positive control for the final "nothing listens in port_range" check.
check "wg show finds both pods' WireGuard devices by their ports" \
  test "$(ours_listening | grep -c '^wgc')" -ge 2

a=${pods[0]} b=${pods[1]}
must "a container starts in $a" timed cri create-container "${sandbox[$a]}" pinger "$image" \
  /bin/sleep 600 >"$work/container.id"
container=$(cat "$work/container.id")
shims_and_tasks >"$work/task.pids"
log "      shim and task PIDs: $(xargs <"$work/task.pids")"
check "the container in $a sees only lo and eth0" \
  test "$(cri exec "$container" 10 ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort | xargs)" = "eth0 lo"
check "the container in $a pings $b (${addr[$b]})" \
  cri exec "$container" 20 ping -c 2 -W 2 "${addr[$b]}" >/dev/null

for p in "${pods[@]}"; do
  id=${sandbox[$p]}
  check "StopPodSandbox $p" timed cri stop-sandbox "$id"
  check "$p: the DEL of StopPodSandbox had the netns and the cached prevResult" test "$(jq -s --arg id "$id" \
    '[.[] | select(.cmd == "DEL" and .containerId == $id)] | last | .netns != "" and .prevResult and .rc == 0' \
    "$work/trace.jsonl")" = true
  check "RemovePodSandbox $p" timed cri remove-sandbox "$id"
  check "$p: RemovePodSandbox sent DEL again with CNI_NETNS=\"\" and no prevResult, and it succeeded" \
    test "$(jq -s --arg id "$id" \
    '[.[] | select(.cmd == "DEL" and .containerId == $id)] | last | .netns == "" and (.prevResult | not) and .rc == 0' \
    "$work/trace.jsonl")" = true
done
check "no sandboxes left in containerd" test "$(cri list-sandboxes)" = "[]"
check "no cgroups left for the sandboxes and the container" empty "$(find /sys/fs/cgroup -maxdepth 3 \
  -type d \( -name "${sandbox[$a]}" -o -name "${sandbox[$b]}" -o -name "$container" \))"
assert_clean "$net"
check "containerd's libcni result cache has nothing of ours" \
  empty "$(find /var/lib/cni/results -name "$net-*" 2>/dev/null)"

stop_containerd
check "containerd stopped" bash -c "! kill -0 $containerd_pid 2>/dev/null"
ours_alive() { # the remembered shim and task PIDs still running as a shim or our sleep
  local pid
  while read -r pid; do
    running "$pid" || continue
    case $(cat "/proc/$pid/comm" 2>/dev/null) in
      containerd-shim | sleep) ps -o pid=,args= -p "$pid" ;;
    esac
  done <"$work/task.pids"
}
check "no shim or container process left" empty "$(ours_alive)"
show_trace containerd
exit $((failures > 0))
