//! The harness's one error type.
//!
//! Every variant names what failed (which process, which file, which peer) and
//! carries what a person needs to see why: an exit status, the tail of the
//! process's stderr, QEMU's error text.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid bench configuration: {0}")]
    Config(String),

    #[error("network link setup: {0}")]
    Setup(String),

    #[error("cannot start {process} ({exe}): {source}")]
    Spawn {
        process: String,
        exe: String,
        source: std::io::Error,
    },

    #[error("{process}: {source}")]
    Process {
        process: String,
        source: std::io::Error,
    },

    #[error("ferry recv printed no 'ferry: listening on ...' line within {secs} s; stderr tail:\n{stderr}")]
    ListenTimeout { secs: u64, stderr: String },

    #[error(
        "ferry recv exited ({status}) before it printed its listening line; stderr tail:\n{stderr}"
    )]
    RecvExitedEarly { status: String, stderr: String },

    #[error("{what} did not finish within {secs} s (killed); {detail}")]
    Timeout {
        what: String,
        secs: u64,
        detail: String,
    },

    #[error("{case} failed:\n{}", .failures.join("\n"))]
    FerryFailed {
        /// "ferry run with 2 channel(s)", "live migration (tracker uffd, 2 channel(s))".
        case: String,
        failures: Vec<String>,
    },

    #[error("ferry run with {channels} channel(s): digest mismatch: sender sent {sent}, receiver holds {held}")]
    DigestMismatch {
        channels: u16,
        sent: String,
        held: String,
    },

    #[error("{case}: the {what} differ: source {source_digest}, destination {destination_digest}")]
    LiveMismatch {
        case: String,
        /// "digests of memory and device state at switchover".
        what: String,
        source_digest: String,
        destination_digest: String,
    },

    /// A QEMU peer of a live case could not start, migrate or report.
    #[error("{case}: {why}")]
    QemuLive { case: String, why: String },

    /// A guest that checks itself (the KVM guest) found its memory wrong, or
    /// did not go on, after a migration.
    #[error("{case}: the guest failed its self-check: {why}")]
    GuestCheck { case: String, why: String },

    #[error("floor run with {channels} channel(s) failed:\n{}", .failures.join("\n"))]
    FloorFailed {
        channels: u16,
        failures: Vec<String>,
    },

    #[error("generating the dataset: {0}")]
    Dataset(#[from] ferry_ram::RamError),

    #[error("{what} {path}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(
        "not enough space: {what} needs {needed} bytes on the filesystem of {path}, {free} free"
    )]
    NoSpace {
        what: String,
        path: PathBuf,
        needed: u64,
        free: u64,
    },

    #[error("QMP to the {side} QEMU: {msg}")]
    Qmp { side: String, msg: String },

    #[error("QEMU migration with {channels} channel(s) ended as '{status}': {error}")]
    QemuMigration {
        channels: u16,
        status: String,
        error: String,
    },

    #[error("QEMU ({side}) exited early ({status}); stderr tail:\n{stderr}")]
    QemuExited {
        side: String,
        status: String,
        stderr: String,
    },

    #[error("iperf3 with {streams} stream(s): {msg}")]
    Iperf { streams: u16, msg: String },

    #[error("writing the plot {path}: {msg}")]
    Plot { path: PathBuf, msg: String },
}
