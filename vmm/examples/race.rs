//! A first look at issue #15's live race (the full one belongs in `ferry
//! bench --live --peer qemu`): the same guest program at the same size,
//! vCPUs and write rate, migrated over loopback TCP with 2 channels and the
//! same downtime limit, by ferry (in process: `migrate_out` into
//! `migrate_in`, which builds a fresh ferry-vmm VM) and by QEMU (QEMU to
//! QEMU, multifd with 2 channels, firmware qboot). Each run prints the
//! total time and downtime as each tool reports them, the blackout as the
//! guest saw it (the largest TSC gap in each vCPU's first progress line on
//! the destination, lines every 100 ms) and the bytes sent; medians last.
//!
//! `cargo run --release -p ferry-vmm --example race [MIB [VCPUS [RATE_MIB_S [RUNS]]]]`
//! (default: 64 MiB, 2 vCPUs, 16 MiB/s random writes, 5 runs).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::{
    migrate_in, migrate_out, Guest, IncomingOptions, Listener, OutgoingOptions, Parameters,
    Progress, Resources, SocketTuning,
};
use ferry_vmm::{
    host_tsc_khz, BootParams, DirtyTracker, KvmGuest, PortLine, QemuConfig, QemuGuest,
    SharedKvmGuest, VmConfig, WritePattern,
};
use serde_json::json;

const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
const REPORT_MS: u64 = 100;

#[derive(Debug, Clone, Copy)]
struct Run {
    total_ms: f64,
    downtime_ms: f64,
    blackout_ms: f64,
    bytes: u64,
}

fn main() {
    let arg = |i: usize, d: u64| {
        std::env::args()
            .nth(i)
            .map_or(d, |s| s.parse().expect("a number"))
    };
    let (mib, vcpus, rate, runs) = (arg(1, 64), arg(2, 2) as usize, arg(3, 16), arg(4, 5));
    let config = VmConfig {
        memory: mib << 20,
        vcpus,
        dirty_rate: rate << 20,
        pattern: WritePattern::Random,
        seed: 42,
        tracker: DirtyTracker::default(),
    };
    let tsc_khz = host_tsc_khz().expect("/dev/kvm");
    let params = BootParams {
        report_ms: Some(REPORT_MS),
        ..BootParams::of(&config, tsc_khz)
    };
    println!(
        "guest {mib} MiB, {vcpus} vCPUs, {rate} MiB/s random writes; 2 channels, downtime limit {} ms; {runs} runs each",
        DOWNTIME_LIMIT.as_millis()
    );
    let (mut ferry_runs, mut qemu_runs) = (Vec::new(), Vec::new());
    for n in 0..runs {
        let f = ferry_run(&config, &params);
        println!("ferry run {n}: {f:?}");
        ferry_runs.push(f);
        let q = qemu_run(&config, &params);
        println!("QEMU  run {n}: {q:?}");
        qemu_runs.push(q);
    }
    for (who, r) in [("ferry", &ferry_runs), ("QEMU", &qemu_runs)] {
        let med = |f: fn(&Run) -> f64| {
            let mut v: Vec<f64> = r.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{who:<5} medians: total {:.0} ms, downtime {:.1} ms, guest-seen blackout {:.1} ms, {:.1} MiB sent",
            med(|r| r.total_ms),
            med(|r| r.downtime_ms),
            med(|r| r.blackout_ms),
            med(|r| r.bytes as f64) / 1048576.0
        );
    }
}

/// The largest `gap_us` of each vCPU's first progress line, in ms.
fn first_gaps_ms(first: &[Option<ferry_vmm::Progress>]) -> f64 {
    first
        .iter()
        .map(|p| p.and_then(|p| p.gap_us).expect("a first line with gap_us"))
        .max()
        .unwrap_or(0) as f64
        / 1000.0
}

