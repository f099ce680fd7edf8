//! The listener with its per-client bounds, and the fixed pool of request
//! workers over tiny_http. A request reaches a worker whole (its connection's
//! thread read it); health, metrics and listings are answered at once, while
//! invocations and installs wait for a slot in their admission lane without
//! holding a worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;
use tiny_http::{BodyLimit, Method, Request, Server};

use crate::admission::{Job, Refused, Slot, Submitted};
use crate::app::App;
use crate::config::Config;
use crate::error::Error;
use crate::http::{self, Answer, MAX_COMMAND, Target};
use crate::router::{self, Route};

/// Largest request head (request line and headers) a client may send: 431 past it.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in one request: 431 past it.
pub const MAX_HEADERS: usize = 100;
/// Slowest a request body or an answer may move, after the IO timeout: 16 KiB/s.
pub const MIN_RATE: u64 = 16 * 1024;

/// The body limit of a request, from its method and target (before its body is read).
pub fn body_limit(config: &Config, method: &Method, url: &str) -> BodyLimit {
    let command = |name| BodyLimit {
        bytes: MAX_COMMAND,
        name,
    };
    match Target::parse(url).map(|t| t.first) {
        Ok(first) if first == "mgmt" => match method {
            Method::Put => BodyLimit {
                bytes: config.max_function_size,
                name: "EDGEFAAS_MAX_FUNCTION_SIZE",
            },
            Method::Delete => command("the 8 KiB limit for a name"),
            _ => command("the 8 KiB limit for a URL"),
        },
        Ok(first) if first == "_" || first.is_empty() => command("the 8 KiB limit here"),
        _ => BodyLimit {
            bytes: config.max_body,
            name: "EDGEFAAS_MAX_BODY",
        },
    }
}

/// Bytes of request bodies the connections may hold in memory at once.
pub fn body_budget(config: &Config) -> usize {
    let largest = config.max_body.max(config.max_function_size);
    usize::try_from(largest.saturating_mul(4).max(16 << 20)).unwrap_or(usize::MAX)
}

/// Binds the listener with every per-client bound in place.
pub fn listen(config: &Config) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(config.addr())?;
    let limit_config = config.clone();
    let limits = tiny_http::Limits {
        max_connections: config.max_connections,
        max_connections_per_client: config.max_connections_per_client,
        max_head_bytes: MAX_HEAD_BYTES,
        max_headers: MAX_HEADERS,
        head_timeout: config.io_timeout,
        min_rate: MIN_RATE,
        body_limit: Arc::new(move |method, url| body_limit(&limit_config, method, url)),
        body_budget: body_budget(config),
        connection_stack: 256 * 1024,
    };
    Server::from_listener_with_limits(listener, None, limits).map_err(std::io::Error::other)
}

/// The running worker pool.
pub struct Pool {
    server: Arc<Server>,
    stop: Arc<AtomicBool>,
    done: Receiver<()>,
    size: usize,
}

impl Pool {
    /// Starts `app.config.workers` threads answering requests from `server`.
    pub fn start(app: Arc<App>, server: Arc<Server>) -> std::io::Result<Pool> {
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = mpsc::channel();
        let size = app.config.workers;
        for i in 0..size {
            let (app, server, stop, done_tx) =
                (app.clone(), server.clone(), stop.clone(), done_tx.clone());
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    work(&app, &server, &stop);
                    let _ = done_tx.send(());
                })?;
        }
        Ok(Pool {
            server,
            stop,
            done,
            size,
        })
    }

    /// Lets each worker finish its current request, then stops it; waits at most `bound`.
    pub fn stop(self, bound: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..self.size {
            self.server.unblock();
        }
        let deadline = Instant::now() + bound;
        for _ in 0..self.size {
            if self
                .done
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_err()
            {
                warn!("a worker is still busy at exit");
                return;
            }
        }
    }
}

