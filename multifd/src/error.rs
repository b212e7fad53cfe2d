//! Errors of the multifd crate; each names the channel, and where it
//! applies the packet, block and offset.

use std::io;

use ferry_transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum MultifdError {
    #[error("{channel}: {what}: {source}")]
    Io {
        channel: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("{channel}: connection closed by the peer {during}")]
    Closed { channel: String, during: String },
    #[error("{channel}: packet #{seq}: {why}")]
    BadPacket {
        channel: String,
        seq: u64,
        why: String,
    },
    #[error(
        "{channel}: packet #{seq} names block #{block}, but the migration has {blocks} block(s)"
    )]
    UnknownBlock {
        channel: String,
        seq: u64,
        block: u32,
        blocks: usize,
    },
    #[error("{channel}: packet #{seq}: page offset {offset:#x} is outside block '{block}' ({len:#x} bytes) or not page aligned")]
    OffsetOutOfRange {
        channel: String,
        seq: u64,
        block: String,
        offset: u64,
        len: u64,
    },
    #[error("{channel}: checksum mismatch in block '{block}' at offset {offset:#x} (packet #{seq}), and the page was not sent again")]
    Checksum {
        channel: String,
        seq: u64,
        block: String,
        offset: u64,
    },
    #[error("{channel}: packet #{seq}: compressed payload for block '{block}': {why}")]
    Decompress {
        channel: String,
        seq: u64,
        block: String,
        why: String,
    },
    #[error("{channel}: this channel kind has no io_uring data path")]
    NoDataPath { channel: String },
    #[error("{channel}: {source}")]
    Transport {
        channel: String,
        source: TransportError,
    },
    #[error(transparent)]
    Ram(#[from] ferry_ram::RamError),
    #[error("multifd stopped: {0}")]
    Aborted(String),
    #[error("{channel}: no progress for {secs:.1} s (--peer-timeout): the peer stopped reading or sending, or the link is gone")]
    Stalled { channel: String, secs: f64 },
}

impl MultifdError {
    /// The peer went away (closed, reset, broken pipe): on a sender this is
    /// usually the destination failing first, and its SHUT says why.
    pub fn is_connection_loss(&self) -> bool {
        let lost = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::UnexpectedEof
            )
        };
        match self {
            Self::Closed { .. } => true,
            Self::Io { source, .. } => lost(source),
            Self::Transport {
                source: TransportError::Io { source, .. },
                ..
            } => lost(source),
            _ => false,
        }
    }
}
