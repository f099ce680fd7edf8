//! One poll loop supervises one invocation: it feeds the body to the child's
//! stdin and drains its stdout, stderr and status pipe, all non-blocking, until
//! the output and the result are complete or the deadline passes. This is the
//! shape of std's `read2` (what `Command::output` uses); no other thread takes
//! part, and nothing routes events between threads.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use super::runner::{Lines, Status};

/// How much of stderr is kept (the tail: the exception is at the end).
const STDERR_KEEP: usize = 64 * 1024;
/// How long to keep draining once the child was killed.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// The daemon's ends of one invocation's pipes.
pub struct Pipes {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub status: OwnedFd,
    /// Exec mode: the child's pidfd, readable once it has exited.
    pub exit: Option<OwnedFd>,
}

/// Why supervision ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The output and the result (or the child's end) are complete.
    Done,
    /// The deadline passed; the child was killed.
    TimedOut,
    /// The output passed its cap; the child was killed.
    Overflow,
}

/// Everything one invocation produced.
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The child's pid (its process group), once it reported it.
    pub pid: Option<u32>,
    /// `R`: the JSON of the result; `F`: the failure's exit code.
    pub result: Option<Result<Vec<u8>, i32>>,
    /// The wait status, when the zygote reported it (`X`).
    pub exit: Option<i32>,
    /// The status pipe reached EOF: nobody holds it any more.
    pub status_closed: bool,
    /// Exec mode: the pidfd said the child exited.
    pub exited: bool,
    pub stop: Stop,
    /// Still open, for whoever sees the invocation to its end.
    pub status: Option<OwnedFd>,
    pub exit_fd: Option<OwnedFd>,
}

impl Outcome {
    /// True when the child never started the request (safe to run it elsewhere).
    pub fn never_started(&self) -> bool {
        self.pid.is_none()
            && self.result.is_none()
            && self.stdout.is_empty()
            && self.stop == Stop::Done
    }
}

fn nonblocking(fd: &OwnedFd) -> rustix::io::Result<()> {
    // One syscall (FIONBIO), where F_GETFL + F_SETFL take two.
    rustix::io::ioctl_fionbio(fd, true)
}

/// Reads what is there now; `Ok(None)` at EOF.
fn read_some(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    loop {
        match rustix::io::read(fd, &mut *buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Some(0),
            Err(_) => return None,
        }
    }
}

