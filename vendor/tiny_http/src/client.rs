//! One client connection, served by its own thread: read a whole request (head
//! within its deadline, body by its framing, within its limit, budget and
//! deadline), queue it for the workers, write their answer under a deadline,
//! and go on only if the framing and both sides allow it.
//!
//! EdgeFaaS patch: this replaces upstream's lenient parser, its
//! `chunked_transfer` decoder and its reader/writer chaining, under which a
//! worker read the body (or not) itself and unread body bytes were parsed as the
//! next request.

use std::convert::TryFrom;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::connection::Connection;
use crate::framing::{self, Chunked, Framing, Head, Refusal, Step};
use crate::request::{Parts, ReplySlot};
use crate::util::MessagesQueue;
use crate::{Budget, HTTPVersion, Lease, Limits, Method, Request, Response, StatusCode};

/// Bytes read from the socket at once (beyond the head's own room).
const READ_CHUNK: usize = 16 * 1024;
/// Bytes drained after an early answer so the client can read it before the close.
const LINGER_BYTES: usize = 256 * 1024;
/// Longest drain after an early answer.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Why a request could not be read.
enum Fail {
    /// Answer this and close.
    Refuse(Refusal),
    /// The client went away (or idled out): close quietly.
    Gone,
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Fail {
        Fail::Refuse(r)
    }
}

pub(crate) struct ClientConnection {
    sock: Connection,
    remote: Option<SocketAddr>,
    limits: Arc<Limits>,
    budget: Arc<Budget>,
    queue: Arc<MessagesQueue<Request>>,
    closing: Arc<AtomicBool>,
    /// Bytes read but not yet consumed: `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    slot: Arc<ReplySlot>,
    /// The socket's read and write timeouts as last set (a syscall each to change).
    read_wait: Option<Duration>,
    write_wait: Option<Duration>,
}

/// Whether a socket timeout of `current` must change to bound a wait of `left`:
/// it may never exceed `left`, and is refreshed once it is under half of it.
fn needs(current: Option<Duration>, left: Duration) -> bool {
    current.map_or(true, |c| c > left || c < left / 2)
}

impl ClientConnection {
    pub(crate) fn new(
        sock: Connection,
        remote: Option<SocketAddr>,
        limits: Arc<Limits>,
        budget: Arc<Budget>,
        queue: Arc<MessagesQueue<Request>>,
        closing: Arc<AtomicBool>,
    ) -> ClientConnection {
        let size = limits.max_head_bytes + READ_CHUNK;
        ClientConnection {
            sock,
            remote,
            limits,
            budget,
            queue,
            closing,
            buf: vec![0; size],
            start: 0,
            end: 0,
            slot: Arc::new(ReplySlot::default()),
            read_wait: None,
            write_wait: None,
        }
    }

    /// Serves requests until the connection closes.
    pub(crate) fn serve(mut self) {
        loop {
            let head = match self.read_head() {
                Ok(Some(head)) => head,
                Ok(None) | Err(Fail::Gone) => return,
                Err(Fail::Refuse(r)) => return self.refuse(r),
            };
            let version = head.version.clone();
            let is_head = head.method == Method::Head;
            let keep_alive = head.keep_alive;
            let (body, lease) = match self.read_body(&head) {
                Ok(read) => read,
                Err(Fail::Gone) => return,
                Err(Fail::Refuse(r)) => return self.refuse(r),
            };
            let parts = Parts {
                method: head.method,
                path: head.path,
                http_version: head.version,
                headers: head.headers,
                remote_addr: self.remote,
                body,
                lease: Some(lease),
            };
            self.queue.push(Request::new(parts, self.slot.clone()));
            let answer = self.slot.take();
            let close = !keep_alive || self.closing.load(Ordering::Relaxed);
            let bytes = match answer.serialize(&version, is_head, close) {
                Ok(bytes) => bytes,
                Err(e) => {
                    log::warn!("cannot build the answer for {}: {e}", crate::peer(self.remote));
                    return;
                }
            };
            let deadline = self.deadline_for(bytes.len() as u64);
            if let Err(e) = self.write_all(&bytes, deadline) {
                log::debug!("writing to {} failed: {e}", crate::peer(self.remote));
                return;
            }
            if close {
                // Bytes already here were sent after a request that closes: drain
                // them so the close does not reset the answer; else close at once.
                if self.end > self.start {
                    return self.linger();
                }
                let _ = self.sock.shutdown(Shutdown::Write);
                return;
            }
        }
    }

