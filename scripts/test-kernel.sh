#!/usr/bin/env bash
# Runs the integration suite inside a QEMU guest booted from Debian's kernel, which has the
# wireguard module this host lacks: once with backend "kernel" and once with "auto" (which
# must pick the kernel there). The same test executable as on the host; only
# WG_CNI_TEST_BACKEND differs. Fails unless the guest reports success.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# Build the plugin and the integration test executable; ask cargo where the latter is.
cargo build --quiet
test_exe=$(cargo test --test plugin --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.reason == "compiler-artifact" and .target.name == "plugin" and .executable != null) | .executable' |
  tail -n 1)
[ -x "$test_exe" ] || { echo "could not build the integration tests" >&2; exit 1; }
name=$(basename "$test_exe")

export VM_BINARIES="$PWD/target/debug/wg-cni $test_exe"
export VM_ENV="WG_CNI_BIN=/opt/wgcni/bin/wg-cni CNI_PLUGIN_DIR=/usr/lib/cni RUST_BACKTRACE=1"
exec scripts/kernel-vm/run-tests.sh --timeout "${VM_TIMEOUT:-900}" -- /bin/sh -c "
  set -e
  for backend in kernel auto; do
    echo \"== integration tests in the guest, backend \$backend\"
    WG_CNI_TEST_BACKEND=\$backend /opt/wgcni/bin/$name --test-threads=1
  done"
