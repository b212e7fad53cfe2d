//! What a running pass can be told from outside: stop early (cancel), and
//! how fast it may go (the `max-bandwidth` rate limit).
//!
//! Every thread of a [`crate::SenderPool`] shares one [`PassControl`]. The
//! rate limit works like QEMU's: time is cut into 100 ms windows and a
//! window may carry `rate / 10` bytes; once the window's share is used,
//! senders wait for the next window before they read more pages (bytes
//! beyond a window's share are owed by the next ones). An interrupted pass claims no more
//! chunks, so each channel ends it with its SYNC as usual and the stream
//! stays well formed for a clean CANCEL on the main channel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The length of one rate-limit window.
const WINDOW: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct PassControl {
    interrupted: AtomicBool,
    /// Bytes per second a pass may send on all channels together; 0: no limit.
    max_bandwidth: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    bytes: u64,
}

impl Default for PassControl {
    fn default() -> Self {
        Self {
            interrupted: AtomicBool::new(false),
            max_bandwidth: AtomicU64::new(0),
            window: Mutex::new(Window {
                started: Instant::now(),
                bytes: 0,
            }),
        }
    }
}

impl PassControl {
    /// Ends the running pass (and any later one) after the packets already
    /// prepared: senders claim nothing more and send their SYNC.
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::Release);
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Acquire)
    }

    /// Sets the limit in bytes per second (0: none); takes effect at once.
    pub fn set_max_bandwidth(&self, bytes_per_second: u64) {
        self.max_bandwidth
            .store(bytes_per_second, Ordering::Relaxed);
    }

    pub fn max_bandwidth(&self) -> u64 {
        self.max_bandwidth.load(Ordering::Relaxed)
    }

    /// Accounts `bytes` just prepared for sending.
    pub(crate) fn account(&self, bytes: u64) {
        if self.max_bandwidth() == 0 {
            return;
        }
        let mut w = self.window.lock().unwrap();
        self.roll(&mut w);
        w.bytes += bytes;
    }

    /// Sleeps while the current window's share is used up (or until
    /// interrupted); returns at once without a limit.
    pub(crate) fn wait_turn(&self) {
        let rate = self.max_bandwidth();
        if rate == 0 {
            return;
        }
        let per_window = (rate / 10).max(1);
        let wait = {
            let mut w = self.window.lock().unwrap();
            self.roll(&mut w);
            if w.bytes < per_window {
                return;
            }
            // Bytes beyond this window's share are owed by the next ones.
            let until = w.started + WINDOW * (w.bytes / per_window) as u32;
            until.saturating_duration_since(Instant::now())
        };
        self.sleep_unless_interrupted(wait);
    }

    /// Opens a new window when the current one is over, carrying over
    /// what was sent beyond its share.
    fn roll(&self, w: &mut Window) {
        let now = Instant::now();
        let elapsed = now.duration_since(w.started);
        if elapsed < WINDOW {
            return;
        }
        let per_window = (self.max_bandwidth() / 10).max(1);
        let windows = (elapsed.as_nanos() / WINDOW.as_nanos()) as u64;
        w.bytes = w.bytes.saturating_sub(per_window.saturating_mul(windows));
        w.started = now;
    }

    fn sleep_unless_interrupted(&self, mut wait: Duration) {
        let step = Duration::from_millis(10);
        while !wait.is_zero() && !self.is_interrupted() {
            let d = wait.min(step);
            std::thread::sleep(d);
            wait -= d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_never_sleeps_and_interrupt_sticks() {
        let c = PassControl::default();
        for _ in 0..1000 {
            c.wait_turn();
            c.account(1 << 20);
        }
        assert_eq!(
            c.window.lock().unwrap().bytes,
            0,
            "nothing accounted without a limit"
        );
        assert!(!c.is_interrupted());
        c.interrupt();
        assert!(c.is_interrupted());
    }

    #[test]
    fn limit_spreads_bytes_over_windows() {
        let c = PassControl::default();
        c.set_max_bandwidth(10 << 20); // 1 MiB per 100 ms window
        let t = Instant::now();
        for _ in 0..3 {
            c.wait_turn();
            c.account(1 << 20);
        }
        c.wait_turn();
        // Three windows' worth of bytes cannot pass in less than two windows.
        assert!(t.elapsed() >= WINDOW * 2, "{:?}", t.elapsed());
    }
}