/// A worker: runs admitted jobs first, else takes the next request; between
/// requests it refuses the jobs that waited past the queue timeout.
fn work(app: &Arc<App>, server: &Server, stop: &AtomicBool) {
    let lanes = [&app.lanes.invoke, &app.lanes.install];
    loop {
        if let Some(admitted) = lanes.iter().find_map(|l| l.next_ready()) {
            admitted.run();
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let wait = lanes
            .iter()
            .filter_map(|l| l.expire())
            .min()
            .unwrap_or(Duration::from_secs(1));
        // A timeout or an unblock both mean: look at the lanes again.
        if let Ok(Some(req)) = server.recv_timeout(wait) {
            dispatch(app, req);
        }
    }
}

/// Answers a request at once, or hands it to its lane.
fn dispatch(app: &Arc<App>, req: Request) {
    let started = Instant::now();
    let (lane, job) = match router::route(app, &req) {
        Ok(Route::Answer(answer)) => return http::send(req, answer, started),
        Ok(Route::Async(name)) => {
            let mut req = req;
            let answer = router::accept_async(app, &mut req, &name);
            return http::send(req, answer, started);
        }
        Err(e) => return http::send(req, Answer::error(&e), started),
        Ok(Route::Invoke(name)) => (
            &app.lanes.invoke,
            HttpJob {
                app: app.clone(),
                req,
                key: name.to_string(),
                limit: app.store.settings(&name).concurrency_limit(),
                work: Work::Invoke(name),
                started,
            },
        ),
        Ok(Route::Change) => (
            &app.lanes.install,
            HttpJob {
                app: app.clone(),
                key: String::new(),
                limit: usize::MAX,
                req,
                work: Work::Change,
                started,
            },
        ),
    };
    if let Submitted::Run(admitted) = lane.submit(Box::new(job)) {
        admitted.run();
    }
}

/// What an HTTP request waiting in a lane will do.
enum Work {
    Invoke(crate::name::FunctionName),
    Change,
}

/// An HTTP request waiting for its slot.
struct HttpJob {
    app: Arc<App>,
    req: Request,
    key: String,
    limit: usize,
    work: Work,
    started: Instant,
}

impl Job for HttpJob {
    fn key(&self) -> &str {
        &self.key
    }

    fn limit(&self) -> usize {
        self.limit
    }

    fn run(self: Box<Self>, slot: Slot) {
        let HttpJob {
            app,
            mut req,
            work,
            started,
            ..
        } = *self;
        let answer = match work {
            Work::Invoke(name) => router::invoke(&app, &mut req, &name, started),
            Work::Change => {
                crate::mgmt::change(&app, &mut req).unwrap_or_else(|e| Answer::error(&e))
            }
        };
        drop(slot);
        http::send(req, answer, started);
    }

    fn refuse(self: Box<Self>, why: Refused) {
        let error = match why {
            Refused::ShuttingDown => Error::ShuttingDown,
            other => Error::Busy(other),
        };
        let mut answer = Answer::error(&error);
        if let Work::Invoke(name) = &self.work {
            let secs = self.started.elapsed().as_secs_f64();
            self.app
                .metrics
                .refused(name.as_str(), why, answer.status, secs);
            answer = answer.with_header("X-Duration-Seconds", format!("{secs:.6}"));
        }
        http::send(self.req, answer, self.started);
    }
}

#[cfg(test)]
mod tests {
    //! Property tests over request-head and chunked-body parsing, through the
    //! same code a connection runs (`tiny_http::parse_one`).
    use proptest::prelude::*;

    const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Reads requests off `input` the way a connection does: one after another
    /// while the framing allows, stopping at a refusal or a close.
    fn requests(input: &[u8]) -> (Vec<tiny_http::Parsed>, Option<u16>) {
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            match tiny_http::parse_one(rest, 16 * 1024, 100, 1 << 20) {
                Ok(Some(p)) => {
                    rest = &rest[p.used..];
                    let more = p.keep_alive;
                    out.push(p);
                    if !more {
                        return (out, None);
                    }
                }
                Ok(None) => return (out, None),
                Err((status, _)) => return (out, Some(status)),
            }
        }
    }

    /// Chunked coding of `body` in pieces of the given sizes, with optional extensions.
    fn chunked(body: &[u8], sizes: &[usize], ext: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        for &n in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let n = n.clamp(1, body.len().saturating_sub(at).max(1));
            if at >= body.len() {
                break;
            }
            let n = n.min(body.len() - at);
            out.extend_from_slice(format!("{n:x}").as_bytes());
            if ext {
                out.extend_from_slice(b";e=1");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body[at..at + n]);
            out.extend_from_slice(b"\r\n");
            at += n;
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    /// A framing lie on top of an honest request.
    #[derive(Debug, Clone)]
    enum Lie {
        None,
        SecondLength(u64),
        LengthList(u64),
        TeAndLength(u64),
        Coding(&'static str),
        BareCr,
        Nul,
        ObsFold,
        SpaceBeforeColon,
        Http10Chunked,
        BadChunkSize(&'static str),
    }

    fn lie() -> impl Strategy<Value = Lie> {
        prop_oneof![
            Just(Lie::None),
            (0u64..200).prop_map(Lie::SecondLength),
            (0u64..200).prop_map(Lie::LengthList),
            (0u64..200).prop_map(Lie::TeAndLength),
            prop::sample::select(vec![
                "gzip",
                "identity",
                "chunked, gzip",
                "gzip, chunked",
                "chunked, chunked",
                "x"
            ])
            .prop_map(Lie::Coding),
            Just(Lie::BareCr),
            Just(Lie::Nul),
            Just(Lie::ObsFold),
            Just(Lie::SpaceBeforeColon),
            Just(Lie::Http10Chunked),
            prop::sample::select(vec!["+", " ", "-", "0x", ";\0"]).prop_map(Lie::BadChunkSize),
        ]
    }

    proptest! {
        /// Any bytes at all: parsing never panics, and never takes more than it has.
        #[test]
        fn any_bytes_parse_without_panic(input in prop::collection::vec(any::<u8>(), 0..600)) {
            let (reqs, _) = requests(&input);
            let used: usize = reqs.iter().map(|r| r.used).sum();
            prop_assert!(used <= input.len());
        }

        /// One framed request whose body hides another request, under any framing lie:
        /// the hidden request is never read as one, and a request that is read has
        /// exactly the body its honest framing says.
        #[test]
        fn any_framed_input_yields_at_most_its_own_request(
            prefix in prop::collection::vec(any::<u8>(), 0..40),
            suffix in prop::collection::vec(any::<u8>(), 0..40),
            sizes in prop::collection::vec(1usize..50, 0..6),
            use_chunked in any::<bool>(),
            ext in any::<bool>(),
            lie in lie(),
            lie_first in any::<bool>(),
        ) {
            let mut body = prefix.clone();
            body.extend_from_slice(SMUGGLED);
            body.extend_from_slice(&suffix);
            let mut head = b"POST /echo HTTP/1.1\r\nHost: h\r\n".to_vec();
            let mut honest = Vec::new();
            let mut framed = if use_chunked || matches!(lie, Lie::TeAndLength(_)) {
                honest.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
                chunked(&body, &sizes, ext)
            } else {
                honest.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
                body.clone()
            };
            if !lie_first {
                head.extend_from_slice(&honest);
            }
            match &lie {
                Lie::None => {}
                Lie::SecondLength(n) => head.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
                Lie::LengthList(n) => head.extend_from_slice(format!("Content-Length: {}, {n}\r\n", body.len()).as_bytes()),
                Lie::TeAndLength(n) => head.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
                Lie::Coding(c) => {
                    head.extend_from_slice(format!("Transfer-Encoding: {c}\r\n").as_bytes());
                }
                Lie::BareCr => head.extend_from_slice(b"X-A: a\rContent-Length: 0\r\n"),
                Lie::Nul => head.extend_from_slice(b"X-A: a\0b\r\n"),
                Lie::ObsFold => head.extend_from_slice(b"X-A: a\r\n Content-Length: 0\r\n"),
                Lie::SpaceBeforeColon => head.extend_from_slice(b"Content-Length : 0\r\n"),
                Lie::Http10Chunked => {
                    head = head.replacen(b"HTTP/1.1", b"HTTP/1.0", 1);
                    head.extend_from_slice(b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n");
                }
                Lie::BadChunkSize(p) => {
                    if use_chunked {
                        let mut f = p.as_bytes().to_vec();
                        f.extend_from_slice(&framed);
                        framed = f;
                    }
                }
            }
            if lie_first {
                head.extend_from_slice(&honest);
            }
            head.extend_from_slice(b"\r\n");
            let mut input = head;
            input.extend_from_slice(&framed);
            // What follows on the connection: an honest next request.
            input.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
            let (reqs, _refused) = requests(&input);
            for r in &reqs {
                prop_assert_ne!(r.path.as_str(), "/smuggled", "the hidden request was read: {:?}", lie);
            }
            if let Some(first) = reqs.first() {
                prop_assert_eq!(first.path.as_str(), "/echo");
                prop_assert_eq!(&first.body, &body, "wrong body under {:?}", lie);
            }
            prop_assert!(reqs.len() <= 2);
        }
    }

    trait Replacen {
        fn replacen(&self, from: &[u8], to: &[u8], n: usize) -> Vec<u8>;
    }

    impl Replacen for Vec<u8> {
        fn replacen(&self, from: &[u8], to: &[u8], _n: usize) -> Vec<u8> {
            match self.windows(from.len()).position(|w| w == from) {
                Some(i) => [&self[..i], to, &self[i + from.len()..]].concat(),
                None => self.clone(),
            }
        }
    }
}
