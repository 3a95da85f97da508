# wg-cni: `make demo` shows two pods talking over WireGuard; `make test` runs every test.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all build image deps demo test lint test-manifests test-image test-unit test-integration test-clients test-daemonset test-kernel test-k8s bench clean

all: build

build:
	cargo build --release

# The container image for Kubernetes (deploy/kubernetes/), built offline: the static binaries,
# Debian's iptables and busybox, one layer FROM nothing. target/image/wg-cni.tar (OCI layout
# and docker-archive in one), tagged localhost/wg-cni:<version>; ~12 MB.
image:
	deploy/kubernetes/image/build.sh

# Packages, then wg-cni's userspace daemon (wgd/) built and installed as /usr/local/bin/wg-cni-wgd.
deps:
	scripts/install-deps.sh
	scripts/install-wgd.sh

demo:
	scripts/demo.sh

# Everything CI runs: lint, unit tests, integration tests on this host (userspace backend),
# real CNI clients (libcni, podman, containerd CRI) on this host, the image run as the DaemonSet
# says on simulated nodes, and the same integration tests inside a QEMU guest with kernel WireGuard.
test: deps lint test-manifests test-image test-unit test-integration test-clients test-daemonset test-kernel

# The daemon (wgd/) is a package of its own (own lock file, a static build for an explicit
# target): linted and unit-tested from inside its folder.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cd wgd && cargo fmt --check && cargo clippy --all-targets --locked -- -D warnings

# deploy/kubernetes/*.yaml against the API schemas of Kubernetes 1.36 and 1.37, strictly and
# offline (kubernetes-validate from PyPI, in target/k8s-venv), plus cross-references; broken
# copies must be refused. A few seconds.
test-manifests:
	scripts/test-manifests.sh

# The image: its contents (no keys, no build leftovers, size budget), its binaries run under
# podman, its iptables wrapper picks the backend that holds the rules. ~20 s after the build.
test-image: deps test-manifests image
	scripts/test-image.sh

test-unit:
	cargo test --lib --bins
	cd wgd && cargo test --locked

# Serial: the tests compare host-wide snapshots (links, daemons, UDP ports). agent_etcd runs
# agents against etcd in anonymous namespaces; multinode runs simulated nodes with agents;
# flood runs bounded handshake and SYN floods between namespaces of its own (~1.5 min);
# flows runs the relay watch (NFLOG) and conntrack deletion on a router of namespaces of its own.
# Tests of the kernel backend only (tests/backend-only.txt) are skipped here, and say so.
test-integration: deps
	skips=$$(scripts/backend-skips.sh userspace) && \
	WG_CNI_TEST_BACKEND=userspace cargo test --test plugin --test gateway --test hardening --test bad_input \
		--test security --test abuse --test agent_etcd --test multinode --test flood --test flows --test install -- --test-threads=1 --exact $$skips
	# The cross-node suite again with every node in mesh mode (the first run takes the default:
	# on-demand, the cluster has a clusterRange), then with node 1 on-demand and the others mesh;
	# the tests that set their own peering ran in the first pass and are skipped (and say so).
	# A filtered rerun must have run at least one test.
	skips=$$(scripts/backend-skips.sh userspace multinode) && pinned=$$(scripts/pinned-peering.sh) && \
		for peering in mesh mixed; do \
		out=$$(mktemp) && { WG_CNI_TEST_PEERING=$$peering WG_CNI_TEST_BACKEND=userspace \
			cargo test --test multinode -- --test-threads=1 --exact $$skips $$pinned 2>&1 | tee $$out; \
			rc=$${PIPESTATUS[0]}; }; \
		grep -q '^test result: ok\. [1-9]' $$out || { echo "multinode ($$peering) ran no test"; rc=1; }; \
		rm -f $$out; [ $$rc = 0 ] || exit 1; done

# libcni (cnitool), podman 4.3 (CNI backend) and containerd 1.6 (CRI) drive the built plugin;
# installs what they need. See scripts/clients/README.md.
test-clients: deps
	scripts/clients/run.sh

# The image under podman as deploy/kubernetes/wg-cni.yaml's DaemonSet runs it (read from the
# manifest) on two simulated nodes with etcd: readiness, pods talking, agent restarts losing no
# ping, uninstall.yaml leaving no trace; and a rolling upgrade from the last build before
# issues 19-24 (built once by scripts/build-old.sh, cached in target/old/). See the script.
test-daemonset: deps test-manifests image
	scripts/test-daemonset.sh

test-kernel: deps
	scripts/test-kernel.sh

# wg-cni on a real one-node Kubernetes (../shared/k8s beside the repository; skipped, and says
# so, without it): the README's install, the node Ready only after the agent, pods by a
# Deployment talking over wg-cni, a DaemonSet rolling restart under a 100 ms ping, pods deleted
# through kubelet's sandbox GC, the documented uninstall. Not part of `test`: .ci/run runs it
# after. ~4 min, under /tmp/wgcni-itest.lock.
test-k8s:
	scripts/test-k8s.sh

# Benchmarks (not part of `test`): wg-cni vs the reference ptp plugin, natively (userspace
# backend) and in a QEMU guest (kernel backend). Writes bench/results.md and results.json.
bench:
	scripts/bench.sh

clean:
	cargo clean