    /// `head_timeout` plus `len` bytes at the minimum rate, from now.
    fn deadline_for(&self, len: u64) -> Instant {
        let rate = self.limits.min_rate.max(1);
        let now = Instant::now();
        now.checked_add(self.limits.head_timeout + Duration::from_millis(len.saturating_mul(1000) / rate))
            .unwrap_or(now + Duration::from_secs(86_400))
    }

    /// Reads the next head. `None`: the client closed or idled out between requests.
    fn read_head(&mut self) -> Result<Option<Head>, Fail> {
        self.compact();
        let now = Instant::now();
        let idle_deadline = now.checked_add(self.limits.head_timeout).unwrap_or(now);
        let mut head_deadline: Option<Instant> = None;
        let mut scanned = 0;
        loop {
            // Empty lines before a request line are allowed (RFC 9112 2.2).
            while self.end > self.start && self.buf[self.start] == b'\n'
                || self.end > self.start + 1 && self.buf[self.start..self.start + 2] == *b"\r\n"
            {
                self.start += if self.buf[self.start] == b'\n' { 1 } else { 2 };
                scanned = 0;
            }
            let avail = &self.buf[self.start..self.end];
            if !avail.is_empty() && head_deadline.is_none() {
                let now = Instant::now();
                head_deadline = Some(now.checked_add(self.limits.head_timeout).unwrap_or(now));
            }
            let window = &avail[..avail.len().min(self.limits.max_head_bytes)];
            if let Some(end) = framing::find_head_end(window, scanned) {
                let head = framing::parse_head(&window[..end], self.limits.max_headers)?;
                self.start += end;
                return Ok(Some(head));
            }
            scanned = window.len();
            if window.len() >= self.limits.max_head_bytes {
                return Err(Refusal::new(431, "request head too large").into());
            }
            let deadline = head_deadline.unwrap_or(idle_deadline);
            match self.fill(deadline) {
                Ok(0) if head_deadline.is_none() => return Ok(None),
                Ok(0) => return Err(Fail::Gone),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {
                    return match head_deadline {
                        None => Ok(None),
                        Some(_) => Err(Refusal::new(408, "request head too slow").into()),
                    };
                }
                Err(_) => return Err(Fail::Gone),
            }
        }
    }

    /// Reads the whole body by the head's framing; returns it with the budget it
    /// holds (given back when the request is dropped, or here on any failure).
    fn read_body(&mut self, head: &Head) -> Result<(Vec<u8>, Lease), Fail> {
        let limit = (self.limits.body_limit)(&head.method, &head.path);
        let too_large = || {
            Refusal::new(
                413,
                format!(
                    "request body is larger than {} ({} bytes)",
                    limit.name, limit.bytes
                ),
            )
        };
        let mut body = Vec::new();
        let mut lease = Lease::new(self.budget.clone());
        match head.framing {
            Framing::Empty => {}
            Framing::Length(n) if n > limit.bytes => return Err(too_large().into()),
            Framing::Length(n) => {
                self.continue_if_asked(head, n > 0)?;
                let deadline = self.deadline_for(n);
                let total = n as usize;
                while body.len() < total {
                    if self.end == self.start {
                        self.fill_body(deadline)?;
                    }
                    let take = (total - body.len()).min(self.end - self.start);
                    self.keep(&mut body, &mut lease, take, total)?;
                }
            }
            Framing::Chunked => {
                self.continue_if_asked(head, true)?;
                let started = Instant::now();
                let cap = usize::try_from(limit.bytes).unwrap_or(usize::MAX);
                let mut dec = Chunked::new(limit.bytes, self.limits.max_headers);
                loop {
                    let step = dec.step(&self.buf[self.start..self.end]).map_err(|r| {
                        if r.status == 413 {
                            too_large()
                        } else {
                            r
                        }
                    })?;
                    match step {
                        Step::More => {
                            let rate = self.limits.min_rate.max(1);
                            let allowance = dec.received().saturating_mul(1000) / rate;
                            let deadline = started
                                .checked_add(self.limits.head_timeout + Duration::from_millis(allowance))
                                .unwrap_or(started);
                            self.fill_body(deadline)?;
                        }
                        Step::Skip(n) => self.start += n,
                        Step::Data(n) => self.keep(&mut body, &mut lease, n, cap)?,
                        Step::Done(n) => {
                            self.start += n;
                            break;
                        }
                    }
                }
            }
        }
        Ok((body, lease))
    }

