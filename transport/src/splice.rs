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
    /// the pipe (it must fit in half the pipe); `referenced` goes by page
    /// reference.
    ///
    /// # Safety
    /// Every iovec in `referenced` must describe readable memory that stays
    /// mapped for as long as the kernel may read it (the socket holds the
    /// pages, not the mapping, so an unmapped page is still safe to read; a
    /// page rewritten before it is sent goes out with its new bytes).
    pub unsafe fn send(
        &mut self,
        socket: RawFd,
        copied: &[libc::iovec],
        referenced: &mut [libc::iovec],
    ) -> io::Result<u64> {
        let head: usize = copied.iter().map(|v| v.iov_len).sum();
        if head > self.capacity / 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{head} header bytes do not fit a {} byte pipe",
                    self.capacity
                ),
            ));
        }
        let mut in_pipe = 0usize;
        if head > 0 {
            // SAFETY: the iovecs are the caller's readable buffers; writev copies them.
            let n = unsafe {
                libc::writev(self.write.as_raw_fd(), copied.as_ptr(), copied.len() as i32)
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // The pipe was empty and the header fits: a pipe write of at most
            // half its capacity is never short.
            in_pipe = n as usize;
        }
        let mut total = in_pipe as u64;
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
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut pipe = SplicePipe::new(64 << 10).unwrap();
        let header = *b"HEAD";
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
        assert_eq!(n, 4 + 300_000);
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..] == pages[..], "payload differs");
    }
}
