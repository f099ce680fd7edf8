//! Running one function for one request: the only place that starts Python.
//! The request body goes to stdin, the response comes from stdout, under a
//! deadline that kills the whole process group, with output capped.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::process::Processes;
use crate::store::FunctionName;
use crate::zygote::{SubmitError, Zygote, Zygotes};

/// Marks the runner's status-and-headers line at the end of stderr.
const META_MARK: &[u8] = b"\0EDGEFAAS-META ";
/// How much of stderr is kept (the tail: the exception is at the end).
const STDERR_KEEP: usize = 64 * 1024;
/// Bodies up to this size fit an empty pipe (one page, even at the lowest pipe quota).
const SMALL_BODY: usize = 4096;
/// How long to wait for pipes to close once the group is dead.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// One request as a function sees it.
pub struct Call<'a> {
    pub name: &'a FunctionName,
    pub handler: &'a Path,
    pub body: Vec<u8>,
    /// `Http_*` variables (OpenFaaS classic watchdog names).
    pub env: Vec<(String, String)>,
}

/// What a function answered.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The status and headers a handler returned in a dict.
#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "statusCode", default = "ok")]
    status: i64,
    #[serde(default)]
    headers: Vec<(String, String)>,
}

fn ok() -> i64 {
    200
}

/// How each request gets its fresh process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forked from a warm per-function zygote (the default).
    Fork,
    /// A new interpreter exec'd per request, as OpenFaaS's classic watchdog does.
    Exec,
}

/// Starts function processes with fixed limits.
pub struct Invoker {
    pub python: String,
    pub runner: PathBuf,
    pub timeout: Duration,
    pub max_output: u64,
    pub mode: Mode,
    pub procs: Arc<Processes>,
    pub zygotes: Arc<Zygotes>,
}

/// What the pumps, the waiter and a zygote tell an invocation.
pub enum Event {
    Out(Vec<u8>),
    Err(Vec<u8>),
    OutClosed,
    ErrClosed,
    /// Fork mode: the child runs, in process group `pid`.
    Started(u32),
    /// The process exited; fork mode knows the status now, exec mode when it reaps.
    Exited(Option<ExitStatus>),
    /// Fork mode: the zygote died.
    Lost,
}

/// The process running one request.
enum Running {
    Exec(Child),
    Fork {
        zygote: Arc<Zygote>,
        id: u64,
        pid: Option<u32>,
    },
}

impl Running {
    /// Kills the request's whole process group (or a zygote that never started it).
    fn kill(&self, procs: &Processes) {
        match self {
            Running::Exec(child) => procs.kill(child.id()),
            Running::Fork { pid: Some(pid), .. } => procs.kill(*pid),
            Running::Fork {
                zygote, pid: None, ..
            } => zygote.abort(),
        }
    }
}

impl Invoker {
    /// Runs the function once, in a fresh process, and returns its reply.
    pub fn invoke(&self, mut call: Call<'_>) -> Result<Reply> {
        // Moved, not copied: a retry shares the same bytes.
        let body = Arc::new(std::mem::take(&mut call.body));
        // A zygote that died before starting the request is replaced, and the request retried once.
        for _ in 0..2 {
            if let Some(reply) = self.attempt(&call, body.clone())? {
                return Ok(reply);
            }
            self.zygotes.retire(call.name);
        }
        Err(Error::Failed {
            name: call.name.to_string(),
            reason: "its zygote exited before starting it, twice".into(),
        })
    }

