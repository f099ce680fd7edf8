//! Gauges held by RAII guards, so every increment has its decrement.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Invocations running now, with a ceiling.
pub struct InFlight {
    now: AtomicUsize,
    max: usize,
}

/// One running invocation; dropping it frees its slot.
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// A gauge that admits at most `max` at once.
    pub fn new(max: usize) -> InFlight {
        InFlight {
            now: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a slot, or `None` when all `max` are taken.
    pub fn try_enter(&self) -> Option<InFlightGuard<'_>> {
        let admitted = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| InFlightGuard(self))
    }

    /// How many are running.
    pub fn current(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_returned_on_drop() {
        let g = InFlight::new(2);
        let a = g.try_enter().unwrap();
        let _b = g.try_enter().unwrap();
        assert!(g.try_enter().is_none());
        drop(a);
        assert_eq!(g.current(), 1);
        assert!(g.try_enter().is_some());
    }
}
