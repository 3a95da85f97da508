#!/usr/bin/env bash
# selftest.sh — proves that run-tests.sh works, without any project code.
#
# Usage: scripts/kernel-vm/selftest.sh [--kvm]
#
# Cases (each boots a fresh guest through run-tests.sh):
#   1. wg-netns-test: a shell-script test that checks the guest contract
#      (arguments, VM_ENV, cwd, tools, CNI plugins, modules, mounts, no NIC)
#      and then, inside the guest, creates two namespaces, creates WireGuard
#      links straight into them from the root namespace
#      (`ip link add name eth0 netns p1 type wireguard`), configures them with
#      `wg`, pings across over 127.0.0.1 endpoints and checks that the UDP
#      sockets live in the root namespace and not in the pods.  When rustc is
#      available, a small dynamically linked Rust binary also runs in the guest
#      (glibc + libgcc_s copying, `ip` on PATH being iproute2).  Expect exit 0.
#   2. exit3-test: prints a forged result line, then exits 3.  Expect exit 3.
#   3. hang-test: sleeps 1000 s under --timeout 60.  Expect a failure (124)
#      within 70 s.
# Ends with the line "selftest: N passed, N failed" and exits non-zero if any
# case failed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RUN_TESTS=$HERE/run-tests.sh
EXTRA_ARGS=("$@")              # e.g. --kvm, passed through to run-tests.sh

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wg-cni-vm-selftest.XXXXXX")
trap 'rm -rf -- "$TMP"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

PASSED=0 FAILED=0
pass() { echo "selftest: PASS: $*"; PASSED=$((PASSED + 1)); }
fail() { echo "selftest: FAIL: $*"; FAILED=$((FAILED + 1)); }

# run_case NAME -- run-tests.sh arguments...   (VM_BINARIES/VM_ENV from env)
# Sets CASE_RC, CASE_SECS (wall time) and CASE_LOG (combined output).
run_case() {
    local name=$1; shift
    CASE_LOG=$TMP/$name.log
    echo
    echo "==================== selftest case: $name ===================="
    local start=${EPOCHREALTIME/./}
    set +e
    "$RUN_TESTS" "$@" 2>&1 | tee "$CASE_LOG"
    CASE_RC=${PIPESTATUS[0]}
    set -e
    CASE_SECS=$(((${EPOCHREALTIME/./} - start) / 1000000))
    echo "selftest: case $name: run-tests.sh exited $CASE_RC after ${CASE_SECS} s"
}

# ------------------------------------------------------------------ test programs
BIN=$TMP/bin
mkdir -p "$BIN"

# The WireGuard/netns test.  Runs in the guest under /bin/sh (dash).
cat >"$BIN/wg-netns-test" <<'EOF'
#!/bin/sh
# Runs inside the guest (see scripts/kernel-vm/selftest.sh).
set -eu
IP=/usr/sbin/ip
export WG_COLOR_MODE=never
say()  { echo "wg-netns-test: $*"; }
fail() { echo "wg-netns-test: FAIL: $*"; exit 1; }
check() { desc=$1; shift; if "$@"; then say "ok: $desc"; else fail "$desc"; fi; }

# --- the harness contract
check "two arguments passed verbatim" [ "$#" -eq 2 ]
check "argument with a space" [ "$1" = "arg with space" ]
check "argument with a dollar" [ "$2" = 'x$y' ]
check "VM_ENV token" [ "${SELFTEST_TOKEN:-}" = tok-123 ]
check "VM_ENV value with quote and dollar" [ "${SELFTEST_WEIRD:-}" = "a'b\$c" ]
check "WG_COLOR_MODE=never" [ "${WG_COLOR_MODE:-}" = never ]
check "cwd is /" [ "$(pwd)" = / ]
check "ip on PATH is /usr/sbin/ip" [ "$(command -v ip)" = /usr/sbin/ip ]
check "sh runs iproute2 for plain ip" sh -c 'ip -V | grep -q iproute2'
for f in /usr/sbin/ip /usr/bin/wg /usr/lib/cni/host-local /usr/lib/cni/ptp /bin/busybox; do
    check "$f executable" [ -x "$f" ]