    /// The interpreter command for `handler` (as a zygote or for one request), with the
    /// daemon's environment minus its secrets.
    pub fn python_command(&self, handler: &Path, zygote: bool) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.runner);
        if zygote {
            cmd.arg("--zygote");
        }
        cmd.arg(handler)
            .current_dir(handler.parent().unwrap_or(Path::new("/")))
            .env_remove("EDGEFAAS_MGMT_TOKEN")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        cmd
    }

    /// Forgets the warm state of `name` after it was updated or deleted.
    pub fn forget(&self, name: &FunctionName) {
        self.zygotes.retire(name);
    }

    /// Starts the process for one request, feeding and draining it through `tx`.
    /// `None`: the zygote is gone and a new one should be tried.
    fn start(
        &self,
        call: &Call<'_>,
        body: Arc<Vec<u8>>,
        tx: &Sender<Event>,
    ) -> Result<Option<Running>> {
        let cannot = |e: std::io::Error| match e.raw_os_error() {
            // Out of processes, descriptors or memory: the daemon's trouble, not the function's.
            Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
                Error::Unavailable(format!("cannot start {}: {e}", self.python))
            }
            _ => Error::Failed {
                name: call.name.to_string(),
                reason: format!("cannot start {}: {e}", self.python),
            },
        };
        match self.mode {
            Mode::Exec => {
                let mut cmd = self.python_command(call.handler, false);
                cmd.envs(call.env.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = self.procs.spawn(&mut cmd).map_err(cannot)?;
                if let Some(stdin) = child.stdin.take() {
                    feed(stdin, body);
                }
                if let Some(out) = child.stdout.take() {
                    pump(out, tx.clone(), Event::Out, Event::OutClosed);
                }
                if let Some(err) = child.stderr.take() {
                    pump(err, tx.clone(), Event::Err, Event::ErrClosed);
                }
                let (pid, tx) = (child.id(), tx.clone());
                spawn_io(move || {
                    if let Err(e) = crate::sys::wait_exited_unreaped(pid) {
                        warn!("waiting for process {pid}: {e}");
                    }
                    let _ = tx.send(Event::Exited(None));
                });
                Ok(Some(Running::Exec(child)))
            }
            Mode::Fork => {
                let zygote = self
                    .zygotes
                    .get(call.name, || self.python_command(call.handler, true))
                    .map_err(cannot)?;
                let (in_r, in_w) = std::io::pipe().map_err(cannot)?;
                let (out_r, out_w) = std::io::pipe().map_err(cannot)?;
                let (err_r, err_w) = std::io::pipe().map_err(cannot)?;
                let id = match zygote.submit(
                    &call.env,
                    [in_r.as_fd(), out_w.as_fd(), err_w.as_fd()],
                    tx.clone(),
                ) {
                    Ok(id) => id,
                    Err(SubmitError::Lost) => return Ok(None),
                    Err(SubmitError::Io(e)) => return Err(cannot(e)),
                };
                // The child holds its ends now; ours must close so EOF can arrive.
                drop((in_r, out_w, err_w));
                feed(in_w, body);
                pump(out_r, tx.clone(), Event::Out, Event::OutClosed);
                pump(err_r, tx.clone(), Event::Err, Event::ErrClosed);
                Ok(Some(Running::Fork {
                    zygote,
                    id,
                    pid: None,
                }))
            }
        }
    }

    /// One try at running the request; `None` when its zygote died before starting it.
    fn attempt(&self, call: &Call<'_>, body: Arc<Vec<u8>>) -> Result<Option<Reply>> {
        let (tx, rx) = mpsc::channel();
        let Some(mut running) = self.start(call, body, &tx)? else {
            return Ok(None);
        };
        drop(tx);
        let deadline = Instant::now() + self.timeout;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut exited, mut out_open, mut err_open) = (false, true, true);
        let mut status: Option<ExitStatus> = None;
        let mut failure: Option<Error> = None;
        let mut lost = false;
        while !exited || out_open || err_open {
            let limit = if exited {
                Instant::now() + DRAIN_WAIT
            } else {
                deadline
            };
            let event = match rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) if !exited && failure.is_none() => {
                    failure = Some(Error::Timeout {
                        name: call.name.to_string(),
                        secs: self.timeout.as_secs_f64(),
                    });
                    running.kill(&self.procs);
                    continue;
                }
                // Pipes held open by a process that left the group (the sweeper kills
                // it), or a killed request whose zygote does not answer: stop waiting.
                Err(_) => break,
            };
            match event {
                Event::Out(chunk) => {
                    out.extend_from_slice(&chunk);
                    if out.len() as u64 > self.max_output && failure.is_none() {
                        failure = Some(Error::Failed {
                            name: call.name.to_string(),
                            reason: format!(
                                "output exceeded EDGEFAAS_MAX_OUTPUT ({} bytes)",
                                self.max_output
                            ),
                        });
                        running.kill(&self.procs);
                    }
                    if failure.is_some() {
                        out.clear();
                    }
                }
                Event::Err(chunk) => {
                    err.extend_from_slice(&chunk);
                    if err.len() > 2 * STDERR_KEEP {
                        err.drain(..err.len() - STDERR_KEEP);
                    }
                }
                Event::OutClosed => out_open = false,
                Event::ErrClosed => err_open = false,
                Event::Started(pid) => {
                    if let Running::Fork { pid: slot, .. } = &mut running {
                        *slot = Some(pid);
                    }
                    // Killed while it was being forked: kill the child now that it has a group.
                    if failure.is_some() {
                        running.kill(&self.procs);
                    }
                }
                Event::Exited(s) => {
                    exited = true;
                    status = s;
                    if let Running::Exec(child) = &running {
                        // Anything the handler left running dies with it (the zygote does this itself).
                        self.procs.kill(child.id());
                    }
                }
                Event::Lost => {
                    exited = true;
                    lost = true;
                }
            }
        }
        let status = match running {
            Running::Exec(child) => Some(self.procs.finish(child)?),
            Running::Fork { zygote, id, pid } => {
                zygote.forget(id);
                match pid {
                    Some(pid) => zygote.finished(pid),
                    // Never started: safe to run again in a new zygote.
                    None if lost && failure.is_none() => return Ok(None),
                    None => {}
                }
                status
            }
        };
        let (meta, log) = split_meta(&err);
        if let Some(status) = &status {
            log_stderr(call.name, status, log);
        }
        if let Some(failure) = failure {
            return Err(failure);
        }
        match status {
            Some(s) if s.success() => reply(call.name, meta, out).map(Some),
            Some(s) => Err(Error::Failed {
                name: call.name.to_string(),
                reason: exit_reason(&s, log),
            }),
            None => Err(Error::Failed {
                name: call.name.to_string(),
                reason: "its zygote exited while it ran".into(),
            }),
        }
    }
}

