//! COLO's checkpoint messages, their encoding, and the order each side
//! must see them in.
//!
//! A COLO message travels as the body of one main-channel frame of type
//! `8 COLO` (`src/protocol.rs` in the controller: the frame carries the
//! length, sequence number and CRC). The body (integers little-endian):
//!
//! | offset | size | field                    |
//! |-------:|-----:|--------------------------|
//! |      0 |    1 | message type (below)     |
//! |      1 |    N | the type's fields        |
//!
//! | type | name               | fields (size in bytes)                                      | from      |
//! |-----:|--------------------|-------------------------------------------------------------|-----------|
//! |    1 | CHECKPOINT_READY   | none                                                        | secondary |
//! |    2 | CHECKPOINT_REQUEST | checkpoint number (8)                                       | primary   |
//! |    3 | CHECKPOINT_REPLY   | checkpoint number (8)                                       | secondary |
//! |    4 | VMSTATE_SEND       | checkpoint (8), multifd pass generation (8), block count B  | primary   |
//! |      |                    | (2), B × (word count W (4), W × dirty word (8)), held       |           |
//! |      |                    | record count R (4), R × record (18, [`Record`])             |           |
//! |    5 | VMSTATE_SIZE       | device state size S (8)                                     | primary   |
//! |    6 | VMSTATE            | the device state: exactly S bytes                           | primary   |
//! |    7 | VMSTATE_RECEIVED   | checkpoint number (8)                                       | secondary |
//! |    8 | VMSTATE_LOADED     | checkpoint (8), flag (1): 1 if a memory digest (16) follows | secondary |
//! |    9 | GUEST_SHUTDOWN     | none                                                        | primary   |
//! |   10 | OUTPUT             | record count R (4), R × record (18)                         | secondary |
//! |   11 | COLO_SETUP         | output every N writes (8), verify flag (1): 0 or 1          | primary   |
//!
//! A record is `u16` vCPU, `u64` record number, `u64` value.
//!
//! Per checkpoint the order is QEMU's (seed 002): REQUEST → REPLY (both
//! guests stopped) → VMSTATE_SEND (the dirty pages follow on the multifd
//! channels as one pass of that generation) → VMSTATE_SIZE → VMSTATE →
//! RECEIVED → LOADED. CHECKPOINT_READY comes once, first. The dirty words
//! are the primary's dirty bitmap of this checkpoint, one bit a page, so
//! the secondary knows which cache pages to take; the held records are
//! the primary's outputs not yet released, which the secondary inherits.
//! [`Expect`] refuses anything else. COLO_SETUP comes once, right after
//! the session's SETUP and before CHECKPOINT_READY, outside [`Expect`]:
//! the values both sides must agree on (`--colo-output-every`,
//! `--colo-verify`); the secondary refuses a session that differs.

use crate::compare::Record;
use crate::ColoError;

/// Most blocks a VMSTATE_SEND may list.
pub const MAX_BLOCKS: usize = 4096;
/// Most records one message may carry.
pub const MAX_RECORDS: usize = 1 << 22;
const RECORD_LEN: usize = 18;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColoMessage {
    CheckpointReady,
    CheckpointRequest {
        checkpoint: u64,
    },
    CheckpointReply {
        checkpoint: u64,
    },
    VmstateSend {
        checkpoint: u64,
        generation: u64,
        /// Per block, the dirty bitmap's words.
        dirty: Vec<Vec<u64>>,
        held: Vec<Record>,
    },
    VmstateSize {
        size: u64,
    },
    Vmstate(Vec<u8>),
    VmstateReceived {
        checkpoint: u64,
    },
    VmstateLoaded {
        checkpoint: u64,
        digest: Option<u128>,
    },
    GuestShutdown,
    Output(Vec<Record>),
    ColoSetup {
        output_every: u64,
        verify: bool,
    },
}

