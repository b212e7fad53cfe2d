//! ferry-colo: the parts of COLO (COarse-grained LOck-stepping, QEMU's
//! `migration/colo.c`) that do not drive a guest. The controller
//! (`ferry`'s `src/colo/`) runs the primary and secondary loops over a
//! `Guest` and the session's channels; this crate owns:
//!
//! - [`wire`]: the checkpoint messages, their encoding, and the order a
//!   checkpoint must follow on each side ([`wire::Expect`]);
//! - [`cache`]: the secondary's RAM cache, and the commit that makes the
//!   secondary's memory equal the primary's at a checkpoint;
//! - [`compare`]: output records, the comparison of the primary's outputs
//!   with the secondary's, and the client's view of released outputs;
//! - [`trigger`]: periodic, on-demand and mismatch checkpoint requests,
//!   coalesced;
//! - [`status`]: the COLO mode and failover state (`query-colo-status`).
//!
//! Depends on `ferry-ram` only (pages and bitmaps), as DESIGN.md's
//! direction `ferry → colo → ram` asks.

pub mod cache;
pub mod compare;
pub mod status;
pub mod trigger;
pub mod wire;

pub use cache::RamCache;
pub use compare::{ClientHistory, Comparator, Record};
pub use status::{ColoMode, ColoStatus, FailoverReason, FailoverState, StatusCell};
pub use trigger::{TriggerKind, Triggers};
pub use wire::{ColoMessage, Expect};

/// What goes wrong in COLO's own logic (the controller wraps it with the
/// channel it came from).
#[derive(Debug, thiserror::Error)]
pub enum ColoError {
    #[error("COLO message on {channel}: {what} at byte {offset}")]
    Malformed {
        channel: &'static str,
        what: String,
        offset: usize,
    },
    #[error("COLO protocol: {got} arrived while {expected} was due (checkpoint {checkpoint})")]
    OutOfOrder {
        got: &'static str,
        expected: &'static str,
        checkpoint: u64,
    },
    #[error("RAM cache: {0}")]
    Cache(String),
    #[error(transparent)]
    Ram(#[from] ferry_ram::RamError),
}
