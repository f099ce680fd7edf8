//! Daemon configuration: every default in one place, read once from the
//! `EDGEFAAS_*` environment variables at start-up.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use crate::invoke::Mode;

impl FromStr for Mode {
    type Err = ();
    fn from_str(s: &str) -> Result<Mode, ()> {
        match s {
            "fork" => Ok(Mode::Fork),
            "exec" => Ok(Mode::Exec),
            _ => Err(()),
        }
    }
}

/// Everything the daemon can be told from outside.
#[derive(Clone)]
pub struct Config {
    /// Address to listen on (`EDGEFAAS_BIND`).
    pub bind: IpAddr,
    /// TCP port (`EDGEFAAS_PORT`).
    pub port: u16,
    /// Where functions live on disk (`EDGEFAAS_FUNCTIONS_DIR`).
    pub functions_dir: PathBuf,
    /// The Python interpreter that runs functions (`EDGEFAAS_PYTHON`).
    pub python: String,
    /// Request worker threads (`EDGEFAAS_WORKERS`): invocations, installs, and
    /// at least one more for health, metrics and listings.
    pub workers: usize,
    /// Invocations running at once; more wait in the queue (`EDGEFAAS_MAX_INFLIGHT`).
    pub max_inflight: usize,
    /// Invocations waiting for a slot at most; more get 429 (`EDGEFAAS_MAX_QUEUE`).
    pub max_queue: usize,
    /// Longest wait for a slot; then 429 (`EDGEFAAS_QUEUE_TIMEOUT`).
    pub queue_timeout: Duration,
    /// How long one invocation may run (`EDGEFAAS_EXEC_TIMEOUT`).
    pub exec_timeout: Duration,
    /// Largest request body accepted (`EDGEFAAS_MAX_BODY`).
    pub max_body: u64,
    /// Largest function output kept; more is an error (`EDGEFAAS_MAX_OUTPUT`).
    pub max_output: u64,
    /// Largest function source accepted (`EDGEFAAS_MAX_FUNCTION_SIZE`).
    pub max_function_size: u64,
    /// How long a function download may take (`EDGEFAAS_FETCH_TIMEOUT`).
    pub fetch_timeout: Duration,
    /// Bearer token guarding `/mgmt` (`EDGEFAAS_MGMT_TOKEN`, or the file named by
    /// `EDGEFAAS_MGMT_TOKEN_FILE`); `None` leaves it open.
    pub mgmt_token: Option<String>,
    /// `EDGEFAAS_MGMT_TOKEN_FILE`, which no function may read.
    pub mgmt_token_file: Option<PathBuf>,
    /// How much confinement function processes get (`EDGEFAAS_SANDBOX`).
    pub sandbox: crate::sandbox::Level,
    /// Per-function secret folders, `<dir>/<name>/` (`EDGEFAAS_SECRETS_DIR`).
    pub secrets_dir: Option<PathBuf>,
    /// The MQTT trigger (`EDGEFAAS_MQTT_*`), when `EDGEFAAS_MQTT_URL` is set.
    pub mqtt: Option<crate::mqtt::Settings>,
    /// The zone schedules are read in (`EDGEFAAS_TZ`); `None`: the node's.
    pub tz: Option<String>,
    /// Async calls queued at most; more get 429 (`EDGEFAAS_ASYNC_QUEUE`).
    pub async_queue: usize,
    /// How long SIGTERM waits for in-flight invocations (`EDGEFAAS_SHUTDOWN_GRACE`).
    pub shutdown_grace: Duration,
    /// Fork from a warm zygote, or exec a new Python per request (`EDGEFAAS_MODE`).
    pub mode: Mode,
    /// How long an unused zygote stays warm (`EDGEFAAS_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Functions kept warm at most; the least recently used is stopped first (`EDGEFAAS_MAX_WARM`).
    pub max_warm: usize,
    /// A read-only folder of `name.py` files kept in sync, e.g. a ConfigMap (`EDGEFAAS_SOURCE_DIR`).
    pub source_dir: Option<PathBuf>,
    /// How often the source dir is checked (`EDGEFAAS_SOURCE_INTERVAL`).
    pub source_interval: Duration,
    /// Client connections held at once; more get 503 at once (`EDGEFAAS_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Connections from one client address at once, 0 for no cap
    /// (`EDGEFAAS_MAX_CONNECTIONS_PER_CLIENT`).
    pub max_connections_per_client: usize,
    /// Longest time for a request head from its first byte, the idle keep-alive
    /// lifetime, and the base of every body and answer deadline (`EDGEFAAS_IO_TIMEOUT`).
    pub io_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Two per core (a request waits on its pipes part of the time), 2 to 16.
        let max_inflight = (2 * cores).clamp(2, 16);
        Config {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 8080,
            functions_dir: PathBuf::from("./function"),
            python: "python3".into(),
            workers: workers_for(max_inflight),
            max_inflight,
            // 64 concurrent clients never see a 429, and at least 16 of the 128
            // connections stay free for health, metrics and /mgmt.
            max_queue: 96,
            queue_timeout: Duration::from_secs(30),
            exec_timeout: Duration::from_secs(10),
            max_body: 1024 * 1024,
            max_output: 4 * 1024 * 1024,
            max_function_size: 256 * 1024,
            fetch_timeout: Duration::from_secs(30),
            mgmt_token: None,
            mgmt_token_file: None,
            sandbox: crate::sandbox::Level::BestEffort,
            secrets_dir: None,
            shutdown_grace: Duration::from_secs(10),
            async_queue: 256,
            tz: None,
            mqtt: None,
            mode: Mode::Fork,
            idle_timeout: Duration::from_secs(300),
            // A warm echo-sized function costs about 1 MB; real ones with imports more.
            // 16 keeps even heavy ones within a 1 GB board's means.
            max_warm: 16,
            source_dir: None,
            source_interval: Duration::from_secs(10),
            max_connections: 128,
            max_connections_per_client: 0,
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// A variable that is set but cannot be used; its message names the variable.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    var: &'static str,
    value: String,
    expected: &'static str,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, got '{}'",
            self.var, self.expected, self.value
        )
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the process environment over the defaults.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `get` over the defaults (testable without the real environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let d = Config::default();
        let max_inflight = parse(&get, "EDGEFAAS_MAX_INFLIGHT", d.max_inflight, positive)?;
        let least = workers_for(max_inflight) - 1;
        let workers = parse(&get, "EDGEFAAS_WORKERS", workers_for(max_inflight), |w| {
            *w >= least
        })
        .map_err(|mut e| {
            e.value = format!("{} (at least EDGEFAAS_MAX_INFLIGHT + 3 = {least})", e.value);
            e
        })?;
        let token = token(&get)?;
        let mqtt = mqtt(&get)?;
        Ok(Config {
            bind: parse(&get, "EDGEFAAS_BIND", d.bind, any)?,
            port: parse(&get, "EDGEFAAS_PORT", d.port, any)?,
            functions_dir: get("EDGEFAAS_FUNCTIONS_DIR")
                .filter(|s| !s.is_empty())
                .map_or(d.functions_dir, PathBuf::from),
            python: get("EDGEFAAS_PYTHON")
                .filter(|s| !s.is_empty())
                .unwrap_or(d.python),
            workers,
            max_inflight,
            max_queue: parse(&get, "EDGEFAAS_MAX_QUEUE", d.max_queue, any)?,
            queue_timeout: seconds(&get, "EDGEFAAS_QUEUE_TIMEOUT", d.queue_timeout)?,
            exec_timeout: seconds(&get, "EDGEFAAS_EXEC_TIMEOUT", d.exec_timeout)?,
            max_body: parse(&get, "EDGEFAAS_MAX_BODY", d.max_body, any)?,
            max_output: parse(&get, "EDGEFAAS_MAX_OUTPUT", d.max_output, positive)?,
            max_function_size: parse(
                &get,
                "EDGEFAAS_MAX_FUNCTION_SIZE",
                d.max_function_size,
                positive,
            )?,
            fetch_timeout: seconds(&get, "EDGEFAAS_FETCH_TIMEOUT", d.fetch_timeout)?,
            mgmt_token: token,
            mgmt_token_file: get("EDGEFAAS_MGMT_TOKEN_FILE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            sandbox: parse(&get, "EDGEFAAS_SANDBOX", d.sandbox, any)?,
            secrets_dir: get("EDGEFAAS_SECRETS_DIR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            shutdown_grace: seconds(&get, "EDGEFAAS_SHUTDOWN_GRACE", d.shutdown_grace)?,
            async_queue: parse(&get, "EDGEFAAS_ASYNC_QUEUE", d.async_queue, positive)?,
            tz: get("EDGEFAAS_TZ").filter(|s| !s.is_empty()),
            mqtt,
            mode: parse(&get, "EDGEFAAS_MODE", d.mode, any)?,
            idle_timeout: seconds(&get, "EDGEFAAS_IDLE_TIMEOUT", d.idle_timeout)?,
            max_warm: parse(&get, "EDGEFAAS_MAX_WARM", d.max_warm, positive)?,
            source_dir: get("EDGEFAAS_SOURCE_DIR")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            source_interval: seconds(&get, "EDGEFAAS_SOURCE_INTERVAL", d.source_interval)?,
            max_connections: parse(
                &get,
                "EDGEFAAS_MAX_CONNECTIONS",
                d.max_connections,
                positive,
            )?,
            max_connections_per_client: parse(
                &get,
                "EDGEFAAS_MAX_CONNECTIONS_PER_CLIENT",
                d.max_connections_per_client,
                any,
            )?,
            io_timeout: seconds(&get, "EDGEFAAS_IO_TIMEOUT", d.io_timeout)?,
        })
    }

    /// The socket address the server binds.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }
}

/// The management token, from `EDGEFAAS_MGMT_TOKEN` or the file `EDGEFAAS_MGMT_TOKEN_FILE`
/// names (a mounted Kubernetes Secret; one trailing newline is dropped). Set but
/// empty stops start-up: an empty token would guard nothing.
fn token(get: &impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    let err = |var: &'static str, value: String, expected: &'static str| ConfigError {
        var,
        value,
        expected,
    };
    let token = match (get("EDGEFAAS_MGMT_TOKEN"), get("EDGEFAAS_MGMT_TOKEN_FILE")) {
        (Some(_), Some(file)) => {
            return Err(err(
                "EDGEFAAS_MGMT_TOKEN_FILE",
                file,
                "to be set without EDGEFAAS_MGMT_TOKEN (one source of the token)",
            ));
        }
        (Some(t), None) => Some(("EDGEFAAS_MGMT_TOKEN", t, String::new())),
        (None, Some(file)) => match std::fs::read_to_string(&file) {
            Ok(t) => Some(("EDGEFAAS_MGMT_TOKEN_FILE", t, file)),
            Err(e) => {
                return Err(err(
                    "EDGEFAAS_MGMT_TOKEN_FILE",
                    format!("{file} ({e})"),
                    "a readable file holding the token",
                ));
            }
        },
        (None, None) => None,
    };
    match token {
        None => Ok(None),
        Some((var, t, file)) => {
            let t = t.strip_suffix('\n').unwrap_or(&t);
            let t = t.strip_suffix('\r').unwrap_or(t);
            if t.trim().is_empty() || t.contains(['\n', '\0']) {
                let shown = if file.is_empty() { t.to_string() } else { file };
                return Err(err(var, shown, "a token that is not empty (one line)"));
            }
            Ok(Some(t.to_string()))
        }
    }
}

/// The MQTT settings, if `EDGEFAAS_MQTT_URL` is set.
fn mqtt(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Option<crate::mqtt::Settings>, ConfigError> {
    let Some(url) = get("EDGEFAAS_MQTT_URL").filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let err = |var: &'static str, value: String| ConfigError {
        var,
        value,
        expected: expectation(var),
    };
    let endpoint =
        crate::mqtt::Endpoint::parse(&url).map_err(|_| err("EDGEFAAS_MQTT_URL", url.clone()))?;
    let password = match get("EDGEFAAS_MQTT_PASSWORD_FILE").filter(|f| !f.is_empty()) {
        Some(file) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| err("EDGEFAAS_MQTT_PASSWORD_FILE", format!("{file} ({e})")))?;
            Some(text.trim_end_matches(['\n', '\r']).to_string())
        }
        None => None,
    };
    let ca = get("EDGEFAAS_MQTT_CA")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from);
    if let Some(ca) = &ca {
        if !ca.is_file() {
            return Err(err("EDGEFAAS_MQTT_CA", ca.display().to_string()));
        }
    }
    let client_id = get("EDGEFAAS_MQTT_CLIENT_ID")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| format!("edgefaas-{}", crate::mqtt::hostname()));
    if client_id.len() > 128 || client_id.contains(['/', '+', '#']) {
        return Err(err("EDGEFAAS_MQTT_CLIENT_ID", client_id));
    }
    Ok(Some(crate::mqtt::Settings {
        endpoint,
        ca,
        username: get("EDGEFAAS_MQTT_USERNAME").filter(|u| !u.is_empty()),
        password,
        client_id,
        spool_bytes: parse(get, "EDGEFAAS_MQTT_SPOOL", 16u64 << 20, positive)?,
        retries: parse(get, "EDGEFAAS_MQTT_RETRIES", 3u32, |n| *n <= 10)?,
        max_body: parse(get, "EDGEFAAS_MAX_BODY", 1024 * 1024, |_| true)?,
    }))
}

