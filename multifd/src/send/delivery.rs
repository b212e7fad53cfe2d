//! How a sender thread's packets reach its socket, decided once when the
//! thread starts: [`Delivery`]. The thread's loop hands every built packet
//! to [`Delivery::send`], which is the one place that looks at the kind;
//! it either sends the packet at once (splice) or makes the slot ready for
//! the thread's io_uring chain (copy, zero-copy, TLS records).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use ferry_transport::splice::{SplicePipe, WANTED_PIPE_BYTES};
use ferry_transport::{Channel, TlsChannel};

use super::build::Slot;
use super::pool::SendPath;
use crate::packet::PAYLOAD_IOV;

/// A channel's way of sending, chosen when its thread starts.
pub(super) enum Delivery {
    /// `vmsplice` the packet into a pipe (header copied, pages by
    /// reference), `splice` the pipe into the socket; one packet at a time,
    /// each out of the slot before the next is built.
    Splice(SplicePipe),
    /// io_uring `sendmsg` chains: the kernel copies the pages.
    RingCopy,
    /// io_uring `sendmsg_zc` chains: pages pinned until the notification.
    RingZeroCopy,
    /// TLS: the packet is sealed into records that rustls writes to the
    /// socket at once (blocking, like splice). Its builder copies every
    /// payload out of guest memory (`PacketBuilder::new(.., sealed:
    /// true)`), so rustls reads only the slot's own buffers.
    TlsRecords(Arc<TlsChannel>),
}

/// What [`Delivery::send`] did with a packet.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Handoff {
    /// On the socket already, this many bytes: the slot is free again.
    Sent(u64),
    /// Ready for the ring: the slot's `iov`, `send_len` and `awaiting` are
    /// set; the caller queues it in its chain.
    Queued,
}

impl Delivery {
    /// The delivery for `channel`: TLS records on a TLS channel, else the
    /// path asked for (zero-copy only where the kernel offers it).
    pub(super) fn choose(
        channel: &Arc<dyn Channel>,
        path: SendPath,
        send_zc: bool,
    ) -> io::Result<Self> {
        if let Some(tls) = channel.clone().tls_shared() {
            return Ok(Self::TlsRecords(tls));
        }
        Ok(match path {
            SendPath::Splice => Self::Splice(SplicePipe::new(WANTED_PIPE_BYTES)?),
            SendPath::ZeroCopy if send_zc => Self::RingZeroCopy,
            SendPath::ZeroCopy | SendPath::Copy => Self::RingCopy,
        })
    }

    /// Whether it reads every packet's bytes itself (TLS records), so the
    /// builder copies payloads out of guest memory for it.
    pub(super) fn seals(&self) -> bool {
        matches!(self, Self::TlsRecords(_))
    }

    /// Its name, for messages and tests.
    #[cfg(test)]
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Splice(_) => "splice",
            Self::RingCopy => "copy",
            Self::RingZeroCopy => "zero-copy",
            Self::TlsRecords(_) => "tls",
        }
    }

    /// Hands the packet built in `s` on: the one step of the send loop that
    /// depends on the channel's kind (one match per packet).
    ///
    /// # Safety
    /// Every iovec of `s` must point at `iov_len` readable bytes that stay
    /// mapped for as long as the kernel may read them: the slot's own
    /// buffers, or guest pages of memory the sender holds for the whole
    /// migration (a page rewritten meanwhile is dirty again and re-sent).
    pub(super) unsafe fn send(&mut self, fd: RawFd, s: &mut Slot) -> io::Result<Handoff> {
        match self {
            Self::Splice(pipe) => {
                // Pages go by reference only when they are guest memory: a
                // slot's own buffer is rewritten when the slot is reused,
                // maybe while the socket still holds its pages, so it is
                // copied into the pipe.
                let head_len = if s.owns_payload {
                    s.iov.len()
                } else {
                    PAYLOAD_IOV.min(s.iov.len())
                };
                let (head, pages) = s.iov.split_at_mut(head_len);
                // SAFETY: the caller's guarantee: header, offsets and crcs
                // are the slot's own, the pages guest memory held mapped.
                unsafe { pipe.send(fd, head, pages) }.map(Handoff::Sent)
            }
            Self::RingCopy => {
                (s.send_len, s.awaiting) = (s.wire, 1);
                Ok(Handoff::Queued)
            }
            Self::RingZeroCopy => {
                (s.send_len, s.awaiting) = (s.wire, 2);
                Ok(Handoff::Queued)
            }
            Self::TlsRecords(tls) => {
                debug_assert!(s.owns_payload, "a sealed channel's builder copies payloads");
                let plain: Vec<io::IoSlice<'_>> = s
                    .iov
                    .iter()
                    // SAFETY: every iovec is readable for this call (the
                    // caller's guarantee) and points at the slot's own
                    // buffers (header, offsets, crcs, the payload copy or
                    // the zstd frame): a TLS channel's builder copies every
                    // payload out of guest memory. Nothing writes them
                    // while the slices live.
                    .map(|v| unsafe {
                        io::IoSlice::new(std::slice::from_raw_parts(
                            v.iov_base.cast::<u8>(),
                            v.iov_len,
                        ))
                    })
                    .collect();
                // The records go from rustls's buffer straight to the
                // socket: a copy fewer than sealing into the slot first.
                tls.seal_and_send(&plain)?;
                Ok(Handoff::Sent(s.wire))
            }
        }
    }
}
