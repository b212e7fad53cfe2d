//! ferry-multifd: bulk pages over K parallel channels.
//!
//! Joins `transport` (channels, io_uring) and `ram` (blocks, bitmaps): a
//! [`SenderPool`] of K threads, each with its own ring, turns the pages a
//! pass must send into [`packet`]s and sends them straight from guest memory
//! (by page reference through a pipe, or by io_uring `sendmsg`);
//! a [`ReceiverPool`] checks every header and offset, then reads payloads
//! straight into destination pages. Each pass ends with a sync on every
//! channel, and the receiver applies nothing of pass k+1 before all of pass k
//! has landed.
//!
//! File mode (saving to and restoring from a file) lives in `ferry-file`.

mod compress;
mod error;
mod pacing;
pub mod packet;
mod receiver;
mod send;
mod stats;
mod sync;

pub use compress::{Compressor, Decompressor};
pub use error::MultifdError;
pub use ferry_ram::{Counters, Totals};
pub use pacing::PassControl;
pub use packet::{Body, PacketError, PacketHeader, HEADER_LEN, MAX_PACKET_PAGES};
pub use receiver::{ReceiverOptions, ReceiverPool};
pub use send::{SendPath, SenderOptions, SenderPool};
