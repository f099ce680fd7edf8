//! Fork mode: a zygote tree. One base process holds the interpreter and the
//! runner; it forks a zygote per function, which imports the handler once and
//! keeps a spare child forked and waiting, so a request costs neither an
//! interpreter start nor a fork. Zygotes stay warm up to `EDGEFAAS_MAX_WARM`
//! (least recently used stopped first) and `EDGEFAAS_IDLE_TIMEOUT`.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags,
    SocketType,
};

use super::runner;
use crate::name::FunctionName;
use crate::process::{self, Processes};
use crate::sandbox::{Limits, Sandbox};

/// What a function's processes start with: `key=value` options for the runner
/// (its tmp folder, memory, cpu, reuse, secrets, env) and its Landlock layer.
pub struct Envelope {
    pub options: Vec<String>,
    pub ruleset: Option<OwnedFd>,
}

/// Why a zygote could not be had.
#[derive(Debug)]
pub enum StartError {
    /// The handler failed to import (the message names the error and its line).
    Import(String),
    /// The import did not finish in time; the zygote was killed.
    Hung,
    /// The base or the zygote could not be started or died.
    Io(std::io::Error),
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::Io(e)
    }
}

/// The daemon's handle on one function's zygote. Dropping the last handle closes
/// its socket: the zygote finishes the requests it runs, then exits; one still
/// there after `GRACE` (code that ignores the end, threads it started) is killed.
pub struct Zygote {
    pub name: FunctionName,
    pub pid: u32,
    sock: OwnedFd,
    last_used: Mutex<Instant>,
    /// A pidfd: readable once it has exited (then its pid may be another's).
    exit: Option<OwnedFd>,
}

/// How long a let-go zygote may take to leave before its group is killed.
const GRACE: Duration = Duration::from_secs(5);

/// Zygotes let go of, with the time they must be gone by (the evictor kills the rest).
static LEAVING: Mutex<Vec<(OwnedFd, u32, Instant)>> = Mutex::new(Vec::new());

/// Kills the let-go zygotes past their grace; forgets those that left.
fn kill_overstayers() {
    let now = Instant::now();
    LEAVING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(exit, pid, by)| {
            if readable_now(exit.as_fd()) {
                return false;
            }
            if now < *by {
                return true;
            }
            // Alive (the pidfd says so), so the pid is still its own and leads its group.
            warn!("the zygote (pid {pid}) did not leave when let go; killing its group");
            process::kill_group(*pid);
            false
        });
}

impl Zygote {
    /// Hands a request to the zygote's spare: its environment and the child's
    /// stdin, stdout, stderr and status pipe (and its Landlock layer, if any).
    /// `Err(true)`: the zygote is gone.
    pub fn submit(&self, env: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), (bool, std::io::Error)> {
        match send_with_fds(self.sock.as_fd(), env, fds) {
            Ok(()) => Ok(()),
            Err(e @ (Errno::PIPE | Errno::CONNRESET | Errno::CONNREFUSED | Errno::NOTCONN)) => {
                Err((true, e.into()))
            }
            Err(e) => Err((false, e.into())),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        debug!(
            "letting go of the zygote of {} (pid {})",
            self.name, self.pid
        );
        if let Some(exit) = self.exit.take() {
            LEAVING.lock().unwrap_or_else(|p| p.into_inner()).push((
                exit,
                self.pid,
                Instant::now() + GRACE,
            ));
        }
    }
}

/// The base process, and the lock that serialises its commands.
struct Base {
    pid: u32,
    sock: OwnedFd,
    exit: OwnedFd,
}

/// The warm zygotes, most recently used last.
#[derive(Default)]
struct Warm {
    zygotes: HashMap<FunctionName, Arc<Zygote>>,
    /// One lock per function being started, so a slow import blocks only its own callers.
    starting: HashMap<FunctionName, Arc<Mutex<()>>>,
    /// Bumped when a function is updated or deleted: a zygote that started before
    /// (maybe from the old code) serves its one request and is not kept.
    generation: HashMap<FunctionName, u64>,
}

/// Fork mode's processes: the base and the warm zygotes.
pub struct Forks {
    python: String,
    runner: PathBuf,
    sandbox: Arc<Sandbox>,
    procs: Arc<Processes>,
    base: Mutex<Option<Base>>,
    warm: Mutex<Warm>,
    max_warm: usize,
    idle: Duration,
    /// How long an import may take before its zygote is killed.
    start_timeout: Duration,
}

/// How long the base may take to answer a command.
const BASE_REPLY: Duration = Duration::from_secs(5);

impl Forks {
    pub fn new(
        python: String,
        runner: PathBuf,
        sandbox: Arc<Sandbox>,
        procs: Arc<Processes>,
        max_warm: usize,
        idle: Duration,
        start_timeout: Duration,
    ) -> Forks {
        Forks {
            python,
            runner,
            sandbox,
            procs,
            base: Mutex::new(None),
            warm: Mutex::default(),
            max_warm: max_warm.max(1),
            idle,
            start_timeout,
        }
    }

