//! The same integration tests as `tests/it`, with every daemon in exec mode
//! (a new Python per request), so both modes keep one contract.

/// The sandbox every daemon in this test binary runs with.
pub const SANDBOX: &str = "best-effort";

/// The invocation mode every daemon in this test binary runs in.
pub const MODE: &str = "exec";

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
#[path = "../it/sandbox.rs"]
mod sandbox;
#[path = "../it/settings.rs"]
mod settings;
#[path = "../it/transcript.rs"]
mod transcript;
