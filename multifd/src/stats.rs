//! The pools' liveness: per-channel activity ticks and the stall clock that
//! watches them. (The counters of pages and bytes moved live in
//! `ferry_ram::Counters`, shared with file mode.)

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Per channel, a tick count that moves whenever the channel makes
/// progress (a packet sent or received, a wait for the rate limit): what
/// the pools' deadlines watch to tell a slow channel from a stalled one.
#[derive(Debug)]
pub struct Activity {
    ticks: Box<[AtomicU64]>,
}

impl Activity {
    pub fn new(channels: usize) -> Self {
        Self {
            ticks: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Channel `index` made progress.
    pub fn bump(&self, index: usize) {
        if let Some(t) = self.ticks.get(index) {
            t.fetch_add(1, Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.ticks.iter().map(|t| t.load(Relaxed)).collect()
    }
}

/// Watches an [`Activity`]: `stalled` says which channels of those still
/// owing something have not moved for `limit`.
pub(crate) struct StallClock {
    last: Vec<u64>,
    since: Vec<std::time::Instant>,
    limit: std::time::Duration,
}

impl StallClock {
    pub fn new(activity: &Activity, limit: std::time::Duration) -> Self {
        let last = activity.snapshot();
        let now = std::time::Instant::now();
        Self {
            since: vec![now; last.len()],
            last,
            limit,
        }
    }

    /// The first channel among `owing` that has not moved for the limit.
    pub fn stalled(&mut self, activity: &Activity, owing: impl Fn(usize) -> bool) -> Option<usize> {
        let now = std::time::Instant::now();
        let ticks = activity.snapshot();
        let mut stalled = None;
        for (i, &t) in ticks.iter().enumerate() {
            if t != self.last[i] || !owing(i) {
                self.last[i] = t;
                self.since[i] = now;
            } else if stalled.is_none() && now.duration_since(self.since[i]) >= self.limit {
                stalled = Some(i);
            }
        }
        stalled
    }

    pub fn limit(&self) -> std::time::Duration {
        self.limit
    }
}
