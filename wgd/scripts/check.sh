#!/usr/bin/env bash
# Behaviour checks of wg-cni-wgd as wg-cni uses it (namespaces wgd-c*, removed on exit):
# socket mode, wg show/set, a taken listen_port answered as EADDRINUSE without harm, the TUN
# moved into another namespace and renamed, SIGTERM cleanup, exit when the TUN's namespace
# goes away. Prints "N passed, N failed".
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WGD=${WGD:-$HERE/../target/x86_64-unknown-linux-gnu/release/wg-cni-wgd}
SOCK=/var/run/wireguard/wgdc.sock
PASS=0 FAIL=0 PID= HOLD=

cleanup() {
    [ -n "$HOLD" ] && kill "$HOLD" 2>/dev/null
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && sleep 0.3
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null
    ip netns del wgd-ch 2>/dev/null
    ip netns del wgd-cp 2>/dev/null
    rm -f "$SOCK"
    true
}
trap cleanup EXIT INT TERM

ok() { if "$@"; then PASS=$((PASS + 1)); echo "ok   $CHECK"; else FAIL=$((FAIL + 1)); echo "FAIL $CHECK"; fi; }
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
uapi() { python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode().decode("unicode_escape").encode())
out = b""
while not out.endswith(b"\n\n"):
    d = s.recv(65536)
    if not d: break
    out += d
print(out.decode(), end="")' "$SOCK" "$1"; }
start() {
    ip netns exec wgd-ch "$WGD" -f wgdc 2>/tmp/wgd-check.log &
    PID=$!
    for _ in $(seq 2000); do [ -S "$SOCK" ] && break; sleep 0.001; done
}

cleanup
ip netns add wgd-ch
ip netns add wgd-cp
nsx wgd-ch ip link set lo up
start

CHECK="socket is mode 0600"; ok [ "$(stat -c %a "$SOCK")" = 600 ]
CHECK="TUN wgdc exists in the start namespace"; ok bash -c "ip netns exec wgd-ch ip link show wgdc >/dev/null"
KEY=$(wg genkey)
CHECK="wg set private-key and listen-port"; ok nsx wgd-ch wg set wgdc private-key <(echo "$KEY") listen-port 51830
CHECK="wg show reports the public key and port"
ok [ "$(nsx wgd-ch wg show wgdc public-key)" = "$(echo "$KEY" | wg pubkey)" -a "$(nsx wgd-ch wg show wgdc listen-port)" = 51830 ]
CHECK="UDP socket bound in the start namespace"; ok bash -c "ip netns exec wgd-ch ss -uln | grep -q ':51830 '"

# Hold port 51831 with another socket, then ask for it.
nsx wgd-ch python3 -c 'import socket,time; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(("::", 51831)); time.sleep(30)' &
HOLD=$!
sleep 0.3
CHECK="taken listen_port answers errno=98"; ok [ "$(uapi 'set=1\nlisten_port=51831\n\n')" = "$(printf 'errno=98\n')" ]
CHECK="wg set on a taken port fails"; ok bash -c "! ip netns exec wgd-ch wg set wgdc listen-port 51831 2>/dev/null"
CHECK="daemon alive after EADDRINUSE"; ok kill -0 "$PID"
CHECK="port unchanged after EADDRINUSE"; ok [ "$(nsx wgd-ch wg show wgdc listen-port)" = 51830 ]
kill "$HOLD"; wait "$HOLD" 2>/dev/null; HOLD=
nsx wgd-ch python3 -c 'import socket,time; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 51834)); time.sleep(30)' &
HOLD=$!
sleep 0.3
CHECK="a port held by an IPv4-only socket answers errno=98"; ok [ "$(uapi 'set=1\nlisten_port=51834\n\n')" = "$(printf 'errno=98\n')" ]
kill "$HOLD"; wait "$HOLD" 2>/dev/null; HOLD=
CHECK="a free port is taken"; ok nsx wgd-ch wg set wgdc listen-port 51832
CHECK="the new port is reported"; ok [ "$(nsx wgd-ch wg show wgdc listen-port)" = 51832 ]

PEER=$(wg genkey | wg pubkey)
CHECK="peers via wg set"; ok nsx wgd-ch wg set wgdc peer "$PEER" allowed-ips 10.219.0.2/32 endpoint 127.0.0.1:51999 persistent-keepalive 25
CHECK="peer listed with allowed ip"; ok bash -c "ip netns exec wgd-ch wg show wgdc allowed-ips | grep -q 10.219.0.2/32"
CHECK="get=1 answer ends with errno=0"; ok [ "$(uapi 'get=1\n\n' | grep . | tail -1)" = errno=0 ]

