//! The main channel's messages: setup, pass boundaries, device state and
//! completion from source to destination, and the return path's replies.
//!
//! Every message is a frame (integers little-endian):
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    2 | message type (below)                             |
//! |      2 |    2 | sequence number: 0, 1, 2... in this direction,   |
//! |        |      | wrapping at 65536                                |
//! |      4 |    4 | body length N, at most the type's limit          |
//! |      8 |    4 | CRC-32 (IEEE) of bytes 0..8 and of the body      |
//! |     12 |    N | body                                             |
//!
//! Every frame carries its CRC, whatever the checksum capability says: the
//! main channel moves a few small messages and the device state, so the
//! check costs nothing measurable, and a flipped bit in SETUP (which
//! announces the capability itself), the device state or COMPLETE can never
//! be acted on. A frame whose CRC does not match ends the migration. The
//! sequence number makes a frame that went missing, came twice or out of
//! order an error at the next frame, and the next frame is never far: a
//! side with nothing to say sends HEARTBEAT.
//!
//! Source → destination:
//! - `1 SETUP`: `u8` capability flags (bit 0: packets carry checksums;
//!   bit 1: payloads may be zstd-compressed; bit 2: the source asks that
//!   the switchover be verified, [`CAP_VERIFY`]; bit 3: postcopy may
//!   follow, the destination registers userfaultfd and takes preempt
//!   channels, [`CAP_POSTCOPY`]; bit 4: COLO follows the migration,
//!   [`CAP_COLO`]; bit 5, only with bit 3: page requests may ask for a
//!   whole 2 MiB region, [`CAP_POSTCOPY_REGIONS`]),
//!   `u16` multifd channels, `u32` pages per packet, `u16` block count B, then
//!   B times: `u8` name length L, L bytes of UTF-8 name, `u64` length in
//!   bytes, `u32` page size. At most 1 MiB.
//! - `2 PASS_END`: `u64` generation; every multifd channel has sent this
//!   pass's SYNC. 8 bytes.
//! - `3 DEVICE_STATE`: the guest's opaque device state. At most 256 MiB.
//! - `4 COMPLETE`: `u64` generation of the final pass; only VERIFY and
//!   HEARTBEAT may follow.
//! - `5 CANCEL`: empty; the source cancelled the migration: the destination
//!   discards what it received and never starts the guest.
//! - `6 VERIFY`: 16 bytes, the source's digest of memory and device state
//!   at switchover ([`ferry_ram::Digest::of_guest`]). Sent after COMPLETE
//!   when SETUP_ACK asked for it: the destination compares it with its own
//!   before its guest may run.
//! - `7 POSTCOPY_PACKAGE`: the switch to postcopy: the discard list and
//!   the device state, read whole before any of it is used (layout:
//!   `src/postcopy/wire.rs`). At most 256 MiB + 64 MiB.
//! - `8 COLO` (either direction, after a migration announced with SETUP's
//!   bit 4, [`CAP_COLO`]): one COLO checkpoint message, its layout in
//!   `colo/src/wire.rs`. At most 256 MiB + 64 MiB.
//! - `9 EARLY_DISCARD`: postcopy, after a pass's PASS_END and before the
//!   package, with the guest still running here: the pages dirty so far,
//!   in the discard list's layout (`src/postcopy/wire.rs`). The destination
//!   drops them at once, outside the downtime, and answers
//!   EARLY_DISCARDED; the package's discard list must then name every one
//!   of them again. At most 64 MiB.
//!
//! Verifying the switchover is opt-in, and either side may ask: the source
//! with SETUP's bit 2, the destination by itself. The destination decides
//! and says so in SETUP_ACK's bit 0; a source that asked and gets an ACK
//! without it fails the migration, and a destination that refuses to verify
//! (`recv --no-digest`) refuses a SETUP that asks. Without it no digest of
//! all memory is taken inside the downtime: the destination resumes its
//! guest once every page landed (with its checksum checked, when checksums
//! are on) and the device state arrived.
//!
//! Destination → source (the return path):
//! - `101 SETUP_ACK`: `u8` flags (bit 0: this destination verifies: send
//!   VERIFY after COMPLETE); the destination has built the layout and its
//!   receivers are running. 1 byte.
//! - `102 SHUT`: `u32` error flag (0: the migration completed on the
//!   destination, and nothing follows), then the UTF-8 error text. Sent
//!   once, at the end.
//! - `103 SWITCHOVER_ACK`: empty; the destination has the first full pass
//!   and agrees to a switchover (the source waits for it before pausing).
//! - `104 RESUMED`: `u64` Unix time in nanoseconds when the destination's
//!   guest started running (the source's downtime ends when it arrives),
//!   then, when the destination verified, the 16 bytes of its own digest of
//!   memory and device state before it resumed. 8 or 24 bytes.
//! - `105 PAGE_REQUEST`: postcopy: the guest touched a page it lacks:
//!   `u16` block, `u64` offset, `u32` length (`src/postcopy/wire.rs`).
//!   14 bytes.
//! - `106 EARLY_DISCARDED`: empty; the pages of EARLY_DISCARD are dropped
//!   (the source waits for it before pausing its guest).
//!
//! Either direction:
//! - `200 HEARTBEAT`: empty; sent when nothing else was sent for a while,
//!   so a peer that goes silent (no FIN, no RST) is noticed by the other
//!   side's read deadline (the peer timeout).

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_ram::BlockSpec;
use ferry_transport::Channel;

