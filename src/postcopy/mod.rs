//! Postcopy's data path (seed 004's `postcopy_start`,
//! `migrate_send_rp_req_pages`, and the destination's page placement):
//! after the switch the guest runs on the destination while the pages it
//! still lacks are pulled on demand and pushed in the background.
//!
//! - [`wire`]: the formats: page requests, page frames, the discard list
//!   and the package that carries it with the device state.
//! - [`PostcopyDestination`] (`dest.rs`): guest memory registered with
//!   userfaultfd (missing mode, [`ferry_ram::uffd::Userfault`], the helpers
//!   lazy restore uses), the discarded pages dropped (most of them before
//!   the switch, while the source's guest still runs: [`drop_early`] on
//!   EARLY_DISCARD, so the downtime drops only those dirtied since), a
//!   **fault thread** that turns each first touch of a missing page into
//!   one page request (for the whole 2 MiB region when no page of it has
//!   come yet), and **page readers** (one per channel: preempt and each
//!   multifd channel) that check each frame and place its pages
//!   atomically with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`, or, for a whole
//!   region of missing pages gathered from its frames (`huge.rs`), move it
//!   in as one huge page with `UFFDIO_MOVE`. Each page has one state
//!   (missing, requested, placing, placed) changed by compare-and-swap, so
//!   a page is requested at most once and placed exactly once, however it
//!   arrives.
//! - [`PageServer`] (`source.rs`): the source's side: it answers requests
//!   on the preempt channel and pushes every remaining page over the
//!   multifd channels, reading the paused guest's memory.
//!
//! Each side's phase lives here too, but as a child module of that side:
//! `outgoing.rs` (the switch and the serving loop) and `incoming.rs`
//! (registration, resume, the wait for every page), declared by
//! `src/outgoing.rs` and `src/incoming.rs` with `#[path]` so they reach
//! those sides' private state.
//!
//! Recovery after a link failure (seed 004's `postcopy_pause`,
//! `postcopy_do_resume`, `migrate_handle_rp_recv_bitmap`): a channel that
//! breaks pauses both sides (postcopy-paused) instead of failing them;
//! `recover` / `resume` (or [`RecoverMode::Auto`]) reconnect main and
//! every preempt channel with the session's id, the destination sends its
//! received-pages bitmap ([`wire::encode_received`]) and asks again for
//! the pages its guest waits on, and the source sends only what the
//! bitmap lacks ([`wire::still_missing`]). The loops are in the phases
//! (`outgoing.rs`: `pause_and_recover`; `incoming.rs`: `recover`).
//!
//! A failure after the switch never lets the destination's guest see a
//! page it was not sent: the userfaultfd stays registered (threads touching
//! missing pages stay blocked, as in QEMU's `postcopy-paused`) until the
//! [`PostcopyDestination`] is dropped, which the caller does only once the
//! guest no longer runs.

mod dest;
mod huge;
mod source;
pub mod wire;

pub use dest::{drop_early, PostcopyDestination, PostcopyStats, RequestFn};
pub(crate) use dest::{raise_priority, raise_threads_named, restore_priority};
pub use source::{send_end, PageServer};

/// Whether `memory` can be registered with userfaultfd in missing mode
/// (anonymous private memory, and a process allowed to): tried on a
/// userfaultfd that is closed again at once, which unregisters it.
pub fn check_registrable(memory: &ferry_ram::GuestMemory) -> Result<(), PostcopyError> {
    let uffd = ferry_ram::uffd::Userfault::open().map_err(|source| PostcopyError::Userfault {
        what: "this destination cannot open a userfaultfd",
        source,
    })?;
    for b in memory.blocks() {
        uffd.register(b.host_addr(), b.len())
            .map_err(|source| PostcopyError::Place {
                what: "this destination cannot register (missing mode)",
                block: b.name().into(),
                offset: 0,
                source,
            })?;
    }
    Ok(())
}

/// How a side in `postcopy-paused` recovers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoverMode {
    /// Wait for `ferry ctl SOCK resume URI` (source) / `recover URI`
    /// (destination).
    #[default]
    Manual,
    /// Source: reconnect to the same URI by itself, with backoff
    /// (100 ms doubling to 5 s); destination: listen again on its own
    /// listener.
    Auto,
}

impl std::str::FromStr for RecoverMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "manual" => Ok(Self::Manual),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("'{s}': want manual or auto")),
        }
    }
}

/// What postcopy fails with; each names the channel, block and offset it
/// concerns.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    #[error("{channel}: page run for unknown block #{block} (the guest has {blocks})")]
    UnknownBlock {
        channel: String,
        block: u16,
        blocks: usize,
    },
    #[error("{channel}: page run in block '{block}' at offset {offset:#x}, {len} bytes: {why}")]
    BadRun {
        channel: String,
        block: String,
        offset: u64,
        len: u64,
        why: &'static str,
    },
    #[error("{channel}: bad page frame: {why}")]
    BadFrame { channel: String, why: String },
    #[error("{channel}: {pages} page(s) of block '{block}' at offset {offset:#x} failed their CRC (frame says {want:#010x}, the bytes give {got:#010x})")]
    Checksum {
        channel: String,
        block: String,
        offset: u64,
        pages: u32,
        want: u32,
        got: u32,
    },
    #[error("discard list: {0}")]
    BadDiscard(String),
    #[error("{channel}: received-pages bitmap: {why}")]
    BadReceived { channel: String, why: String },
    #[error("{channel}: {what}: {source}")]
    Io {
        channel: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("userfaultfd: {what}: {source}")]
    Userfault {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("userfaultfd: {what} block '{block}' at offset {offset:#x}: {source}")]
    Place {
        what: &'static str,
        block: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("sending a page request: {0}")]
    Request(String),
    #[error("postcopy stopped: {0}")]
    Stopped(String),
}

#[cfg(test)]
mod tests;