# Move and rename the TUN like the plugin does.
nsx wgd-ch ip link set wgdc mtu 1420
nsx wgd-ch ip link set wgdc netns wgd-cp
nsx wgd-cp ip link set wgdc name eth9
nsx wgd-cp ip link set eth9 up
CHECK="TUN moved and renamed"; ok bash -c "ip netns exec wgd-cp ip link show eth9 >/dev/null"
CHECK="offloads still on after the move"; ok bash -c "ip netns exec wgd-cp ethtool -k eth9 2>/dev/null | grep -q 'tcp-segmentation-offload: on' || ! command -v ethtool >/dev/null"
CHECK="UAPI still answers after the move"; ok [ "$(nsx wgd-ch wg show wgdc peers)" = "$PEER" ]
CHECK="UDP socket still in the start namespace"; ok bash -c "ip netns exec wgd-ch ss -uln | grep -q ':51832 '"

kill -TERM "$PID"
for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.02; done
wait "$PID"; RC=$?
CHECK="SIGTERM exits 0"; ok [ "$RC" = 0 ]
PID=
CHECK="socket removed on exit"; ok [ ! -e "$SOCK" ]
CHECK="TUN gone on exit (from the pod namespace)"; ok bash -c "! ip netns exec wgd-cp ip link show eth9 >/dev/null 2>&1"

# The pod namespace goes away: the daemon notices its TUN vanished and exits.
start
nsx wgd-ch ip link set wgdc netns wgd-cp
ip netns del wgd-cp
# Namespaces are dismantled asynchronously by the kernel: allow it some seconds.
for _ in $(seq 500); do kill -0 "$PID" 2>/dev/null || break; sleep 0.02; done
CHECK="exits when its TUN's namespace is deleted"; ok bash -c "! kill -0 $PID 2>/dev/null"
wait "$PID" 2>/dev/null; PID=
CHECK="socket removed then"; ok [ ! -e "$SOCK" ]

start
CHECK="a peer before any private key is refused (errno=22)"
ok [ "$(uapi "set=1\npublic_key=$(echo "$PEER" | base64 -d | xxd -p -c 64)\nallowed_ip=10.219.0.3/32\n\n")" = "$(printf 'errno=22\n')" ]
CHECK="daemon alive after that"; ok kill -0 "$PID"
CHECK="garbage is answered with an errno"; ok bash -c "[ \"\$(python3 -c '
import socket; s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(\"$SOCK\"); s.sendall(b\"bogus=1\n\n\"); print(s.recv(100).decode().split(chr(10))[0])')\" = errno=71 ]"
CHECK="private key never in argv/env/logs"; ok bash -c "! grep -q \"$KEY\" /tmp/wgd-check.log /proc/$PID/cmdline /proc/$PID/environ 2>/dev/null"

# The request shape wg-cni's own client sends (src/wireguard/uapi.rs), then a get.
hex() { echo "$1" | base64 -d | xxd -p -c 64; }
K=$(wg genkey); P1=$(wg genkey | wg pubkey); P2=$(wg genkey | wg pubkey); PSK=$(wg genpsk)
REQ="set=1\nprivate_key=$(hex "$K")\nlisten_port=51833\nreplace_peers=true\npublic_key=$(hex "$P1")\nreplace_allowed_ips=true\nendpoint=10.219.1.1:51820\npersistent_keepalive_interval=25\npreshared_key=$(hex "$PSK")\nallowed_ip=10.219.2.0/24\nallowed_ip=fd00:219::/64\npublic_key=$(hex "$P2")\nreplace_allowed_ips=true\nendpoint=[fd00:219::1]:51820\nallowed_ip=10.219.3.1/32\n\n"
CHECK="wg-cni's set request is accepted"; ok [ "$(uapi "$REQ")" = errno=0 ]
GET=$(uapi 'get=1\n\n')
CHECK="get: listen_port"; ok grep -qx listen_port=51833 <<<"$GET"
CHECK="get: both peers with endpoints, keepalive, psk, allowed ips"
ok bash -c "grep -qx 'endpoint=10.219.1.1:51820' <<<'$GET' && grep -qx 'endpoint=\[fd00:219::1\]:51820' <<<'$GET' && grep -qx persistent_keepalive_interval=25 <<<'$GET' && grep -qx 'preshared_key=$(hex "$PSK")' <<<'$GET' && grep -qx allowed_ip=fd00:219::/64 <<<'$GET' && grep -qx allowed_ip=10.219.3.1/32 <<<'$GET'"
CHECK="remove=true removes a peer"; ok [ "$(uapi "set=1\npublic_key=$(hex "$P1")\nremove=true\n\n")" = errno=0 ]
CHECK="one peer left"; ok [ "$(nsx wgd-ch wg show wgdc peers)" = "$P2" ]
CHECK="replace_peers=true empties the list"; ok [ "$(uapi 'set=1\nreplace_peers=true\n\n')" = errno=0 ]
CHECK="no peer left"; ok [ -z "$(nsx wgd-ch wg show wgdc peers)" ]
CHECK="two requests on one connection are both answered"
ok [ "$(python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"get=1\n\nget=1\n\n"); time.sleep(0.3); s.shutdown(socket.SHUT_WR)
out = b""
while True:
    d = s.recv(65536)
    if not d: break
    out += d
print(out.count(b"errno=0\n"))' "$SOCK")" = 2 ]

echo "$PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
