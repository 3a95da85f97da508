#!/usr/bin/env bash
# `make test-k8s`: wg-cni installed on a real Kubernetes (../shared/k8s: one node, kubelet and
# containerd's CRI) the way README "Install on Kubernetes" tells an operator, then checked
# through Kubernetes only (kubectl, the API, pod logs) and the host's process and link lists:
#   1. the documented install: `make image`, the image loaded into the node's runtime, etcd with
#      TLS and the node's own user and role (README "Per-node credentials"), the node's client
#      credential in /etc/wg-cni/etcd, the Secret and the template's ranges edited in a copy of
#      deploy/kubernetes/wg-cni.yaml, `kubectl apply -f` that copy;
#   2. the node stays NotReady while the agent cannot be ready (its etcd not started yet) and
#      turns Ready only after etcd is up and the agent wrote its conflist;
#   3. a Deployment's pods see only lo and eth0, answer kubelet's readiness probe (HTTP on the
#      pod IP only: the host reaches them over the pod network), and another pod reaches them
#      by pod IP (HTTP and ping);
#   4. `kubectl rollout restart` of the DaemonSet loses no ping of a 100 ms ping between pods;
#   5. deleted pods leave no daemon behind, also after kubelet's sandbox GC (its DELs with an
#      empty CNI_NETNS, 30-60 s after the delete), and no record (the uninstall counts none);
#   6. the documented uninstall (and forget-node) leaves none of wg-cni's host objects: links,
#      daemons, policy rules, iptables rules, the conflist, /run/wg-cni, the binaries.
# Skipped (exit 0, says so) without ../shared/k8s beside the repository. Runs under the shared
# lock /tmp/wgcni-itest.lock (kubelet and containerd touch host-wide state); on any exit it
# brings the cluster down and removes what it made (etcd by pid, host objects, files).
# Its etcd listens on 127.0.0.1:23797 (WG_CNI_K8S_ETCD_PORT; peer port +1), not the cluster's.
# ~4 min, most of it waiting for kubelet's sandbox GC.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
k8s=${WG_CNI_K8S_DIR:-$(dirname "$repo")/shared/k8s}
if [ ! -f "$k8s/cluster.sh" ]; then
  echo "test-k8s: skipped: no Kubernetes for tests at $k8s (../shared/k8s/cluster.sh beside the repository); nothing was tested"
  exit 0
fi
[ "$(id -u)" = 0 ] || {
  echo "test-k8s: must run as root (it runs a kubelet)" >&2
  exit 1
}

t_start=$SECONDS
node=${K8S_NODE_NAME:-k8s-test-node}
ns=wg-cni
etcd_port=${WG_CNI_K8S_ETCD_PORT:-23797}
etcd_url=https://127.0.0.1:$etcd_port
service_cidr=${K8S_SERVICE_CIDR:-10.233.0.0/24}
cluster_range=10.244.0.0/16 # the template's clusterRange (kept as shipped)
work=$repo/target/k8s-e2e
export KUBE_DIR=$repo/target/k8s-cluster # kept between runs: kubectl's venv, images, PKI
release=target/x86_64-unknown-linux-gnu/release
passed=0

