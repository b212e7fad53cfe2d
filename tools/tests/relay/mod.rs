//! A TCP relay between `ferry send` and `ferry recv` that understands the
//! wire (plaintext only: with TLS the hello and everything after it is
//! encrypted) and injects one fault into it.
//!
//! For each connection `send` opens to the relay, the relay opens one to
//! `recv`'s real port and forwards both directions on two threads. The
//! source → destination direction ("up") starts with the channel hello
//! (40 bytes: role main/multifd and index, see
//! `transport/src/handshake.rs`); the destination → source direction
//! ("down") starts with the handshake reply (8 bytes + reason). After that:
//! - main, both directions: frames, an 8-byte header (u16 type, u16
//!   reserved, u32 body length) and the body (`src/protocol.rs`);
//! - multifd, up: packets, a 64-byte header, (N + Z) u64 offsets, N u32
//!   page crcs with the PAGE_CRCS flag, then the payload of the header's
//!   payload length (N pages raw, or a zstd frame plus the raw rest when
//!   COMPRESSED; `multifd/src/packet.rs`). Multifd down carries nothing
//!   after the reply; it is copied as bytes.
//!
//! The relay always parses the stream as the sender wrote it (faults change
//! what is forwarded, never what is parsed), so it stays in step with the
//! sender whatever it does to the receiver. Messages are stored and
//! forwarded whole.
//!
//! A [`Fault`] names a channel, a direction, a message kind and the N-th
//! occurrence (from 1) of that kind on that channel and direction, and an
//! [`Action`]. The relay records when it applied the fault ([`Relay::fired`]).
//!
//! Close semantics, as a real path would show them:
//! - a FIN read on one leg is passed on as a FIN (half close) on the other;
//! - a reset read, or a write refused, ends the connection with RST both
//!   ways (SO_LINGER 0, then close);
//! - a stalled leg delivers nothing more, ever (no data, no FIN, no RST):
//!   its sockets stay open until the relay is dropped.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const HELLO_LEN: usize = 40;
pub const FRAME_LEN: usize = 12;
pub const PACKET_HEADER_LEN: usize = 64;
const REPLY_LEN: usize = 8;

const FLAG_SYNC: u16 = 1;
const FLAG_END: u16 = 2;
const FLAG_PAGE_CRCS: u16 = 8;

/// A message larger than this means the relay lost step with the stream
/// (it then copies bytes as they come and notes it).
const MAX_MESSAGE: u64 = 300 << 20;
/// How often blocked reads and writes look at the relay's flags.
const TICK: Duration = Duration::from_millis(50);
/// How long a cross-channel reorder waits for a packet on another channel.
const REORDER_WAIT: Duration = Duration::from_secs(3);

/// Main channel message types and their names (`src/protocol.rs`).
pub const FRAME_KINDS: [(u16, &str); 11] = [
    (1, "SETUP"),
    (2, "PASS_END"),
    (3, "DEVICE_STATE"),
    (4, "COMPLETE"),
    (5, "CANCEL"),
    (6, "VERIFY"),
    (101, "SETUP_ACK"),
    (102, "SHUT"),
    (103, "SWITCHOVER_ACK"),
    (104, "RESUMED"),
    (200, "HEARTBEAT"),
];

fn frame_kind(t: u16) -> &'static str {
    FRAME_KINDS
        .iter()
        .find(|k| k.0 == t)
        .map_or("UNKNOWN_FRAME", |k| k.1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Source → destination.
    Up,
    /// Destination → source (on main: the return path).
    Down,
}

impl Dir {
    pub fn arrow(self) -> &'static str {
        match self {
            Dir::Up => ">",
            Dir::Down => "<",
        }
    }
}

/// Where in a message's body (frame body; packet payload) to flip a bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    Start(usize),
    FromEnd(usize),
    Middle,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Flip bit `bit` of byte `byte` of the header (frame: 8 bytes; packet: 64).
    FlipHeader { byte: usize, bit: u8 },
    /// Flip bit `bit` of a body byte (a packet's payload).
    FlipBody { at: At, bit: u8 },
    /// Forward the first half of the message, then close both legs with FIN.
    TruncateFin,
    /// Close both legs with RST (SO_LINGER 0, then close), message not sent.
    CutRst,
    /// Forward the message twice.
    Duplicate,
    /// Do not forward the message.
    Drop,
    /// Stop forwarding this leg (from this message on) for ever; sockets stay open.
    Stall,
    /// Hold a multifd packet until another multifd channel has forwarded
    /// its next packet, then forward it.
    ReorderCross,
    /// Forward the next message of the same leg first, then this one.
    SwapNext,
}

