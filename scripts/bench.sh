#!/usr/bin/env bash
# make bench: wg-cni against the reference ptp plugin (+ host-local), natively (userspace
# backend, wireguard-go) and inside a QEMU guest (kernel backend, ptp measured in the same
# guest). Writes bench/results.md and bench/results.json and prints the tables.
#
# Phases (bench/driver, a small Rust program; in the guest the same binary):
#   latency     ADD/CHECK/DEL exec time and peak RSS, wg-cni vs ptp interleaved, fresh netns each
#   scale       ADD with 1..1000 attachments (live pods + simulated remote records) vs empty net
#   scale-ondemand (native only) ADD in a 10,000-pod cluster with `peering: "on-demand"` (100
#               live local pods + 99 simulated nodes of 100 pods, mirrored as the agent does)
#               vs a network holding one pod, interleaved; the same in mesh at 2,000 pods (what
#               fits in memory: every mesh link keeps ~26 KiB per peer); pod and gateway daemon
#               RSS. Knobs: --odm-reps (100), --odm-mesh-reps (20), --odm-live (100),
#               --odm-nodes (99), --odm-per-node (100), --odm-mesh-nodes (19), --odm-local-point
#               0|1 (1: also a cluster of this node's pods only). Alone, ~2.5 minutes:
#                 BENCH_NATIVE_PHASES=scale-ondemand BENCH_GUEST_PHASES= scripts/bench.sh
#   parallel    100 concurrent ADDs on one network, then 100 DELs (native only)
#   throughput  iperf3 TCP 10 s x3: wg-cni vs hand-configured WireGuard vs ptp (natively also
#               wg-cni on wireguard-go; CPU-seconds per Gbit of the pods' daemons)
#   memory      (native only) per-pod daemon RSS, wg-cni-wgd and wireguard-go, with 10 and 1000
#               peers (--mem-peers)
#   profile     strace of whole ADDs: time per phase
#   multinode   (native only) two simulated nodes with `wg-cni agent` and Debian's etcd: time
#               from ADD returning on node 2 until a pod on node 1 pings the new pod and back
#               (p50/p99/max over N pods; both pings start together, then a control where
#               only node 1's pod pings first); plugin ADD with the agent running vs stopped; agent
#               RSS, idle CPU and full resync time with 1,000 and 5,000 remote records
#   direct      (native only) on-demand peering on two simulated nodes with their agents (as
#               multinode): for fresh pod pairs the first packet's RTT through the relay, the
#               time from it until both ends hold a direct peer (p50/p99) and the RTT then;
#               echo requests lost (`ping -i 0.01`) per relay -> direct and direct -> relay
#               switch; the first packet after 200 s of idle; iperf3 relay (maxDirectPeers 0)
#               vs direct; the agents' RSS, and theirs and the daemons' once 10,000 pods of
#               100 nodes are mirrored. About 9 minutes, 200 s of it the idle
#   agent       (native only) one node's agent with 100 local pods (101 links on wg-cni-wgd)
#               mirroring 2,000 remote records of fake nodes put straight into etcd: per remote
#               pod ADD/DEL and node key flap, the agent's CPU, the wall time until every link
#               has (lost) the peer and the WireGuard writes read back from the links; agent
#               RSS; a soak of 20 remote events/s probing /healthz, the network's flock and
#               plugin ADDs, counting lost liveness leases (~10 minutes)
#
# multinode makes its own namespaces wgbench-mn-* (underlay bridge 10.253.0.0/24, etcd at
# 10.253.0.2:23790 in a namespace of its own, pods in 10.252.0.0/16: none of the test suite's
# addresses, so it can run beside `make test`); agents and etcd are stopped by pid, the pods'
# wireguard-go daemons by the pid their records name. Knobs (via BENCH_ARGS): --mn-pods,
# --mn-pods-sequential, --mn-diagnose 1 (wg dumps of slow pods in the driver's log),
# --mn-add-iterations, --mn-records 1000,5000, --mn-idle-seconds, --mn-agent-flags "..."
# (default: the agent's own defaults). Running only it:
#   BENCH_NATIVE_PHASES=multinode BENCH_GUEST_PHASES= BENCH_OUT=/tmp/x scripts/bench.sh
#
# direct reuses that cluster too (namespaces wgbench-dr-*, same addresses), with
# `peering: "on-demand"` and `idlePeerTimeout` 3 s (--dir-idle-timeout). Knobs: --dir-pairs (30),
# --dir-at-once-pairs (10), --dir-trims (12), --dir-ping-count (150), --dir-trim-count (200),
# --dir-idle-seconds (200), --dir-idle-pairs (2 of each kind), --dir-tput-seconds (10),
# --dir-poll-ms (5), --dir-cluster-pods (10000; 0 skips it), --dir-cluster-nodes (100),
# --dir-trim-kinds (0,1,2), --dir-agent-offset-ms (1370: agent 2 starts that
# much later), --dir-diagnose 1 (byte counters and RTTs in the timelines), --dr-agent-log (warn;
# e.g. "warn,wg_cni::agent::direct=trace"), --dr-keep 1 (keep its work directory, agent logs
# included: run the driver itself then, as this script removes its work directory). 0 pairs,
# trims, --dir-tput-seconds or --dir-idle-pairs skip that part. Running only it:
#   BENCH_NATIVE_PHASES=direct BENCH_GUEST_PHASES= scripts/bench.sh
#
# agent reuses that cluster (namespaces wgbench-ag-*, same addresses; the fake nodes at
# 10.253.0.101.., the first one answered by wg-cni-wgd "responder" devices wgbagrNN in a
# namespace of their own). 10,000 records do not fit: 101 wg-cni-wgd links keep ~26 KiB per
# peer each. Knobs: --ag-records (2000), --ag-links (local pods, 100), --ag-remote-nodes (4,
# at least one per 1,000 records), --ag-events (ADD+DEL pairs, 15: each ADD keeps the agent
# busy ~6 s), --ag-silent-events (pairs whose pod never answers, 3), --ag-flaps (5),
# --ag-soak-seconds (300), --ag-soak-rate (20), --ag-probe-ms (100), --ag-plugin-adds (6),
# --ag-responders (20), --ag-agent-log (info), --ag-agent-flags (default "--resync-interval
# 3600"), --ag-keep 1 (keep its work directory). Running only it:
#   BENCH_NATIVE_PHASES=agent BENCH_GUEST_PHASES= BENCH_OUT=/tmp/x scripts/bench.sh
#
# Traffic stays between namespaces made here (tunnel endpoints 127.0.0.1). Everything made is
# removed on exit, also on failure or interrupt: namespaces wgbench-*, the plugin's networks
# (GC through the plugin, then gateway links and NAT rules by name), daemons and servers by
# pid, the work directory (stores, IPAM data), and ip_forward is put back as it was.
#
# Environment: BENCH_QUICK=1 for a short smoke run (results are then not meant to be kept);
# BENCH_OUT=DIR to write results elsewhere than bench/; BENCH_NATIVE_PHASES="latency scale"
# and BENCH_GUEST_PHASES="latency,profile" to run only some phases (empty: none there);
# BENCH_ARGS="--opt value ..." appended to the driver's options on both sides. The report
# merges: parts (phase results) this run did not measure are kept from $OUT/results.json, and
# results.md says which run measured which (BENCH_MERGE=0: this run's parts only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
export PATH="$HOME/.cargo/bin:$PATH"
log() { printf '== bench: %s\n' "$*" >&2; }

