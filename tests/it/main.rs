//! Integration tests: the real `edgefaas` binary, driven over HTTP on loopback.
//! Set EDGEFAAS_BIN (and EDGEFAAS_BIN_RUNNER, e.g. qemu-arm-static) to test another build.

/// The sandbox every daemon in this test binary runs with.
pub const SANDBOX: &str = "best-effort";

/// The invocation mode every daemon in this test binary runs in.
pub const MODE: &str = "fork";

mod support;

mod abuse;
mod engine;
mod events;
mod faults;
mod front;
mod hostile;
mod invoke;
mod lifecycle;
mod mgmt;
mod mqtt;
mod observe;
mod overload;
mod proxy;
mod readme;
mod sandbox;
mod settings;
mod sourcedir;
mod transcript;
mod zygote;
