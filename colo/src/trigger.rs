//! What starts a checkpoint: the period (`--checkpoint-delay`), a request
//! (`ferry ctl SOCK checkpoint`) or an output mismatch.
//!
//! Requests coalesce: however many arrive while one is pending, they make
//! one checkpoint; however many arrive while a checkpoint runs, they make
//! at most one more after it (QEMU's checkpoint event is set once). The
//! period counts from the end of the last checkpoint, so a slow checkpoint
//! is never followed at once by a periodic one (no back-to-back
//! checkpoints). Changing the delay wakes the waiter, so a shorter delay
//! takes effect at once.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    Periodic,
    Request,
    Mismatch,
}

/// Checkpoints taken, by trigger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TriggerCounts {
    pub periodic: u64,
    pub request: u64,
    pub mismatch: u64,
    /// Requests merged into a checkpoint already due.
    pub coalesced: u64,
}

struct State {
    delay: Duration,
    /// When the period is next due.
    due: Instant,
    pending: Option<TriggerKind>,
    running: bool,
    stopped: bool,
    /// Wakes a waiter without a checkpoint (it returns `None`).
    poked: bool,
    counts: TriggerCounts,
}

pub struct Triggers {
    state: Mutex<State>,
    cv: Condvar,
}

impl Triggers {
    pub fn new(delay: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                delay,
                due: Instant::now() + delay,
                pending: None,
                running: false,
                stopped: false,
                poked: false,
                counts: TriggerCounts::default(),
            }),
            cv: Condvar::new(),
        }
    }

    /// Asks for a checkpoint (request or mismatch).
    pub fn request(&self, kind: TriggerKind) {
        let mut s = self.state.lock().unwrap();
        if s.pending.is_some() {
            s.counts.coalesced += 1;
        } else {
            s.pending = Some(kind);
        }
        self.cv.notify_all();
    }

    /// Changes the period; it takes effect at once (counted from the end
    /// of the last checkpoint).
    pub fn set_delay(&self, delay: Duration) {
        let mut s = self.state.lock().unwrap();
        let last = s.due.checked_sub(s.delay).unwrap_or_else(Instant::now);
        s.delay = delay;
        s.due = last + delay;
        self.cv.notify_all();
    }

    /// Whether [`Triggers::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.state.lock().unwrap().stopped
    }

    pub fn delay(&self) -> Duration {
        self.state.lock().unwrap().delay
    }

    /// Wakes the waiter without asking for a checkpoint (its caller has
    /// something else to look at, e.g. a poweroff).
    pub fn poke(&self) {
        self.state.lock().unwrap().poked = true;
        self.cv.notify_all();
    }

    /// Ends every wait (COLO is over).
    pub fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.cv.notify_all();
    }

    /// Waits for the next checkpoint's trigger, at most `at_most` (then
    /// `None`, as after [`Triggers::stop`]). The checkpoint runs until
    /// [`Triggers::done`].
    pub fn wait(&self, at_most: Duration) -> Option<TriggerKind> {
        let until = Instant::now() + at_most;
        let mut s = self.state.lock().unwrap();
        loop {
            if s.stopped {
                return None;
            }
            if std::mem::take(&mut s.poked) {
                return None;
            }
            let now = Instant::now();
            let kind = match s.pending.take() {
                Some(k) => Some(k),
                None if now >= s.due => Some(TriggerKind::Periodic),
                None => None,
            };
            if let Some(k) = kind {
                s.running = true;
                match k {
                    TriggerKind::Periodic => s.counts.periodic += 1,
                    TriggerKind::Request => s.counts.request += 1,
                    TriggerKind::Mismatch => s.counts.mismatch += 1,
                }
                return Some(k);
            }
            if now >= until {
                return None;
            }
            let wake = s.due.min(until);
            s = self.cv.wait_timeout(s, wake - now).unwrap().0;
        }
    }

    /// The checkpoint ended: the period starts again from now.
    pub fn done(&self) {
        let mut s = self.state.lock().unwrap();
        s.running = false;
        s.due = Instant::now() + s.delay;
    }

    pub fn counts(&self) -> TriggerCounts {
        self.state.lock().unwrap().counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_burst_during_a_checkpoint_yields_at_most_one_more() {
        let t = Triggers::new(LONG);
        t.request(TriggerKind::Mismatch);
        assert_eq!(t.wait(LONG), Some(TriggerKind::Mismatch));
        // 100 mismatches while the checkpoint runs.
        for _ in 0..100 {
            t.request(TriggerKind::Mismatch);
        }
        t.done();
        assert_eq!(t.wait(LONG), Some(TriggerKind::Mismatch));
        t.done();
        // Nothing else is due: the next wait times out.
        assert_eq!(t.wait(Duration::from_millis(30)), None);
        let c = t.counts();
        assert_eq!((c.mismatch, c.coalesced), (2, 99));
    }

    #[test]
    fn the_period_counts_from_the_end_and_a_new_delay_applies_at_once() {
        let t = Triggers::new(LONG);
        // With an hour's delay nothing comes...
        assert_eq!(t.wait(Duration::from_millis(20)), None);
        // ...and a delay of zero makes the period due at once.
        t.set_delay(Duration::ZERO);
        assert_eq!(t.wait(LONG), Some(TriggerKind::Periodic));
        t.set_delay(LONG);
        t.done();
        // The period restarted at done(): not due again.
        assert_eq!(t.wait(Duration::from_millis(20)), None);
        // A waiter is woken by a request from another thread.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                t.request(TriggerKind::Request);
            });
            assert_eq!(t.wait(LONG), Some(TriggerKind::Request));
        });
        // A poke wakes the waiter with no checkpoint and no count.
        t.poke();
        assert_eq!(t.wait(LONG), None);
        t.stop();
        assert_eq!(t.wait(LONG), None);
        assert_eq!(t.counts().periodic, 1);
        assert_eq!(t.counts().request, 1);
    }
}