impl ColoMessage {
    pub fn name(&self) -> &'static str {
        match self {
            Self::CheckpointReady => "CHECKPOINT_READY",
            Self::CheckpointRequest { .. } => "CHECKPOINT_REQUEST",
            Self::CheckpointReply { .. } => "CHECKPOINT_REPLY",
            Self::VmstateSend { .. } => "VMSTATE_SEND",
            Self::VmstateSize { .. } => "VMSTATE_SIZE",
            Self::Vmstate(_) => "VMSTATE",
            Self::VmstateReceived { .. } => "VMSTATE_RECEIVED",
            Self::VmstateLoaded { .. } => "VMSTATE_LOADED",
            Self::GuestShutdown => "GUEST_SHUTDOWN",
            Self::Output(_) => "OUTPUT",
            Self::ColoSetup { .. } => "COLO_SETUP",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Self::CheckpointReady => 1,
            Self::CheckpointRequest { .. } => 2,
            Self::CheckpointReply { .. } => 3,
            Self::VmstateSend { .. } => 4,
            Self::VmstateSize { .. } => 5,
            Self::Vmstate(_) => 6,
            Self::VmstateReceived { .. } => 7,
            Self::VmstateLoaded { .. } => 8,
            Self::GuestShutdown => 9,
            Self::Output(_) => 10,
            Self::ColoSetup { .. } => 11,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![self.kind()];
        match self {
            Self::CheckpointReady | Self::GuestShutdown => {}
            Self::CheckpointRequest { checkpoint }
            | Self::CheckpointReply { checkpoint }
            | Self::VmstateReceived { checkpoint } => {
                b.extend_from_slice(&checkpoint.to_le_bytes())
            }
            Self::VmstateSend {
                checkpoint,
                generation,
                dirty,
                held,
            } => {
                b.extend_from_slice(&checkpoint.to_le_bytes());
                b.extend_from_slice(&generation.to_le_bytes());
                b.extend_from_slice(&(dirty.len() as u16).to_le_bytes());
                for words in dirty {
                    b.extend_from_slice(&(words.len() as u32).to_le_bytes());
                    for w in words {
                        b.extend_from_slice(&w.to_le_bytes());
                    }
                }
                put_records(&mut b, held);
            }
            Self::VmstateSize { size } => b.extend_from_slice(&size.to_le_bytes()),
            Self::Vmstate(s) => b.extend_from_slice(s),
            Self::VmstateLoaded { checkpoint, digest } => {
                b.extend_from_slice(&checkpoint.to_le_bytes());
                b.push(u8::from(digest.is_some()));
                if let Some(d) = digest {
                    b.extend_from_slice(&d.to_le_bytes());
                }
            }
            Self::Output(records) => put_records(&mut b, records),
            Self::ColoSetup {
                output_every,
                verify,
            } => {
                b.extend_from_slice(&output_every.to_le_bytes());
                b.push(u8::from(*verify));
            }
        }
        b
    }

    /// Decodes one body; `channel` names where it came from for errors.
    pub fn decode(b: &[u8], channel: &'static str) -> Result<Self, ColoError> {
        let mut r = Reader { b, at: 0, channel };
        let m = match r.u8("message type")? {
            1 => Self::CheckpointReady,
            2 => Self::CheckpointRequest {
                checkpoint: r.u64("checkpoint")?,
            },
            3 => Self::CheckpointReply {
                checkpoint: r.u64("checkpoint")?,
            },
            4 => {
                let checkpoint = r.u64("checkpoint")?;
                let generation = r.u64("generation")?;
                let blocks = r.u16("block count")? as usize;
                if blocks > MAX_BLOCKS {
                    return Err(r.bad(format!("{blocks} blocks, more than {MAX_BLOCKS}")));
                }
                let mut dirty = Vec::with_capacity(blocks);
                for i in 0..blocks {
                    let n = r.u32("word count")? as usize;
                    if n.saturating_mul(8) > r.left() {
                        return Err(r.bad(format!(
                            "block {i}'s dirty bitmap has {n} words, only {} bytes left",
                            r.left()
                        )));
                    }
                    let mut words = Vec::with_capacity(n);
                    for _ in 0..n {
                        words.push(r.u64("dirty word")?);
                    }
                    dirty.push(words);
                }
                let held = r.records()?;
                Self::VmstateSend {
                    checkpoint,
                    generation,
                    dirty,
                    held,
                }
            }
            5 => Self::VmstateSize {
                size: r.u64("size")?,
            },
            6 => {
                let s = b[1..].to_vec();
                r.at = b.len();
                Self::Vmstate(s)
            }
            7 => Self::VmstateReceived {
                checkpoint: r.u64("checkpoint")?,
            },
            8 => {
                let checkpoint = r.u64("checkpoint")?;
                let digest = match r.u8("digest flag")? {
                    0 => None,
                    1 => Some(r.u128("digest")?),
                    f => return Err(r.bad(format!("digest flag {f}, expected 0 or 1"))),
                };
                Self::VmstateLoaded { checkpoint, digest }
            }
            9 => Self::GuestShutdown,
            10 => Self::Output(r.records()?),
            11 => Self::ColoSetup {
                output_every: r.u64("output every")?,
                verify: match r.u8("verify flag")? {
                    0 => false,
                    1 => true,
                    f => return Err(r.bad(format!("verify flag {f}, expected 0 or 1"))),
                },
            },
            k => {
                return Err(ColoError::Malformed {
                    channel,
                    what: format!("unknown COLO message type {k}"),
                    offset: 0,
                })
            }
        };
        if r.at != b.len() {
            return Err(r.bad(format!("{} stray bytes after {}", b.len() - r.at, m.name())));
        }
        Ok(m)
    }
}

