#!/usr/bin/env bash
# `make test-clients`: real, unmodified CNI clients drive wg-cni, one step each:
#   libcni      Debian's libcni 1.1.2 through wgc-cnitool (cnitool's interface)
#   podman      podman 4.3 with its CNI backend
#   containerd  containerd 1.6's CRI plugin, driven by a Python CRI client
# Each step prints PASS/FAIL; the last line is `clients: N passed, N failed`.
#
#   scripts/clients/run.sh [libcni|podman|containerd ...]
# Environment: WG_CNI_BIN (test this binary instead of building target/x86_64-unknown-linux-gnu/release/wg-cni),
# WGC_BACKEND (default userspace), WGC_TOOLS (default target/clients).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PATH="$HOME/.cargo/bin:$PATH"

all=(libcni podman containerd)
clients=("$@")
((${#clients[@]})) || clients=("${all[@]}")
for c in "${clients[@]}"; do
  [[ " ${all[*]} " == *" $c "* ]] || { echo "unknown client: $c (one of: ${all[*]})" >&2; exit 2; }
done

passed=0
failed=0
summary() {
  echo "clients: $passed passed, $failed failed"
  exit $((failed > 0))
}
setup_failed() {
  echo "$1" >&2
  for c in "${clients[@]}"; do echo "FAIL $c (setup failed)"; done
  failed=${#clients[@]}
  summary
}

export WGC_TOOLS=${WGC_TOOLS:-$PWD/target/clients}
scripts/clients/install.sh "$WGC_TOOLS" || setup_failed "installing the clients failed"
if [ -z "${WG_CNI_BIN:-}" ]; then
  cargo build --release --quiet || setup_failed "cargo build --release failed"
  WG_CNI_BIN=$PWD/target/x86_64-unknown-linux-gnu/release/wg-cni
fi
export WG_CNI_BIN

for c in "${clients[@]}"; do
  echo "== $c"
  t0=$(date +%s%3N)
  # A hung step gets TERM after 240 s (its trap cleans up), KILL 60 s later.
  timeout -k 60 240 "scripts/clients/$c.sh"
  rc=$?
  secs=$(awk -v ms=$(($(date +%s%3N) - t0)) 'BEGIN {printf "%.1f", ms / 1000}')
  if [ "$rc" = 0 ]; then
    echo "PASS $c (${secs} s)"
    passed=$((passed + 1))
  else
    [ "$rc" = 124 ] && echo "  (timed out)"
    echo "FAIL $c (exit $rc, ${secs} s)"
    failed=$((failed + 1))
  fi
done
summary
