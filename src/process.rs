//! Ownership of every process the daemon starts: the direct children it must
//! reap (exec-mode requests, the fork-mode base), killing process groups, and
//! sweeping up orphans so no zombie or stray process outlives its invocation.

use std::collections::HashSet;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use rustix::process::{Pid, Signal, WaitOptions};

/// The daemon's own children that something waits for, by pid (each leads its group).
#[derive(Default)]
pub struct Processes {
    live: Mutex<HashSet<u32>>,
}

impl Processes {
    /// Starts `cmd` as the leader of a new process group and records it.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        // Held across the spawn so the sweeper never mistakes a new leader for an orphan.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        live.insert(child.id());
        Ok(child)
    }

    /// Kills the group of an exited (not yet reaped) leader, then reaps it and forgets it.
    /// Returns its wait status if it had exited.
    pub fn finish(&self, pid: u32) -> Option<i32> {
        kill_group(pid);
        // Reaped and forgotten under the lock: the sweeper must not reap it first, and
        // a new leader that reuses the pid must not lose its entry.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let status = Pid::from_raw(pid as i32).and_then(|p| {
            rustix::process::waitpid(Some(p), WaitOptions::empty())
                .ok()
                .flatten()
                .map(|(_, s)| s.as_raw())
        });
        live.remove(&pid);
        status
    }

    /// Kills and reaps children of the daemon that belong to nothing it waits for:
    /// descendants that lost their parent (setsid, a dead zygote) and came back to
    /// the daemon, its subreaper.
    pub fn sweep(&self) {
        let me = std::process::id();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for pid in children_of(me) {
            if live.contains(&pid) {
                continue;
            }
            debug!("sweeping stray process {pid}");
            kill_one(pid);
            // A killed process becomes a zombie shortly after; the next sweep reaps it if not now.
            for _ in 0..50 {
                let reaped = Pid::from_raw(pid as i32).is_some_and(|p| {
                    matches!(
                        rustix::process::waitpid(Some(p), WaitOptions::NOHANG),
                        Ok(Some(_))
                    )
                });
                if reaped {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Sends SIGKILL to every process in group `pgid`. A group already gone is fine;
/// 0, 1 and the daemon's own group are refused (they would mean "everyone").
pub fn kill_group(pgid: u32) {
    if pgid <= 1 || pgid == std::process::id() {
        return;
    }
    if let Some(p) = Pid::from_raw(pgid as i32) {
        match rustix::process::kill_process_group(p, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => warn!("cannot kill process group {pgid}: {e}"),
        }
    }
}

/// Sends SIGKILL to one process (not 0, 1 or the daemon); one already gone is fine.
pub fn kill_one(pid: u32) {
    if pid <= 1 || pid == std::process::id() {
        return;
    }
    if let Some(p) = Pid::from_raw(pid as i32) {
        match rustix::process::kill_process(p, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => warn!("cannot kill process {pid}: {e}"),
        }
    }
}

/// Kills every descendant of the daemon (shutdown after the grace period).
/// The whole tree is read before anything is killed: a parent killed first
/// would hand its children to init (where the daemon is not a subreaper) before
/// the walk reached them. A few rounds catch what forked meanwhile.
pub fn kill_descendants() {
    let me = std::process::id();
    for _ in 0..3 {
        let mut tree = Vec::new();
        let mut frontier = vec![me];
        let mut seen = HashSet::new();
        while let Some(parent) = frontier.pop() {
            for pid in children_of(parent) {
                if seen.insert(pid) {
                    tree.push(pid);
                    frontier.push(pid);
                }
            }
        }
        if tree.is_empty() {
            return;
        }
        for &pid in &tree {
            kill_group(pid);
            kill_one(pid);
        }
    }
}

/// Pids of the processes whose parent is `ppid`, read from /proc.
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| stat(*pid).is_some_and(|s| s.ppid == ppid))
        .collect()
}

/// What /proc/<pid>/stat says of a process's family.
pub struct Stat {
    pub ppid: u32,
    pub pgrp: u32,
}

/// Fields 4 and 5 of /proc/<pid>/stat (after the parenthesised command name).
pub fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace().skip(1);
    Some(Stat {
        ppid: f.next()?.parse().ok()?,
        pgrp: f.next()?.parse().ok()?,
    })
}

/// Becomes the subreaper for the daemon's descendants and starts the thread
/// that sweeps orphans on every SIGCHLD (and every few seconds regardless).
pub fn start_sweeper(procs: Arc<Processes>) -> io::Result<()> {
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        warn!("cannot become child subreaper ({e}); orphans go to init");
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGCHLD])?;
    std::thread::Builder::new()
        .name("sigchld".into())
        .spawn(move || {
            for _ in signals.forever() {
                let _ = tx.send(());
            }
        })?;
    std::thread::Builder::new()
        .name("sweeper".into())
        .spawn(move || {
            loop {
                let _ = rx.recv_timeout(Duration::from_secs(5));
                // Coalesce a burst of SIGCHLDs into one sweep.
                std::thread::sleep(Duration::from_millis(50));
                while rx.try_recv().is_ok() {}
                procs.sweep();
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_past_a_name_with_spaces_and_parens() {
        // Our own stat line; the parent is the test harness.
        let me = std::process::id();
        let s = stat(me).expect("our own stat");
        assert_eq!(s.ppid, std::os::unix::process::parent_id());
    }

    #[test]
    fn everyone_and_the_daemon_are_never_killed() {
        // These return without sending anything; a kill(-1) would end the test run.
        kill_group(0);
        kill_group(1);
        kill_group(std::process::id());
        kill_one(0);
        kill_one(1);
    }
}
