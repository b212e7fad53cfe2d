//! The io_uring driver a data-path thread owns: one ring per channel thread,
//! driven directly with the `io-uring` crate.
//!
//! It offers the few operations ferry's data path needs:
//! - ordered socket sends of whole `msghdr`s (gather lists over guest pages),
//!   copied or zero-copy (`IORING_OP_SENDMSG_ZC`), queued as linked chains so
//!   several sends are in flight on one stream without reordering;
//! - "receive exactly these iovecs" (`MSG_WAITALL`), for headers and payloads;
//! - reads and writes at fixed file offsets, for file mode.
//! - "receive what has arrived" into one buffer, for TLS ciphertext.
//!
//! Sends use `MSG_WAITALL`, so the kernel finishes a short send itself and a
//! completion's result is either the whole length or an error.

use std::io;
use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::TransportError;

/// `IORING_SEND_ZC_REPORT_USAGE` (sqe ioprio): the notification says whether
/// the kernel had to copy after all.
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result when copied.
const NOTIF_USAGE_ZC_COPIED: i32 = i32::MIN;

/// One finished operation.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    flags: u32,
}

impl Completion {
    /// A zero-copy send whose notification is still to come.
    pub fn notification_follows(&self) -> bool {
        cqueue::more(self.flags)
    }
    /// The notification of a zero-copy send: its buffers are free again.
    pub fn is_notification(&self) -> bool {
        cqueue::notif(self.flags)
    }
    /// For a notification: the kernel copied the data instead of sending in place.
    pub fn zero_copy_fell_back(&self) -> bool {
        self.result & NOTIF_USAGE_ZC_COPIED != 0
    }
    /// The operation's outcome as a byte count or an OS error.
    pub fn bytes(&self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }
}

pub struct Ring {
    ring: IoUring,
    send_zc: bool,
}

