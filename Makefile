# EdgeFaaS
#   make run                      serve on :8080 with the embedded echo function
#   make test                     the test suite
#   make build ARCH=arm|armv6|arm64|amd64   static musl binary -> target/<triple>/release/edgefaas
#   make dist ARCH=arm            dist/edgefaas-<version>-linux-<arch>.tar.gz: binary, unit, installer
#   make install                  this machine's build as a systemd service (scripts/install, as root)
#   make image ARCH=arm           image edgefaas:<commit> (docker buildx, else podman)
#   make push REGISTRY=reg.example:5000   multi-arch image tagged <commit> and <branch>, pushed
#   make test-arm / test-armv6 / test-arm64   integration tests against the ARM binaries under qemu-user
#   make bench / make soak / make lint
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
ARCH ?= amd64
ARCHS ?= arm arm64 amd64
REGISTRY ?=
IMAGE ?= edgefaas
COMMIT := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
BRANCH := $(shell git rev-parse --abbrev-ref HEAD 2>/dev/null | tr '/' '-' || echo unknown)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)


.PHONY: run test lint build dist install image push test-arm test-armv6 test-arm64 bench soak
# The same as `cargo run --release`: EDGEFAAS_PYTHON picks the interpreter.
run:
	cargo run --release

test:
	cargo test

bench:
	EDGEFAAS_PYTHON=$(PYTHON) cargo bench --bench bench

# The long form of the soak test that `cargo test` runs with 20 000 requests.
soak:
	SOAK_REQUESTS=300000 cargo test --release --test soak -- --nocapture

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

build:
	scripts/build $(ARCH)

# A tarball to copy to a device: the static binary, the installer and the unit.
dist: build
	@set -e; a=$(ARCH); [ "$$a" = arm ] && a=armv7; \
	d=edgefaas-$(VERSION)-linux-$$a; rm -rf dist/$$d; mkdir -p dist/$$d; \
	cp dist/linux-$$a/edgefaas scripts/install contrib/edgefaas.service contrib/edgefaas.env \
	  LICENSE README.md dist/$$d/; \
	tar -C dist -czf dist/$$d.tar.gz $$d; echo "dist/$$d.tar.gz"

# This machine's own build, installed as a systemd service (needs root).
install:
	cargo build --release
	scripts/install target/release/edgefaas

image:
	scripts/image $(ARCH) $(IMAGE):$(COMMIT)

push:
	REGISTRY=$(REGISTRY) IMAGE=$(IMAGE) scripts/push $(ARCHS)

test-arm:
	scripts/build arm
	EDGEFAAS_BIN=$(CURDIR)/target/armv7-unknown-linux-musleabihf/release/edgefaas \
	  EDGEFAAS_BIN_RUNNER=qemu-arm-static cargo test --test it --test it_exec

# The Pi Zero / Pi 1 build on an emulated ARM1176 (ARMv6, VFPv2).
test-armv6:
	scripts/build armv6
	EDGEFAAS_BIN=$(CURDIR)/target/arm-unknown-linux-musleabihf/release/edgefaas \
	  EDGEFAAS_BIN_RUNNER="qemu-arm-static -cpu arm1176" cargo test --test it --test it_exec

# 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2).
test-arm64:
	scripts/build arm64
	EDGEFAAS_BIN=$(CURDIR)/target/aarch64-unknown-linux-musl/release/edgefaas \
	  EDGEFAAS_BIN_RUNNER=qemu-aarch64-static cargo test --test it --test it_exec
