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
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::error::{Error, Result};
use crate::http::Answer;
use crate::name::FunctionName;
use crate::process::Processes;
use fork::{Forks, StartError};
use reap::{Job, Reaper};
use supervise::{Outcome, Pipes, Stop, supervise};

/// One request as a function sees it.
pub struct Call<'a> {
    pub name: &'a FunctionName,
    pub handler: &'a Path,
    pub body: Vec<u8>,
    /// `Http_*` variables (OpenFaaS classic watchdog names).
    pub env: Vec<(String, String)>,
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
}

/// Starts function processes with fixed limits.
pub struct Invoker {
    settings: Settings,
    procs: Arc<Processes>,
    forks: Arc<Forks>,
    reaper: Reaper,
}

impl Invoker {
    /// Sets up fork mode's base (started now in fork mode), the idle evictor and the reaper.
    pub fn new(settings: Settings, procs: Arc<Processes>) -> std::io::Result<Invoker> {
        let forks = Arc::new(Forks::new(
            settings.python.clone(),
            settings.runner.clone(),
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
            procs,
            forks,
            reaper,
        })
    }

    /// Runs the function once, in a fresh process, and returns its checked answer.
    pub fn invoke(&self, call: Call<'_>) -> Result<Answer> {
        let deadline = Instant::now() + self.settings.timeout;
        let outcome = match self.settings.mode {
            Mode::Exec => self.run_exec(&call, deadline)?,
            Mode::Fork => self.run_fork(&call, deadline)?,
        };
        self.answer(call.name, outcome)
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
    }

    /// Imports `handler` in a throwaway process: `Ok` if it would serve, else
    /// the 422 naming why (the error and its line).
    pub fn check(&self, name: &FunctionName, handler: &Path) -> Result<()> {
        let unprocessable =
            |why: String| Error::Unprocessable(format!("{name}.py cannot serve: {why}"));
        match self.settings.mode {
            Mode::Fork => match self.forks.check(handler) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(unprocessable(why)),
                Err(StartError::Hung) => Err(unprocessable(format!(
                    "importing it did not finish within EDGEFAAS_EXEC_TIMEOUT ({}s)",
                    self.settings.timeout.as_secs_f64()
                ))),
                Err(StartError::Import(why)) => Err(unprocessable(why)),
                Err(StartError::Io(e)) => Err(self.cannot_start(name, e)),
            },
            Mode::Exec => self.check_exec(name, handler).map_err(|e| match e {
                CheckError::Refused(why) => unprocessable(why),
                CheckError::Io(e) => self.cannot_start(name, e),
            }),
        }
    }

    /// The interpreter command for the runner with `args`, with the daemon's
    /// environment minus its secrets.
    fn python(&self, args: &[&std::ffi::OsStr], dir: &Path) -> Command {
        let mut cmd = Command::new(&self.settings.python);
        // -s: no user site-packages (a function's packages come from the image or a
        // venv), which also spares every exec-mode request a directory lookup.
        cmd.arg("-s")
            .arg(&self.settings.runner)
            .args(args)
            .current_dir(dir)
            .env_remove("EDGEFAAS_MGMT_TOKEN")
            .env("PYTHONDONTWRITEBYTECODE", "1");
        cmd
    }

    fn run_exec(&self, call: &Call<'_>, deadline: Instant) -> Result<Outcome> {
        let dir = call.handler.parent().unwrap_or(Path::new("/"));
        let mut cmd = self.python(&[call.handler.as_os_str()], dir);
        cmd.envs(call.env.iter().map(|(k, v)| (k, v)));
        let (pid, pipes) =
            exec::start(&self.procs, cmd).map_err(|e| self.cannot_start(call.name, e))?;
        let outcome = supervise(
            pipes,
            &call.body,
            deadline,
            self.settings.max_output,
            &mut |_| crate::process::kill_group(pid),
        );
        Ok(self.exec_done(pid, outcome, deadline))
    }

    /// Learns an exec-mode child's wait status if it has exited, and hands it to the reaper.
    fn exec_done(&self, pid: u32, mut outcome: Outcome, deadline: Instant) -> Outcome {
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
            Some(pidfd) => self.reaper.watch(Job::Exec { pidfd, pid }, deadline),
            None => {
                self.procs.finish(pid);
            }
        }
        outcome
    }

    fn run_fork(&self, call: &Call<'_>, deadline: Instant) -> Result<Outcome> {
        let env = runner::encode_env(&call.env);
        if env.len() > runner::REQUEST_MAX {
            return Err(Error::BadRequest(
                "the request's headers and target are too large for a function".into(),
            ));
        }
        // A zygote that died before starting the request is replaced, and the request run again once.
        for attempt in 0..2 {
            let zygote = match self.forks.get(call.name, call.handler) {
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
            let fds = [
                theirs[0].as_fd(),
                theirs[1].as_fd(),
                theirs[2].as_fd(),
                theirs[3].as_fd(),
            ];
            match zygote.submit(&env, fds) {
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
            drop(theirs);
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
                };
                self.reaper.watch(job, deadline);
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
    fn answer(&self, name: &FunctionName, outcome: Outcome) -> Result<Answer> {
        let failed = |reason: String| Error::Failed {
            name: name.to_string(),
            reason,
        };
        log_stderr(name, &outcome);
        match outcome.stop {
            Stop::TimedOut => {
                return Err(Error::Timeout {
                    name: name.to_string(),
                    secs: self.settings.timeout.as_secs_f64(),
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
        _name: &FunctionName,
        handler: &Path,
    ) -> std::result::Result<(), CheckError> {
        let dir = handler.parent().unwrap_or(Path::new("/"));
        let cmd = self.python(&["--check".as_ref(), handler.as_os_str()], dir);
        let deadline = Instant::now() + self.settings.timeout;
        match exec::check(&self.procs, cmd, deadline).map_err(CheckError::Io)? {
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
