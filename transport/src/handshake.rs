//! The channel handshake: the first bytes on every channel of a migration,
//! so the receiver can sort channels that arrive in any order and refuse
//! the ones that do not belong.
//!
//! Hello, sent by the connecting side (all integers little-endian), 40 bytes:
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    8 | magic, the bytes `FERRY\0CH`                     |
//! |      8 |    2 | protocol version (currently 2)                   |
//! |     10 |    1 | role: 0 main, 1 multifd, 2 preempt               |
//! |     11 |    1 | reserved, 0                                      |
//! |     12 |    2 | index of this channel within its role            |
//! |     14 |    2 | number of multifd channels in the session        |
//! |     16 |   16 | session id (random, chosen by the sender)        |
//! |     32 |    8 | reserved, 0                                      |
//!
//! Reply, sent by the listening side once it has sorted the channel:
//!
//! | offset | size | field                                            |
//! |-------:|-----:|--------------------------------------------------|
//! |      0 |    4 | magic, the bytes `FRY!`                          |
//! |      4 |    1 | status: 0 accepted, 1 refused                    |
//! |      5 |    1 | reserved, 0                                      |
//! |      6 |    2 | reason length N, at most 1024                    |
//! |      8 |    N | reason, UTF-8 (empty when accepted)              |

use std::fmt;
use std::time::Duration;

use crate::{Channel, TransportError};

pub const HELLO_MAGIC: [u8; 8] = *b"FERRY\0CH";
pub const PROTOCOL_VERSION: u16 = 2;
pub const HELLO_LEN: usize = 40;
const REPLY_MAGIC: [u8; 4] = *b"FRY!";
const MAX_REASON: usize = 1024;

/// A migration's random 128-bit identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).expect("the kernel's random source is available");
        Self(b)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Main,
    Multifd,
    Preempt,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelHello {
    pub session: SessionId,
    pub role: Role,
    pub index: u16,
    pub multifd_channels: u16,
}

impl ChannelHello {
    /// `main`, `multifd[3]` or `preempt`.
    pub fn name(&self) -> String {
        match self.role {
            Role::Main => "main".into(),
            Role::Multifd => format!("multifd[{}]", self.index),
            Role::Preempt => "preempt".into(),
        }
    }

    /// The channel's place among the session's streams: 0 for main, 1 + i
    /// for multifd[i], and after them preempt.
    pub fn slot(&self) -> usize {
        match self.role {
            Role::Main => 0,
            Role::Multifd => 1 + usize::from(self.index),
            Role::Preempt => 1 + usize::from(self.multifd_channels),
        }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..8].copy_from_slice(&HELLO_MAGIC);
        b[8..10].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b[10] = match self.role {
            Role::Main => 0,
            Role::Multifd => 1,
            Role::Preempt => 2,
        };
        b[12..14].copy_from_slice(&self.index.to_le_bytes());
        b[14..16].copy_from_slice(&self.multifd_channels.to_le_bytes());
        b[16..32].copy_from_slice(&self.session.0);
        b
    }

    /// Parses a hello; `channel` names the connection in errors.
    pub fn decode(b: &[u8; HELLO_LEN], channel: &str) -> Result<Self, TransportError> {
        if b[0..8] != HELLO_MAGIC {
            return Err(bad_magic(b, channel));
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != PROTOCOL_VERSION {
            return Err(TransportError::BadVersion {
                channel: channel.into(),
                found: version,
                expected: PROTOCOL_VERSION,
            });
        }
        let role = match b[10] {
            0 => Role::Main,
            1 => Role::Multifd,
            2 => Role::Preempt,
            r => {
                return Err(TransportError::BadHello {
                    channel: channel.into(),
                    why: format!("unknown role {r}"),
                })
            }
        };
        if b[11] != 0 || b[32..40].iter().any(|&x| x != 0) {
            return Err(TransportError::BadHello {
                channel: channel.into(),
                why: "reserved bytes (offset 11, 32..40) are not zero".into(),
            });
        }
        let index = u16::from_le_bytes([b[12], b[13]]);
        let multifd_channels = u16::from_le_bytes([b[14], b[15]]);
        if multifd_channels == 0 {
            return Err(TransportError::BadHello {
                channel: channel.into(),
                why: "zero multifd channels".into(),
            });
        }
        let mut session = [0u8; 16];
        session.copy_from_slice(&b[16..32]);
        Ok(Self {
            session: SessionId(session),
            role,
            index,
            multifd_channels,
        })
    }
}

fn bad_magic(b: &[u8], channel: &str) -> TransportError {
    let first = String::from_utf8_lossy(&b[..16]).escape_debug().to_string();
    let hint = if b.starts_with(b"GET ") || b.starts_with(b"POST ") || b.starts_with(b"HEAD ") {
        ": an HTTP request"
    } else if b.starts_with(&[0x16, 0x03]) {
        ": a TLS client hello, but this listener is plaintext"
    } else {
        ""
    };
    TransportError::BadMagic {
        channel: channel.into(),
        first,
        hint,
    }
}

pub(crate) fn send_hello(ch: &dyn Channel, hello: &ChannelHello) -> Result<(), TransportError> {
    ch.write_all(&hello.encode())
        .map_err(|source| TransportError::Io {
            channel: ch.label().into(),
            what: "sending handshake",
            source,
        })
}

