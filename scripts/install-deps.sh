#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a fresh Debian 12 machine (as root).
# Idempotent: packages already present are not fetched again.
set -euo pipefail

"$(dirname "$0")/apt-install.sh" containernetworking-plugins wireguard-go wireguard-tools iproute2 \
  etcd-server etcd-client protobuf-compiler openssl \
  iptables iputils-ping procps jq tcpdump conntrack \
  python3-venv

# Debian's rustc (1.63) is too old for rtnetlink and clap: rustup's stable >= 1.85 is required.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust stable >= 1.85 with rustup (https://rustup.rs)" >&2
  exit 1
fi
version=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n1.85.0\n' "$version" | sort -V | head -1)" != "1.85.0" ]; then
  echo "rustc $version is too old: wg-cni needs >= 1.85 (rustup update stable)" >&2
  exit 1
fi

# The Prometheus Python client, whose parser the multinode suite reads the agent's /metrics
# with (tests/tools/scrape.py): a venv under target/, made once (from PyPI, ~5 s).
metrics_pin=prometheus-client==0.26.0
venv="$(dirname "$0")/../target/metrics-venv"
if [ "$("$venv/bin/pip" show prometheus-client 2>/dev/null | sed -n 's/^Version: //p')" != "${metrics_pin#*==}" ]; then
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$metrics_pin"
fi
