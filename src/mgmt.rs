//! The management API under `/mgmt`: list, install by URL or upload, delete,
//! behind an optional bearer token.

use subtle::ConstantTimeEq;
use tiny_http::{Method, Request};

use crate::app::App;
use crate::error::{Error, Result};
use crate::fetch::Source;
use crate::http::{Answer, MAX_COMMAND, Target};
use crate::metrics::Origin;
use crate::name::FunctionName;
use crate::store::Installed;

/// Decides a request to `/mgmt` (`rest` = `/`) or `/mgmt/<name>`: the token,
/// then a listing at once, or `None`: a change that waits for an install slot.
pub fn route(app: &App, req: &Request, rest: &str) -> Result<Option<Answer>> {
    authorize(app, req)?;
    if app.draining() {
        return Err(Error::ShuttingDown);
    }
    if let Some(name) = rest.strip_suffix("/logs").filter(|n| n.len() > 1) {
        return match req.method() {
            Method::Get | Method::Head => logs(app, &path_name(name), req.url()).map(Some),
            _ => Err(Error::Method("GET")),
        };
    }
    match (rest, req.method()) {
        ("/", Method::Get | Method::Head) => list(app, wants_json(req)).map(Some),
        ("/", Method::Post | Method::Delete) => Ok(None),
        ("/", _) => Err(Error::Method("GET, POST, DELETE")),
        (_, Method::Put | Method::Delete) => Ok(None),
        (_, _) => Err(Error::Method("PUT, DELETE")),
    }
}

/// Carries out a change routed by `route`, holding an install slot.
pub fn change(app: &App, req: &mut Request) -> Result<Answer> {
    if app.draining() {
        return Err(Error::ShuttingDown);
    }
    let url = req.url().to_string();
    let target = Target::parse(&url)?;
    let (rest, query) = (target.rest, target.query);
    let body = req.take_body();
    let too_large = |limit: u64, var: &str| {
        Error::TooLarge(format!("request body is larger than {var} ({limit} bytes)"))
    };
    match (rest, req.method()) {
        ("/", Method::Post) => {
            if body.len() as u64 > MAX_COMMAND {
                return Err(too_large(MAX_COMMAND, "the 8 KiB limit for a URL"));
            }
            install_from_url(app, &String::from_utf8_lossy(&body), query)
        }
        ("/", _) => {
            if body.len() as u64 > MAX_COMMAND {
                return Err(too_large(MAX_COMMAND, "the 8 KiB limit for a name"));
            }
            delete(app, String::from_utf8_lossy(&body).trim())
        }
        (path, Method::Put) => {
            let name = FunctionName::parse(&path_name(path))?;
            writable(app, &name)?;
            if body.len() as u64 > app.config.max_function_size {
                return Err(too_large(
                    app.config.max_function_size,
                    "EDGEFAAS_MAX_FUNCTION_SIZE",
                ));
            }
            installed(
                &name,
                app.install(&name, &body, "upload", Origin::Upload, query)?,
            )
        }
        (path, _) => delete(app, &path_name(path)),
    }
}

/// `/average.py` or `/average` -> `average`, percent-decoded (lossily: a bad byte
/// becomes U+FFFD, which no valid name contains).
fn path_name(path: &str) -> String {
    let name = path.strip_prefix('/').unwrap_or(path);
    let name = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
    name.strip_suffix(".py").unwrap_or(&name).to_string()
}

/// Checks `Authorization: Bearer <token>` in constant time when a token is set.
fn authorize(app: &App, req: &Request) -> Result<()> {
    let Some(token) = &app.config.mgmt_token else {
        return Ok(());
    };
    let given = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Authorization"))
        .and_then(|h| h.value.as_str().strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(Error::Unauthorized)
    }
}

/// True when the client asked for JSON (`Accept: application/json`).
fn wants_json(req: &Request) -> bool {
    req.headers().iter().any(|h| {
        h.field.equiv("Accept")
            && h.value
                .as_str()
                .to_ascii_lowercase()
                .contains("application/json")
    })
}

fn list(app: &App, json: bool) -> Result<Answer> {
    let names = app.store.list()?;
    let mut answer = Answer::text(200, "");
    if json {
        // A function deleted between listing and describing is simply left out.
        let rows: Vec<_> = names
            .iter()
            .filter_map(|n| app.store.describe(n).ok())
            .collect();
        let mut body = serde_json::to_vec(&rows).map_err(std::io::Error::other)?;
        body.push(b'\n');
        answer.headers = vec![("Content-Type".into(), "application/json".into())];
        answer.body = body;
    } else {
        answer.body = names
            .iter()
            .map(|n| format!("{n}\n"))
            .collect::<String>()
            .into_bytes();
    }
    Ok(answer)
}

/// `GET /mgmt/<name>/logs[?since=<RFC 3339 or unix seconds>&lines=<n>]`: the
/// function's recent stderr lines and failures, newest last, one a line with its time.
fn logs(app: &App, name: &str, url: &str) -> Result<Answer> {
    let name = FunctionName::parse(name)?;
    app.store.handler(&name)?;
    let query = Target::parse(url)?.query;
    let (mut since_ms, mut lines) = (0u64, 100usize);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        match k {
            "since" => {
                since_ms = crate::store::parse_time_ms(&v).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "since: expected an RFC 3339 UTC time or unix seconds, got {:?}",
                        v.chars().take(60).collect::<String>()
                    ))
                })?
            }
            "lines" => {
                lines = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::BadRequest("lines: expected a whole number greater than 0".into())
                })?
            }
            other => {
                return Err(Error::BadRequest(format!(
                    "unknown parameter {:?}: use since or lines",
                    other.chars().take(40).collect::<String>()
                )));
            }
        }
    }
    let mut body = String::new();
    for l in app.logs.read(name.as_str(), since_ms, lines) {
        body.push_str(&crate::store::rfc3339_ms(l.at_ms));
        body.push(' ');
        body.push_str(&l.text);
        body.push('\n');
    }
    let mut answer = Answer::text(200, "");
    answer.body = body.into_bytes();
    Ok(answer)
}

/// Refuses a /mgmt change to a function that EDGEFAAS_SOURCE_DIR keeps in sync.
fn writable(app: &App, name: &FunctionName) -> Result<()> {
    if name.is_echo() {
        return Err(Error::Protected);
    }
    if app
        .store
        .source_of(name)
        .is_some_and(|s| crate::sourcedir::is_managed(app, &s))
    {
        return Err(Error::Managed(name.to_string()));
    }
    Ok(())
}

fn install_from_url(app: &App, text: &str, query: &str) -> Result<Answer> {
    let source = Source::parse(text)?;
    writable(app, &source.name)?;
    let bytes = app.fetcher.fetch(&source)?;
    app.metrics.downloaded(bytes.len());
    let outcome = app.install(
        &source.name,
        &bytes,
        &source.public_url(),
        Origin::Url,
        query,
    )?;
    installed(&source.name, outcome)
}

fn installed(name: &FunctionName, outcome: Installed) -> Result<Answer> {
    Ok(match outcome {
        Installed::Created => Answer::text(201, format!("{name}.py has been created")),
        Installed::Updated => Answer::text(200, format!("{name}.py has been updated")),
    })
}

fn delete(app: &App, name: &str) -> Result<Answer> {
    let name = FunctionName::parse(name)?;
    writable(app, &name)?;
    app.delete(&name)?;
    Ok(Answer::text(200, format!("{name} has been deleted")))
}
