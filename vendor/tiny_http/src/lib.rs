//! # tiny_http, as EdgeFaaS builds it
//!
//! A small synchronous HTTP/1.1 server: an accept thread, one thread per
//! connection, and a queue of whole requests that your own fixed pool of
//! workers takes with `recv()`.
//!
//! ```no_run
//! use std::sync::Arc;
//! let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let server = Arc::new(tiny_http::Server::from_listener_with_limits(
//!     listener, None, tiny_http::Limits::default()).unwrap());
//! for _ in 0..4 {
//!     let server = server.clone();
//!     std::thread::spawn(move || loop {
//!         let Ok(rq) = server.recv() else { return };
//!         let body = rq.body().to_vec();
//!         let _ = rq.respond(tiny_http::Response::from_data(body));
//!     });
//! }
//! ```
//!
//! EdgeFaaS changes how a connection is served (see `PATCHES.md`): the
//! connection's own thread parses each head with `httparse`, decides the body's
//! framing by RFC 9112's rules, reads the whole body within its limits and
//! deadlines, and only then queues the request. A worker never reads from or
//! waits on a client: it answers with `Request::respond`, and the connection's
//! thread writes the answer under a deadline. Anything ambiguous is answered
//! (400, 408, 413, 417, 431, 501, 505) and the connection closed, so no byte a
//! client sent as a body can ever be read as a request.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

use std::collections::HashMap;
use std::io::Error as IoError;
use std::io::ErrorKind as IoErrorKind;
use std::io::Result as IoResult;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
#[doc(hidden)]
pub use framing::{parse_one, Parsed};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use request::Request;
pub use response::{Response, ResponseBox};

mod client;
mod common;
mod connection;
mod framing;
mod request;
mod response;
mod util;

/// The main class of this library.
///
/// Dropping it stops the accept thread; connections already open finish the
/// request they are serving.
pub struct Server {
    close: Arc<AtomicBool>,
    messages: Arc<MessagesQueue<Request>>,
    listening_addr: ListenAddr,
}

/// The largest body a request may carry, and the setting that says so (for the
/// 413 message), decided from its method and target before any body byte is read.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub bytes: u64,
    pub name: &'static str,
}

/// Chooses the body limit of a request from its method and target.
pub type BodyLimitFn = Arc<dyn Fn(&Method, &str) -> BodyLimit + Send + Sync>;

/// EdgeFaaS patch: bounds on what clients can make the server hold, in bytes,
/// connections and time. `Limits::default()` is generous, not unbounded.
#[derive(Clone)]
pub struct Limits {
    /// Connections served at once; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Connections from one client address at once (0: no such cap).
    pub max_connections_per_client: usize,
    /// Bytes of one request head (request line and headers); more answers 431.
    pub max_head_bytes: usize,
    /// Header lines in one request head (and trailer lines); more answers 431.
    pub max_headers: usize,
    /// Time from a head's first byte to its end; slower answers 408. Also how
    /// long an idle keep-alive connection waits for its next request.
    pub head_timeout: Duration,
    /// Slowest rate a body or an answer may move at: each gets `head_timeout`
    /// plus its length at this rate (bytes per second), in total.
    pub min_rate: u64,
    /// The largest body each request may carry.
    pub body_limit: BodyLimitFn,
    /// Bytes of request bodies held in memory by all connections together;
    /// a body that cannot get room before its deadline is answered 503.
    pub body_budget: usize,
    /// Stack of each connection thread.
    pub connection_stack: usize,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_client", &self.max_connections_per_client)
            .field("max_head_bytes", &self.max_head_bytes)
            .field("max_headers", &self.max_headers)
            .field("head_timeout", &self.head_timeout)
            .field("min_rate", &self.min_rate)
            .field("body_budget", &self.body_budget)
            .finish_non_exhaustive()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            max_connections_per_client: 0,
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(30),
            min_rate: 16 * 1024,
            body_limit: Arc::new(|_, _| BodyLimit {
                bytes: 16 * 1024 * 1024,
                name: "the body limit",
            }),
            body_budget: 256 * 1024 * 1024,
            connection_stack: 256 * 1024,
        }
    }
}

/// Bytes of request bodies held in memory, against `Limits::body_budget`.
pub(crate) struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