done
for plugin in host-local ptp; do
    check "$plugin answers CNI VERSION" sh -c \
        "CNI_COMMAND=VERSION /usr/lib/cni/$plugin </dev/null | grep -q supportedVersions"
done
for m in wireguard veth tun; do
    check "module $m loaded" grep -q "^$m " /proc/modules
done
check "/dev/net/tun" [ -c /dev/net/tun ]
check "boot_id readable" [ "$(wc -c </proc/sys/kernel/random/boot_id)" -eq 37 ]
for mp in "/proc proc" "/sys sysfs" "/dev devtmpfs" "/run tmpfs" "/tmp tmpfs"; do
    set -- $mp
    check "$1 is $2" grep -q " $1 $2 " /proc/mounts
done
check "/var/run -> /run" [ "$(readlink -f /var/run)" = /run ]
check "/var/lib/cni writable" sh -c 'mkdir -p /var/lib/cni/networks/t && touch /var/lib/cni/networks/t/x && rm -r /var/lib/cni/networks/t'
check "/etc/passwd has root" grep -q '^root:x:0:0:' /etc/passwd
check "lo up in root namespace" sh -c "$IP -o link show lo | grep -q '[<,]UP[,>]'"
check "no network card (only lo)" [ "$(ls /sys/class/net)" = lo ]
check "veth pair can be created" sh -c "$IP link add vs-a type veth peer name vs-b && $IP link del vs-a"
if [ -x /opt/wgcni/bin/rust-probe ]; then
    check "dynamic Rust binary runs" /opt/wgcni/bin/rust-probe
fi

# --- WireGuard links created straight into two pod namespaces
$IP netns add p1
$IP netns add p2
$IP link add name eth0 netns p1 type wireguard
$IP link add name eth0 netns p2 type wireguard
check "root namespace has no eth0" sh -c "! $IP link show eth0 2>/dev/null"
check "p1 eth0 is a POINTOPOINT wireguard link" sh -c \
    "$IP -n p1 -d link show eth0 | grep -q POINTOPOINT && $IP -n p1 -d link show eth0 | grep -q wireguard"

umask 077
wg genkey >/tmp/k1; wg pubkey </tmp/k1 >/tmp/pub1
wg genkey >/tmp/k2; wg pubkey </tmp/k2 >/tmp/pub2
$IP netns exec p1 wg set eth0 listen-port 40001 private-key /tmp/k1 \
    peer "$(cat /tmp/pub2)" endpoint 127.0.0.1:40002 allowed-ips 10.77.0.2/32
$IP netns exec p2 wg set eth0 listen-port 40002 private-key /tmp/k2 \
    peer "$(cat /tmp/pub1)" endpoint 127.0.0.1:40001 allowed-ips 10.77.0.1/32
