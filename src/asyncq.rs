//! Async calls: `POST /async/<name>` (and OpenFaaS's `/async-function/<name>`)
//! answers 202 with `X-Call-Id` at once; the call is written to a bounded queue
//! on disk (`<functions dir>/.queue`, one file per call, written like the store
//! writes: a temp file, fsync, rename, fsync of the folder), run when a slot is
//! free, and its result POSTed to `X-Callback-Url` if given. A call's file goes
//! only once it is done (and its callback tried), so a SIGKILL leaves every
//! accepted call queued or done; one cut off mid-run runs again (at least once).

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::admission::Refused;
use crate::app::App;
use crate::error::{Error, Result};
use crate::events::{self, Event};
use crate::http::Answer;
use crate::name::FunctionName;

/// Callback attempts (1 s, then 2 s, then 4 s apart).
const CALLBACK_TRIES: u32 = 4;
/// Threads that make callbacks: a callback URL that never answers holds one
/// of them (for at most its tries), never a run slot or the dispatcher.
const CALLBACK_THREADS: usize = 4;
/// A result waiting for its callback stays in memory up to this size; a
/// bigger one waits in a file next to its call (so waiting callbacks cost
/// at most the queue's length times this, never a hold on other calls).
const IN_MEMORY_RESULT: usize = 64 * 1024;
/// Bytes of results waiting for callbacks (in memory and in files), counting
/// the output limit for each such call running: calls with a callback start
/// only within it (the others go past them). Anyone who may invoke could
/// otherwise fill the disk, or memory, with results for URLs that never answer.
const HELD_RESULTS: usize = 64 << 20;
/// A call the invocation lane had no room for waits this long before it is offered again.
const BUSY_RETRY: Duration = Duration::from_millis(200);

/// A queued call's header line (the body follows it in the file).
#[derive(Serialize, Deserialize)]
struct Header {
    id: String,
    name: String,
    callback: Option<String>,
    env: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    /// Calls waiting to run, oldest first.
    pending: VecDeque<PathBuf>,
    /// Calls running.
    running: usize,
    /// Calls that ran, waiting for a callback thread, oldest first.
    callbacks: VecDeque<(PathBuf, Header, HeldResult)>,
    /// Calls in `callbacks` or being called back.
    calling: usize,
    /// Bytes of their results.
    held: usize,
    /// Calls with a callback running (each may add up to `EDGEFAAS_MAX_OUTPUT` to `held`).
    running_cb: usize,
    /// The lane was full: nothing is dispatched before this.
    hold_until: Option<Instant>,
    stopped: bool,
}

/// The queue and its threads: the dispatcher, the finisher (each call's end),
/// and the callback threads.
pub struct AsyncQueue {
    dir: PathBuf,
    max_calls: usize,
    max_running: usize,
    state: Mutex<State>,
    wake: Condvar,
    serial: AtomicU64,
    agent: ureq::Agent,
}

