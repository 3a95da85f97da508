# wg-cni: `make demo` shows two pods talking over WireGuard; `make test` runs every test.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all build deps demo test lint test-unit test-integration test-kernel clean

all: build

build:
	cargo build --release

deps:
	scripts/install-deps.sh

demo:
	scripts/demo.sh

# Everything CI runs: lint, unit tests, integration tests on this host (userspace backend),
# and the same integration tests inside a QEMU guest with kernel WireGuard.
test: deps lint test-unit test-integration test-kernel

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-unit:
	cargo test --bins

# Serial: the tests compare host-wide snapshots (links, daemons, UDP ports).
test-integration: deps
	WG_CNI_TEST_BACKEND=userspace cargo test --test plugin --test gateway -- --test-threads=1

test-kernel: deps
	scripts/test-kernel.sh

clean:
	cargo clean
