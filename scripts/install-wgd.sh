#!/usr/bin/env bash
# Builds wg-cni's userspace WireGuard daemon (wgd/, a package of its own) and installs it as
# /usr/local/bin/wg-cni-wgd, where the plugin finds it when it is not beside the plugin.
# Rebuilds only what changed (cargo), installs only when the binary differs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# From inside wgd/: its .cargo/config.toml (a static build for the explicit target) applies
# only there.
(cd wgd && cargo build --release --locked --quiet)
built=wgd/target/x86_64-unknown-linux-gnu/release/wg-cni-wgd
if ! cmp -s "$built" /usr/local/bin/wg-cni-wgd; then
  install -m 0755 "$built" /usr/local/bin/wg-cni-wgd
fi