/// Workers for `max_inflight` invocations: those, the install lane, and two
/// that answer health, metrics and listings whatever else runs.
fn workers_for(max_inflight: usize) -> usize {
    max_inflight + crate::app::MAX_CHANGES + 2
}

fn any<T>(_: &T) -> bool {
    true
}

fn positive<T: PartialOrd + Default>(v: &T) -> bool {
    *v > T::default()
}

/// Parses `var` if set, else keeps `default`; `ok` rejects values that parse but make no sense.
fn parse<T: FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: T,
    ok: impl Fn(&T) -> bool,
) -> Result<T, ConfigError> {
    let Some(raw) = get(var) else {
        return Ok(default);
    };
    match raw.trim().parse::<T>() {
        Ok(v) if ok(&v) => Ok(v),
        _ => Err(ConfigError {
            var,
            value: raw,
            expected: expectation(var),
        }),
    }
}

/// Parses a duration given in (possibly fractional) seconds, from 1 ms to a week:
/// less rounds to nothing, more overflows the clock arithmetic.
fn seconds(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let secs: f64 = parse(get, var, default.as_secs_f64(), |s| {
        s.is_finite() && (0.001..=604_800.0).contains(s)
    })?;
    Duration::try_from_secs_f64(secs).map_err(|_| ConfigError {
        var,
        value: secs.to_string(),
        expected: expectation(var),
    })
}