/// Runs the loop. `kill(pid)` is called once on the deadline or an output
/// overflow, with the child's pid if it reported one.
pub fn supervise(
    pipes: Pipes,
    body: &[u8],
    deadline: Instant,
    max_output: u64,
    kill: &mut dyn FnMut(Option<u32>),
) -> Outcome {
    let Pipes {
        stdin,
        stdout,
        stderr,
        status,
        exit,
    } = pipes;
    let mut out = Outcome {
        stdout: Vec::new(),
        stderr: Vec::new(),
        pid: None,
        result: None,
        exit: None,
        status_closed: false,
        exited: false,
        stop: Stop::Done,
        status: None,
        exit_fd: None,
    };
    let (mut stdin, mut stdout, mut stderr, mut status) =
        (Some(stdin), Some(stdout), Some(stderr), Some(status));
    for fd in [&stdin, &stdout, &stderr, &status].into_iter().flatten() {
        let _ = nonblocking(fd);
    }
    let mut written = 0;
    let mut lines = Lines::default();
    // On the stack: a heap buffer per invocation fragmented musl's allocator.
    let mut buf = [0u8; 16 * 1024];
    let mut killed_at: Option<Instant> = None;
    loop {
        // Done: the whole output and a result; or the child is gone without one.
        let output_done = stdout.is_none();
        let gone = status.is_none() && (exit.is_none() || out.exited);
        if output_done && (out.result.is_some() || gone) {
            break;
        }
        let now = Instant::now();
        let limit = match killed_at {
            Some(at) => at + DRAIN_WAIT,
            None => deadline,
        };
        if now >= limit {
            if killed_at.is_some() {
                break;
            }
            out.stop = Stop::TimedOut;
            kill(out.pid);
            killed_at = Some(now);
            continue;
        }
        let mut fds = Vec::with_capacity(5);
        let mut roles = Vec::with_capacity(5);
        if let Some(fd) = &stdin {
            fds.push(PollFd::new(fd, PollFlags::OUT));
            roles.push(0);
        }
        for (role, fd) in [(1, &stdout), (2, &stderr), (3, &status), (4, &exit)] {
            if let Some(fd) = fd {
                if role == 4 && out.exited {
                    continue;
                }
                fds.push(PollFd::new(fd, PollFlags::IN));
                roles.push(role);
            }
        }
        let wait = limit.saturating_duration_since(now);
        let timeout = Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(_) => break,
        }
        let ready: Vec<(i32, PollFlags)> = roles
            .iter()
            .zip(fds.iter())
            .map(|(r, f)| (*r, f.revents()))
            .filter(|(_, ev)| !ev.is_empty())
            .collect();
        drop(fds);
        for (role, events) in ready {
            match role {
                0 => {
                    let Some(fd) = &stdin else { continue };
                    if events.intersects(PollFlags::ERR | PollFlags::HUP) {
                        stdin = None;
                        continue;
                    }
                    match rustix::io::write(fd, &body[written..]) {
                        Ok(n) => written += n,
                        Err(Errno::AGAIN | Errno::INTR) => {}
                        // The handler closed stdin without reading it: its business.
                        Err(_) => written = body.len(),
                    }
                    if written >= body.len() {
                        stdin = None;
                    }
                }
                1 => {
                    let Some(fd) = &stdout else { continue };
                    match read_some(fd, &mut buf) {
                        None => stdout = None,
                        Some(n) => {
                            if out.stop == Stop::Done {
                                out.stdout.extend_from_slice(&buf[..n]);
                                if out.stdout.len() as u64 > max_output {
                                    out.stop = Stop::Overflow;
                                    out.stdout = Vec::new();
                                    kill(out.pid);
                                    killed_at = Some(Instant::now());
                                }
                            }
                        }
                    }
                }
                2 => {
                    let Some(fd) = &stderr else { continue };
                    match read_some(fd, &mut buf) {
                        None => stderr = None,
                        Some(n) => {
                            out.stderr.extend_from_slice(&buf[..n]);
                            if out.stderr.len() > 2 * STDERR_KEEP {
                                out.stderr.drain(..out.stderr.len() - STDERR_KEEP);
                            }
                        }
                    }
                }
                3 => {
                    let Some(fd) = &status else { continue };
                    match read_some(fd, &mut buf) {
                        None => {
                            status = None;
                            out.status_closed = true;
                        }
                        Some(n) => {
                            for line in lines.feed(&buf[..n]) {
                                match Status::parse(&line) {
                                    Some(Status::Started(pid)) if out.pid.is_none() => {
                                        out.pid = Some(pid);
                                        // Killed before it reported: kill it now that it has a group.
                                        if killed_at.is_some() {
                                            kill(out.pid);
                                        }
                                    }
                                    Some(Status::Returned(json)) if out.result.is_none() => {
                                        out.result = Some(Ok(json));
                                    }
                                    Some(Status::Failed(code)) if out.result.is_none() => {
                                        out.result = Some(Err(code));
                                    }
                                    Some(Status::Exited(ws)) => out.exit = Some(ws),
                                    _ => {}
                                }
                            }
                        }
                    }
                }
                _ => out.exited = true,
            }
        }
    }
    // What stderr holds already is the end of the function's log; don't wait for more.
    if let Some(fd) = &stderr {
        while let Some(n) = read_some(fd, &mut buf) {
            if n == 0 {
                break;
            }
            out.stderr.extend_from_slice(&buf[..n]);
        }
    }
    if out.stderr.len() > STDERR_KEEP {
        out.stderr.drain(..out.stderr.len() - STDERR_KEEP);
    }
    out.status = status;
    out.exit_fd = exit;
    out
}
