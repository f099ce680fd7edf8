//! Invocations that do not come from an HTTP request (an MQTT message, a
//! schedule, a queued async call): the same lane, limits, sandbox, metrics and
//! logs as HTTP, run by a worker; the caller is told the answer (or why the
//! function did not run) through a callback.

use std::sync::Arc;
use std::time::Instant;

use crate::admission::{Job, Refused, Slot};
use crate::app::App;
use crate::error::{Error, Result};
use crate::http::Answer;
use crate::invoke::Call;
use crate::name::FunctionName;

/// What the callback learns: the function's answer, or why it did not run.
pub type Done = Box<dyn FnOnce(std::result::Result<Answer, Refused>) + Send>;

/// One invocation from an event source.
pub struct Event {
    pub name: FunctionName,
    pub body: Vec<u8>,
    /// Variables the source adds (`Mqtt_Topic`, `Http_*` of a queued call...).
    pub env: Vec<(String, String)>,
}

struct EventJob {
    app: Arc<App>,
    event: Event,
    limit: usize,
    done: Done,
}

impl Job for EventJob {
    fn key(&self) -> &str {
        self.event.name.as_str()
    }

    fn limit(&self) -> usize {
        self.limit
    }

    fn run(self: Box<Self>, slot: Slot) {
        let EventJob {
            app, event, done, ..
        } = *self;
        if app.draining() {
            // Admitted before the drain began: not run, so its source keeps it
            // (a queued call stays on disk, an MQTT message stays unacknowledged).
            drop(slot);
            done(Err(Refused::ShuttingDown));
            return;
        }
        let answer = run(&app, event);
        drop(slot);
        done(Ok(answer));
    }

    fn refuse(self: Box<Self>, why: Refused) {
        (self.done)(Err(why));
    }
}

/// Queues `event` on the invocation lane; a worker runs it when a slot is free.
pub fn submit(app: &Arc<App>, event: Event, done: Done) {
    let limit = app.store.settings(&event.name).concurrency_limit();
    app.lanes.invoke.submit_detached(Box::new(EventJob {
        app: app.clone(),
        event,
        limit,
        done,
    }));
}

/// Runs one event's invocation now (the caller holds a slot), counted and logged as HTTP's are.
pub fn run(app: &App, event: Event) -> Answer {
    let started = Instant::now();
    let name = event.name.clone();
    let result = invoke(app, event);
    let counted = !matches!(result, Err(Error::NotFound(_)));
    let answer = result.unwrap_or_else(|e| Answer::error(&e));
    if counted {
        app.metrics.invoked(
            name.as_str(),
            answer.status,
            started.elapsed().as_secs_f64(),
        );
    }
    if let Some(cause) = &answer.cause {
        log::warn!("{name}: {} {cause}", answer.status);
        app.logs
            .push(name.as_str(), &format!("{} {cause}", answer.status));
    }
    answer
}

fn invoke(app: &App, event: Event) -> Result<Answer> {
    if app.draining() {
        return Err(Error::ShuttingDown);
    }
    let handler = app.store.handler(&event.name)?;
    let mut env = event.env;
    // An event looks like a POST of its body to the function (a queued call keeps its own).
    for (k, v) in [
        ("Http_Method", "POST".to_string()),
        ("Http_Path", "/".to_string()),
        ("Http_Query", String::new()),
        ("Http_ContentLength", event.body.len().to_string()),
    ] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.into(), v));
        }
    }
    env.retain(|(k, v)| !k.contains('\0') && !v.contains('\0'));
    app.invoker.invoke(Call {
        name: &event.name,
        handler: &handler,
        body: event.body,
        env,
        settings: app.store.settings(&event.name),
    })
}
