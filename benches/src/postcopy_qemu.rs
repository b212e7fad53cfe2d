//! `ferry bench --postcopy --peer qemu`: QEMU's own postcopy of the same
//! case, QEMU to QEMU over loopback (issue #13's side by side).
//!
//! The guest is ferry-vmm's micro-VM program (the PVH ELF QEMU boots, as
//! in `live_qemu.rs`) with the case's size, vCPUs, rate and pattern. A run
//! boots the source and waits for every vCPU's first progress line (the
//! guest clears its work area first under QEMU); starts the destination
//! with `-incoming defer`; sets on both the capabilities `postcopy-ram` and
//! `postcopy-preempt` (not `multifd`: QEMU 10.0 refuses it with postcopy,
//! "Postcopy is not yet compatible with multifd"), `max-bandwidth` 1 TiB/s
//! (QEMU's default caps at 128 MiB/s); migrates; once `query-migrate`
//! shows the passes asked for (`ram.dirty-sync-count` > `--postcopy-after`)
//! sends `migrate-start-postcopy`; and polls until `completed`. Figures:
//! QEMU's `total-time` and `downtime` (in postcopy QEMU ends its downtime
//! once its source has sent the package, before the destination runs:
//! seed 004's `postcopy_start` → `migration_downtime_end`); the guest's
//! own largest TSC gap on the destination goes in the detail.

use std::time::{Duration, Instant};

use ferry_vmm::{BootParams, PortLine, QemuConfig, QemuGuest};
use serde_json::json;

use crate::postcopy::{PostcopyOptions, PostcopySample};
use crate::run::run_timeout;
use crate::BenchError;

/// How long the guest may take to boot every vCPU under QEMU.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Everything a QEMU turn needs, checked once.
pub(crate) struct QemuPostcopy {
    params: BootParams,
    size: u64,
    postcopy_after: u64,
}

/// Whether QEMU can run the case here; `Err` says why not.
pub(crate) fn prepare(size: u64, pc: &PostcopyOptions, seed: u64) -> Result<QemuPostcopy, String> {
    let qc = QemuConfig::new(size);
    ferry_vmm::qemu_usable(&qc)?;
    let khz = ferry_vmm::host_tsc_khz().map_err(|e| format!("the TSC's frequency: {e}"))?;
    let live = crate::LiveOptions {
        guest: crate::LiveGuest::Kvm,
        vcpus: pc.vcpus,
        dirty_rate: pc.dirty_rate,
        dirty_pattern: pc.dirty_pattern.clone(),
        ..crate::LiveOptions::default()
    };
    let params = crate::live_qemu::boot_params(&live, seed, khz).map_err(|e| e.to_string())?;
    Ok(QemuPostcopy {
        params,
        size,
        postcopy_after: pc.postcopy_after,
    })
}

/// One QEMU-to-QEMU postcopy; its figures.
pub(crate) fn run_once(q: &QemuPostcopy, label: &str) -> Result<PostcopySample, BenchError> {
    let qemu = |e: ferry_vmm::QemuError| BenchError::QemuLive {
        case: label.to_string(),
        why: e.to_string(),
    };
    // `_dir` keeps the directories until the run ends.
    let (_dir, src_dir, dst_dir) = crate::live_qemu::qemu_dirs("ferry-bench-qemu-postcopy")?;
    let vcpus = q.params.vcpus;
    let mut qc = QemuConfig::new(q.size);
    qc.qmp = true;
    let mut src = QemuGuest::boot(&qc, &q.params, &src_dir).map_err(qemu)?;
    src.wait_for("every vCPU's first progress line", BOOT_TIMEOUT, |lines| {
        (0..vcpus).all(|v| first_gap(lines, v).is_some())
    })
    .map_err(qemu)?;
    let mut dst_config = qc.clone();
    dst_config.incoming = Some("defer".into());
    let mut dst = QemuGuest::boot(&dst_config, &q.params, &dst_dir).map_err(qemu)?;
    let caps = json!([
        { "capability": "postcopy-ram", "state": true },
        { "capability": "postcopy-preempt", "state": true },
    ]);
    for g in [&src, &dst] {
        let mut qmp = g.qmp().map_err(qemu)?;
        qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .map_err(qemu)?;
        qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 1u64 << 40 }),
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
    let mut sq = src.qmp().map_err(qemu)?;
    sq.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .map_err(qemu)?;
    let deadline = Instant::now() + run_timeout(q.size);
    let mut switched = false;
    let done = loop {
        let r = sq.execute("query-migrate", json!({})).map_err(qemu)?;
        let status = r["status"].as_str().unwrap_or("");
        match status {
            "completed" => break r,
            "failed" | "cancelled" => {
                return Err(BenchError::QemuLive {
                    case: label.to_string(),
                    why: format!("the migration ended {r}"),
                })
            }
            _ => {}
        }
        let syncs = r["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        if !switched && status == "active" && syncs > q.postcopy_after {
            sq.execute("migrate-start-postcopy", json!({}))
                .map_err(qemu)?;
            switched = true;
        }
        if Instant::now() >= deadline {
            return Err(BenchError::QemuLive {
                case: label.to_string(),
                why: format!("not completed in time: {r}"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let postcopy_seen = done["postcopy-requests"].as_u64();
    // The guest's own view of the switch: each vCPU's first progress line
    // on the destination spans it.
    let lines = dst
        .wait_for(
            "a progress line from each vCPU on the destination",
            Duration::from_secs(30),
            |lines| (0..vcpus).all(|v| first_gap(lines, v).is_some()),
        )
        .map_err(qemu)?;
    let blackout_us = (0..vcpus).filter_map(|v| first_gap(&lines, v)).max();
    drop((src, dst));
    let ms = |key: &str| done[key].as_f64().unwrap_or(f64::NAN);
    Ok(PostcopySample {
        total_s: ms("total-time") / 1e3,
        downtime_ms: ms("downtime"),
        passes: done["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
        requests: postcopy_seen.map(|r| r as f64),
        detail: json!({
            "query_migrate": done,
            "switched": switched,
            "guest_blackout_us": blackout_us,
        }),
        ..Default::default()
    })
}

/// vCPU `v`'s first progress line's TSC gap (µs), once it printed one.
fn first_gap(lines: &[PortLine], v: usize) -> Option<u64> {
    lines.iter().find_map(|l| match l {
        PortLine::Progress(p) if p.vcpu == v => Some(p.gap_us.unwrap_or(0)),
        _ => None,
    })
}
