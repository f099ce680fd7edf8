//! A whole request (head and body already read) and the way back to its connection.
//!
//! EdgeFaaS patch: upstream handed workers a request whose body still had to
//! be read from the socket, and whose answer the worker wrote itself. Here the
//! connection's thread has read the body, and writes the answer that
//! `respond` passes back to it, so a worker never waits on a client.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};

use crate::{HTTPVersion, Header, Lease, Method, Response, ResponseBox, StatusCode};

/// Represents an HTTP request made by a client.
///
/// If a `Request` is dropped without `respond`, the client gets an empty 500.
pub struct Request {
    method: Method,
    path: String,
    http_version: HTTPVersion,
    headers: Vec<Header>,
    remote_addr: Option<SocketAddr>,
    body: Vec<u8>,
    /// Room taken in the body budget, given back on drop.
    lease: Option<Lease>,
    reply: Option<Arc<ReplySlot>>,
}

/// Where a worker leaves the answer for the connection's thread.
#[derive(Default)]
pub(crate) struct ReplySlot {
    answer: Mutex<Option<ResponseBox>>,
    ready: Condvar,
}

impl ReplySlot {
    fn put(&self, response: ResponseBox) {
        *self.answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(response);
        self.ready.notify_one();
    }

    /// Waits for the answer to the request in flight.
    pub(crate) fn take(&self) -> ResponseBox {
        let mut answer = self.answer.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(a) = answer.take() {
                return a;
            }
            answer = self.ready.wait(answer).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The parts a connection fills in.
pub(crate) struct Parts {
    pub method: Method,
    pub path: String,
    pub http_version: HTTPVersion,
    pub headers: Vec<Header>,
    pub remote_addr: Option<SocketAddr>,
    pub body: Vec<u8>,
    pub lease: Option<Lease>,
}

impl Request {
    pub(crate) fn new(parts: Parts, reply: Arc<ReplySlot>) -> Request {
        Request {
            method: parts.method,
            path: parts.path,
            http_version: parts.http_version,
            headers: parts.headers,
            remote_addr: parts.remote_addr,
            body: parts.body,
            lease: parts.lease,
            reply: Some(reply),
        }
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// The whole body, already read.
    #[inline]
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Moves the body out (it stays counted against the body budget until the
    /// request is answered).
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// Returns the length of the body in bytes.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        Some(self.body.len())
    }

    /// Returns the address of the client that sent this request.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// Hands the answer to the connection's thread, which writes it (under a
    /// deadline) and then reads the next request.
    pub fn respond<R>(mut self, response: Response<R>) -> Result<(), std::io::Error>
    where
        R: Read + Send + 'static,
    {
        if let Some(slot) = self.reply.take() {
            slot.put(response.boxed());
        }
        Ok(())
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> Result<(), std::fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(slot) = self.reply.take() {
            slot.put(Response::empty(StatusCode(500)).boxed());
        }
        drop(self.lease.take());
    }
}
