//! COLO's mode and failover state, as `query-colo-status` reports them
//! (QEMU's COLOMode, FailoverStatus and COLOExitReason).
//!
//! Failover moves `none → require → active → completed`. A failover asked
//! for while the secondary loads a checkpoint goes to `relaunch` instead:
//! the load finishes (or fails) first, then the failover completes. The
//! seeds park the secondary there for good; here the loop that finished
//! the load sees [`StatusCell::failover_pending`] and completes it.

use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColoMode {
    None,
    Primary,
    Secondary,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverState {
    None,
    Require,
    Active,
    Relaunch,
    Completed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverReason {
    None,
    /// `ferry ctl SOCK failover`.
    Request,
    /// The peer went silent, a channel broke, a message came out of order.
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ColoStatus {
    pub mode: ColoMode,
    pub last_mode: ColoMode,
    pub reason: FailoverReason,
    pub failover: FailoverState,
    /// The error that ended COLO, when the reason is `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

struct Inner {
    status: ColoStatus,
    loading: bool,
}

/// The status, shared by the COLO loop and the control socket.
pub struct StatusCell {
    inner: Mutex<Inner>,
}

impl Default for StatusCell {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusCell {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                status: ColoStatus {
                    mode: ColoMode::None,
                    last_mode: ColoMode::None,
                    reason: FailoverReason::None,
                    failover: FailoverState::None,
                    error: None,
                },
                loading: false,
            }),
        }
    }

    pub fn get(&self) -> ColoStatus {
        self.inner.lock().unwrap().status.clone()
    }

    /// COLO starts in `mode`.
    pub fn enter(&self, mode: ColoMode) {
        let mut i = self.inner.lock().unwrap();
        i.status.mode = mode;
    }

    /// The secondary starts or ends loading a checkpoint.
    pub fn set_loading(&self, loading: bool) {
        self.inner.lock().unwrap().loading = loading;
    }

    /// Asks for a failover; returns the state it is now in. A second ask
    /// changes nothing; with COLO not running it is refused (`None`).
    pub fn request(&self, reason: FailoverReason, error: Option<String>) -> Option<FailoverState> {
        let mut i = self.inner.lock().unwrap();
        if i.status.mode == ColoMode::None {
            return None;
        }
        if i.status.failover == FailoverState::None {
            i.status.failover = if i.loading {
                FailoverState::Relaunch
            } else {
                FailoverState::Require
            };
            i.status.reason = reason;
            i.status.error = error;
        }
        Some(i.status.failover)
    }

    /// Whether a failover waits to be carried out.
    pub fn failover_pending(&self) -> bool {
        matches!(
            self.inner.lock().unwrap().status.failover,
            FailoverState::Require | FailoverState::Relaunch | FailoverState::Active
        )
    }

    /// The loop carries the failover out.
    pub fn begin(&self) {
        let mut i = self.inner.lock().unwrap();
        i.status.failover = FailoverState::Active;
    }

    /// The survivor runs alone: COLO is over.
    pub fn complete(&self) {
        let mut i = self.inner.lock().unwrap();
        i.status.failover = FailoverState::Completed;
        i.status.last_mode = i.status.mode;
        i.status.mode = ColoMode::None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_during_a_load_relaunches_and_then_completes() {
        let s = StatusCell::new();
        assert_eq!(s.request(FailoverReason::Request, None), None);
        s.enter(ColoMode::Secondary);
        s.set_loading(true);
        assert_eq!(
            s.request(FailoverReason::Request, None),
            Some(FailoverState::Relaunch)
        );
        // An error afterwards does not change the reason.
        s.request(FailoverReason::Error, Some("x".into()));
        s.set_loading(false);
        assert!(s.failover_pending());
        s.begin();
        s.complete();
        let st = s.get();
        assert_eq!(
            (st.mode, st.last_mode, st.reason, st.failover),
            (
                ColoMode::None,
                ColoMode::Secondary,
                FailoverReason::Request,
                FailoverState::Completed
            )
        );
        assert!(!s.failover_pending());
    }
}