    fn warm(&self) -> MutexGuard<'_, Warm> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the base now (so the first request pays only a fork).
    pub fn prepare(&self) -> std::io::Result<()> {
        let mut base = self.base.lock().unwrap_or_else(|p| p.into_inner());
        self.ensure_base(&mut base).map(|_| ())
    }

    /// The warm zygote of `name`, started from `handler` if there is none.
    pub fn get(
        &self,
        name: &FunctionName,
        handler: &Path,
        envelope: impl FnOnce() -> std::io::Result<Envelope>,
    ) -> Result<Arc<Zygote>, StartError> {
        let gate = {
            let mut warm = self.warm();
            if let Some(z) = warm.zygotes.get(name) {
                *z.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                return Ok(z.clone());
            }
            warm.starting.entry(name.clone()).or_default().clone()
        };
        let _starting = gate.lock().unwrap_or_else(|p| p.into_inner());
        let generation = {
            let warm = self.warm();
            if let Some(z) = warm.zygotes.get(name) {
                return Ok(z.clone());
            }
            warm.generation.get(name).copied().unwrap_or(0)
        };
        let started = envelope()
            .map_err(StartError::Io)
            .and_then(|e| self.start(name, handler, e));
        let mut warm = self.warm();
        warm.starting.remove(name);
        let z = Arc::new(started?);
        if warm.generation.get(name).copied().unwrap_or(0) != generation {
            debug!("{name} changed while its zygote started: not keeping it");
            return Ok(z);
        }
        if warm.zygotes.len() >= self.max_warm {
            // The least recently used goes; its running requests finish first.
            let oldest = warm
                .zygotes
                .values()
                .min_by_key(|z| *z.last_used.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|z| z.name.clone());
            if let Some(old) = oldest {
                info!(
                    "stopping the zygote of {old}: EDGEFAAS_MAX_WARM ({}) are warm",
                    self.max_warm
                );
                warm.zygotes.remove(&old);
            }
        }
        warm.zygotes.insert(name.clone(), z.clone());
        Ok(z)
    }

    /// Stops using `name`'s zygote (updated, deleted, or found dead).
    pub fn retire(&self, name: &FunctionName) {
        let mut warm = self.warm();
        *warm.generation.entry(name.clone()).or_default() += 1;
        if let Some(z) = warm.zygotes.remove(name) {
            debug!("retiring the zygote of {name} (pid {})", z.pid);
        }
    }

    /// Stops using `z` if it is still the warm zygote of its function.
    pub fn retire_this(&self, z: &Arc<Zygote>) {
        let mut warm = self.warm();
        if warm.zygotes.get(&z.name).is_some_and(|w| Arc::ptr_eq(w, z)) {
            warm.zygotes.remove(&z.name);
        }
    }

    /// Stops the zygotes unused for longer than the idle timeout.
    pub fn evict_idle(&self) {
        self.warm().zygotes.retain(|name, z| {
            let idle = z
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            let keep = Arc::strong_count(z) > 1 || idle < self.idle;
            if !keep {
                info!(
                    "stopping the zygote of {name} after {}s idle",
                    idle.as_secs()
                );
            }
            keep
        });
    }

    /// How many zygotes are warm.
    pub fn count(&self) -> usize {
        self.warm().zygotes.len()
    }

