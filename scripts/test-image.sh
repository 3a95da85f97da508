#!/usr/bin/env bash
# Tests the image `make image` wrote (target/image/wg-cni.tar):
#   1. its contents, read from the archive: the tag is localhost/wg-cni:<crate version>, the
#      binaries and iptables are there, and nothing else is: no private key, no build or package
#      leftovers (sources, cargo or apt files, dpkg database), no set-uid file, no device node;
#      and it stays small (compressed layer under a budget); and the conflist template of
#      deploy/kubernetes/wg-cni.yaml is a config the built plugin accepts, and the manifests'
#      wg-cni/wg-cni-agent command lines name subcommands and flags the built binaries have;
#   2. it runs, with podman: `wg-cni --version`, `wg-cni-agent --version` and
#      `wg-cni-wgd --version` print the crate's version;
#   3. its iptables wrapper picks the host's backend: podman runs `iptables -V` in network
#      namespaces of our own that hold rules in one backend (legacy, nft) or kubelet's hint
#      chain, and once with the WG_CNI_IPTABLES_MODE override; a rule the image's
#      iptables-restore writes is seen by the host's iptables-<that backend>-save.
# Parts 2 and 3 make network namespaces (deleted on exit); `--no-podman` runs part 1 alone
# (no podman, no namespace). podman runs with private storage and configuration, as in
# scripts/clients. ~10 s.
set -euo pipefail
cd "$(dirname "$0")/.."

archive=target/image/wg-cni.tar
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=localhost/wg-cni:$version
# The compressed layer must stay below this (it is ~12 MB: three static binaries, iptables with
# its libraries, busybox, glibc).
budget_mb=20
passed=0
pass() {
  echo "ok: $*"
  passed=$((passed + 1))
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}
[ -f "$archive" ] || fail "$archive is missing: run make image"
# The venv with PyPI's PyYAML that reads the manifests (made by make test-manifests).
[ -x target/k8s-venv/bin/python ] || scripts/test-manifests.sh >/dev/null

# 1. Contents.
python3 - "$archive" "$image" "$budget_mb" <<'EOF' || fail "image contents (above)"
import io, json, re, stat, sys, tarfile
archive, image, budget_mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
problems = []
with tarfile.open(archive) as outer:
    manifest = json.load(outer.extractfile("manifest.json"))
    index = json.load(outer.extractfile("index.json"))
    if manifest[0]["RepoTags"] != [image]:
        problems.append(f"docker-archive tag {manifest[0]['RepoTags']}, expected {image}")
    if index["manifests"][0]["annotations"]["io.containerd.image.name"] != image:
        problems.append("OCI index does not name " + image)
    layer_member = outer.getmember(manifest[0]["Layers"][0])
    if layer_member.size > budget_mb * 1_000_000:
        problems.append(f"layer is {layer_member.size / 1e6:.1f} MB, budget {budget_mb} MB")
    layer = tarfile.open(fileobj=io.BytesIO(outer.extractfile(layer_member).read()))
    names = {}
    for m in layer.getmembers():
        names[m.name.removeprefix("./")] = m
    need = ["usr/local/bin/wg-cni", "usr/local/bin/wg-cni-agent", "usr/local/bin/wg-cni-wgd",
            "usr/sbin/xtables-legacy-multi", "usr/sbin/xtables-nft-multi",
            "usr/sbin/iptables-wrapper", "bin/busybox", "bin/sh", "etc/protocols"]
    for tool in ("iptables", "ip6tables"):
        for suffix in ("", "-save", "-restore"):
            need.append(f"usr/sbin/{tool}{suffix}")
            m = names.get(f"usr/sbin/{tool}{suffix}")
            if m is not None and m.linkname != "iptables-wrapper":
                problems.append(f"usr/sbin/{tool}{suffix} -> {m.linkname}, not the wrapper")
    problems += [f"missing {n}" for n in need if n not in names]
    leftovers = re.compile(r"(^|/)(\.git|\.cargo|target|Cargo\.(toml|lock))(/|$)"
                           r"|^var/(cache/apt|lib/apt|lib/dpkg)/|^etc/(apt|dpkg|ssh)(/|$)|^(root|tmp)/."
                           r"|(^|/)id_(rsa|ecdsa|ed25519)|\.(pem|key)$")
    build_files = re.compile(r"\.(rs|rlib|rmeta|d|o|a|deb)$")
    private_key = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=]{40}")
    for name, m in sorted(names.items()):
        if leftovers.search(name) or (m.isfile() and build_files.search(name)):
            problems.append(f"build or package leftover: {name}")
        if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
            problems.append(f"device node or fifo: {name}")
        if m.mode & (stat.S_ISUID | stat.S_ISGID):
            problems.append(f"set-uid/gid: {name}")
        if m.mode & stat.S_IWOTH and not m.issym() and name != "tmp":
            problems.append(f"world-writable: {name}")
        if m.isfile() and private_key.search(layer.extractfile(m).read()):
            problems.append(f"a private key in {name}")
