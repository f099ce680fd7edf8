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

/// A message from the zygote: `pid <id> <pid>` or `exit <id> <wait status>`.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Started { id: u64, pid: u32 },
    Exited { id: u64, status: i32 },
}

impl Notice {
    fn parse(msg: &[u8]) -> Option<Notice> {
        let text = std::str::from_utf8(msg).ok()?;
        let mut parts = text.split(' ');
        let (kind, id, n) = (parts.next()?, parts.next()?.parse().ok()?, parts.next()?);
        match kind {
            "pid" => Some(Notice::Started {
                id,
                pid: n.parse().ok()?,
            }),
            "exit" => Some(Notice::Exited {
                id,
                status: n.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A request for the zygote: `<id>\0<key>\0<value>\0...` (keys and values hold no NUL).
fn encode_request(id: u64, env: &[(String, String)]) -> Vec<u8> {
    let mut msg = id.to_string().into_bytes();
    for (k, v) in env {
        for part in [k, v] {
            msg.push(0);
            msg.extend_from_slice(part.as_bytes());
        }
    }
    msg
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

    /// How many zygotes are warm.
    pub fn count(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
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
        // A kept I/O thread, not a new one per zygote: zygotes come and go with every
        // update, and a thread spawned for each left memory behind under musl.
        crate::iopool::run(move || listen(reader, &shared));
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
        let message = encode_request(id, env);
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
        let Some(notice) = Notice::parse(&buf[..n]) else {
            warn!(
                "zygote sent a message that is not a notice: {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            continue;
        };
        let (id, event) = match notice {
            Notice::Started { id, pid } => {
                shared
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(pid);
                (id, Event::Started(pid))
            }
            Notice::Exited { id, status } => {
                use std::os::unix::process::ExitStatusExt;
                (id, Event::Exited(Some(ExitStatus::from_raw(status))))
            }
        };
        let pending = shared.pending.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = pending.get(&id) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_parse_and_junk_is_refused() {
        assert_eq!(
            Notice::parse(b"pid 3 4242"),
            Some(Notice::Started { id: 3, pid: 4242 })
        );
        assert_eq!(
            Notice::parse(b"exit 3 256"),
            Some(Notice::Exited { id: 3, status: 256 })
        );
        for junk in [&b"pid 3"[..], b"exit x 1", b"boom 1 2", b"", b"\xff"] {
            assert_eq!(Notice::parse(junk), None);
        }
    }

    #[test]
    fn requests_are_nul_separated() {
        let env = vec![
            ("Http_Method".to_string(), "GET".to_string()),
            ("Http_Path".to_string(), "/".to_string()),
        ];
        assert_eq!(
            encode_request(7, &env),
            b"7\0Http_Method\0GET\0Http_Path\0/"
        );
    }
}
