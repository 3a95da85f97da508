#!/usr/bin/env bash
# Measures wg-cni-wgd against wireguard-go and the plain veth, the way wg-cni wires pods:
# the daemon starts in a "host" namespace, its TUN is configured there (MTU 1420), moved into
# a "pod" namespace and renamed; UDP between the two hosts runs over a veth pair.
#
#   wgd-h1 (10.213.0.1) ==veth== wgd-h2 (10.213.0.2)      daemons and their UDP sockets
#   wgd-p1 (wg0 10.214.0.1)       wgd-p2 (wg0 10.214.0.2)  TUNs after the move
#
# All traffic stays inside the namespaces created here (named wgd-*); everything is removed
# on exit. iperf3: one TCP stream, 10 s, server bound to the pod address, -1 (one test).
#
# usage: throughput.sh [all|wgd|wggo|veth|rss|startup|uso|rekey] ...   (default: all)
# env:   FAMILY=6: IPv6 underlay endpoints and IPv6 inside the tunnel (default 4)
#        WGD=path to wg-cni-wgd (default: ../target/x86_64-unknown-linux-gnu/release/wg-cni-wgd), SECONDS_RUN=10,
#        WGD_ENV="WGD_UDP_GSO=0 ..." extra environment for wg-cni-wgd (offload knobs)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
WGD=${WGD:-$HERE/../target/x86_64-unknown-linux-gnu/release/wg-cni-wgd}
WGGO=${WGGO:-$(command -v wireguard-go || true)}
RUN=${SECONDS_RUN:-10}
WGD_ENV=${WGD_ENV:-}
NS="wgd-h1 wgd-h2 wgd-p1 wgd-p2 wgd-r"
PIDS=()
TMP=$(mktemp -d /tmp/wgd-tp.XXXXXX)
HZ=$(getconf CLK_TCK)

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    done
    PIDS=()
    for ns in $NS; do ip netns del "$ns" 2>/dev/null || true; done
    rm -f /var/run/wireguard/wgdt1.sock /var/run/wireguard/wgdt2.sock /var/run/wireguard/wgdr.sock
}
trap 'cleanup; rm -rf "$TMP"' EXIT INT TERM

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

underlay() {
    cleanup
    for ns in wgd-h1 wgd-h2 wgd-p1 wgd-p2; do ip netns add "$ns"; nsx "$ns" ip link set lo up; done
    ip link add wgd-v1 netns wgd-h1 type veth peer name wgd-v2 netns wgd-h2
    nsx wgd-h1 ip addr add 10.213.0.1/24 dev wgd-v1
    nsx wgd-h2 ip addr add 10.213.0.2/24 dev wgd-v2
    nsx wgd-h1 ip addr add fd00:213::1/64 dev wgd-v1 nodad
    nsx wgd-h2 ip addr add fd00:213::2/64 dev wgd-v2 nodad
    nsx wgd-h1 ip link set wgd-v1 up
    nsx wgd-h2 ip link set wgd-v2 up
}

