//! Running one function for one request: the only place that starts Python.
//! Each request gets a fresh process (forked from a warm zygote, or exec'd),
//! fed and drained by one poll loop in the calling thread under a deadline and
//! an output cap; the answer is built, checked, and returned as soon as the
//! output and the result are complete. The child's exit and the kill of its
//! process group are the reaper's, off the request's path.

mod exec;
mod fork;
mod reap;
pub mod runner;
mod supervise;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::error::{Error, Result};
use crate::http::Answer;
use crate::name::FunctionName;
use crate::process::Processes;
use crate::sandbox::{Limits, Sandbox};
use crate::settings::Settings as Own;
use fork::{Envelope, Forks, StartError};
use reap::{Job, Reaper};
use supervise::{Outcome, Pipes, Stop, supervise};

/// One request as a function sees it.
pub struct Call<'a> {
    pub name: &'a FunctionName,
    pub handler: &'a Path,
    pub body: Vec<u8>,
    /// `Http_*` variables (OpenFaaS classic watchdog names).
    pub env: Vec<(String, String)>,
    /// The function's own settings (timeout, memory, env, reuse).
    pub settings: Arc<Own>,
}

/// How each request gets its fresh process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forked from a warm per-function zygote (the default).
    Fork,
    /// A new interpreter exec'd per request, as OpenFaaS's classic watchdog does.
    Exec,
}

/// What the invoker needs to know.
pub struct Settings {
    pub python: String,
    pub runner: PathBuf,
    pub timeout: Duration,
    pub max_output: u64,
    pub mode: Mode,
    pub max_warm: usize,
    pub idle: Duration,
    /// `EDGEFAAS_SECRETS_DIR`: `<dir>/<name>/` holds a function's secrets.
    pub secrets_dir: Option<PathBuf>,
}

/// Starts function processes with fixed limits.
pub struct Invoker {
    settings: Settings,
    /// Each function's recent stderr, for `GET /mgmt/<name>/logs`.
    logs: Arc<crate::logs::Logs>,
    sandbox: Arc<Sandbox>,
    procs: Arc<Processes>,
    forks: Arc<Forks>,
    reaper: Reaper,
    /// Numbers exec-mode invocation folders.
    serial: AtomicU64,
}

