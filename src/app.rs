//! The daemon's shared state, built once at start-up and handed to every worker.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::fetch::Fetcher;
use crate::invoke::Invoker;
use crate::metrics::InFlight;
use crate::process::Processes;
use crate::store::Store;
use crate::zygote::Zygotes;

/// Everything a request handler may use.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub fetcher: Fetcher,
    pub invoker: Invoker,
    pub procs: Arc<Processes>,
    pub inflight: InFlight,
    draining: AtomicBool,
}

impl App {
    /// Opens the store and sets up the invoker and fetcher from `config`.
    pub fn new(config: Config) -> io::Result<App> {
        let store = Store::open(&config.functions_dir)?;
        let procs = Arc::new(Processes::default());
        let zygotes = Arc::new(Zygotes::new(procs.clone(), config.idle_timeout));
        // Checked a few times per idle period, at least every 5 s.
        let every =
            (config.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        Zygotes::start_evictor(Arc::downgrade(&zygotes), every)?;
        let invoker = Invoker {
            python: config.python.clone(),
            runner: store.runner_path(),
            timeout: config.exec_timeout,
            max_output: config.max_output,
            mode: config.mode,
            procs: procs.clone(),
            zygotes,
        };
        Ok(App {
            fetcher: Fetcher::new(config.fetch_timeout, config.max_function_size),
            inflight: InFlight::new(config.max_inflight),
            draining: AtomicBool::new(false),
            store,
            invoker,
            procs,
            config,
        })
    }

    /// True once shutdown has begun: new work is refused with 503.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts refusing new work.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}
