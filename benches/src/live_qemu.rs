//! `ferry bench --live --guest kvm --peer qemu`: the same guest program
//! (ferry-vmm's PVH ELF) with the same boot parameters under QEMU, migrated
//! QEMU to QEMU (issue #15 item 6).
//!
//! A run boots the source (`ferry_vmm::QemuGuest`: qboot firmware, the
//! report port an `isa-debugcon` file, a QMP socket) and waits until every
//! vCPU printed its first progress line: under QEMU the guest clears its
//! work area after `boot` (QEMU's RAM is not known to be zero), a gap its
//! TSC shows, so a migration before that first line would carry the
//! clearing into the first line on the destination, and count it as
//! blackout (seen: 1.4–2.9 s at 2 GiB). Then it starts the
//! destination with `-incoming defer`; sets on both multifd with K
//! channels, the same downtime limit as ferry's, `max-bandwidth` 1 TiB/s
//! (QEMU's default caps a migration at 128 MiB/s; ferry has no cap) and,
//! where asked, auto-converge; and migrates over loopback TCP, polling
//! `query-migrate` until it completes. Its figures: `total-time`,
//! `downtime` (QEMU's, the source's view), `ram.transferred` (bytes on the
//! wire), `ram.dirty-sync-count` (passes). Then the destination's guest,
//! watched for `run_after` and until each vCPU printed two progress lines
//! there: the largest `gap_us` in its progress lines there (the first
//! line of each vCPU spans the switchover: the blackout as the guest saw
//! it; taken over all the lines, as ferry's `recv --run-after` takes its
//! `guest_blackout_us`, so both carry the same noise of the run after;
//! each vCPU's first line is in the sample's detail), its self-check (any `error` line, or a
//! progress line with errors, fails the bench naming it) and the write
//! rate it reached (from its progress lines' counters, one line a second).
//! Both QEMUs are killed when the run ends.

use std::time::{Duration, Instant};

use ferry_vmm::{BootParams, PortLine, Progress, QemuConfig, QemuGuest, WritePattern};
use serde_json::{json, Value};

use crate::live::LiveOptions;
use crate::run::run_timeout;
use crate::{BenchError, Sample};

/// How long a guest under QEMU may take to boot every vCPU (it clears its
/// work area first; under a software KVM that is slow for GiBs).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest's progress lines come once a second (its default `report_ms`,
/// which ferry's VMM leaves too).
const REPORT_S: f64 = 1.0;

/// Bytes per page the guest writes (one write = one 4 KiB page).
const PAGE: f64 = 4096.0;

/// `random`, `sequential`, `hotset:PCT` as the guest's pattern.
pub(crate) fn write_pattern(p: &str) -> Result<WritePattern, BenchError> {
    match p {
        "random" => Ok(WritePattern::Random),
        "sequential" => Ok(WritePattern::Sequential),
        _ => p
            .strip_prefix("hotset:")
            .and_then(|pct| pct.trim_end_matches('%').parse::<u8>().ok())
            .filter(|pct| (1..=100).contains(pct))
            .map(WritePattern::Hotset)
            .ok_or_else(|| BenchError::Config(format!("dirty pattern '{p}'"))),
    }
}

/// The boot parameters `ferry send --guest kvm` gives its guest
/// (`BootParams::of`), except that QEMU's RAM is not known to be zero.
pub(crate) fn boot_params(
    live: &LiveOptions,
    seed: u64,
    tsc_khz: u32,
) -> Result<BootParams, BenchError> {
    Ok(BootParams {
        vcpus: usize::from(live.vcpus),
        rate: live.dirty_rate,
        pattern: write_pattern(&live.dirty_pattern)?,
        seed,
        tsc_khz: Some(tsc_khz),
        report_ms: None,
        zeroed: false,
    })
}

