//! Maps a request's method and path to what answers it: health and metrics at
//! once, `/mgmt` (through `mgmt`), or a function invocation; and runs an
//! invocation once it has a slot.

use std::collections::BTreeMap;
use std::time::Instant;

use tiny_http::Request;

use crate::app::App;
use crate::error::{Error, Result};
use crate::http::{Answer, Target};
use crate::invoke::Call;
use crate::mgmt;
use crate::name::FunctionName;

/// What a request needs.
pub enum Route {
    /// Answered at once (health, metrics, listings, refusals).
    Answer(Answer),
    /// An invocation of this function, which waits for a slot.
    Invoke(FunctionName),
    /// A change under `/mgmt` (install, update, delete), which waits for an install slot.
    Change,
    /// `POST /async/<name>`: queued on disk, answered 202 at once.
    Async(FunctionName),
}

/// Decides what a request needs; answers what needs no slot.
pub fn route(app: &App, req: &Request) -> Result<Route> {
    let url = req.url();
    let target = Target::parse(url)?;
    match (target.first.as_str(), target.rest) {
        ("_", "/health") => Ok(Route::Answer(health(app))),
        ("_", "/metrics") => {
            let mut a = Answer::text(200, "");
            a.headers = vec![(
                "Content-Type".into(),
                "text/plain; version=0.0.4; charset=utf-8".into(),
            )];
            a.body = app.render_metrics().into_bytes();
            Ok(Route::Answer(a))
        }
        ("_", _) => Err(Error::NoRoute(url.to_string())),
        ("mgmt", _) => Ok(match mgmt::route(app, req, target.rest)? {
            Some(answer) => Route::Answer(answer),
            None => Route::Change,
        }),
        ("async" | "async-function", rest) => {
            let first = rest
                .trim_start_matches('/')
                .split(['/', '?'])
                .next()
                .unwrap_or("");
            let name = FunctionName::parse(first)?;
            app.store.handler(&name)?;
            if app.draining() {
                return Err(Error::ShuttingDown);
            }
            if *req.method() != tiny_http::Method::Post {
                return Err(Error::Method("POST"));
            }
            Ok(Route::Async(name))
        }
        ("", _) => Err(Error::NoRoute(
            "/ (name a function: /<name>; GET /mgmt lists them)".into(),
        )),
        _ => {
            let name = FunctionName::parse(&target.first)?;
            app.store.handler(&name)?;
            if app.draining() {
                return Err(Error::ShuttingDown);
            }
            Ok(Route::Invoke(name))
        }
    }
}

fn health(app: &App) -> Answer {
    if app.draining() {
        Answer::text(503, "shutting down")
    } else {
        Answer::text(200, "OK")
    }
}

/// Runs a function (its slot is held by the caller); the answer carries
/// `X-Duration-Seconds` and is counted in the metrics.
pub fn invoke(app: &App, req: &mut Request, name: &FunctionName, started: Instant) -> Answer {
    let result = run(app, req, name);
    let counted = !matches!(result, Err(Error::NotFound(_)));
    let mut answer = result.unwrap_or_else(|e| Answer::error(&e));
    if let (true, Some(cause)) = (counted, &answer.cause) {
        app.logs
            .push(name.as_str(), &format!("{} {cause}", answer.status));
    }
    let secs = started.elapsed().as_secs_f64();
    if counted {
        app.metrics.invoked(name.as_str(), answer.status, secs);
    }
    answer
        .headers
        .push(("X-Duration-Seconds".into(), format!("{secs:.6}")));
    answer
}

fn run(app: &App, req: &mut Request, name: &FunctionName) -> Result<Answer> {
    // Looked up again: it may have been deleted while the request waited.
    let handler = app.store.handler(name)?;
    let url = req.url().to_string();
    let target = Target::parse(&url)?;
    let body = req.take_body();
    let env = http_env(req, &target, body.len());
    app.invoker.invoke(Call {
        name,
        handler: &handler,
        body,
        env,
        settings: app.store.settings(name),
    })
}

/// Queues an async call (`POST /async/<name>[/<more>][?<query>]`): 202 and `X-Call-Id`.
pub fn accept_async(app: &App, req: &mut Request, name: &FunctionName) -> Answer {
    let url = req.url().to_string();
    let result = (|| -> Result<String> {
        // The function sees the path after its name, as an invocation would.
        let after = url.splitn(3, '/').nth(2).unwrap_or("");
        let inner = format!("/{after}");
        let target = Target::parse(&inner)?;
        let body = req.take_body();
        let env = http_env(req, &target, body.len());
        let callback = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("X-Callback-Url"))
            .map(|h| h.value.as_str().trim().to_string());
        app.asyncq.accept(name, &body, env, callback)
    })();
    match result {
        Ok(id) => Answer::text(202, format!("call {id} queued")).with_header("X-Call-Id", id),
        Err(e) => Answer::error(&e),
    }
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
    fn header_names_are_canonical_with_underscores() {
        assert_eq!(canonical("content-type"), "Content_Type");
        assert_eq!(canonical("X-CUSTOM-header"), "X_Custom_Header");
    }
}