use crate::MigrationError;

const FRAME_LEN: usize = 12;
const MAX_SETUP: u32 = 1 << 20;
/// The same limit a saved file has.
pub const MAX_DEVICE_STATE: u32 = ferry_ram::mapped::MAX_DEVICE_STATE as u32;
const MAX_SHUT: u32 = 64 << 10;

pub const CAP_CHECKSUM: u8 = 1;
pub const CAP_ZSTD: u8 = 2;
/// SETUP capability: the source asks that the switchover be verified
/// (SETUP_ACK must answer [`ACK_VERIFY`]).
pub const CAP_VERIFY: u8 = 4;
/// SETUP capability: postcopy may follow (the destination registers
/// userfaultfd and takes preempt channels).
pub const CAP_POSTCOPY: u8 = 8;
/// SETUP capability: COLO follows the migration (`send --colo`); the
/// destination must be a COLO secondary (`recv --colo`).
pub const CAP_COLO: u8 = 16;
/// SETUP capability, only with [`CAP_POSTCOPY`]: the source answers page
/// requests of up to 512 pages (a whole 2 MiB region,
/// `postcopy::wire::MAX_REQUEST_PAGES`), so the destination may ask for a
/// region at a fault; without it each request names one page.
pub const CAP_POSTCOPY_REGIONS: u8 = 32;
/// A discard list's limit (EARLY_DISCARD's body; a bit per page, so
/// 2 TiB of 4 KiB pages).
const MAX_DISCARD: u32 = 64 << 20;
/// A POSTCOPY_PACKAGE's limit: the device state's and a discard list's.
const MAX_PACKAGE: u32 = MAX_DEVICE_STATE + MAX_DISCARD;
/// The message type numbers, each written once here (the module doc lists
/// them with their bodies).
pub mod kind {
    pub const SETUP: u16 = 1;
    pub const PASS_END: u16 = 2;
    pub const DEVICE_STATE: u16 = 3;
    pub const COMPLETE: u16 = 4;
    pub const CANCEL: u16 = 5;
    pub const VERIFY: u16 = 6;
    pub const POSTCOPY_PACKAGE: u16 = 7;
    pub const COLO: u16 = 8;
    pub const EARLY_DISCARD: u16 = 9;
    pub const SETUP_ACK: u16 = 101;
    pub const SHUT: u16 = 102;
    pub const SWITCHOVER_ACK: u16 = 103;
    pub const RESUMED: u16 = 104;
    pub const PAGE_REQUEST: u16 = 105;
    pub const EARLY_DISCARDED: u16 = 106;
    pub const HEARTBEAT: u16 = 200;
}

/// The default peer timeout: long enough for a loaded machine, short
/// enough that a dead peer is noticed while a person waits.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a side sends HEARTBEAT when it has nothing else to say: four
/// beats fit in one peer timeout.
pub fn heartbeat_interval(peer_timeout: Duration) -> Duration {
    (peer_timeout / 4).max(Duration::from_millis(20))
}