if problems:
    sys.exit("\n".join(problems))
print(f"{len(names)} entries, layer {layer_member.size / 1e6:.1f} MB compressed")
EOF
pass "image contents: tag $image, binaries and iptables present, no keys or build leftovers"
# The conflist template of the manifest's ConfigMap, as a runtime hands it to the plugin once
# the agent rendered it (nodeName added): accepted (STATUS says 50, no subnet leased yet), not
# refused as a bad config (7). Read-only: the store is a temp dir, no link is made.
conf_dir=$(mktemp -d)
target/k8s-venv/bin/python - "$conf_dir" >"$conf_dir/conf.json" <<'EOF'
import json, sys, yaml
for doc in yaml.safe_load_all(open("deploy/kubernetes/wg-cni.yaml")):
    if doc and doc["kind"] == "ConfigMap" and "10-wg-cni.conflist" in doc.get("data", {}):
        conf = json.loads(doc["data"]["10-wg-cni.conflist"])
plugin = conf["plugins"][0]
plugin.update(name=conf["name"], cniVersion="1.1.0", store=sys.argv[1], nodeName="node-1")
print(json.dumps(plugin))
EOF
status=$(CNI_COMMAND=STATUS CNI_PATH=/usr/lib/cni target/x86_64-unknown-linux-gnu/release/wg-cni \
  <"$conf_dir/conf.json" 2>/dev/null || true)
rm -rf "$conf_dir"
case $status in
  *'"code":50'*) pass "the ConfigMap's conflist template is a valid wg-cni config (STATUS: $status)" ;;
  *) fail "the ConfigMap's conflist template: STATUS answered $status, expected code 50" ;;
esac
# Every command line in the manifests names a subcommand and flags the built binaries have.
release=target/x86_64-unknown-linux-gnu/release
help_of() { # BINARY [SUBCOMMAND]: the flags its --help names
  "$release/$1" "${@:2}" --help 2>/dev/null | grep -o -- '--[a-z][a-z0-9-]*' | sort -u
}
missing=
while read -r binary sub args; do
  key=$binary
  if [ "$sub" != - ]; then
    key=$binary:$sub
    if ! "$release/$binary" --help | grep -qE "^  $sub( |$)"; then
      missing="$missing $key"
      continue
    fi
    flags=$(help_of "$binary" "$sub")
  else
    flags=$(help_of "$binary")
  fi
  for arg in $args; do
    flag=${arg%%=*}
    echo "$flags" | grep -qx -- "$flag" && continue
    missing="$missing $key:$flag"
  done
done < <(target/k8s-venv/bin/python - <<'EOF'
import yaml
for path in ("deploy/kubernetes/wg-cni.yaml", "deploy/kubernetes/uninstall.yaml"):
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc["kind"] != "DaemonSet":
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            words = c.get("command", []) + c.get("args", [])
            if not words or words[0] not in ("wg-cni", "wg-cni-agent"):
                continue
            sub = words[1] if len(words) > 1 and not words[1].startswith("-") else "-"
            flags = [w for w in words[1:] if w.startswith("--")]
            print(words[0], sub, " ".join(flags))
EOF
)
[ -z "$missing" ] || fail "the manifests name what the built binaries lack:$missing"
pass "the manifests' wg-cni and wg-cni-agent command lines match the built binaries"

if [ "${1:-}" = --no-podman ]; then
  echo "$passed passed, 0 failed"
  exit 0
fi

# 2. It runs. podman with private storage and configuration in a temp dir (the system's
# podman store and network configuration are not touched), as scripts/clients/podman.sh does;
# everything goes on exit.
scripts/apt-install.sh podman runc conmon iptables iproute2
work=$(mktemp -d /tmp/wg-cni-test-image.XXXXXX)
namespaces=()
blob_cache=/var/lib/containers/cache/blob-info-cache-v1.boltdb
new_dirs=()
for dir in /var/lib/containers /run/containers /run/libpod /etc/containers/networks /etc/cni/net.d/cni.lock; do
  [ -e "$dir" ] || new_dirs+=("$dir")
