#!/usr/bin/env bash
# Client 2: podman 4.3 with its CNI backend (libcni inside podman), private storage and config:
# two containers on a wg-cni network ping each other by IP; `podman run` on a network whose
# wg-cni config is broken fails with our error message; `podman rm` leaves nothing behind.
# shellcheck disable=SC2317 # cleanup and timed are called indirectly
set -euo pipefail
# shellcheck source=scripts/clients/lib.sh
source "$(dirname "$0")/lib.sh"

net=wgc-podman
bad=wgc-podman-bad
subnet_prefix=10.123.2.
image=localhost/wgc-busybox:latest
port_range=55100-55199 # host UDP ports of this step
work=$(mktemp -d /tmp/wgc-clients-podman.XXXXXX)
store=$work/store
ipam_dir=$work/ipam
names=("wgc-a-$$" "wgc-b-$$")
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf

cleanup() {
  set +e
  if [ -f "$CONTAINERS_CONF" ]; then
    podman rm --all --force --time 0 >/dev/null 2>&1
    podman rmi --all --force >/dev/null 2>&1
  fi
  force_cleanup "$net" "$bad"
  cleanup_default_cache "$net" "$bad"
  remove_new_netns
  [ -f "$work/blob-cache.existed" ] || rm -f "$blob_cache"
  remove_new_dirs
  remove_tree "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

timed() { # timed CMD...: run CMD, log its duration
  local t0 rc=0
  t0=$(now_ms)
  "$@" || rc=$?
  log "      ${*:1:3}: $(($(now_ms) - t0)) ms"
  return "$rc"
}
ip_of() { podman inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$1"; }
links_in() { podman exec "$1" ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort | xargs; }

mkdir -p "$work/net.d" "$work/podman"
cache_dir_existed
snapshot_netns netns-
mapfile -t cgroups < <(cgroup_dirs libpod_parent)
note_new_dirs "${cgroups[@]}" # podman (cgroupfs) leaves this cgroup behind, empty
# Copying an image (podman import) writes root's system blob-info cache (digests, no data).
blob_cache=/var/lib/containers/cache/blob-info-cache-v1.boltdb
[ -f "$blob_cache" ] && echo 1 >"$work/blob-cache.existed"
note_new_dirs /var/lib/containers
make_bin_dir
render containers.conf.in "$CONTAINERS_CONF"
render storage.conf.in "$CONTAINERS_STORAGE_CONF"
conflist "$work/net.d/10-$net.conflist" "$net" "${subnet_prefix}0/24" 55100-55149
conflist "$work/net.d/20-$bad.conflist" "$bad" 10.123.12.0/24 55150-55199 '{"mtu": 100}'
log "podman $(podman version --format '{{.Client.Version}}'), runc $(runc --version | awk 'NR==1 {print $3}')"

make_rootfs "$work/rootfs"
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
must "podman import a busybox image (no registry)" \
  podman import --quiet --change 'CMD ["/bin/sh"]' "$work/rootfs.tar" "$image" >/dev/null
check "podman lists the wg-cni network (VERSION probe passed)" \
  grep -qx "$net" <(podman network ls --format '{{.Name}}')
check "wg-cni answered podman's VERSION probes (CNI_NETNS=dummy, CNI_IFNAME=dummy, CNI_PATH=dummy)" \
  test "$(trace_count '.cmd == "VERSION" and .netns == "dummy" and .rc == 0')" -ge 1 \
  -a "$(trace_count '.cmd == "VERSION" and .rc != 0')" = 0

declare -A addr
for n in "${names[@]}"; do
  must "podman run -d --network $net ($n)" timed podman run -d --name "$n" --network "$net" \
    "$image" sleep 600 >/dev/null
  addr[$n]=$(ip_of "$n")
  check "$n: address ${addr[$n]} from the subnet" test "${addr[$n]#"$subnet_prefix"}" != "${addr[$n]}"
  check "$n: only lo and eth0 in the container" test "$(links_in "$n")" = "eth0 lo"
done
remember_records
# The positive control for the final "nothing listens in port_range" check.
check "wg show finds both pods' WireGuard devices by their ports" \
  test "$(ours_listening | grep -c '^wgc')" -ge 2

check "every ADD result names a MAC for its interface (podman 4.3 parses it)" \
  test "$(trace_count '.cmd == "ADD" and .rc == 0 and (.macs | length == 0 or any(. == null))')" = 0
a=${names[0]} b=${names[1]}
check "$a pings $b (${addr[$b]})" podman exec "$a" ping -c 2 -W 2 "${addr[$b]}" >/dev/null
check "$b pings $a (${addr[$a]})" podman exec "$b" ping -c 2 -W 2 "${addr[$a]}" >/dev/null

# A broken wg-cni config: podman run must fail and show the plugin's message.
rc=0
podman run --rm --name "wgc-bad-$$" --network "$bad" "$image" true >"$work/bad.out" 2>&1 || rc=$?
check "podman run on $bad fails (exit $rc)" test "$rc" != 0
check "podman's output has wg-cni's error naming the field" grep -q 'wg-cni.*"mtu"' "$work/bad.out"
log "      $(grep -m1 '^Error' "$work/bad.out" || head -1 "$work/bad.out")"
check "no container left from the failed run" test -z "$(podman ps -aq --filter "name=wgc-bad-$$")"

ids=$(podman inspect -f '{{.Id}}' "${names[@]}" | xargs)
check "podman rm -f removes both containers" timed podman rm --force --time 0 "${names[@]}" >/dev/null
for id in $ids; do
  check "DEL for ${id:0:12} came with the cached prevResult" \
    test "$(trace_count ".cmd == \"DEL\" and .containerId == \"$id\" and .prevResult and .rc == 0")" -ge 1
done
assert_clean "$net" "$bad"
check "podman's libcni result cache has nothing of ours" \
  empty "$(find /var/lib/cni/results -name "$net-*" -o -name "$bad-*" 2>/dev/null)"
show_trace podman
exit $((failures > 0))