fn put_records(b: &mut Vec<u8>, records: &[Record]) {
    b.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        b.extend_from_slice(&r.vcpu.to_le_bytes());
        b.extend_from_slice(&r.seq.to_le_bytes());
        b.extend_from_slice(&r.value.to_le_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    channel: &'static str,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn bad(&self, what: String) -> ColoError {
        ColoError::Malformed {
            channel: self.channel,
            what,
            offset: self.at,
        }
    }
    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ColoError> {
        if self.left() < N {
            return Err(self.bad(format!(
                "{what}: {N} bytes needed, {} left (truncated)",
                self.left()
            )));
        }
        let v = self.b[self.at..self.at + N].try_into().expect("N bytes");
        self.at += N;
        Ok(v)
    }
    fn u8(&mut self, what: &str) -> Result<u8, ColoError> {
        Ok(self.take::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, ColoError> {
        Ok(u16::from_le_bytes(self.take(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, ColoError> {
        Ok(u32::from_le_bytes(self.take(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, ColoError> {
        Ok(u64::from_le_bytes(self.take(what)?))
    }
    fn u128(&mut self, what: &str) -> Result<u128, ColoError> {
        Ok(u128::from_le_bytes(self.take(what)?))
    }
    fn records(&mut self) -> Result<Vec<Record>, ColoError> {
        let n = self.u32("record count")? as usize;
        if n > MAX_RECORDS || n * RECORD_LEN > self.left() {
            return Err(self.bad(format!(
                "{n} records announced, {} bytes left (at most {MAX_RECORDS})",
                self.left()
            )));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(Record {
                vcpu: self.u16("record vCPU")?,
                seq: self.u64("record number")?,
                value: self.u64("record value")?,
            });
        }
        Ok(v)
    }
}

/// Which side checks the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The primary, checking what the secondary sends.
    Primary,
    /// The secondary, checking what the primary sends.
    Secondary,
}

/// Where a checkpoint stands, as one side sees the other's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Primary: CHECKPOINT_READY is due.
    Ready,
    /// Between checkpoints.
    Idle,
    /// Primary: REQUEST sent, REPLY due.
    Reply,
    /// Secondary: REPLY sent, VMSTATE_SEND due.
    Send,
    /// Secondary: VMSTATE_SIZE due.
    Size,
    /// Secondary: VMSTATE of this size due.
    State(u64),
    /// Secondary: the checkpoint is whole; it is loading.
    Loading,
    /// Primary: RECEIVED due.
    Received,
    /// Primary: LOADED due.
    Loaded,
}

/// The order checker: every message one side reads goes through
/// [`Expect::check`]; a message out of order is an error that ends COLO.
#[derive(Clone, Debug)]
pub struct Expect {
    side: Side,
    step: Step,
    /// The checkpoint in progress, or the last one.
    checkpoint: u64,
}

impl Expect {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            step: match side {
                Side::Primary => Step::Ready,
                Side::Secondary => Step::Idle,
            },
            checkpoint: 0,
        }
    }

    /// The checkpoint in progress or last finished.
    pub fn checkpoint(&self) -> u64 {
        self.checkpoint
    }

    /// Whether no checkpoint is in progress.
    pub fn idle(&self) -> bool {
        self.step == Step::Idle
    }

    /// Primary: it sent CHECKPOINT_REQUEST for `checkpoint`.
    pub fn requested(&mut self, checkpoint: u64) {
        debug_assert_eq!(self.side, Side::Primary);
        self.checkpoint = checkpoint;
        self.step = Step::Reply;
    }

    /// Secondary: it committed and loaded the checkpoint (LOADED sent).
    pub fn loaded(&mut self) {
        self.step = Step::Idle;
    }

    fn wrong(&self, m: &ColoMessage) -> ColoError {
        let expected = match (self.side, self.step) {
            (_, Step::Ready) => "CHECKPOINT_READY",
            (Side::Primary, Step::Idle) => "OUTPUT",
            (Side::Secondary, Step::Idle) => "CHECKPOINT_REQUEST",
            (_, Step::Reply) => "CHECKPOINT_REPLY",
            (_, Step::Send) => "VMSTATE_SEND",
            (_, Step::Size) => "VMSTATE_SIZE",
            (_, Step::State(_)) => "VMSTATE",
            (_, Step::Loading) => "nothing (loading)",
            (_, Step::Received) => "VMSTATE_RECEIVED",
            (_, Step::Loaded) => "VMSTATE_LOADED",
        };
        ColoError::OutOfOrder {
            got: m.name(),
            expected,
            checkpoint: self.checkpoint,
        }
    }

    /// Checks `m` against the order and advances.
    pub fn check(&mut self, m: &ColoMessage) -> Result<(), ColoError> {
        use ColoMessage as M;
        let n = self.checkpoint;
        let next = match (self.side, self.step, m) {
            (Side::Primary, Step::Ready, M::CheckpointReady) => Step::Idle,
            // The secondary flushes its outputs before REPLY.
            (Side::Primary, Step::Idle | Step::Reply, M::Output(_)) => self.step,
            (Side::Primary, Step::Reply, M::CheckpointReply { checkpoint }) if *checkpoint == n => {
                Step::Received
            }
            (Side::Primary, Step::Received, M::VmstateReceived { checkpoint })
                if *checkpoint == n =>
            {
                Step::Loaded
            }
            (Side::Primary, Step::Loaded, M::VmstateLoaded { checkpoint, .. })
                if *checkpoint == n =>
            {
                Step::Idle
            }
            (Side::Secondary, Step::Idle, M::CheckpointRequest { checkpoint })
                if *checkpoint == n + 1 =>
            {
                self.checkpoint = *checkpoint;
                Step::Send
            }
            (Side::Secondary, Step::Idle, M::GuestShutdown) => Step::Idle,
            (Side::Secondary, Step::Send, M::VmstateSend { checkpoint, .. })
                if *checkpoint == n =>
            {
                Step::Size
            }
            (Side::Secondary, Step::Size, M::VmstateSize { size }) => Step::State(*size),
            (Side::Secondary, Step::State(size), M::Vmstate(s)) if s.len() as u64 == size => {
                Step::Loading
            }
            _ => return Err(self.wrong(m)),
        };
        self.step = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<ColoMessage> {
        let rec = Record {
            vcpu: 1,
            seq: 7,
            value: 0xdead_beef,
        };
        vec![
            ColoMessage::CheckpointReady,
            ColoMessage::CheckpointRequest { checkpoint: 3 },
            ColoMessage::CheckpointReply { checkpoint: 3 },
            ColoMessage::VmstateSend {
                checkpoint: 3,
                generation: 9,
                dirty: vec![vec![1, u64::MAX], vec![]],
                held: vec![rec],
            },
            ColoMessage::VmstateSize { size: 5 },
            ColoMessage::Vmstate(b"hello".to_vec()),
            ColoMessage::VmstateReceived { checkpoint: 3 },
            ColoMessage::VmstateLoaded {
                checkpoint: 3,
                digest: Some(42),
            },
            ColoMessage::VmstateLoaded {
                checkpoint: 3,
                digest: None,
            },
            ColoMessage::GuestShutdown,
            ColoMessage::Output(vec![rec, rec]),
            ColoMessage::ColoSetup {
                output_every: 64,
                verify: true,
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_truncations_are_refused() {
        for m in all() {
            let b = m.encode();
            assert_eq!(ColoMessage::decode(&b, "main").unwrap(), m);
            // Every shorter body is refused (VMSTATE is its whole body).
            if !matches!(m, ColoMessage::Vmstate(_)) {
                for cut in 0..b.len() {
                    assert!(
                        ColoMessage::decode(&b[..cut], "main").is_err(),
                        "{} cut at {cut} accepted",
                        m.name()
                    );
                }
                let mut long = b.clone();
                long.push(0);
                let e = ColoMessage::decode(&long, "main").unwrap_err().to_string();
                assert!(e.contains("stray"), "{e}");
            }
        }
        let mut b = ColoMessage::ColoSetup {
            output_every: 8,
            verify: false,
        }
        .encode();
        b[9] = 2;
        let e = ColoMessage::decode(&b, "main").unwrap_err().to_string();
        assert!(e.contains("verify flag 2"), "{e}");
        let e = ColoMessage::decode(&[99], "main").unwrap_err().to_string();
        assert!(e.contains("unknown COLO message type 99"), "{e}");
        // A huge announced bitmap is refused before any allocation.
        let mut b = vec![4u8];
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = ColoMessage::decode(&b, "main").unwrap_err().to_string();
        assert!(e.contains("words, only 0 bytes left"), "{e}");
    }

    #[test]
    fn the_order_of_a_checkpoint_is_enforced_on_both_sides() {
        let mut p = Expect::new(Side::Primary);
        let reply = ColoMessage::CheckpointReply { checkpoint: 1 };
        // Nothing before READY.
        assert!(p.clone().check(&reply).is_err());
        p.check(&ColoMessage::CheckpointReady).unwrap();
        p.check(&ColoMessage::Output(vec![])).unwrap();
        // A REPLY nobody asked for.
        let e = p.clone().check(&reply).unwrap_err().to_string();
        assert!(
            e.contains("CHECKPOINT_REPLY arrived while OUTPUT was due"),
            "{e}"
        );
        p.requested(1);
        // LOADED before RECEIVED (the seeds' order) is refused.
        let loaded = ColoMessage::VmstateLoaded {
            checkpoint: 1,
            digest: None,
        };
        assert!(p.clone().check(&loaded).is_err());
        p.check(&reply).unwrap();
        // The secondary is paused: no outputs now.
        assert!(p.clone().check(&ColoMessage::Output(vec![])).is_err());
        // A RECEIVED for another checkpoint.
        assert!(p
            .clone()
            .check(&ColoMessage::VmstateReceived { checkpoint: 2 })
            .is_err());
        p.check(&ColoMessage::VmstateReceived { checkpoint: 1 })
            .unwrap();
        p.check(&loaded).unwrap();
        assert!(p.idle());

        let mut s = Expect::new(Side::Secondary);
        // Checkpoints are numbered from 1, one after another.
        assert!(s
            .clone()
            .check(&ColoMessage::CheckpointRequest { checkpoint: 2 })
            .is_err());
        s.check(&ColoMessage::CheckpointRequest { checkpoint: 1 })
            .unwrap();
        // No second REQUEST inside a checkpoint (no back-to-back).
        assert!(s
            .clone()
            .check(&ColoMessage::CheckpointRequest { checkpoint: 2 })
            .is_err());
        s.check(&ColoMessage::VmstateSend {
            checkpoint: 1,
            generation: 1,
            dirty: vec![],
            held: vec![],
        })
        .unwrap();
        // The device state before its size.
        assert!(s.clone().check(&ColoMessage::Vmstate(vec![1])).is_err());
        s.check(&ColoMessage::VmstateSize { size: 2 }).unwrap();
        // A state of another size than announced.
        assert!(s.clone().check(&ColoMessage::Vmstate(vec![1])).is_err());
        s.check(&ColoMessage::Vmstate(vec![1, 2])).unwrap();
        assert!(!s.idle());
        assert!(s
            .clone()
            .check(&ColoMessage::CheckpointRequest { checkpoint: 2 })
            .is_err());
        s.loaded();
        s.check(&ColoMessage::CheckpointRequest { checkpoint: 2 })
            .unwrap();
    }
}