/// One QEMU-to-QEMU live migration of the guest; its figures as a
/// [`Sample`] with [`crate::LiveFigures`].
pub(crate) fn qemu_live_once(
    live: &LiveOptions,
    params: &BootParams,
    size: u64,
    channels: u16,
    label: &str,
) -> Result<Sample, BenchError> {
    let qemu = |e: ferry_vmm::QemuError| BenchError::QemuLive {
        case: label.to_string(),
        why: e.to_string(),
    };
    // `_dir` keeps the directories until the run ends.
    let (_dir, src_dir, dst_dir) = qemu_dirs("ferry-bench-qemu-live")?;
    let vcpus = params.vcpus;
    let mut qc = QemuConfig::new(size);
    qc.qmp = true;
    let mut src = QemuGuest::boot(&qc, params, &src_dir).map_err(qemu)?;
    src.wait_for("every vCPU's first progress line", BOOT_TIMEOUT, |lines| {
        (0..vcpus).all(|v| !progress_of(lines, v).is_empty())
    })
    .map_err(qemu)?;
    let mut dst_config = qc.clone();
    dst_config.incoming = Some("defer".into());
    let mut dst = QemuGuest::boot(&dst_config, params, &dst_dir).map_err(qemu)?;

    let mut caps = vec![json!({ "capability": "multifd", "state": true })];
    if live.auto_converge {
        caps.push(json!({ "capability": "auto-converge", "state": true }));
    }
    let downtime_ms = (live.downtime_limit.as_secs_f64() * 1e3).round().max(1.0) as u64;
    for q in [&src, &dst] {
        let mut qmp = q.qmp().map_err(qemu)?;
        qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .map_err(qemu)?;
        qmp.execute(
            "migrate-set-parameters",
            json!({
                "multifd-channels": channels,
                "downtime-limit": downtime_ms,
                "max-bandwidth": 1u64 << 40,
            }),
        )
        .map_err(qemu)?;
    }
    let mut dq = dst.qmp().map_err(qemu)?;
    dq.execute("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))
        .map_err(qemu)?;
    let port = crate::qmp::listening_port(&dq.execute("query-migrate", json!({})).map_err(qemu)?)
        .ok_or_else(|| BenchError::QemuLive {
        case: label.to_string(),
        why: "the destination QEMU did not say which port it listens on".into(),
    })?;
    let done = src
        .migrate(&format!("tcp:127.0.0.1:{port}"), run_timeout(size))
        .map_err(qemu)?;
    let completed = Instant::now();

    // The destination's guest: each vCPU's first line there carries the
    // blackout; a second one gives the rate it writes at.
    let lines = dst
        .wait_for(
            "two progress lines from each vCPU on the destination",
            Duration::from_secs(30) + live.run_after,
            |lines| {
                completed.elapsed() >= live.run_after
                    && (0..vcpus).all(|v| progress_of(lines, v).len() >= 2)
            },
        )
        .map_err(qemu)?;
    if let Some(addr) = lines.iter().find_map(|l| match l {
        PortLine::Error { addr, .. } => Some(*addr),
        _ => None,
    }) {
        return Err(BenchError::GuestCheck {
            case: label.to_string(),
            why: format!("the guest's self-check found a wrong word at {addr:#x} under QEMU"),
        });
    }
    let mut blackout_us = 0;
    // None if no first line carried a gap (a guest without tsc_khz).
    let mut switchover_gap_us: Option<u64> = None;
    let mut rate = 0.0;
    let mut errors = 0;
    for v in 0..vcpus {
        let p = progress_of(&lines, v);
        let (first, last) = (p[0], p[p.len() - 1]);
        let gap = p.iter().filter_map(|l| l.gap_us).max().unwrap_or(0);
        blackout_us = blackout_us.max(gap);
        switchover_gap_us = switchover_gap_us.max(first.gap_us);
        rate += last.writes.saturating_sub(first.writes) as f64 * PAGE
            / ((p.len() - 1) as f64 * REPORT_S);
        errors += last.errors;
    }
    if errors > 0 {
        return Err(BenchError::GuestCheck {
            case: label.to_string(),
            why: format!("the guest's self-check found {errors} wrong word(s) under QEMU"),
        });
    }
    drop((src, dst));

    let ms = |key: &str| done[key].as_f64();
    let total_s = ms("total-time").unwrap_or(f64::NAN) / 1e3;
    let wire_bytes = done["ram"]["transferred"].as_u64().unwrap_or(0);
    let detail = json!({ "query_migrate": done, "first_lines": first_lines(&lines, vcpus) });
    let mut sample = Sample::new(total_s, size, wire_bytes, None, detail);
    sample.live = Some(crate::LiveFigures {
        total_s,
        downtime_ms: ms("downtime").unwrap_or(f64::NAN),
        expected_downtime_ms: ms("expected-downtime"),
        passes: done["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        wire_bytes,
        throttle_percent: done["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        switchover_digest: false,
        source_digest: String::new(),
        destination_digest: None,
        guest_blackout_ms: Some(blackout_us as f64 / 1e3),
        guest_switchover_gap_ms: switchover_gap_us.map(|us| us as f64 / 1e3),
        guest_write_rate: Some(rate),
    });
    Ok(sample)
}

/// vCPU `v`'s progress lines, in order.
fn progress_of(lines: &[PortLine], v: usize) -> Vec<Progress> {
    lines
        .iter()
        .filter_map(|l| match l {
            PortLine::Progress(p) if p.vcpu == v => Some(*p),
            _ => None,
        })
        .collect()
}

/// Each vCPU's first progress line on the destination, for the JSON.
fn first_lines(lines: &[PortLine], vcpus: usize) -> Value {
    (0..vcpus)
        .filter_map(|v| progress_of(lines, v).first().copied())
        .map(|p| {
            json!({
                "vcpu": p.vcpu,
                "writes": p.writes,
                "errors": p.errors,
                "gap_us": p.gap_us,
                "max_gap_us": p.max_gap_us,
            })
        })
        .collect()
}

/// A temporary directory (removed when dropped) holding `src/` and `dst/`,
/// the working directories of a QEMU pair.
pub(crate) fn qemu_dirs(
    prefix: &str,
) -> Result<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf), BenchError> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| BenchError::Process {
            process: "making a temporary directory for QEMU".into(),
            source,
        })?;
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    for d in [&src_dir, &dst_dir] {
        std::fs::create_dir_all(d).map_err(|source| BenchError::Process {
            process: format!("creating {}", d.display()),
            source,
        })?;
    }
    Ok((dir, src_dir, dst_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_become_the_guests() {
        assert_eq!(write_pattern("random").ok(), Some(WritePattern::Random));
        assert_eq!(
            write_pattern("sequential").ok(),
            Some(WritePattern::Sequential)
        );
        assert_eq!(
            write_pattern("hotset:25").ok(),
            Some(WritePattern::Hotset(25))
        );
        assert!(write_pattern("hotset:0").is_err());
    }

    #[test]
    fn qemu_gets_ferrys_boot_parameters_on_non_zero_ram() {
        let live = LiveOptions {
            dirty_pattern: "random".into(),
            ..LiveOptions::default()
        };
        let p = boot_params(&live, 7, 2_000_000).expect("params");
        assert_eq!(
            p.cmdline(),
            "vcpus=2 rate=268435456 pattern=0 hot=100 seed=7 tsc_khz=2000000"
        );
    }
}