fn expectation(var: &str) -> &'static str {
    VARS.iter()
        .find(|v| v.name == var)
        .map_or("a valid value", |v| v.expected)
}

/// `--help`: the variables, their defaults and what they do (from `VARS`).
pub fn usage() -> String {
    let plain = |s: &str| s.replace('`', "");
    let mut out = String::from(
        "edgefaas: a Function-as-a-Service daemon for edge devices\n\n\
         Usage: edgefaas [--help | --version | healthcheck]\n\n\
         healthcheck: GET /_/health on the configured port; exit 0 if it answers 200\n\n\
         Configured by environment variables:\n",
    );
    for v in VARS {
        out.push_str(&format!(
            "  {} [{}]\n      {}\n",
            v.name,
            plain(v.default),
            plain(v.help)
        ));
    }
    out
}

/// The README's configuration table (a test compares it with README.md).
#[cfg(test)]
pub fn markdown_table() -> String {
    let mut out = String::from("| variable | default | meaning |\n| --- | --- | --- |\n");
    for v in VARS {
        out.push_str(&format!("| `{}` | {} | {} |\n", v.name, v.default, v.help));
    }
    out
}

/// One configuration variable: its name, its default as the README shows it,
/// what a bad value should have been (the error's text), and its help.
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub expected: &'static str,
    pub help: &'static str,
}

