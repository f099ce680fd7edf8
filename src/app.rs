//! The daemon's shared state, built once at start-up and handed to every worker.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::config::Config;
use crate::error::Result;
use crate::fetch::Fetcher;
use crate::invoke::Invoker;
use crate::metrics::{Gauges, InFlight, Metrics, Origin};
use crate::process::Processes;
use crate::store::{FunctionName, Installed, Store};
use crate::zygote::Zygotes;

/// Everything a request handler may use.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub fetcher: Fetcher,
    pub invoker: Invoker,
    pub procs: Arc<Processes>,
    pub inflight: InFlight,
    pub metrics: Metrics,
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
            metrics: Metrics::default(),
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

    /// Installs a function; once this returns, no request is served the old code.
    pub fn install(
        &self,
        name: &FunctionName,
        source: &[u8],
        origin: &str,
        kind: Origin,
    ) -> Result<Installed> {
        let outcome = self.store.install(name, source, origin)?;
        self.invoker.forget(name);
        self.metrics.installed(kind);
        Ok(outcome)
    }

    /// Deletes a function and stops its zygote.
    pub fn delete(&self, name: &FunctionName) -> Result<()> {
        self.store.delete(name)?;
        self.invoker.forget(name);
        self.metrics.deleted();
        Ok(())
    }

    /// The metrics page.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&Gauges {
            inflight: self.inflight.current(),
            max_inflight: self.config.max_inflight,
            zygotes: self.invoker.zygotes.count(),
        })
    }

    /// Starts refusing new work.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}
