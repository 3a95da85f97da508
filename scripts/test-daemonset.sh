#!/usr/bin/env bash
# `make test-daemonset`: the image (target/image/wg-cni.tar) runs under podman the way
# deploy/kubernetes/wg-cni.yaml's DaemonSet says, on two simulated nodes with etcd.
#
#   scripts/test-daemonset.sh [daemonset] [upgrade]      (both by default)
#
# daemonset: both nodes run the DaemonSet: its init container installs the binaries, the agent
#   container starts while etcd is still down: no conflist, STATUS 50, /readyz not ready; once
#   etcd is up the conflist appears, and only with the agent ready (STATUS 0, /readyz 200);
#   pods added through libcni (cnitool) on both nodes and through containerd's CRI on node 2
#   talk; each node's agent container is restarted during a 100 ms ping between them, which
#   loses no packet; then uninstall.yaml's command on each node (agents deleted and pods gone
#   first, as its header says) leaves the node as it was before wg-cni (links, policy rules,
#   routes, iptables rules and chains of both backends, processes, files; see snapshot).
# upgrade: a rolling upgrade from the build of OLD_COMMIT (the last main commit before issues
#   19-24, built by scripts/build-old.sh, cached in target/old/): node 3 runs it as it was
#   installed then (binaries in the CNI bin dir, a conflist written by hand, the agent a
#   process), node 4 the DaemonSet; their pods talk; node 3 is then upgraded as the DaemonSet
#   does it (the old agent stopped, the install init container, the new agent container)
#   during a 100 ms ping between the pods, which loses no packet; a new pod on node 3 talks to
#   both older pods, the old build's pod passes the new plugin's CHECK and DEL.
#
# What the manifests say is read from them (scripts/daemonset-podman.py): privileges, host
# network and PID, every mount with its options and propagation, env (downward API, ConfigMap,
# Secret), command and args; the readiness probe; uninstall.yaml's command. What is simulated:
#   - a node is a network namespace of its own (its host network: the agent's hostNetwork is
#     `podman run --network ns:` of it) on a bridge in an underlay namespace, with etcd (TLS,
#     client certificates) in another namespace on that bridge;
#   - a node's own files: every hostPath of the manifests is a directory of the node under
#     $work/nodeN/root (two nodes share this machine's filesystem, and their CNI bin and conf
#     dirs, stores, /run/wg-cni, UAPI sockets differ), except /var/run/netns, which is this
#     machine's (named namespaces: the nodes' and pods' namespaces are there, and the agent must
#     see pods added after it started: mountPropagation HostToContainer);
#   - the node's own processes (cnitool and the plugin it runs, the pods' daemons, the old
#     build's agent) run in that network namespace and a mount namespace where the same
#     directories are bind-mounted over the real paths (/opt/cni/bin, /etc/cni/net.d,
#     /var/lib/cni, /run/wg-cni, /run/wireguard, /run/xtables.lock), so they see the files the
#     containers see, at the paths the conflist names;
#   - containerd (CRI) runs in node 2's network namespace and this machine's mount namespace,
#     its CNI conf dir the node's; the plugin it runs enters the node's file view first (see
#     start_containerd);
#   - node provisioning: host-local in the node's CNI bin dir, the node's etcd client
#     credential in /etc/wg-cni/etcd; the Secret's example values replaced by this etcd's URL
#     and CA, as the manifest tells the user to.
# Containers run under podman with private storage and configuration (as scripts/test-image.sh);
# everything (containers by id, namespaces, daemons by pid, etcd by pid, dirs, mount points this
# script made) goes on exit, also on failure. Run under `flock /tmp/wgcni-itest.lock`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scenarios=("$@")
((${#scenarios[@]})) || scenarios=(daemonset upgrade)
for s in "${scenarios[@]}"; do
  case $s in daemonset | upgrade) ;; *) echo "unknown scenario: $s (daemonset, upgrade)" >&2; exit 2 ;; esac
done

manifest=deploy/kubernetes/wg-cni.yaml
uninstall_manifest=deploy/kubernetes/uninstall.yaml
archive=target/image/wg-cni.tar
# The last main commit before this wave's changes (issues 19-24: 19's first commit, f79baba,
# is its child). Its agent and plugin must work beside the new ones during a rolling upgrade.
OLD_COMMIT=2edb9d7
etcd_addr=10.250.0.2
etcd_url=https://$etcd_addr:23790
tools=${WGC_TOOLS:-$PWD/target/clients}
py=target/k8s-venv/bin/python
pinger=wg-cni-test-daemonset

passed=0
pass() {
  echo "ok: $*"
  passed=$((passed + 1))
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
now_ms() { date +%s%3N; }
# wait_until SECONDS CMD...: poll CMD every 200 ms until it succeeds or SECONDS pass.
wait_until() {
  local deadline=$(($(now_ms) + $1 * 1000))
  shift
  until "$@"; do
    (($(now_ms) < deadline)) || return 1
    sleep 0.2
  done
}

[ -f "$archive" ] || fail "$archive is missing: run make image"
[ -x "$py" ] || scripts/test-manifests.sh >/dev/null
scripts/apt-install.sh podman runc conmon iptables iproute2 etcd-server etcd-client openssl curl \
  containernetworking-plugins iputils-ping jq util-linux >/dev/null
scripts/clients/install.sh "$tools" >/dev/null
cnitool=$tools/wgc-cnitool
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [[ " ${scenarios[*]} " == *" upgrade "* ]]; then
  if git cat-file -e "$OLD_COMMIT^{commit}" 2>/dev/null; then
    old_bins=$(scripts/build-old.sh "$OLD_COMMIT")
  else
    # A shallow clone has no old build to upgrade from: said, and not counted as passed.
    echo "upgrade: skipped: commit $OLD_COMMIT is not in this clone (shallow?)"
    kept=()
    for s in "${scenarios[@]}"; do [ "$s" = upgrade ] || kept+=("$s"); done
    scenarios=("${kept[@]}")
  fi
fi

# --- state, and its cleanup ---------------------------------------------------------------
work=$(mktemp -d /tmp/wg-cni-test-daemonset.XXXXXX)
id=$$
underlay=wgdu$id
etcd_ns=wgde$id
etcd_pid=
namespaces=()   # every netns this script made
containers=()   # podman container ids
pids=()         # processes started here (old agent, pings)
new_paths=()    # mount points this script made on the machine (removed again)
declare -A node_ns node_addr node_root
new_dirs=()
for dir in /var/lib/containers /run/containers /run/libpod /etc/containers/networks; do
  [ -e "$dir" ] || new_dirs+=("$dir")
done
blob_cache=/var/lib/containers/cache/blob-info-cache-v1.boltdb
[ -e "$blob_cache" ] && had_blob_cache=1 || had_blob_cache=

cleanup() {
  set +e
  local c p n pid ns
  for c in "${containers[@]}"; do podman rm --force --time 0 "$c" >/dev/null 2>&1; done
  [ -n "$containerd_pid" ] && cri remove-all >/dev/null 2>&1
  stop_containerd
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  # Pods: DEL through the node's plugin (stops their daemons), then their namespaces.
  for n in "${!node_ns[@]}"; do
    for ns in $(ip netns list | awk '{print $1}' | grep "^wgdp-$n-$id-"); do
      node_exec "$n" env NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin "$cnitool" del wg-cni \
        "/var/run/netns/$ns" >/dev/null 2>&1
    done
  done
  # What still runs in a node's namespace (gateway daemons, pods' daemons a failed DEL left).
  for n in "${!node_ns[@]}"; do
    for pid in $(ns_pids "${node_ns[$n]}"); do kill "$pid" 2>/dev/null; done
  done
  [ -n "$etcd_pid" ] && kill "$etcd_pid" 2>/dev/null && wait "$etcd_pid" 2>/dev/null
  for ns in $(ip netns list | awk '{print $1}' | grep -- "-$id-"); do ip netns delete "$ns"; done
  for ns in "${namespaces[@]}"; do ip netns delete "$ns" 2>/dev/null; done
  podman rmi --all --force >/dev/null 2>&1
  [ -n "$had_blob_cache" ] || rm -f "$blob_cache"
  findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount -l "$m"; done
  for ((i = ${#new_paths[@]} - 1; i >= 0; i--)); do
    p=${new_paths[$i]}
    if [ -d "$p" ]; then find "$p" -depth -type d -exec rmdir {} + 2>/dev/null; else rm -f "$p"; fi
  done
  rm -rf "$work" "${new_dirs[@]}"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# Processes whose network namespace is NS's (by the namespace's inode).
ns_pids() {
  local want p
  want=$(stat -L -c %i "/run/netns/$1" 2>/dev/null) || return 0
  for p in /proc/[0-9]*; do
    [ "$(stat -L -c %i "$p/ns/net" 2>/dev/null)" = "$want" ] && echo "${p#/proc/}"
  done
  return 0
}

# --- podman, private ----------------------------------------------------------------------
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
log_driver = "k8s-file"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/events.log"
runtime = "runc"
tmp_dir = "$work/tmp"
static_dir = "$work/graph/libpod"
volume_path = "$work/graph/volumes"
[network]
network_config_dir = "$work/networks"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/graph"
runroot = "$work/run"
EOF
podman load -q -i "$archive" >/dev/null
image=localhost/wg-cni:$version

# --- etcd with TLS ------------------------------------------------------------------------
pki=$work/pki
mkdir -p "$pki"
openssl_quiet() { openssl "$@" >/dev/null 2>&1 || fail "openssl $*"; }
openssl_quiet req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=wg-cni-test-ca -keyout "$pki/ca.key" -out "$pki/ca.crt"
# cert NAME SAN: a certificate signed by the CA (server and client use).
cert() {
  openssl_quiet req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$1" \
    -keyout "$pki/$1.key" -out "$pki/$1.csr"
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$2" >"$pki/$1.ext"
  openssl_quiet x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 1 -extfile "$pki/$1.ext" -out "$pki/$1.crt"
}
cert etcd "IP:$etcd_addr"
cert admin DNS:admin
etcdctl_() {
  ip netns exec "$etcd_ns" etcdctl --endpoints "$etcd_url" --cacert "$pki/ca.crt" \
    --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"
}

# --- the simulated machine ----------------------------------------------------------------
ip netns add "$underlay"
namespaces+=("$underlay")
ip -n "$underlay" link add br0 type bridge
ip -n "$underlay" link set br0 up
attach() { # NS PORT ADDR: NS gets eth0 ADDR/24 on the bridge
  ip netns list | grep -qw "$1" || { ip netns add "$1"; namespaces+=("$1"); }
  ip -n "$underlay" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$underlay" link set "$2" master br0 up
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" link set lo up
}
attach "$etcd_ns" e0 "$etcd_addr"

start_etcd() {
  [ -z "$etcd_pid" ] || return 0
  ip netns exec "$etcd_ns" etcd --name t --data-dir "$work/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster t=http://127.0.0.1:23800 --cert-file "$pki/etcd.crt" \
    --key-file "$pki/etcd.key" --trusted-ca-file "$pki/ca.crt" --client-cert-auth \
    >"$work/etcd.log" 2>&1 &
  etcd_pid=$!
  wait_until 20 etcdctl_ endpoint health >/dev/null 2>&1 || fail "etcd did not start: $(tail -5 "$work/etcd.log")"
}
stop_etcd() {
  [ -n "$etcd_pid" ] || return 0
  kill "$etcd_pid"
  wait "$etcd_pid" 2>/dev/null || true
  etcd_pid=
}

# The manifests' host paths, and the node-side paths besides them that the node's processes
# use (host-local's IPAM data and libcni's cache under /var/lib/cni: node state too).
mapfile -t host_paths < <("$py" scripts/daemonset-podman.py "$manifest" "$uninstall_manifest" \
  --daemonset wg-cni --host-paths)
node_binds=()
for p in /var/lib/cni "${host_paths[@]}"; do
  p=${p/#\/var\/run\//\/run\/}
  [ "$p" != /run/netns ] || continue
  # One bind for a path and what lies under it (/var/lib/cni holds the store).
  for q in "${node_binds[@]}"; do [[ $p == "$q" || $p == "$q"/* ]] && continue 2; done
  node_binds+=("$p")
done
# The real paths must exist as mount points: made here when missing, removed on exit.
for p in "${node_binds[@]}"; do
  case $p in
    /run/xtables.lock) [ -e "$p" ] || { touch "$p"; new_paths+=("$p"); } ;;
    *) if [ ! -e "$p" ]; then
        missing=$p
        while [ ! -e "$(dirname "$missing")" ]; do missing=$(dirname "$missing"); done
        mkdir -p "$p"
        new_paths+=("$missing")
        [ "$missing" = "$p" ] || while [ "$p" != "$missing" ]; do new_paths+=("$p"); p=$(dirname "$p"); done
      fi ;;
  esac
done

# $work/node-view ROOT CMD...: CMD in a mount namespace where ROOT's directories are
# bind-mounted over the real paths of node_binds (a directory the node does not have yet is
# made, as the plugin or its daemons would make it there). The node's file view.
cat >"$work/node-view" <<EOF
#!/bin/bash
exec unshare --mount --propagation slave -- bash -c '
  root=\$1; shift
  for p in ${node_binds[*]}; do
    if [ "\$p" = /run/xtables.lock ]; then touch "\$root\$p"; else mkdir -p "\$root\$p"; fi
    mount --bind "\$root\$p" "\$p" || exit 1
  done
  exec "\$@"' _ "\$@"
EOF
chmod +x "$work/node-view"
# node_exec NODE CMD...: run CMD as the node's own host would: its network namespace, its files.
node_exec() {
  "$work/node-view" "${node_root[$1]}" ip netns exec "${node_ns[$1]}" "${@:2}"
}

# new_node N: its namespace on the bridge, and what node provisioning puts on it: a container
# runtime's CNI dirs (host-local in the bin dir, an empty conf dir), the node's etcd client
# credential. The rest of the host paths is made by "kubelet" (DirectoryOrCreate) or use.
new_node() {
  local n=$1 root=$work/node$1/root
  node_ns[$n]=wgdn$n-$id
  node_addr[$n]=10.250.0.$((10 + n))
  node_root[$n]=$root
  attach "${node_ns[$n]}" "n$n" "${node_addr[$n]}"
  mkdir -p "$root/opt/cni/bin" "$root/etc/cni/net.d" "$root/etc/wg-cni/etcd"
  cp /usr/lib/cni/host-local "$root/opt/cni/bin/"
  cert "node$n" "DNS:node$n"
  install -m 0400 "$pki/node$n.crt" "$root/etc/wg-cni/etcd/node.crt"
  install -m 0400 "$pki/node$n.key" "$root/etc/wg-cni/etcd/node.key"
}

# pod_run NODE DAEMONSET CONTAINER MANIFEST... [-- PODMAN_FLAGS]: the container's podman run
# arguments, read from the manifests.
run_args() {
  local n=$1 ds=$2 c=$3
  shift 3
  mkdir -p "$work/node$n/volumes-$ds-$c"
  "$py" scripts/daemonset-podman.py "$@" --daemonset "$ds" --container "$c" --node "node$n" \
    --host-ip "${node_addr[$n]}" --netns "/run/netns/${node_ns[$n]}" --node-root "${node_root[$n]}" \
    --shared-host-path /var/run/netns --volumes-dir "$work/node$n/volumes-$ds-$c" \
    --secret "wg-cni-etcd/endpoints=$etcd_url" --secret "wg-cni-etcd/ca.crt=@$pki/ca.crt" \
    --name "node$n-$ds-$c-$id" >"$work/args" || fail "reading $ds/$c from the manifests"
  mapfile -d '' -t podman_args <"$work/args"
}
# init_container NODE DS CONTAINER MANIFEST...: run to completion, as kubelet runs an init
# container; its output is shown.
init_container() {
  run_args "$@"
  local out
  out=$(podman run --rm "${podman_args[@]}" 2>&1) || fail "init container $2/$3 on node$1: $out"
  echo "$out" | sed "s/^/  node$1 $2\/$3: /"
}
# start_container NODE DS CONTAINER MANIFEST...: detached, like a pod's main container.
start_container() {
  run_args "$@"
  local cid
  cid=$(podman run -d "${podman_args[@]}") || fail "starting $2/$3 on node$1"
  containers+=("$cid")
  agent_cid[$1]=$cid
}
declare -A agent_cid

# The readiness probe of the agent container, as the manifest writes it.
read -r probe_host probe_port probe_path < <("$py" scripts/daemonset-podman.py "$manifest" \
  --daemonset wg-cni --container agent --probe readinessProbe)
ready() { # NODE: the probe passes
  [ "$(ip netns exec "${node_ns[$1]}" curl -s -o /dev/null -w '%{http_code}' -m 2 \
    "http://$probe_host:$probe_port$probe_path")" = 200 ]
}
conflist_of() { echo "${node_root[$1]}/etc/cni/net.d/10-wg-cni.conflist"; }

# status NODE CONF_FILE: the plugin's STATUS code for that conflist's network (a CNI 1.1
# runtime's call: cniVersion 1.1.0, the first plugin's config), "0" on success.
status() {
  local conf out
  conf=$(jq -c '.plugins[0] + {name: .name, cniVersion: "1.1.0"}' "$2")
  out=$(echo "$conf" | node_exec "$1" env CNI_COMMAND=STATUS CNI_PATH=/opt/cni/bin \
    /opt/cni/bin/wg-cni 2>/dev/null) && { echo 0; return; }
  echo "$out" | jq -r '.code // "none"' 2>/dev/null || echo "unparsable: $out"
}

# add_pod NODE NAME: a pod namespace and a libcni ADD (cnitool) on the node; prints its address.
add_pod() {
  local ns=wgdp-$1-$id-$2 out
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  out=$(node_exec "$1" env NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin CNI_IFNAME=eth0 \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=test;K8S_POD_NAME=$2" "$cnitool" add wg-cni \
    "/var/run/netns/$ns" 2>&1) || fail "cnitool add $2 on node$1: $out"
  echo "$out" | jq -r '.ips[0].address' | cut -d/ -f1
}
del_pod() { # NODE NAME
  local ns=wgdp-$1-$id-$2 out
  out=$(node_exec "$1" env NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin CNI_IFNAME=eth0 \
    "$cnitool" del wg-cni "/var/run/netns/$ns" 2>&1) || fail "cnitool del $2 on node$1: $out"
  ip netns delete "$ns"
}
pod_ns() { echo "wgdp-$1-$id-$2"; }
pings() { # POD_NS ADDR: one ping answered within 1 s
  ip netns exec "$1" ping -c 1 -W 1 "$2" >/dev/null 2>&1
}
# talk NODE_A POD_A ADDR_A NODE_B POD_B ADDR_B: both ways within 20 s.
talk() {
  wait_until 20 pings "$(pod_ns "$1" "$2")" "$6" || fail "$2 (node$1) does not reach $5 at $6"
  wait_until 20 pings "$(pod_ns "$4" "$5")" "$3" || fail "$5 (node$4) does not reach $2 at $3"
}
# ping_loop POD_NS ADDR COUNT: a 100 ms ping in the background; sets ping_pid, ping_out.
ping_loop() {
  ping_out=$work/ping-$(now_ms)
  ip netns exec "$1" ping -D -O -i 0.1 -W 1 -c "$3" "$2" >"$ping_out" 2>&1 &
  ping_pid=$!
  pids+=("$ping_pid")
}
# ping_stop: SIGINT the loop (it prints its summary), wait for it (in this shell: only the
# parent can wait); sets sent and received.
ping_stop() {
  kill -INT "$ping_pid" 2>/dev/null || true
  wait "$ping_pid" || true
  read -r sent received < <(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p' \
    "$ping_out") || fail "no ping summary: $(cat "$ping_out")"
}

# What wg-cni may leave on a node: links, policy rules, routes of every table, iptables rules
# and non-built-in chains of both backends and families, processes in the node's namespace,
# every file under the node's host paths, and whether /run/wg-cni exists. Not compared: the
# store (it stays, by design: pod records and the agent's instance id, README) and the rest of
# /var/lib/cni (host-local's and libcni's own state), the node's etcd credential, iptables'
# lock file, and empty
# directories (the manifests' DirectoryOrCreate host paths: kubelet makes them).
snapshot() {
  local n=$1 ns=${node_ns[$1]} root=${node_root[$1]} t
  echo "# links"
  ip -n "$ns" -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort
  echo "# rules"
  ip -n "$ns" -4 rule show
  ip -n "$ns" -6 rule show
  echo "# routes"
  ip -n "$ns" -4 route show table all | sort
  # The kernel's link-local routes of the node's own underlay link come and go with DAD.
  ip -n "$ns" -6 route show table all | grep -v 'fe80::.* dev \(eth0\|lo\) ' | sort
  for t in iptables-legacy-save ip6tables-legacy-save iptables-nft-save ip6tables-nft-save; do
    echo "# $t"
    ip netns exec "$ns" "$t" 2>/dev/null | grep -E '^-A|^:' |
      grep -vE '^:(INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) ' | sort
  done
  echo "# processes"
  for p in $(ns_pids "$ns"); do cat "/proc/$p/comm"; done | sort
  echo "# files"
  (cd "$root" && find . \( -path ./var/lib/cni -o -path ./etc/wg-cni -o -path ./run/xtables.lock \) \
    -prune -o ! -type d -print |
    sort)
  [ -e "$root/run/wg-cni" ] && echo "/run/wg-cni exists"
  return 0
}

# render_template NODE ADDR: the ConfigMap's conflist with this node's name and address.
render_template() {
  "$py" -c 'import json, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "ConfigMap": t = json.loads(d["data"]["10-wg-cni.conflist"])
t["plugins"][0].update(nodeName=sys.argv[2], endpoint=sys.argv[3])
print(json.dumps(t, indent=2))' "$manifest" "$1" "$2"
}

# steady NODE: the agent container runs and was never restarted by podman (its restart policy:
# an agent that exits, kubelet would restart too, and the test would not see it).
steady() {
  [ "$(podman inspect -f '{{.State.Running}} {{.RestartCount}}' "${agent_cid[$1]}")" = "true 0" ] ||
    fail "node$1's agent container exited and was restarted: $(podman logs "${agent_cid[$1]}" 2>&1 | grep -v ' INFO ' | tail -5)"
}

start_daemonset() { # NODE: the init container, then the agent container
  init_container "$1" wg-cni install "$manifest"
  start_container "$1" wg-cni agent "$manifest"
}

grace=$("$py" -c 'import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "DaemonSet": print(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])' "$manifest")

# --- containerd's CRI on a node -----------------------------------------------------------
# containerd runs in the node's network namespace and this machine's mount namespace, as a
# node's containerd runs in its host's: the pod namespaces it makes under /var/run/netns are
# the machine's, where the agent container sees them (HostToContainer). Its CNI conf dir is the
# node's (where the agent writes the conflist); its CNI bin dir holds host-local, loopback (CRI
# brings up the pod's lo with it) and a `wg-cni`
# that runs the node's installed plugin in the node's file view (node-view: the conflist's
# store, /run/wg-cni, the UAPI sockets at the node's paths): the one thing simulated here.
containerd_pid=
cri_dir=
cri() {
  WGC_CRI_STUBS=$tools/cri "$tools/venv/bin/python" scripts/clients/cri_client.py \
    --endpoint "unix://$cri_dir/containerd.sock" "$@"
}
start_containerd() { # NODE
  local n=$1 d
  cri_dir=$work/node$n/containerd
  mkdir -p "$cri_dir/cni-bin" "$cri_dir/logs"
  cp /usr/lib/cni/host-local /usr/lib/cni/loopback "$cri_dir/cni-bin/"
  printf '#!/bin/sh\nexec %s %s /opt/cni/bin/wg-cni\n' "$work/node-view" "${node_root[$n]}" \
    >"$cri_dir/cni-bin/wg-cni"
  chmod +x "$cri_dir/cni-bin/wg-cni"
  # What containerd makes outside its dirs, removed again on exit (rmdir only).
  for d in /var/lib/cni/results /run/containerd /sys/fs/cgroup/*/; do
    [[ $d == */ ]] && d=${d}k8s.io
    [ -e "$d" ] || new_paths+=("$d")
  done
  # containerd's pod namespaces and libcni cache are the machine's: what appears there from now
  # on is this test's (a failed RunPodSandbox can leave both), removed on exit.
  ip netns list | awk '$1 ~ /^cni-/ {print $1}' | sort >"$work/cri-netns.before"
  ls /var/lib/cni/results 2>/dev/null | sort >"$work/cri-results.before"
  sed -e "s|@WORK@/cni-conf|${node_root[$n]}/etc/cni/net.d|" -e "s|@WORK@/cni-bin|$cri_dir/cni-bin|" \
    -e "s|@WORK@/containerd|$cri_dir|g" -e "s|@IMAGE@|localhost/wg-cni-test-sandbox:1|" \
    scripts/clients/conf/containerd.toml.in >"$cri_dir/config.toml"
  setsid nsenter "--net=/run/netns/${node_ns[$n]}" containerd --config "$cri_dir/config.toml" \
    >"$cri_dir/log" 2>&1 </dev/null &
  containerd_pid=$!
  wait_until 20 cri version >/dev/null 2>&1 || fail "containerd did not start: $(tail -5 "$cri_dir/log")"
  # The sandbox image: Debian's static busybox, sleeping (no registry).
  local rootfs=$cri_dir/rootfs
  for d in bin sbin usr/bin usr/sbin etc proc sys dev; do mkdir -p "$rootfs/$d"; done
  cp /bin/busybox "$rootfs/bin/busybox"
  chroot "$rootfs" /bin/busybox --install -s
  python3 scripts/clients/mkimage.py "$rootfs" "$cri_dir/sandbox.tar" localhost/wg-cni-test-sandbox:1 \
    '["/bin/sleep", "2147483647"]'
  ctr --address "$cri_dir/containerd.sock" --namespace k8s.io images import "$cri_dir/sandbox.tar" \
    >/dev/null || fail "ctr could not import the sandbox image"
}
stop_containerd() {
  [ -n "$containerd_pid" ] || return 0
  local shims
  # Shims outlive containerd; they stay in its session (setsid).
  shims=$(ps -eo pid=,sid= | awk -v s="$containerd_pid" '$2 == s && $1 != s {print $1}')
  kill "$containerd_pid" 2>/dev/null
  wait "$containerd_pid" 2>/dev/null || true
  for p in $shims; do kill -KILL "$p" 2>/dev/null; done
  containerd_pid=
  local ns f
  for ns in $(comm -13 "$work/cri-netns.before" <(ip netns list | awk '$1 ~ /^cni-/ {print $1}' | sort)); do
    [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && ip netns delete "$ns"
  done
  for f in $(comm -13 "$work/cri-results.before" <(ls /var/lib/cni/results 2>/dev/null | sort)); do
    rm -f "/var/lib/cni/results/$f"
  done
  return 0
}

# ------------------------------------------------------------------------------------------
scenario_daemonset() {
  # etcd down, and fresh (a node's agent starts before etcd is reachable).
  stop_etcd
  rm -rf "$work/etcd"
  new_node 1
  new_node 2
  local before1 before2
  before1=$(snapshot 1)
  before2=$(snapshot 2)

  for n in 1 2; do
    start_daemonset "$n"
    for b in wg-cni wg-cni-wgd; do
      cmp -s "${node_root[$n]}/opt/cni/bin/$b" <(podman run --rm --network none \
        --entrypoint '["/bin/busybox", "cat"]' "$image" "/usr/local/bin/$b") || fail "node$n: the install init container did not copy $b"
    done
  done
  pass "the install init container copied the image's plugin and daemon into each node's CNI bin dir"

  # etcd is down: the agents run, but are not ready, and write no conflist.
  sleep 5
  # The config a runtime would get once the agent rendered it.
  render_template node1 "${node_addr[1]}" >"$work/rendered-node1.conflist"
  for n in 1 2; do
    [ "$(podman inspect -f '{{.State.Running}}' "${agent_cid[$n]}")" = true ] ||
      fail "node$n: the agent container exited without etcd: $(podman logs --tail 5 "${agent_cid[$n]}" 2>&1)"
    [ ! -e "$(conflist_of "$n")" ] || fail "node$n: a conflist was written while etcd is down"
    ! ready "$n" || fail "node$n: $probe_path passes while etcd is down"
  done
  code=$(status 1 "$work/rendered-node1.conflist")
  [ "$code" = 50 ] || fail "STATUS before the agent is ready: code $code, expected 50"
  pass "etcd down: agents run, no conflist, $probe_path not ready, STATUS 50"

  start_etcd
  for n in 1 2; do
    wait_until 60 test -e "$(conflist_of "$n")" ||
      fail "node$n: no conflist 60 s after etcd started: $(podman logs --tail 10 "${agent_cid[$n]}" 2>&1)"
    ready "$n" || fail "node$n: the conflist appeared before $probe_path passed"
    code=$(status "$n" "$(conflist_of "$n")")
    [ "$code" = 0 ] || fail "node$n: STATUS with the written conflist: code $code"
    jq -e --arg node "node$n" --arg ip "${node_addr[$n]}" '.cniVersion == "1.0.0"
      and .cniVersions == ["1.0.0", "1.1.0"] and .plugins[0].nodeName == $node
      and .plugins[0].endpoint == $ip' "$(conflist_of "$n")" >/dev/null ||
      fail "node$n: the conflist is not the rendered template: $(cat "$(conflist_of "$n")")"
  done
  pass "etcd up: each node's conflist appears with its agent ready (STATUS 0), nodeName and endpoint rendered"

  local a b
  a=$(add_pod 1 a)
  b=$(add_pod 2 b)
  talk 1 a "$a" 2 b "$b"
  pass "libcni pods on both nodes talk ($a <-> $b)"

  # A pod of containerd's CRI on node 2 (RunPodSandbox: containerd's libcni runs the plugin).
  start_containerd 2
  local sandbox c c_ns
  sandbox=$(cri run-sandbox crip test "$(cat /proc/sys/kernel/random/uuid)" "$cri_dir/logs") ||
    fail "RunPodSandbox on node2"
  cri sandbox-status "$sandbox" >"$work/sandbox.json"
  c=$(jq -r .ip "$work/sandbox.json")
  c_ns=$(jq -r .netns "$work/sandbox.json")
  [ "$(jq -r .state "$work/sandbox.json")" = SANDBOX_READY ] || fail "the CRI sandbox is not ready"
  wait_until 20 pings "$(pod_ns 1 a)" "$c" || fail "a (node1) does not reach the CRI pod at $c"
  wait_until 20 nsenter "--net=$c_ns" ping -c 1 -W 1 "$a" >/dev/null ||
    fail "the CRI pod does not reach a (node1) at $a"
  wait_until 20 nsenter "--net=$c_ns" ping -c 1 -W 1 "$b" >/dev/null ||
    fail "the CRI pod does not reach b (node2) at $b"
  pass "a containerd CRI pod on node2 ($c) talks to the libcni pods on node1 and node2"
  steady 1
  steady 2

  # Each node's agent container restarted (the pod replaced, as an upgrade or a crash does)
  # during a 100 ms ping between the pods: the traffic does not depend on the agent.
  for n in 1 2; do
    ping_loop "$(pod_ns 1 a)" "$b" 300
    sleep 1
    local t0
    t0=$(now_ms)
    podman restart --time "$grace" "${agent_cid[$n]}" >/dev/null || fail "podman restart on node$n"
    wait_until 30 ready "$n" || fail "node$n: the restarted agent is not ready in 30 s"
    local restart_ms=$(($(now_ms) - t0))
    sleep 1
    ping_stop
    ((sent >= restart_ms / 100)) || fail "the ping ended before node$n's agent was back"
    # SIGINT can end the loop with its last request unanswered yet: at most that one.
    ((sent - received <= 1)) || fail "node$n's agent restart lost $((sent - received)) of $sent pings"
    pass "node$n's agent container restarted (ready again in $restart_ms ms): $received of $sent pings answered"
  done

  # Uninstall, as uninstall.yaml's header says: the agents go first (the DaemonSet deleted),
  # the pods are gone, then its command on each node.
  del_pod 1 a
  del_pod 2 b
  cri stop-sandbox "$sandbox" >/dev/null || fail "StopPodSandbox"
  cri remove-sandbox "$sandbox" >/dev/null || fail "RemovePodSandbox"
  stop_containerd
  for n in 1 2; do
    podman rm --force --time "$grace" "${agent_cid[$n]}" >/dev/null
    init_container "$n" wg-cni-uninstall uninstall "$uninstall_manifest"
  done
  for n in 1 2; do
    local before after
    [ "$n" = 1 ] && before=$before1 || before=$before2
    after=$(snapshot "$n")
    diff <(echo "$before") <(echo "$after") >&2 || fail "node$n after uninstall differs from before wg-cni (above: < before, > after)"
  done
  pass "uninstall.yaml's command left each node as before wg-cni (links, rules, routes, iptables, processes, files)"
}

scenario_upgrade() {
  # A fresh etcd: the other scenario's nodes are not part of this cluster.
  stop_etcd
  rm -rf "$work/etcd"
  start_etcd
  new_node 3
  new_node 4
  # Node 3 as wg-cni was installed before this wave (README at OLD_COMMIT): the binaries in the
  # CNI bin dir, the conflist written by hand (the manifest's network: its name, store and
  # ranges; this node's name and address), the agent a process of the host with its flags.
  install -m 0755 "$old_bins/wg-cni" "$old_bins/wg-cni-wgd" "${node_root[3]}/opt/cni/bin/"
  render_template node3 "${node_addr[3]}" >"$(conflist_of 3)"
  # Not through node_exec: a function in the background is a subshell, and $! must be the
  # agent's own pid (node-view and `ip netns exec` exec it).
  "$work/node-view" "${node_root[3]}" ip netns exec "${node_ns[3]}" \
    "$old_bins/wg-cni-agent" --etcd-endpoints "$etcd_url" --node node3 \
    --store /var/lib/cni/wg-cni --cni-conf-dir /etc/cni/net.d --etcd-ca "$pki/ca.crt" \
    --etcd-cert /etc/wg-cni/etcd/node.crt --etcd-key /etc/wg-cni/etcd/node.key \
    >"$work/old-agent.log" 2>&1 &
  local old_agent=$!
  pids+=("$old_agent")
  start_daemonset 4
  wait_until 60 ready 3 || fail "node3's agent ($OLD_COMMIT) is not ready: $(tail -5 "$work/old-agent.log")"
  wait_until 60 test -e "$(conflist_of 4)" || fail "node4: no conflist: $(podman logs --tail 10 "${agent_cid[4]}" 2>&1)"
  local p3 p4
  p3=$(add_pod 3 old)
  p4=$(add_pod 4 new)
  talk 3 old "$p3" 4 new "$p4"
  pass "a pod of the $OLD_COMMIT build (node3) and one of the DaemonSet (node4) talk ($p3 <-> $p4)"

  # The rolling update reaches node 3: its old agent stops, the pod's init container installs
  # the new binaries, the new agent container starts; a 100 ms ping between the pods throughout.
  ping_loop "$(pod_ns 3 old)" "$p4" 900
  sleep 1
  local t0
  t0=$(now_ms)
  kill "$old_agent"
  wait "$old_agent" 2>/dev/null || true
  [ -z "$(ss -N "${node_ns[3]}" -Htln "sport = :$probe_port")" ] ||
    fail "something still listens on node3's port $probe_port after the old agent stopped"
  start_daemonset 3
  wait_until 60 ready 3 || fail "node3's new agent is not ready: $(podman logs --tail 10 "${agent_cid[3]}" 2>&1)"
  wait_until 30 jq -e '.cniVersions' "$(conflist_of 3)" >/dev/null ||
    fail "node3's new agent did not rewrite the conflist from the template"
  local upgrade_ms=$(($(now_ms) - t0))
  sleep 1
  ping_stop
  ((sent >= upgrade_ms / 100)) || fail "the ping ended before node3's upgrade did"
  if ((sent - received > 1)); then
    echo "--- the ping (-D: unix time):" >&2
    grep -v 'bytes from' "$ping_out" | head -20 >&2
    echo "--- node3's new agent:" >&2
    podman logs "${agent_cid[3]}" 2>&1 | head -40 >&2
    echo "--- node4's agent, since:" >&2
    podman logs --since "$(date -d @$((t0 / 1000)) +%FT%T)" "${agent_cid[4]}" 2>&1 | head -40 >&2
    fail "node3's upgrade (from $(date -d @$((t0 / 1000)) +%T.%3N)) lost $((sent - received)) of $sent pings"
  fi
  pass "node3 upgraded from $OLD_COMMIT to the DaemonSet in $upgrade_ms ms: $received of $sent pings answered"

  local q3
  q3=$(add_pod 3 next)
  talk 3 next "$q3" 4 new "$p4"
  talk 3 next "$q3" 3 old "$p3"
  check_old() {
    node_exec 3 env NETCONFPATH=/etc/cni/net.d CNI_PATH=/opt/cni/bin CNI_IFNAME=eth0 "$cnitool" \
      check wg-cni "/var/run/netns/$(pod_ns 3 old)" >"$work/check.out" 2>&1
  }
  # The new agent's first resync gives the old pod's link what this build wants (the gateway
  # peer's session keepalive of on-demand peering): CHECK passes once it ran.
  if ! wait_until 10 check_old; then
    local link
    link=$(jq -r 'select(.pod == "test/old") | .hostName' \
      "${node_root[3]}"/var/lib/cni/wg-cni/wg-cni/node3/*:eth0.json)
    echo "--- the old pod's link $link (peer, endpoint, allowed IPs, keepalive):" >&2
    node_exec 3 wg show "$link" dump | tail -n +2 | cut -f1,3,4,8 >&2
    echo "--- node3's agent:" >&2
    podman logs "${agent_cid[3]}" 2>&1 | tail -40 >&2
    echo "--- the old pod's record:" >&2
    jq -c 'select(.pod == "test/old")' "${node_root[3]}"/var/lib/cni/wg-cni/wg-cni/node3/*:eth0.json >&2
    fail "the new plugin's CHECK of the pod the old one added, for 10 s: $(cat "$work/check.out")"
  fi
  steady 3
  steady 4
  pass "both nodes new: a new pod on node3 talks to node4's and to the old build's pod, which passes CHECK"
  del_pod 3 old
  del_pod 3 next
  del_pod 4 new
  pass "the new plugin deleted the old build's pod"
}

t_all=$(now_ms)
for s in "${scenarios[@]}"; do
  t0=$(now_ms)
  "scenario_$s"
  echo "scenario $s: $((($(now_ms) - t0) / 1000)) s"
done
echo "$passed passed, 0 failed"
