//! The daemon's shared state, built once at start-up and handed to every worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::admission::Lane;
use crate::config::Config;
use crate::error::Result;
use crate::fetch::Fetcher;
use crate::invoke::{Invoker, Settings};
use crate::metrics::{Gauges, Metrics, Origin};
use crate::name::FunctionName;
use crate::process::Processes;
use crate::sandbox::{self, Interpreter, Sandbox};
use crate::settings::Settings as Own;
use crate::store::{Installed, Store};

/// Everything a request handler may use.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub fetcher: Fetcher,
    pub invoker: Invoker,
    pub procs: Arc<Processes>,
    pub lanes: Lanes,
    pub metrics: Metrics,
    /// Each function's recent stderr and failures.
    pub logs: Arc<crate::logs::Logs>,
    /// Async calls waiting on disk.
    pub asyncq: crate::asyncq::AsyncQueue,
    /// The MQTT session, once started.
    pub mqtt: OnceLock<Arc<crate::mqtt::Mqtt>>,
    /// What the interpreter said about itself at start-up.
    pub interpreter: Interpreter,
    /// The server, once listening: admitting a job from outside the workers wakes one.
    pub server: Arc<OnceLock<Arc<tiny_http::Server>>>,
    draining: AtomicBool,
}

/// The admission lanes: invocations, and installs/deletes (so slow downloads
/// never take the workers that answer health and invocations).
pub struct Lanes {
    pub invoke: Arc<Lane>,
    pub install: Arc<Lane>,
}

/// Installs and deletes running at once; more wait.
pub const MAX_CHANGES: usize = 2;
/// Installs and deletes waiting at most.
const CHANGE_QUEUE: usize = 32;

impl App {
    /// Opens the store, probes the interpreter and the kernel, and sets up the
    /// invoker and fetcher from `config`; `Err` says what stops start-up.
    pub fn new(config: Config) -> std::result::Result<App, String> {
        let store = Store::open(&config.functions_dir)
            .map_err(|e| format!("cannot open the functions dir: {e}"))?;
        let interpreter =
            sandbox::probe(&config.python).map_err(|e| format!("EDGEFAAS_PYTHON: {e}"))?;
        let tmp_root = std::env::temp_dir().join(format!("edgefaas-run.{}", std::process::id()));
        remove_stale_tmp(&std::env::temp_dir());
        let runtime = store
            .runner_path()
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_default();
        let private: Vec<_> = config.mgmt_token_file.iter().cloned().collect();
        let places = sandbox::Places {
            functions_dir: store.dir(),
            runtime_dir: &runtime,
            secrets_dir: config.secrets_dir.as_deref(),
            tmp_root: &tmp_root,
            private: &private,
        };
        let daemon_tasks = (config.workers + config.max_connections + 16) as u64;
        let sandbox = Sandbox::new(config.sandbox, &interpreter, &places, daemon_tasks)
            .verify(&config.python)?;
        sandbox.strict_ok()?;
        if let Some(file) = &config.mgmt_token_file {
            if let Some(root) = sandbox.exposes(file) {
                return Err(format!(
                    "EDGEFAAS_MGMT_TOKEN_FILE: {} is inside {}, which every function may read; \
                     keep it outside /etc, /usr and the interpreter's paths (e.g. /run/secrets)",
                    file.display(),
                    root.display()
                ));
            }
        }
        let procs = Arc::new(Processes::default());
        let logs = Arc::new(crate::logs::Logs::default());
        let invoker = Invoker::new(
            Settings {
                python: config.python.clone(),
                runner: store.runner_path(),
                timeout: config.exec_timeout,
                max_output: config.max_output,
                mode: config.mode,
                max_warm: config.max_warm,
                idle: config.idle_timeout,
                secrets_dir: config.secrets_dir.clone(),
            },
            Arc::new(sandbox),
            procs.clone(),
            logs.clone(),
        )
        .map_err(|e| format!("cannot start the invoker: {e}"))?;
        let asyncq = crate::asyncq::AsyncQueue::open(
            store.dir(),
            config.async_queue,
            config.max_inflight,
            config.fetch_timeout,
        )
        .map_err(|e| format!("cannot open the async queue: {e}"))?;
        let server: Arc<OnceLock<Arc<tiny_http::Server>>> = Arc::default();
        let waker = |server: &Arc<OnceLock<Arc<tiny_http::Server>>>| {
            let server = server.clone();
            Box::new(move || {
                if let Some(s) = server.get() {
                    s.unblock();
                }
            }) as Box<dyn Fn() + Send + Sync>
        };
        let lanes = Lanes {
            invoke: Lane::new(
                config.max_inflight,
                config.max_queue,
                config.queue_timeout,
                waker(&server),
            ),
            install: Lane::new(
                MAX_CHANGES,
                CHANGE_QUEUE,
                config.fetch_timeout + config.queue_timeout,
                waker(&server),
            ),
        };
        Ok(App {
            fetcher: Fetcher::new(config.fetch_timeout, config.max_function_size),
            lanes,
            server,
            metrics: Metrics::default(),
            logs,
            asyncq,
            mqtt: OnceLock::new(),
            interpreter,
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

    /// Installs a function once its code imports and has a `handle` (else 422 and
    /// nothing changes); once this returns, no request is served the old code.
    /// Its settings: the old ones, then its header lines, then `query`'s.
    pub fn install(
        &self,
        name: &FunctionName,
        source: &[u8],
        origin: &str,
        kind: Origin,
        query: &str,
    ) -> Result<Installed> {
        let old = self.store.settings(name);
        let old = self.store.handler(name).is_ok().then_some(old.as_ref());
        let own = Own::for_install(old, source, query)?;
        let outcome = self
            .store
            .install(name, source, origin, own.clone(), |staged| {
                self.invoker.check(name, staged, &own)
            })?;
        self.invoker.forget(name);
        self.metrics.installed(kind);
        if let Some(m) = self.mqtt.get() {
            m.topics_changed(std::time::Duration::from_secs(2));
        }
        Ok(outcome)
    }

    /// Deletes a function and stops its zygote.
    pub fn delete(&self, name: &FunctionName) -> Result<()> {
        self.store.delete(name)?;
        self.invoker.forget(name);
        self.logs.forget(name.as_str());
        if let Some(m) = self.mqtt.get() {
            m.topics_changed(std::time::Duration::from_secs(2));
        }
        self.metrics.deleted();
        Ok(())
    }

    /// The metrics page.
    pub fn render_metrics(&self) -> String {
        let (inflight, queued) = self.lanes.invoke.depth();
        self.metrics.render(&Gauges {
            inflight,
            queued,
            max_inflight: self.config.max_inflight,
            max_queue: self.config.max_queue,
            zygotes: self.invoker.warm(),
            sandbox: self.invoker.sandbox().features(),
            landlock_abi: self.invoker.sandbox().landlock,
            async_depth: self.asyncq.depth(),
            mqtt: self.mqtt.get().map(|m| m.gauges()),
        })
    }

    /// Starts refusing new work: waiting invocations and changes get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.asyncq.stop();
        self.lanes.invoke.close();
        self.lanes.install.close();
    }

    /// Invocations running now.
    pub fn inflight(&self) -> usize {
        self.lanes.invoke.depth().0
    }
}

/// Removes the invocation folders of daemons that are gone (`edgefaas-run.<pid>`).
fn remove_stale_tmp(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("edgefaas-run."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
