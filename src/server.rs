//! The fixed pool of request workers over tiny_http: each answers one request
//! at a time, turns a panic into a 500, and writes one access-log line.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use tiny_http::{Header, Request, Response, Server};

use crate::app::App;
use crate::router::{self, Answer};

/// Largest request head (request line and headers) a client may send: 431 past it.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in one request: 431 past it.
pub const MAX_HEADERS: usize = 100;
/// Longest time from a request head's first byte to its last (or the IO timeout
/// if shorter): 408 past it.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the listener with every per-client bound in place.
pub fn listen(config: &crate::config::Config) -> std::io::Result<Server> {
    let listener = std::net::TcpListener::bind(config.addr())?;
    let limits = tiny_http::Limits {
        max_connections: config.max_connections,
        max_head_bytes: MAX_HEAD_BYTES,
        max_headers: MAX_HEADERS,
        head_timeout: Some(HEAD_TIMEOUT.min(config.io_timeout)),
        read_timeout: Some(config.io_timeout),
        write_timeout: Some(config.io_timeout),
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

fn work(app: &App, server: &Server, stop: &AtomicBool) {
    loop {
        match server.recv() {
            Ok(req) => answer(app, req),
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => warn!("accepting a request failed: {e}"),
        }
    }
}

/// Answers one request and logs it.
fn answer(app: &App, mut req: Request) {
    let started = Instant::now();
    let method = req.method().to_string();
    let url = req.url().to_string();
    let remote = req
        .remote_addr()
        .map_or_else(|| "-".into(), |a| a.ip().to_string());
    let answer = match catch_unwind(AssertUnwindSafe(|| router::route(app, &mut req))) {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => Answer::error(&e),
        Err(_) => {
            error!("panic while answering {method} {url}");
            Answer::text(500, "internal error")
        }
    };
    let status = answer.status;
    let len = answer.body.len();
    let mut response = Response::from_data(answer.body).with_status_code(status);
    for (k, v) in &answer.headers {
        match Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            Ok(h) => response.add_header(h),
            Err(()) => warn!("dropping invalid response header {k:?}"),
        }
    }
    if let Err(e) = req.respond(response) {
        warn!("writing the answer to {method} {url} failed: {e}");
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    info!(target: "access", "{remote} {method} {url} {status} {len} {ms:.1}ms");
}