impl Ring {
    /// A ring with room for `entries` operations in flight.
    pub fn new(entries: u32) -> Result<Self, TransportError> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(|source| TransportError::Uring {
                what: "creating a ring",
                source,
            })?;
        let mut probe = Probe::new();
        let send_zc = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::SendMsgZc::CODE);
        Ok(Self { ring, send_zc })
    }

    /// Whether this kernel offers zero-copy sends.
    pub fn supports_send_zc(&self) -> bool {
        self.send_zc
    }

    /// Free submission slots.
    pub fn sq_space(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Queues a send of `msg` on `fd`. With `link`, the next queued operation
    /// starts only after this one completed in full: that is how several sends
    /// on one stream stay in order.
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it points to must stay valid and
    /// unchanged until this send's completion is popped, and for `zero_copy`
    /// until its notification is popped too.
    pub unsafe fn queue_sendmsg(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        zero_copy: bool,
        link: bool,
        user_data: u64,
    ) -> Result<(), TransportError> {
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entry = if zero_copy {
            opcode::SendMsgZc::new(types::Fd(fd), msg)
                .ioprio(SEND_ZC_REPORT_USAGE)
                .flags(flags)
                .build()
        } else {
            opcode::SendMsg::new(types::Fd(fd), msg)
                .flags(flags)
                .build()
        };
        let entry = if link {
            entry.flags(io_uring::squeue::Flags::IO_LINK)
        } else {
            entry
        };
        let entry = entry.user_data(user_data);
        // SAFETY: the caller keeps msg and its buffers alive as documented.
        unsafe { self.push(&entry) }.map_err(|source| TransportError::Uring {
            what: "queueing a send",
            source,
        })
    }

    /// Submits what is queued and waits until at least `want` completions are ready.
    pub fn submit(&mut self, want: usize) -> Result<(), TransportError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want == 0 => return Ok(()),
                Err(source) => {
                    return Err(TransportError::Uring {
                        what: "submitting",
                        source,
                    })
                }
            }
        }
    }

    /// The next finished operation, if any.
    pub fn pop(&mut self) -> Option<Completion> {
        self.ring.completion().next().map(|c| Completion {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        })
    }

    /// Receives into `iov` until every byte of it is filled, the peer closes,
    /// or an error. Returns how many bytes arrived (less than asked only when
    /// the peer closed). The list is consumed: its entries are advanced past
    /// what arrived. Returns only once the kernel is done with the buffers.
    ///
    /// # Safety
    /// Every iovec must point at `iov_len` bytes of writable memory that
    /// stays mapped for the whole call and that nothing else reads or writes
    /// meanwhile (the kernel writes it; no Rust reference to it may be alive).
    pub unsafe fn recv_exact(&mut self, fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<usize> {
        let want: usize = iov.iter().map(|v| v.iov_len).sum();
        let mut got = 0usize;
        let mut first = 0usize;
        while got < want {
            // SAFETY: a zeroed msghdr is valid; we fill its iovec fields below.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov[first..].as_mut_ptr();
            // The kernel takes at most UIO_MAXIOV iovecs a call; the loop
            // goes on with the rest.
            msg.msg_iovlen = (iov.len() - first).min(libc::UIO_MAXIOV as usize);
            let entry = opcode::RecvMsg::new(types::Fd(fd), &mut msg)
                .flags(libc::MSG_WAITALL as u32)
                .build()
                .user_data(ONE_OP);
            // SAFETY: msg and the iovec array live on this frame, and the
            // buffers are the caller's to fill (this function's contract);
            // `run_one` returns only after this op's completion.
            let n = unsafe { self.run_one(&entry) }?;
            if n == 0 {
                return Ok(got);
            }
            got += n;
            advance(iov, &mut first, n);
        }
        Ok(got)
    }

    /// One receive into `buf`: whatever has arrived, at least one byte, or 0
    /// when the peer closed. Meant for a ring with nothing else in flight:
    /// completions of other operations that arrive meanwhile are dropped.
    pub fn recv_some(&mut self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        let entry = opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(ONE_OP);
        // SAFETY: `buf` is borrowed mutably until the completion is popped
        // below, before returning.
        unsafe { self.run_one(&entry) }
    }

    /// Queues one entry.
    ///
    /// # Safety
    /// Whatever the entry points at must stay valid until its completion
    /// is popped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.ring.submission().push(entry) }
            .map_err(|_| io::Error::other("submission queue full"))
    }

    /// Runs one operation alone on the ring and returns its byte count. It
    /// returns only once the operation's own completion (user data
    /// [`ONE_OP`]) is popped, so the buffers it points at are free again;
    /// other completions popped meanwhile are dropped.
    ///
    /// # Safety
    /// As for [`Ring::push`]; `entry` carries the user data [`ONE_OP`].
    unsafe fn run_one(&mut self, entry: &squeue::Entry) -> io::Result<usize> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.push(entry) }?;
        loop {
            self.submit_or_wait_out(1);
            while let Some(c) = self.pop() {
                if c.user_data == ONE_OP {
                    return c.bytes();
                }
            }
        }
    }

    /// Submits and waits for `want` completions; an error of io_uring_enter
    /// itself is retried, since returning would leave operations in flight
    /// over buffers their callers are about to free. EINTR and EBUSY (the
    /// completion queue is full: the caller pops) are the errors a working
    /// ring gives; anything else means a ring that can no longer be driven,
    /// with the kernel maybe still reading or writing the caller's memory:
    /// after a few tries the process aborts rather than let that memory go.
    fn submit_or_wait_out(&mut self, want: usize) {
        let mut tries = 0;
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR)) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    // Completions are waiting to be popped: let the caller.
                    return;
                }
                Err(e) => {
                    tries += 1;
                    if tries >= 100 {
                        tracing::error!(
                            "io_uring_enter keeps failing with operations in flight: {e}"
                        );
                        std::process::abort();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }
}

/// The user data of [`Ring::run_one`]'s operations.
const ONE_OP: u64 = u64::MAX;

