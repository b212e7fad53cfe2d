//! The main channel's messages: setup, pass boundaries, device state and
//! completion from source to destination, and the return path's replies.
//!
//! Every message is a frame (integers little-endian):
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    2 | message type (below)                             |
//! |      2 |    2 | reserved, 0                                      |
//! |      4 |    4 | body length N, at most the type's limit          |
//! |      8 |    N | body                                             |
//!
//! Source → destination:
//! - `1 SETUP`: `u8` capability flags (bit 0: packets carry checksums;
//!   bit 1: payloads may be zstd-compressed),
//!   `u16` multifd channels, `u32` pages per packet, `u16` block count B, then
//!   B times: `u8` name length L, L bytes of UTF-8 name, `u64` length in
//!   bytes, `u32` page size. At most 1 MiB.
//! - `2 PASS_END`: `u64` generation; every multifd channel has sent this
//!   pass's SYNC. 8 bytes.
//! - `3 DEVICE_STATE`: the guest's opaque device state. At most 256 MiB.
//! - `4 COMPLETE`: `u64` generation of the final pass; nothing more follows.
//! - `5 CANCEL`: empty; the source cancelled the migration: the destination
//!   discards what it received and never starts the guest.
//!
//! Destination → source (the return path):
//! - `101 SETUP_ACK`: empty; the destination has built the layout and its
//!   receivers are running.
//! - `102 SHUT`: `u32` error flag (0: the migration completed on the
//!   destination, and nothing follows), then the UTF-8 error text. Sent
//!   once, at the end.
//! - `103 SWITCHOVER_ACK`: empty; the destination has the first full pass
//!   and agrees to a switchover (the source waits for it before pausing).
//! - `104 RESUMED`: `u64` Unix time in nanoseconds when the destination's
//!   guest started running; the source's downtime ends when it arrives.

use ferry_ram::BlockSpec;
use ferry_transport::Channel;

use crate::MigrationError;

const FRAME_LEN: usize = 8;
const MAX_SETUP: u32 = 1 << 20;
/// The same limit a saved file has.
pub const MAX_DEVICE_STATE: u32 = ferry_ram::mapped::MAX_DEVICE_STATE as u32;
const MAX_SHUT: u32 = 64 << 10;

pub const CAP_CHECKSUM: u8 = 1;
pub const CAP_ZSTD: u8 = 2;

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
    PassEnd { generation: u64 },
    DeviceState(Vec<u8>),
    Complete { generation: u64 },
    Cancel,
    SetupAck,
    Shut { error: Option<String> },
    SwitchoverAck,
    Resumed { unix_nanos: u64 },
}

impl Message {
    fn kind(&self) -> u16 {
        match self {
            Self::Setup(_) => 1,
            Self::PassEnd { .. } => 2,
            Self::DeviceState(_) => 3,
            Self::Complete { .. } => 4,
            Self::Cancel => 5,
            Self::SetupAck => 101,
            Self::Shut { .. } => 102,
            Self::SwitchoverAck => 103,
            Self::Resumed { .. } => 104,
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
            Self::Resumed { unix_nanos } => b.extend_from_slice(&unix_nanos.to_le_bytes()),
            Self::DeviceState(d) => b.extend_from_slice(d),
            Self::SetupAck | Self::Cancel | Self::SwitchoverAck => {}
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

    /// Writes the message as one frame; returns the bytes written.
    pub fn write(&self, ch: &dyn Channel) -> Result<u64, MigrationError> {
        let body = self.body();
        let mut frame = Vec::with_capacity(FRAME_LEN + body.len());
        frame.extend_from_slice(&self.kind().to_le_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        ch.write_all(&frame)
            .map_err(|source| MigrationError::MainIo {
                what: format!("sending {}", self.name()),
                source,
            })?;
        Ok(frame.len() as u64)
    }

    /// Reads one frame; returns it with its size in bytes. `peer` names the
    /// other side for a closed connection.
    pub fn read(ch: &dyn Channel, peer: &'static str) -> Result<(Self, u64), MigrationError> {
        let mut frame = [0u8; FRAME_LEN];
        ch.read_exact(&mut frame).map_err(|e| read_error(e, peer))?;
        let kind = u16::from_le_bytes([frame[0], frame[1]]);
        let len = u32::from_le_bytes(frame[4..8].try_into().unwrap());
        if frame[2..4] != [0, 0] {
            return Err(MigrationError::Protocol(format!(
                "message type {kind}: reserved bytes 2..4 of its frame are not zero"
            )));
        }
        let Some(&(_, _, limit)) = KINDS.iter().find(|k| k.0 == kind) else {
            return Err(MigrationError::Protocol(format!(
                "unknown message type {kind} (a non-ferry peer?)"
            )));
        };
        if len > limit {
            return Err(MigrationError::Protocol(format!(
                "message type {kind} of {len} bytes, more than its limit of {limit}"
            )));
        }
        let body = read_body(ch, len as usize, peer)?;
        Ok((
            Self::decode(kind, &body)?,
            FRAME_LEN as u64 + u64::from(len),
        ))
    }

    fn decode(kind: u16, b: &[u8]) -> Result<Self, MigrationError> {
        let mut r = Reader {
            b,
            at: 0,
            what: kind_name(kind),
        };
        let m = match kind {
            1 => {
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
            2 => Self::PassEnd {
                generation: r.u64()?,
            },
            3 => Self::DeviceState(b.to_vec()),
            4 => Self::Complete {
                generation: r.u64()?,
            },
            5 => Self::Cancel,
            101 => Self::SetupAck,
            103 => Self::SwitchoverAck,
            104 => Self::Resumed {
                unix_nanos: r.u64()?,
            },
            102 => {
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
        if !matches!(m, Self::DeviceState(_) | Self::Shut { .. }) && r.at != b.len() {
            return Err(MigrationError::Protocol(format!(
                "{}: {} stray bytes at the end",
                m.name(),
                b.len() - r.at
            )));
        }
        Ok(m)
    }
}

/// Every message type: its number on the wire, its name, and the most
/// bytes its body may have.
const KINDS: [(u16, &str, u32); 9] = [
    (1, "SETUP", MAX_SETUP),
    (2, "PASS_END", 8),
    (3, "DEVICE_STATE", MAX_DEVICE_STATE),
    (4, "COMPLETE", 8),
    (5, "CANCEL", 0),
    (101, "SETUP_ACK", 0),
    (102, "SHUT", MAX_SHUT),
    (103, "SWITCHOVER_ACK", 0),
    (104, "RESUMED", 8),
];

fn kind_name(kind: u16) -> &'static str {
    KINDS
        .iter()
        .find(|k| k.0 == kind)
        .map_or("unknown", |k| k.1)
}

fn read_error(e: std::io::Error, peer: &'static str) -> MigrationError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        MigrationError::MainClosed {
            peer,
            during: "before the migration ended",
        }
    } else {
        MigrationError::MainIo {
            what: "reading a message".into(),
            source: e,
        }
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
            },
            Message::SetupAck,
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
            kind in proptest::sample::select(vec![1u16, 2, 3, 4, 5, 101, 102, 103, 104, 0, 6, 105, 65535]),
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

    #[test]
    fn truncated_setup_is_an_error() {
        let e = Message::decode(1, &[1, 4, 0, 128, 0, 0, 0, 1, 0, 10, b'a'])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ends early"), "{e}");
    }
}
