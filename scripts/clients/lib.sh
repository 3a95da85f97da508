# Shared helpers for the client harness (sourced by libcni.sh, podman.sh, containerd.sh).
#
# A step sets `work` (its temp dir), `store`, `ipam_dir` and `port_range` (its host UDP ports),
# then uses:
#   check DESC CMD...   run CMD; print "ok"/"FAIL"; a failure is counted, the step goes on
#   must DESC CMD...    the same, but a failure ends the step (the EXIT trap cleans up)
#   make_bin_dir        $work/cni-bin: wg-cni (the tracing wrapper), host-local, loopback
#   conflist FILE NAME SUBNET PORTS [EXTRA_JSON]   (PORTS within port_range)
#   remember_records    note the link, daemon and netns of every record in the store (pods and
#                       the node gateway), for the final checks and the cleanup
#   assert_clean NET... nothing of ours left: records, reservations, routes, links, daemons, netns
#   force_cleanup NET... DEL every record still in the store with the real binary, then kill
#                       remembered daemons by PID and delete remembered links/netns (EXIT path)
#   show_trace, trace_count   what the client sent (wg-cni-trace.sh's log)
# shellcheck shell=bash disable=SC2154

clients_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
failures=0

: "${WG_CNI_BIN:?WG_CNI_BIN must name the wg-cni binary under test}"
: "${WGC_TOOLS:?WGC_TOOLS must name the harness tool dir (scripts/clients/install.sh)}"
backend=${WGC_BACKEND:-userspace}

# Step output goes to fd 3 (the step's stdout), so `check DESC CMD >FILE` captures only CMD.
exec 3>&1
log() { printf '  %s\n' "$*" >&3; }

# check DESC CMD...: never fails the caller (the failure is counted); must: the failure is fatal.
check() {
  local desc=$1
  shift
  if "$@"; then
    log "ok:   $desc"
  else
    log "FAIL: $desc"
    failures=$((failures + 1))
    return 0
  fi
}

must() {
  local desc=$1
  shift
  if "$@"; then
    log "ok:   $desc"
  else
    log "FAIL: $desc"
    failures=$((failures + 1))
    exit 1
  fi
}

# empty TEXT: true when TEXT is empty, else logs it as what is left.
empty() {
  [ -z "$1" ] && return 0
  log "      left: $(printf '%s' "$1" | xargs)"
  return 1
}

# Milliseconds since the epoch, for timings.
now_ms() { date +%s%3N; }

make_bin_dir() {
  local bin=$work/cni-bin
  mkdir -p "$bin"
  ln -s /usr/lib/cni/host-local /usr/lib/cni/loopback "$bin/"
  sed -e "s|@REAL@|$WG_CNI_BIN|" -e "s|@TRACE@|$work/trace.jsonl|" \
    "$clients_dir/wg-cni-trace.sh" >"$bin/wg-cni"
  chmod 0755 "$bin/wg-cni"
  : >"$work/trace.jsonl"
}

# conflist FILE NAME SUBNET PORTS [EXTRA]: a cniVersion 1.0.0 conflist with one wg-cni plugin.
# EXTRA is a JSON object merged into the plugin (e.g. '{"mtu": 100}').
conflist() {
  local file=$1 name=$2 subnet=$3 ports=$4 extra=${5:-'{}'}
  jq -n --arg name "$name" --arg subnet "$subnet" --arg ports "$ports" --arg backend "$backend" \
    --arg store "$store" --arg ipam "$ipam_dir" --argjson extra "$extra" '{
      cniVersion: "1.0.0",
      name: $name,
      plugins: [({
        type: "wg-cni",
        ipam: {type: "host-local", ranges: [[{subnet: $subnet}]], dataDir: $ipam},
        endpoint: "127.0.0.1",
        listenPorts: $ports,
        backend: $backend,
        store: $store
      } + $extra)]
    }' >"$file"
}

# Pod records of NET in our store (the node directory is the host name by default); with
# `all`, the node gateway's record (gateway.json) too.
records() {
  if [ "${2-}" = all ]; then
    find "$store/$1" -type f -name '*.json' ! -name '.*' 2>/dev/null
  else
    find "$store/$1" -type f -name '*:*.json' ! -name '.*' 2>/dev/null
  fi
}

# Appends "hostName daemonPid netns" of every current record (pods, and the node gateway with
# netns "-": its link stays in the host) to $work/seen.
remember_records() {
  local f
  while read -r f; do
    jq -r '"\(.hostName) \(.daemonPid // 0) \(.netns // "-")"' "$f" >>"$work/seen" || true
  done < <(find "$store" -type f -name '*.json' ! -name '.*' 2>/dev/null)
  [ -f "$work/seen" ] && sort -u -o "$work/seen" "$work/seen"
  true
}