impl Invoker {
    /// Sets up fork mode's base (started now in fork mode), the idle evictor and the reaper.
    pub fn new(
        settings: Settings,
        sandbox: Arc<Sandbox>,
        procs: Arc<Processes>,
        logs: Arc<crate::logs::Logs>,
    ) -> std::io::Result<Invoker> {
        private_dir(&sandbox.tmp_root)?;
        let forks = Arc::new(Forks::new(
            settings.python.clone(),
            settings.runner.clone(),
            sandbox.clone(),
            procs.clone(),
            settings.max_warm,
            settings.idle,
            settings.timeout,
        ));
        // Checked a few times per idle period, at least every 5 s.
        let every = (settings.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        Forks::start_evictor(Arc::downgrade(&forks), every)?;
        if settings.mode == Mode::Fork {
            forks.prepare()?;
        }
        let reaper = Reaper::start(procs.clone())?;
        Ok(Invoker {
            settings,
            logs,
            sandbox,
            procs,
            forks,
            reaper,
            serial: AtomicU64::new(0),
        })
    }

    /// The sandbox every function process runs in.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Runs the function once, in a fresh process, and returns its checked answer.
    pub fn invoke(&self, call: Call<'_>) -> Result<Answer> {
        let timeout = call.settings.timeout_or(self.settings.timeout);
        let deadline = Instant::now() + timeout;
        // reuse=true asks for a warm child: fork mode's, whatever the mode.
        let outcome = match self.settings.mode {
            Mode::Exec if !call.settings.reuses() => self.run_exec(&call, deadline)?,
            _ => self.run_fork(&call, deadline)?,
        };
        self.answer(call.name, outcome, timeout)
    }

    /// Forgets the warm state of `name` after it was updated or deleted.
    pub fn forget(&self, name: &FunctionName) {
        self.forks.retire(name);
    }

    /// How many functions are warm.
    pub fn warm(&self) -> usize {
        self.forks.count()
    }

    /// Stops every process of the invoker (shutdown).
    pub fn stop_all(&self) {
        self.forks.stop_all();
        let _ = std::fs::remove_dir_all(&self.sandbox.tmp_root);
    }

    /// What a function's processes start with: the runner's options (its tmp
    /// folder, memory, CPU, reuse, secrets, env) and its Landlock layer, which
    /// reads `dir` (its folder, or the staged folder of an install check).
    fn envelope(&self, name: &FunctionName, dir: &Path, own: &Own) -> std::io::Result<Envelope> {
        let tmp = self.sandbox.tmp_dir(name.as_str());
        private_dir(&tmp)?;
        let mut options = vec![format!("tmp={}", tmp.to_string_lossy())];
        if let Some(m) = own.memory {
            options.push(format!("memory={m}"));
        }
        options.push(format!(
            "cpu={}",
            cpu_seconds(own.timeout_or(self.settings.timeout))
        ));
        if let Some(n) = self.sandbox.child_nproc() {
            options.push(format!("nproc={n}"));
        }
        if own.reuses() {
            options.push("reuse=1".into());
        }
        if let Some(s) = self.secrets(name) {
            options.push(format!("secrets={}", s.to_string_lossy()));
        }
        options.extend(own.env.iter().map(|(k, v)| format!("env={k}={v}")));
        Ok(Envelope {
            options,
            ruleset: self.sandbox.function_ruleset(dir, name.as_str(), &tmp),
        })
    }

    /// The function's secrets folder, if it has one.
    fn secrets(&self, name: &FunctionName) -> Option<PathBuf> {
        let dir = self.settings.secrets_dir.as_ref()?.join(name.as_str());
        dir.is_dir().then_some(dir)
    }

    /// Imports `handler` in a throwaway process: `Ok` if it would serve, else
    /// the 422 naming why (the error and its line).
    pub fn check(&self, name: &FunctionName, handler: &Path, own: &Own) -> Result<()> {
        let unprocessable =
            |why: String| Error::Unprocessable(format!("{name}.py cannot serve: {why}"));
        let dir = handler.parent().unwrap_or(Path::new("/"));
        match self.settings.mode {
            Mode::Fork => match self
                .envelope(name, dir, own)
                .map_err(StartError::Io)
                .and_then(|e| self.forks.check(handler, e))
            {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(unprocessable(why)),
                Err(StartError::Hung) => Err(unprocessable(format!(
                    "importing it did not finish within EDGEFAAS_EXEC_TIMEOUT ({}s)",
                    self.settings.timeout.as_secs_f64()
                ))),
                Err(StartError::Import(why)) => Err(unprocessable(why)),
                Err(StartError::Io(e)) => Err(self.cannot_start(name, e)),
            },
            Mode::Exec => self.check_exec(name, handler, own).map_err(|e| match e {
                CheckError::Refused(why) => unprocessable(why),
                CheckError::Io(e) => self.cannot_start(name, e),
            }),
        }
    }

    /// An exec-mode command: the runner with `args` for function `name`, in its
    /// folder `dir`, with the daemon's environment minus its own settings, the
    /// function's settings, and confined for `tmp`, its invocation's folder.
    fn python(
        &self,
        args: &[&std::ffi::OsStr],
        name: &FunctionName,
        dir: &Path,
        own: &Own,
        tmp: &Path,
    ) -> std::io::Result<Command> {
        // The runner the functions run must be the daemon's, whatever wrote the file.
        runner::ensure(&self.settings.runner)?;
        let mut cmd = runner::command(&self.settings.python, &self.settings.runner);
        if self.sandbox.runner_layers {
            cmd.arg(format!("--layers={}", self.sandbox.landlock));
        }
        cmd.args(args).current_dir(dir).env("TMPDIR", tmp);
        cmd.envs(own.env.iter());
        if let Some(s) = self.secrets(name) {
            cmd.env("Secrets_Dir", s);
        }
        let limits = Limits {
            memory: own.memory,
            cpu: Some(cpu_seconds(own.timeout_or(self.settings.timeout))),
        };
        let ruleset = self.sandbox.function_ruleset(dir, name.as_str(), tmp);
        self.sandbox.confine(&mut cmd, ruleset, limits, true);
        Ok(cmd)
    }

    /// A fresh folder for one exec-mode invocation, removed once it has exited.
    fn exec_tmp(&self, name: &FunctionName) -> std::io::Result<PathBuf> {
        let parent = self.sandbox.tmp_dir(name.as_str());
        private_dir(&parent)?;
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let tmp = parent.join(format!("x{n}"));
        private_dir(&tmp)?;
        Ok(tmp)
    }

    fn run_exec(&self, call: &Call<'_>, deadline: Instant) -> Result<Outcome> {
        let dir = call.handler.parent().unwrap_or(Path::new("/"));
        let tmp = self
            .exec_tmp(call.name)
            .map_err(|e| self.cannot_start(call.name, e))?;
        let started = self
            .python(
                &[call.handler.as_os_str()],
                call.name,
                dir,
                &call.settings,
                &tmp,
            )
            .and_then(|mut cmd| {
                cmd.envs(call.env.iter().map(|(k, v)| (k, v)));
                exec::start(&self.procs, cmd)
            });
        let (pid, pipes) = match started {
            Ok(p) => p,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(self.cannot_start(call.name, e));
            }
        };
        let outcome = supervise(
            pipes,
            &call.body,
            deadline,
            self.settings.max_output,
            &mut |_| crate::process::kill_group(pid),
        );
        Ok(self.exec_done(pid, outcome, deadline, tmp))
    }

