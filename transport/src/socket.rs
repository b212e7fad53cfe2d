//! Opening sockets: connect and listen for `tcp:` and `unix:` URIs, the
//! streams of `exec:` commands and inherited `fd:` sockets, the tuning
//! applied to every migration socket (socket2), and, when TLS is on, the
//! TLS handshake right after connect/accept (before ferry's hello).
//!
//! Also owns what may be at a unix socket's path before it is bound
//! ([`listen_unix`], used by the control socket too): only a stale socket is
//! ever removed; a live one, a directory or any other file is refused and
//! left as it is.

use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, TcpKeepalive, Type};

use crate::handshake::{self, ChannelHello};
use crate::{Channel, ChannelUri, SocketChannel, TlsClient, TlsServer, TransportError};

/// Options set on each migration socket.
#[derive(Clone, Debug)]
pub struct SocketTuning {
    /// SO_SNDBUF; `None` leaves the kernel's autotuning on.
    pub send_buffer: Option<usize>,
    /// SO_RCVBUF; `None` leaves the kernel's autotuning on.
    pub recv_buffer: Option<usize>,
    /// TCP_NODELAY: control messages leave at once.
    pub nodelay: bool,
    /// TCP keepalive idle time: a silent dead peer is noticed.
    pub keepalive: Option<Duration>,
    /// TCP_USER_TIMEOUT: unacknowledged data for this long ends the connection.
    pub user_timeout: Option<Duration>,
    /// TCP_CONGESTION for this socket; `None` (the default) keeps the
    /// system's, as every other networked tool does. On loopback and LANs
    /// `cubic` is much faster than a pacing algorithm such as BBR, which
    /// spends CPU on a timer per packet (docs/MEASUREMENTS.md has the
    /// figures). If the kernel refuses the name, the system's stays.
    pub congestion: Option<String>,
}

impl Default for SocketTuning {
    fn default() -> Self {
        Self {
            send_buffer: None,
            recv_buffer: None,
            nodelay: true,
            keepalive: Some(Duration::from_secs(10)),
            user_timeout: Some(Duration::from_secs(30)),
            congestion: None,
        }
    }
}

impl SocketTuning {
    fn apply(&self, s: &Socket, is_tcp: bool) -> std::io::Result<()> {
        if let Some(n) = self.send_buffer {
            s.set_send_buffer_size(n)?;
        }
        if let Some(n) = self.recv_buffer {
            s.set_recv_buffer_size(n)?;
        }
        if is_tcp {
            s.set_tcp_nodelay(self.nodelay)?;
            if let Some(t) = self.keepalive {
                s.set_tcp_keepalive(&TcpKeepalive::new().with_time(t).with_interval(t))?;
            }
            s.set_tcp_user_timeout(self.user_timeout)?;
            if let Some(cc) = &self.congestion {
                if let Err(e) = s.set_tcp_congestion(cc.as_bytes()) {
                    tracing::warn!(
                        "TCP congestion control '{cc}' refused ({e}); keeping the system's"
                    );
                }
            }
        }
        Ok(())
    }
}

fn resolve(uri: &ChannelUri, text: &str) -> Result<(SockAddr, Domain, bool), TransportError> {
    match uri {
        ChannelUri::Tcp { host, port } => {
            let addr: SocketAddr = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| TransportError::BadUri {
                    uri: text.into(),
                    why: format!("cannot resolve host: {e}"),
                })?
                .next()
                .ok_or_else(|| TransportError::BadUri {
                    uri: text.into(),
                    why: "host has no address".into(),
                })?;
            Ok((addr.into(), Domain::for_address(addr), true))
        }
        ChannelUri::Unix(path) => {
            let addr = SockAddr::unix(path).map_err(|e| TransportError::BadUri {
                uri: text.into(),
                why: e.to_string(),
            })?;
            Ok((addr, Domain::UNIX, false))
        }
        ChannelUri::Exec(_) | ChannelUri::Fd(_) => Err(TransportError::BadUri {
            uri: text.into(),
            why: "has no socket address".into(),
        }),
        ChannelUri::File(_) => Err(TransportError::BadUri {
            uri: text.into(),
            why: "is a saved-guest file, not a channel: `ferry save --to file:PATH` and \
                  `ferry restore --from file:PATH` take it"
                .into(),
        }),
    }
}