fn ferry_run(config: &VmConfig, params: &BootParams) -> Run {
    let src = KvmGuest::boot_with(config, Some(params), Resources::none(true)).unwrap();
    src.wait_booted(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let listener =
        Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default()).unwrap();
    let uri = listener.uri().clone();
    let built: Arc<Mutex<Option<Arc<KvmGuest>>>> = Arc::default();
    let slot = built.clone();
    let incoming = IncomingOptions {
        build_guest: Arc::new(move |memory, state| {
            let g = Arc::new(KvmGuest::from_state(memory, state, Resources::none(false))?);
            *slot.lock().unwrap() = Some(g.clone());
            Ok(Box::new(SharedKvmGuest(g)) as Box<dyn Guest>)
        }),
        ..Default::default()
    };
    let dst = std::thread::spawn(move || {
        migrate_in(&listener, &incoming, &Progress::default()).map_err(|e| e.to_string())
    });
    let progress = Progress::with_parameters(Parameters {
        downtime_limit: DOWNTIME_LIMIT,
        ..Default::default()
    });
    let sent = migrate_out(&src, &uri, &OutgoingOptions::default(), &progress).unwrap();
    let got = dst.join().unwrap().unwrap();
    let vm = built.lock().unwrap().clone().unwrap();
    // Each vCPU's first line here.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = vec![None; config.vcpus];
    while first.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "no progress line on the destination"
        );
        for (slot, p) in first.iter_mut().zip(vm.vm().progress()) {
            if slot.is_none() {
                *slot = p;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let errors: u64 = vm.statuses().unwrap().iter().map(|s| s.errors).sum();
    assert_eq!(errors, 0, "ferry: the self-check failed on the destination");
    got.guest.pause().unwrap();
    Run {
        total_ms: sent.seconds * 1000.0,
        downtime_ms: sent.downtime_ms.unwrap_or(f64::NAN),
        blackout_ms: first_gaps_ms(&first),
        bytes: sent.wire_bytes,
    }
}

fn qemu_run(config: &VmConfig, params: &BootParams) -> Run {
    let dir = std::env::temp_dir().join(format!("ferry-race-{}", std::process::id()));
    let (src_dir, dst_dir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&src_dir).unwrap();
    std::fs::create_dir_all(&dst_dir).unwrap();
    let mut qc = QemuConfig::new(config.memory);
    qc.qmp = true;
    let params = BootParams {
        zeroed: false,
        ..params.clone()
    };
    let mut src = QemuGuest::boot(&qc, &params, &src_dir).unwrap();
    src.wait_for("boot", Duration::from_secs(120), |lines| {
        lines
            .iter()
            .filter(|l| matches!(l, PortLine::Progress(_)))
            .count()
            >= config.vcpus
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let mut dst_config = qc.clone();
    dst_config.incoming = Some("defer".into());
    let mut dst = QemuGuest::boot(&dst_config, &params, &dst_dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    for q in [&src, &dst] {
        let mut qmp = q.qmp().unwrap();
        qmp.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
        )
        .unwrap();
        qmp.execute(
            "migrate-set-parameters",
            json!({ "multifd-channels": 2, "downtime-limit": DOWNTIME_LIMIT.as_millis() as u64 }),
        )
        .unwrap();
    }
    dst.qmp()
        .unwrap()
        .execute("migrate-incoming", json!({ "uri": uri }))
        .unwrap();
    let done = src.migrate(&uri, Duration::from_secs(120)).unwrap();
    let lines = dst
        .wait_for(
            "a first line from each vCPU",
            Duration::from_secs(30),
            |lines| {
                (0..config.vcpus).all(|v| {
                    lines
                        .iter()
                        .any(|l| matches!(l, PortLine::Progress(p) if p.vcpu == v))
                })
            },
        )
        .unwrap();
    let first: Vec<_> = (0..config.vcpus)
        .map(|v| {
            lines.iter().find_map(|l| match l {
                PortLine::Progress(p) if p.vcpu == v => Some(*p),
                _ => None,
            })
        })
        .collect();
    assert!(
        first.iter().all(|p| p.is_some_and(|p| p.errors == 0)),
        "QEMU: the self-check failed on the destination"
    );
    drop((src, dst));
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        total_ms: done["total-time"].as_f64().unwrap_or(f64::NAN),
        downtime_ms: done["downtime"].as_f64().unwrap_or(f64::NAN),
        blackout_ms: first_gaps_ms(&first),
        bytes: done["ram"]["transferred"].as_u64().unwrap_or(0),
    }
}
