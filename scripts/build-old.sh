#!/usr/bin/env bash
# Builds wg-cni (the plugin and wg-cni-agent) and wg-cni-wgd as they were at COMMIT, for the
# rolling-upgrade test (scripts/test-daemonset.sh upgrade), and prints the directory holding
# the three binaries:
#
#   scripts/build-old.sh COMMIT
#
# Cached in target/old/<full commit id>/bin: a second call prints it at once. Kept cheap for
# CI: the source comes from `git archive` into a temporary directory outside this tree (cargo
# would merge this tree's .cargo/config.toml into the old one's, doubling the rustflags, which
# makes every dependency stale), and each package builds in a target dir of its own, seeded with a copy of this tree's release dependencies
# (target/ and wgd/target/, which `make image` built): dependencies whose version did not
# change since COMMIT are fresh for cargo, so mostly the two packages themselves compile.
# Release, as the image's binaries are (static, the same .cargo/config.toml as then).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

commit=$(git rev-parse --verify "${1:?usage: build-old.sh COMMIT}^{commit}") ||
  { echo "build-old.sh: $1 is not a commit of this repository (a shallow clone?)" >&2; exit 1; }
out=target/old/$commit
if [ -x "$out/bin/wg-cni" ] && [ -x "$out/bin/wg-cni-agent" ] && [ -x "$out/bin/wg-cni-wgd" ]; then
  echo "$PWD/$out/bin"
  exit 0
fi

rm -rf "$out"
build=$(mktemp -d /tmp/wg-cni-build-old.XXXXXX)
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/src"
git archive "$commit" | tar -x -C "$build/src"

# seed FROM TO: the release build's dependency artifacts (not its binaries), times kept
# (cargo compares them).
seed() {
  local dir
  for dir in x86_64-unknown-linux-gnu/release release; do
    [ -d "$1/$dir" ] || continue
    mkdir -p "$2/$dir"
    for part in deps build .fingerprint; do
      [ -d "$1/$dir/$part" ] && cp -a "$1/$dir/$part" "$2/$dir/"
    done
  done
  return 0
}
t0=$(date +%s)
seed target "$build/target"
seed wgd/target "$build/wgd-target"
(cd "$build/src" && CARGO_TARGET_DIR=$build/target cargo build --release --locked --quiet) >&2
(cd "$build/src/wgd" && CARGO_TARGET_DIR=$build/wgd-target cargo build --release --locked --quiet) >&2
# Only the binaries are kept: the sources and target dirs are large, and rebuilt on a miss.
mkdir -p "$out/bin.tmp"
cp "$build/target/x86_64-unknown-linux-gnu/release/wg-cni" \
  "$build/target/x86_64-unknown-linux-gnu/release/wg-cni-agent" \
  "$build/wgd-target/x86_64-unknown-linux-gnu/release/wg-cni-wgd" "$out/bin.tmp/"
mv "$out/bin.tmp" "$out/bin"
echo "build-old.sh: built $commit in $(($(date +%s) - t0)) s" >&2
echo "$PWD/$out/bin"