/// Every variable the daemon reads: `--help`, the errors and the README's
/// configuration table come from here (a test checks the README).
pub const VARS: &[Var] = &[
    Var {
        name: "EDGEFAAS_PORT",
        default: "`8080`",
        expected: "a port number from 0 to 65535",
        help: "TCP port",
    },
    Var {
        name: "EDGEFAAS_BIND",
        default: "`0.0.0.0`",
        expected: "an IP address such as 0.0.0.0 or ::",
        help: "address to listen on (`::` for IPv6)",
    },
    Var {
        name: "EDGEFAAS_FUNCTIONS_DIR",
        default: "`./function`",
        expected: "any text",
        help: "where functions live (image: `/home/app/function`)",
    },
    Var {
        name: "EDGEFAAS_PYTHON",
        default: "`python3`",
        expected: "any text",
        help: "interpreter for functions",
    },
    Var {
        name: "EDGEFAAS_MAX_INFLIGHT",
        default: "2 x cores (2 to 16)",
        expected: "a whole number greater than 0",
        help: "invocations running at once; more wait in the queue",
    },
    Var {
        name: "EDGEFAAS_MAX_QUEUE",
        default: "`96`",
        expected: "a whole number",
        help: "invocations waiting at most; past it 429 with `Retry-After`. Keep max in flight + queue below `EDGEFAAS_MAX_CONNECTIONS`, so that waiting requests leave connections for health probes and `/mgmt`",
    },
    Var {
        name: "EDGEFAAS_QUEUE_TIMEOUT",
        default: "`30`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds an invocation may wait for a slot; then 429",
    },
    Var {
        name: "EDGEFAAS_WORKERS",
        default: "max in flight + 4",
        expected: "a whole number of threads",
        help: "request worker threads: the invocations, 2 installs, and 2 that always answer health, metrics and listings (at least max in flight + 3)",
    },
    Var {
        name: "EDGEFAAS_EXEC_TIMEOUT",
        default: "`10`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds an invocation may run",
    },
    Var {
        name: "EDGEFAAS_MAX_BODY",
        default: "`1048576`",
        expected: "a number of bytes",
        help: "largest request body, bytes",
    },
    Var {
        name: "EDGEFAAS_MAX_OUTPUT",
        default: "`4194304`",
        expected: "a whole number greater than 0",
        help: "largest function output, bytes",
    },
    Var {
        name: "EDGEFAAS_MAX_FUNCTION_SIZE",
        default: "`262144`",
        expected: "a whole number greater than 0",
        help: "largest function source, bytes",
    },
    Var {
        name: "EDGEFAAS_FETCH_TIMEOUT",
        default: "`30`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds a download may take",
    },
    Var {
        name: "EDGEFAAS_MGMT_TOKEN",
        default: "unset",
        expected: "any text",
        help: "bearer token for `/mgmt`; unset = open, with a warning at start-up; set but empty stops start-up",
    },
    Var {
        name: "EDGEFAAS_MGMT_TOKEN_FILE",
        default: "unset",
        expected: "any text",
        help: "a file holding the token (a mounted Kubernetes Secret; one trailing newline is dropped); not with `EDGEFAAS_MGMT_TOKEN`",
    },
    Var {
        name: "EDGEFAAS_SANDBOX",
        default: "`best-effort`",
        expected: "strict, best-effort or off",
        help: "`strict`, `best-effort` or `off` (see Isolation)",
    },
    Var {
        name: "EDGEFAAS_SECRETS_DIR",
        default: "unset",
        expected: "any text",
        help: "`<dir>/<name>/` holds function `<name>`'s secret files",
    },
    Var {
        name: "EDGEFAAS_SHUTDOWN_GRACE",
        default: "`10`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds SIGTERM waits for in-flight invocations",
    },
    Var {
        name: "EDGEFAAS_MODE",
        default: "`fork`",
        expected: "fork or exec",
        help: "`fork`: a warm zygote per function forks each request; `exec`: a new Python per request",
    },
    Var {
        name: "EDGEFAAS_IDLE_TIMEOUT",
        default: "`300`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds an unused zygote stays warm",
    },
    Var {
        name: "EDGEFAAS_MAX_WARM",
        default: "`16`",
        expected: "a whole number greater than 0",
        help: "functions kept warm at most (fork mode); the least recently used is stopped first",
    },
    Var {
        name: "EDGEFAAS_SOURCE_DIR",
        default: "unset",
        expected: "any text",
        help: "read-only folder of `name.py` files kept in sync (a mounted ConfigMap)",
    },
    Var {
        name: "EDGEFAAS_SOURCE_INTERVAL",
        default: "`10`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds between checks of the source dir",
    },
    Var {
        name: "EDGEFAAS_MAX_CONNECTIONS",
        default: "`128`",
        expected: "a whole number greater than 0",
        help: "client connections at once; more get 503 at once",
    },
    Var {
        name: "EDGEFAAS_MAX_CONNECTIONS_PER_CLIENT",
        default: "`0` (off)",
        expected: "a whole number",
        help: "connections from one client address at once; more get 503 (see Hardening for when to set it)",
    },
    Var {
        name: "EDGEFAAS_IO_TIMEOUT",
        default: "`30`",
        expected: "a number of seconds from 0.001 to 604800",
        help: "seconds a request head may take from its first byte, and an idle keep-alive connection lives; bodies and answers get this plus their length at 16 KiB/s",
    },
    Var {
        name: "EDGEFAAS_ASYNC_QUEUE",
        default: "`256`",
        expected: "a whole number greater than 0",
        help: "async calls (`POST /async/<name>`) kept on disk at most; past it 429",
    },
    Var {
        name: "EDGEFAAS_TZ",
        default: "the node's (`/etc/localtime`)",
        expected: "any text",
        help: "time zone of `schedule` settings: a zoneinfo name (`Europe/Berlin`) or a POSIX TZ rule",
    },
    Var {
        name: "EDGEFAAS_MQTT_URL",
        default: "unset",
        expected: "mqtt://host[:port] or mqtts://host[:port]",
        help: "the MQTT broker (`mqtt://host:1883`, `mqtts://host:8883`); unset: no MQTT trigger",
    },
    Var {
        name: "EDGEFAAS_MQTT_CA",
        default: "the system's roots",
        expected: "a readable PEM file",
        help: "PEM file of the certificates that may sign an `mqtts://` broker's",
    },
    Var {
        name: "EDGEFAAS_MQTT_USERNAME",
        default: "unset",
        expected: "any text",
        help: "MQTT user name",
    },
    Var {
        name: "EDGEFAAS_MQTT_PASSWORD_FILE",
        default: "unset",
        expected: "a readable file holding the password",
        help: "a file holding the MQTT password (one trailing newline dropped)",
    },
    Var {
        name: "EDGEFAAS_MQTT_CLIENT_ID",
        default: "`edgefaas-<hostname>`",
        expected: "up to 128 characters without /, + or #",
        help: "the MQTT client id; the broker keeps this id's session (and its QoS 1 messages) while the node is away",
    },
    Var {
        name: "EDGEFAAS_MQTT_SPOOL",
        default: "`16777216`",
        expected: "a whole number greater than 0",
        help: "bytes of publishes kept on disk for the broker (`<functions dir>/.spool`); past it the oldest are dropped",
    },
    Var {
        name: "EDGEFAAS_MQTT_RETRIES",
        default: "`3`",
        expected: "a whole number from 0 to 10",
        help: "runs again of a function that failed on a message (after 1, 2, 4 ... s) before it is dead-lettered",
    },
    Var {
        name: "EDGEFAAS_LOG_TIMESTAMPS",
        default: "on, off under journald",
        expected: "on or off",
        help: "`off` leaves timestamps out of the log; they are left out anyway when the daemon runs under journald (`JOURNAL_STREAM` is set), which adds its own",
    },
    Var {
        name: "RUST_LOG",
        default: "`info`",
        expected: "any text",
        help: "log level (`debug` for internals); one access-log line per request",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_readme_table_is_the_code_table() {
        let readme = include_str!("../README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table differs from config::VARS; it should read:\n{table}"
        );
    }

    #[test]
    fn every_variable_read_is_in_the_table_and_every_error_names_its_own() {
        let source = include_str!("config.rs");
        let main = include_str!("main.rs");
        for text in [source, main] {
            for (i, _) in text.match_indices("\"EDGEFAAS_") {
                let name: String = text[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                    .collect();
                // (A bare "EDGEFAAS_" is a prefix test, not a variable.)
                assert!(
                    name == "EDGEFAAS_" || VARS.iter().any(|v| v.name == name),
                    "{name} is read but not in VARS"
                );
            }
        }
        for v in VARS.iter().filter(|v| v.expected != "any text") {
            let e = from(&[(v.name, "\u{1}nonsense")]);
            if let Err(e) = e {
                assert!(e.to_string().contains(v.expected), "{e}");
                assert!(e.to_string().starts_with(v.name), "{e}");
            }
        }
    }

    fn from(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_leave_workers_for_installs_and_health() {
        let c = from(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.workers, c.max_inflight + 4);
        assert!(
            c.max_inflight + c.max_queue >= 64,
            "64 clients must not see 429 by default"
        );
        assert!(
            c.max_inflight + c.max_queue + 16 <= c.max_connections,
            "waiting invocations must leave connections for health and /mgmt"
        );
        let c = from(&[("EDGEFAAS_MAX_INFLIGHT", "1")]).unwrap();
        assert_eq!(c.workers, 5);
        let err = from(&[("EDGEFAAS_MAX_INFLIGHT", "4"), ("EDGEFAAS_WORKERS", "6")])
            .err()
            .expect("too few workers");
        assert!(
            err.to_string()
                .contains("at least EDGEFAAS_MAX_INFLIGHT + 3 = 7"),
            "{err}"
        );
        assert_eq!(c.functions_dir, PathBuf::from("./function"));
    }

    #[test]
    fn bad_value_names_the_variable() {
        let err = from(&[("EDGEFAAS_PORT", "eighty")])
            .err()
            .expect("an error");
        assert_eq!(
            err.to_string(),
            "EDGEFAAS_PORT: expected a port number from 0 to 65535, got 'eighty'"
        );
        let err = from(&[("EDGEFAAS_EXEC_TIMEOUT", "-1")])
            .err()
            .expect("an error");
        assert!(err.to_string().starts_with("EDGEFAAS_EXEC_TIMEOUT:"));
        // Durations the clock cannot add, or that round to nothing, are refused.
        for (var, value) in [
            ("EDGEFAAS_IO_TIMEOUT", "1e19"),
            ("EDGEFAAS_QUEUE_TIMEOUT", "1e19"),
            ("EDGEFAAS_IO_TIMEOUT", "1e-10"),
            ("EDGEFAAS_EXEC_TIMEOUT", "inf"),
            ("EDGEFAAS_SHUTDOWN_GRACE", "NaN"),
        ] {
            let err = from(&[(var, value)]).err().expect("an error");
            assert!(err.to_string().contains("from 0.001 to 604800"), "{err}");
        }
        assert!(from(&[("EDGEFAAS_WORKERS", "0")]).is_err());
        assert!(from(&[("EDGEFAAS_BIND", "localhost")]).is_err());
    }

    #[test]
    fn fractional_seconds_and_ipv6_are_accepted() {
        let c = from(&[("EDGEFAAS_EXEC_TIMEOUT", "0.5"), ("EDGEFAAS_BIND", "::1")]).unwrap();
        assert_eq!(c.exec_timeout, Duration::from_millis(500));
        assert_eq!(c.addr().to_string(), "[::1]:8080");
    }

    #[test]
    fn mode_is_fork_or_exec() {
        assert_eq!(from(&[]).unwrap().mode, Mode::Fork);
        assert_eq!(from(&[("EDGEFAAS_MODE", "exec")]).unwrap().mode, Mode::Exec);
        let err = from(&[("EDGEFAAS_MODE", "spawn")]).err().expect("an error");
        assert_eq!(
            err.to_string(),
            "EDGEFAAS_MODE: expected fork or exec, got 'spawn'"
        );
    }

    #[test]
    fn an_empty_token_stops_start_up_and_a_file_may_hold_it() {
        let err = from(&[("EDGEFAAS_MGMT_TOKEN", "")])
            .err()
            .expect("an error");
        assert!(err.to_string().starts_with("EDGEFAAS_MGMT_TOKEN:"), "{err}");
        assert!(from(&[]).unwrap().mgmt_token.is_none());
        let dir = std::env::temp_dir().join(format!("edgefaas-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        let f = file.to_str().unwrap();
        let c = from(&[("EDGEFAAS_MGMT_TOKEN_FILE", f)]).unwrap();
        assert_eq!(c.mgmt_token.as_deref(), Some("s3cret"));
        std::fs::write(&file, "\n").unwrap();
        assert!(from(&[("EDGEFAAS_MGMT_TOKEN_FILE", f)]).is_err());
        assert!(from(&[("EDGEFAAS_MGMT_TOKEN_FILE", "/nonexistent/token")]).is_err());
        assert!(
            from(&[
                ("EDGEFAAS_MGMT_TOKEN", "a"),
                ("EDGEFAAS_MGMT_TOKEN_FILE", f)
            ])
            .is_err()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
