//! Exec mode: a new interpreter per request, as OpenFaaS's classic watchdog
//! does. The child leads its own process group, gets the body on stdin and its
//! status pipe as fd 3, and the daemon holds a pidfd to see it exit.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use super::supervise::Pipes;
use crate::process::Processes;

/// Starts `cmd` (the runner for one request) with its four pipes; returns the
/// child's pid and the daemon's ends.
pub fn start(procs: &Processes, mut cmd: Command) -> std::io::Result<(u32, Pipes)> {
    let (status_r, status_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::sys::pass_fd_as(&mut cmd, status_w, 3);
    let mut child = procs.spawn(&mut cmd)?;
    let pid = child.id();
    drop(cmd);
    // The child is ours to reap, so its pid cannot be reused before we do: the pidfd is its own.
    let exit = match rustix::process::pidfd_open(
        rustix::process::Pid::from_child(&child),
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            procs.finish(pid);
            return Err(e.into());
        }
    };
    let taken = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (Some(stdin), Some(stdout), Some(stderr)) = taken else {
        return Err(std::io::Error::other("the child's pipes are missing"));
    };
    Ok((
        pid,
        Pipes {
            stdin: OwnedFd::from(stdin),
            stdout: OwnedFd::from(stdout),
            stderr: OwnedFd::from(stderr),
            status: status_r,
            exit: Some(exit),
        },
    ))
}

/// Runs an import check (`cmd` is the runner with `--check`): its verdict is
/// what it writes on fd 3 before it exits; `None` if that takes past `deadline`
/// (it is killed). Its own output goes nowhere; its stderr to the daemon's log.
pub fn check(
    procs: &Processes,
    mut cmd: Command,
    deadline: std::time::Instant,
) -> std::io::Result<Option<String>> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let (verdict_r, verdict_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    crate::sys::pass_fd_as(&mut cmd, verdict_w, 3);
    let child = procs.spawn(&mut cmd)?;
    let pid = child.id();
    drop(cmd);
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let finished = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break false;
        }
        let ts = Timespec {
            tv_sec: left.as_secs() as _,
            tv_nsec: left.subsec_nanos() as _,
        };
        let mut fds = [PollFd::new(&verdict_r, PollFlags::IN)];
        if poll(&mut fds, Some(&ts)).is_err() {
            continue;
        }
        match rustix::io::read(&verdict_r, &mut buf) {
            Ok(0) => break true,
            Ok(n) if text.len() < 64 * 1024 => text.extend_from_slice(&buf[..n]),
            Ok(_) | Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
            Err(_) => break true,
        }
    };
    // Killed if it is still there (on time: it has exited, or is about to).
    procs.finish(pid);
    Ok(finished.then(|| String::from_utf8_lossy(&text).into_owned()))
}