# start_daemon KIND HOSTNS NAME -> pid in $DPID; waits for the UAPI socket.
start_daemon() {
    local kind=$1 ns=$2 name=$3 t0 t1
    t0=$(date +%s%N)
    if [ "$kind" = wgd ]; then
        # shellcheck disable=SC2086
        ip netns exec "$ns" env $WGD_ENV "$WGD" -f "$name" >"$TMP/$name.log" 2>&1 &
    else
        ip netns exec "$ns" env LOG_LEVEL=error "$WGGO" -f "$name" >"$TMP/$name.log" 2>&1 &
    fi
    DPID=$!
    PIDS+=("$DPID")
    for _ in $(seq 5000); do
        nsx "$ns" wg show "$name" >/dev/null 2>&1 && break
        sleep 0.001
    done
    t1=$(date +%s%N)
    STARTUP_MS=$(( (t1 - t0) / 1000000 ))
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# tunnel KIND: two daemons, configured, TUNs moved into the pods and renamed wg0.
tunnel() {
    local kind=$1 k1 k2
    underlay
    k1=$(wg genkey); k2=$(wg genkey)
    start_daemon "$kind" wgd-h1 wgdt1; P1=$DPID
    start_daemon "$kind" wgd-h2 wgdt2; P2=$DPID
    local e1=10.213.0.1:51820 e2=10.213.0.2:51820
    if [ "${FAMILY:-4}" = 6 ]; then e1=[fd00:213::1]:51820 e2=[fd00:213::2]:51820; fi
    nsx wgd-h1 wg set wgdt1 private-key <(echo "$k1") listen-port 51820 \
        peer "$(echo "$k2" | wg pubkey)" endpoint "$e2" allowed-ips 10.214.0.2/32,fd00:214::2/128
    nsx wgd-h2 wg set wgdt2 private-key <(echo "$k2") listen-port 51820 \
        peer "$(echo "$k1" | wg pubkey)" endpoint "$e1" allowed-ips 10.214.0.1/32,fd00:214::1/128
    local i
    for i in 1 2; do
        nsx "wgd-h$i" ip link set "wgdt$i" mtu 1420
        nsx "wgd-h$i" ip link set "wgdt$i" netns "wgd-p$i"
        nsx "wgd-p$i" ip link set "wgdt$i" name wg0
        nsx "wgd-p$i" ip addr add "10.214.0.$i/24" dev wg0
        nsx "wgd-p$i" ip addr add "fd00:214::$i/64" dev wg0 nodad
        nsx "wgd-p$i" ip link set wg0 up
    done
    # The tunnel must work after the move: a ping both ways.
    nsx wgd-p1 ping -c 2 -i 0.2 -W 2 10.214.0.2 >/dev/null
    nsx wgd-p2 ping -c 1 -W 2 10.214.0.1 >/dev/null
    nsx wgd-p1 ping -c 1 -W 2 fd00:214::2 >/dev/null
}

# iperf SERVER_NS CLIENT_NS ADDR -> prints Gbit/s
iperf() {
    local sns=$1 cns=$2 addr=$3
    nsx "$sns" timeout $((RUN + 20)) iperf3 -s -1 -B "$addr" >/dev/null 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    sleep 0.3
    nsx "$cns" timeout $((RUN + 15)) iperf3 -c "$addr" -t "$RUN" -J >"$TMP/iperf.json"
    wait "$spid" 2>/dev/null || true
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.3f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$TMP/iperf.json"
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("retransmits %d" % d["end"]["sum_sent"].get("retransmits", -1))' "$TMP/iperf.json" >"$TMP/retr.txt"
}

measure_tunnel() {
    local kind=$1 c0 c1 gbps cpu
    tunnel "$kind"
    local a0 b0 a1 b1
    a0=$(cpu_ticks "$P1"); b0=$(cpu_ticks "$P2")
    c0=$((a0 + b0))
    if [ -n "${PERF_OUT:-}" ]; then
        timeout $((RUN + 5)) perf record -F ${PERF_FREQ:-499} ${PERF_CG:--g} -o "$PERF_OUT" -p "$P1,$P2" -- sleep "$RUN" >/dev/null 2>&1 &
        PIDS+=("$!")
    fi
    local inner=10.214.0.2
    [ "${FAMILY:-4}" = 6 ] && inner=fd00:214::2
    gbps=$(iperf wgd-p2 wgd-p1 "$inner")
    a1=$(cpu_ticks "$P1"); b1=$(cpu_ticks "$P2")
    c1=$((a1 + b1))
    cpu=$(python3 -c "print('%.2f' % (($c1-$c0)/$HZ))")
    local rss1 rss2
    rss1=$(awk '/VmRSS/{print $2}' "/proc/$P1/status")
    rss2=$(awk '/VmRSS/{print $2}' "/proc/$P2/status")
    python3 -c "
g=$gbps; c=$cpu
print('%-6s %7.3f Gbit/s  daemons CPU %.2f s in ${RUN} s (sender %.2f, receiver %.2f)  = %.2f CPU-s per Gbit  (RSS after: %d / %d KiB)' % ('$kind', g, c, ($a1-$a0)/$HZ, ($b1-$b0)/$HZ, c/(g*$RUN) if g else 0, $rss1, $rss2))"
    echo "       iperf3 $(cat "$TMP/retr.txt"), UDP receive buffer drops: $(nsx wgd-h1 nstat -az UdpRcvbufErrors Udp6RcvbufErrors 2>/dev/null | awk '/Rcvbuf/{s+=$2} END{print s+0}') / $(nsx wgd-h2 nstat -az UdpRcvbufErrors Udp6RcvbufErrors 2>/dev/null | awk '/Rcvbuf/{s+=$2} END{print s+0}')"
    cleanup
    if [ -n "${SHOW_LOGS:-}" ]; then cat "$TMP/wgdt1.log" "$TMP/wgdt2.log"; fi
}

measure_veth() {
    underlay
    local gbps
    gbps=$(iperf wgd-h2 wgd-h1 10.213.0.2)
    echo "veth   $gbps Gbit/s (MTU 1500, no tunnel)"
    cleanup
}

# rss KIND: an idle daemon with 10 and then 1000 peers (random keys, via wg set).
measure_rss() {
    local kind=$1 n args
    cleanup
    ip netns add wgd-r
    start_daemon "$kind" wgd-r wgdr
    local pid=$DPID
    nsx wgd-r wg set wgdr private-key <(wg genkey) listen-port 51821
    local rss0
    rss0=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
    for n in 10 1000; do
        args=$(python3 -c "
import base64, os
for i in range($n):
    print('peer', base64.b64encode(os.urandom(32)).decode(), 'allowed-ips', '10.%d.%d.%d/32' % (216 + i // 65536, i // 256 % 256, i % 256), end=' ')
")
        # shellcheck disable=SC2086
        nsx wgd-r wg set wgdr $args
        sleep 1
        printf '%-6s RSS idle: %6s KiB with %4d peers (%s KiB with none), %s peers listed\n' "$kind" \
            "$(awk '/VmRSS/{print $2}' "/proc/$pid/status")" "$n" "$rss0" \
            "$(nsx wgd-r wg show wgdr peers | wc -l)"
    done
    cleanup
}

# startup KIND: time from exec until the UAPI socket answers get=1, and from SIGTERM until
# the process is gone (mean of 5), polled every 0.2 ms by one python process.
measure_startup() {
    local kind=$1 bin
    cleanup
    ip netns add wgd-r
    if [ "$kind" = wgd ]; then bin=$WGD; else bin=$WGGO; fi
    python3 - "$kind" "$bin" <<'PY'
import os, socket, subprocess, sys, time
kind, binary = sys.argv[1], sys.argv[2]
path = "/var/run/wireguard/wgdr.sock"
ups, downs = [], []
for _ in range(5):
    t0 = time.perf_counter()
    p = subprocess.Popen(["ip", "netns", "exec", "wgd-r", binary, "-f", "wgdr"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while time.perf_counter() - t0 < 5:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(b"get=1\n\n")
            if b"errno=0" in s.recv(4096):
                break
        except OSError:
            time.sleep(0.0002)
        finally:
            s.close()
    ups.append(time.perf_counter() - t0)
    t1 = time.perf_counter()
    p.terminate()
    p.wait(timeout=5)
    downs.append(time.perf_counter() - t1)
    left = os.path.exists(path)
    if left:
        print(f"{kind}: socket left behind after SIGTERM")
        os.unlink(path)
print(f"{kind:6s} startup until get=1 answers: {1000*sum(ups)/len(ups):.1f} ms, "
      f"SIGTERM to exit: {1000*sum(downs)/len(downs):.1f} ms (mean of 5)")
PY
    if nsx wgd-r ip link show wgdr >/dev/null 2>&1; then echo "$kind: TUN left behind"; fi
    cleanup
}

# uso KIND: a sender with UDP_SEGMENT makes the kernel hand the daemon UDP super-packets (USO
# on the TUN); the receiver must get every 1000-byte datagram intact, IPv4 and IPv6.
measure_uso() {
    local kind=$1 addr
    tunnel "$kind"
    for addr in 10.214.0.2 fd00:214::2; do
        nsx wgd-p2 timeout 10 python3 - "$addr" >"$TMP/uso.txt" <<'PY' &
import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((a, 5555)); s.settimeout(2)
n = bad = 0
try:
    while True:
        d = s.recv(65535)
        n += 1
        if len(d) != 1000 or d != bytes([d[0]]) * 1000:
            bad += 1
except socket.timeout:
    pass
print(n, bad)
PY
        local rpid=$!
        sleep 0.5
        nsx wgd-p1 python3 - "$addr" <<'PY'
import socket, sys, time
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT
for i in range(20):
    s.sendto(b"".join(bytes([(i * 8 + k) % 256]) * 1000 for k in range(8)), (a, 5555))
    time.sleep(0.01)
PY
        wait "$rpid" || true
        echo "$kind USO over $addr: $(awk '{print $1 " datagrams of 160 received, " $2 " damaged"}' "$TMP/uso.txt")"
    done
    cleanup
    if [ -n "${SHOW_LOGS:-}" ]; then cat "$TMP/wgdt1.log" "$TMP/wgdt2.log"; fi
}

# rekey KIND: one ping a second for 150 s, across the 120 s rekey (not part of "all").
measure_rekey() {
    local kind=$1
    tunnel "$kind"
    echo "$kind across a rekey: $(nsx wgd-p1 ping -i 1 -c 150 -W 1 10.214.0.2 | grep -o '[0-9]* received, [0-9.]*% packet loss'), last handshake $(nsx wgd-h1 wg show wgdt1 latest-handshakes | awk -v now="$(date +%s)" '{print now - $2}') s ago"
    cleanup
}

[ $# -eq 0 ] && set -- all
for what in "$@"; do
    case $what in
        wgd) measure_tunnel wgd ;;
        wggo) measure_tunnel wggo ;;
        veth) measure_veth ;;
        rss) measure_rss wgd; measure_rss wggo ;;
        uso) measure_uso wgd ;;
        rekey) measure_rekey wgd ;;
        startup) measure_startup wgd; measure_startup wggo ;;
        all) measure_veth; measure_tunnel wggo; measure_tunnel wgd
             measure_rss wgd; measure_rss wggo; measure_startup wgd; measure_startup wggo ;;
        *) echo "unknown: $what" >&2; exit 2 ;;
    esac
done
