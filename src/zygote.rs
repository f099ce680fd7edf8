//! Fork mode: one warm Python per function (a zygote, as in SOCK) that has
//! imported the handler and forks a fresh child for each request. The daemon
//! passes each request's pipes to the zygote over a SOCK_SEQPACKET socket and
//! hears back the child's pid and, later, its exit status.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::invoke::Event;
use crate::process::Processes;
use crate::store::FunctionName;
use crate::sys;

/// The warm zygotes, one per function that was invoked lately.
pub struct Zygotes {
    map: Mutex<HashMap<FunctionName, Arc<Zygote>>>,
    procs: Arc<Processes>,
    idle: Duration,
}

/// One zygote process and the requests it is running.
pub struct Zygote {
    name: FunctionName,
    pid: u32,
    sock: UnixStream,
    child: Mutex<Option<Child>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    last_used: Mutex<Instant>,
    procs: Arc<Processes>,
}

/// What the zygote's reader thread shares with the requests.
#[derive(Default)]
struct Shared {
    alive: AtomicBool,
    /// Requests waiting for their pid and exit status, by id.
    pending: Mutex<HashMap<u64, Sender<Event>>>,
    /// Process groups of the children running now.
    running: Mutex<HashSet<u32>>,
}

#[derive(Serialize)]
struct Request<'a> {
    id: u64,
    env: &'a [(String, String)],
}

#[derive(Deserialize)]
struct Notice {
    id: u64,
    pid: Option<u32>,
    status: Option<i32>,
}

/// Why a request could not be handed to a zygote.
pub enum SubmitError {
    /// The zygote is gone; a fresh one may take the request.
    Lost,
    /// Something else failed.
    Io(std::io::Error),
}

impl Zygotes {
    /// No zygotes yet; each is stopped after `idle` without use.
    pub fn new(procs: Arc<Processes>, idle: Duration) -> Zygotes {
        Zygotes {
            map: Mutex::default(),
            procs,
            idle,
        }
    }

    /// The live zygote of `name`, started with `cmd` if there is none.
    pub fn get(
        &self,
        name: &FunctionName,
        cmd: impl FnOnce() -> Command,
    ) -> std::io::Result<Arc<Zygote>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(z) = map.get(name) {
            if z.shared.alive.load(Ordering::SeqCst) {
                *z.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                return Ok(z.clone());
            }
            info!(
                "zygote of {name} (pid {}) is gone; starting a new one",
                z.pid
            );
        }
        let z = Zygote::start(name, cmd(), self.procs.clone())?;
        map.insert(name.clone(), z.clone());
        Ok(z)
    }

    /// Stops using the zygote of `name` (its code changed or was deleted). Requests
    /// already in it finish; the process ends when the last of them lets go.
    pub fn retire(&self, name: &FunctionName) {
        let removed = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(z) = removed {
            debug!("retiring zygote of {name} (pid {})", z.pid);
        }
    }

    /// Stops zygotes idle for longer than the idle timeout and not in use.
    pub fn evict_idle(&self) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // A count of 1 is the map's own reference; new ones are taken only under this lock.
        map.retain(|name, z| {
            let idle = z
                .last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed();
            let keep = Arc::strong_count(z) > 1 || idle < self.idle;
            if !keep {
                info!("stopping zygote of {name} after {}s idle", idle.as_secs());
            }
            keep
        });
    }

    /// Kills every child running in any zygote (shutdown after the grace period).
    pub fn kill_all(&self) {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for z in map.values() {
            for &pgid in z
                .shared
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                let _ = sys::kill_group(pgid);
            }
        }
    }

    /// Starts the thread that stops idle zygotes.
    pub fn start_evictor(zygotes: Weak<Zygotes>, every: Duration) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("zygote-evictor".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    match zygotes.upgrade() {
                        Some(z) => z.evict_idle(),
                        None => return,
                    }
                }
            })?;
        Ok(())
    }
}

impl Zygote {
    fn start(
        name: &FunctionName,
        mut cmd: Command,
        procs: Arc<Processes>,
    ) -> std::io::Result<Arc<Zygote>> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        cmd.stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = procs.spawn(&mut cmd)?;
        let pid = child.id();
        let sock = UnixStream::from(ours);
        let reader = sock.try_clone()?;
        let shared = Arc::new(Shared {
            alive: AtomicBool::new(true),
            ..Shared::default()
        });
        let z = Arc::new(Zygote {
            name: name.clone(),
            pid,
            sock,
            child: Mutex::new(Some(child)),
            shared: shared.clone(),
            next_id: AtomicU64::new(1),
            last_used: Mutex::new(Instant::now()),
            procs,
        });
        let thread_name = format!("zygote-{pid}");
        std::thread::Builder::new()
            .name(thread_name)
            .stack_size(128 * 1024)
            .spawn(move || listen(reader, &shared))?;
        info!("started zygote of {name} (pid {pid})");
        Ok(z)
    }

    /// Hands a request to the zygote: its environment and the child's stdin,
    /// stdout and stderr. Events for it go to `events`; the id is returned.
    pub fn submit(
        &self,
        env: &[(String, String)],
        fds: [BorrowedFd<'_>; 3],
        events: Sender<Event>,
    ) -> Result<u64, SubmitError> {
        if !self.shared.alive.load(Ordering::SeqCst) {
            return Err(SubmitError::Lost);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message =
            serde_json::to_vec(&Request { id, env }).map_err(|e| SubmitError::Io(e.into()))?;
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, events);
        match sys::send_with_fds(self.sock.as_fd(), &message, &fds) {
            Ok(()) => Ok(id),
            Err(e) => {
                self.forget(id);
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
                ) {
                    Err(SubmitError::Lost)
                } else {
                    Err(SubmitError::Io(e))
                }
            }
        }
    }

    /// Drops the bookkeeping of a finished request.
    pub fn forget(&self, id: u64) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Kills the zygote itself (it hung before starting a child); the next request starts another.
    pub fn abort(&self) {
        warn!(
            "killing the zygote of {} (pid {}): it did not start the request in time",
            self.name, self.pid
        );
        self.shared.alive.store(false, Ordering::SeqCst);
        self.procs.kill(self.pid);
    }

    /// Marks a finished child's group as no longer running.
    pub fn finished(&self, pid: u32) {
        self.shared
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // No request holds it any more: nothing runs in it, so it can go at once.
        self.shared.alive.store(false, Ordering::SeqCst);
        if let Some(child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            match self.procs.finish(child) {
                Ok(_) => debug!("zygote of {} (pid {}) stopped", self.name, self.pid),
                Err(e) => warn!("reaping zygote {}: {e}", self.pid),
            }
        }
    }
}

/// Reads the zygote's notices until it exits, passing each to its request.
fn listen(mut sock: UnixStream, shared: &Shared) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Ok(notice) = serde_json::from_slice::<Notice>(&buf[..n]) else {
            warn!(
                "zygote sent a message that is not a notice: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            continue;
        };
        let event = match (notice.pid, notice.status) {
            (Some(pid), _) => {
                shared
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pid);
                Event::Started(pid)
            }
            (None, Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                Event::Exited(Some(ExitStatus::from_raw(status)))
            }
            (None, None) => continue,
        };
        let pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = pending.get(&notice.id) {
            let _ = tx.send(event);
        }
    }
    shared.alive.store(false, Ordering::SeqCst);
    // Every request still waiting learns that its zygote is gone.
    for (_, tx) in shared
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
    {
        let _ = tx.send(Event::Lost);
    }
}