/// Runs `sh -c COMMAND` with its stdin and stdout joined to one end of a
/// socketpair; returns the other end. The command carries the stream to
/// the destination; it ends when its stdin does (our end closed). A thread
/// reaps it and logs a failure.
fn spawn_exec(command: &str, label: &str) -> Result<Socket, TransportError> {
    let err = |source| TransportError::Connect {
        uri: label.into(),
        source,
    };
    let (ours, theirs) = Socket::pair(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(err)?;
    let theirs = std::os::fd::OwnedFd::from(theirs);
    let stdin = theirs.try_clone().map_err(err)?;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(stdin)
        .stdout(theirs)
        .spawn()
        .map_err(err)?;
    let what = label.to_string();
    std::thread::Builder::new()
        .name("ferry-exec-reaper".into())
        .spawn(move || match child.wait() {
            Ok(st) if !st.success() => tracing::warn!("{what}: the command ended with {st}"),
            Err(e) => tracing::warn!("{what}: waiting for the command: {e}"),
            Ok(_) => {}
        })
        .map_err(err)?;
    Ok(ours)
}

/// Our own copy of inherited descriptor `fd`, which must be a socket; the
/// inherited one stays as it is.
fn inherited_socket(fd: i32, label: &str) -> Result<Socket, TransportError> {
    let bad = |why: String| TransportError::BadUri {
        uri: label.into(),
        why,
    };
    // SAFETY: F_DUPFD_CLOEXEC on any integer is harmless: it fails with
    // EBADF for a descriptor this process does not have.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        let e = std::io::Error::last_os_error();
        return Err(bad(format!(
            "descriptor {fd} is not open in this process ({e})"
        )));
    }
    // SAFETY: `copy` is a descriptor we just made and own alone.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(copy) };
    let socket = Socket::from(owned);
    match socket.r#type() {
        Ok(t) if t == Type::STREAM => Ok(socket),
        Ok(_) => Err(bad(format!(
            "descriptor {fd} is a socket, but not a stream socket"
        ))),
        Err(_) => Err(bad(format!("descriptor {fd} is not a socket"))),
    }
}

/// The stream for the session's `slot`-th channel (0: main, then multifd
/// 0..K): a new connection for `tcp:`/`unix:`, a new command for `exec:`,
/// the `slot`-th inherited socket for `fd:`.
fn open_stream(
    uri: &ChannelUri,
    tuning: &SocketTuning,
    slot: usize,
) -> Result<SocketChannel, TransportError> {
    let text = uri.to_string();
    match uri {
        ChannelUri::Exec(cmd) => {
            let s = spawn_exec(cmd, &text)?;
            tuning
                .apply(&s, false)
                .map_err(|source| TransportError::Connect {
                    uri: text.clone(),
                    source,
                })?;
            Ok(SocketChannel::new(s, text))
        }
        ChannelUri::Fd(fds) => {
            let Some(&fd) = fds.get(slot) else {
                return Err(TransportError::BadUri {
                    uri: text,
                    why: format!(
                        "names {} descriptor(s), but the session needs one per channel \
                         (main and each multifd channel): at least {}",
                        fds.len(),
                        slot + 1
                    ),
                });
            };
            let s = inherited_socket(fd, &text)?;
            let is_tcp = s.local_addr().is_ok_and(|a| a.as_socket().is_some());
            tuning
                .apply(&s, is_tcp)
                .map_err(|source| TransportError::Connect {
                    uri: text.clone(),
                    source,
                })?;
            Ok(SocketChannel::new(s, format!("fd:{fd}")))
        }
        _ => connect(uri, tuning),
    }
}

/// Connects a raw socket to `uri` (no handshake).
pub fn connect(uri: &ChannelUri, tuning: &SocketTuning) -> Result<SocketChannel, TransportError> {
    let text = uri.to_string();
    let (addr, domain, is_tcp) = resolve(uri, &text)?;
    let err = |source| TransportError::Connect {
        uri: text.clone(),
        source,
    };
    let s = Socket::new(domain, Type::STREAM.cloexec(), None).map_err(err)?;
    tuning.apply(&s, is_tcp).map_err(err)?;
    s.connect_timeout(&addr, Duration::from_secs(10))
        .map_err(err)?;
    Ok(SocketChannel::new(s, text))
}

/// Connects to `uri` and sends the channel's hello. The receiver answers
/// only once it has every channel of the session, so a sender opens all its
/// channels first, then calls [`await_accept`] on each.
pub fn connect_channel(
    uri: &ChannelUri,
    tuning: &SocketTuning,
    hello: &ChannelHello,
) -> Result<SocketChannel, TransportError> {
    let mut ch = open_stream(uri, tuning, hello.slot())?;
    crate::Channel::set_label(&mut ch, format!("{} ({uri})", hello.name()));
    handshake::send_hello(&ch, hello)?;
    Ok(ch)
}

