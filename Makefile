# EdgeFaaS: `make run` serves on :8080 with the embedded echo function; `make test` runs the tests.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)

.PHONY: run test lint
run:
	EDGEFAAS_PYTHON=$(PYTHON) cargo run --release

test:
	cargo test

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
