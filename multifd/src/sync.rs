//! The per-pass sync barrier and the shared stop signal of a pool.
//!
//! Every receiver thread that reads the SYNC packet of generation g arrives
//! at the barrier and waits until all K channels have done so; only then
//! does any of them read packets of generation g+1. So a stale copy of a
//! page from a slow channel can never overwrite a newer one.

use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct State {
    /// The highest generation all channels have passed.
    completed: u64,
    /// How many channels have arrived at `completed + 1`.
    arrived: usize,
    /// Set once anything fails; every waiter returns.
    stopped: Option<String>,
    /// A channel sent END: the last sync it passed (the lowest of such
    /// channels). No later sync can complete.
    ended_after: Option<u64>,
    /// How many channels have received their END and ended cleanly.
    closed: usize,
}

impl State {
    /// Why the sync of `generation` can never complete, if it cannot.
    fn unreachable(&self, generation: u64) -> Option<String> {
        self.ended_after.filter(|&e| e < generation).map(|e| {
            format!(
                "a multifd channel ended (END) after the sync of pass {e}, \
                 so the sync of pass {generation} cannot complete"
            )
        })
    }
}

pub(crate) struct SyncBarrier {
    channels: usize,
    state: Mutex<State>,
    cv: Condvar,
}

impl SyncBarrier {
    pub fn new(channels: usize) -> Self {
        Self {
            channels,
            state: Mutex::default(),
            cv: Condvar::new(),
        }
    }

    /// Channel arrives at the sync of `generation` and waits for the others.
    /// The last to arrive runs `between` before any channel goes on, while
    /// no channel is inside a pass. Returns the reason if the pool was
    /// stopped meanwhile.
    pub fn arrive(&self, generation: u64, between: impl FnOnce()) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        if generation != s.completed + 1 {
            return Err(format!(
                "sync of generation {generation} while generation {} was due",
                s.completed + 1
            ));
        }
        s.arrived += 1;
        if s.arrived == self.channels {
            between();
            s.completed = generation;
            s.arrived = 0;
            self.cv.notify_all();
            return Ok(());
        }
        while s.completed < generation && s.stopped.is_none() && s.unreachable(generation).is_none()
        {
            s = self.cv.wait(s).unwrap();
        }
        if s.completed >= generation {
            return Ok(());
        }
        Err(s
            .stopped
            .clone()
            .or_else(|| s.unreachable(generation))
            .unwrap_or_default())
    }

    /// Waits until every channel has passed the sync of `generation`.
    #[cfg(test)]
    pub fn wait_completed(&self, generation: u64) -> Result<(), String> {
        let mut s = self.state.lock().unwrap();
        while s.completed < generation {
            if let Some(why) = s.stopped.clone().or_else(|| s.unreachable(generation)) {
                return Err(why);
            }
            s = self.cv.wait(s).unwrap();
        }
        Ok(())
    }

    /// Waits at most `wait` for every channel to pass the sync of
    /// `generation`; `Ok(false)` if they have not yet.
    pub fn wait_completed_for(
        &self,
        generation: u64,
        wait: std::time::Duration,
    ) -> Result<bool, String> {
        let mut s = self.state.lock().unwrap();
        if s.completed < generation && s.stopped.is_none() {
            s = self.cv.wait_timeout(s, wait).unwrap().0;
        }
        if s.completed >= generation {
            return Ok(true);
        }
        match s.stopped.clone().or_else(|| s.unreachable(generation)) {
            Some(why) => Err(why),
            None => Ok(false),
        }
    }

    /// A channel has ended cleanly: its END came, and for TLS its
    /// close_notify after it.
    pub fn closed(&self) {
        self.state.lock().unwrap().closed += 1;
        self.cv.notify_all();
    }

    /// Waits at most `wait` for every channel to end cleanly; `Ok(false)`
    /// if some have not yet.
    pub fn wait_closed_for(&self, wait: std::time::Duration) -> Result<bool, String> {
        let mut s = self.state.lock().unwrap();
        if s.closed < self.channels && s.stopped.is_none() {
            s = self.cv.wait_timeout(s, wait).unwrap().0;
        }
        match &s.stopped {
            Some(why) => Err(why.clone()),
            None => Ok(s.closed >= self.channels),
        }
    }

    /// A channel received END while `next` was the pass it expected: it
    /// passed every sync before `next` and will pass no more.
    pub fn end(&self, next: u64) {
        let mut s = self.state.lock().unwrap();
        let through = next.saturating_sub(1);
        s.ended_after = Some(s.ended_after.map_or(through, |e| e.min(through)));
        self.cv.notify_all();
    }

    #[cfg(test)]
    pub fn completed(&self) -> u64 {
        self.state.lock().unwrap().completed
    }

    /// Releases every waiter with `why`; the first reason is kept.
    pub fn stop(&self, why: &str) {
        let mut s = self.state.lock().unwrap();
        s.stopped.get_or_insert_with(|| why.to_string());
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn nobody_passes_before_all_arrive_and_the_last_runs_between() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let b = Arc::new(SyncBarrier::new(3));
        let between = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (b, between) = (b.clone(), between.clone());
                std::thread::spawn(move || {
                    b.arrive(1, || {
                        between.fetch_add(1, Ordering::SeqCst);
                    })
                    .map(|()| between.load(Ordering::SeqCst))
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(b.completed(), 0);
        assert_eq!(between.load(Ordering::SeqCst), 0);
        b.arrive(1, || {
            between.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // `between` ran once, and before either waiter went on.
        for h in hs {
            assert_eq!(h.join().unwrap().unwrap(), 1);
        }
        b.wait_completed(1).unwrap();
        assert!(b.arrive(3, || ()).is_err());
    }

    /// A channel that arrived at the sync of pass 1 and is (very likely,
    /// after 20 ms) waiting there for the other.
    fn one_waiting_at_sync_1(b: &Arc<SyncBarrier>) -> std::thread::JoinHandle<Result<(), String>> {
        let b = b.clone();
        let h = std::thread::spawn(move || b.arrive(1, || ()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        h
    }

    #[test]
    fn a_channel_that_ended_releases_waiters_of_later_syncs() {
        let b = Arc::new(SyncBarrier::new(2));
        let h = one_waiting_at_sync_1(&b);
        b.end(1); // the other channel sent END before the sync of pass 1
        let e = h.join().unwrap().unwrap_err();
        assert!(e.contains("ended (END) after the sync of pass 0"), "{e}");
        assert!(b.wait_completed(1).is_err());
        // Ending after the last sync is the normal end: nothing fails.
        let b = SyncBarrier::new(1);
        b.arrive(1, || ()).unwrap();
        b.end(2);
        b.wait_completed(1).unwrap();
    }

    #[test]
    fn stop_releases_waiters() {
        let b = Arc::new(SyncBarrier::new(2));
        let h = one_waiting_at_sync_1(&b);
        b.stop("channel 1 failed");
        assert_eq!(h.join().unwrap().unwrap_err(), "channel 1 failed");
        assert!(b.wait_completed(1).is_err());
    }
}
