#!/usr/bin/env bash
# Demo: two pods (network namespaces) get a WireGuard link each from wg-cni, ping each other
# over the tunnel, and `wg-cni show` lists them. Everything is removed at the end, also on
# failure. Traffic stays on this machine: the tunnel endpoints are 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
bin=$PWD/target/release/wg-cni

work=$(mktemp -d /tmp/wg-cni-demo.XXXXXX)
pods=(demo-a demo-b)
conf=$work/conf.json
cat >"$conf" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "wgdemo",
  "type": "wg-cni",
  "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.99.0.0/24"}]], "dataDir": "$work/ipam"},
  "endpoint": "127.0.0.1",
  "listenPorts": "54000-54099",
  "store": "$work/store"
}
JSON

cni() { # cni COMMAND POD
  CNI_COMMAND=$1 CNI_CONTAINERID=$2 CNI_NETNS=/var/run/netns/$2 CNI_IFNAME=eth0 \
    CNI_PATH=/usr/lib/cni "$bin" <"$conf"
}

cleanup() {
  for pod in "${pods[@]}"; do
    cni DEL "$pod" >/dev/null 2>&1 || true
    ip netns del "$pod" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

for pod in "${pods[@]}"; do
  ip netns add "$pod"
  echo "== ADD $pod"
  cni ADD "$pod" | jq -c .
done

addr_b=$(ip netns exec demo-b ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
echo "== links inside demo-a (only lo and the tunnel):"
ip netns exec demo-a ip -br link
echo "== demo-a pings demo-b ($addr_b) through the WireGuard tunnel:"
ip netns exec demo-a ping -c 3 -i 0.2 "$addr_b"
echo "== wg-cni show:"
"$bin" show --store "$work/store"
echo "== DEL both pods"
for pod in "${pods[@]}"; do cni DEL "$pod"; done
echo "demo finished: everything removed"
