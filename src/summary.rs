//! What a migration reports when it ends ([`Summary`], printed by
//! `ferry send/recv` as text or JSON); while it runs, see [`crate::Progress`].

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_multifd::Totals;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Source,
    Destination,
}

/// A live guest's writes before the switchover (or at a restore) and
/// after running on the destination for a while.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Workload {
    pub writes_at_switchover: u64,
    pub writes_after: u64,
    pub seconds: f64,
    /// Every vCPU wrote on from where it stopped.
    pub continued: bool,
    /// A guest that checks its own memory (the KVM guest): the words its
    /// self-check found wrong; 0 is clean.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_check_errors: Option<u64>,
    /// The guest address of the first wrong word, if any (hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub self_check_first_error: Option<String>,
    /// A vCPU that stopped for good (triple fault, halt...), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_failure: Option<String>,
    /// A guest that watches its own clock (the KVM guest): the largest gap
    /// any of its vCPUs saw between two reads of its TSC in its whole life,
    /// in microseconds: the blackout as the guest saw it (how much of the
    /// switchover its TSC shows depends on KVM: vmm/src/port.rs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_max_gap_us: Option<u64>,
    /// The KVM guest: the largest gap in its TSC between two of its
    /// progress lines (one a second) that came on this side, in
    /// microseconds; the first spans the switchover, so this is the
    /// blackout as the guest saw it, with the noise of the run after it.
    /// Absent if no line came yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_blackout_us: Option<u64>,
    /// After a postcopy (synthetic guest): the replay check, the memory
    /// equal to the source's at the switch with this side's writes
    /// replayed ([`crate::replay_check`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_equal: Option<bool>,
    /// The writes it replayed, and the pages that differed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_writes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_differing_pages: Option<u64>,
    /// The KVM guest: the largest gap in its TSC in each vCPU's first
    /// progress line on this side (the one whose window spans the
    /// switchover), the largest over the vCPUs, in microseconds: the
    /// blackout as the guest saw it, with only that first window's noise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_switchover_gap_us: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ZeroCopyReport {
    pub requested: bool,
    pub used: bool,
    pub sends: u64,
    /// Sends the kernel copied after all (always so on loopback).
    pub copied: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What postcopy did, in the summary's JSON at its top level.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PostcopyReport {
    /// Page requests: sent (destination) or served (source).
    pub postcopy_requests: u64,
    /// Bytes of page frames: received (destination) or sent (source), on
    /// the preempt and push channels.
    pub postcopy_bytes: u64,
    /// Pages stale at the switch (the discard list).
    pub postcopy_discarded_pages: u64,
    /// Of those, the pages dropped on the destination before the switch,
    /// while the source's guest still ran (EARLY_DISCARD), so outside the
    /// downtime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_early_discarded_pages: Option<u64>,
    /// Destination: a fault's wait, request sent → page placed
    /// (microseconds; hdrhistogram quantiles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_max_us: Option<u64>,
    /// Destination: the sum of those waits, the guest's blocked time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_blocked_ms: Option<f64>,
    /// Destination: pages that arrived both ways, placed once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_duplicate_pages: Option<u64>,
    /// Destination: huge pages (2 MiB) placed whole, moved in from a
    /// region the push sent (the other pages were placed 4 KiB at a time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_huge_pages_moved: Option<u64>,
    /// Recoveries after a link failure (postcopy-paused → postcopy-active).
    pub recoveries: u64,
    /// Source: at each recovery, the discarded pages the destination's
    /// received bitmap lacked (summed over recoveries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_missing_pages: Option<u64>,
    /// Source: page-frame bytes sent after the recoveries that filled
    /// those pages: the push, and request answers of pages not sent yet
    /// (each lacked page once), to compare with them. Second copies are in
    /// `recovery_duplicate_bytes`; the two add up to every page-frame byte
    /// sent after the recoveries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_bytes: Option<u64>,
    /// Source: page-frame bytes of request answers (preempt channel) for
    /// pages already sent, the push having taken them: a faulting vCPU
    /// need not wait behind the push's bytes, at the cost of at most what
    /// the request asked for (one page, or one 2 MiB region). Whole
    /// postcopy, recoveries included; part of `postcopy_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_duplicate_bytes: Option<u64>,
    /// Source: the part of `postcopy_duplicate_bytes` sent after the
    /// recoveries (not in `recovery_bytes`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_duplicate_bytes: Option<u64>,
}

