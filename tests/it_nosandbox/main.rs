//! The functional integration tests with `EDGEFAAS_SANDBOX=off`, in both modes'
//! default (fork), so the unconfined fallback keeps the same contract.

/// The sandbox every daemon in this test binary runs with.
pub const SANDBOX: &str = "off";

/// The invocation mode every daemon in this test binary runs in.
pub const MODE: &str = "fork";

#[path = "../it/support/mod.rs"]
mod support;

#[path = "../it/engine.rs"]
mod engine;
#[path = "../it/invoke.rs"]
mod invoke;
#[path = "../it/lifecycle.rs"]
mod lifecycle;
#[path = "../it/mgmt.rs"]
mod mgmt;
#[path = "../it/settings.rs"]
mod settings;
#[path = "../it/transcript.rs"]
mod transcript;
#[path = "../it/zygote.rs"]
mod zygote;
