//! The guest program's PVH ELF under QEMU (`-kernel guest.elf -append
//! ...`, firmware qboot): every vCPU boots (the BSP starts the APs with
//! INIT/SIPI), writes at the rate its command line gives and reports
//! progress with a clean self-check and its largest TSC gap through the
//! debugcon port; QEMU migrates it to another QEMU, where it runs on clean;
//! a bad parameter is refused with a `fatal` line. Each test
//! skips (with a message) where /dev/kvm or qemu-system-x86_64 is missing.

use std::time::Duration;

use ferry_vmm::layout::{STATUS, STATUS_SHIFT, S_WRITES};
use ferry_vmm::{
    host_tsc_khz, qemu_usable, BootParams, PortLine, QemuConfig, QemuError, QemuGuest, WritePattern,
};

const MIB: u64 = 1 << 20;

fn qemu_or_skip(test: &str, config: &QemuConfig) -> bool {
    match qemu_usable(config) {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: SKIPPED: {why}");
            false
        }
    }
}

fn scratch(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-vmm-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_pvh_elf_boots_under_qemu_and_reports_a_clean_self_check() {
    let test = "the_pvh_elf_boots_under_qemu_and_reports_a_clean_self_check";
    let config = QemuConfig::new(32 * MIB);
    if !qemu_or_skip(test, &config) {
        return;
    }
    let tsc_khz = host_tsc_khz().unwrap();
    let params = BootParams {
        vcpus: 2,
        rate: 4 * MIB,
        pattern: WritePattern::Random,
        seed: 9,
        tsc_khz: Some(tsc_khz),
        report_ms: Some(200),
        zeroed: false,
    };
    let dir = scratch("boot");
    let mut q = QemuGuest::boot(&config, &params, &dir).unwrap();
    // Three progress lines from each vCPU, its writes going up.
    let lines = q
        .wait_for(
            "three progress lines from each vCPU",
            Duration::from_secs(120),
            |lines| {
                (0..2).all(|v| {
                    lines
                        .iter()
                        .filter(|l| matches!(l, PortLine::Progress(p) if p.vcpu == v))
                        .count()
                        >= 3
                })
            },
        )
        .unwrap();
    for v in 0..2 {
        assert!(
            lines.contains(&PortLine::Boot { vcpu: v }),
            "vCPU {v} booted: {lines:?}"
        );
        let ps: Vec<_> = lines
            .iter()
            .filter_map(|l| match l {
                PortLine::Progress(p) if p.vcpu == v => Some(*p),
                _ => None,
            })
            .collect();
        assert!(
            ps.windows(2).all(|w| w[1].writes > w[0].writes),
            "vCPU {v}'s writes advance: {ps:?}"
        );
        let last = ps.last().unwrap();
        assert_eq!(last.errors, 0, "vCPU {v}: clean self-check");
        assert!(last.verified > 0);
        assert!(last.max_gap_ticks > 0);
        let us = last.max_gap_us.expect("maxgap_us with tsc_khz");
        assert_eq!(us, last.max_gap_ticks * 1000 / u64::from(tsc_khz));
        eprintln!(
            "QEMU vCPU {v}: {} writes, {} verified, largest TSC gap {us} µs",
            last.writes, last.verified
        );
    }
    assert!(
        !lines.iter().any(|l| matches!(l, PortLine::Error { .. })),
        "{lines:?}"
    );
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_parameter_is_refused_with_a_fatal_line_under_qemu() {
    let test = "a_bad_parameter_is_refused_with_a_fatal_line_under_qemu";
    let config = QemuConfig::new(16 * MIB);
    if !qemu_or_skip(test, &config) {
        return;
    }
    let params = BootParams {
        vcpus: 1,
        rate: 4 * MIB,
        pattern: WritePattern::Sequential,
        seed: 1,
        tsc_khz: None,
        report_ms: None,
        zeroed: false,
    };
    let dir = scratch("fatal");
    let mut q = QemuGuest::boot(&config, &params, &dir).unwrap();
    match q.wait_for("the fatal line", Duration::from_secs(60), |_| false) {
        Err(QemuError::Fatal(why)) => assert_eq!(why, "rate= needs tsc_khz="),
        other => panic!("expected the guest to refuse rate= without tsc_khz=: {other:?}"),
    }
    drop(q);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each vCPU's progress lines, in order.
fn progress_of(lines: &[PortLine], vcpu: usize) -> Vec<ferry_vmm::Progress> {
    lines
        .iter()
        .filter_map(|l| match l {
            PortLine::Progress(p) if p.vcpu == vcpu => Some(*p),
            _ => None,
        })
        .collect()
}

/// QEMU-to-QEMU, the peer of issue #15's live race: the same ELF migrates
/// over loopback TCP, and on the destination every vCPU writes on past
/// where the source stopped, its self-check clean.
#[test]
fn qemu_migrates_the_pvh_guest_to_another_qemu_and_it_runs_on_clean() {
    let test = "qemu_migrates_the_pvh_guest_to_another_qemu_and_it_runs_on_clean";
    let mut config = QemuConfig::new(32 * MIB);
    if !qemu_or_skip(test, &config) {
        return;
    }
    let params = BootParams {
        vcpus: 2,
        rate: 4 * MIB,
        pattern: WritePattern::Hotset(50),
        seed: 3,
        tsc_khz: Some(host_tsc_khz().unwrap()),
        report_ms: Some(200),
        zeroed: false,
    };
    config.qmp = true;
    let (src_dir, dst_dir) = (scratch("mig-src"), scratch("mig-dst"));
    let mut src = QemuGuest::boot(&config, &params, &src_dir).unwrap();
    src.wait_for(
        "two progress lines from each vCPU",
        Duration::from_secs(120),
        |lines| (0..2).all(|v| progress_of(lines, v).len() >= 2),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dst_config = config.clone();
    dst_config.incoming = Some(uri.clone());
    let mut dst = QemuGuest::boot(&dst_config, &params, &dst_dir).unwrap();
    // The destination listens once its QMP socket answers.
    dst.qmp().unwrap();
    let done = src.migrate(&uri, Duration::from_secs(120)).unwrap();
    // Where each vCPU stopped: its status block in the (paused) source.
    let stopped: Vec<u64> = (0..2)
        .map(|v| {
            src.read_phys_u64(STATUS + ((v as u64) << STATUS_SHIFT) + S_WRITES)
                .unwrap()
        })
        .collect();
    for v in 0..2 {
        let last_line = progress_of(&src.lines(), v).last().unwrap().writes;
        assert!(
            stopped[v] >= last_line,
            "vCPU {v}: {stopped:?}, {last_line}"
        );
    }
    let lines = dst
        .wait_for(
            "each vCPU's progress past the source's on the destination",
            Duration::from_secs(120),
            |lines| {
                (0..2).all(|v| {
                    progress_of(lines, v)
                        .last()
                        .is_some_and(|p| p.writes > stopped[v])
                })
            },
        )
        .unwrap();
    for (v, at) in stopped.iter().enumerate() {
        let ps = progress_of(&lines, v);
        let p = *ps.last().unwrap();
        assert_eq!(p.errors, 0, "vCPU {v} on the destination: {p:?}");
        eprintln!(
            "QEMU to QEMU: vCPU {v} stopped at {at} writes, {} on the destination; TSC gap: largest {:?} µs, across the switchover (its first line here) {:?} µs",
            p.writes, p.max_gap_us, ps[0].gap_us
        );
    }
    assert!(
        !lines.iter().any(|l| matches!(l, PortLine::Error { .. })),
        "{lines:?}"
    );
    eprintln!(
        "QEMU: total-time {} ms, downtime {} ms, {} bytes",
        done["total-time"], done["downtime"], done["ram"]["transferred"]
    );
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&src_dir);
    let _ = std::fs::remove_dir_all(&dst_dir);
}
