//! ferry-transport: how bytes move between two ferry processes.
//!
//! Owns channel URIs (`tcp:HOST:PORT`, `unix:PATH`), the [`Channel`] trait
//! every channel kind implements, socket tuning (socket2), the handshake that
//! opens each channel (magic, version, session id, role, index), the
//! listener side that sorts channels arriving in any order into one session,
//! the io_uring driver each data-path thread owns, and TLS on any channel
//! (rustls) with its credentials (`certs` makes a set). It knows nothing of
//! pages or guests.

pub mod certs;
mod channel;
mod error;
mod handshake;
mod incoming;
mod socket;
pub mod splice;
pub mod tls;
mod uri;
pub mod uring;

pub use channel::{Channel, SocketChannel};
pub use error::TransportError;
pub use handshake::{ChannelHello, Role, SessionId, HELLO_LEN, PROTOCOL_VERSION};
pub use incoming::{
    accept_preempt, accept_recovery, accept_session, AcceptOptions, IncomingSession,
    RecoveryChannels,
};
pub use socket::{
    await_accept, connect, connect_channel, connect_channel_secure, listen_unix, Listener,
    SocketTuning,
};
pub use tls::{TlsChannel, TlsClient, TlsServer};
pub use uri::ChannelUri;
