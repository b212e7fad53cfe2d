//! Errors of the multifd crate; each names the channel, and where it
//! applies the packet, block and offset.

use std::io;

use ferry_transport::TransportError;

use crate::packet::PacketError;

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
    /// A header that fails the checks [`PacketHeader::decode`] makes on
    /// its own (magic, version, flags, counts, lengths).
    ///
    /// [`PacketHeader::decode`]: crate::PacketHeader::decode
    #[error("{channel}: packet #{seq}: {source}")]
    Decode {
        channel: String,
        seq: u64,
        source: PacketError,
    },
    /// A header field that is valid alone but not here: `field` names it,
    /// `value` is what came and `expected` what this channel and pass need.
    #[error("{channel}: packet #{seq}: {field} {value}, expected {expected}")]
    BadPacket {
        channel: String,
        seq: u64,
        field: &'static str,
        value: u64,
        expected: u64,
    },
    #[error("{channel}: packet #{seq}: no checksum flag, but the setup announced checksums (corrupted header?)")]
    ChecksumFlagMissing { channel: String, seq: u64 },
    #[error("{channel}: packet #{seq}: header checksum mismatch{}", if *.with_offsets { " (header or offsets corrupted)" } else { "" })]
    HeaderChecksum {
        channel: String,
        seq: u64,
        /// The crc covered offsets (and page crcs) too.
        with_offsets: bool,
    },
    #[error("{channel}: packet #{seq}: page size {page_size} for block '{block}' of {block_page_size}-byte pages")]
    PageSize {
        channel: String,
        seq: u64,
        block: String,
        page_size: u32,
        block_page_size: u32,
    },
    #[error("{channel}: packet #{seq}: page at offset {offset:#x} of block '{block}' comes a second time in pass {pass}")]
    PageTwice {
        channel: String,
        seq: u64,
        block: String,
        offset: u64,
        pass: u64,
    },
    #[error("{channel}: packet #{seq}: payload for block '{block}' is compressed, but the setup announced no compression")]
    UnexpectedCompression {
        channel: String,
        seq: u64,
        block: String,
    },
    #[error("{channel}: packet #{seq}: data after the END packet")]
    DataAfterEnd { channel: String, seq: u64 },
    #[error(
        "{channel}: packet #{seq} names block #{block}, but the migration has {blocks} block(s)"
    )]
    UnknownBlock {
        channel: String,
        seq: u64,
        block: u32,
        blocks: usize,
    },
    #[error("{channel}: packet #{seq}: page offset {offset:#x} is outside block '{block}' ({block_len:#x} bytes) or not page aligned")]
    OffsetOutOfBlock {
        channel: String,
        seq: u64,
        block: String,
        offset: u64,
        block_len: u64,
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
    /// Stopped from outside (cancel, an earlier failure, a dropped pool).
    #[error("multifd stopped: {0}")]
    Aborted(String),
    #[error("packet size of {pages} pages: must be a multiple of 64 up to {max}")]
    PacketPages { pages: u32, max: u32 },
    #[error("packet size of {pages} pages: sending with io_uring sendmsg ({path} path) takes at most {max} pages a packet (the kernel's {iovecs} iovecs a call); use fewer pages or the splice path")]
    PacketPagesForSendmsg {
        pages: u32,
        path: &'static str,
        max: usize,
        iovecs: usize,
    },
    #[error("zstd level {level} refused: {source}")]
    CompressLevel { level: i32, source: io::Error },
    #[error("cannot start {what} thread: {source}")]
    Spawn {
        what: &'static str,
        source: io::Error,
    },
    #[error("multifd stopped: a {what} thread has exited")]
    ThreadExited { what: &'static str },
    #[error("destination block '{block}' is read-only")]
    ReadOnlyBlock { block: String },
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
