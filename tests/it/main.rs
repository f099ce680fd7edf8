//! Integration tests: the real `edgefaas` binary, driven over HTTP on loopback.
//! Set EDGEFAAS_BIN (and EDGEFAAS_BIN_RUNNER, e.g. qemu-arm-static) to test another build.

mod support;

mod invoke;
mod lifecycle;
mod mgmt;
mod transcript;
