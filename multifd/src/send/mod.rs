//! The sender pool: K threads, one per multifd channel, each with its own
//! io_uring, moving the pages of each pass straight from guest memory.
//!
//! A pass hands every thread the same [`PassWork`]: one bitmap per block of
//! the pages to send. Threads claim chunks of `packet_pages` pages with one
//! atomic add, take (and so clear) the chunk's bitmap words *before* reading
//! the pages, sort the pages into zero (offsets only) and normal (payload),
//! and build one packet per chunk in a slot: header, offsets and an iovec
//! list that points at the guest pages themselves. How a packet then reaches
//! the socket is the channel's [`delivery::Delivery`], chosen once when its
//! thread starts from the [`SendPath`] asked for and the channel's kind:
//! - `Splice` (the default): the header is copied into a pipe, the pages are
//!   put in it by reference (`vmsplice`) and the pipe is spliced into the
//!   socket, so the sender never copies a page (over loopback the receiver's
//!   copy is the only one). One packet at a time: splice through io_uring is
//!   always punted to a kernel worker thread and `vmsplice` has no io_uring
//!   opcode, so the blocking calls are cheaper on the channel's own thread.
//! - `Copy` / `ZeroCopy`: prepared packets go out through the channel's
//!   io_uring as one linked chain of `sendmsg` (or `sendmsg_zc`) operations,
//!   so many sends are in flight while the thread prepares the next ones.
//!
//! With `--compress zstd` or TLS a packet's payload is first copied out of
//! guest memory into its slot (zstd and rustls then read that copy, and the
//! checksum too). zstd compresses into the slot's own buffer (one context
//! per thread); a splice then copies the slot's buffers into the pipe
//! rather than lending them (the thread reuses them). On a TLS channel the
//! packet is sealed into records that rustls writes to the socket at once.
//! Either way the stream stays in order, and a pass ends with a SYNC packet
//! on every channel. A TLS channel ends with close_notify after
//! its END packet.

//!
//! The module's parts: [`pool`] (the pool, its options and the pass the
//! threads share), [`thread`] (one channel thread's loop and io_uring
//! chain), [`build`] (one packet, from claimed bitmap words to a sealed
//! header and gather list) and [`delivery`] (how a built packet leaves).

mod build;
mod delivery;
mod pool;
#[cfg(test)]
mod tests;
mod thread;

pub use pool::{SendPath, SenderOptions, SenderPool};
