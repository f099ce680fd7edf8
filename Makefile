# EdgeFaaS
#   make run                      serve on :8080 with the embedded echo function
#   make test                     the test suite
#   make build ARCH=arm|arm64|amd64   static musl binary -> target/<triple>/release/edgefaas
#   make image ARCH=arm           docker image edgefaas:<commit> for that platform (buildx, --load)
#   make push REGISTRY=reg.example:5000   multi-arch image tagged <commit> and <branch>, pushed
#   make test-arm                 integration tests against the armv7 binary under qemu-arm-static
#   make bench / make soak / make lint
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
ARCH ?= amd64
ARCHS ?= arm arm64 amd64
REGISTRY ?=
IMAGE ?= edgefaas
COMMIT := $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
BRANCH := $(shell git rev-parse --abbrev-ref HEAD 2>/dev/null | tr '/' '-' || echo unknown)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

platform_arm := linux/arm/v7
platform_arm64 := linux/arm64
platform_amd64 := linux/amd64
comma := ,
empty :=
space := $(empty) $(empty)

.PHONY: run test lint build image push test-arm bench soak
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

image: build
	docker buildx build --platform $(platform_$(ARCH)) \
	  --build-arg VERSION=$(VERSION) --build-arg REVISION=$(COMMIT) \
	  -t $(IMAGE):$(COMMIT) -t $(IMAGE):$(BRANCH) --load .

push:
	@test -n "$(REGISTRY)" || { echo "make push needs REGISTRY=host[:port][/path]" >&2; exit 2; }
	for a in $(ARCHS); do scripts/build $$a || exit 1; done
	docker buildx build --platform $(subst $(space),$(comma),$(foreach a,$(ARCHS),$(platform_$(a)))) \
	  --build-arg VERSION=$(VERSION) --build-arg REVISION=$(COMMIT) \
	  -t $(REGISTRY)/$(IMAGE):$(COMMIT) -t $(REGISTRY)/$(IMAGE):$(BRANCH) --push .

test-arm:
	scripts/build arm
	EDGEFAAS_BIN=$(CURDIR)/target/armv7-unknown-linux-musleabihf/release/edgefaas \
	  EDGEFAAS_BIN_RUNNER=qemu-arm-static cargo test --test it --test it_exec
