//! The `Channel` trait: one ordered, reliable byte stream of a migration.
//!
//! The controller and multifd only ever hold `Box<dyn Channel>`, so a new kind
//! (TLS, RDMA, vsock) is one new type here. A kind that is a plain kernel
//! socket exposes its fd through [`Channel::uring_fd`], and the data path then
//! drives it with io_uring straight from guest memory. A TLS channel exposes
//! its socket too, and its codec through [`Channel::tls`]: the data path then
//! seals packets into its own buffers before its ring sends them, and opens
//! what its ring received.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::Socket;

pub trait Channel: Send + Sync + fmt::Debug {
    /// A name for messages: role, index and peer, e.g. `multifd[1] (tcp 127.0.0.1:5000)`.
    fn label(&self) -> &str;
    /// Renames the channel once its role is known.
    fn set_label(&mut self, label: String);
    fn read_exact(&self, buf: &mut [u8]) -> io::Result<()>;
    fn write_all(&self, buf: &[u8]) -> io::Result<()>;
    /// The socket the data path may drive with io_uring, if this kind allows it.
    fn uring_fd(&self) -> Option<RawFd>;
    /// Ends both directions; blocked readers and writers on any thread return.
    fn shutdown(&self);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// A write that makes no progress for this long fails (WouldBlock).
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Ends this side's stream cleanly (TLS: close_notify), so the peer can
    /// tell a clean end from a cut connection. Plain sockets need nothing.
    fn finish(&self) -> io::Result<()> {
        Ok(())
    }
    /// The TLS codec, for a TLS channel: bytes on its socket are records.
    fn tls(&self) -> Option<&crate::TlsChannel> {
        None
    }
    /// The TLS session as a shared handle, for a data-path thread that
    /// decides once, when it starts, how it reads and writes the channel.
    fn tls_shared(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<crate::TlsChannel>> {
        None
    }
    /// Reads what has arrived: at least one byte and at most `buf.len()`,
    /// `Ok(0)` at the end of the stream; `None` for a kind that only reads
    /// exactly (use [`Self::read_exact`]). Lets a reader of many small
    /// frames take them with one call.
    fn read_some(&self, _buf: &mut [u8]) -> Option<io::Result<usize>> {
        None
    }
}

/// A TCP or unix stream socket.
pub struct SocketChannel {
    socket: Socket,
    label: String,
}

impl SocketChannel {
    pub fn new(socket: Socket, label: String) -> Self {
        Self { socket, label }
    }
    pub fn socket(&self) -> &Socket {
        &self.socket
    }
    pub fn into_parts(self) -> (Socket, String) {
        (self.socket, self.label)
    }
}

impl fmt::Debug for SocketChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SocketChannel({})", self.label)
    }
}

impl Channel for SocketChannel {
    fn label(&self) -> &str {
        &self.label
    }
    fn set_label(&mut self, label: String) {
        self.label = label;
    }
    fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        (&self.socket).read_exact(buf)
    }
    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        (&self.socket).write_all(buf)
    }
    fn uring_fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
    }
    fn shutdown(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_write_timeout(timeout)
    }
    fn read_some(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        Some((&self.socket).read(buf))
    }
}
