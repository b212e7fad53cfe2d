//! Output comparison (QEMU's colo-compare, for the synthetic guest's
//! output records instead of network packets).
//!
//! Each vCPU of a guest emits numbered [`Record`]s (number 1, 2, 3... per
//! vCPU, a value derived from its state). The primary holds its own
//! records until the secondary's record of the same vCPU and number
//! arrives: equal, the record may go to the client once every earlier
//! record of that vCPU has; different, it is a mismatch, which asks for a
//! checkpoint at once. A checkpoint makes the secondary equal to the
//! primary, so every record still held is released after it, and the
//! secondary's unmatched records are dropped (it will produce them again
//! from the primary's state).
//!
//! [`ClientHistory`] is the client's side: it takes released records as a
//! TCP receiver takes segments, dropping one it already holds (same vCPU,
//! number and value: a survivor that re-sends what the client may have
//! seen), refusing a gap or a record that contradicts one it holds.

use std::collections::{BTreeMap, VecDeque};

/// One output record: vCPU, number (from 1 per vCPU), value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Record {
    pub vcpu: u16,
    pub seq: u64,
    pub value: u64,
}

/// Counters of a [`Comparator`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompareStats {
    /// Record pairs compared.
    pub compared: u64,
    /// Pairs that differed.
    pub mismatches: u64,
    /// Records released to the client.
    pub released: u64,
    /// Records held now, and at most.
    pub held: u64,
    pub held_max: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Waiting,
    Matched,
    Mismatched,
}

/// The primary's comparator. Records of one vCPU must come in order on
/// each side (they do: a vCPU emits them in order, the channel keeps it).
#[derive(Default)]
pub struct Comparator {
    /// Per vCPU, the primary's records not released, oldest first.
    held: BTreeMap<u16, VecDeque<(Record, Verdict)>>,
    /// The secondary's records with no primary record to meet yet.
    waiting: BTreeMap<(u16, u64), u64>,
    stats: CompareStats,
}

/// What feeding a record did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Records now released, in order per vCPU.
    pub released: Vec<Record>,
    /// A pair differed: a checkpoint is due.
    pub mismatch: bool,
}

impl Comparator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> CompareStats {
        self.stats
    }

    /// The primary's records not released yet, in order per vCPU.
    pub fn held(&self) -> Vec<Record> {
        self.held
            .values()
            .flat_map(|q| q.iter().map(|(r, _)| *r))
            .collect()
    }

    /// One of the primary's own records.
    pub fn primary(&mut self, r: Record) -> Fed {
        let verdict = match self.waiting.remove(&(r.vcpu, r.seq)) {
            Some(v) => self.judge(r.value, v),
            None => Verdict::Waiting,
        };
        self.held.entry(r.vcpu).or_default().push_back((r, verdict));
        self.stats.held += 1;
        self.stats.held_max = self.stats.held_max.max(self.stats.held);
        let mut fed = Fed {
            mismatch: verdict == Verdict::Mismatched,
            ..Fed::default()
        };
        self.release_ready(r.vcpu, &mut fed.released);
        fed
    }

    /// One of the secondary's records.
    pub fn secondary(&mut self, r: Record) -> Fed {
        let mut fed = Fed::default();
        let found = self.held.get(&r.vcpu).and_then(|q| {
            let first = q.front()?.0.seq;
            let i = usize::try_from(r.seq.checked_sub(first)?).ok()?;
            let (p, v) = q.get(i)?;
            (p.seq == r.seq).then_some((i, p.value, *v))
        });
        match found {
            Some((i, pv, Verdict::Waiting)) => {
                let verdict = self.judge(pv, r.value);
                if let Some(slot) = self.held.get_mut(&r.vcpu).and_then(|q| q.get_mut(i)) {
                    slot.1 = verdict;
                }
                fed.mismatch = verdict == Verdict::Mismatched;
                self.release_ready(r.vcpu, &mut fed.released);
            }
            // Already judged (a repeat): ignore.
            Some(_) => {}
            None => {
                self.waiting.insert((r.vcpu, r.seq), r.value);
            }
        }
        fed
    }

    fn judge(&mut self, primary: u64, secondary: u64) -> Verdict {
        self.stats.compared += 1;
        if primary == secondary {
            Verdict::Matched
        } else {
            self.stats.mismatches += 1;
            Verdict::Mismatched
        }
    }

    fn release_ready(&mut self, vcpu: u16, out: &mut Vec<Record>) {
        if let Some(q) = self.held.get_mut(&vcpu) {
            while let Some((r, Verdict::Matched)) = q.front().copied() {
                q.pop_front();
                out.push(r);
                self.stats.held -= 1;
                self.stats.released += 1;
            }
        }
    }

    /// A checkpoint committed (or the secondary is gone): every held
    /// record is released, the secondary's waiting ones dropped.
    pub fn release_all(&mut self) -> Vec<Record> {
        let out: Vec<Record> = self.held();
        self.stats.released += out.len() as u64;
        self.stats.held = 0;
        self.held.clear();
        self.waiting.clear();
        out
    }

    /// The secondary is gone: every held record, then the primary's own
    /// records not fed yet (`unfed`, in the order made), all released.
    /// Nothing is compared any more, so none is lost to a comparison that
    /// would release it to no one.
    pub fn secondary_lost(&mut self, unfed: Vec<Record>) -> Vec<Record> {
        let mut out = self.release_all();
        self.stats.released += unfed.len() as u64;
        out.extend(unfed);
        out
    }

    /// Records of the secondary waiting for the primary's.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

