//! ferry: the migration controller.
//!
//! Decides *what* moves *when*, never *how* bytes move: it opens a session's
//! channels (transport), describes the guest's memory to the destination in
//! a setup message, runs passes over the guest's pages through the multifd
//! pools, sends the device state and finishes with a completion handshake on
//! the main channel, whose reverse direction is the return path.
//!
//! - [`guest`]: the [`Guest`] trait a VMM implements, and the image guest.
//! - [`protocol`]: the main channel's messages and their wire format.
//! - [`outgoing`] / [`incoming`]: the two sides of a migration.
//! - [`summary`]: what a finished (or failed) migration reports.

mod error;
pub mod guest;
pub mod incoming;
pub mod outgoing;
pub mod protocol;
pub mod summary;

pub use error::{Failed, MigrationError};
pub use guest::{Guest, GuestError, ImageGuest};
pub use incoming::{migrate_in, DestinationMemory, IncomingOptions, IncomingOutcome};
pub use outgoing::{migrate_out, OutgoingOptions};
pub use summary::{Progress, Role, Summary};

pub use ferry_multifd::{ReceiverOptions, SendPath, SenderOptions};
pub use ferry_ram::{BlockSpec, Digest, GuestMemory, RamBlock};
pub use ferry_transport::{
    AcceptOptions, ChannelUri, Listener, SocketTuning, TlsClient, TlsServer,
};
