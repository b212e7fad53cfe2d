//! Errors of a migration, as the controller reports them.

use ferry_multifd::MultifdError;
use ferry_ram::RamError;
use ferry_transport::TransportError;

use crate::session::{PhaseError, SessionError};
use crate::GuestError;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Multifd(#[from] MultifdError),
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("main channel: {0}")]
    Protocol(String),
    #[error("main channel: {what}: {source}")]
    MainIo {
        what: String,
        source: std::io::Error,
    },
    #[error("main channel: connection closed by the {peer} {during}")]
    MainClosed {
        peer: &'static str,
        during: &'static str,
    },
    #[error("{channel} channel: nothing from the {peer} for {secs:.1} s (--peer-timeout): the {peer} or the link is gone")]
    PeerSilent {
        peer: &'static str,
        channel: String,
        secs: f64,
    },
    #[error("{channel} channel: {what} made no progress for {secs:.1} s (--peer-timeout): the peer stopped reading")]
    PeerStalled {
        what: String,
        channel: &'static str,
        secs: f64,
    },
    #[error("the two sides differ at switchover: the source's memory and device state have digest {source_digest}, the destination's {destination_digest}; the destination's guest was not started")]
    DigestMismatch {
        source_digest: String,
        destination_digest: String,
    },
    #[error("keeping the migrated guest: {0}")]
    Keep(String),
    #[error("setup refused: {0}")]
    Setup(String),
    #[error("the destination failed: {0}")]
    Destination(String),
    #[error("incomplete migration: block '{block}' has {missing} page(s) that never arrived (first at offset {first:#x})")]
    MissingPages {
        block: String,
        missing: u64,
        first: u64,
    },
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
    #[error("postcopy: {0}")]
    Postcopy(#[from] crate::postcopy::PostcopyError),
    /// A failure after the switch to postcopy (either side): the guest is
    /// neither resumed on the source nor run on with missing pages.
    #[error("{0}; postcopy-paused: neither side alone holds the whole guest: the destination's guest threads that touch a missing page stay blocked and the source's guest stays paused")]
    PostcopyPaused(String),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("{error}; the source guest stays paused: {why}")]
    SourceNotResumed {
        error: Box<MigrationError>,
        why: String,
    },
    #[error(transparent)]
    Phase(#[from] PhaseError),
    #[error("migration cancelled{0}")]
    Cancelled(String),
    #[error("did not converge after {passes} passes: {} still dirty, the switchover allows {} (downtime limit {limit_ms} ms)", crate::summary::iec(*remaining), crate::summary::iec(*threshold))]
    NotConverged {
        passes: u64,
        remaining: u64,
        threshold: u64,
        limit_ms: u64,
    },
}

impl From<SessionError> for MigrationError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Ram(e) => Self::Ram(e),
            SessionError::Phase(e) => Self::Phase(e),
            SessionError::Cancelled => Self::Cancelled(String::new()),
            SessionError::NotConverged {
                passes,
                remaining,
                threshold,
                limit_ms,
            } => Self::NotConverged {
                passes,
                remaining,
                threshold,
                limit_ms,
            },
        }
    }
}

/// A failed migration: the error, and what the migration had done by then.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Failed {
    pub error: MigrationError,
    pub summary: Box<crate::Summary>,
}