/// Like [`connect_channel`], with TLS when `tls` is given: the handshake
/// runs right after connecting, and the hello travels inside TLS. The name
/// checked against the server's certificate is the client's override, else
/// the URI's host (`localhost` for `unix:`).
pub fn connect_channel_secure(
    uri: &ChannelUri,
    tuning: &SocketTuning,
    hello: &ChannelHello,
    tls: Option<&TlsClient>,
) -> Result<Box<dyn Channel>, TransportError> {
    let Some(tls) = tls else {
        return Ok(Box::new(connect_channel(uri, tuning, hello)?));
    };
    let mut raw = open_stream(uri, tuning, hello.slot())?;
    crate::Channel::set_label(&mut raw, format!("{} ({uri})", hello.name()));
    let host = match uri {
        ChannelUri::Tcp { host, .. } => host.as_str(),
        _ => "localhost",
    };
    let ch = tls.handshake(raw, host)?;
    handshake::send_hello(&ch, hello)?;
    Ok(Box::new(ch))
}

/// Waits for the receiver's answer to a channel's hello; a refusal comes
/// back as [`TransportError::Refused`] with the receiver's reason.
pub fn await_accept(ch: &dyn crate::Channel, timeout: Duration) -> Result<(), TransportError> {
    handshake::read_reply(ch, timeout)
}

/// The kind of a file that is not a socket, in words.
fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "file of unknown type"
    }
}

/// Makes room for a unix socket at `path`: nothing there is fine; a socket
/// nobody listens on (connect() is refused: its process died without
/// removing it) is removed; a live socket, a directory or any other file
/// (a symbolic link included: it is not followed) is refused and left as
/// it is. The probe is a non-blocking connect, so a live listener with a
/// full backlog counts as live instead of stalling us; it sees one
/// connection that closes at once.
fn make_room(path: &Path) -> Result<(), TransportError> {
    let probe_err = |source| TransportError::UnixProbe {
        path: path.into(),
        source,
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe_err(e)),
    };
    let kind = meta.file_type();
    if kind.is_dir() {
        return Err(TransportError::UnixIsDirectory { path: path.into() });
    }
    if !kind.is_socket() {
        return Err(TransportError::UnixNotSocket {
            path: path.into(),
            kind: file_kind(kind),
        });
    }
    let addr = SockAddr::unix(path).map_err(probe_err)?;
    let probe = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(probe_err)?;
    probe.set_nonblocking(true).map_err(probe_err)?;
    match probe.connect(&addr) {
        Ok(()) => Err(TransportError::UnixInUse { path: path.into() }),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
        {
            // Its backlog is full: someone listens there.
            Err(TransportError::UnixInUse { path: path.into() })
        }
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::info!("{}: removed a stale unix socket", path.display());
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(probe_err(e)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(probe_err(e)),
    }
}

/// Binds and listens on a unix socket at `path`, after [`make_room`]: only
/// a stale socket there is replaced; a live socket, a directory or any
/// other file is refused ([`TransportError::UnixInUse`],
/// [`TransportError::UnixIsDirectory`], [`TransportError::UnixNotSocket`])
/// and left untouched.
///
/// `mode`, if given, is set on the socket file after bind() and before
/// listen(). Until listen() every connect() is refused (ECONNREFUSED), so
/// nobody can connect while the file still has the mode the umask gave it;
/// this needs no change of the process-wide umask, which would race other
/// threads creating files.
pub fn listen_unix(
    path: &Path,
    mode: Option<u32>,
    backlog: i32,
) -> Result<UnixListener, TransportError> {
    make_room(path)?;
    let err = |source| TransportError::Listen {
        uri: format!("unix:{}", path.display()),
        source,
    };
    let addr = SockAddr::unix(path).map_err(err)?;
    let s = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None).map_err(err)?;
    s.bind(&addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            // Someone put a file there since make_room looked.
            TransportError::UnixInUse { path: path.into() }
        } else {
            err(e)
        }
    })?;
    let listening = mode
        .map_or(Ok(()), |m| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(m))
        })
        .and_then(|()| s.listen(backlog));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(s.into())
}

/// The identity of the file at `path` (device, inode), if any: a listener
/// removes its socket file on drop only while it is still its own.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A listening socket for one `tcp:` or `unix:` URI.
pub struct Listener {
    socket: Socket,
    uri: ChannelUri,
    tuning: SocketTuning,
    tls: Option<Arc<TlsServer>>,
    /// The unix socket file this listener created (device, inode).
    unix_file: Option<(u64, u64)>,
}