done
[ -e "$blob_cache" ] && had_blob_cache=1 || had_blob_cache=
cleanup() {
  set +e
  local ns m
  for ns in "${namespaces[@]}"; do ip netns delete "$ns" 2>/dev/null; done
  podman rm --all --force --time 0 >/dev/null 2>&1
  podman rmi --all --force >/dev/null 2>&1
  [ -n "$had_blob_cache" ] || rm -f "$blob_cache"
  findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do umount -l "$m"; done
  rm -rf "$work" "${new_dirs[@]}"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
log_driver = "k8s-file"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/events.log"
runtime = "runc"
tmp_dir = "$work/tmp"
static_dir = "$work/graph/libpod"
volume_path = "$work/graph/volumes"
[network]
network_config_dir = "$work/networks"
EOF
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/graph"
runroot = "$work/run"
EOF
podman load -q -i "$archive" >/dev/null
for bin in wg-cni wg-cni-agent wg-cni-wgd; do
  out=$(podman run --rm --network none "$image" "$bin" --version 2>&1) || fail "$bin --version: $out"
  case $out in
    *"$version"*) pass "podman run $image $bin --version: $out" ;;
    *) fail "$bin --version printed '$out', not version $version" ;;
  esac
done

# 3. The iptables backend. Each case: a fresh network namespace, set up with the host's own
# iptables-legacy/iptables-nft, then `iptables -V` in the image inside it.
backend_case() { # NAME WANT SETUP [ENV...]
  local label=$1 want=$2 setup=$3 ns=wgimg-$$-${#namespaces[@]} out
  shift 3
  ip netns add "$ns"
  namespaces+=("$ns")
  ip netns exec "$ns" sh -c "$setup" >/dev/null
  out=$(podman run --rm --privileged --network "ns:/run/netns/$ns" "$@" "$image" iptables -V 2>&1) ||
    fail "$label: iptables -V: $out"
  case $out in
    *"($want)"*) pass "iptables backend, $label: $(echo "$out" | grep -m1 "^ip6*tables v")" ;;
    *) fail "$label: expected the $want backend, got: $out" ;;
  esac
  # A fresh container's first call reads its stdin (iptables-restore, as the agent calls it),
  # and the rule lands where the host's own tools of that backend see it; ip6tables too.
  local host_save=iptables-legacy-save
  [ "$want" = legacy ] || host_save=iptables-nft-save
  printf '*filter\n-A FORWARD -m comment --comment wg-cni-image-test-restore -j ACCEPT\nCOMMIT\n' |
    podman run --rm -i --privileged --network "ns:/run/netns/$ns" "$@" "$image" \
      sh -c 'iptables-restore --noflush -w 5 && ip6tables-save >/dev/null' >/dev/null 2>&1 ||
    fail "$label: iptables-restore or ip6tables-save failed in the image"
  ip netns exec "$ns" "$host_save" -t filter 2>/dev/null | grep -q wg-cni-image-test-restore ||
    fail "$label: the image's iptables-restore did not write to the host's $want tables"
}
backend_case "legacy rules only" legacy \
  'iptables-legacy -A INPUT -m comment --comment wg-cni-image-test -j ACCEPT'
backend_case "nft rules only" nf_tables \
  'iptables-nft -A INPUT -m comment --comment wg-cni-image-test -j ACCEPT'
backend_case "more legacy rules, kubelet's hint chain in nft" nf_tables \
  'iptables-legacy -A INPUT -j ACCEPT; iptables-legacy -A OUTPUT -j ACCEPT; iptables-nft -t mangle -N KUBE-IPTABLES-HINT'
backend_case "no rules at all" nf_tables 'true'
# Deciding there read no legacy table, so it made none (only nft's restore above ran).
[ -z "$(ip netns exec "${namespaces[-1]}" cat /proc/net/ip_tables_names)" ] ||
  fail "the wrapper created legacy tables where there were none"
pass "the wrapper's choice created no legacy table"
backend_case "WG_CNI_IPTABLES_MODE=legacy over nft rules" legacy \
  'iptables-nft -A INPUT -j ACCEPT' -e WG_CNI_IPTABLES_MODE=legacy

echo "$passed passed, 0 failed"