    /// Reads more of a body; the client's leaving or its deadline end the request.
    fn fill_body(&mut self, deadline: Instant) -> Result<(), Fail> {
        match self.fill(deadline) {
            Ok(0) => Err(Fail::Gone),
            Ok(_) => Ok(()),
            Err(e) if is_timeout(&e) => Err(Refusal::new(408, "request body too slow").into()),
            Err(_) => Err(Fail::Gone),
        }
    }

    /// Moves `n` buffered bytes into `body` (which will not outgrow `most`), after
    /// taking room in the budget for any memory the body grows by.
    fn keep(&mut self, body: &mut Vec<u8>, lease: &mut Lease, n: usize, most: usize) -> Result<(), Fail> {
        let needed = body.len() + n;
        if needed > body.capacity() {
            let grown = needed.max(body.capacity() * 2).max(4096).min(most.max(needed));
            if !lease.grow(grown - body.capacity()) {
                return Err(Refusal::new(503, "server busy: too many request bodies in memory; try again").into());
            }
            if body.try_reserve_exact(grown - body.len()).is_err() {
                return Err(Refusal::new(503, "server busy: out of memory for the request body").into());
            }
        }
        body.extend_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(())
    }

    /// Sends `100 Continue` when the client waits for it and the body will be read.
    fn continue_if_asked(&mut self, head: &Head, has_body: bool) -> Result<(), Fail> {
        if head.expect_continue && has_body && self.end == self.start {
            let deadline = self.deadline_for(0);
            self.write_all(b"HTTP/1.1 100 Continue\r\n\r\n", deadline)
                .map_err(|_| Fail::Gone)?;
        }
        Ok(())
    }

    /// Moves unconsumed bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads more bytes into the buffer, waiting at most until `deadline`.
    fn fill(&mut self, deadline: Instant) -> std::io::Result<usize> {
        if self.end == self.buf.len() {
            self.compact();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            if needs(self.read_wait, left) {
                self.sock.set_read_timeout(Some(left))?;
                self.read_wait = Some(left);
            }
            match self.sock.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `bytes`, failing once `deadline` passes.
    fn write_all(&mut self, mut bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
        while !bytes.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            if needs(self.write_wait, left) {
                self.sock.set_write_timeout(Some(left))?;
                self.write_wait = Some(left);
            }
            match self.sock.write(bytes) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Answers a request that will not be served, then closes.
    fn refuse(mut self, r: Refusal) {
        log::debug!("refusing a request from {}: {} {}", crate::peer(self.remote), r.status, r.message);
        let text = if r.message.is_empty() {
            StatusCode(r.status).default_reason_phrase().to_string()
        } else {
            r.message
        };
        let response = Response::from_string(format!("{text}\n")).with_status_code(r.status);
        if let Ok(bytes) = response.boxed().serialize(&HTTPVersion(1, 1), false, true) {
            let deadline = self.deadline_for(bytes.len() as u64);
            let _ = self.write_all(&bytes, deadline);
        }
        self.linger();
    }

    /// Closes after an answer: stops sending, then reads (and drops) what the
    /// client still sends for a moment, so the close does not reset the
    /// connection before the client has read the answer.
    fn linger(mut self) {
        let _ = self.sock.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER_TIME;
        let mut drained = 0;
        while drained < LINGER_BYTES {
            self.start = 0;
            self.end = 0;
            match self.fill(deadline) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}