impl Budget {
    fn new(max: usize) -> Budget {
        Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            max,
        }
    }

    /// Takes `n` bytes, waiting a moment for room; false if none came.
    fn take(&self, n: usize) -> bool {
        let deadline = Instant::now() + BUDGET_WAIT;
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if used.saturating_add(n) <= self.max {
                *used += n;
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            used = self
                .freed
                .wait_timeout(used, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Gives `n` bytes back.
    fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

/// How long a body waits for room in the budget before it is refused with 503.
const BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Room one request body holds in the budget, given back when dropped (so no
/// early exit of a read, and no request however it ends, can keep it).
pub(crate) struct Lease {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Lease {
    pub(crate) fn new(budget: Arc<Budget>) -> Lease {
        Lease { budget, bytes: 0 }
    }

    /// Takes `n` more bytes; false if the budget has no room for them.
    pub(crate) fn grow(&mut self, n: usize) -> bool {
        let ok = self.budget.take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// Counts a live connection (overall and for its client address) until dropped.
pub(crate) struct LiveConnection {
    counts: Arc<Counts>,
    ip: Option<IpAddr>,
}

#[derive(Default)]
struct Counts {
    total: std::sync::atomic::AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Counts {
    /// Registers a connection if it fits under both caps.
    fn admit(self: &Arc<Self>, ip: Option<IpAddr>, limits: &Limits) -> Option<LiveConnection> {
        if self.total.load(Relaxed) >= limits.max_connections {
            return None;
        }
        if let (Some(ip), true) = (ip, limits.max_connections_per_client > 0) {
            let mut by_ip = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= limits.max_connections_per_client {
                return None;
            }
            *n += 1;
        }
        self.total.fetch_add(1, Relaxed);
        Some(LiveConnection {
            counts: self.clone(),
            ip: ip.filter(|_| limits.max_connections_per_client > 0),
        })
    }
}

impl Drop for LiveConnection {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Relaxed);
        if let Some(ip) = self.ip {
            let mut by_ip = self.counts.by_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
    }
}

/// Answers a connection the server cannot take (over a cap, or no thread for
/// it) with a 503 and closes it, without waiting on the client: the accept
/// thread serves everyone, so a refused client must not hold it.
fn refuse(mut sock: Connection, why: &str) {
    use std::io::{Read, Write};
    let _ = sock.set_nonblocking();
    let body = format!("{why}\n");
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{}",
        body.len(),
        body
    );
    // A fresh socket's send buffer takes these few bytes at once.
    let _ = sock.write(answer.as_bytes());
    let _ = sock.shutdown(Shutdown::Write);
    // Closing with a request unread would reset the connection before the client
    // reads the 503: drop what has arrived already, without waiting for more.
    let mut scratch = [0u8; 4096];
    while matches!(sock.read(&mut scratch), Ok(n) if n > 0) {}
}

// The server is shared by the worker threads.
const _: fn() = || {
    fn shared<T: Sync + Send>() {}
    shared::<Server>();
};

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,
}

/// Kept so the upstream constructors keep their shape; TLS is not built in.
#[derive(Debug, Clone)]
pub struct SslConfig {
    pub certificate: Vec<u8>,
    pub private_key: Vec<u8>,
}

impl Server {
    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
        let listener = config.addr.bind()?;
        Self::from_listener_with_limits(listener, None, Limits::default())
    }

    /// EdgeFaaS patch: a server on `listener` with bounds on connections,
    /// heads, bodies and time. TLS (`ssl_config`) is not built in.
    pub fn from_listener_with_limits<L: Into<Listener>>(
        listener: L,
        ssl_config: Option<SslConfig>,
        limits: Limits,
    ) -> Result<Server, Box<dyn std::error::Error + Send + Sync>> {
        if ssl_config.is_some() {
            return Err("this tiny_http is built without TLS".into());
        }
        let listener = listener.into();
        let local_addr = listener.local_addr()?;
        let close = Arc::new(AtomicBool::new(false));
        let messages = MessagesQueue::with_capacity(8);
        let limits = Arc::new(limits);
        let budget = Arc::new(Budget::new(limits.body_budget));
        let counts = Arc::new(Counts::default());

        let (inside_close, inside_messages) = (close.clone(), messages.clone());
        let pool_limits = limits.clone();
        let serve: util::Serve = Arc::new(move |sock, remote, live| {
            let client = ClientConnection::new(
                sock,
                remote,
                pool_limits.clone(),
                budget.clone(),
                inside_messages.clone(),
                inside_close.clone(),
            );
            client.serve();
            drop(live);
        });
        let pool = util::TaskPool::new(serve, limits.connection_stack);
        let accept_close = close.clone();
        thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, &limits, &counts, &pool, &accept_close))?;

        Ok(Server {
            messages,
            close,
            listening_addr: local_addr,
        })
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(rq) => Ok(rq),
            None => Err(IoError::new(IoErrorKind::Other, "thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(rq) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        Ok(self.messages.try_pop())
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

/// Accepts connections until the server closes; a failure (EMFILE, no thread
/// for a connection) costs that connection only.
fn accept_loop(
    listener: Listener,
    limits: &Limits,
    counts: &Arc<Counts>,
    pool: &util::TaskPool,
    close: &AtomicBool,
) {
    log::debug!("Running accept thread");
    while !close.load(Relaxed) {
        let (sock, remote) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                // EdgeFaaS patch: EMFILE, ENFILE, ENOBUFS, ECONNABORTED... pass;
                // upstream ended the accept thread here and never served again.
                log::error!("Error accepting new client: {}", e);
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if close.load(Relaxed) {
            break;
        }
        let Some(live) = counts.admit(remote.map(|a| a.ip()), limits) else {
            log::warn!(
                "refusing a connection from {}: connection cap reached",
                remote.map_or_else(|| "-".into(), |a| a.ip().to_string())
            );
            refuse(sock, "too many connections");
            continue;
        };
        let _ = sock.set_nodelay();
        if let Err((e, sock)) = pool.spawn(sock, remote, live) {
            // EdgeFaaS patch: upstream panicked when a thread could not be spawned.
            log::error!("no thread for a new connection: {}", e);
            refuse(sock, "server busy: cannot start a thread");
        }
    }
    log::debug!("Terminating accept thread");
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => match addr.as_pathname() {
                Some(path) => std::os::unix::net::UnixStream::connect(path).map(Connection::from),
                None => Err(IoError::new(IoErrorKind::Other, "unnamed socket")),
            },
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The socket address of a peer, for logs.
pub(crate) fn peer(addr: Option<SocketAddr>) -> String {
    addr.map_or_else(|| "-".into(), |a| a.to_string())
}
