//! Maps a request's method and path to what answers it: health, management,
//! or a function invocation.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Instant;

use percent_encoding::percent_decode_str;
use tiny_http::Request;

use crate::app::App;
use crate::error::{Error, Result};
use crate::invoke::Call;
use crate::mgmt;
use crate::store::FunctionName;

/// An answer before it becomes a tiny_http response.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// A `text/plain` answer whose body is `msg` plus a newline.
    pub fn text(status: u16, msg: impl std::fmt::Display) -> Answer {
        Answer {
            status,
            headers: vec![("Content-Type".into(), "text/plain; charset=utf-8".into())],
            body: format!("{msg}\n").into_bytes(),
        }
    }

    /// The answer a client sees for an error.
    pub fn error(e: &Error) -> Answer {
        let mut a = Answer::text(e.status(), e);
        if let Error::Method(allowed) = e {
            a.headers.push(("Allow".into(), (*allowed).into()));
        }
        a
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
        let path = match path.split_once("://") {
            Some((_, after)) => after.find('/').map_or("/", |i| &after[i..]),
            None => path,
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

/// Answers one request.
pub fn route(app: &App, req: &mut Request) -> Result<Answer> {
    let url = req.url().to_string();
    let target = Target::parse(&url)?;
    match (target.first.as_str(), target.rest) {
        ("_", "/health") => Ok(health(app)),
        ("_", "/metrics") => {
            let mut a = Answer::text(200, "");
            a.headers = vec![(
                "Content-Type".into(),
                "text/plain; version=0.0.4; charset=utf-8".into(),
            )];
            a.body = app.render_metrics().into_bytes();
            Ok(a)
        }
        ("_", _) => Err(Error::NoRoute(url.clone())),
        ("mgmt", _) => mgmt::handle(app, req, target.rest),
        ("", _) => Err(Error::NoRoute(
            "/ (name a function: /<name>; GET /mgmt lists them)".into(),
        )),
        _ => invoke(app, req, &target),
    }
}

fn health(app: &App) -> Answer {
    if app.draining() {
        Answer::text(503, "shutting down")
    } else {
        Answer::text(200, "OK")
    }
}

/// Runs a function; every answer carries `X-Duration-Seconds`, and every answer
/// for an installed function is counted in the metrics.
fn invoke(app: &App, req: &mut Request, target: &Target<'_>) -> Result<Answer> {
    let started = Instant::now();
    let result = run(app, req, target);
    let counted = !matches!(result, Err(Error::NotFound(_) | Error::BadName(_)));
    let mut answer = result.unwrap_or_else(|e| Answer::error(&e));
    let secs = started.elapsed().as_secs_f64();
    if counted {
        app.metrics.invoked(&target.first, answer.status, secs);
    }
    answer
        .headers
        .push(("X-Duration-Seconds".into(), format!("{secs:.6}")));
    Ok(answer)
}

fn run(app: &App, req: &mut Request, target: &Target<'_>) -> Result<Answer> {
    let name = FunctionName::parse(&target.first)?;
    let handler = app.store.handler(&name)?;
    let _slot = app.inflight.try_enter().ok_or(Error::Busy)?;
    // Checked after taking the slot, so shutdown's wait for zero cannot miss us.
    if app.draining() {
        return Err(Error::ShuttingDown);
    }
    let body = read_body(req, app.config.max_body, "EDGEFAAS_MAX_BODY")?;
    let env = http_env(req, target, body.len());
    let reply = app.invoker.invoke(Call {
        name: &name,
        handler: &handler,
        body,
        env,
    })?;
    let mut headers = reply.headers;
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    }
    Ok(Answer {
        status: reply.status,
        headers,
        body: reply.body,
    })
}

/// Reads the whole body, refusing one over `limit` bytes with 413.
pub fn read_body(req: &mut Request, limit: u64, var: &str) -> Result<Vec<u8>> {
    let too_large =
        || Error::TooLarge(format!("request body is larger than {var} ({limit} bytes)"));
    if req.body_length().is_some_and(|n| n as u64 > limit) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    req.as_reader().take(limit + 1).read_to_end(&mut body)?;
    if body.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(body)
}

/// The OpenFaaS classic-watchdog variables: `Http_Method`, `Http_Path`,
/// `Http_Query`, `Http_ContentLength` and one `Http_<Header_Name>` per header.
fn http_env(req: &Request, target: &Target<'_>, body_len: usize) -> Vec<(String, String)> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for h in req.headers() {
        let value = h.value.as_str();
        if value.contains('\0') {
            continue;
        }
        let key = format!("Http_{}", canonical(h.field.as_str().as_str()));
        headers
            .entry(key)
            .and_modify(|v| {
                v.push(',');
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    let mut env: Vec<(String, String)> = headers.into_iter().collect();
    env.push(("Http_Method".into(), req.method().as_str().to_string()));
    env.push(("Http_Path".into(), target.rest.to_string()));
    env.push(("Http_Query".into(), target.query.to_string()));
    env.push(("Http_ContentLength".into(), body_len.to_string()));
    // An environment cannot hold NUL; such a value could only come from a hostile request.
    env.retain(|(k, v)| !k.contains('\0') && !v.contains('\0'));
    env
}

/// `content-type` -> `Content_Type`, as Go canonicalises header names.
fn canonical(field: &str) -> String {
    field
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(c) => {
                    c.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("_")
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

    #[test]
    fn header_names_are_canonical_with_underscores() {
        assert_eq!(canonical("content-type"), "Content_Type");
        assert_eq!(canonical("X-CUSTOM-header"), "X_Custom_Header");
    }
}
