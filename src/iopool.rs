//! Threads for the blocking pipe I/O of invocations (feeding stdin, pumping
//! stdout and stderr, waiting for exits), started on demand and then kept.
//! A thread per job would cost a spawn on every request and, with musl's
//! allocator, memory that is never given back.

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex};

use log::warn;

type Job = Box<dyn FnOnce() + Send>;

/// Most threads the pool starts; past it, jobs wait for a free thread.
const MAX_THREADS: usize = 256;
/// Stack of each thread: the jobs only move bytes between pipes and channels.
const STACK: usize = 128 * 1024;

struct Pool {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    /// Threads not running a job: waiting, or about to look at the queue.
    idle: usize,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool {
    state: Mutex::default(),
    wake: Condvar::new(),
});

/// Runs `job` on a pool thread, starting one if none is free for it.
pub fn run(job: impl FnOnce() + Send + 'static) {
    let mut state = POOL.state.lock().unwrap_or_else(|p| p.into_inner());
    state.jobs.push_back(Box::new(job));
    // Start a thread only when the queued jobs outnumber the threads free to take them.
    if state.jobs.len() > state.idle && state.threads < MAX_THREADS {
        let spawned = std::thread::Builder::new()
            .name("io".into())
            .stack_size(STACK)
            .spawn(work);
        match spawned {
            Ok(_) => {
                state.threads += 1;
                state.idle += 1;
            }
            // The job waits for a busy thread to come free: slower, not lost.
            Err(e) => warn!("cannot start an I/O thread: {e}"),
        }
    }
    drop(state);
    POOL.wake.notify_one();
}

fn work() {
    let mut state = POOL.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if let Some(job) = state.jobs.pop_front() {
            state.idle -= 1;
            drop(state);
            job();
            state = POOL.state.lock().unwrap_or_else(|p| p.into_inner());
            state.idle += 1;
            continue;
        }
        state = POOL.wake.wait(state).unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Waits until every pool thread is free, then returns how many there are.
    fn settled() -> usize {
        for _ in 0..1000 {
            let s = super::POOL.state.lock().unwrap();
            if s.idle == s.threads && s.jobs.is_empty() {
                return s.threads;
            }
            drop(s);
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the pool did not settle");
    }

    #[test]
    fn jobs_run_and_a_free_thread_is_reused() {
        let (tx, rx) = std::sync::mpsc::channel();
        super::run(|| ());
        let before = settled();
        for i in 0..50 {
            let tx = tx.clone();
            super::run(move || tx.send(i).unwrap());
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), i);
            settled();
        }
        assert_eq!(settled(), before, "sequential jobs started new threads");
        // Jobs that block all at once each get a thread: none waits behind another.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
        for i in 0..8 {
            let (tx, go_rx) = (tx.clone(), go_rx.clone());
            super::run(move || {
                tx.send(i).unwrap();
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
            });
        }
        let mut started: Vec<i32> = (0..8)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        started.sort();
        assert_eq!(started, (0..8).collect::<Vec<_>>());
        for _ in 0..8 {
            go_tx.send(()).unwrap();
        }
    }
}