/// SETUP_ACK flag: the destination verifies digests before it resumes.
pub const ACK_VERIFY: u8 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    pub capabilities: u8,
    pub multifd_channels: u16,
    pub packet_pages: u32,
    pub blocks: Vec<BlockSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Setup(Setup),
    PassEnd {
        generation: u64,
    },
    DeviceState(Vec<u8>),
    Complete {
        generation: u64,
    },
    Cancel,
    Verify {
        digest: u128,
    },
    SetupAck {
        verify: bool,
    },
    Shut {
        error: Option<String>,
    },
    SwitchoverAck,
    Resumed {
        unix_nanos: u64,
        digest: Option<u128>,
    },
    Heartbeat,
    /// The postcopy package (`crate::postcopy::wire`), opaque here.
    PostcopyPackage(Vec<u8>),
    PageRequest(crate::postcopy::wire::PageRun),
    /// A COLO message (`ferry_colo::wire`), opaque here.
    Colo(Vec<u8>),
    /// Postcopy: the pages dirty so far, to drop before the switch (a
    /// discard list, `crate::postcopy::wire`), opaque here.
    EarlyDiscard(Vec<u8>),
    EarlyDiscarded,
}

impl Message {
    fn kind(&self) -> u16 {
        match self {
            Self::Setup(_) => kind::SETUP,
            Self::PassEnd { .. } => kind::PASS_END,
            Self::DeviceState(_) => kind::DEVICE_STATE,
            Self::Complete { .. } => kind::COMPLETE,
            Self::Cancel => kind::CANCEL,
            Self::Verify { .. } => kind::VERIFY,
            Self::SetupAck { .. } => kind::SETUP_ACK,
            Self::Shut { .. } => kind::SHUT,
            Self::SwitchoverAck => kind::SWITCHOVER_ACK,
            Self::Resumed { .. } => kind::RESUMED,
            Self::Heartbeat => kind::HEARTBEAT,
            Self::PostcopyPackage(_) => kind::POSTCOPY_PACKAGE,
            Self::PageRequest(_) => kind::PAGE_REQUEST,
            Self::Colo(_) => kind::COLO,
            Self::EarlyDiscard(_) => kind::EARLY_DISCARD,
            Self::EarlyDiscarded => kind::EARLY_DISCARDED,
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn body(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Self::Setup(s) => {
                b.push(s.capabilities);
                b.extend_from_slice(&s.multifd_channels.to_le_bytes());
                b.extend_from_slice(&s.packet_pages.to_le_bytes());
                b.extend_from_slice(&(s.blocks.len() as u16).to_le_bytes());
                for blk in &s.blocks {
                    b.push(blk.name.len() as u8);
                    b.extend_from_slice(blk.name.as_bytes());
                    b.extend_from_slice(&blk.len.to_le_bytes());
                    b.extend_from_slice(&blk.page_size.to_le_bytes());
                }
            }
            Self::PassEnd { generation } | Self::Complete { generation } => {
                b.extend_from_slice(&generation.to_le_bytes())
            }
            Self::Resumed { unix_nanos, digest } => {
                b.extend_from_slice(&unix_nanos.to_le_bytes());
                if let Some(d) = digest {
                    b.extend_from_slice(&d.to_le_bytes());
                }
            }
            Self::Verify { digest } => b.extend_from_slice(&digest.to_le_bytes()),
            Self::SetupAck { verify } => b.push(if *verify { ACK_VERIFY } else { 0 }),
            Self::DeviceState(d)
            | Self::PostcopyPackage(d)
            | Self::Colo(d)
            | Self::EarlyDiscard(d) => b.extend_from_slice(d),
            Self::PageRequest(run) => b.extend_from_slice(&run.encode_request()),
            Self::Cancel | Self::SwitchoverAck | Self::Heartbeat | Self::EarlyDiscarded => {}
            Self::Shut { error } => {
                b.extend_from_slice(&u32::from(error.is_some()).to_le_bytes());
                if let Some(e) = error {
                    let t = e.as_bytes();
                    b.extend_from_slice(&t[..t.len().min(MAX_SHUT as usize - 4)]);
                }
            }
        }
        b
    }

    /// The whole frame, numbered `seq`: header, CRC and body.
    pub fn frame(&self, seq: u16) -> Vec<u8> {
        let body = self.body();
        let mut frame = Vec::with_capacity(FRAME_LEN + body.len());
        frame.extend_from_slice(&self.kind().to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let crc = frame_crc(&frame[..8], &body);
        frame.extend_from_slice(&crc.to_le_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// Reads one frame; returns it with its size in bytes and its
    /// sequence number. `peer` names the other side for a closed
    /// connection. HEARTBEAT frames are returned like any other; a
    /// [`MainChannel`] checks the numbers and skips heartbeats.
    fn read(ch: &dyn Channel, peer: &'static str) -> Result<(Self, u64, u16), MigrationError> {
        let mut frame = [0u8; FRAME_LEN];
        ch.read_exact(&mut frame).map_err(|e| read_error(e, peer))?;
        let kind = u16::from_le_bytes([frame[0], frame[1]]);
        let seq = u16::from_le_bytes([frame[2], frame[3]]);
        let len = u32::from_le_bytes(frame[4..8].try_into().unwrap());
        let crc = u32::from_le_bytes(frame[8..12].try_into().unwrap());
        let Some(&(_, name, limit)) = KINDS.iter().find(|k| k.0 == kind) else {
            return Err(MigrationError::Protocol(format!(
                "unknown message type {kind} (a non-ferry peer, or a corrupted frame)"
            )));
        };
        if len > limit {
            return Err(MigrationError::Protocol(format!(
                "{name} (type {kind}) of {len} bytes, more than its limit of {limit}"
            )));
        }
        let body = read_body(ch, len as usize, peer)?;
        let actual = frame_crc(&frame[..8], &body);
        if actual != crc {
            return Err(MigrationError::Protocol(format!(
                "{name} of {len} bytes from the {peer} failed its CRC \
                 (frame says {crc:#010x}, its bytes give {actual:#010x}): corrupted in transit"
            )));
        }
        Ok((
            Self::decode(kind, &body)?,
            FRAME_LEN as u64 + u64::from(len),
            seq,
        ))
    }

    fn decode(kind: u16, b: &[u8]) -> Result<Self, MigrationError> {
        let mut r = Reader {
            b,
            at: 0,
            what: kind_name(kind),
        };
        let m = match kind {
            kind::SETUP => {
                let capabilities = r.u8()?;
                let multifd_channels = r.u16()?;
                let packet_pages = r.u32()?;
                let n = r.u16()?;
                let mut blocks = Vec::new();
                for _ in 0..n {
                    let l = r.u8()? as usize;
                    let name = String::from_utf8(r.bytes(l)?.to_vec()).map_err(|_| {
                        MigrationError::Protocol("SETUP: block name is not UTF-8".into())
                    })?;
                    blocks.push(BlockSpec {
                        name,
                        len: r.u64()?,
                        page_size: r.u32()?,
                    });
                }
                Self::Setup(Setup {
                    capabilities,
                    multifd_channels,
                    packet_pages,
                    blocks,
                })
            }
            kind::PASS_END => Self::PassEnd {
                generation: r.u64()?,
            },
            kind::DEVICE_STATE => Self::DeviceState(b.to_vec()),
            kind::COMPLETE => Self::Complete {
                generation: r.u64()?,
            },
            kind::CANCEL => Self::Cancel,
            kind::VERIFY => Self::Verify { digest: r.u128()? },
            kind::SETUP_ACK => {
                let flags = r.u8()?;
                if flags & !ACK_VERIFY != 0 {
                    return Err(MigrationError::Protocol(format!(
                        "SETUP_ACK with unknown flags {flags:#04x}"
                    )));
                }
                Self::SetupAck {
                    verify: flags & ACK_VERIFY != 0,
                }
            }
            kind::SWITCHOVER_ACK => Self::SwitchoverAck,
            kind::RESUMED => Self::Resumed {
                unix_nanos: r.u64()?,
                digest: if b.len() > 8 { Some(r.u128()?) } else { None },
            },
            kind::HEARTBEAT => Self::Heartbeat,
            kind::POSTCOPY_PACKAGE => Self::PostcopyPackage(b.to_vec()),
            kind::COLO => Self::Colo(b.to_vec()),
            kind::EARLY_DISCARD => Self::EarlyDiscard(b.to_vec()),
            kind::EARLY_DISCARDED => Self::EarlyDiscarded,
            kind::PAGE_REQUEST => {
                Self::PageRequest(crate::postcopy::wire::PageRun::decode_request(
                    r.bytes(crate::postcopy::wire::REQUEST_LEN)?
                        .try_into()
                        .expect("REQUEST_LEN bytes"),
                ))
            }
            kind::SHUT => {
                let flag = r.u32()?;
                if flag == 0 && b.len() > 4 {
                    return Err(MigrationError::Protocol(format!(
                        "SHUT without an error flag carries {} bytes of error text",
                        b.len() - 4
                    )));
                }
                let text = String::from_utf8_lossy(&b[4..]).into_owned();
                Self::Shut {
                    error: (flag != 0).then_some(text),
                }
            }
            _ => {
                return Err(MigrationError::Protocol(format!(
                    "unknown message type {kind}"
                )))
            }
        };
        if !matches!(
            m,
            Self::DeviceState(_)
                | Self::Shut { .. }
                | Self::PostcopyPackage(_)
                | Self::Colo(_)
                | Self::EarlyDiscard(_)
        ) && r.at != b.len()
        {
            return Err(MigrationError::Protocol(format!(
                "{}: {} stray bytes at the end",
                m.name(),
                b.len() - r.at
            )));
        }
        Ok(m)
    }
}

fn frame_crc(head: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(body);
    h.finalize()
}

/// The main channel shared by the threads of one side: its writers take
/// turns (a frame is never interleaved with another), reads come from one
/// reader thread, and a heartbeat goes out whenever nothing else was sent
/// for a quarter of the peer timeout.
pub struct MainChannel {
    channel: Arc<dyn Channel>,
    peer_timeout: Duration,
    /// When the last frame went out, and the next frame's number.
    writing: Mutex<(Instant, u16)>,
    /// The number the next frame read must carry.
    reading: Mutex<u16>,
    heartbeat: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set (and signalled) to stop the heartbeat.
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl MainChannel {
    /// Wraps `channel`: every read waits at most `peer_timeout` (the peer
    /// sends a heartbeat well within it), and so does every write.
    pub fn new(
        channel: Arc<dyn Channel>,
        peer_timeout: Duration,
    ) -> Result<Arc<Self>, MigrationError> {
        let set = |r: std::io::Result<()>| {
            r.map_err(|source| MigrationError::MainIo {
                what: "setting the peer timeout".into(),
                source,
            })
        };
        set(channel.set_read_timeout(Some(peer_timeout)))?;
        set(channel.set_write_timeout(Some(peer_timeout)))?;
        Ok(Arc::new(Self {
            channel,
            peer_timeout,
            writing: Mutex::new((Instant::now(), 0)),
            reading: Mutex::new(0),
            heartbeat: Mutex::new(None),
            stop: Arc::new((Mutex::new(false), Condvar::new())),
        }))
    }

    pub fn channel(&self) -> &Arc<dyn Channel> {
        &self.channel
    }

    /// Sends one message (whole, never interleaved); returns its bytes.
    pub fn send(&self, m: &Message) -> Result<u64, MigrationError> {
        let mut w = self.writing.lock().unwrap();
        let frame = m.frame(w.1);
        self.channel
            .write_all(&frame)
            .map_err(|source| self.timed(write_error(m, source)))?;
        *w = (Instant::now(), w.1.wrapping_add(1));
        Ok(frame.len() as u64)
    }

    /// Reads the next message that is not a heartbeat. A silence longer
    /// than the peer timeout is an error that says so.
    pub fn recv(&self, peer: &'static str) -> Result<(Message, u64), MigrationError> {
        let mut heartbeats = 0;
        let mut next = self.reading.lock().unwrap();
        loop {
            let (m, n, seq) = Message::read(&*self.channel, peer).map_err(|e| self.timed(e))?;
            if seq != *next {
                return Err(MigrationError::Protocol(format!(
                    "{} from the {peer} is frame #{seq}, but #{} was due: a frame went \
                     missing, came twice or out of order",
                    m.name(),
                    *next
                )));
            }
            *next = next.wrapping_add(1);
            match m {
                Message::Heartbeat => heartbeats += n,
                m => return Ok((m, n + heartbeats)),
            }
        }
    }

    /// A timeout error with the peer timeout filled in.
    fn timed(&self, e: MigrationError) -> MigrationError {
        let secs = self.peer_timeout.as_secs_f64();
        match e {
            MigrationError::PeerSilent { peer, channel, .. } => MigrationError::PeerSilent {
                peer,
                channel,
                secs,
            },
            MigrationError::PeerStalled { what, channel, .. } => MigrationError::PeerStalled {
                what,
                channel,
                secs,
            },
            e => e,
        }
    }

    /// Starts sending HEARTBEAT whenever nothing else went out for
    /// `interval`, until [`MainChannel::stop_heartbeat`] or drop.
    pub fn start_heartbeat(self: &Arc<Self>, interval: Duration) -> Result<(), MigrationError> {
        let me = Arc::downgrade(self);
        let stop = self.stop.clone();
        let t = std::thread::Builder::new()
            .name("ferry-heartbeat".into())
            .spawn(move || loop {
                let (lock, cv) = &*stop;
                let stopped = lock.lock().unwrap();
                let (stopped, _) = cv.wait_timeout(stopped, interval / 2).unwrap();
                if *stopped {
                    return;
                }
                drop(stopped);
                let Some(main) = me.upgrade() else { return };
                let idle = main.writing.lock().unwrap().0.elapsed();
                if idle >= interval && main.send(&Message::Heartbeat).is_err() {
                    return;
                }
            })
            .map_err(|e| MigrationError::Thread("heartbeat", e))?;
        *self.heartbeat.lock().unwrap() = Some(t);
        Ok(())
    }

    /// Stops the heartbeat (the last message has been sent).
    pub fn stop_heartbeat(&self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap() = true;
        cv.notify_all();
        let t = self.heartbeat.lock().unwrap().take();
        if let Some(t) = t {
            // The heartbeat thread itself may drop the last reference.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for MainChannel {
    fn drop(&mut self) {
        self.stop_heartbeat();
    }
}

/// Every message type: its number on the wire, its name, and the most
/// bytes its body may have.
const KINDS: [(u16, &str, u32); 16] = [
    (kind::SETUP, "SETUP", MAX_SETUP),
    (kind::PASS_END, "PASS_END", 8),
    (kind::DEVICE_STATE, "DEVICE_STATE", MAX_DEVICE_STATE),
    (kind::COMPLETE, "COMPLETE", 8),
    (kind::CANCEL, "CANCEL", 0),
    (kind::VERIFY, "VERIFY", 16),
    (kind::SETUP_ACK, "SETUP_ACK", 1),
    (kind::SHUT, "SHUT", MAX_SHUT),
    (kind::SWITCHOVER_ACK, "SWITCHOVER_ACK", 0),
    (kind::RESUMED, "RESUMED", 24),
    (kind::HEARTBEAT, "HEARTBEAT", 0),
    (kind::POSTCOPY_PACKAGE, "POSTCOPY_PACKAGE", MAX_PACKAGE),
    (kind::COLO, "COLO", MAX_PACKAGE),
    (kind::EARLY_DISCARD, "EARLY_DISCARD", MAX_DISCARD),
    (kind::EARLY_DISCARDED, "EARLY_DISCARDED", 0),
    (
        kind::PAGE_REQUEST,
        "PAGE_REQUEST",
        crate::postcopy::wire::REQUEST_LEN as u32,
    ),
];

fn kind_name(kind: u16) -> &'static str {
    KINDS
        .iter()
        .find(|k| k.0 == kind)
        .map_or("unknown", |k| k.1)
}

fn read_error(e: std::io::Error, peer: &'static str) -> MigrationError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => MigrationError::MainClosed {
            peer,
            during: "before the migration ended",
        },
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            MigrationError::PeerSilent {
                peer,
                channel: "main".into(),
                secs: 0.0,
            }
        }
        _ => MigrationError::MainIo {
            what: format!("reading a message from the {peer}"),
            source: e,
        },
    }
}

fn write_error(m: &Message, e: std::io::Error) -> MigrationError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            MigrationError::PeerStalled {
                what: format!("sending {}", m.name()),
                channel: "main",
                secs: 0.0,
            }
        }
        _ => MigrationError::MainIo {
            what: format!("sending {}", m.name()),
            source: e,
        },
    }
}