/// Which piece of a [`Ring::write_all_at`] batch failed, and why.
#[derive(Debug)]
pub struct FailedWrite {
    /// Index into the pieces passed in (when io_uring_enter itself failed:
    /// the last piece queued).
    pub piece: usize,
    pub source: io::Error,
}

/// File operations at fixed offsets, for file mode (save and restore).
impl Ring {
    /// Queues a write of `len` bytes from `buf` to `fd` at file `offset`.
    /// The completion's result is the byte count written (which may be
    /// short) or an error.
    ///
    /// # Safety
    /// `buf..buf + len` must stay valid and unchanged until this write's
    /// completion is popped; with O_DIRECT it must also meet the file's
    /// alignment rules.
    pub unsafe fn queue_write_at(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> Result<(), TransportError> {
        let entry = opcode::Write::new(types::Fd(fd), buf, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the buffer alive as documented.
        unsafe { self.push(&entry) }.map_err(|source| TransportError::Uring {
            what: "queueing a write",
            source,
        })
    }

    /// Writes every piece (bytes, file offset) in full, many in flight at
    /// once, and returns when all have landed; a short write is continued
    /// from where it stopped. On failure it still waits for the writes in
    /// flight, then names the first piece that failed.
    ///
    /// It never returns with a write in flight (an io_uring_enter failure is
    /// retried, see `submit_or_wait_out`), so `pieces` is free again when it
    /// returns.
    pub fn write_all_at(&mut self, fd: RawFd, pieces: &[(&[u8], u64)]) -> Result<(), FailedWrite> {
        let mut written = vec![0usize; pieces.len()];
        let mut next = 0;
        let mut retry: Vec<usize> = Vec::new();
        let mut in_flight = 0;
        let mut failed: Option<FailedWrite> = None;
        loop {
            while failed.is_none() && self.sq_space() > 0 {
                let i = match retry.pop() {
                    Some(i) => i,
                    None if next < pieces.len() => {
                        next += 1;
                        next - 1
                    }
                    None => break,
                };
                let (bytes, offset) = pieces[i];
                let rest = &bytes[written[i]..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                // SAFETY: `rest` is borrowed for this call, which waits for
                // every write's completion before returning (the loop below
                // ends only when `in_flight` is 0).
                let queued = unsafe {
                    self.queue_write_at(
                        fd,
                        rest.as_ptr(),
                        len,
                        offset + written[i] as u64,
                        i as u64,
                    )
                };
                if let Err(e) = queued {
                    failed = Some(FailedWrite {
                        piece: i,
                        source: io::Error::other(e.to_string()),
                    });
                    break;
                }
                in_flight += 1;
            }
            if in_flight == 0 {
                return failed.map_or(Ok(()), Err);
            }
            self.submit_or_wait_out(1);
            while let Some(c) = self.pop() {
                in_flight -= 1;
                let i = c.user_data as usize;
                match c.bytes() {
                    Ok(0) => {
                        let source =
                            io::Error::new(io::ErrorKind::WriteZero, "no progress (no space?)");
                        failed.get_or_insert(FailedWrite { piece: i, source });
                    }
                    Ok(n) => {
                        written[i] += n;
                        if written[i] < pieces[i].0.len() {
                            retry.push(i);
                        }
                    }
                    Err(source) => {
                        failed.get_or_insert(FailedWrite { piece: i, source });
                    }
                }
            }
        }
    }

    /// Queues a read of `len` bytes from `fd` at file `offset` into `buf`.
    ///
    /// # Safety
    /// `buf..buf + len` must be writable memory nothing else reads or writes
    /// until this read's completion is popped; with O_DIRECT it must also
    /// meet the file's alignment rules.
    pub unsafe fn queue_read_at(
        &mut self,
        fd: RawFd,
        buf: *mut u8,
        len: u32,
        offset: u64,
        user_data: u64,
    ) -> Result<(), TransportError> {
        let entry = opcode::Read::new(types::Fd(fd), buf, len)
            .offset(offset)
            .build()
            .user_data(user_data);
        // SAFETY: the caller keeps the buffer alive and unshared as documented.
        unsafe { self.push(&entry) }.map_err(|source| TransportError::Uring {
            what: "queueing a read",
            source,
        })
    }
}

/// Moves past `n` received bytes in an iovec list.
fn advance(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iov.len() {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            *first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while *first < iov.len() && iov[*first].iov_len == 0 {
        *first += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn batch_writes_land_at_their_offsets_with_more_than_a_ring_in_flight() {
        let file = tempfile::tempfile().unwrap();
        let mut ring = Ring::new(4).unwrap();
        let bufs: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i + 1; 5000]).collect();
        // Pieces out of order, with a gap left as a hole.
        let pieces: Vec<(&[u8], u64)> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| (b.as_slice(), ((19 - i) * 6000) as u64))
            .collect();
        ring.write_all_at(file.as_raw_fd(), &pieces).unwrap();
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut back).unwrap();
        for (i, b) in bufs.iter().enumerate() {
            let at = (19 - i) * 6000;
            assert_eq!(&back[at..at + 5000], b.as_slice(), "piece {i}");
            if at + 6000 <= back.len() {
                assert!(back[at + 5000..at + 6000].iter().all(|&x| x == 0));
            }
        }
    }

    #[test]
    fn batch_write_failure_names_the_piece() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, b"x").unwrap();
        let ro = std::fs::File::open(&path).unwrap();
        let mut ring = Ring::new(4).unwrap();
        let data = [7u8; 100];
        let e = ring
            .write_all_at(ro.as_raw_fd(), &[(&data, 0), (&data, 100)])
            .expect_err("a read-only file");
        assert!(e.piece < 2);
        assert_eq!(e.source.raw_os_error(), Some(libc::EBADF), "{e:?}");
    }

    #[test]
    fn ordered_sends_and_exact_receive() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ring = Ring::new(8).unwrap();
        let bufs: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 100_000]).collect();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        let msgs: Vec<libc::msghdr> = iovs
            .iter_mut()
            .map(|v| {
                // SAFETY: zeroed msghdr is valid; one iovec set below.
                let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
                m.msg_iov = v;
                m.msg_iovlen = 1;
                m
            })
            .collect();
        let reader = std::thread::spawn(move || {
            let mut ring = Ring::new(4).unwrap();
            let mut out = vec![0u8; 400_000];
            let mut iov = [libc::iovec {
                iov_base: out.as_mut_ptr().cast(),
                iov_len: out.len(),
            }];
            // SAFETY: `out` is this thread's, unborrowed, and outlives the call.
            let n = unsafe { ring.recv_exact(b.as_raw_fd(), &mut iov) };
            assert_eq!(n.unwrap(), 400_000);
            out
        });
        for (i, m) in msgs.iter().enumerate() {
            // SAFETY: msgs, iovs and bufs outlive the completions reaped below.
            unsafe {
                ring.queue_sendmsg(a.as_raw_fd(), m, false, i < 3, i as u64)
                    .unwrap()
            };
        }
        let mut done = 0;
        while done < 4 {
            ring.submit(1).unwrap();
            while let Some(c) = ring.pop() {
                assert_eq!(c.bytes().unwrap(), 100_000);
                done += 1;
            }
        }
        let out = reader.join().unwrap();
        for (i, chunk) in out.chunks(100_000).enumerate() {
            assert!(chunk.iter().all(|&x| x == i as u8));
        }
    }

    #[test]
    fn short_receive_reports_peer_close() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let mut ring = Ring::new(4).unwrap();
        let mut out = [0u8; 10];
        let mut iov = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: 10,
        }];
        // SAFETY: the iovecs point at this test's own unborrowed buffers.
        let n = unsafe { ring.recv_exact(b.as_raw_fd(), &mut iov) };
        assert_eq!(n.unwrap(), 3);
        assert_eq!(&out[..3], &[1, 2, 3]);
    }
}