impl Listener {
    /// Binds and listens. `tcp:HOST:0` picks a free port; [`Listener::uri`]
    /// then tells which. For `unix:PATH` see [`listen_unix`]: a stale
    /// socket file is replaced, anything else at PATH is refused and left
    /// untouched.
    pub fn bind(uri: &ChannelUri, tuning: SocketTuning) -> Result<Self, TransportError> {
        let text = uri.to_string();
        match uri {
            ChannelUri::Fd(fds) => return Self::inherited(fds, uri, tuning),
            ChannelUri::Exec(_) => {
                return Err(TransportError::BadUri {
                    uri: text,
                    why: "exec: is for the sending side (`ferry send --to exec:...`); \
                          listen on tcp: or unix: and let the command connect there"
                        .into(),
                })
            }
            _ => {}
        }
        let (addr, domain, is_tcp) = resolve(uri, &text)?;
        let err = |source| TransportError::Listen {
            uri: text.clone(),
            source,
        };
        let (s, unix_file) = if let ChannelUri::Unix(p) = uri {
            let s = Socket::from(listen_unix(p, None, 128)?);
            (s, file_id(p))
        } else {
            let s = Socket::new(domain, Type::STREAM.cloexec(), None).map_err(err)?;
            if is_tcp {
                s.set_reuse_address(true).map_err(err)?;
            }
            s.bind(&addr).map_err(err)?;
            s.listen(128).map_err(err)?;
            (s, None)
        };
        let uri = match uri {
            ChannelUri::Tcp { host, .. } => {
                let port = s
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or(0, |a| a.port());
                ChannelUri::Tcp {
                    host: host.clone(),
                    port,
                }
            }
            other => other.clone(),
        };
        Ok(Self {
            socket: s,
            uri,
            tuning,
            tls: None,
            unix_file,
        })
    }

    /// A listening socket this process inherited (`fd:N`, e.g. from
    /// systemd's socket activation).
    fn inherited(
        fds: &[i32],
        uri: &ChannelUri,
        tuning: SocketTuning,
    ) -> Result<Self, TransportError> {
        let text = uri.to_string();
        let &[fd] = fds else {
            return Err(TransportError::BadUri {
                uri: text,
                why: "a listener takes one descriptor, a listening socket".into(),
            });
        };
        let socket = inherited_socket(fd, &text)?;
        // SO_ACCEPTCONN: is it listening?
        let mut on: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `on`.
        let r = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_ACCEPTCONN,
                (&mut on as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r != 0 || on == 0 {
            return Err(TransportError::BadUri {
                uri: text,
                why: format!("descriptor {fd} is not a listening socket"),
            });
        }
        Ok(Self {
            socket,
            uri: uri.clone(),
            tuning,
            tls: None,
            // Not ours to remove: it belongs to whoever handed it over.
            unix_file: None,
        })
    }

    /// Every accepted connection must then complete a TLS handshake with
    /// these credentials before its hello.
    pub fn with_tls(mut self, tls: Arc<TlsServer>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The TLS credentials this listener uses, if any (a postcopy
    /// recovery listens again with the same).
    pub fn tls(&self) -> Option<Arc<TlsServer>> {
        self.tls.clone()
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accepts one connection as a channel: with TLS, once its handshake
    /// has completed.
    pub fn accept_channel(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Box<dyn Channel>, TransportError> {
        let raw = self.accept(timeout)?;
        match &self.tls {
            None => Ok(Box::new(raw)),
            Some(tls) => Ok(Box::new(tls.handshake(raw)?)),
        }
    }

    pub fn uri(&self) -> &ChannelUri {
        &self.uri
    }

    /// Waits for one connection, at most `timeout` if given.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<SocketChannel, TransportError> {
        let text = self.uri.to_string();
        self.socket
            .set_read_timeout(timeout)
            .map_err(|source| TransportError::Accept {
                uri: text.clone(),
                source,
            })?;
        let (s, peer) = self.socket.accept().map_err(|source| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                TransportError::Timeout {
                    what: format!("a connection on {text}"),
                    secs: timeout.unwrap_or_default().as_secs_f64(),
                }
            }
            _ => TransportError::Accept {
                uri: text.clone(),
                source,
            },
        })?;
        let is_tcp = matches!(self.uri, ChannelUri::Tcp { .. });
        let peer = match peer.as_socket() {
            Some(a) => format!("tcp {a}"),
            None => format!("unix {}", text.trim_start_matches("unix:")),
        };
        self.tuning
            .apply(&s, is_tcp)
            .map_err(|source| TransportError::Io {
                channel: peer.clone(),
                what: "tuning socket",
                source,
            })?;
        Ok(SocketChannel::new(s, format!("connection from {peer}")))
    }
}

impl Drop for Listener {
    /// Removes the unix socket file, unless it is no longer ours (removed,
    /// or replaced by another listener's).
    fn drop(&mut self) {
        if let ChannelUri::Unix(p) = &self.uri {
            if self.unix_file.is_some() && file_id(p) == self.unix_file {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}