# A host-local reservation is a file named after the address; lock and last_reserved_ip.* are not.
reservations() {
  find "$ipam_dir/$1" -type f ! -name lock ! -name 'last_reserved_ip.*' 2>/dev/null
}

# running PID: alive and not a zombie (PID 1 here reaps orphans only every few seconds).
running() { ps -o stat= -p "$1" 2>/dev/null | grep -q '^[^Z]'; }
is_our_daemon() { # PID: running and still a userspace daemon (not a reused PID)
  [ "$1" != 0 ] && case "$(cat "/proc/$1/comm" 2>/dev/null)" in wg-cni-wgd | wireguard-go) true ;; *) false ;; esac &&
    running "$1"
}
daemon_gone() { ! is_our_daemon "$1"; }
link_gone() { ! ip link show dev "$1" >/dev/null 2>&1; }

# conflist_of NET: the conflist file this step wrote for NET.
conflist_of() {
  local c
  find "$work/net.d" "$work/cni-conf" -name '*.conflist' 2>/dev/null | while read -r c; do
    if [ "$(jq -r .name "$c")" = "$1" ]; then echo "$c"; fi
  done | head -1
  true
}

assert_clean() {
  local n name pid ns subnet
  for n in "$@"; do
    check "no store records (pods, node gateway) left for $n" empty "$(records "$n" all)"
    check "no host-local reservations left for $n" empty "$(reservations "$n")"
    subnet=$(jq -r '.plugins[0].ipam.ranges[0][0].subnet' "$(conflist_of "$n")")
    check "no host route for $subnet left" empty "$(ip route show table all exact "$subnet")"
  done
  [ -f "$work/seen" ] || return 0
  while read -r name pid ns; do
    check "link $name gone from the host" link_gone "$name"
    check "UAPI socket of $name gone" test ! -e "/var/run/wireguard/$name.sock"
    check "userspace daemon $pid ($name) gone" daemon_gone "$pid"
    [ "$ns" = - ] || check "pod netns $ns gone" test ! -e "$ns"
  done <"$work/seen"
  check "no WireGuard link or userspace daemon listens in $port_range" empty "$(ours_listening)"
}

# Every WireGuard device of this host (wg*/wgc*/wgg* links in the host namespace, and the
# userspace daemons (wg-cni-wgd, wireguard-go), whose UAPI socket is in the host even when the TUN is in a pod) whose
# UDP port is in the step's port_range: those are ours, whoever else runs tests meanwhile.
ours_listening() {
  local name pid port lo=${port_range%-*} hi=${port_range#*-}
  {
    ip -o link show type wireguard 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2, "-"}'
    ip -o link show | awk -F': ' '$2 ~ /^wg[cg]/ {sub(/@.*/, "", $2); print $2, "-"}'
    for pid in $(pgrep -x wg-cni-wgd) $(pgrep -x wireguard-go); do
      running "$pid" && echo "$(tr '\0' '\n' <"/proc/$pid/cmdline" | tail -1) $pid"
    done
  } | sort -u | while read -r name pid; do
    port=$(timeout 5 wg show "$name" listen-port 2>/dev/null) || continue
    if [ -n "$port" ] && [ "$port" -ge "$lo" ] && [ "$port" -le "$hi" ]; then
      echo "$name(port $port, daemon $pid)"
    fi
  done
}