(($(id -u) == 0)) || { echo "make bench needs root (namespaces, links)" >&2; exit 1; }

QUICK=${BENCH_QUICK:-0}
OUT=${BENCH_OUT:-$ROOT/bench}
if ((QUICK)); then
  NATIVE_ARGS=(--latency-iterations 12 --warmup 1 --scale-reps 3 --scale-points 1,20,100
               --parallel-n 20 --parallel-rounds 1 --tput-runs 1 --tput-seconds 2
               --profile-adds 2 --profile-live 3 --profile-remote 20
               --odm-reps 3 --odm-mesh-reps 2 --odm-live 10 --odm-nodes 9 --odm-per-node 20 --odm-mesh-nodes 4
               --mn-pods 5 --mn-pods-sequential 3 --mn-add-iterations 5 --mn-records 100,300
               --mn-idle-seconds 3
               --dir-pairs 4 --dir-at-once-pairs 2 --dir-trims 3 --dir-idle-seconds 20
               --dir-idle-pairs 1 --dir-tput-seconds 2
               --ag-records 300 --ag-links 10 --ag-events 5 --ag-silent-events 2 --ag-flaps 2
               --ag-soak-seconds 20 --ag-plugin-adds 2 --ag-responders 4)
  GUEST_ARGS=(--latency-iterations 6 --warmup 1 --scale-reps 2 --scale-points 1,20,100
              --tput-runs 1 --tput-seconds 2 --profile-adds 1 --profile-live 2 --profile-remote 0
              --latency-first-pod 0)
