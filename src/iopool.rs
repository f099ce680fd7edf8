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
    idle: usize,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool {
    state: Mutex::default(),
    wake: Condvar::new(),
});

/// Runs `job` on a pool thread, starting one if none is idle.
pub fn run(job: impl FnOnce() + Send + 'static) {
    let mut state = POOL.state.lock().unwrap_or_else(|p| p.into_inner());
    state.jobs.push_back(Box::new(job));
    if state.idle == 0 && state.threads < MAX_THREADS {
        let spawned = std::thread::Builder::new()
            .name("io".into())
            .stack_size(STACK)
            .spawn(work);
        match spawned {
            Ok(_) => state.threads += 1,
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
            drop(state);
            job();
            state = POOL.state.lock().unwrap_or_else(|p| p.into_inner());
            continue;
        }
        state.idle += 1;
        state = POOL.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        state.idle -= 1;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jobs_run_and_threads_are_reused() {
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..100 {
            let tx = tx.clone();
            super::run(move || tx.send(i).unwrap());
        }
        let mut got: Vec<i32> = (0..100).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        let threads = super::POOL.state.lock().unwrap().threads;
        assert!(threads < 100, "{threads} threads for 100 quick jobs");
    }
}
