//! Ownership of every process the daemon starts: the set of live invocation
//! process groups, killing them, and sweeping up orphans so no zombie or stray
//! process outlives its invocation.

use std::collections::HashSet;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};

use crate::sys;

/// The process groups of invocations now running, by leader pid (= group id).
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

    /// Kills the whole group of a recorded leader (before it is reaped, so the id is still its own).
    pub fn kill(&self, pgid: u32) {
        if let Err(e) = sys::kill_group(pgid) {
            warn!("cannot kill process group {pgid}: {e}");
        }
    }

    /// Kills the group of an exited leader, forgets it, then reaps the leader.
    pub fn finish(&self, mut child: Child) -> io::Result<std::process::ExitStatus> {
        let pgid = child.id();
        self.kill(pgid);
        // Reaped and forgotten under the lock: the sweeper must not reap it first, and
        // a new leader that reuses the pid must not lose its entry.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let status = child.wait();
        live.remove(&pgid);
        status
    }

    /// Kills every running invocation's group (used when the shutdown grace runs out).
    pub fn kill_all(&self) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for &pgid in live.iter() {
            self.kill(pgid);
        }
    }

    /// Kills and reaps children of the daemon that belong to no running invocation:
    /// descendants that left their group (setsid) and were re-parented to us.
    pub fn sweep(&self) {
        let me = std::process::id();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        for pid in children_of(me) {
            if live.contains(&pid) {
                continue;
            }
            debug!("sweeping stray process {pid}");
            if let Err(e) = sys::kill(pid) {
                warn!("cannot kill stray process {pid}: {e}");
            }
            // A killed process becomes a zombie shortly after; the next sweep reaps it if not now.
            for _ in 0..50 {
                if sys::reap(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Pids of the processes whose parent is `ppid`, read from /proc.
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| parent_of(*pid) == Some(ppid))
        .collect()
}

/// The parent pid from /proc/<pid>/stat (field 4, after the parenthesised command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Becomes the subreaper for the daemon's descendants and starts the thread
/// that sweeps orphans on every SIGCHLD (and every few seconds regardless).
pub fn start_sweeper(procs: Arc<Processes>) -> io::Result<()> {
    if let Err(e) = sys::become_subreaper() {
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
    fn parent_of_reads_past_a_name_with_spaces_and_parens() {
        // Our own stat line; the parent is the test harness.
        let me = std::process::id();
        let expected = std::os::unix::process::parent_id();
        assert_eq!(parent_of(me), Some(expected));
    }
}