/// Reads a hello, waiting at most `timeout`.
pub(crate) fn read_hello(
    ch: &dyn Channel,
    timeout: Duration,
) -> Result<ChannelHello, TransportError> {
    let mut b = [0u8; HELLO_LEN];
    read_with_timeout(ch, &mut b, timeout, "handshake")?;
    ChannelHello::decode(&b, ch.label())
}

pub(crate) fn send_reply(ch: &dyn Channel, refusal: Option<&str>) -> Result<(), TransportError> {
    let reason = refusal.unwrap_or("").as_bytes();
    let reason = &reason[..reason.len().min(MAX_REASON)];
    let mut b = Vec::with_capacity(8 + reason.len());
    b.extend_from_slice(&REPLY_MAGIC);
    b.push(u8::from(refusal.is_some()));
    b.push(0);
    b.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    b.extend_from_slice(reason);
    ch.write_all(&b).map_err(|source| TransportError::Io {
        channel: ch.label().into(),
        what: "sending handshake reply",
        source,
    })
}

pub(crate) fn read_reply(ch: &dyn Channel, timeout: Duration) -> Result<(), TransportError> {
    let mut b = [0u8; 8];
    read_with_timeout(ch, &mut b, timeout, "the receiver's handshake reply")?;
    if b[0..4] != REPLY_MAGIC {
        return Err(TransportError::BadHello {
            channel: ch.label().into(),
            why: "the listener answered with something that is not a ferry handshake reply".into(),
        });
    }
    let len = usize::from(u16::from_le_bytes([b[6], b[7]]));
    if len > MAX_REASON {
        return Err(TransportError::BadHello {
            channel: ch.label().into(),
            why: format!("reply reason of {len} bytes"),
        });
    }
    let mut reason = vec![0u8; len];
    read_with_timeout(ch, &mut reason, timeout, "the receiver's handshake reply")?;
    match b[4] {
        0 => Ok(()),
        _ => Err(TransportError::Refused {
            channel: ch.label().into(),
            reason: String::from_utf8_lossy(&reason).into(),
        }),
    }
}

fn read_with_timeout(
    ch: &dyn Channel,
    buf: &mut [u8],
    timeout: Duration,
    what: &str,
) -> Result<(), TransportError> {
    let io = |what, source| TransportError::Io {
        channel: ch.label().into(),
        what,
        source,
    };
    ch.set_read_timeout(Some(timeout))
        .map_err(|e| io("setting a read timeout", e))?;
    let r = ch.read_exact(buf);
    ch.set_read_timeout(None)
        .map_err(|e| io("clearing a read timeout", e))?;
    r.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => TransportError::Timeout {
            what: format!("{what} on {}", ch.label()),
            secs: timeout.as_secs_f64(),
        },
        std::io::ErrorKind::UnexpectedEof => TransportError::Io {
            channel: ch.label().into(),
            what: if what == "handshake" {
                "closed before a complete handshake"
            } else {
                "closed before replying"
            },
            source: e,
        },
        _ => io("reading handshake", e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips() {
        let h = ChannelHello {
            session: SessionId::random(),
            role: Role::Multifd,
            index: 3,
            multifd_channels: 4,
        };
        assert_eq!(ChannelHello::decode(&h.encode(), "t").unwrap(), h);
    }

    #[test]
    fn http_request_is_named() {
        let mut b = [b' '; HELLO_LEN];
        b[..16].copy_from_slice(b"GET / HTTP/1.1\r\n");
        let e = ChannelHello::decode(&b, "connection from x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a ferry channel") && e.contains("HTTP"),
            "{e}"
        );
    }

    #[test]
    fn version_mismatch_is_named() {
        let mut b = ChannelHello {
            session: SessionId([1; 16]),
            role: Role::Main,
            index: 0,
            multifd_channels: 1,
        }
        .encode();
        b[8] = 9;
        assert!(ChannelHello::decode(&b, "c")
            .unwrap_err()
            .to_string()
            .contains("version 9"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), HELLO_LEN)) {
            let b: [u8; HELLO_LEN] = bytes.try_into().unwrap();
            let _ = ChannelHello::decode(&b, "fuzz");
        }

        /// Every hello decodes to what was encoded, and a set reserved bit
        /// is refused.
        #[test]
        fn hellos_round_trip_and_reserved_bits_are_refused(
            role in 0u8..3,
            index in any::<u16>(),
            channels in 1u16..,
            session in any::<[u8; 16]>(),
            reserved_at in proptest::sample::select(vec![11usize, 32, 35, 39]),
            bit in 0u8..8,
        ) {
            let role = [Role::Main, Role::Multifd, Role::Preempt][role as usize];
            let hello = ChannelHello {
                session: SessionId(session),
                role,
                index,
                multifd_channels: channels,
            };
            let mut b = hello.encode();
            prop_assert_eq!(ChannelHello::decode(&b, "c").unwrap(), hello);
            b[reserved_at] |= 1 << bit;
            let e = ChannelHello::decode(&b, "c").unwrap_err().to_string();
            prop_assert!(e.contains("reserved"), "{}", e);
        }
    }
}
