//! The threads that serve connections: one per open connection, kept for a
//! while when idle so a new connection rarely pays for a thread start.
//!
//! EdgeFaaS patch: upstream spawned with `thread::spawn` (a panic when no
//! thread can be made, e.g. under a pids limit) and took boxed closures; here a
//! failed spawn hands the connection back so the accept loop can answer 503.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use crate::connection::Connection;
use crate::LiveConnection;

/// What a pool thread does with one accepted connection.
pub(crate) type Serve = Arc<dyn Fn(Connection, Option<SocketAddr>, LiveConnection) + Send + Sync>;

type Job = (Connection, Option<SocketAddr>, LiveConnection);

/// Idle threads wait this long for a new connection before they exit.
const IDLE: Duration = Duration::from_secs(5);
/// Threads kept even when idle.
const MIN_THREADS: usize = 4;

pub(crate) struct TaskPool {
    sharing: Arc<Sharing>,
    serve: Serve,
    stack: usize,
}

struct Sharing {
    state: Mutex<State>,
    condvar: Condvar,
}

#[derive(Default)]
struct State {
    todo: VecDeque<Job>,
    threads: usize,
    idle: usize,
}

impl TaskPool {
    pub(crate) fn new(serve: Serve, stack: usize) -> TaskPool {
        TaskPool {
            sharing: Arc::new(Sharing {
                state: Mutex::default(),
                condvar: Condvar::new(),
            }),
            serve,
            stack,
        }
    }

    /// Serves a connection on an idle thread, or on a new one; gives the
    /// connection back if no thread can be had.
    pub(crate) fn spawn(
        &self,
        sock: Connection,
        remote: Option<SocketAddr>,
        live: LiveConnection,
    ) -> Result<(), (std::io::Error, Connection)> {
        let mut state = self.sharing.state.lock().unwrap_or_else(|p| p.into_inner());
        // EdgeFaaS patch: queue only if an idle thread is free for this job too
        // (upstream could queue two jobs for one idle thread; the second waited
        // until some other connection closed).
        if state.idle > state.todo.len() {
            state.todo.push_back((sock, remote, live));
            self.sharing.condvar.notify_one();
            return Ok(());
        }
        let (sharing, serve) = (self.sharing.clone(), self.serve.clone());
        let first = Mutex::new(Some((sock, remote, live)));
        let first = Arc::new(first);
        let theirs = first.clone();
        let spawned = thread::Builder::new()
            .name("connection".into())
            .stack_size(self.stack)
            .spawn(move || {
                let job = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                drop(theirs);
                work(&sharing, &serve, job);
            });
        match spawned {
            Ok(_) => {
                state.threads += 1;
                Ok(())
            }
            Err(e) => {
                let job = first.lock().unwrap_or_else(|p| p.into_inner()).take();
                match job {
                    Some((sock, _, _)) => Err((e, sock)),
                    None => Ok(()),
                }
            }
        }
    }
}

fn work(sharing: &Sharing, serve: &Serve, mut job: Option<Job>) {
    loop {
        if let Some((sock, remote, live)) = job.take() {
            serve(sock, remote, live);
        }
        let mut state = sharing.state.lock().unwrap_or_else(|p| p.into_inner());
        state.idle += 1;
        loop {
            if let Some(next) = state.todo.pop_front() {
                job = Some(next);
                break;
            }
            let keep = state.threads <= MIN_THREADS;
            let (s, waited) = if keep {
                (
                    sharing
                        .condvar
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner()),
                    false,
                )
            } else {
                let (s, w) = sharing
                    .condvar
                    .wait_timeout(state, IDLE)
                    .unwrap_or_else(|p| p.into_inner());
                (s, w.timed_out())
            };
            state = s;
            if waited && state.todo.is_empty() {
                state.idle -= 1;
                state.threads -= 1;
                return;
            }
        }
        state.idle -= 1;
    }
}
