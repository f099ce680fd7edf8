//! The end of every invocation, after its answer has gone out: one thread
//! waits for each child's exit (a pidfd in exec mode; in fork mode the status
//! pipe's EOF, which comes once the zygote has reaped the child and killed its
//! group), kills what is left at the deadline, and reaps exec-mode children.
//! This keeps a child's teardown off the request's critical path.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::warn;
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;

use crate::process::{self, Processes};

/// What is left to see of one invocation.
pub enum Job {
    /// Fork mode: the status pipe (EOF once the zygote reaped the child) and
    /// how to kill the child if it outlives the deadline.
    Fork {
        status: OwnedFd,
        pgid: Option<u32>,
        zygote: u32,
        /// The invocation's folder, removed once it is gone (not with reuse).
        tmp: Option<std::path::PathBuf>,
    },
    /// Exec mode: the child's pidfd (the child is the daemon's to reap) and
    /// its invocation's folder, removed once it is gone.
    Exec {
        pidfd: OwnedFd,
        pid: u32,
        tmp: std::path::PathBuf,
    },
}

/// How long past its deadline a killed child may take to go before it is left to the sweeper.
const AFTER_KILL: Duration = Duration::from_secs(2);

struct Pending {
    job: Job,
    deadline: Instant,
    killed: bool,
}

/// The handle workers give finished invocations to.
pub struct Reaper {
    queue: Arc<Mutex<Vec<Pending>>>,
    wake: OwnedFd,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start(procs: Arc<Processes>) -> std::io::Result<Reaper> {
        let (wake_r, wake_w) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        )?;
        let queue: Arc<Mutex<Vec<Pending>>> = Arc::default();
        let theirs = queue.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || run(&theirs, wake_r, &procs))?;
        Ok(Reaper {
            queue,
            wake: wake_w,
        })
    }

    /// Watches `job` until its child is gone; kills it if that is later than `deadline`.
    pub fn watch(&self, job: Job, deadline: Instant) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                job,
                deadline,
                killed: false,
            });
        // A full pipe already holds a wake-up: nothing lost.
        let _ = rustix::io::write(&self.wake, &[1]);
    }
}

fn run(queue: &Mutex<Vec<Pending>>, wake: OwnedFd, procs: &Processes) {
    let mut pending: Vec<Pending> = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        pending.append(&mut queue.lock().unwrap_or_else(|p| p.into_inner()));
        let now = Instant::now();
        // Kill what outlived its deadline; give up on what outlived the kill.
        pending.retain_mut(|p| {
            if now < p.deadline {
                return true;
            }
            if p.killed {
                warn!("a function process outlived its kill; leaving it to the sweeper");
                match &p.job {
                    Job::Exec { tmp, .. } | Job::Fork { tmp: Some(tmp), .. } => {
                        let _ = std::fs::remove_dir_all(tmp);
                    }
                    Job::Fork { tmp: None, .. } => {}
                }
                return false;
            }
            match &p.job {
                Job::Fork { pgid, zygote, .. } => kill_fork_child(*pgid, *zygote),
                Job::Exec { pid, .. } => process::kill_group(*pid),
            }
            p.killed = true;
            p.deadline = now + AFTER_KILL;
            true
        });
        let next = pending.iter().map(|p| p.deadline).min();
        let mut fds = Vec::with_capacity(pending.len() + 1);
        fds.push(PollFd::new(&wake, PollFlags::IN));
        for p in &pending {
            let fd = match &p.job {
                Job::Fork { status, .. } => status.as_fd(),
                Job::Exec { pidfd, .. } => pidfd.as_fd(),
            };
            fds.push(PollFd::from_borrowed_fd(fd, PollFlags::IN));
        }
        let wait = next.map(|d| d.saturating_duration_since(now));
        let ts = wait.map(|w| Timespec {
            tv_sec: w.as_secs() as _,
            tv_nsec: w.subsec_nanos() as _,
        });
        if let Err(e) = poll(&mut fds, ts.as_ref()) {
            if e != Errno::INTR {
                warn!("reaper poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if ready[0] {
            while matches!(rustix::io::read(&wake, &mut buf), Ok(n) if n > 0) {}
        }
        let mut i = 0;
        pending.retain(|p| {
            i += 1;
            if !ready[i] {
                return true;
            }
            match &p.job {
                // Read the zygote's X line (or anything else); done at EOF.
                Job::Fork { status, tmp, .. } => loop {
                    match rustix::io::read(status, &mut buf) {
                        Ok(0) | Err(Errno::BADF | Errno::INVAL | Errno::IO) => {
                            if let Some(t) = tmp {
                                let _ = std::fs::remove_dir_all(t);
                            }
                            return false;
                        }
                        Ok(_) => continue,
                        Err(Errno::INTR) => continue,
                        Err(Errno::AGAIN) => return true,
                        Err(_) => return false,
                    }
                },
                Job::Exec { pid, tmp, .. } => {
                    procs.finish(*pid);
                    // std's remove_dir_all does not follow symlinks the function left.
                    let _ = std::fs::remove_dir_all(tmp);
                    false
                }
            }
        });
    }
}

/// Kills a fork-mode child's group, once /proc confirms it is the zygote's child
/// and leads that group (a pid from a status pipe is the function's word only).
/// A child that never reported its pid, or lied about it, costs its zygote.
pub fn kill_fork_child(pgid: Option<u32>, zygote: u32) {
    let Some(p) = pgid else {
        return process::kill_group(zygote);
    };
    match process::stat(p) {
        // Gone already: the zygote reaped it and killed its group.
        None => {}
        Some(s) if s.ppid == zygote && s.pgrp == p => process::kill_group(p),
        Some(_) => process::kill_group(zygote),
    }
}