for ns in p1 p2; do
    n=${ns#p}
    $IP -n $ns link set lo up
    $IP -n $ns addr add 10.77.0.$n/24 dev eth0
    $IP -n $ns link set eth0 up
done
$IP netns exec p1 wg show eth0

check "ping p1 -> p2 over WireGuard" $IP netns exec p1 ping -c 3 -i 0.2 -w 15 10.77.0.2
check "ping p2 -> p1 over WireGuard" $IP netns exec p2 ping -c 3 -i 0.2 -w 15 10.77.0.1
check "p1 has a handshake" sh -c \
    "$IP netns exec p1 wg show eth0 latest-handshakes | awk '{ exit !(\$2 > 0) }'"

# UDP sockets: local port in hex, e.g. 40001 -> 9C41.
for port in 40001 40002; do
    hex=$(printf '%04X' $port)
    check "UDP $port in root /proc/net/udp*" sh -c "cat /proc/net/udp /proc/net/udp6 | grep -q ':$hex '"
    for ns in p1 p2; do
        check "UDP $port not in $ns /proc/net/udp*" sh -c \
            "! $IP netns exec $ns cat /proc/net/udp /proc/net/udp6 | grep -q ':$hex '"
    done
done

$IP netns del p1
$IP netns del p2
say PASS
EOF

# Exits 3 after printing a forged result line without the run token.
cat >"$BIN/exit3-test" <<'EOF'
#!/bin/sh
echo "exit3-test: printing a forged result line, then exiting 3"
echo "WGCNI-VM-RESULT: exit=0"
echo "WGCNI-VM-RESULT: exit=0 run=000000000000"
exit 3
EOF

cat >"$BIN/hang-test" <<'EOF'
#!/bin/sh
echo "hang-test: sleeping 1000 s"
sleep 1000
EOF
chmod 0755 "$BIN"/*

# Optional: a dynamically linked (glibc, libgcc_s) Rust binary, like the
# project's test executables.
BINARIES="$BIN/wg-netns-test"
if command -v rustc >/dev/null 2>&1; then
    cat >"$TMP/rust-probe.rs" <<'EOF'
use std::process::Command;
fn main() {
    // `ip` resolved through PATH must be iproute2, not busybox.
    let out = Command::new("ip").arg("-V").output().expect("exec ip");
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.contains("iproute2"), "ip on PATH is not iproute2: {v:?}");
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(id.trim().len(), 36, "boot_id {id:?}");
    // Unwinding needs libgcc_s.so.1.
    std::panic::set_hook(Box::new(|_| {}));
    assert!(std::panic::catch_unwind(|| panic!("expected")).is_err());
    println!("rust-probe: ok ({})", v.trim());
}
EOF
    if rustc --edition 2021 -O -o "$BIN/rust-probe" "$TMP/rust-probe.rs"; then
        BINARIES+=" $BIN/rust-probe"
    else
        echo "selftest: note: rustc failed; skipping the Rust probe"
    fi
else
    echo "selftest: note: no rustc; skipping the Rust probe"
fi

# ------------------------------------------------------------------ cases
# shellcheck disable=SC2016  # 'x$y' is meant literally
VM_BINARIES=$BINARIES VM_ENV="SELFTEST_TOKEN=tok-123 SELFTEST_WEIRD=a'b\$c" \
    run_case wg-netns "${EXTRA_ARGS[@]}" --timeout 300 -- \
    /opt/wgcni/bin/wg-netns-test "arg with space" 'x$y'
if ((CASE_RC == 0)) && grep -q '^wg-netns-test: PASS' "$CASE_LOG"; then
    pass "wg-netns test exits 0 ($(grep -o 'boot [0-9.]* s.*' "$CASE_LOG" | head -n 1))"
else
    fail "wg-netns test: run-tests.sh exited $CASE_RC, expected 0"
fi
if [[ $BINARIES == *rust-probe* ]]; then
    if grep -q '^rust-probe: ok' "$CASE_LOG"; then pass "Rust probe ran in the guest"; else fail "Rust probe did not run"; fi
fi

VM_BINARIES=$BIN/exit3-test VM_ENV="" \
    run_case exit3 "${EXTRA_ARGS[@]}" --timeout 300 -- /opt/wgcni/bin/exit3-test
if ((CASE_RC == 3)); then
    pass "exit-3 test makes run-tests.sh exit 3 (forged result lines ignored)"
else
    fail "exit-3 test: run-tests.sh exited $CASE_RC, expected 3"
fi

VM_BINARIES=$BIN/hang-test VM_ENV="" \
    run_case hang "${EXTRA_ARGS[@]}" --timeout 60 -- /opt/wgcni/bin/hang-test
if ((CASE_RC == 124 && CASE_SECS <= 70)) && grep -q 'TIMEOUT' "$CASE_LOG"; then
    pass "hanging test fails with 124 after ${CASE_SECS} s under --timeout 60"
else
    fail "hanging test: run-tests.sh exited $CASE_RC after ${CASE_SECS} s, expected 124 within 70 s"
fi

echo
echo "selftest: $PASSED passed, $FAILED failed"
((FAILED == 0))
