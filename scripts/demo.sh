#!/usr/bin/env bash
# Demo: two simulated nodes (network namespaces on a bridge), each with its own `wg-cni agent`,
# store and conflist, a real etcd (Debian's) in a namespace of its own, and two pods per node.
# The pods ping each other across the nodes over WireGuard, `wg-cni show` on node 1 labels
# every peer, and everything is removed at the end, also on failure. Traffic stays inside the
# namespaces made here (the underlay is 10.240.0.0/24 on a bridge in its own namespace).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
scripts/install-wgd.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
bin=$PWD/target/x86_64-unknown-linux-gnu/release/wg-cni

work=$(mktemp -d /tmp/wg-cni-demo.XXXXXX)
id=$$
underlay=wgdemo-u$id etcd_ns=wgdemo-e$id
nodes=(node1 node2)
net=wgdemo
etcd_url=http://10.240.0.2:23790
pids=()

node_ns() { echo "wgdemo-$1-$id"; }
pod_ns() { echo "wgdemo-$1-$id"; } # pod names: n1a n1b n2a n2b

conf() { # conf NODE INDEX: the network's single-plugin config on that node
  cat <<JSON
{
  "cniVersion": "1.0.0", "name": "$net", "type": "wg-cni",
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.241.$2.0/24"}]], "dataDir": "$work/$1/ipam"},
  "endpoint": "10.240.0.1$2", "mtu": 1420, "listenPorts": "54000-54099",
  "store": "$work/$1/store", "nodeName": "$1", "clusterRange": "10.241.0.0/16"
}
JSON
}

cni() { # cni COMMAND NODE INDEX POD
  conf "$2" "$3" | ip netns exec "$(node_ns "$2")" env CNI_COMMAND="$1" CNI_CONTAINERID="$4" \
    CNI_NETNS="/var/run/netns/$(pod_ns "$4")" CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni "$bin"
}

cleanup() {
  set +e
  for i in 1 2; do
    for p in a b; do cni DEL "node$i" "$i" "n$i$p" >/dev/null 2>&1; ip netns del "$(pod_ns "n$i$p")" 2>/dev/null; done
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
  # The agents keep each node's gateway; stop its daemon by the pid its record names.
  for f in "$work"/node*/store/$net/node*/gateway.json; do
    [[ -f $f ]] && kill "$(jq -r '.daemonPid // empty' "$f")" 2>/dev/null
  done
  for ns in $(node_ns node1) $(node_ns node2) "$etcd_ns" "$underlay"; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

attach() { # attach NETNS PORT ADDR: a veth from the bridge into NETNS as eth0
  ip netns add "$1"
  ip -n "$underlay" link add "$2" type veth peer name eth0 netns "$1"
  ip -n "$underlay" link set "$2" master br0 up
  ip -n "$1" addr add "$3/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" link set lo up
}

echo "== underlay: a bridge, etcd on 10.240.0.2, node1 on 10.240.0.11, node2 on 10.240.0.12"
ip netns add "$underlay"
ip -n "$underlay" link add br0 type bridge
ip -n "$underlay" link set br0 up
attach "$etcd_ns" e0 10.240.0.2
ip netns exec "$etcd_ns" etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
  --initial-cluster demo=http://127.0.0.1:23800 >"$work/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do
  ip netns exec "$etcd_ns" etcdctl --endpoints "$etcd_url" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

for i in 1 2; do
  node=node$i
  attach "$(node_ns $node)" "n$i" "10.240.0.1$i"
  mkdir -p "$work/$node/net.d"
  conf "$node" "$i" | jq '{cniVersion, name, plugins: [del(.cniVersion, .name)]}' >"$work/$node/net.d/10-wg.conflist"
  echo "== $node: wg-cni agent (its log: $work/$node/agent.log while the demo runs)"
  ip netns exec "$(node_ns $node)" "$bin" agent --etcd-endpoints "$etcd_url" --node "$node" \
    --store "$work/$node/store" --cni-conf-dir "$work/$node/net.d" --lease-ttl 5 --resync-interval 5 \
    >"$work/$node/agent.log" 2>&1 &
  pids+=($!)
done

for i in 1 2; do
  for p in a b; do
    ip netns add "$(pod_ns "n$i$p")"
    printf '== ADD pod n%s%s on node%s: ' "$i" "$p" "$i"
    cni ADD "node$i" "$i" "n$i$p" | jq -c '{ips: [.ips[].address], routes: [.routes[].dst]}'
  done
done

addr() { ip -n "$(pod_ns "$1")" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1; }
echo "== links inside pod n1a (only lo and the tunnel):"
ip -n "$(pod_ns n1a)" -br link
echo "== every pod pings every other pod, across the nodes (waits up to 20 s for the agents):"
for src in n1a n1b n2a n2b; do
  for dst in n1a n1b n2a n2b; do
    [[ $src == "$dst" ]] && continue
    ok=0
    for _ in $(seq 20); do
      if ip netns exec "$(pod_ns $src)" ping -c 1 -W 1 "$(addr $dst)" >/dev/null 2>&1; then ok=1; break; fi
    done
    ((ok)) || { echo "   $src -> $dst ($(addr $dst)): no answer"; exit 1; }
    echo "   $src -> $dst ($(addr $dst)): ok"
  done
done
echo "== wg-cni show on node1 (what each peer is):"
ip netns exec "$(node_ns node1)" "$bin" show --store "$work/node1/store" --node node1
echo "== etcd holds the public records:"
ip netns exec "$etcd_ns" etcdctl --endpoints "$etcd_url" get --prefix --keys-only /wg-cni/v1/ | grep -v '^$'
echo "demo finished: cleaning up"
