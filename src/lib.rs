//! ferry: the migration controller.
//!
//! Decides *what* moves *when*, never *how* bytes move: it opens a session's
//! channels (transport), describes the guest's memory to the destination in
//! a setup message, runs passes over the guest's pages through the multifd
//! pools, sends the device state and finishes with a completion handshake on
//! the main channel, whose reverse direction is the return path.
//!
//! - [`guest`]: the [`Guest`] trait a VMM implements, and the image guest;
//!   [`synthetic`]: a live guest whose vCPU threads keep writing memory;
//!   `activation`: who owns the guest's shared resources.
//! - [`state`]: a migration's status, parameters and live figures, shared
//!   with [`control`], the QMP-shaped control socket.
//! - [`protocol`]: the main channel's messages and their wire format.
//! - [`session`]: the session engine: the one pass loop (dirty sync, send,
//!   estimate, switchover decision) and the phases as QEMU names them,
//!   used by live send, live save and background snapshot.
//! - [`outgoing`] / [`incoming`]: the two sides of a migration.
//! - [`metrics`]: the same figures for Prometheus, over HTTP.
//! - [`summary`]: what a finished (or failed) migration reports.
//! - [`save`] / [`restore`]: saving a guest to a file and restoring it
//!   (file mode, over `ferry-file`); [`snapshot`]: what the two share.

mod activation;
pub mod colo;
pub mod control;
mod error;
pub mod guest;
pub mod incoming;
pub mod metrics;
pub mod outgoing;
pub mod postcopy;
pub mod protocol;
pub mod restore;
pub mod save;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod summary;
pub mod switchover_trace;
pub mod synthetic;

pub use activation::Resources;
pub use control::{ControlError, ControlServer};
pub use error::{Failed, MigrationError};
pub use guest::{default_guest_builder, Guest, GuestBuilder, GuestError, ImageGuest};
pub use incoming::{
    migrate_in, physical_memory, DestinationMemory, IncomingOptions, IncomingOutcome, KeepHook,
    SetupLimits,
};
pub use metrics::{MetricsError, MetricsServer};
pub use outgoing::{migrate_out, OutgoingOptions};
pub use protocol::DEFAULT_PEER_TIMEOUT;
pub use session::{PassSink, Phase, PhaseError, Phases, Session, SessionError};
pub use snapshot::{
    open_saved, restore_from_file, restore_lazy, save_background, save_live_to_file, save_to_file,
    verify_file, BackgroundOptions, FileFailed, FileSummary, LazyReport, LazyRestored,
    LazyRestoring, LiveOptions, RestoreTarget, Restored, SaveOptions, SnapshotError,
};
pub use state::{Event, LiveFigures, Parameters, PassFigures, PostcopyLive, Progress, Status};
pub use summary::{PostcopyReport, Role, Summary, Workload};
pub use synthetic::{
    replay_check, DirtyPattern, ReplayCheck, SyntheticConfig, SyntheticGuest, TrackerKind,
};

pub use ferry_file::{FileError, FileOptions, IoMode, SavedFile};
pub use ferry_multifd::{ReceiverOptions, SendPath, SenderOptions};
pub use ferry_ram::{BitmapLog, BlockSpec, Digest, DirtyLog, GuestMemory, PageBitmap, RamBlock};
pub use ferry_transport::{
    AcceptOptions, ChannelUri, Listener, SocketTuning, TlsClient, TlsServer,
};