else
  # Sized for the 20-minute budget on 2 cores (TCG makes the guest ~10x slower).
  NATIVE_ARGS=(--latency-iterations 200 --warmup 3 --scale-reps 20 --scale-points 1,5,20,100,500,1000
               --parallel-n 100 --parallel-rounds 2 --tput-runs 3 --tput-seconds 10
               --profile-adds 7 --profile-live 20 --profile-remote 50
               --odm-reps 100 --odm-mesh-reps 20 --odm-live 100 --odm-nodes 99 --odm-per-node 100 --odm-mesh-nodes 19
               --mn-pods 30 --mn-pods-sequential 20 --mn-add-iterations 40 --mn-records 1000,5000
               --mn-idle-seconds 10
               --dir-pairs 30 --dir-at-once-pairs 10 --dir-trims 12 --dir-idle-seconds 200
               --dir-idle-pairs 2 --dir-tput-seconds 10
               --ag-records 2000 --ag-links 100 --ag-events 15 --ag-silent-events 3 --ag-flaps 5
               --ag-soak-seconds 300 --ag-plugin-adds 6)
  GUEST_ARGS=(--latency-iterations 60 --warmup 2 --scale-reps 5 --scale-points 1,100,1000
              --tput-runs 3 --tput-seconds 10 --profile-adds 3 --profile-live 5 --profile-remote 0
              --latency-first-pod 0)
fi

# ------------------------------------------------------------------ packages
log "installing what the benchmark needs"
scripts/install-deps.sh
scripts/install-wgd.sh
scripts/apt-install.sh iperf3 strace qemu-system-x86 linux-image-amd64 busybox-static cpio \
  xz-utils zstd iptables

# ------------------------------------------------------------------ build
log "building wg-cni and the driver (release)"
cargo build --release --locked --quiet
cargo build --release --locked --quiet --manifest-path bench/driver/Cargo.toml
WG=$ROOT/target/x86_64-unknown-linux-gnu/release/wg-cni
DRIVER=$ROOT/bench/driver/target/x86_64-unknown-linux-gnu/release/wg-cni-bench

