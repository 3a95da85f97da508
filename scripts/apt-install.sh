#!/usr/bin/env bash
# apt-install.sh PACKAGE...: installs the Debian packages that are not installed yet (as root).
# Fetches the package lists only when a plain install fails (a fresh machine has none).
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
