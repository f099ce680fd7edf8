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