step() { echo "=== [$(date +%T) +$((SECONDS - t_start))s] $*"; }
pass() {
  echo "ok: $*"
  passed=$((passed + 1))
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
# wait_until SECONDS WHAT CMD...: polls CMD every 0.5 s; fails naming WHAT on timeout.
wait_until() {
  local limit=$1 what=$2 i
  shift 2
  for ((i = 0; i < limit * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  fail "$what: not within $limit s"
}
# The cluster's processes must not inherit the lock's descriptor (9): it would outlive us.
cluster() { bash "$k8s/cluster.sh" "$@" 9>&-; }

step "prerequisites: Debian packages, the image (make image)"
# etcd (server, etcdctl), openssl for the PKI, host-local and loopback (README: a prerequisite in
# the host's CNI bin dir; Debian ships them in /usr/lib/cni).
scripts/apt-install.sh etcd-server etcd-client openssl containernetworking-plugins iproute2 iptables
make --no-print-directory image
image=$(sed -n 's/^version = "\(.*\)"/localhost\/wg-cni:\1/p' Cargo.toml | head -1)

step "waiting for the shared lock /tmp/wgcni-itest.lock"
exec 9>/tmp/wgcni-itest.lock
flock 9

rm -rf "$work"
mkdir -p "$work/aside" "$work/pki"
etcd_pid=
# What the host had before, so that cleanup removes only what this run made.
had() { [ -e "$1" ] && echo yes || echo no; }
had_cni_bin=$(had /opt/cni/bin)
had_etc_wgcni=$(had /etc/wg-cni)
had_store=$(had /var/lib/cni/wg-cni)
had_run=$(had /run/wg-cni)
had_netns=$(had /run/netns)
made_netns_mount=
wgd_pids() { pgrep -x wg-cni-wgd | sort || true; }
wgd_pids >"$work/wgd.before"
ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort >"$work/links.before"
added_bins=() # what this run put into /opt/cni/bin (removed on exit)
for b in wg-cni wg-cni-wgd; do [ -e /opt/cni/bin/$b ] || added_bins+=("$b"); done

cleanup() {
  local rc=$?
  set +e
  trap - EXIT
  if [ $rc != 0 ] && [ -f "$KUBE_DIR/env.sh" ]; then
    echo "--- state at failure"
    kubectl get nodes -o wide
    kubectl get pods -A -o wide
    kubectl -n $ns get ds -o wide
    kubectl get pods -A -o jsonpath='{range .items[*]}{.metadata.name}: {.status.containerStatuses[*].state.waiting.message}{"\n"}{end}'
    # The host's side, for the diagnosis only (the checks go through Kubernetes).
    echo "--- host: wg-cni show, routes, rules, forwarding, iptables"
    "$release/wg-cni" show --node "$node" 2>&1 | head -60
    ip route
    ip rule
    sysctl net.ipv4.ip_forward
    iptables-save 2>/dev/null | grep -E 'wg-cni|^\*|^:FORWARD'
    for f in "$KUBE_DIR"/var/log/pods/${ns}_*/*/*.log; do
      [ -f "$f" ] && {
        echo "--- $f (last 30 lines)"
        tail -30 "$f"
      }
    done
  fi
  if [ $rc != 0 ] && [ -n "${WG_CNI_K8S_HOLD_ON_FAILURE:-}" ]; then
    # For a person diagnosing: the cluster stays up this long (seconds), then goes as always.
    echo "--- holding the failed cluster for $WG_CNI_K8S_HOLD_ON_FAILURE s (KUBE_DIR=$KUBE_DIR)"
    sleep "$WG_CNI_K8S_HOLD_ON_FAILURE"
  fi
  step "cleanup: cluster down, etcd, wg-cni's host objects"
  [ -f "$KUBE_DIR/state/config.env" ] && cluster down
  if [ -n "$etcd_pid" ] && kill -0 "$etcd_pid" 2>/dev/null; then
    kill "$etcd_pid"
    wait "$etcd_pid" 2>/dev/null
  fi
  # The documented uninstall normally did this; after a failure it may not have run.
  if [ -x "$release/wg-cni" ]; then
    "$release/wg-cni" uninstall --node "$node" --cni-bin-dir /opt/cni/bin >/dev/null 2>&1
  fi
  local b
  for b in "${added_bins[@]}"; do rm -f "/opt/cni/bin/$b"; done
  [ "$had_cni_bin" = no ] && rmdir /opt/cni/bin /opt/cni 2>/dev/null
  rm -f /etc/cni/net.d/10-wg-cni.conflist
  for f in "$work"/aside/*; do [ -e "$f" ] && mv "$f" /etc/cni/net.d/; done
  [ "$had_etc_wgcni" = no ] && rm -rf /etc/wg-cni
  [ "$had_store" = no ] && rm -rf /var/lib/cni/wg-cni
  [ "$had_run" = no ] && rm -rf /run/wg-cni
  [ -n "$made_netns_mount" ] && umount /run/netns
  [ "$had_netns" = no ] && rmdir /run/netns 2>/dev/null
  echo "test-k8s: $((SECONDS - t_start)) s"
  if [ $rc != 0 ]; then
    echo "test-k8s: FAILED (logs: $KUBE_DIR/logs, $work)"
    echo "$passed passed, 1 failed"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A host with wg-cni already on it would be compared against itself.
[ ! -e /etc/cni/net.d/10-wg-cni.conflist ] || fail "/etc/cni/net.d/10-wg-cni.conflist exists before the test: another run's leftover?"
! grep -q '^wgg' "$work/links.before" || fail "a wg-cni node gateway link exists before the test: $(grep '^wgg' "$work/links.before" | tr '\n' ' ')"
! (exec 3<>/dev/tcp/127.0.0.1/9765) 2>/dev/null || fail "127.0.0.1:9765 (the agent's health port) is in use"

step "the node's CNI dirs as an operator prepares them"
# Another CNI's conflist (podman's Debian package ships 87-podman-bridge.conflist) would make
# the node Ready at once (README): set aside for the run, put back on exit.
for f in /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json; do
  [ -e "$f" ] || continue
  echo "setting aside $f"
  mv "$f" "$work/aside/"
done
# The DaemonSet mounts /var/run/netns with HostToContainer propagation, which kubelet allows
# only on a shared or slave mount (README): systemd makes / shared; on this kind of host (no
# systemd, / private) /run/netns is made a shared mount of itself, as `ip netns add` does.
mkdir -p /run/netns
case $(findmnt -n -o PROPAGATION --target /run/netns) in
  shared* | slave* | *,shared* | *,slave*) ;;
  *)
    echo "making /run/netns a shared mount (/ is $(findmnt -n -o PROPAGATION /))"
    mount --bind /run/netns /run/netns
    made_netns_mount=1
    mount --make-shared /run/netns
    ;;
esac
mkdir -p /opt/cni/bin
for b in host-local loopback; do
  if [ ! -e "/opt/cni/bin/$b" ]; then
    cp /usr/lib/cni/$b /opt/cni/bin/$b
    added_bins+=("$b")
  fi
done

step "cluster up ($k8s/cluster.sh, KUBE_DIR=$KUBE_DIR)"
# This cluster's containerd keeps pods' network namespaces under its state dir
# (netns_mounts_under_state_dir), not in /run/netns: as the README says for such a runtime, that
# directory is a shared mount of itself, and the agent mounts it too (edit below). cluster.sh's
# down unmounts everything under KUBE_DIR, this with it.
cri_netns=$KUBE_DIR/containerd/state/io.containerd.grpc.v1.cri/netns
mkdir -p "$cri_netns"
mount --bind "$cri_netns" "$cri_netns"
mount --make-shared "$cri_netns"
cluster up
# shellcheck disable=SC1091
. "$KUBE_DIR/env.sh"
cluster load-image target/image/wg-cni.tar

step "etcd with TLS on 127.0.0.1:$etcd_port, the node's user and role (README)"
pki=$work/pki
(
  cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=wg-cni-test-etcd-ca 2>/dev/null
  sign() { # name CN extensions
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
    printf '%s\n' "$3" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  sign server etcd "subjectAltName=IP:127.0.0.1
extendedKeyUsage=serverAuth,clientAuth"
  sign node "$node" "extendedKeyUsage=clientAuth"
  sign root root "extendedKeyUsage=clientAuth"
  chmod 600 ./*.key
)
start_etcd() {
  etcd --name wg-cni-k8s-test --data-dir "$work/etcd-data" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-cluster "wg-cni-k8s-test=http://127.0.0.1:$((etcd_port + 1))" \
    --listen-metrics-urls '' --cert-file "$pki/server.crt" --key-file "$pki/server.key" \
    --client-cert-auth --trusted-ca-file "$pki/ca.crt" >>"$work/etcd.log" 2>&1 9>&- &
  etcd_pid=$!
  wait_until 30 "etcd on $etcd_url" etcdctl_root endpoint health
}
stop_etcd() {
  kill "$etcd_pid"
  wait "$etcd_pid" 2>/dev/null || true
  etcd_pid=
}
etcdctl_root() {
  ETCDCTL_API=3 etcdctl --endpoints "$etcd_url" --cacert "$pki/ca.crt" --cert "$pki/root.crt" \
    --key "$pki/root.key" --dial-timeout 2s --command-timeout 5s "$@"
}
start_etcd
# README "Per-node credentials", for network wg-cni (the template's name) and this node: the
# node's role and user (no password: its client certificate's common name is the user).
"$release/wg-cni-agent" --etcd-endpoints "$etcd_url" --etcd-ca "$pki/ca.crt" \
  --etcd-cert "$pki/root.crt" --etcd-key "$pki/root.key" grant-node "$node" --network wg-cni
etcdctl_root user add "root:$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
etcdctl_root user grant-role root root >/dev/null
etcdctl_root auth enable >/dev/null
# Node provisioning places the node's own client credential (README).
install -d -m 0700 /etc/wg-cni/etcd
install -m 0600 "$pki/node.crt" /etc/wg-cni/etcd/node.crt
install -m 0600 "$pki/node.key" /etc/wg-cni/etcd/node.key
# Stopped again until step 2 shows that the node waits for the agent.
stop_etcd
pass "etcd with TLS, client-cert auth and the node's user and role; credential in /etc/wg-cni/etcd"

step "kubectl apply -f wg-cni.yaml (a copy with the Secret and the template's serviceRange edited)"
# README: "edit the Secret wg-cni-etcd in wg-cni.yaml (etcd's endpoints and CA) and the
# template's clusterRange and serviceRange". Each edit must match exactly once.
python3 - deploy/kubernetes/wg-cni.yaml "$work/wg-cni.yaml" "$etcd_url" "$pki/ca.crt" "$service_cidr" "$cluster_range" "$cri_netns" <<'EOF'
import sys
src, dst, endpoints, ca, service, cluster, cri_netns = sys.argv[1:]
text = open(src).read()
pem = "".join("    " + line + "\n" for line in open(ca).read().strip().splitlines())
edits = [
    ("  endpoints: https://etcd.example.internal:2379\n", f"  endpoints: {endpoints}\n"),
    ("    -----BEGIN CERTIFICATE-----\n    (replace: the PEM of the CA that signed etcd's server certificate)\n    -----END CERTIFICATE-----\n", pem),
    ('"serviceRange": "10.96.0.0/12"', f'"serviceRange": "{service}"'),
    (f'"clusterRange": "{cluster}"', f'"clusterRange": "{cluster}"'),
    # README: a runtime that keeps pods' network namespaces elsewhere than /run/netns: mount
    # that directory too, at its own path.
    ("              mountPath: /var/run/netns\n              mountPropagation: HostToContainer\n",
     "              mountPath: /var/run/netns\n              mountPropagation: HostToContainer\n"
     f"            - name: runtime-netns\n              mountPath: {cri_netns}\n"
     "              mountPropagation: HostToContainer\n"),
    ("        - name: netns\n          hostPath:\n            path: /run/netns\n            type: DirectoryOrCreate\n",
     "        - name: netns\n          hostPath:\n            path: /run/netns\n            type: DirectoryOrCreate\n"
     f"        - name: runtime-netns\n          hostPath:\n            path: {cri_netns}\n            type: Directory\n"),
]
for old, new in edits:
    if text.count(old) != 1:
        sys.exit(f"{src}: expected exactly one {old.strip()!r} to edit (the README's install steps changed?)")
    text = text.replace(old, new)
open(dst, "w").write(text)
EOF
kubectl apply -f "$work/wg-cni.yaml"

step "the node waits for the agent: NotReady while etcd is down"
# Pod logs (kubelet's, as `kubectl logs` would show them: kubelet listens on 127.0.0.1 only, so
# the API server cannot stream them here). podlog NAMESPACE POD CONTAINER -> the messages.
podlog() {
  local uid
  uid=$(kubectl -n "$1" get pod "$2" -o jsonpath='{.metadata.uid}')
  cat "$KUBE_DIR/var/log/pods/${1}_${2}_${uid}/$3/"*.log 2>/dev/null | cut -d' ' -f4-
}
agent_pod() { kubectl -n $ns get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}'; }
agent_running() { [ "$(kubectl -n $ns get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].status.containerStatuses[0].state.running.startedAt}')" != "" ]; }
wait_until 90 "the agent container running (init container: wg-cni install)" agent_running
node_ready() { kubectl get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
for _ in $(seq 8); do
  [ "$(node_ready)" != True ] || fail "node $node turned Ready while the agent cannot reach etcd"
  sleep 1
done
pod=$(agent_pod)
[ "$(kubectl -n $ns get pod "$pod" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = False ] ||
  fail "agent pod $pod is Ready without etcd"
# Not ready for the right reason: up and retrying etcd, not crashing.
podlog $ns "$pod" agent | grep -qE 'etcd.*retrying' ||
  fail "the agent does not say it is waiting for etcd: $(podlog $ns "$pod" agent | tail -3)"
[ "$(kubectl -n $ns get pod "$pod" -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 0 ] ||
  fail "the agent container restarted: $(podlog $ns "$pod" agent | tail -3)"
msg=$(kubectl get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}')
echo "node $node: NotReady: $msg"
[[ $msg == *"cni plugin not initialized"* ]] || fail "the node is NotReady for another reason than its network: $msg"
[ -x /opt/cni/bin/wg-cni ] && [ -x /opt/cni/bin/wg-cni-wgd ] || fail "the install init container did not put wg-cni and wg-cni-wgd into /opt/cni/bin"
pass "node NotReady (cni plugin not initialized) while the agent is running but not ready; binaries installed"

step "etcd up: the agent turns ready, then the node"
etcd_up_at=$(date +%s)
start_etcd
kubectl -n $ns rollout status daemonset wg-cni --timeout=120s
kubectl wait --for=condition=Ready node --all --timeout=60s
ready_at=$(date -d "$(kubectl get node "$node" -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')" +%s)
[ "$ready_at" -ge "$etcd_up_at" ] || fail "node Ready since $ready_at, before etcd started ($etcd_up_at)"
pass "node Ready $((ready_at - etcd_up_at)) s after etcd started, agent pod Ready"

step "a Deployment: pods with only lo and eth0, ready through a probe over the pod network"
kubectl apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      dnsPolicy: Default
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: localhost/busybox:1
        imagePullPolicy: Never
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        # httpd on the pod IP only: kubelet's probe passes only over the pod network.
        command: [sh, -c, 'echo "links: $(ip -o link | cut -d: -f2 | sed "s/@.*//" | tr -d " " | sort | tr "\n" " ")"; mkdir -p /www; hostname > /www/index.html; exec httpd -f -p "$POD_IP:8080" -h /www']
        readinessProbe: {httpGet: {path: /index.html, port: 8080}, periodSeconds: 2, failureThreshold: 2}
EOF
kubectl rollout status deployment echo --timeout=90s
mapfile -t echo_pods < <(kubectl get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
[ ${#echo_pods[@]} = 2 ] || fail "expected 2 echo pods, got ${echo_pods[*]}"
ips=()
for p in "${echo_pods[@]}"; do
  ip=$(kubectl get pod "$p" -o jsonpath='{.status.podIP}')
  python3 -c "import ipaddress,sys; sys.exit(ipaddress.ip_address('$ip') not in ipaddress.ip_network('$cluster_range'))" ||
    fail "pod $p has IP $ip, outside clusterRange $cluster_range"
  links=$(podlog default "$p" echo | sed -n 's/^links: //p')
  [ "$links" = "eth0 lo " ] || fail "pod $p sees links '$links', expected only eth0 and lo"
  ips+=("$ip")
done
pass "2 pods Ready via kubelet's HTTP probe on their pod IPs (${ips[*]}), each sees only lo and eth0"

step "pod to pod by IP: HTTP and ping, then a 100 ms ping across a DaemonSet rolling restart"
kubectl apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: pinger, namespace: default}
spec:
  dnsPolicy: Default
  terminationGracePeriodSeconds: 1
  containers:
  - name: pinger
    image: localhost/busybox:1
    imagePullPolicy: Never
    env: [{name: PEERS, value: "${ips[*]}"}]
    # Each peer: up to 20 s of tries. HTTP by hand over nc: Debian's busybox-static wget
    # segfaults (on the host as well).
    command: [sh, -c, 'for ip in \$PEERS; do n=1; until page=\$(printf "GET /index.html HTTP/1.0\r\n\r\n" | nc -w 2 \$ip 8080 | tail -n 1) && [ -n "\$page" ]; do [ \$n -ge 20 ] && break; n=\$((n+1)); sleep 1; done; echo "http \$ip: \$page"; echo "tries \$ip: \$n"; ping -c 2 -W 2 \$ip >/dev/null && echo "ping \$ip: ok"; done; echo checks done; exec ping -i 0.1 \${PEERS%% *}']
EOF
kubectl wait --for=condition=Ready pod/pinger --timeout=60s
pinger_done() { podlog default pinger pinger | grep -q 'checks done'; }
wait_until 60 "the pinger's checks" pinger_done
podlog default pinger pinger | grep '^tries'
for i in 0 1; do
  podlog default pinger pinger | grep -qx "http ${ips[$i]}: ${echo_pods[$i]}" ||
    fail "pinger could not fetch ${echo_pods[$i]}'s page at ${ips[$i]}: $(podlog default pinger pinger | grep "http ${ips[$i]}")"
  podlog default pinger pinger | grep -qx "ping ${ips[$i]}: ok" || fail "pinger could not ping ${ips[$i]}"
done
pass "a third pod reaches both by pod IP (HTTP page names the pod; ping)"

# The seq numbers of ping's replies so far; a lost ping is a missing number.
seqs() { podlog default pinger pinger | sed -n 's/.* seq=\([0-9]*\) .*/\1/p'; }
answered() { [ -n "$(seqs)" ]; }
wait_until 10 "the 100 ms ping answered" answered
old_agent=$(agent_pod)
first=$(seqs | tail -1)
kubectl -n $ns rollout restart daemonset wg-cni
kubectl -n $ns rollout status daemonset wg-cni --timeout=120s
new_agent=$(agent_pod)
[ "$new_agent" != "$old_agent" ] || fail "the rollout did not replace the agent pod $old_agent"
sleep 2 # pings sent after the new agent is ready
seqs >"$work/seqs"
last=$(tail -1 "$work/seqs")
missing=$(awk -v a="$first" -v b="$last" '{seen[$1]=1} END {for (i=a; i<=b; i++) if (!(i in seen)) n++; print n+0}' "$work/seqs")
echo "ping seq $first..$last across the restart ($old_agent -> $new_agent): $missing missing"
[ "$last" -gt "$((first + 20))" ] || fail "the ping stopped at seq $last (started at $first)"
[ "$missing" = 0 ] || fail "$missing of $((last - first + 1)) pings lost across the DaemonSet rolling restart"
kubectl wait --for=condition=Ready node --all --timeout=10s >/dev/null
pass "rolling restart of the DaemonSet: $((last - first + 1)) pings at 100 ms, none lost; node still Ready"

step "kubectl view"
{
  kubectl get nodes -o wide
  echo
  kubectl -n $ns get daemonset -o wide
  echo
  kubectl get pods -A -o wide
} | tee "$work/kubectl-view.txt"

step "deleting the pods: their daemons go, and stay gone after kubelet's sandbox GC"
kubectl delete pod pinger --wait=true --timeout=60s
kubectl delete deployment echo --wait=true --timeout=60s
echo_gone() { [ -z "$(kubectl get pods -l app=echo -o name)" ]; }
wait_until 60 "echo pods gone" echo_gone
# The node gateway's daemon is the only wg-cni-wgd this run may leave while the agent runs.
new_wgd() { wgd_pids | comm -13 "$work/wgd.before" -; }
only_gateway_wgd() { [ "$(new_wgd | wc -l)" -le 1 ]; }
wait_until 30 "the pods' wg-cni-wgd daemons gone" only_gateway_wgd
# kubelet's sandbox GC removes the pods' sandboxes (another DEL, with an empty CNI_NETNS).
sandboxes() { ctr --address "$KUBE_DIR/run/containerd/containerd.sock" -n k8s.io containers ls -q | wc -l; }
# The agent's two containers (install done, agent) and its sandbox stay.
gc_start=$SECONDS
gc_done() { [ "$(sandboxes)" -le 3 ]; }
wait_until 150 "kubelet's sandbox GC of the deleted pods" gc_done
echo "sandbox GC done after $((SECONDS - gc_start)) s"
sleep 2
[ "$(new_wgd | wc -l)" -le 1 ] || fail "wg-cni-wgd daemons left after the sandbox GC: $(new_wgd | tr '\n' ' ')"
if grep -E 'failed to destroy network|Failed to destroy network|failed to remove network' "$KUBE_DIR/logs/containerd.log" | grep -v 'cni plugin not initialized' >"$work/del-errors"; then
  fail "containerd reports failed DELs: $(head -3 "$work/del-errors")"
fi
pass "no pod daemon left after the delete and kubelet's sandbox GC; every DEL succeeded"

step "uninstall as documented"
kubectl -n $ns delete daemonset wg-cni --wait=true --timeout=60s
agent_gone() { [ -z "$(kubectl -n $ns get pods -l app.kubernetes.io/component=agent -o name)" ]; }
wait_until 60 "the agent pod gone" agent_gone
kubectl apply -f deploy/kubernetes/uninstall.yaml
kubectl -n $ns rollout status daemonset wg-cni-uninstall --timeout=120s
upod=$(kubectl -n $ns get pods -l app.kubernetes.io/component=uninstall -o jsonpath='{.items[0].metadata.name}')
podlog $ns "$upod" uninstall | tee "$work/uninstall.log"
! grep -q 'pod attachment(s) remain' "$work/uninstall.log" || fail "uninstall found pod records left on the node"
kubectl delete --ignore-not-found -f deploy/kubernetes/uninstall.yaml -f "$work/wg-cni.yaml" --wait=true --timeout=60s
# README: forget-node once the stopped agent's liveness lease lapsed (--lease-ttl, 15 s): it
# refuses a node whose node key still exists.
forget() {
  "$release/wg-cni-agent" forget-node "$node" --etcd-endpoints "$etcd_url" --etcd-ca "$pki/ca.crt" \
    --etcd-cert "$pki/root.crt" --etcd-key "$pki/root.key"
}
wait_until 40 "forget-node (the agent's lease lapsed)" forget
pass "uninstall DaemonSet rolled out on every node and was deleted with wg-cni.yaml; forget-node done"

step "the host has none of wg-cni's objects left"
left=()
ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | sort | comm -13 "$work/links.before" - >"$work/links.new"
[ ! -s "$work/links.new" ] || left+=("links: $(tr '\n' ' ' <"$work/links.new")")
[ -z "$(new_wgd)" ] || left+=("wg-cni-wgd daemons: $(new_wgd | tr '\n' ' ')")
rules=$({ ip rule; ip -6 rule; } | grep 'wgg' || true)
[ -z "$rules" ] || left+=("policy rules: $rules")
for save in iptables-legacy-save ip6tables-legacy-save iptables-nft-save ip6tables-nft-save; do
  command -v $save >/dev/null || continue
  n=$($save 2>/dev/null | grep -c -- '--comment "\?wg-cni' || true)
  [ "$n" = 0 ] || left+=("$n $save rules with a wg-cni comment")
done
[ ! -e /etc/cni/net.d/10-wg-cni.conflist ] || left+=("the conflist /etc/cni/net.d/10-wg-cni.conflist")
[ "$had_run" = yes ] || [ ! -e /run/wg-cni ] || left+=("/run/wg-cni")
for b in wg-cni wg-cni-wgd; do [ ! -e /opt/cni/bin/$b ] || left+=("/opt/cni/bin/$b"); done
[ ${#left[@]} = 0 ] || fail "left on the host after uninstall: ${left[*]}"
pass "no wg-cni link, daemon, policy rule, iptables rule, conflist, /run/wg-cni or binary left"

echo
cat "$work/kubectl-view.txt"
echo
echo "test-k8s: $passed checks on a real Kubernetes in $((SECONDS - t_start)) s"
echo "$passed passed, 0 failed"