/// Reads `len` bytes, growing the buffer as bytes arrive so that a peer
/// announcing a large body without sending it costs no memory.
fn read_body(ch: &dyn Channel, len: usize, peer: &'static str) -> Result<Vec<u8>, MigrationError> {
    let mut body = Vec::new();
    while body.len() < len {
        let step = (len - body.len()).min(1 << 20);
        let at = body.len();
        body.resize(at + step, 0);
        ch.read_exact(&mut body[at..])
            .map_err(|e| read_error(e, peer))?;
    }
    Ok(body)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], MigrationError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                MigrationError::Protocol(format!(
                    "{}: body of {} bytes ends early (wanted {n} more at {})",
                    self.what,
                    self.b.len(),
                    self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MigrationError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MigrationError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn u128(&mut self) -> Result<u128, MigrationError> {
        Ok(u128::from_le_bytes(self.bytes(16)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &Message) -> Message {
        let body = m.body();
        Message::decode(m.kind(), &body).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let setup = Message::Setup(Setup {
            capabilities: CAP_CHECKSUM,
            multifd_channels: 4,
            packet_pages: 128,
            blocks: vec![BlockSpec {
                name: "pc.ram".into(),
                len: 1 << 30,
                page_size: 4096,
            }],
        });
        for m in [
            setup,
            Message::PassEnd { generation: 3 },
            Message::DeviceState(vec![1, 2, 3]),
            Message::Complete { generation: 1 },
            Message::Cancel,
            Message::SwitchoverAck,
            Message::Resumed {
                unix_nanos: 1 << 60,
                digest: None,
            },
            Message::Resumed {
                unix_nanos: 7,
                digest: Some(u128::MAX - 3),
            },
            Message::Verify { digest: 1 << 100 },
            Message::Heartbeat,
            Message::PostcopyPackage(vec![4, 0, 0, 0, 1, 2, 3, 4, 9]),
            Message::EarlyDiscard(vec![1, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            Message::EarlyDiscarded,
            Message::PageRequest(crate::postcopy::wire::PageRun {
                block: 2,
                offset: 1 << 40,
                len: 4096,
            }),
            Message::SetupAck { verify: true },
            Message::SetupAck { verify: false },
            Message::Shut { error: None },
            Message::Shut {
                error: Some("block 'x' unknown".into()),
            },
        ] {
            assert_eq!(round_trip(&m), m);
        }
    }

    fn block() -> impl proptest::strategy::Strategy<Value = BlockSpec> {
        use proptest::prelude::*;
        ("[a-zA-Z0-9._-]{1,64}", any::<u64>(), any::<u32>()).prop_map(|(name, len, page_size)| {
            BlockSpec {
                name,
                len,
                page_size,
            }
        })
    }

    proptest::proptest! {
        /// Any SETUP the source can build decodes to itself.
        #[test]
        fn any_setup_round_trips(
            capabilities in proptest::num::u8::ANY,
            multifd_channels in proptest::num::u16::ANY,
            packet_pages in proptest::num::u32::ANY,
            blocks in proptest::collection::vec(block(), 0..8),
        ) {
            let m = Message::Setup(Setup { capabilities, multifd_channels, packet_pages, blocks });
            proptest::prop_assert_eq!(round_trip(&m), m);
        }

        /// Any body for any message type decodes or is refused with a
        /// protocol error; nothing panics. A decoded message encodes back
        /// to the same body (no bytes are silently skipped).
        #[test]
        fn any_body_decodes_or_is_refused(
            kind in proptest::sample::select(vec![1u16, 2, 3, 4, 5, 6, 7, 101, 102, 103, 104, 105, 200, 0, 8, 106, 65535]),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
        ) {
            match Message::decode(kind, &body) {
                Ok(m) => {
                    proptest::prop_assert_eq!(m.kind(), kind);
                    if matches!(m, Message::Shut { error: Some(_) }) {
                        // Any non-zero flag means an error; the text is taken
                        // as UTF-8 with bad sequences replaced.
                        proptest::prop_assert_eq!(&m.body()[..4], &1u32.to_le_bytes()[..]);
                    } else {
                        proptest::prop_assert_eq!(m.body(), body);
                    }
                }
                Err(e) => proptest::prop_assert!(
                    matches!(e, MigrationError::Protocol(_)),
                    "{e}"
                ),
            }
        }
    }

    /// A connected pair of plain channels (a unix socketpair).
    fn channel_pair() -> (
        ferry_transport::SocketChannel,
        ferry_transport::SocketChannel,
    ) {
        let (a, b) =
            socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
        (
            ferry_transport::SocketChannel::new(a, "main (writer)".into()),
            ferry_transport::SocketChannel::new(b, "main (reader)".into()),
        )
    }

    /// The reading end as a destination holds it.
    fn reader(r: ferry_transport::SocketChannel) -> Arc<MainChannel> {
        MainChannel::new(Arc::new(r), Duration::from_secs(5)).unwrap()
    }

    /// Every single-bit flip anywhere in a frame (header, CRC or body) is
    /// refused: never read as a message, let alone a different one.
    #[test]
    fn a_flipped_bit_anywhere_in_a_frame_is_refused() {
        let setup = Message::Setup(Setup {
            capabilities: CAP_CHECKSUM | CAP_ZSTD,
            multifd_channels: 2,
            packet_pages: 128,
            blocks: vec![BlockSpec {
                name: "pc.ram".into(),
                len: 64 << 20,
                page_size: 4096,
            }],
        });
        for m in [
            setup,
            Message::DeviceState(b"vcpu0: rip=0xfff0".to_vec()),
            Message::Complete { generation: 3 },
            Message::Verify { digest: 42 },
        ] {
            let frame = m.frame(0);
            for bit in 0..frame.len() * 8 {
                let mut bad = frame.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                let (w, r) = channel_pair();
                w.write_all(&bad).unwrap();
                // A flipped length would leave the reader waiting for bytes
                // that never come: end the stream, as a cut link would.
                drop(w);
                match reader(r).recv("source") {
                    Ok((got, _)) => panic!("{} with bit {bit} flipped read as {got:?}", m.name()),
                    Err(e) => assert!(
                        matches!(
                            e,
                            MigrationError::Protocol(_) | MigrationError::MainClosed { .. }
                        ),
                        "{e}"
                    ),
                }
            }
            // And the frame as sent reads back as itself.
            let (w, r) = channel_pair();
            w.write_all(&frame).unwrap();
            assert_eq!(reader(r).recv("source").unwrap().0, m);
        }
    }

    /// A frame that goes missing, comes twice or out of order is an error
    /// at the next frame; heartbeats are numbered too, and skipped.
    #[test]
    fn frames_out_of_sequence_are_refused() {
        let pass = |g| Message::PassEnd { generation: g };
        for (order, want) in [
            (vec![0, 1, 2], None),
            (
                vec![0, 2],
                Some("PASS_END from the source is frame #2, but #1 was due"),
            ),
            (vec![0, 0], Some("is frame #0, but #1 was due")),
            (vec![1, 0], Some("is frame #1, but #0 was due")),
        ] {
            let (w, r) = channel_pair();
            for &seq in &order {
                let m = if seq == 1 {
                    Message::Heartbeat
                } else {
                    pass(1)
                };
                w.write_all(&m.frame(seq)).unwrap();
            }
            drop(w);
            let r = reader(r);
            let got: Vec<_> = std::iter::from_fn(|| Some(r.recv("source")))
                .take(2)
                .collect();
            match want {
                None => assert_eq!(got[0].as_ref().unwrap().0, pass(1)),
                Some(text) => {
                    let e = got
                        .iter()
                        .find_map(|g| g.as_ref().err())
                        .expect("an error")
                        .to_string();
                    assert!(e.contains(text), "{order:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn a_corrupted_body_is_named_with_its_crc() {
        let mut frame = Message::DeviceState(vec![7; 100]).frame(0);
        frame[FRAME_LEN + 50] ^= 0x10;
        let (w, r) = channel_pair();
        w.write_all(&frame).unwrap();
        let e = reader(r).recv("source").unwrap_err().to_string();
        assert!(
            e.contains("DEVICE_STATE of 100 bytes from the source failed its CRC"),
            "{e}"
        );
    }

    /// A return-path frame longer than its type allows is refused before
    /// its body is read, naming the type and both sizes.
    #[test]
    fn an_oversized_page_request_is_refused() {
        let mut frame = Message::PageRequest(crate::postcopy::wire::PageRun {
            block: 0,
            offset: 0,
            len: 4096,
        })
        .frame(0);
        frame[4..8].copy_from_slice(&15u32.to_le_bytes());
        frame.push(0);
        let (w, r) = channel_pair();
        w.write_all(&frame).unwrap();
        let e = reader(r).recv("destination").unwrap_err().to_string();
        assert!(
            e.contains("PAGE_REQUEST (type 105) of 15 bytes, more than its limit of 14"),
            "{e}"
        );
    }

    #[test]
    fn truncated_setup_is_an_error() {
        let e = Message::decode(1, &[1, 4, 0, 128, 0, 0, 0, 1, 0, 10, b'a'])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ends early"), "{e}");
    }
}