    /// Starts the thread that stops idle zygotes.
    pub fn start_evictor(forks: Weak<Forks>, every: Duration) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("zygote-evictor".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    match forks.upgrade() {
                        Some(f) => f.evict_idle(),
                        None => return,
                    }
                    kill_overstayers();
                }
            })?;
        Ok(())
    }

    /// Imports `handler` in a throwaway child of the base; `Err` says why it will not serve.
    pub fn check(
        &self,
        handler: &Path,
        envelope: Envelope,
    ) -> Result<Result<(), String>, StartError> {
        let (result_r, result_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(std::io::Error::from)?;
        let pid = self.command(b'C', handler, &envelope.options, result_w, envelope.ruleset)?;
        let deadline = Instant::now() + self.start_timeout;
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if !wait_readable(result_r.as_fd(), deadline) {
                process::kill_group(pid);
                return Err(StartError::Hung);
            }
            match rustix::io::read(&result_r, &mut buf) {
                Ok(0) => break,
                Ok(n) if text.len() < 64 * 1024 => text.extend_from_slice(&buf[..n]),
                Ok(_) => {}
                Err(Errno::INTR | Errno::AGAIN) => {}
                Err(e) => return Err(StartError::Io(e.into())),
            }
        }
        let text = String::from_utf8_lossy(&text);
        match text.as_ref() {
            "ok" => Ok(Ok(())),
            t => Ok(Err(t
                .strip_prefix("fail ")
                .unwrap_or("the import check ended without a result")
                .to_string())),
        }
    }

    /// Forks a zygote for `name` from the base and waits until it has imported.
    fn start(
        &self,
        name: &FunctionName,
        handler: &Path,
        envelope: Envelope,
    ) -> Result<Zygote, StartError> {
        let (ours, theirs) = seqpacket_pair()?;
        let pid = self.command(b'Z', handler, &envelope.options, theirs, envelope.ruleset)?;
        let deadline = Instant::now() + self.start_timeout;
        if !wait_readable(ours.as_fd(), deadline) {
            warn!(
                "the import of {name} did not finish in {:?}; killing its zygote",
                self.start_timeout
            );
            process::kill_group(pid);
            return Err(StartError::Hung);
        }
        let mut buf = vec![0u8; 64 * 1024];
        let n = match rustix::net::recv(&ours, &mut buf, RecvFlags::empty()) {
            Ok((n, _)) => n,
            Err(e) => return Err(StartError::Io(e.into())),
        };
        let msg = &buf[..n];
        if let Some(text) = msg.strip_prefix(b"fail ") {
            return Err(StartError::Import(
                String::from_utf8_lossy(text).into_owned(),
            ));
        }
        match runner::pid_reply(msg, "ready") {
            Some(p) if p == pid => {
                info!("started the zygote of {name} (pid {pid})");
                let exit = rustix::process::Pid::from_raw(pid as i32).and_then(|p| {
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                });
                Ok(Zygote {
                    name: name.clone(),
                    pid,
                    sock: ours,
                    last_used: Mutex::new(Instant::now()),
                    exit,
                })
            }
            _ => {
                process::kill_group(pid);
                Err(StartError::Io(std::io::Error::other(
                    "the zygote ended before it was ready",
                )))
            }
        }
    }

    /// Sends a command with one fd to the base (started or restarted as needed);
    /// returns the pid of the child it forked.
    fn command(
        &self,
        kind: u8,
        handler: &Path,
        options: &[String],
        fd: OwnedFd,
        ruleset: Option<OwnedFd>,
    ) -> std::io::Result<u32> {
        // The options (a function's env= settings among them) go through a pipe the
        // forked child reads: the base never holds them, so no later zygote, a fork
        // of the base, finds another function's settings in its memory.
        let blob = runner::encode_options(options);
        if blob.len() > runner::OPTIONS_MAX {
            return Err(std::io::Error::other(
                "the function's settings are too large",
            ));
        }
        let msg = runner::base_command(kind, handler);
        let mut base = self.base.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            let (opts_r, opts_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            // Within a pipe's capacity (OPTIONS_MAX): this write does not block.
            let mut written = 0;
            while written < blob.len() {
                written += rustix::io::write(&opts_w, &blob[written..])?;
            }
            drop(opts_w);
            let b = self.ensure_base(&mut base)?;
            let fds: Vec<BorrowedFd<'_>> = [fd.as_fd(), opts_r.as_fd()]
                .into_iter()
                .chain(ruleset.as_ref().map(AsFd::as_fd))
                .collect();
            let sent = send_with_fds(b.sock.as_fd(), &msg, &fds);
            let reply = sent.map_err(std::io::Error::from).and_then(|()| {
                if !wait_readable(b.sock.as_fd(), Instant::now() + BASE_REPLY) {
                    return Err(std::io::Error::other("the base did not answer"));
                }
                let mut buf = [0u8; 64];
                let (n, _) = rustix::net::recv(&b.sock, &mut buf, RecvFlags::empty())?;
                if let Some(errno) = runner::pid_reply(&buf[..n], "err") {
                    // The base is fine; the fork was refused (EAGAIN: out of processes).
                    return Ok(Err(std::io::Error::from_raw_os_error(errno as i32)));
                }
                runner::pid_reply(&buf[..n], "pid")
                    .map(Ok)
                    .ok_or_else(|| std::io::Error::other("the base ended"))
            });
            match reply {
                Ok(Ok(pid)) => return Ok(pid),
                Ok(Err(refused)) => return Err(refused),
                Err(e) if attempt == 0 => {
                    warn!("the base process failed ({e}); starting another");
                    if let Some(old) = base.take() {
                        process::kill_group(old.pid);
                        self.procs.finish(old.pid);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("the base failed twice"))
    }

    /// The live base, started if there is none or the last one exited.
    fn ensure_base<'a>(&self, base: &'a mut Option<Base>) -> std::io::Result<&'a Base> {
        if base.as_ref().is_some_and(|b| readable_now(b.exit.as_fd())) {
            if let Some(old) = base.take() {
                warn!(
                    "the base process (pid {}) exited; starting another",
                    old.pid
                );
                self.procs.finish(old.pid);
            }
        }
        if base.is_none() {
            *base = Some(self.spawn_base()?);
        }
        base.as_ref()
            .ok_or_else(|| std::io::Error::other("no base"))
    }

    fn spawn_base(&self) -> std::io::Result<Base> {
        // Every zygote inherits the runner the base loads: it must be the daemon's.
        runner::ensure(&self.runner)?;
        let (ours, theirs) = seqpacket_pair()?;
        let mut cmd = runner::command(&self.python, &self.runner);
        if self.sandbox.runner_layers {
            cmd.arg(format!("--layers={}", self.sandbox.landlock));
        }
        cmd.arg("--base")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.sandbox.confine(
            &mut cmd,
            self.sandbox.base_ruleset(),
            Limits::default(),
            false,
        );
        let child = self.procs.spawn(&mut cmd)?;
        let pid = child.id();
        let exit = rustix::process::pidfd_open(
            rustix::process::Pid::from_child(&child),
            rustix::process::PidfdFlags::empty(),
        )?;
        info!("started the base process (pid {pid})");
        Ok(Base {
            pid,
            sock: ours,
            exit,
        })
    }

    /// Stops every zygote and the base (shutdown).
    pub fn stop_all(&self) {
        let zygotes: Vec<Arc<Zygote>> = self.warm().zygotes.drain().map(|(_, z)| z).collect();
        for z in &zygotes {
            process::kill_group(z.pid);
        }
        if let Some(b) = self.base.lock().unwrap_or_else(|p| p.into_inner()).take() {
            process::kill_group(b.pid);
            self.procs.finish(b.pid);
        }
    }
}

/// A connected pair of SOCK_SEQPACKET Unix sockets (message boundaries kept,
/// EOF when the peer exits), close-on-exec.
fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends one message with `fds` attached (SCM_RIGHTS); a dead peer is EPIPE, not SIGPIPE.
fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let mut space = [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(5))];
    if fds.len() > 5 {
        return Err(Errno::INVAL);
    }
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Errno::INVAL);
    }
    loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(data)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) if n == data.len() => return Ok(()),
            Ok(_) => return Err(Errno::MSGSIZE),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Waits until `fd` is readable (or hung up) or `deadline` passes; false on the deadline.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(Errno::INTR) => continue,
            Ok(_) => return true,
            Err(_) => return true,
        }
    }
}

/// True when `fd` is readable right now (a pidfd: the process has exited).
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}