/// Why the client refused a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("vCPU {vcpu}: record {seq} arrived while {next} was due (a gap)")]
    Gap { vcpu: u16, seq: u64, next: u64 },
    #[error("vCPU {vcpu}: record {seq} has value {got:#x}, the client already has {had:#x}")]
    Contradiction {
        vcpu: u16,
        seq: u64,
        had: u64,
        got: u64,
    },
}

/// The client's view of released records (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct ClientHistory {
    /// Per vCPU: the first record number and every value since.
    vcpus: BTreeMap<u16, (u64, Vec<u64>)>,
    duplicates: u64,
}

impl ClientHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one record: `Ok(true)` new, `Ok(false)` a duplicate dropped.
    pub fn accept(&mut self, r: Record) -> Result<bool, HistoryError> {
        let (first, values) = self.vcpus.entry(r.vcpu).or_insert((r.seq, Vec::new()));
        let next = *first + values.len() as u64;
        if r.seq == next {
            values.push(r.value);
            return Ok(true);
        }
        if r.seq > next || r.seq < *first {
            return Err(HistoryError::Gap {
                vcpu: r.vcpu,
                seq: r.seq,
                next,
            });
        }
        let had = values[(r.seq - *first) as usize];
        if had != r.value {
            return Err(HistoryError::Contradiction {
                vcpu: r.vcpu,
                seq: r.seq,
                had,
                got: r.value,
            });
        }
        self.duplicates += 1;
        Ok(false)
    }

    /// Duplicates dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Per vCPU: first and last record number held.
    pub fn ranges(&self) -> BTreeMap<u16, (u64, u64)> {
        self.vcpus
            .iter()
            .map(|(&v, (f, vals))| (v, (*f, f + vals.len() as u64 - 1)))
            .collect()
    }

    /// The value of record `seq` of `vcpu`, if held.
    pub fn value(&self, vcpu: u16, seq: u64) -> Option<u64> {
        let (first, values) = self.vcpus.get(&vcpu)?;
        values
            .get(usize::try_from(seq.checked_sub(*first)?).ok()?)
            .copied()
    }

    /// Records held in all.
    pub fn len(&self) -> u64 {
        self.vcpus.values().map(|(_, v)| v.len() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(vcpu: u16, seq: u64, value: u64) -> Record {
        Record { vcpu, seq, value }
    }

    #[test]
    fn matching_records_are_released_in_order_and_a_mismatch_holds_until_checkpoint() {
        let mut c = Comparator::new();
        // The secondary runs ahead on vCPU 0.
        assert_eq!(c.secondary(r(0, 1, 10)), Fed::default());
        assert_eq!(c.secondary(r(0, 2, 20)), Fed::default());
        assert_eq!(c.waiting(), 2);
        // Record 1 of the primary matches: released at once.
        assert_eq!(c.primary(r(0, 1, 10)).released, vec![r(0, 1, 10)]);
        // Record 2 differs: a mismatch, nothing released.
        let fed = c.primary(r(0, 2, 21));
        assert!(fed.mismatch && fed.released.is_empty());
        // Record 3 matches but 2 is not released: 3 waits behind it.
        c.secondary(r(0, 3, 30));
        assert!(c.primary(r(0, 3, 30)).released.is_empty());
        // Another vCPU is independent.
        c.primary(r(1, 1, 5));
        assert_eq!(c.secondary(r(1, 1, 5)).released, vec![r(1, 1, 5)]);
        assert_eq!(c.held(), vec![r(0, 2, 21), r(0, 3, 30)]);
        // The checkpoint releases the primary's records (its values).
        c.secondary(r(0, 4, 40));
        assert_eq!(c.release_all(), vec![r(0, 2, 21), r(0, 3, 30)]);
        assert_eq!(c.waiting(), 0);
        let s = c.stats();
        assert_eq!((s.compared, s.mismatches, s.released, s.held), (4, 1, 4, 0));
        assert_eq!(s.held_max, 3);
    }

    #[test]
    fn a_lost_secondary_releases_held_then_unfed_records_without_a_gap() {
        let mut c = Comparator::new();
        // Primary 1 held (mismatched), secondary's 2 waiting for the primary's.
        c.secondary(r(0, 1, 9));
        assert!(c.primary(r(0, 1, 1)).mismatch);
        c.secondary(r(0, 2, 2));
        // The primary's 2 and 3 were made but not fed when the secondary died:
        // record 2 would match the waiting one; it must still reach the client.
        let out = c.secondary_lost(vec![r(0, 2, 2), r(0, 3, 3)]);
        assert_eq!(out, vec![r(0, 1, 1), r(0, 2, 2), r(0, 3, 3)]);
        let mut h = ClientHistory::new();
        for x in out {
            assert!(h.accept(x).unwrap());
        }
        assert_eq!((c.stats().released, c.stats().held), (3, 0));
        assert!(c.held().is_empty() && c.waiting() == 0);
    }

    #[test]
    fn the_client_drops_repeats_and_refuses_gaps_and_contradictions() {
        let mut h = ClientHistory::new();
        assert_eq!(h.accept(r(0, 5, 50)), Ok(true));
        assert_eq!(h.accept(r(0, 6, 60)), Ok(true));
        assert_eq!(h.accept(r(0, 5, 50)), Ok(false));
        assert_eq!(h.duplicates(), 1);
        assert_eq!(
            h.accept(r(0, 6, 61)),
            Err(HistoryError::Contradiction {
                vcpu: 0,
                seq: 6,
                had: 60,
                got: 61
            })
        );
        assert_eq!(
            h.accept(r(0, 8, 80)),
            Err(HistoryError::Gap {
                vcpu: 0,
                seq: 8,
                next: 7
            })
        );
        assert_eq!(h.ranges()[&0], (5, 6));
        assert_eq!(h.value(0, 6), Some(60));
        assert_eq!(h.len(), 2);
    }
}
