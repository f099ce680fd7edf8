//! `edgefaas`: a Function-as-a-Service daemon for edge devices. It serves many
//! Python functions over HTTP from one small static binary, and installs and
//! deletes them on the fly. See README.md for use and ARCHITECTURE.md for the map.
#![deny(unsafe_code)]

mod admission;
mod app;
mod asyncq;
mod config;
mod error;
mod events;
mod fetch;
mod http;
mod invoke;
mod logs;
mod metrics;
mod mgmt;
mod mqtt;
mod name;
mod process;
mod router;
mod sandbox;
mod schedule;
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

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("-h" | "--help") => {
            print!("{}", config::usage());
            return ExitCode::SUCCESS;
        }
        Some("healthcheck") => return healthcheck(),
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
    init_log();
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
    // Whatever the daemon inherited open stays out of function processes.
    sys::cloexec_inherited();
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
    asyncq::AsyncQueue::start(&app).map_err(|e| format!("cannot start the async queue: {e}"))?;
    let tz = schedule::zone(app.config.tz.as_deref())?;
    schedule::start(app.clone(), tz).map_err(|e| format!("cannot start the scheduler: {e}"))?;
    if let Some(settings) = app.config.mqtt.clone() {
        let m = mqtt::Mqtt::start(app.clone(), settings).map_err(|e| format!("MQTT: {e}"))?;
        let _ = app.mqtt.set(m);
    }
    process::start_sweeper(app.procs.clone())
        .map_err(|e| format!("cannot start the process sweeper: {e}"))?;
    let server =
        server::listen(&app.config).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let server = Arc::new(server);
    let _ = app.server.set(server.clone());
    let pool = server::Pool::start(app.clone(), server.clone())
        .map_err(|e| format!("cannot start workers: {e}"))?;
    let token = match (&app.config.mgmt_token, &app.config.mgmt_token_file) {
        (None, _) => "unset (/mgmt is open)".to_string(),
        (Some(_), Some(file)) => format!("from {}", file.display()),
        (Some(_), None) => "set".to_string(),
    };
    info!(
        "edgefaas {} ready on {}: {} mode, {} workers, {} invocations at once, {} waiting at most; \
         python {} {} (EDGEFAAS_PYTHON={}); functions {}; token {token}; sandbox: {}",
        env!("CARGO_PKG_VERSION"),
        server.server_addr(),
        match app.config.mode {
            invoke::Mode::Fork => "fork",
            invoke::Mode::Exec => "exec",
        },
        app.config.workers,
        app.config.max_inflight,
        app.config.max_queue,
        app.interpreter.executable.display(),
        app.interpreter.version,
        app.config.python,
        app.store.dir().display(),
        app.invoker.sandbox().report()
    );
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    info!(
        "signal {signal}: draining ({} in flight, grace {:?})",
        app.inflight(),
        app.config.shutdown_grace
    );
    if let Some(m) = app.mqtt.get() {
        m.stop();
    }
    drain(&app);
    pool.stop(Duration::from_secs(2));
    app.invoker.stop_all();
    // Whatever function processes are left (escaped into sessions of their own) go too.
    process::kill_descendants();
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

/// The log: `RUST_LOG` levels; each line with a UTC timestamp, unless journald
/// (`JOURNAL_STREAM`) adds its own or `EDGEFAAS_LOG_TIMESTAMPS=off`; under
/// journald each line carries its priority (`<4>` for a warning) instead.
fn init_log() {
    use std::io::Write;
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let stamps = !journald
        && !matches!(
            std::env::var("EDGEFAAS_LOG_TIMESTAMPS").as_deref(),
            Ok("off" | "0" | "false" | "no")
        );
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            let level = record.level();
            if journald {
                let priority = match level {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    _ => 7,
                };
                return writeln!(
                    buf,
                    "<{priority}>{level:<5} {}: {}",
                    record.target(),
                    record.args()
                );
            }
            if stamps {
                write!(buf, "{} ", timestamp())?;
            }
            writeln!(buf, "{level:<5} {}: {}", record.target(), record.args())
        })
        .init();
}

/// Now, UTC, to the millisecond: `2026-11-30T01:02:03.456Z`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = store::rfc3339(now.as_secs());
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), now.subsec_millis())
}

/// `edgefaas healthcheck`: GET /_/health on the configured port (what a
/// container's HEALTHCHECK runs: the image needs no curl or wget). Exit 0 on 200.
fn healthcheck() -> ExitCode {
    use std::io::{Read, Write};
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgefaas healthcheck: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ip = match config.bind {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let addr = std::net::SocketAddr::new(ip, config.port);
    let timeout = Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET /_/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut head = vec![0u8; 256];
        let n = s.read(&mut head)?;
        Ok(String::from_utf8_lossy(&head[..n]).into_owned())
    })();
    match answer {
        Ok(text) if text.starts_with("HTTP/1.1 200") => ExitCode::SUCCESS,
        Ok(text) => {
            eprintln!(
                "edgefaas healthcheck: {addr} answered {}",
                text.lines().next().unwrap_or("nothing")
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("edgefaas healthcheck: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