impl Action {
    pub fn name(&self) -> String {
        match self {
            Action::FlipHeader { byte, bit } => format!("flip-hdr[{byte}.{bit}]"),
            Action::FlipBody { at, bit } => match at {
                At::Start(b) => format!("flip-body[{b}.{bit}]"),
                At::FromEnd(b) => format!("flip-body[-{b}.{bit}]"),
                At::Middle => format!("flip-body[mid.{bit}]"),
            },
            Action::TruncateFin => "truncate-fin".into(),
            Action::CutRst => "cut-rst".into(),
            Action::Duplicate => "dup".into(),
            Action::Drop => "drop".into(),
            Action::Stall => "stall".into(),
            Action::ReorderCross => "reorder-cross".into(),
            Action::SwapNext => "swap-next".into(),
        }
    }
    pub fn is_cut(&self) -> bool {
        matches!(self, Action::TruncateFin | Action::CutRst)
    }
}

#[derive(Clone, Debug)]
pub struct Fault {
    /// `main`, `multifd[i]`, or `multifd[*]`: whichever multifd channel
    /// carries the `nth` message of `kind` first (counted over all of them).
    pub channel: String,
    pub dir: Dir,
    /// A frame type name (`SETUP`, `SHUT`...) or a packet kind (`DATA`,
    /// `SYNC`, `END`).
    pub kind: &'static str,
    /// Which occurrence of `kind` on this channel and direction, from 1.
    pub nth: u64,
    pub action: Action,
}

impl Fault {
    pub fn name(&self) -> String {
        format!(
            "{}{}{}#{}:{}",
            self.channel,
            self.dir.arrow(),
            self.kind,
            self.nth,
            self.action.name()
        )
    }
}

/// When and how the fault was applied.
#[derive(Clone, Debug)]
pub struct Fired {
    pub at: Instant,
    /// The channel it hit (`multifd[*]` resolved).
    pub channel: String,
    pub note: String,
}

