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
//! [`file`] is file mode: the same K threads with their own rings write a
//! guest's pages at fixed offsets of a saved-guest file, or read them back;
//! [`lazy`] restores such a file on demand with userfaultfd; [`background`]
//! writes a running guest's memory as it was when a snapshot began.

pub mod background;
mod compress;
mod error;
pub mod file;
pub mod lazy;
mod pacing;
pub mod packet;
mod receiver;
mod send;
mod stats;
mod sync;

pub use compress::{Compressor, Decompressor};
pub use error::MultifdError;
pub use pacing::PassControl;
pub use packet::{Body, PacketError, PacketHeader, HEADER_LEN, MAX_PACKET_PAGES};
pub use receiver::{ReceiverOptions, ReceiverPool};
pub use send::{SendPath, SenderOptions, SenderPool};
pub use stats::{Counters, Totals};