/// The end of a migration, on either side.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// "completed", "failed" or "cancelled".
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub role: Role,
    pub session: String,
    pub uri: String,
    pub channels: u16,
    /// The guest's memory: every block's length, added up.
    pub guest_bytes: u64,
    /// Guest RAM covered by pages sent or received (normal and zero), all
    /// passes together: more than `guest_bytes` when pages went again.
    pub ram_bytes: u64,
    /// Every byte on every channel, handshakes and headers included.
    pub wire_bytes: u64,
    pub multifd_bytes: u64,
    pub pages_normal: u64,
    pub pages_zero: u64,
    pub packets: u64,
    pub passes: u64,
    /// Dirty-log syncs (one per pass after the first, plus the final one).
    pub dirty_sync_count: u64,
    /// Source: time spent reading (and re-arming) the dirty log, in total.
    pub dirty_sync_ms: f64,
    /// Source: from pausing the guest until the destination said it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// Source: the expected downtime when it decided to switch over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime_ms: Option<f64>,
    /// Digest of guest memory and device state together (`Digest::of_guest`):
    /// on the source at switchover, on the destination before it resumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_digest: Option<String>,
    /// The switchover was verified: both sides compared their switchover
    /// digests before the destination's guest ran, and they were equal.
    /// False when it was not verified (neither side asked for
    /// `--verify-switchover`), or the migration did not complete.
    pub verified: bool,
    /// Destination: from all pages landed to the guest running (digest,
    /// guest built, resources taken, resumed), and the digest's share.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_ms: Option<f64>,
    /// Source: when the destination's guest started running (its clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_resumed_at_unix: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_tracker: Option<String>,
    /// Whether this side's guest runs at the end (a source after a failed
    /// or cancelled migration; a destination after a completed one).
    pub guest_running: bool,
    /// Destination with `--run-after`: the workload continued there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// `send --colo` / `recv --colo`: what COLO did after the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub colo: Option<crate::colo::ColoSummary>,
    /// The highest auto-converge throttle applied.
    pub throttle_percent: u8,
    /// Bytes on multifd channels while the guest ran, and while paused.
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub seconds: f64,
    pub gbps_ram: f64,
    pub gbps_wire: f64,
    /// Digest of all guest RAM (see `ferry_ram::Digest`): on the source what
    /// it sent, on the destination what it holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub device_state_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_state_digest: Option<String>,
    pub checksum: bool,
    pub checksum_mismatches: u64,
    /// Every channel ran over TLS.
    pub tls: bool,
    /// `zstd:LEVEL` on the source, `zstd` on the destination, when payloads
    /// may be compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Page payload bytes per payload byte on the wire (1.0 uncompressed).
    pub compression_ratio: f64,
    /// Packets whose payload travelled compressed.
    pub compressed_packets: u64,
    /// Source only: how packets reached the sockets (`splice`, `copy`,
    /// `zero-copy`), and why the path asked for was not used, if it was not.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub send_path: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_path_note: Option<String>,
    /// Source: pages of live packets that changed while in flight (sent again).
    pub pages_changed_in_flight: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_copy: Option<ZeroCopyReport>,
    /// Postcopy's figures, when the migration switched to postcopy.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
    /// Destination: bytes of fresh memory populated just ahead of the pages
    /// arriving (`recv --prefault`).
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub prefaulted_bytes: u64,
    /// Wall-clock time (Unix seconds) the migration started and ended on this side.
    pub started_at_unix: f64,
    pub finished_at_unix: f64,
    /// CPU seconds (user + system, every thread) this process had used when
    /// the migration ended: what the migration cost this side, before the
    /// command line's digest of all memory for its report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_s: Option<f64>,
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// CPU seconds (user + system) of this whole process so far, from
/// `getrusage(RUSAGE_SELF)`; None if the call fails.
pub fn process_cpu_s() -> Option<f64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is writable memory the size of a `rusage`, which
    // getrusage fills; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: getrusage succeeded, so the struct is filled (and an all-zero
    // `rusage` of plain integers was valid to begin with).
    let ru = unsafe { ru.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(ru.ru_utime) + secs(ru.ru_stime))
}

impl Summary {
    pub(crate) fn new(role: Role, uri: String) -> Self {
        Self {
            status: "failed",
            role,
            uri,
            started_at_unix: unix_now(),
            ..Default::default()
        }
    }

    pub(crate) fn add_totals(&mut self, t: &Totals) {
        self.ram_bytes = t.ram_bytes;
        self.multifd_bytes = t.wire_bytes;
        self.wire_bytes += t.wire_bytes;
        self.pages_normal = t.pages_normal;
        self.pages_zero = t.pages_zero;
        self.packets = t.packets;
        self.checksum_mismatches = t.checksum_mismatches;
        self.pages_changed_in_flight = t.pages_changed_in_flight;
        self.compression_ratio = t.compression_ratio();
        self.compressed_packets = t.compressed_packets;
    }

    pub(crate) fn finish(&mut self, started: Instant, error: Option<String>, cancelled: bool) {
        self.seconds = started.elapsed().as_secs_f64();
        self.finished_at_unix = unix_now();
        self.cpu_s = process_cpu_s();
        let s = self.seconds.max(1e-9);
        self.gbps_ram = self.ram_bytes as f64 / s / 1e9;
        self.gbps_wire = self.wire_bytes as f64 / s / 1e9;
        self.status = match (&error, cancelled) {
            (None, _) => "completed",
            (Some(_), true) => "cancelled",
            (Some(_), false) => "failed",
        };
        self.error = error;
    }

    pub fn completed(&self) -> bool {
        self.status == "completed"
    }
}

/// A byte count in IEC units, as every message and summary of ferry's
/// prints sizes: `512 B`, `64.00 MiB`, `15.00 TiB`.
pub fn iec(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.2} {}", UNITS[unit])
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
