#!/usr/bin/env bash
# Usage: scripts/pinned-peering.sh
# The libtest arguments that skip the multinode tests which set their own `peering` (they run
# the same in every pass): `--skip NAME` per test, one word per line on stdout (use with
# `--exact`), and "skipped: multinode::NAME (...)" on stderr. The Makefile's reruns of the
# suite under WG_CNI_TEST_PEERING=mesh and =mixed use it: only the tests that take the
# peering from the environment differ between passes. A test pins its peering by setting
# `peerings`, or through `on_demand_cluster`, `running_mesh` or `running_on_events(_, Some(_))`.
set -euo pipefail
cd "$(dirname "$0")/.."
pinned=$(awk '
  /^#\[test\]/ { test = 1; next }
  test && /^fn / { name = $2; sub(/\(.*/, "", name); test = 0; current = name; next }
  /^(pub )?fn / { current = "" }
  current && /peerings = |on_demand_cluster\(|running_mesh\(|running_on_events\([^)]*Some/ { print current }
' tests/multinode.rs | sort -u)
[[ -n $pinned ]] || { echo "$0: found no multinode test that pins its peering (patterns out of date?)" >&2; exit 1; }
for name in $pinned; do
  printf -- '--skip\n%s\n' "$name"
  echo "skipped: multinode::$name (sets its own peering: ran in the first pass)" >&2
done
