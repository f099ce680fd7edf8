//! Admission: at most `max_running` jobs run at once (and no more of one
//! function than its own limit); the rest wait in first-come order, at most
//! `max_queue` of them and at most `timeout` each. A waiting job is data, not a
//! thread: the worker that frees a slot runs the next job that fits.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a job was not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue was full.
    Full,
    /// It waited longer than the queue timeout.
    TimedOut,
    /// The daemon is shutting down.
    ShuttingDown,
}

/// A unit of work that waits for a slot: an HTTP invocation, an install, an event.
pub trait Job: Send {
    /// What the per-key limit counts (a function's name).
    fn key(&self) -> &str;
    /// How many jobs of this key may run at once.
    fn limit(&self) -> usize {
        usize::MAX
    }
    /// Runs the job; `slot` is freed when dropped.
    fn run(self: Box<Self>, slot: Slot);
    /// Tells the job's owner it will not run.
    fn refuse(self: Box<Self>, why: Refused);
}

/// A job that may run now, with the slot it holds.
pub struct Admitted {
    pub job: Box<dyn Job>,
    pub slot: Slot,
}

impl Admitted {
    /// Runs the job, freeing its slot when it is done.
    pub fn run(self) {
        self.job.run(self.slot);
    }
}

/// One running job's hold on the lane; dropping it lets the next job in.
pub struct Slot {
    lane: Arc<Lane>,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.lane.release(&self.key);
    }
}

struct Waiting {
    job: Box<dyn Job>,
    since: Instant,
}

#[derive(Default)]
struct State {
    running: usize,
    by_key: HashMap<String, usize>,
    waiting: VecDeque<Waiting>,
    /// Admitted jobs no thread has taken yet.
    ready: VecDeque<Admitted>,
    closed: bool,
}

/// One admission queue (invocations, or installs).
pub struct Lane {
    max_running: usize,
    max_queue: usize,
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes a worker when a job is admitted from outside the workers.
    wake: Box<dyn Fn() + Send + Sync>,
}

/// What `submit` did with a job.
pub enum Submitted {
    /// It may run now, in the caller's thread.
    Run(Admitted),
    /// It waits for a slot (or was refused; its owner was told).
    Later,
}

