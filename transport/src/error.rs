//! Errors of the transport crate. Each names the channel or address involved.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad URI '{uri}': {why}")]
    BadUri { uri: String, why: String },
    #[error("cannot connect to {uri}: {source}")]
    Connect { uri: String, source: io::Error },
    #[error("cannot listen on {uri}: {source}")]
    Listen { uri: String, source: io::Error },
    #[error(
        "unix socket {path} is in use by another listener: stop that process or choose \
         another path"
    )]
    UnixInUse { path: PathBuf },
    #[error(
        "{path} is a {kind}, not a unix socket; it was left untouched: remove it yourself \
         or choose another path"
    )]
    UnixNotSocket { path: PathBuf, kind: &'static str },
    #[error(
        "{path} is a directory: give the path of a socket file to create, e.g. \
         {path}/ferry.sock"
    )]
    UnixIsDirectory { path: PathBuf },
    #[error("cannot tell whether unix socket {path} is in use ({source}); it was left untouched")]
    UnixProbe { path: PathBuf, source: io::Error },
    #[error("accepting on {uri}: {source}")]
    Accept { uri: String, source: io::Error },
    #[error("{channel}: {what}: {source}")]
    Io {
        channel: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("{channel}: not a ferry channel (first bytes {first:?}{hint})")]
    BadMagic {
        channel: String,
        first: String,
        hint: &'static str,
    },
    #[error("{channel}: protocol version {found}, this ferry speaks {expected}")]
    BadVersion {
        channel: String,
        found: u16,
        expected: u16,
    },
    #[error("{channel}: malformed handshake: {why}")]
    BadHello { channel: String, why: String },
    #[error(
        "{channel}: belongs to session {found}, but this migration is session {expected}; refused"
    )]
    ForeignSession {
        channel: String,
        found: String,
        expected: String,
    },
    #[error("{channel}: refused by the receiver: {reason}")]
    Refused { channel: String, reason: String },
    #[error("timed out after {secs:.1}s waiting for {what}")]
    Timeout { what: String, secs: f64 },
    #[error("TLS credentials: {path}: {why}")]
    TlsFiles { path: String, why: String },
    #[error("{channel}: TLS: {why}")]
    Tls { channel: String, why: String },
    #[error("io_uring: {what}: {source}")]
    Uring {
        what: &'static str,
        source: io::Error,
    },
}