# ------------------------------------------------------------------ cleanup
WORK=$(mktemp -d /tmp/wg-cni-bench.XXXXXX)
PARTS=$WORK/parts
mkdir -p "$PARTS"
IPFWD=$(cat /proc/sys/net/ipv4/ip_forward)
# shellcheck disable=SC2317  # runs from the trap
cleanup() {
  local rc=$? pid ns
  trap - EXIT INT TERM HUP
  # The plugin's own cleanup first (GC of every network used), then leftovers by name.
  "$DRIVER" cleanup --work "$WORK/native" --wg "$WG" >/dev/null 2>&1 || true
  if [[ -f $WORK/pids ]]; then
    while read -r pid; do
      # Only if that pid is still one of ours (an iperf3 server, a userspace WireGuard daemon,
      # or multinode's and agent's etcd and agents).
      if [[ -r /proc/$pid/cmdline ]] && { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qE '^[^ ]*(iperf3|wireguard-go|wg-cni-wgd|etcd|wg-cni-agent|wg-cni agent) '; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$WORK/pids"
  fi
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^wgbench-' || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  for link in wgbh1 wgbh2; do ip link del "$link" 2>/dev/null || true; done
  # The agent phase's responder daemons, if killed above, left their UAPI sockets.
  rm -f /var/run/wireguard/wgbagr[0-9][0-9].sock
  "$DRIVER" cleanup --work "$WORK/native" --wg "$WG" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  if [[ $(cat /proc/sys/net/ipv4/ip_forward) != "$IPFWD" ]]; then
    echo "$IPFWD" >/proc/sys/net/ipv4/ip_forward || true
  fi
  exit "$rc"
}
# Long steps run in the background and are waited for, so that a signal reaches the trap at
# once (bash defers traps while a foreground child runs); the trap passes it on.
CHILD=""
# shellcheck disable=SC2317  # runs from the traps
on_signal() {
  if [[ -n $CHILD ]]; then
    kill -TERM "$CHILD" 2>/dev/null || true
    wait "$CHILD" 2>/dev/null || true
  fi
  exit "$1"
}
run_child() { # run_child CMD...: run in the background, wait, return its status
  "$@" &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM HUP

NATIVE_PHASES=${BENCH_NATIVE_PHASES-latency scale scale-ondemand parallel throughput memory profile multinode direct agent}
GUEST_PHASES=${BENCH_GUEST_PHASES-latency,scale,throughput,profile}
read -r -a EXTRA_ARGS <<<"${BENCH_ARGS:-}"
NATIVE_ARGS+=("${EXTRA_ARGS[@]}")
GUEST_ARGS+=("${EXTRA_ARGS[@]}")

FAILED=()
# ------------------------------------------------------------------ native
for phase in $NATIVE_PHASES; do
  limit=420
  if [[ $phase == agent ]]; then limit=900; fi   # about 10 minutes of its own (soak: 5)
  if [[ $phase == direct ]]; then limit=900; fi  # about 8 minutes (200 s of idle)
  log "native: $phase"
  # timeout passes a TERM it receives on to the driver.
  if ! run_child timeout --kill-after=10 "$limit" "$DRIVER" "$phase" --label native --backend userspace \
      --wg "$WG" --work "$WORK/native" --out-dir "$PARTS" --pids-file "$WORK/pids" \
      --strace "$(command -v strace)" "${NATIVE_ARGS[@]}" >/dev/null; then
    FAILED+=("native $phase")
  fi
done

# ------------------------------------------------------------------ guest
if [[ -n $GUEST_PHASES ]]; then
  log "guest: kernel backend and ptp inside QEMU (TCG)"
  # iptables (nft flavour) for the node gateway's NAT rules, as scripts/test-kernel.sh does.
  xtables_dir=/usr/lib/x86_64-linux-gnu/xtables
  mkdir -p "$WORK/xt"
  cp "$xtables_dir"/*.so "$WORK/xt/"
  chmod +x "$WORK/xt"/*.so
  export VM_BINARIES="$WG $DRIVER $(command -v iperf3) $(command -v strace) /usr/sbin/xtables-nft-multi $(echo "$WORK"/xt/*.so)"
  export VM_EXTRA_MODULES="nf_tables nft_compat nft_chain_nat nf_nat nf_conntrack xt_comment xt_conntrack xt_MASQUERADE xt_nat xt_tcpudp"
  export VM_ENV="RUST_BACKTRACE=1"
  guest_cmd="set -e
mkdir -p $xtables_dir
cp /opt/wgcni/bin/lib*.so $xtables_dir/ 2>/dev/null || true
for tool in iptables ip6tables iptables-save iptables-restore ip6tables-save ip6tables-restore; do ln -sf /opt/wgcni/bin/xtables-nft-multi /usr/sbin/\$tool; done
/opt/wgcni/bin/wg-cni-bench $GUEST_PHASES --label guest --backend kernel \
  --wg /opt/wgcni/bin/wg-cni --iperf3 /opt/wgcni/bin/iperf3 --strace /opt/wgcni/bin/strace \
  --work /tmp/wgbench ${GUEST_ARGS[*]}"
  : >"$WORK/guest-console.log"
  # Progress lines from the console while the guest runs (the follower ends with the harness).
  guest_rc=0
  run_child_bg() {
    scripts/kernel-vm/run-tests.sh --timeout 840 -- /bin/sh -c "$guest_cmd" \
      >"$WORK/guest-console.log" 2>"$WORK/guest.err" &
    CHILD=$!
    tail -n +1 -s 0.5 -f --pid="$CHILD" "$WORK/guest-console.log" \
      | grep --line-buffered -aE 'wg-cni-bench: |WGCNI-VM-RESULT' &
    wait "$CHILD" || guest_rc=$?
    CHILD=""
    wait || true   # the follower
  }
  run_child_bg
  tail -n 3 "$WORK/guest.err" >&2 || true
  ((guest_rc == 0)) || FAILED+=("guest (exit $guest_rc)")
  # The parts, one line each on the console.
  while IFS= read -r line; do
    line=${line%$'\r'}
    rest=${line#WGCNI-BENCH-PART }
    name=${rest%% *}
    json=${rest#* }
    if printf '%s' "$json" | jq -e . >/dev/null 2>&1; then
      printf '%s' "$json" >"$PARTS/$name.json"
    else
      FAILED+=("guest part $name (garbled on the console)")
    fi
  done < <(grep -a '^WGCNI-BENCH-PART guest\.' "$WORK/guest-console.log" || true)
  GUEST_KERNEL=$(grep -aoE 'kernel [0-9][^ ,]*-amd64' "$WORK/guest.err" | head -n 1 | cut -d' ' -f2 || true)
fi

# ------------------------------------------------------------------ report
END=$(date +%s)
elapsed=$((END - START))
dirty=$(git status --porcelain --untracked-files=no -- src Cargo.toml Cargo.lock | head -c1)
jq -n \
  --arg nproc "$(nproc)" \
  --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" \
  --arg kernel "$(uname -r)" \
  --arg mem "$(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo)" \
  --arg date "$(date -u +%Y-%m-%dT%H:%MZ)" \
  --arg commit "$(git rev-parse --short HEAD)${dirty:+ (with uncommitted changes)}" \
  --arg qemu "$(qemu-system-x86_64 --version | head -n 1 | awk '{print $4}')" \
  --arg guest_kernel "${GUEST_KERNEL:-?}" \
  --arg total "$((elapsed / 60)) min $((elapsed % 60)) s" \
  --arg total_s "$elapsed" \
  --arg quick "$QUICK" \
  '{nproc: $nproc, cpu: $cpu, kernel: $kernel, mem_gib: $mem, date: $date, commit: $commit,
    qemu: $qemu, guest_kernel: $guest_kernel, guest_cpus: "2", total: $total,
    total_seconds: ($total_s | tonumber), quick: ($quick == "1")}' >"$WORK/machine.json"
mkdir -p "$OUT"
MERGE=()
if [[ ${BENCH_MERGE:-1} != 0 && -f $OUT/results.json ]]; then
  cp "$OUT/results.json" "$WORK/previous.json"
  MERGE=(--previous "$WORK/previous.json")
fi
"$DRIVER" report --parts "$PARTS" --machine "$WORK/machine.json" "${MERGE[@]}" \
  --out-md "$OUT/results.md" --out-json "$OUT/results.json"
log "wrote $OUT/results.md and $OUT/results.json in $((elapsed / 60)) min $((elapsed % 60)) s"
if ((${#FAILED[@]})); then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
