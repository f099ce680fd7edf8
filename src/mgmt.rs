//! The management API under `/mgmt`: list, install by URL or upload, delete,
//! behind an optional bearer token.

use subtle::ConstantTimeEq;
use tiny_http::{Method, Request};

use crate::app::App;
use crate::error::{Error, Result};
use crate::fetch::Source;
use crate::router::{Answer, read_body};
use crate::store::{FunctionName, Installed};

/// Largest body of `POST`/`DELETE /mgmt` (a URL or a name).
const MAX_COMMAND: u64 = 8 * 1024;

/// Answers a request to `/mgmt` (`rest` = `/`) or `/mgmt/<name>`.
pub fn handle(app: &App, req: &mut Request, rest: &str) -> Result<Answer> {
    authorize(app, req)?;
    if app.draining() {
        return Err(Error::ShuttingDown);
    }
    let method = req.method().clone();
    match (rest, &method) {
        ("/", Method::Get | Method::Head) => list(app),
        ("/", Method::Post) => {
            let body = read_body(req, MAX_COMMAND, "the 8 KiB limit for a URL")?;
            install_from_url(app, &String::from_utf8_lossy(&body))
        }
        ("/", Method::Delete) => {
            let body = read_body(req, MAX_COMMAND, "the 8 KiB limit for a name")?;
            delete(app, String::from_utf8_lossy(&body).trim())
        }
        ("/", _) => Err(Error::Method("GET, POST, DELETE")),
        (path, Method::Put) => {
            let name = FunctionName::parse(path_name(path))?;
            if name.is_echo() {
                return Err(Error::Protected);
            }
            let source = read_body(
                req,
                app.config.max_function_size,
                "EDGEFAAS_MAX_FUNCTION_SIZE",
            )?;
            let outcome = app.store.install(&name, &source, "upload")?;
            installed(app, &name, outcome)
        }
        (path, Method::Delete) => delete(app, path_name(path)),
        (_, _) => Err(Error::Method("PUT, DELETE")),
    }
}

/// `/average.py` or `/average` -> `average`.
fn path_name(path: &str) -> &str {
    let name = path.strip_prefix('/').unwrap_or(path);
    name.strip_suffix(".py").unwrap_or(name)
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

fn list(app: &App) -> Result<Answer> {
    let names = app.store.list()?;
    let text: String = names.iter().map(|n| format!("{n}\n")).collect();
    let mut answer = Answer::text(200, "");
    answer.body = text.into_bytes();
    Ok(answer)
}

fn install_from_url(app: &App, text: &str) -> Result<Answer> {
    let source = Source::parse(text)?;
    if source.name.is_echo() {
        return Err(Error::Protected);
    }
    let bytes = app.fetcher.fetch(&source)?;
    let outcome = app.store.install(&source.name, &bytes, &source.url)?;
    installed(app, &source.name, outcome)
}

/// The answer to an install; the old code is never served once it is sent.
fn installed(app: &App, name: &FunctionName, outcome: Installed) -> Result<Answer> {
    app.invoker.forget(name);
    Ok(match outcome {
        Installed::Created => Answer::text(201, format!("{name}.py has been created")),
        Installed::Updated => Answer::text(200, format!("{name}.py has been updated")),
    })
}

fn delete(app: &App, name: &str) -> Result<Answer> {
    let name = FunctionName::parse(name)?;
    app.store.delete(&name)?;
    app.invoker.forget(&name);
    Ok(Answer::text(200, format!("{name} has been deleted")))
}
