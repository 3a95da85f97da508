#!/usr/bin/env bash
# Validates deploy/kubernetes/*.yaml offline and strictly (unknown fields are errors) against the
# API schemas of Kubernetes 1.36 (the version of ../shared/k8s) and 1.37, as shipped inside the
# PyPI package kubernetes-validate (no network at validation time), then the cross-references
# the schemas cannot see (scripts/check-manifests.py, one process for all). Proves that the
# validation bites: copies with a misspelled field, a wrong type, an unknown kind or a dangling
# reference must be refused. ~4 s of CPU; the venv (target/k8s-venv) is made once (~10 s).
set -euo pipefail
cd "$(dirname "$0")/.."

VALIDATE_PIN=kubernetes-validate==1.37.0
venv=target/k8s-venv
manifests=(deploy/kubernetes/*.yaml)
crate_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

if ! "$venv/bin/pip" show -q kubernetes-validate >/dev/null 2>&1 \
  || [ "$("$venv/bin/pip" show kubernetes-validate | sed -n 's/^Version: //p')" != "${VALIDATE_PIN#*==}" ]; then
  scripts/apt-install.sh python3-venv
  mkdir -p target
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "$VALIDATE_PIN"
fi

"$venv/bin/python" scripts/check-manifests.py "$crate_version" "${manifests[@]}"
echo "manifests valid (strict schemas of Kubernetes 1.36 and 1.37, cross-references): ${manifests[*]}"

# Each mutation (sed expression on wg-cni.yaml, first match only) must make validation fail.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mutations=(
  '0,/hostNetwork: true/s//hostNetwrk: true/'                   # misspelled field
  '0,/mountPropagation:/s//mountPropogation:/'                  # misspelled, deep in a list
  '0,/  namespace: wg-cni/s//  namespce: wg-cni/'               # misspelled metadata field
  '0,/privileged: true/s//privileged: "yes"/'                   # wrong type
  '0,/kind: DaemonSet/s//kind: DaemonSett/'                     # unknown kind (only a warning)
  '0,/mountPath: \/run\/wg-cni/s//mountPath: \/run\/wg-cni\n              subPath: [x]/'  # wrong type
  '0,/key: lease-ttl/s//key: lease-tt/'                         # dangling ConfigMap key
  '0,/- name: run-wireguard/s//- name: run-wireguards/'          # mount names no volume
  '0,/$(NODE_NAME)/s//$(NODE)/'                                 # undefined $(VAR)
  '0,/path: \/readyz/s//path: \/ready/'                         # probe off the agent's path
)
broken=()
for i in "${!mutations[@]}"; do
  m=${mutations[$i]}
  sed "$m" deploy/kubernetes/wg-cni.yaml >"$tmp/broken-$i.yaml"
  if cmp -s deploy/kubernetes/wg-cni.yaml "$tmp/broken-$i.yaml"; then
    echo "FAIL: mutation '$m' changed nothing (the manifest changed: update the test)" >&2
    exit 1
  fi
  broken+=("$tmp/broken-$i.yaml")
done
"$venv/bin/python" scripts/check-manifests.py --each-must-fail "$crate_version" "${broken[@]}"
echo "manifests: ${#manifests[@]} valid, ${#broken[@]} broken copies refused"
echo "$((${#manifests[@]} + ${#broken[@]})) passed, 0 failed"