# DEL every record still in the store, straight with the real binary (the client is gone or
# failed), then kill remembered daemons and delete remembered links and netns. Never fails.
force_cleanup() {
  local n f cid ifname ns plugin name pid conf
  remember_records
  for n in "$@"; do
    conf=$(conflist_of "$n")
    [ -n "$conf" ] || continue
    plugin=$(jq -c '.plugins[0] + {name: .name, cniVersion: .cniVersion}' "$conf")
    for f in $(records "$n"); do # the last DEL also removes the node gateway
      cid=$(jq -r .containerId "$f")
      ifname=$(jq -r .ifname "$f")
      ns=$(jq -r .netns "$f")
      [ -e "$ns" ] || ns=""
      log "cleanup: DEL $n $cid $ifname"
      printf '%s' "$plugin" | CNI_COMMAND=DEL CNI_CONTAINERID=$cid CNI_IFNAME=$ifname \
        CNI_NETNS=$ns CNI_PATH=$work/cni-bin "$WG_CNI_BIN" >/dev/null 2>&1 || true
    done
  done
  [ -f "$work/seen" ] || return 0
  while read -r name pid ns; do
    if is_our_daemon "$pid"; then
      log "cleanup: kill daemon $pid"
      kill "$pid" 2>/dev/null || true
    fi
    ip link del dev "$name" 2>/dev/null || true
    case $ns in
      /var/run/netns/* | /run/netns/*) [ -e "$ns" ] && ip netns del "$(basename "$ns")" 2>/dev/null ;;
    esac
  done <"$work/seen"
  true
}

# Network namespaces a runtime creates under /var/run/netns (containerd: cni-<uuid>, podman:
# netns-<uuid>) normally go with the pod; a failed ADD whose DEL fails too leaves one behind.
# snapshot_netns PREFIX lists those present at step start; remove_new_netns deletes those that
# appeared since and that no process is in (no other runtime runs on this machine).
netns_named() { ip netns list | awk -v p="$1" 'index($1, p) == 1 {print $1}' | sort; }
snapshot_netns() {
  echo "$1" >"$work/netns.prefix"
  netns_named "$1" >"$work/netns.before"
}
remove_new_netns() {
  local ns
  [ -f "$work/netns.before" ] || return 0
  for ns in $(comm -13 "$work/netns.before" <(netns_named "$(cat "$work/netns.prefix")")); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] || continue
    log "cleanup: netns $ns"
    ip netns del "$ns" 2>/dev/null
  done
  true
}

# Remove libcni result cache entries of NET from the default cache dir (podman and containerd
# use /var/lib/cni), and the cache dirs themselves if this step created them and they are empty.
cache_dir_existed() {
  [ -d /var/lib/cni ] && echo 1 >"$work/varlibcni.existed"
  [ -d /var/lib/cni/results ] && echo 1 >"$work/results.existed"
  true
}
cleanup_default_cache() {
  local n
  for n in "$@"; do rm -f /var/lib/cni/results/"$n"-*; done
  [ -f "$work/results.existed" ] || rmdir /var/lib/cni/results 2>/dev/null
  [ -f "$work/varlibcni.existed" ] || rmdir /var/lib/cni 2>/dev/null
  true
}

# Dirs a runtime creates outside our temp dir and leaves behind empty (podman: the cgroup
# libpod_parent; containerd: the cgroup k8s.io, /run/containerd): note_new_dirs DIR... remembers
# those that do not exist yet, remove_new_dirs removes them again, rmdir only and deepest first
# (never a file, never a cgroup that still has tasks).
note_new_dirs() {
  local d
  for d in "$@"; do
    [ -d "$d" ] || echo "$d" >>"$work/new-dirs"
  done
}
remove_new_dirs() {
  local d
  [ -f "$work/new-dirs" ] || return 0
  while read -r d; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null
  done <"$work/new-dirs"
  true
}
cgroup_dirs() { # NAME: the cgroup NAME under the root of every hierarchy
  local h
  for h in /sys/fs/cgroup/*/; do echo "$h$1"; done
}

# Unmount whatever is still mounted below DIR (deepest first), then remove DIR.
remove_tree() {
  local dir=$1 m
  [ -n "$dir" ] && [ -d "$dir" ] || return 0
  findmnt -rn -o TARGET | grep -F "$dir/" | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$dir"
}

# One line per call the client made: what it sent and what it got.
show_trace() {
  log "what $1 sent to wg-cni:"
  jq -r '"    \(.cmd) cniVersion=\(.cniVersion) cid=\(.containerId[0:20]) ifname=\(.ifname) " +
    "netns=\(if .netns == "" then "\"\"" else .netns end) prevResult=\(.prevResult) " +
    "args=\(.args) rc=\(.rc)" + (if .rc != 0 then " code=\(.code) msg=\(.msg)" else "" end)' \
    "$work/trace.jsonl"
}

# Trace queries: trace_count FILTER  -> number of calls matching the jq FILTER.
trace_count() {
  jq -s "[.[] | select($1)] | length" "$work/trace.jsonl"
}

# render TEMPLATE OUT: conf/TEMPLATE with @WORK@ (and @IMAGE@) filled in.
render() {
  sed -e "s|@WORK@|$work|g" -e "s|@IMAGE@|${image-}|g" "$clients_dir/conf/$1" >"$2"
}

# make_rootfs DIR: a busybox root file system (Debian's static busybox, applets as symlinks).
make_rootfs() {
  local dir=$1 d
  for d in bin sbin usr/bin usr/sbin etc root tmp proc sys dev; do mkdir -p "$dir/$d"; done
  cp /bin/busybox "$dir/bin/busybox"
  chroot "$dir" /bin/busybox --install -s
  echo 'root:x:0:0:root:/root:/bin/sh' >"$dir/etc/passwd"
  echo 'root:x:0:' >"$dir/etc/group"
}
