//! The one error type of the daemon, and the only place that turns a failure
//! into an HTTP status.

use std::fmt;
use std::io;

/// Every failure a request can meet, each with the status a client sees.
#[derive(Debug)]
pub enum Error {
    /// A function name that does not match the naming rule or is reserved.
    BadName(String),
    /// No function of that name is installed.
    NotFound(String),
    /// A path that names no endpoint.
    NoRoute(String),
    /// The method is not served on this path; carries the allowed methods.
    Method(&'static str),
    /// `echo` cannot be written or deleted.
    Protected,
    /// The function is kept in sync from EDGEFAAS_SOURCE_DIR; /mgmt may not change it.
    Managed(String),
    /// `/mgmt` without the right bearer token.
    Unauthorized,
    /// A malformed install request: bad URL, missing file name, bad pin.
    BadRequest(String),
    /// The downloaded bytes do not match the `#sha256=` pin.
    HashMismatch { expected: String, actual: String },
    /// The download failed: unreachable, non-2xx, too many redirects.
    Fetch { url: String, why: String },
    /// The download took longer than `EDGEFAAS_FETCH_TIMEOUT`.
    FetchTimeout { url: String },
    /// A body or function file over its limit; says which limit.
    TooLarge(String),
    /// The admission queue is full, or the wait for a slot ran out.
    Busy(crate::admission::Refused),
    /// The async queue holds as many calls as it may (429).
    QueueFull(usize),
    /// The daemon ran out of threads, processes, descriptors or memory for this request.
    Unavailable(String),
    /// Installed code that would not serve: it does not import, or has no `handle`.
    Unprocessable(String),
    /// The handler raised, exited non-zero or misbehaved; carries the reason.
    Failed { name: String, reason: String },
    /// The handler ran past `EDGEFAAS_EXEC_TIMEOUT`.
    Timeout { name: String, secs: f64 },
    /// The daemon is draining for shutdown.
    ShuttingDown,
    /// The disk is full.
    NoSpace,
    /// Any other I/O failure inside the daemon.
    Io(io::Error),
}

impl Error {
    /// The HTTP status a client sees for this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadName(_) | Error::BadRequest(_) | Error::HashMismatch { .. } => 400,
            Error::Unauthorized => 401,
            Error::Protected => 403,
            Error::NotFound(_) | Error::NoRoute(_) => 404,
            Error::Method(_) => 405,
            Error::Managed(_) => 409,
            Error::TooLarge(_) => 413,
            Error::Unprocessable(_) => 422,
            Error::Busy(_) | Error::QueueFull(_) => 429,
            Error::Failed { .. } | Error::Io(_) => 500,
            Error::Fetch { .. } => 502,
            Error::ShuttingDown | Error::Unavailable(_) => 503,
            Error::FetchTimeout { .. } | Error::Timeout { .. } => 504,
            Error::NoSpace => 507,
        }
    }
}

impl Error {
    /// What the log says of it: the answer's line, plus what only the operator
    /// should see (the URL of a failed download, without its credentials).
    pub fn detail(&self) -> String {
        match self {
            Error::Fetch { url, why } => format!("download of {url} failed: {why}"),
            Error::FetchTimeout { url } => format!("download of {url} timed out"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadName(why) => write!(f, "{why}"),
            Error::NotFound(name) => write!(f, "function '{name}' not found"),
            Error::NoRoute(path) => write!(f, "no such endpoint: {path}"),
            Error::Method(allowed) => write!(f, "method not allowed here; use {allowed}"),
            Error::Protected => write!(f, "echo is the default function and cannot be changed"),
            Error::Unauthorized => write!(f, "missing or wrong bearer token for /mgmt"),
            Error::Managed(name) => write!(
                f,
                "function '{name}' comes from EDGEFAAS_SOURCE_DIR; change it there"
            ),
            Error::BadRequest(why) => write!(f, "{why}"),
            Error::HashMismatch { expected, actual } => {
                write!(
                    f,
                    "sha256 mismatch: expected {expected}, downloaded {actual}"
                )
            }
            Error::Fetch { why, .. } => write!(f, "download failed: {why}"),
            Error::FetchTimeout { .. } => write!(f, "download timed out"),
            Error::TooLarge(what) => write!(f, "{what}"),
            Error::Unprocessable(why) => write!(f, "{why}; nothing was changed"),
            Error::Busy(crate::admission::Refused::TimedOut) => {
                write!(
                    f,
                    "no slot came free in time (EDGEFAAS_QUEUE_TIMEOUT), try again later"
                )
            }
            Error::Busy(_) => write!(
                f,
                "too many invocations waiting (EDGEFAAS_MAX_QUEUE), try again later"
            ),
            Error::QueueFull(n) => write!(
                f,
                "the async queue holds {n} calls (EDGEFAAS_ASYNC_QUEUE), try again later"
            ),
            Error::Unavailable(why) => write!(f, "server busy: {why}; try again later"),
            Error::Failed { name, reason } => write!(f, "function '{name}' failed: {reason}"),
            Error::Timeout { name, secs } => {
                write!(
                    f,
                    "function '{name}' timed out after {secs}s and was killed"
                )
            }
            Error::ShuttingDown => write!(f, "shutting down"),
            Error::NoSpace => write!(f, "no space left on device; nothing was changed"),
            Error::Io(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        if matches!(
            e.raw_os_error(),
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
        ) {
            Error::NoSpace
        } else {
            Error::Io(e)
        }
    }
}

/// Result with the daemon's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