impl Lane {
    /// A lane of `max_running` slots and a queue of `max_queue` waiting at most `timeout`.
    pub fn new(
        max_running: usize,
        max_queue: usize,
        timeout: Duration,
        wake: Box<dyn Fn() + Send + Sync>,
    ) -> Arc<Lane> {
        Arc::new(Lane {
            max_running,
            max_queue,
            timeout,
            state: Mutex::default(),
            wake,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `job` now if it fits, else queues it; a full queue or a closed lane refuses it.
    pub fn submit(self: &Arc<Self>, job: Box<dyn Job>) -> Submitted {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            job.refuse(Refused::ShuttingDown);
            return Submitted::Later;
        }
        // Jobs still waiting wait for their own function's limit (a free slot would
        // have admitted them), so a job that fits does not jump ahead of anyone.
        if self.fits(&state, job.key(), job.limit()) {
            let slot = self.take(&mut state, job.key());
            return Submitted::Run(Admitted { job, slot });
        }
        if state.waiting.len() >= self.max_queue {
            drop(state);
            job.refuse(Refused::Full);
            return Submitted::Later;
        }
        state.waiting.push_back(Waiting {
            job,
            since: Instant::now(),
        });
        Submitted::Later
    }

    /// Like `submit`, but a job that may run now is handed to a worker (woken)
    /// instead of the caller: for events, whose threads must not run functions.
    pub fn submit_detached(self: &Arc<Self>, job: Box<dyn Job>) {
        if let Submitted::Run(admitted) = self.submit(job) {
            self.lock().ready.push_back(admitted);
            (self.wake)();
        }
    }

    /// An admitted job that no thread runs yet.
    pub fn next_ready(&self) -> Option<Admitted> {
        self.lock().ready.pop_front()
    }

    /// Refuses the jobs that waited too long; returns how long until the next one would.
    pub fn expire(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut state = self.lock();
            while state
                .waiting
                .front()
                .is_some_and(|w| now.duration_since(w.since) >= self.timeout)
            {
                if let Some(w) = state.waiting.pop_front() {
                    expired.push(w.job);
                }
            }
            state
                .waiting
                .front()
                .map(|w| (w.since + self.timeout).saturating_duration_since(now))
        };
        for job in expired {
            job.refuse(Refused::TimedOut);
        }
        next
    }

    /// Refuses every waiting job and every later one (shutdown).
    pub fn close(&self) {
        let waiting: Vec<Waiting> = {
            let mut state = self.lock();
            state.closed = true;
            state.waiting.drain(..).collect()
        };
        for w in waiting {
            w.job.refuse(Refused::ShuttingDown);
        }
    }

    /// Jobs running now and jobs waiting.
    pub fn depth(&self) -> (usize, usize) {
        let state = self.lock();
        (state.running, state.waiting.len())
    }

    fn fits(&self, state: &State, key: &str, limit: usize) -> bool {
        state.running < self.max_running && state.by_key.get(key).copied().unwrap_or(0) < limit
    }

    fn take(self: &Arc<Self>, state: &mut State, key: &str) -> Slot {
        state.running += 1;
        *state.by_key.entry(key.to_string()).or_insert(0) += 1;
        Slot {
            lane: self.clone(),
            key: key.to_string(),
        }
    }

    /// Frees a slot and admits the first waiting job that now fits.
    fn release(self: &Arc<Self>, key: &str) {
        let mut state = self.lock();
        state.running -= 1;
        if let Some(n) = state.by_key.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                state.by_key.remove(key);
            }
        }
        if state.closed {
            return;
        }
        let next = state
            .waiting
            .iter()
            .position(|w| self.fits(&state, w.job.key(), w.job.limit()));
        if let Some(w) = next.and_then(|i| state.waiting.remove(i)) {
            let slot = self.take(&mut state, w.job.key());
            state.ready.push_back(Admitted { job: w.job, slot });
            drop(state);
            (self.wake)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Probe {
        key: &'static str,
        limit: usize,
        id: u32,
        log: mpsc::Sender<(u32, Result<(), Refused>)>,
        hold: Option<mpsc::Sender<Slot>>,
    }

    impl Job for Probe {
        fn key(&self) -> &str {
            self.key
        }
        fn limit(&self) -> usize {
            self.limit
        }
        fn run(self: Box<Self>, slot: Slot) {
            let _ = self.log.send((self.id, Ok(())));
            if let Some(h) = &self.hold {
                let _ = h.send(slot);
            }
        }
        fn refuse(self: Box<Self>, why: Refused) {
            let _ = self.log.send((self.id, Err(why)));
        }
    }

    fn lane(running: usize, queue: usize, timeout: Duration) -> Arc<Lane> {
        Lane::new(running, queue, timeout, Box::new(|| {}))
    }

    #[test]
    fn jobs_past_the_limit_wait_in_order_and_run_as_slots_free() {
        let l = lane(1, 10, Duration::from_secs(60));
        let (log, seen) = mpsc::channel();
        let (hold, slots) = mpsc::channel();
        let probe = |id| {
            Box::new(Probe {
                key: "f",
                limit: usize::MAX,
                id,
                log: log.clone(),
                hold: Some(hold.clone()),
            })
        };
        match l.submit(probe(1)) {
            Submitted::Run(a) => a.run(),
            Submitted::Later => panic!("first job should run at once"),
        }
        assert!(matches!(l.submit(probe(2)), Submitted::Later));
        assert!(matches!(l.submit(probe(3)), Submitted::Later));
        assert_eq!(seen.recv().unwrap(), (1, Ok(())));
        assert_eq!(l.depth(), (1, 2));
        drop(slots.recv().unwrap());
        l.next_ready().expect("job 2 admitted").run();
        assert_eq!(seen.recv().unwrap(), (2, Ok(())));
        assert!(l.next_ready().is_none());
        drop(slots.recv().unwrap());
        l.next_ready().expect("job 3 admitted").run();
        assert_eq!(seen.recv().unwrap(), (3, Ok(())));
    }

    #[test]
    fn a_full_queue_refuses_and_old_jobs_time_out() {
        let l = lane(1, 1, Duration::from_millis(1));
        let (log, seen) = mpsc::channel();
        let (hold, _slots) = mpsc::channel();
        let probe = |id| {
            Box::new(Probe {
                key: "f",
                limit: usize::MAX,
                id,
                log: log.clone(),
                hold: Some(hold.clone()),
            })
        };
        if let Submitted::Run(a) = l.submit(probe(1)) {
            a.run();
        }
        let _ = l.submit(probe(2));
        let _ = l.submit(probe(3));
        assert_eq!(seen.recv().unwrap(), (1, Ok(())));
        assert_eq!(seen.recv().unwrap(), (3, Err(Refused::Full)));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l.expire(), None);
        assert_eq!(seen.recv().unwrap(), (2, Err(Refused::TimedOut)));
        l.close();
        let _ = l.submit(probe(4));
        assert_eq!(seen.recv().unwrap(), (4, Err(Refused::ShuttingDown)));
    }

    #[test]
    fn a_function_at_its_own_limit_does_not_block_others() {
        let l = lane(3, 10, Duration::from_secs(60));
        let (log, seen) = mpsc::channel();
        let (hold, slots) = mpsc::channel();
        let probe = |id, key| {
            Box::new(Probe {
                key,
                limit: 1,
                id,
                log: log.clone(),
                hold: Some(hold.clone()),
            })
        };
        if let Submitted::Run(a) = l.submit(probe(1, "a")) {
            a.run();
        }
        assert!(matches!(l.submit(probe(2, "a")), Submitted::Later));
        // "b" runs beside the waiting "a": slots are free, only "a" is at its limit.
        match l.submit(probe(3, "b")) {
            Submitted::Run(a) => a.run(),
            Submitted::Later => panic!("b should not wait behind a's limit"),
        }
        assert_eq!(seen.recv().unwrap(), (1, Ok(())));
        assert_eq!(seen.recv().unwrap(), (3, Ok(())));
        let first_a = slots.recv().unwrap();
        let _b = slots.recv().unwrap();
        drop(first_a);
        l.next_ready().expect("a admitted").run();
        assert_eq!(seen.recv().unwrap(), (2, Ok(())));
        assert!(l.next_ready().is_none());
    }
}
