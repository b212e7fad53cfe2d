//! A pipe that moves bytes from this process's memory into a socket without
//! the kernel copying them on the way: `vmsplice` makes the pipe refer to the
//! user pages, `splice` hands those page references to the socket, and the
//! bytes are first read when they leave the machine (or, over loopback, when
//! the receiver copies them out).
//!
//! Because the socket keeps referring to the pages after `splice` returns,
//! whatever is written to them until then may still be what is sent. Only
//! memory the caller either leaves alone or re-sends later may go by
//! reference; small buffers the caller reuses at once (packet headers) are
//! copied into the pipe instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How much a pipe asks to hold; the kernel may grant less.
pub const WANTED_PIPE_BYTES: usize = 1 << 20;

pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl SplicePipe {
    /// A new pipe, grown towards `want` bytes where the kernel allows it.
    pub fn new(want: usize) -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded; each descriptor is open and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let mut size = want.next_power_of_two();
        let capacity = loop {
            // SAFETY: F_SETPIPE_SZ on our own pipe; the kernel checks the value.
            let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as i32) };
            if got > 0 {
                break got as usize;
            }
            if size <= 64 << 10 {
                // The default (64 KiB) is what we have.
                // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
                let cur = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
                if cur <= 0 {
                    return Err(io::Error::last_os_error());
                }
                break cur as usize;
            }
            size /= 2;
        };
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Bytes the pipe can hold at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sends `copied` then `referenced` to `socket`, in order, and returns
    /// when all of it has been handed to the socket. `copied` is copied into
    /// the pipe; `referenced` goes by page reference.
    ///
    /// # Safety
    /// Every iovec in `copied` must point at readable memory that stays
    /// mapped for the call. Every iovec in `referenced` must describe readable memory that stays
    /// mapped for as long as the kernel may read it (the socket holds the
    /// pages, not the mapping, so an unmapped page is still safe to read; a
    /// page rewritten before it is sent goes out with its new bytes).
    pub unsafe fn send(
        &mut self,
        socket: RawFd,
        copied: &[libc::iovec],
        referenced: &mut [libc::iovec],
    ) -> io::Result<u64> {
        // SAFETY: the caller's guarantee covers `copied` too (readable for
        // the call; it is copied into the pipe before `send` returns).
        let mut in_pipe = unsafe { self.copy_in(socket, copied) }?;
        let mut total: u64 = copied.iter().map(|v| v.iov_len as u64).sum();
        let mut rest = referenced;
        while !rest.is_empty() || in_pipe > 0 {
            if !rest.is_empty() {
                let n = self.reference(rest)?;
                if n == 0 && in_pipe == 0 {
                    return Err(io::Error::other("vmsplice took nothing into an empty pipe"));
                }
                in_pipe += n;
                total += n as u64;
                rest = advance(rest, n);
            }
            // Hand the pipe's contents to the socket; say "more follows"
            // unless this empties the packet.
            let more = !rest.is_empty();
            in_pipe -= self.drain_to(socket, in_pipe, more)?;
        }
        Ok(total)
    }

    /// Copies `bufs` into the (empty) pipe; returns the bytes left in it.
    /// Whatever does not fit in half the pipe is passed on to the socket in
    /// pieces first, so a write never waits for a pipe only we drain. The
    /// buffers are passed to the kernel as raw pointers, never as `&[u8]`:
    /// they may be memory others write meanwhile.
    ///
    /// # Safety
    /// Every iovec in `bufs` must point at `iov_len` bytes that stay mapped
    /// and readable for the whole call.
    unsafe fn copy_in(&mut self, socket: RawFd, bufs: &[libc::iovec]) -> io::Result<usize> {
        let half = self.capacity / 2;
        let total: usize = bufs.iter().map(|v| v.iov_len).sum();
        if total <= half {
            // SAFETY: the caller's guarantee: the iovecs are readable for the
            // call; writev copies them. The pipe is empty and they fit, so
            // it is not short.
            let n =
                unsafe { libc::writev(self.write.as_raw_fd(), bufs.as_ptr(), bufs.len() as i32) };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            };
        }
        let mut in_pipe = 0;
        for v in bufs {
            let base = v.iov_base as *const u8;
            let mut done = 0;
            while done < v.iov_len {
                let take = (v.iov_len - done).min(half);
                if in_pipe + take > half {
                    in_pipe -= self.drain_to(socket, in_pipe, true)?;
                }
                // SAFETY: `done < iov_len`, so `base + done` and the `take`
                // bytes after it lie inside the caller's buffer, readable for
                // the call; at most half the pipe is in use, so the write fits
                // and does not block. The kernel reads the bytes; no Rust
                // reference to them is formed.
                let n = unsafe { libc::write(self.write.as_raw_fd(), base.add(done).cast(), take) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                in_pipe += n as usize;
                done += n as usize;
            }
        }
        Ok(in_pipe)
    }

    /// Puts references to as much of `iov` as fits into the pipe.
    fn reference(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = iov.len().min(libc::UIO_MAXIOV as usize);
        loop {
            // SAFETY: the caller of `send` vouches for the iovecs; vmsplice
            // only reads them and takes references to the pages.
            let n = unsafe {
                libc::vmsplice(
                    self.write.as_raw_fd(),
                    iov.as_ptr(),
                    count,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Full: the caller drains the pipe first.
                Some(libc::EAGAIN) => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Moves up to `len` bytes from the pipe into the socket; returns how
    /// many moved (at least one unless `len` is 0).
    fn drain_to(&mut self, socket: RawFd, len: usize, more: bool) -> io::Result<usize> {
        let flags = libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
        let mut moved = 0;
        while moved < len {
            // SAFETY: splice between two descriptors we own or were lent;
            // null offsets mean "the current position" for both.
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    socket,
                    std::ptr::null_mut(),
                    len - moved,
                    flags,
                )
            };
            match n {
                n if n > 0 => moved += n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EINTR) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(moved)
    }
}

/// Drops the first `n` bytes from an iovec list.
fn advance(mut iov: &mut [libc::iovec], mut n: usize) -> &mut [libc::iovec] {
    while n > 0 {
        let first = &mut iov[0];
        if n < first.iov_len {
            // SAFETY: n < iov_len, so the new base stays inside the buffer.
            first.iov_base = unsafe { first.iov_base.cast::<u8>().add(n) }.cast();
            first.iov_len -= n;
            return iov;
        }
        n -= first.iov_len;
        iov = &mut iov[1..];
    }
    iov
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn sends_header_and_pages_in_order() {
        send_through(64 << 10, b"HEAD".to_vec());
    }

    #[test]
    fn a_header_larger_than_the_pipe_goes_in_pieces() {
        send_through(64 << 10, (0..200_000u32).map(|i| (i % 7) as u8).collect());
    }

    fn send_through(pipe_bytes: usize, header: Vec<u8>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut pipe = SplicePipe::new(pipe_bytes).unwrap();
        let pages: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let copied = [libc::iovec {
            iov_base: header.as_ptr() as *mut _,
            iov_len: header.len(),
        }];
        let mut referenced: Vec<libc::iovec> = pages
            .chunks(70_000)
            .map(|c| libc::iovec {
                iov_base: c.as_ptr() as *mut _,
                iov_len: c.len(),
            })
            .collect();
        // SAFETY: `pages` outlives the reader, which consumes everything.
        let n = unsafe { pipe.send(a.as_raw_fd(), &copied, &mut referenced) }.unwrap();
        let h = header.len();
        assert_eq!(n as usize, h + 300_000);
        drop(a);
        let got = reader.join().unwrap();
        assert!(got[..h] == header[..], "header differs");
        assert!(got[h..] == pages[..], "payload differs");
    }
}
