#!/usr/bin/env bash
# Installs and builds what the client harness needs, into TOOLS (default target/clients):
#   Debian packages   golang-go, golang-github-appc-cni-dev (libcni 1.1.2), podman, runc, conmon,
#                     containerd, busybox-static, python3-venv, the reference plugins, ...
#   TOOLS/wgc-cnitool the libcni client (cnitool/main.go), built offline in GOPATH mode
#   TOOLS/venv        grpcio + grpcio-tools from PyPI (Debian's python3)
#   TOOLS/cri/        the CRI api.proto (crates.io k8s-cri ships it) and its Python stubs
# Idempotent and quick when everything is there already.
set -euo pipefail
clients_dir=$(cd "$(dirname "$0")" && pwd)
tools=${1:-$clients_dir/../../target/clients}
mkdir -p "$tools"
tools=$(cd "$tools" && pwd)

"$clients_dir/../apt-install.sh" golang-go golang-github-appc-cni-dev podman runc conmon \
  containerd busybox-static python3-venv containernetworking-plugins wireguard-go iproute2 \
  iputils-ping jq procps util-linux coreutils wireguard-tools

# libcni client: GOPATH mode against Debian's libcni sources, no module download.
if [ ! -x "$tools/wgc-cnitool" ] || [ "$clients_dir/cnitool/main.go" -nt "$tools/wgc-cnitool" ]; then
  echo "building wgc-cnitool (libcni $(dpkg-query -W -f='${Version}' golang-github-appc-cni-dev))"
  (cd "$clients_dir/cnitool" &&
    GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$tools/go-build" GOFLAGS="" \
      go build -o "$tools/wgc-cnitool" .)
fi

# Python CRI client: grpcio and grpcio-tools (pinned) in a venv of Debian's python3.
grpc_version=1.85.1
venv=$tools/venv
if ! "$venv/bin/python" -c "import grpc, grpc_tools; assert grpc.__version__ == '$grpc_version'" 2>/dev/null; then
  echo "creating $venv (grpcio $grpc_version)"
  rm -rf "$venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q "grpcio==$grpc_version" "grpcio-tools==$grpc_version"
fi

# The CRI API (runtime.v1) from the k8s-cri crate, fetched with cargo, then Python stubs.
crate=k8s-cri
crate_version=0.11.0
cri=$tools/cri
mkdir -p "$cri"
if [ ! -s "$cri/v1.proto" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  cargo_home=${CARGO_HOME:-$HOME/.cargo}
  find_crate() { find "$cargo_home/registry/cache" -name "$crate-$crate_version.crate" 2>/dev/null | head -1; }
  if [ -z "$(find_crate)" ]; then
    # `cargo info` downloads just this crate; a throwaway project's `cargo fetch` is the fallback.
    cargo info --quiet "$crate@$crate_version" >/dev/null 2>&1 || true
  fi
  if [ -z "$(find_crate)" ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    cargo new --quiet --lib --name wgc-cri-fetch "$scratch/p"
    printf '%s = "=%s"\n' "$crate" "$crate_version" >>"$scratch/p/Cargo.toml"
    (cd "$scratch/p" && cargo fetch --quiet)
  fi
  file=$(find_crate)
  [ -n "$file" ] || { echo "could not fetch the $crate $crate_version crate" >&2; exit 1; }
  tar -xzOf "$file" "$crate-$crate_version/proto/v1.proto" >"$cri/v1.proto.tmp"
  mv "$cri/v1.proto.tmp" "$cri/v1.proto"
fi
if [ ! -s "$cri/v1_pb2_grpc.py" ] || [ "$cri/v1.proto" -nt "$cri/v1_pb2_grpc.py" ]; then
  echo "generating CRI stubs"
  "$venv/bin/python" -m grpc_tools.protoc -I "$cri" --python_out="$cri" --grpc_python_out="$cri" \
    "$cri/v1.proto"
fi