/// Builds the reply from the handler's output and optional dict metadata.
fn reply(name: &FunctionName, meta: Option<&[u8]>, body: Vec<u8>) -> Result<Reply> {
    let Some(meta) = meta else {
        return Ok(Reply {
            status: 200,
            headers: Vec::new(),
            body,
        });
    };
    let bad = |why: String| Error::Failed {
        name: name.to_string(),
        reason: why,
    };
    let meta: Meta =
        serde_json::from_slice(meta).map_err(|e| bad(format!("bad response dict: {e}")))?;
    let status = u16::try_from(meta.status)
        .ok()
        .filter(|s| (100..=599).contains(s));
    let status =
        status.ok_or_else(|| bad("statusCode must be an integer from 100 to 599".into()))?;
    Ok(Reply {
        status,
        headers: meta.headers,
        body,
    })
}

/// Splits the runner's metadata line off the end of stderr.
fn split_meta(err: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let Some(at) = err.windows(META_MARK.len()).rposition(|w| w == META_MARK) else {
        return (None, err);
    };
    let line = &err[at + META_MARK.len()..];
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let before = &err[..at];
    (Some(line), before.strip_suffix(b"\n").unwrap_or(before))
}

/// The one-line reason a run failed: the last line of stderr, else the exit status.
fn exit_reason(status: &ExitStatus, stderr: &[u8]) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = String::from_utf8_lossy(stderr);
    if let Some(line) = text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        return line.chars().take(300).collect();
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => "exited abnormally".into(),
    }
}

fn log_stderr(name: &FunctionName, status: &ExitStatus, stderr: &[u8]) {
    if stderr.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(stderr);
    if status.success() {
        info!("function {name} stderr: {}", text.trim_end());
    } else {
        warn!(
            "function {name} failed ({status}), stderr:\n{}",
            text.trim_end()
        );
    }
}

/// Forwards everything read from `pipe` as events, then a closing event.
fn pump<R: Read + Send + 'static>(
    mut pipe: R,
    tx: Sender<Event>,
    data: fn(Vec<u8>) -> Event,
    closed: Event,
) {
    spawn_io(move || {
        // On the stack: a 64 KiB heap buffer per pump fragmented musl's allocator.
        let mut buf = [0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(data(buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.send(closed);
    });
}

/// Writes the request body to the child's stdin, then closes it.
fn feed<W: Write + Send + 'static>(mut stdin: W, body: Arc<Vec<u8>>) {
    // A handler that never reads stdin gets EPIPE here; that is its business.
    if body.len() <= SMALL_BODY {
        // An empty pipe holds at least one page, so this cannot block: no thread needed.
        let _ = stdin.write_all(&body);
    } else {
        spawn_io(move || drop(stdin.write_all(&body)));
    }
}

/// Runs one blocking piece of an invocation's I/O on the I/O pool.
fn spawn_io(f: impl FnOnce() + Send + 'static) {
    crate::iopool::run(f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_line_is_split_off_stderr() {
        let err = b"warning: x\n\0EDGEFAAS-META {\"statusCode\":201}\n";
        let (meta, log) = split_meta(err);
        assert_eq!(meta, Some(&b"{\"statusCode\":201}"[..]));
        assert_eq!(log, b"warning: x");
        assert_eq!(split_meta(b"plain"), (None, &b"plain"[..]));
    }

    #[test]
    fn reason_is_the_last_stderr_line() {
        use std::os::unix::process::ExitStatusExt;
        let st = ExitStatus::from_raw(256);
        assert_eq!(
            exit_reason(&st, b"Traceback\n  x\nValueError: bad\n\n"),
            "ValueError: bad"
        );
        assert_eq!(exit_reason(&st, b""), "exited with status 1");
        assert_eq!(
            exit_reason(&ExitStatus::from_raw(9), b""),
            "killed by signal 9"
        );
    }
}
