//! `edgefaas`: a Function-as-a-Service daemon for edge devices. It serves many
//! Python functions over HTTP from one small static binary, and installs and
//! deletes them on the fly. See README.md for use and ARCHITECTURE.md for the map.
#![deny(unsafe_code)]

mod admission;
mod app;
mod config;
mod error;
mod fetch;
mod http;
mod invoke;
mod metrics;
mod mgmt;
mod name;
mod process;
mod router;
mod sandbox;
mod server;
mod settings;
mod sourcedir;
mod store;
mod sys;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::app::App;
use crate::config::Config;

const USAGE: &str = "\
edgefaas: a Function-as-a-Service daemon for edge devices

Usage: edgefaas [--help | --version]

Configured by environment variables (defaults in brackets):
  EDGEFAAS_PORT [8080]             EDGEFAAS_BIND [0.0.0.0]
  EDGEFAAS_FUNCTIONS_DIR [./function]
  EDGEFAAS_PYTHON [python3]        EDGEFAAS_WORKERS [2 x cores, at least 4]
  EDGEFAAS_MAX_INFLIGHT [workers - 1]
  EDGEFAAS_EXEC_TIMEOUT [10]       EDGEFAAS_FETCH_TIMEOUT [30]   (seconds)
  EDGEFAAS_SHUTDOWN_GRACE [10]     (seconds)
  EDGEFAAS_MAX_BODY [1048576]      EDGEFAAS_MAX_OUTPUT [4194304]
  EDGEFAAS_MAX_FUNCTION_SIZE [262144]                           (bytes)
  EDGEFAAS_MGMT_TOKEN [unset: /mgmt is open]
  EDGEFAAS_MODE [fork] (fork | exec)  EDGEFAAS_IDLE_TIMEOUT [300] (seconds)
  EDGEFAAS_SOURCE_DIR [unset]      EDGEFAAS_SOURCE_INTERVAL [10] (seconds)
  EDGEFAAS_MAX_CONNECTIONS [128]   EDGEFAAS_IO_TIMEOUT [30] (seconds)
  RUST_LOG [info]
";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("-h" | "--help") => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("edgefaas {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "edgefaas: unknown argument '{other}' (configure with EDGEFAAS_* variables; see --help)"
            );
            return ExitCode::FAILURE;
        }
        None => {}
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let config = Config::from_env().map_err(|e| e.to_string())?;
    // A write past a file-size limit fails with EFBIG (answered 507) instead of killing us.
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .map_err(|e| e.to_string())?;
    let addr = config.addr();
    // Register before anything else so a SIGTERM during start-up is not lost.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|e| e.to_string())?;
    // No function may read our memory or /proc entries (the token), or trace us.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the daemon undumpable: {e}"))?;
    let app = App::new(config)?;
    let app = Arc::new(app);
    let (inflight, queue, conns) = (
        app.config.max_inflight,
        app.config.max_queue,
        app.config.max_connections,
    );
    if inflight + queue >= conns {
        warn!(
            "EDGEFAAS_MAX_INFLIGHT + EDGEFAAS_MAX_QUEUE ({}) reach EDGEFAAS_MAX_CONNECTIONS ({conns}): \
             waiting invocations can take every connection, and health probes get 503",
            inflight + queue
        );
    }
    info!(
        "python: {} {} ({}); sandbox: {}",
        app.interpreter.executable.display(),
        app.interpreter.version,
        app.config.python,
        app.invoker.sandbox().report()
    );
    if app.config.mgmt_token.is_none() {
        warn!("EDGEFAAS_MGMT_TOKEN is not set: anyone who reaches the port can install functions");
    }
    if let Some(dir) = app.config.source_dir.clone() {
        if !dir.is_dir() {
            return Err(format!(
                "EDGEFAAS_SOURCE_DIR: {} is not a directory",
                dir.display()
            ));
        }
        // The first sync runs before the port opens, so "ready" means the functions are there.
        sourcedir::SourceDir::new(dir)
            .start(app.clone(), app.config.source_interval)
            .map_err(|e| format!("cannot start the source-dir sync: {e}"))?;
    }
    process::start_sweeper(app.procs.clone())
        .map_err(|e| format!("cannot start the process sweeper: {e}"))?;
    let server =
        server::listen(&app.config).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let server = Arc::new(server);
    let _ = app.server.set(server.clone());
    let pool = server::Pool::start(app.clone(), server.clone())
        .map_err(|e| format!("cannot start workers: {e}"))?;
    info!(
        "edgefaas {} serving {} on {} with {} workers, {} invocations at once, {} waiting at most",
        env!("CARGO_PKG_VERSION"),
        app.store.dir().display(),
        server.server_addr(),
        app.config.workers,
        app.config.max_inflight,
        app.config.max_queue
    );
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    info!(
        "signal {signal}: draining ({} in flight, grace {:?})",
        app.inflight(),
        app.config.shutdown_grace
    );
    drain(&app);
    pool.stop(Duration::from_secs(2));
    app.invoker.stop_all();
    info!("stopped");
    Ok(())
}

/// Refuses new work, waits for in-flight invocations up to the grace period, then kills the rest.
fn drain(app: &App) {
    app.start_draining();
    let deadline = Instant::now() + app.config.shutdown_grace;
    while app.inflight() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if app.inflight() > 0 {
        warn!("grace period over: killing {} invocations", app.inflight());
        process::kill_descendants();
        let deadline = Instant::now() + Duration::from_secs(2);
        while app.inflight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