struct Shared {
    target: u16,
    fault: Option<Fault>,
    stop: AtomicBool,
    fired: Mutex<Option<Fired>>,
    /// Messages seen, by (channel, direction, kind).
    seen: Mutex<HashMap<(String, Dir, &'static str), u64>>,
    /// The same over all multifd channels together (for `multifd[*]`).
    seen_multifd: Mutex<HashMap<(Dir, &'static str), u64>>,
    /// Anything odd the relay noticed (lost step, reorder not achieved...).
    notes: Mutex<Vec<String>>,
    /// Packets forwarded up on each multifd channel (for reorders).
    forwarded: Mutex<HashMap<String, u64>>,
    forwarded_cv: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Relay {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on 127.0.0.1 (a free port) and relays to 127.0.0.1:`target`.
    pub fn start(target: u16, fault: Option<Fault>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay: bind");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            target,
            fault,
            stop: AtomicBool::new(false),
            fired: Mutex::new(None),
            seen: Mutex::new(HashMap::new()),
            seen_multifd: Mutex::new(HashMap::new()),
            notes: Mutex::new(Vec::new()),
            forwarded: Mutex::new(HashMap::new()),
            forwarded_cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .unwrap();
        Relay {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn fired(&self) -> Option<Fired> {
        self.shared.fired.lock().unwrap().clone()
    }

    pub fn notes(&self) -> Vec<String> {
        self.shared.notes.lock().unwrap().clone()
    }

    /// How many messages of `kind` went by on `channel` in `dir`.
    pub fn seen(&self, channel: &str, dir: Dir, kind: &str) -> u64 {
        self.shared
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|((c, d, k), _)| c == channel && *d == dir && *k == kind)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Every (channel, direction, kind) count, sorted, for reports.
    pub fn seen_all(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|((c, d, k), n)| format!("{c}{}{k}={n}", d.arrow()))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Pumps notice `stop` within a tick (every blocking call has a timeout).
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for t in threads {
            let _ = t.join();
        }
    }
}

fn fire_now(sh: &Shared, channel: String, note: String) {
    let mut f = sh.fired.lock().unwrap();
    if f.is_none() {
        *f = Some(Fired {
            at: Instant::now(),
            channel,
            note,
        });
    }
}

fn note(sh: &Shared, s: String) {
    sh.notes.lock().unwrap().push(s);
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((src, _)) => {
                let _ = src.set_nonblocking(false);
                let dst = match TcpStream::connect(("127.0.0.1", sh.target)) {
                    Ok(d) => d,
                    Err(e) => {
                        note(&sh, format!("relay: cannot connect to the receiver: {e}"));
                        let _ = src.shutdown(Shutdown::Both);
                        continue;
                    }
                };
                for s in [&src, &dst] {
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(TICK));
                    let _ = s.set_write_timeout(Some(TICK));
                }
                let conn = Arc::new(Conn {
                    s: Arc::new(src),
                    d: Arc::new(dst),
                    name: Mutex::new(None),
                    cut: AtomicBool::new(false),
                    fin: AtomicBool::new(false),
                    stalled: [AtomicBool::new(false), AtomicBool::new(false)],
                    pumps: AtomicUsize::new(2),
                });
                let mut threads = sh.threads.lock().unwrap();
                for dir in [Dir::Up, Dir::Down] {
                    let (sh, conn) = (sh.clone(), conn.clone());
                    let (from, to) = match dir {
                        Dir::Up => (conn.s.clone(), conn.d.clone()),
                        Dir::Down => (conn.d.clone(), conn.s.clone()),
                    };
                    let t = std::thread::Builder::new()
                        .name(format!("relay-{dir:?}"))
                        .spawn(move || {
                            let mut p = Pump {
                                sh,
                                conn,
                                dir,
                                from: Some(from),
                                to: Some(to),
                                fire_on_exit: None,
                                fault_channel: String::new(),
                            };
                            p.run();
                            let fire = p.fire_on_exit.take();
                            let sh = p.sh.clone();
                            let channel = std::mem::take(&mut p.fault_channel);
                            p.conn.pumps.fetch_sub(1, Ordering::SeqCst);
                            // The last pump to let go closes the sockets.
                            drop(p);
                            if let Some(n) = fire {
                                fire_now(&sh, channel, n);
                            }
                        })
                        .unwrap();
                    threads.push(t);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => {
                note(&sh, format!("relay: accept: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One relayed connection: `s` faces the source, `d` the destination.
struct Conn {
    s: Arc<TcpStream>,
    d: Arc<TcpStream>,
    /// The channel's name once its hello was read.
    name: Mutex<Option<String>>,
    /// The connection is being cut: pumps stop and drop their sockets.
    cut: AtomicBool,
    /// The connection is being closed with FIN: pumps drain and stop.
    fin: AtomicBool,
    /// Per direction (Up = 0, Down = 1): that leg stalls for ever.
    stalled: [AtomicBool; 2],
    /// Pump threads still running.
    pumps: AtomicUsize,
}

impl Conn {
    fn name(&self) -> Option<String> {
        self.name.lock().unwrap().clone()
    }
    fn stalled(&self, dir: Dir) -> bool {
        self.stalled[dir as usize].load(Ordering::SeqCst)
    }
    fn any_stalled(&self) -> bool {
        self.stalled(Dir::Up) || self.stalled(Dir::Down)
    }
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Why a pump stops reading or writing.
#[derive(Debug)]
enum Stop {
    /// The relay is shutting down, or the connection is being cut or closed.
    Flag,
    /// The peer ended its stream (FIN) after `n` bytes of the wanted ones.
    Eof(usize),
    /// A reset or another error.
    Error(std::io::Error),
}

struct Pump {
    sh: Arc<Shared>,
    conn: Arc<Conn>,
    dir: Dir,
    from: Option<Arc<TcpStream>>,
    to: Option<Arc<TcpStream>>,
    /// A fault that takes effect when this pump lets go of its sockets.
    fire_on_exit: Option<String>,
    /// The channel this pump applied the fault on.
    fault_channel: String,
}

/// What one parsed message looks like.
struct Msg {
    kind: &'static str,
    /// The whole message as the sender wrote it.
    bytes: Vec<u8>,
    header_len: usize,
    /// Where the body (frame) or payload (packet) starts.
    body_at: usize,
}

impl Pump {
    fn from(&self) -> &TcpStream {
        self.from.as_deref().unwrap()
    }
    fn to(&self) -> &TcpStream {
        self.to.as_deref().unwrap()
    }

    fn flagged(&self) -> bool {
        self.sh.stop.load(Ordering::SeqCst)
            || self.conn.cut.load(Ordering::SeqCst)
            || self.conn.fin.load(Ordering::SeqCst)
    }

    /// Reads exactly `buf.len()` bytes, unless EOF, an error or a flag.
    fn read_exact(&self, buf: &mut [u8]) -> Result<(), Stop> {
        let mut at = 0;
        while at < buf.len() {
            if self.flagged() {
                return Err(Stop::Flag);
            }
            match self.from().read(&mut buf[at..]) {
                Ok(0) => return Err(Stop::Eof(at)),
                Ok(n) => at += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Stop::Error(e)),
            }
        }
        Ok(())
    }

    fn write_all(&self, mut buf: &[u8]) -> Result<(), Stop> {
        while !buf.is_empty() {
            if self.sh.stop.load(Ordering::SeqCst) || self.conn.cut.load(Ordering::SeqCst) {
                return Err(Stop::Flag);
            }
            match self.to().write(buf) {
                Ok(0) => return Err(Stop::Error(ErrorKind::WriteZero.into())),
                Ok(n) => buf = &buf[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Stop::Error(e)),
            }
        }
        Ok(())
    }

    fn run(&mut self) {
        let end = self.forward();
        let closing = self.conn.fin.load(Ordering::SeqCst) && !self.conn.cut.load(Ordering::SeqCst);
        match end {
            Ok(()) => {}
            // Closed with FIN by a fault (a write refused after that is no reset).
            Err(_) if closing && self.from.is_some() => self.drain(),
            Err(Stop::Flag) => {}
            // A half close, passed on as one.
            Err(Stop::Eof(_)) => {
                let _ = self.to().shutdown(Shutdown::Write);
            }
            Err(Stop::Error(_)) => self.reset(),
        }
    }

    /// A reset on either leg ends the connection with RST both ways, unless
    /// a leg stalls: that one must see nothing, so the other only gets FIN.
    fn reset(&mut self) {
        if self.conn.any_stalled() {
            let _ = self.to().shutdown(Shutdown::Write);
            return;
        }
        set_linger_zero(&self.conn.s);
        set_linger_zero(&self.conn.d);
        self.conn.cut.store(true, Ordering::SeqCst);
    }

    /// After a FIN close: read and discard until the peer closes too.
    fn drain(&self) {
        let mut buf = vec![0u8; 64 << 10];
        while !self.sh.stop.load(Ordering::SeqCst) && !self.conn.cut.load(Ordering::SeqCst) {
            match self.from().read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }

    /// Copies bytes as they come (after the relay lost step, or where no
    /// messages are expected).
    fn copy_raw(&self) -> Result<(), Stop> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if self.flagged() {
                return Err(Stop::Flag);
            }
            match self.from().read(&mut buf) {
                Ok(0) => return Err(Stop::Eof(0)),
                Ok(n) => self.write_all(&buf[..n])?,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(Stop::Error(e)),
            }
        }
    }

    /// Reads `n` bytes, forwarding whatever was read if the stream ends early.
    fn read_or_pass_on(&self, buf: &mut [u8]) -> Result<(), Stop> {
        match self.read_exact(buf) {
            Err(Stop::Eof(got)) => {
                let _ = self.write_all(&buf[..got]);
                Err(Stop::Eof(got))
            }
            other => other,
        }
    }

    fn forward(&mut self) -> Result<(), Stop> {
        // The opening: the hello up, the reply down.
        let channel = match self.dir {
            Dir::Up => {
                let mut hello = [0u8; HELLO_LEN];
                self.read_or_pass_on(&mut hello)?;
                let name = if &hello[0..8] == b"FERRY\0CH" {
                    let index = u16::from_le_bytes([hello[12], hello[13]]);
                    match hello[10] {
                        0 => Some("main".to_string()),
                        1 => Some(format!("multifd[{index}]")),
                        2 => Some("preempt".to_string()),
                        _ => None,
                    }
                } else {
                    None
                };
                *self.conn.name.lock().unwrap() = name.clone();
                self.write_all(&hello)?;
                match name {
                    Some(n) => n,
                    None => {
                        note(&self.sh, "relay: a connection without a ferry hello".into());
                        return self.copy_raw();
                    }
                }
            }
            Dir::Down => {
                let mut reply = [0u8; REPLY_LEN];
                self.read_or_pass_on(&mut reply)?;
                let len = usize::from(u16::from_le_bytes([reply[6], reply[7]]));
                let mut reason = vec![0u8; len];
                self.write_all(&reply)?;
                self.read_or_pass_on(&mut reason)?;
                self.write_all(&reason)?;
                // The up pump has read the hello before the receiver could answer it.
                match self.conn.name() {
                    Some(n) => n,
                    None => return self.copy_raw(),
                }
            }
        };
        let framed = channel == "main";
        if !framed && self.dir == Dir::Down {
            return self.copy_raw();
        }
        loop {
            let msg = match self.read_message(framed)? {
                Some(m) => m,
                None => return self.copy_raw(),
            };
            let nth = {
                let mut seen = self.sh.seen.lock().unwrap();
                let n = seen
                    .entry((channel.clone(), self.dir, msg.kind))
                    .or_insert(0);
                *n += 1;
                *n
            };
            let nth_multifd = if channel.starts_with("multifd[") {
                let mut seen = self.sh.seen_multifd.lock().unwrap();
                let n = seen.entry((self.dir, msg.kind)).or_insert(0);
                *n += 1;
                *n
            } else {
                0
            };
            let hit = self.sh.fault.as_ref().filter(|f| {
                f.dir == self.dir
                    && f.kind == msg.kind
                    && ((f.channel == channel && f.nth == nth)
                        || (f.channel == "multifd[*]" && nth_multifd == f.nth))
            });
            match hit {
                Some(f) => {
                    let action = f.action;
                    self.fault_channel = channel.clone();
                    self.apply(&channel, action, msg)?;
                }
                None => self.send(&channel, &msg.bytes)?,
            }
        }
    }

    /// Forwards one message's bytes; counts multifd packets for reorders.
    fn send(&self, channel: &str, bytes: &[u8]) -> Result<(), Stop> {
        self.write_all(bytes)?;
        if channel != "main" && self.dir == Dir::Up {
            *self
                .sh
                .forwarded
                .lock()
                .unwrap()
                .entry(channel.to_string())
                .or_insert(0) += 1;
            self.sh.forwarded_cv.notify_all();
        }
        Ok(())
    }

    /// The next message, or `None` if the stream stopped making sense.
    fn read_message(&self, framed: bool) -> Result<Option<Msg>, Stop> {
        if framed {
            let mut h = [0u8; FRAME_LEN];
            self.read_or_pass_on(&mut h)?;
            let t = u16::from_le_bytes([h[0], h[1]]);
            let len = u64::from(u32::from_le_bytes(h[4..8].try_into().unwrap()));
            if len > MAX_MESSAGE {
                note(
                    &self.sh,
                    format!("relay: lost step: frame type {t} of {len} bytes"),
                );
                self.write_all(&h)?;
                return Ok(None);
            }
            let mut bytes = vec![0u8; FRAME_LEN + len as usize];
            bytes[..FRAME_LEN].copy_from_slice(&h);
            self.read_or_pass_on_after(&mut bytes, FRAME_LEN)?;
            Ok(Some(Msg {
                kind: frame_kind(t),
                bytes,
                header_len: FRAME_LEN,
                body_at: FRAME_LEN,
            }))
        } else {
            let mut h = [0u8; PACKET_HEADER_LEN];
            self.read_or_pass_on(&mut h)?;
            let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
            let u32_at = |o: usize| u64::from(u32::from_le_bytes(h[o..o + 4].try_into().unwrap()));
            let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
            let flags = u16_at(6);
            let (normal, zero, payload) = (u32_at(12), u32_at(16), u64_at(32));
            let crcs = if flags & FLAG_PAGE_CRCS != 0 {
                normal * 4
            } else {
                0
            };
            let body_at = PACKET_HEADER_LEN as u64 + (normal + zero) * 8 + crcs;
            let total = body_at.saturating_add(payload);
            if &h[0..4] != b"FMFD" || total > MAX_MESSAGE {
                note(
                    &self.sh,
                    format!("relay: lost step: packet header {:02x?}", &h[..16]),
                );
                self.write_all(&h)?;
                return Ok(None);
            }
            let kind = if flags & FLAG_END != 0 {
                "END"
            } else if flags & FLAG_SYNC != 0 {
                "SYNC"
            } else {
                "DATA"
            };
            let mut bytes = vec![0u8; total as usize];
            bytes[..PACKET_HEADER_LEN].copy_from_slice(&h);
            self.read_or_pass_on_after(&mut bytes, PACKET_HEADER_LEN)?;
            Ok(Some(Msg {
                kind,
                bytes,
                header_len: PACKET_HEADER_LEN,
                body_at: body_at as usize,
            }))
        }
    }

    /// Fills `bytes[from..]`; if the stream ends early, forwards what came.
    fn read_or_pass_on_after(&self, bytes: &mut [u8], from: usize) -> Result<(), Stop> {
        match self.read_exact(&mut bytes[from..]) {
            Err(Stop::Eof(got)) => {
                let _ = self.write_all(&bytes[..from + got]);
                Err(Stop::Eof(from + got))
            }
            other => other,
        }
    }

    fn fire(&self, note: String) {
        fire_now(&self.sh, self.fault_channel.clone(), note);
    }

    fn apply(&mut self, channel: &str, action: Action, msg: Msg) -> Result<(), Stop> {
        match action {
            Action::FlipHeader { byte, bit } => {
                let mut b = msg.bytes.clone();
                let i = byte.min(msg.header_len - 1);
                b[i] ^= 1 << bit;
                self.fire(format!("header byte {i} bit {bit}"));
                self.send(channel, &b)
            }
            Action::FlipBody { at, bit } => {
                let body = msg.bytes.len() - msg.body_at;
                if body == 0 {
                    // Nothing to flip: sent as is (the case is mis-specified).
                    note(&self.sh, format!("relay: {} has no body to flip", msg.kind));
                    return self.send(channel, &msg.bytes);
                }
                let off = match at {
                    At::Start(o) => o.min(body - 1),
                    At::FromEnd(o) => body - o.clamp(1, body),
                    At::Middle => body / 2,
                };
                let mut b = msg.bytes.clone();
                b[msg.body_at + off] ^= 1 << bit;
                self.fire(format!("body byte {off} of {body}, bit {bit}"));
                self.send(channel, &b)
            }
            Action::Duplicate => {
                self.send(channel, &msg.bytes)?;
                self.fire("sent twice".into());
                self.send(channel, &msg.bytes)
            }
            Action::Drop => {
                self.fire("dropped".into());
                Ok(())
            }
            Action::TruncateFin => {
                let body = msg.bytes.len() - msg.header_len;
                let keep = if body >= 2 {
                    msg.header_len + body / 2
                } else {
                    msg.header_len / 2
                };
                let _ = self.write_all(&msg.bytes[..keep]);
                // Closing with FIN both ways: the other pump must not take a
                // refused write (after our shutdown) for a reset.
                self.conn.fin.store(true, Ordering::SeqCst);
                let _ = self.conn.d.shutdown(Shutdown::Write);
                let _ = self.conn.s.shutdown(Shutdown::Write);
                self.fire(format!("{keep} of {} bytes, then FIN", msg.bytes.len()));
                Err(Stop::Flag)
            }
            Action::CutRst => {
                set_linger_zero(&self.conn.s);
                set_linger_zero(&self.conn.d);
                self.conn.cut.store(true, Ordering::SeqCst);
                // The last one to let go of the sockets closes them: wait
                // for the other pump, so the RST goes out now.
                let t = Instant::now();
                while self.conn.pumps.load(Ordering::SeqCst) > 1
                    && t.elapsed() < Duration::from_secs(2)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                self.from = None;
                self.to = None;
                self.fire_on_exit = Some("RST both legs".into());
                // Nothing more to do; `run` must not touch the sockets.
                Err(Stop::Flag)
            }
            Action::Stall => {
                self.conn.stalled[self.dir as usize].store(true, Ordering::SeqCst);
                self.fire("leg stalled".into());
                // Hold both sockets open, forward nothing, until the relay stops.
                while !self.sh.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(TICK);
                }
                Err(Stop::Flag)
            }
            Action::ReorderCross => {
                let others = |m: &HashMap<String, u64>| -> u64 {
                    m.iter()
                        .filter(|(c, _)| c.as_str() != channel && c.as_str() != "main")
                        .map(|(_, n)| *n)
                        .sum()
                };
                let mut fw = self.sh.forwarded.lock().unwrap();
                let before = others(&fw);
                let t = Instant::now();
                while others(&fw) == before && t.elapsed() < REORDER_WAIT {
                    if self.sh.stop.load(Ordering::SeqCst) {
                        return Err(Stop::Flag);
                    }
                    fw = self.sh.forwarded_cv.wait_timeout(fw, TICK).unwrap().0;
                }
                let achieved = others(&fw) > before;
                drop(fw);
                if !achieved {
                    note(
                        &self.sh,
                        format!(
                            "relay: reorder of {channel} {} not achieved: no packet on another channel within {REORDER_WAIT:?}",
                            msg.kind
                        ),
                    );
                }
                self.fire(format!(
                    "held {:.0} ms{}",
                    t.elapsed().as_secs_f64() * 1e3,
                    if achieved {
                        ", after another channel's packet"
                    } else {
                        " (no other packet came)"
                    }
                ));
                self.send(channel, &msg.bytes)
            }
            Action::SwapNext => {
                // The next message may never come while this one is held
                // (the sender may wait for what this one lets the receiver
                // answer): then this one goes out late, and the case says so.
                let t = Instant::now();
                loop {
                    if self.sh.stop.load(Ordering::SeqCst) {
                        return Err(Stop::Flag);
                    }
                    match self.from().peek(&mut [0u8; 1]) {
                        Ok(0) => {
                            note(
                                &self.sh,
                                format!(
                                    "relay: swap of {channel} {} not achieved: the stream ended",
                                    msg.kind
                                ),
                            );
                            self.fire("no next message (EOF): forwarded as is".into());
                            self.send(channel, &msg.bytes)?;
                            return Err(Stop::Eof(0));
                        }
                        Ok(_) => break,
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) =>
                        {
                            if t.elapsed() >= REORDER_WAIT {
                                note(&self.sh, format!(
                                    "relay: swap of {channel} {} not achieved: no next message within {REORDER_WAIT:?}",
                                    msg.kind
                                ));
                                self.fire(format!(
                                    "held {:.0} ms, no next message: forwarded late",
                                    t.elapsed().as_secs_f64() * 1e3
                                ));
                                return self.send(channel, &msg.bytes);
                            }
                        }
                        Err(e) => return Err(Stop::Error(e)),
                    }
                }
                let framed = channel == "main";
                match self.read_message(framed) {
                    Ok(Some(next)) => {
                        {
                            let mut seen = self.sh.seen.lock().unwrap();
                            *seen
                                .entry((channel.to_string(), self.dir, next.kind))
                                .or_insert(0) += 1;
                        }
                        self.send(channel, &next.bytes)?;
                        self.fire(format!("swapped with the next {}", next.kind));
                        self.send(channel, &msg.bytes)
                    }
                    Ok(None) => {
                        self.fire("no next message to swap with (lost step)".into());
                        self.send(channel, &msg.bytes)?;
                        self.copy_raw()
                    }
                    Err(Stop::Eof(n)) => {
                        note(&self.sh, format!("relay: swap of {channel} {}: the stream ended inside the next message", msg.kind));
                        // What came of the next message went out already; the
                        // held one is lost in its place: a truncation.
                        self.fire(format!(
                            "next message cut by EOF after {n} bytes; held message dropped"
                        ));
                        Err(Stop::Eof(n))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }
}
