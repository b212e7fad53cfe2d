//! KVM's dirty trackers side by side on the micro-VM: for each tracker
//! this host can run, boot a guest writing at a fixed rate, then sync the
//! log every 100 ms and report the pages each sync found and how long it
//! took (medians and 90th percentiles). A tracker this host cannot run is
//! listed with the reason.
//!
//! `cargo run --release -p ferry-vmm --example trackers [MIB [VCPUS [RATE_MIB_S [SYNCS]]]]`
//! (default: 64 MiB, 2 vCPUs, 64 MiB/s random writes, 30 syncs).

use std::time::{Duration, Instant};

use ferry::{DirtyLog, Guest, PageBitmap, Resources};
use ferry_vmm::{DirtyTracker, KvmGuest, TrackerSupport, VmConfig, WritePattern};

fn main() {
    let arg = |i: usize, d: u64| {
        std::env::args()
            .nth(i)
            .map_or(d, |s| s.parse().expect("a number"))
    };
    let (mib, vcpus, rate, syncs) = (arg(1, 64), arg(2, 2) as usize, arg(3, 64), arg(4, 30));
    let support = TrackerSupport::probe().expect("/dev/kvm");
    println!(
        "guest {mib} MiB, {vcpus} vCPUs, {rate} MiB/s random page writes; {syncs} syncs, 100 ms apart"
    );
    println!("kernel: {support:?}");
    println!(
        "{:<34} {:>11} {:>11} {:>11} {:>11} {:>9}",
        "tracker", "pages med", "pages p90", "sync µs med", "sync µs p90", "ring full"
    );
    for tracker in [
        DirtyTracker::Log {
            manual_protect: false,
        },
        DirtyTracker::Log {
            manual_protect: true,
        },
        DirtyTracker::Ring {
            entries: ferry_vmm::DEFAULT_RING_ENTRIES,
        },
    ] {
        if let Some(why) = support.refuses(tracker) {
            println!("{:<34} not run: {why}", tracker.name());
            continue;
        }
        let g = KvmGuest::boot(
            &VmConfig {
                memory: mib << 20,
                vcpus,
                dirty_rate: rate << 20,
                pattern: WritePattern::Random,
                seed: 7,
                tracker,
            },
            Resources::none(true),
        )
        .expect("boot");
        g.wait_booted(Duration::from_secs(30)).expect("boot");
        let log = g.kvm_dirty_log();
        log.start().unwrap();
        let pass = vec![PageBitmap::new((mib << 20) / 4096, false)];
        let (mut pages, mut micros) = (Vec::new(), Vec::new());
        for _ in 0..syncs {
            std::thread::sleep(Duration::from_millis(100));
            pass[0].clear_all();
            let t = Instant::now();
            let n = log.sync(&pass).expect("sync");
            micros.push(t.elapsed().as_secs_f64() * 1e6);
            pages.push(n as f64);
        }
        g.pause().unwrap();
        let errors: u64 = g.statuses().unwrap().iter().map(|s| s.errors).sum();
        assert_eq!(errors, 0, "the guest's self-check failed");
        println!(
            "{:<34} {:>11.0} {:>11.0} {:>11.0} {:>11.0} {:>9}",
            format!("{} ({})", tracker.name(), short(log.method())),
            pct(&mut pages, 50),
            pct(&mut pages, 90),
            pct(&mut micros, 50),
            pct(&mut micros, 90),
            log.ring_full_exits()
        );
    }
}

fn short(method: &str) -> &'static str {
    if method.contains("CLEAR") {
        "GET+CLEAR"
    } else if method.contains("ring") {
        "ring"
    } else {
        "GET"
    }
}

fn pct(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) * p / 100]
}