    /// Learns an exec-mode child's wait status if it has exited, and hands it
    /// (and its folder) to the reaper.
    fn exec_done(
        &self,
        pid: u32,
        mut outcome: Outcome,
        deadline: Instant,
        tmp: PathBuf,
    ) -> Outcome {
        if outcome.result.is_none() && outcome.stop == Stop::Done {
            // No result: the exit says why (it is imminent once the pipes are closed).
            if let Some(fd) = &outcome.exit_fd {
                if let Ok(Some(status)) = rustix::process::waitid(
                    rustix::process::WaitId::PidFd(fd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
                ) {
                    outcome.exit = wait_status(&status);
                }
            }
        }
        match outcome.exit_fd.take() {
            Some(pidfd) => self.reaper.watch(Job::Exec { pidfd, pid, tmp }, deadline),
            None => {
                self.procs.finish(pid);
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        outcome
    }

    fn run_fork(&self, call: &Call<'_>, deadline: Instant) -> Result<Outcome> {
        // A fresh folder and layer per request; a reused child keeps its own.
        let reuse = call.settings.reuses();
        let tmp = if reuse {
            None
        } else {
            Some(
                self.exec_tmp(call.name)
                    .map_err(|e| self.cannot_start(call.name, e))?,
            )
        };
        let outcome = self.run_fork_in(call, deadline, tmp.as_deref());
        if let (Some(t), Err(_)) = (&tmp, &outcome) {
            let _ = std::fs::remove_dir_all(t);
        }
        outcome
    }

    fn run_fork_in(
        &self,
        call: &Call<'_>,
        deadline: Instant,
        tmp: Option<&Path>,
    ) -> Result<Outcome> {
        let mut env = call.env.clone();
        if let Some(t) = tmp {
            env.push(("TMPDIR".into(), t.to_string_lossy().into_owned()));
        }
        let env = runner::encode_env(&env);
        if env.len() > runner::REQUEST_MAX {
            return Err(Error::BadRequest(
                "the request's headers and target are too large for a function".into(),
            ));
        }
        // A zygote that died before starting the request is replaced, and the request run again once.
        for attempt in 0..2 {
            let dir = call.handler.parent().unwrap_or(Path::new("/"));
            let envelope = || self.envelope(call.name, dir, &call.settings);
            let zygote = match self.forks.get(call.name, call.handler, envelope) {
                Ok(z) => z,
                Err(StartError::Import(why)) => {
                    return Err(Error::Failed {
                        name: call.name.to_string(),
                        reason: why,
                    });
                }
                Err(StartError::Hung) => {
                    return Err(Error::Timeout {
                        name: call.name.to_string(),
                        secs: self.settings.timeout.as_secs_f64(),
                    });
                }
                Err(StartError::Io(e)) => return Err(self.cannot_start(call.name, e)),
            };
            let (pipes, theirs) = pipes().map_err(|e| self.cannot_start(call.name, e))?;
            let dir = call.handler.parent().unwrap_or(Path::new("/"));
            let layer = tmp.and_then(|t| self.sandbox.child_ruleset(dir, call.name.as_str(), t));
            let fds: Vec<_> = theirs
                .iter()
                .map(AsFd::as_fd)
                .chain(layer.as_ref().map(AsFd::as_fd))
                .collect();
            match zygote.submit(&env, &fds) {
                Ok(()) => {}
                Err((true, _)) if attempt == 0 => {
                    self.forks.retire_this(&zygote);
                    continue;
                }
                Err((_, e)) => {
                    self.forks.retire_this(&zygote);
                    return Err(self.cannot_start(call.name, e));
                }
            }
            // The child holds its ends now; ours must close so EOF can arrive.
            drop(fds);
            drop(theirs);
            drop(layer);
            let zpid = zygote.pid;
            let outcome = supervise(
                pipes,
                &call.body,
                deadline,
                self.settings.max_output,
                &mut |pid| reap::kill_fork_child(pid, zpid),
            );
            if outcome.never_started() && attempt == 0 {
                info!(
                    "the zygote of {} lost a request before starting it; retrying",
                    call.name
                );
                self.forks.retire_this(&zygote);
                continue;
            }
            let mut outcome = outcome;
            if let Some(status) = outcome.status.take() {
                let job = Job::Fork {
                    status,
                    pgid: outcome.pid,
                    zygote: zpid,
                    tmp: tmp.map(Path::to_path_buf),
                };
                self.reaper.watch(job, deadline);
            } else if let Some(t) = tmp {
                let _ = std::fs::remove_dir_all(t);
            }
            if outcome.pid.is_none() && outcome.stop != Stop::Done {
                // Killed before it ever started: the zygote hung, and is gone now.
                self.forks.retire_this(&zygote);
            }
            return Ok(outcome);
        }
        Err(Error::Failed {
            name: call.name.to_string(),
            reason: "its zygote exited before starting it, twice".into(),
        })
    }

    /// Out of processes, descriptors or memory is the daemon's trouble (503);
    /// anything else is the function's (500).
    fn cannot_start(&self, name: &FunctionName, e: std::io::Error) -> Error {
        match e.raw_os_error() {
            Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
                Error::Unavailable(format!("cannot start {}: {e}", self.settings.python))
            }
            _ => Error::Failed {
                name: name.to_string(),
                reason: format!("cannot start {}: {e}", self.settings.python),
            },
        }
    }

    /// Builds the answer from what the child produced.
    fn answer(&self, name: &FunctionName, outcome: Outcome, timeout: Duration) -> Result<Answer> {
        let failed = |reason: String| Error::Failed {
            name: name.to_string(),
            reason,
        };
        log_stderr(name, &outcome);
        if !outcome.stderr.is_empty() {
            self.logs
                .push(name.as_str(), &String::from_utf8_lossy(&outcome.stderr));
        }
        match outcome.stop {
            Stop::TimedOut => {
                return Err(Error::Timeout {
                    name: name.to_string(),
                    secs: timeout.as_secs_f64(),
                });
            }
            Stop::Overflow => {
                return Err(failed(format!(
                    "output exceeded EDGEFAAS_MAX_OUTPUT ({} bytes)",
                    self.settings.max_output
                )));
            }
            Stop::Done => {}
        }
        match outcome.result {
            Some(Ok(json)) => {
                let checked = runner::check(&json, outcome.stdout.len()).map_err(failed)?;
                let mut headers = checked.headers;
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
                }
                Ok(Answer {
                    status: checked.status,
                    headers,
                    body: outcome.stdout,
                    cause: None,
                })
            }
            Some(Err(code)) => Err(failed(
                last_line(&outcome.stderr).unwrap_or_else(|| format!("exited with status {code}")),
            )),
            None => Err(failed(last_line(&outcome.stderr).unwrap_or_else(
                || match outcome.exit {
                    Some(ws) => describe_wait(ws),
                    None => "it ended without a result".into(),
                },
            ))),
        }
    }
}

/// Makes the four pipes of a fork-mode request: ours (stdin's write end, the
/// read ends of stdout, stderr and status) and the child's.
fn pipes() -> std::io::Result<(Pipes, [OwnedFd; 4])> {
    use rustix::pipe::{PipeFlags, pipe_with};
    let (in_r, in_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (out_r, out_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (err_r, err_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (st_r, st_w) = pipe_with(PipeFlags::CLOEXEC)?;
    Ok((
        Pipes {
            stdin: in_w,
            stdout: out_r,
            stderr: err_r,
            status: st_r,
            exit: None,
        },
        [in_r, out_w, err_w, st_w],
    ))
}

/// The raw wait status of a waitid result, as waitpid would give it.
fn wait_status(s: &rustix::process::WaitIdStatus) -> Option<i32> {
    if let Some(code) = s.exit_status() {
        Some((code & 0xff) << 8)
    } else {
        s.terminating_signal().map(|sig| sig & 0x7f)
    }
}

/// "exited with status 3", "killed by signal 9".
fn describe_wait(ws: i32) -> String {
    if ws & 0x7f == 0 {
        format!("exited with status {}", (ws >> 8) & 0xff)
    } else {
        format!("killed by signal {}", ws & 0x7f)
    }
}

/// The last non-empty line of stderr (the exception), at most 300 characters.
fn last_line(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(300).collect())
}

fn log_stderr(name: &FunctionName, outcome: &Outcome) {
    if outcome.stderr.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(&outcome.stderr);
    if matches!(outcome.result, Some(Ok(_))) {
        info!("function {name} stderr: {}", text.trim_end());
    } else {
        warn!("function {name} failed, stderr:\n{}", text.trim_end());
    }
}

/// Why an exec-mode import check did not pass.
enum CheckError {
    Refused(String),
    Io(std::io::Error),
}

impl Invoker {
    /// Exec mode's import check: the runner with `--check`, its verdict on fd 3.
    fn check_exec(
        &self,
        name: &FunctionName,
        handler: &Path,
        own: &Own,
    ) -> std::result::Result<(), CheckError> {
        let dir = handler.parent().unwrap_or(Path::new("/"));
        let tmp = self.exec_tmp(name).map_err(CheckError::Io)?;
        let checked = self
            .python(
                &["--check".as_ref(), handler.as_os_str()],
                name,
                dir,
                own,
                &tmp,
            )
            .and_then(|cmd| exec::check(&self.procs, cmd, Instant::now() + self.settings.timeout));
        let _ = std::fs::remove_dir_all(&tmp);
        match checked.map_err(CheckError::Io)? {
            Some(v) if v == "ok" => Ok(()),
            Some(v) => Err(CheckError::Refused(
                v.strip_prefix("fail ")
                    .unwrap_or("the import check ended without a result")
                    .to_string(),
            )),
            None => Err(CheckError::Refused(format!(
                "importing it did not finish within EDGEFAAS_EXEC_TIMEOUT ({}s)",
                self.settings.timeout.as_secs_f64()
            ))),
        }
    }
}

/// Creates `dir` (and its parents) readable by the daemon's user alone.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// RLIMIT_CPU for a timeout: whole seconds, one more than the timeout (the
/// deadline kills first; the limit catches a child that outlives its kill).
fn cpu_seconds(timeout: Duration) -> u64 {
    timeout.as_secs_f64().ceil() as u64 + 1
}
