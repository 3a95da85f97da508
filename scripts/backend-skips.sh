#!/usr/bin/env bash
# Usage: scripts/backend-skips.sh BACKEND [SUITE...]
# The libtest arguments that skip the integration tests which do not apply to BACKEND
# (`kernel` or `userspace`: the backend the tests will find, `auto` resolved), listed in
# tests/backend-only.txt: `--skip NAME` per test, one word per line on stdout (use with
# `--exact`, so a skip matches that test only), and "skipped: SUITE::NAME (why)" on stderr.
# With SUITEs, only tests of those suites. Fails when a listed test is not a `fn` of its suite
# or does not call `only_on`, or when `only_on` is called by a test the list does not name:
# a renamed test must not fall out of the list unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."
backend=${1:?usage: $0 kernel|userspace [SUITE...]}
shift
[[ $backend == kernel || $backend == userspace ]] || { echo "$0: backend must be kernel or userspace, got '$backend'" >&2; exit 2; }
suites=("$@")
list=tests/backend-only.txt
listed=0
while read -r suite name only why; do
  [[ -z $suite || $suite == \#* ]] && continue
  listed=$((listed + 1))
  file=tests/$suite.rs
  # The test's body up to the next `fn` at the start of a line must call only_on("<backend>").
  body=$(awk -v fn="fn $name()" 'index($0, fn) == 1 { on = 1; next } on && /^(pub )?fn / { exit } on' "$file" 2>/dev/null || true)
  [[ -n $body ]] || { echo "$list: $suite has no test '$name' (renamed?)" >&2; exit 1; }
  grep -q "only_on(\"$only\")" <<<"$body" || { echo "$list: $suite::$name does not call only_on(\"$only\")" >&2; exit 1; }
  ((${#suites[@]} == 0)) || [[ " ${suites[*]} " == *" $suite "* ]] || continue
  if [[ $only != "$backend" ]]; then
    printf -- '--skip\n%s\n' "$name"
    echo "skipped: $suite::$name (applies to the $only backend only: $why)" >&2
  fi
done <"$list"
calls=$(grep -o 'only_on("[a-z]*")' tests/*.rs | wc -l)
((calls == listed)) || { echo "$list names $listed tests, but tests/*.rs call only_on $calls times: list every backend-only test" >&2; exit 1; }
