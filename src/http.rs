//! The one answer type, and the one place an answer becomes a tiny_http
//! response and an access-log line.

use std::time::Instant;

use log::{debug, info, warn};
use percent_encoding::percent_decode_str;
use tiny_http::{Header, Request, Response};

use crate::error::{Error, Result};

/// Largest body of `POST`/`DELETE /mgmt` (a URL or a name), and of requests
/// that carry no data (health, metrics).
pub const MAX_COMMAND: u64 = 8 * 1024;

/// An answer before it becomes a response on the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For a 5xx the daemon made: why, for the log's warning.
    pub cause: Option<String>,
}

impl Answer {
    /// A `text/plain` answer whose body is `msg` plus a newline.
    pub fn text(status: u16, msg: impl std::fmt::Display) -> Answer {
        Answer {
            status,
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            body: format!("{msg}\n").into_bytes(),
            cause: None,
        }
    }

    /// The answer a client sees for an error.
    pub fn error(e: &Error) -> Answer {
        let mut a = Answer::text(e.status(), e);
        if a.status >= 500 {
            a.cause = Some(e.detail());
        }
        match e {
            Error::Method(allowed) => a.headers.push(("Allow".into(), (*allowed).into())),
            Error::Busy(_) | Error::QueueFull(_) => {
                a.headers.push(("Retry-After".into(), "1".into()))
            }
            _ => {}
        }
        a
    }

    /// Adds a header.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Answer {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Which requests log their access line at debug only (probes every few seconds).
fn quiet(url: &str) -> bool {
    url == "/_/health" || url == "/_/metrics"
}

/// Sends `answer` to `req`'s client and writes the access-log line.
pub fn send(req: Request, mut answer: Answer, started: Instant) {
    let method = req.method().to_string();
    let url = req.url().to_string();
    let remote = req
        .remote_addr()
        .map_or_else(|| "-".into(), |a| a.ip().to_string());
    let status = answer.status;
    let len = answer.body.len();
    let cause = answer.cause.take();
    let mut response = Response::from_data(answer.body).with_status_code(status);
    for (k, v) in &answer.headers {
        match Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            Ok(h) => response.add_header(h),
            // Function headers are checked before this; the daemon's own are constants.
            Err(()) => warn!("dropping invalid response header {k:?}"),
        }
    }
    let _ = req.respond(response);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Some(cause) = cause {
        // Every 5xx the daemon makes says why, once, on its access line.
        warn!(target: "access", "{remote} {method} {url} {status} {len} {ms:.1}ms: {cause}");
    } else if quiet(&url) {
        debug!(target: "access", "{remote} {method} {url} {status} {len} {ms:.1}ms");
    } else {
        info!(target: "access", "{remote} {method} {url} {status} {len} {ms:.1}ms");
    }
}

/// The parts of a request target the router needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    /// First path segment, percent-decoded.
    pub first: String,
    /// The rest of the path after the first segment (raw), `/` when empty.
    pub rest: &'a str,
    /// The raw query string, without `?`.
    pub query: &'a str,
}

impl<'a> Target<'a> {
    /// Splits a request target (origin or absolute form).
    pub fn parse(url: &'a str) -> Result<Target<'a>> {
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        // Origin form (`/path`) is taken as it is; absolute form only when the target
        // starts with its scheme (RFC 9112 3.2.2). A `://` further on is part of the
        // path: a proxy matched its rules against that path, and so must the router.
        let lower = path.get(..8).unwrap_or(path).to_ascii_lowercase();
        let path = if path.starts_with('/') {
            path
        } else if let Some(after) = ["http://", "https://"]
            .iter()
            .find(|s| lower.starts_with(*s))
            .map(|s| &path[s.len()..])
        {
            after.find('/').map_or("/", |i| &after[i..])
        } else {
            path
        };
        let path = path
            .strip_prefix('/')
            .ok_or_else(|| Error::BadRequest("request path must start with '/'".into()))?;
        let (first, rest) = match path.find('/') {
            Some(i) => (&path[..i], &path[i..]),
            None => (path, "/"),
        };
        let first = percent_decode_str(first)
            .decode_utf8()
            .map_err(|_| Error::BadName("invalid function name: not UTF-8".into()))?
            .into_owned();
        Ok(Target { first, rest, query })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_splits_name_rest_and_query() {
        let t = Target::parse("/avg/a/b?x=1&y=2").unwrap();
        assert_eq!(
            t,
            Target {
                first: "avg".into(),
                rest: "/a/b",
                query: "x=1&y=2"
            }
        );
        let t = Target::parse("/echo").unwrap();
        assert_eq!((t.first.as_str(), t.rest, t.query), ("echo", "/", ""));
        let t = Target::parse("http://h:8080/echo/x?q").unwrap();
        assert_eq!((t.first.as_str(), t.rest, t.query), ("echo", "/x", "q"));
        let t = Target::parse("HTTPS://h/mgmt").unwrap();
        assert_eq!(t.first, "mgmt");
        // A `://` inside an origin-form path is path, not a new authority.
        for sneaky in ["/x://y/mgmt/evil", "/a://b/mgmt", "/mgmt:://x/echo"] {
            let t = Target::parse(sneaky).unwrap();
            assert_ne!(t.first, "mgmt", "{sneaky}");
            assert!(sneaky.starts_with(&format!("/{}", t.first)), "{sneaky}");
        }
        assert!(Target::parse("ftp://h/mgmt").is_err());
        let t = Target::parse("/%2e%2e/x").unwrap();
        assert_eq!(t.first, "..");
        assert!(Target::parse("*").is_err());
        assert!(Target::parse("/%ff").is_err());
    }

    proptest::proptest! {
        /// Any request target splits without panicking; the first segment never
        /// holds a '/' that was not percent-encoded, and the rest starts with '/'.
        #[test]
        fn any_target_splits_safely(url in "/[a-zA-Z0-9%./?#&=_~-]{0,80}|\\PC{0,80}") {
            if let Ok(t) = Target::parse(&url) {
                proptest::prop_assert!(t.rest.starts_with('/'));
                proptest::prop_assert!(!t.query.contains('?') || url.matches('?').count() > 1);
                let raw_first = url.split('?').next().unwrap_or("");
                if !raw_first.contains("://") && !raw_first.to_ascii_lowercase().contains("%2f") {
                    proptest::prop_assert!(!t.first.contains('/'));
                }
            }
        }
    }
}