impl AsyncQueue {
    /// Opens (or makes) the queue folder, drops half-written calls, queues the rest in order.
    pub fn open(
        functions_dir: &Path,
        max_calls: usize,
        max_running: usize,
        timeout: Duration,
    ) -> std::io::Result<AsyncQueue> {
        let dir = functions_dir.join(".queue");
        fs::create_dir_all(&dir)?;
        let mut calls = Vec::new();
        for e in fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".call") {
                calls.push(name);
            } else {
                // A temp file of a call that was never accepted (its 202 was never sent).
                let _ = fs::remove_file(e.path());
            }
        }
        calls.sort();
        let serial = calls
            .last()
            .and_then(|n| n.split('-').next()?.parse::<u64>().ok())
            .map_or(0, |n| n + 1);
        if !calls.is_empty() {
            info!("{} async calls queued from before the restart", calls.len());
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("edgefaas/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(AsyncQueue {
            state: Mutex::new(State {
                pending: calls.into_iter().map(|n| dir.join(n)).collect(),
                ..State::default()
            }),
            dir,
            max_calls,
            max_running: max_running.max(1),
            wake: Condvar::new(),
            serial: AtomicU64::new(serial),
            agent,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls on disk: queued, running or calling back.
    pub fn depth(&self) -> usize {
        let s = self.lock();
        s.pending.len() + s.running + s.calling
    }

    /// Writes a call to the queue; its id. A full queue is 429; a bad callback URL 400.
    pub fn accept(
        &self,
        name: &FunctionName,
        body: &[u8],
        env: Vec<(String, String)>,
        callback: Option<String>,
    ) -> Result<String> {
        if let Some(url) = &callback {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<ureq::http::Uri>().is_ok()
                && !url.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(Error::BadRequest(format!(
                    "X-Callback-Url must be an http or https URL, got {:?}",
                    url.chars().take(200).collect::<String>()
                )));
            }
        }
        if self.depth() >= self.max_calls {
            return Err(Error::QueueFull(self.max_calls));
        }
        let id = call_id();
        let header = Header {
            id: id.clone(),
            name: name.to_string(),
            callback,
            env,
        };
        let mut bytes = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        bytes.extend_from_slice(body);
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        // `.cb.call`: the dispatcher can tell calls with a callback by name.
        let cb = if header.callback.is_some() { ".cb" } else { "" };
        let path = self.dir.join(format!("{serial:020}-{id}{cb}.call"));
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let written = (|| -> std::io::Result<()> {
            // Private: the file holds the request's headers and the callback URL.
            let mut f = crate::mqtt::private_file(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.lock().pending.push_back(path);
        self.wake.notify_all();
        Ok(id)
    }

    /// Stops starting calls (shutdown); the queued ones stay on disk for the next start.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.wake.notify_all();
    }

    /// Starts the dispatcher, the finisher and the callback threads.
    pub fn start(app: &Arc<App>) -> std::io::Result<()> {
        let (done_tx, done_rx) =
            mpsc::channel::<(PathBuf, Header, std::result::Result<Answer, Refused>)>();
        let dispatch_app = app.clone();
        std::thread::Builder::new()
            .name("async-dispatch".into())
            .spawn(move || dispatch(&dispatch_app, &done_tx))?;
        let finish_app = app.clone();
        std::thread::Builder::new()
            .name("async-finish".into())
            .spawn(move || {
                for (path, header, result) in done_rx {
                    finish(&finish_app, path, header, result);
                }
            })?;
        for _ in 0..CALLBACK_THREADS {
            let app = app.clone();
            std::thread::Builder::new()
                .name("async-callback".into())
                .spawn(move || call_back(&app))?;
        }
        Ok(())
    }
}

/// Takes the oldest call when fewer than `max_running` run, and submits it.
fn dispatch(
    app: &Arc<App>,
    done: &mpsc::Sender<(PathBuf, Header, std::result::Result<Answer, Refused>)>,
) {
    let q = &app.asyncq;
    let max_output = usize::try_from(app.config.max_output).unwrap_or(usize::MAX);
    loop {
        let path = {
            let mut s = q.lock();
            loop {
                if s.stopped {
                    return;
                }
                let held = s.hold_until.filter(|t| *t > Instant::now());
                if held.is_none() && s.running < q.max_running {
                    // A call with a callback starts only if its result (at most the
                    // output limit) fits what may wait for callbacks; others go past it.
                    // (One such call may always run, whatever the output limit.)
                    let room = s.held + (s.running_cb + 1) * max_output <= HELD_RESULTS
                        || (s.held == 0 && s.running_cb == 0);
                    let next = if room {
                        (!s.pending.is_empty()).then_some(0)
                    } else {
                        s.pending.iter().position(|p| !has_callback(p))
                    };
                    if let Some(p) = next.and_then(|i| s.pending.remove(i)) {
                        s.running += 1;
                        if has_callback(&p) {
                            s.running_cb += 1;
                        }
                        break p;
                    }
                }
                s = match held {
                    Some(t) => {
                        let left = t.saturating_duration_since(Instant::now());
                        q.wake
                            .wait_timeout(s, left)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => q.wake.wait(s).unwrap_or_else(|p| p.into_inner()),
                };
            }
        };
        let read = fs::read(&path).ok().and_then(|bytes| {
            let nl = bytes.iter().position(|&b| b == b'\n')?;
            let header: Header = serde_json::from_slice(&bytes[..nl]).ok()?;
            Some((header, bytes[nl + 1..].to_vec()))
        });
        let Some((header, body)) = read else {
            warn!("dropping an unreadable async call {}", path.display());
            let _ = fs::remove_file(&path);
            q.lock().running -= 1;
            continue;
        };
        let name = match FunctionName::parse(&header.name) {
            Ok(n) => n,
            Err(_) => {
                let _ = fs::remove_file(&path);
                q.lock().running -= 1;
                continue;
            }
        };
        let event = Event {
            name,
            body,
            env: header.env.clone(),
        };
        let done = done.clone();
        events::submit(
            app,
            event,
            Box::new(move |result| {
                let _ = done.send((path, header, result));
            }),
        );
    }
}

/// A call's run ended: its slot is free at once; its file goes now, or after
/// its callback (on a callback thread).
fn finish(
    app: &Arc<App>,
    path: PathBuf,
    header: Header,
    result: std::result::Result<Answer, Refused>,
) {
    let q = &app.asyncq;
    // A result for a callback is put aside (a file for a big one) before the lock.
    let result = match result {
        Ok(answer) => {
            app.metrics.async_done(&header.name, answer.status);
            if header.callback.is_some() {
                Ok(Some(HeldResult::keep(&path, answer)))
            } else {
                let _ = fs::remove_file(&path);
                Ok(None)
            }
        }
        Err(why) => Err(why),
    };
    let mut s = q.lock();
    s.running -= 1;
    if has_callback(&path) {
        s.running_cb -= 1;
    }
    match result {
        // Stays on disk: the next start runs it.
        Err(Refused::ShuttingDown) => {}
        // No slot for now (the invocation queue was full): offered again shortly.
        Err(Refused::Full | Refused::TimedOut) => {
            s.pending.push_front(path);
            s.hold_until = Some(Instant::now() + BUSY_RETRY);
        }
        Ok(Some(result)) => {
            s.calling += 1;
            s.held += result.size();
            s.callbacks.push_back((path, header, result));
        }
        Ok(None) => {}
    }
    drop(s);
    q.wake.notify_all();
}

/// Whether a queued call has a callback URL (its file is named `*.cb.call`).
fn has_callback(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".cb.call"))
}

/// A result waiting for its callback: in memory, or in a file (bigger ones).
enum HeldResult {
    Memory(Answer),
    /// The file, the answer without its body, and the body's size.
    File(PathBuf, Answer, usize),
}

impl HeldResult {
    fn keep(call: &Path, mut answer: Answer) -> HeldResult {
        if answer.body.len() <= IN_MEMORY_RESULT {
            return HeldResult::Memory(answer);
        }
        // `<serial>-<id>.result`: not a `.call`, so a restart removes it (and
        // runs the call again, as for any call not called back).
        let file = call.with_extension("result");
        let written = crate::mqtt::private_file(&file).and_then(|mut f| f.write_all(&answer.body));
        match written {
            Ok(()) => {
                let size = std::mem::take(&mut answer.body).len();
                HeldResult::File(file, answer, size)
            }
            Err(e) => {
                warn!(
                    "cannot keep an async result in {}: {e}; keeping it in memory",
                    file.display()
                );
                let _ = fs::remove_file(&file);
                HeldResult::Memory(answer)
            }
        }
    }

    /// The body's size.
    fn size(&self) -> usize {
        match self {
            HeldResult::Memory(a) => a.body.len(),
            HeldResult::File(_, _, n) => *n,
        }
    }

    /// The whole answer (None if its file went), and the file to remove after.
    fn into_answer(self) -> (Option<Answer>, Option<PathBuf>) {
        match self {
            HeldResult::Memory(a) => (Some(a), None),
            HeldResult::File(file, mut a, _) => {
                let body = fs::read(&file).ok();
                let answer = body.map(|b| {
                    a.body = b;
                    a
                });
                (answer, Some(file))
            }
        }
    }
}

/// A callback thread: POSTs each result to its callback URL (retried with
/// backoff), then removes the call's file.
fn call_back(app: &Arc<App>) {
    let q = &app.asyncq;
    loop {
        let (path, header, result) = {
            let mut s = q.lock();
            loop {
                if s.stopped {
                    // What was not called back stays on disk and runs again next start.
                    return;
                }
                if let Some(c) = s.callbacks.pop_front() {
                    break c;
                }
                s = q.wake.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let size = result.size();
        let (answer, file) = result.into_answer();
        if let Some(url) = &header.callback {
            match answer {
                Some(answer) => post_result(app, url, &header, &answer),
                None => warn!(
                    "async call {}: its result file is gone; no callback",
                    header.id
                ),
            }
        }
        if let Some(file) = file {
            let _ = fs::remove_file(file);
        }
        let _ = fs::remove_file(&path);
        {
            let mut s = q.lock();
            s.calling -= 1;
            s.held -= size;
        }
        q.wake.notify_all();
    }
}

fn post_result(app: &App, url: &str, header: &Header, answer: &Answer) {
    let q = &app.asyncq;
    // Logged as scheme://host:port: webhook URLs carry their secret in the path or query.
    let shown = origin(url);
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=CALLBACK_TRIES {
        let started = Instant::now();
        let content_type = answer
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map_or("text/plain; charset=utf-8", |(_, v)| v.as_str());
        let sent = q
            .agent
            .post(url)
            .header("X-Call-Id", &header.id)
            .header("X-Function-Status", answer.status.to_string())
            .header("X-Function-Name", &header.name)
            .header("Content-Type", content_type)
            .send(&answer.body[..]);
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => warn!(
                "callback for async call {} to {shown}: HTTP {} (attempt {attempt})",
                header.id,
                r.status().as_u16()
            ),
            Err(e) => warn!(
                "callback for async call {} to {shown}: {} (attempt {attempt})",
                header.id,
                e.to_string().replace(url, &shown)
            ),
        }
        if attempt == CALLBACK_TRIES {
            app.metrics.callback_failed();
            return;
        }
        std::thread::sleep(delay.saturating_sub(started.elapsed().min(delay)));
        delay *= 2;
    }
}

/// `scheme://host:port` of a URL, for logs.
fn origin(url: &str) -> String {
    match url.parse::<ureq::http::Uri>() {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme_str().unwrap_or("http"),
            u.host().unwrap_or("?"),
            u.port_u16().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "(a callback URL)".into(),
    }
}

/// 16 random hex digits.
fn call_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        bytes = (t ^ u64::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
