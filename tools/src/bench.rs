//! `ferry bench`: ferry against its peers on this machine, in one run; with
//! `--live`, live precopy of a guest that keeps writing.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferry_bench::{
    run as run_bench, run_live, run_postcopy, BenchConfig, LiveGuest, LiveOptions, PostcopyOptions,
};

use crate::units::{parse_millis, parse_size};

/// Measure migration bandwidth: ferry (sender and receiver as two processes
/// over loopback) for each channel count, with QEMU 10 multifd and iperf3 on
/// the same dataset and link side by side when asked.
///
/// Reports medians of --runs runs: wall time from starting `send` until the
/// receiver holds every page (digests checked on both sides), GB/s of guest
/// RAM and on the wire, CPU% of both processes, each side's CPU cost in
/// core-seconds per GiB of guest RAM (from its own rusage), and ratios
/// against the peers.
///
/// With --live: live precopy instead. A synthetic guest of --size (default
/// 1G) whose --vcpus threads write --dirty-rate bytes a second in
/// --dirty-pattern is sent with `ferry send --guest synthetic
/// --downtime-limit D` into `ferry recv`, two processes over loopback, once
/// per dirty tracker (--dirty-tracker) and channel count (default 2). The
/// report gives, per case, the median and range (min-max) over --runs runs
/// of the total time (migration start until the destination's guest runs),
/// the downtime (the source's, from pausing the guest until the destination
/// runs it; the destination's switchover digest off, so as a user gets it),
/// the passes and the bytes on the wire. Each run also makes one
/// verification migration per tracker with the destination's switchover
/// digest on: both sides' digests of memory and device state at switchover
/// must be equal, else the bench fails naming both. A tracker this kernel
/// lacks is skipped with a note. Memory warming and the rotating order of
/// the migrations apply as for the bandwidth cases; --tcp-congestion is set
/// on ferry's own sockets only (no other tool runs, so the system's is left
/// as it is).
///
/// With --live --guest kvm: ferry's KVM micro-VM instead (`ferry send
/// --guest kvm`, tracker kvm-log by default), `ferry recv --run-after`
/// --run-after: the report adds the blackout the guest saw in its own TSC
/// and the rate it wrote at, and its self-check must be clean. --peer qemu
/// then also runs the same guest program with the same parameters under
/// QEMU, migrated QEMU to QEMU with multifd, the same channels, downtime
/// limit and --auto-converge; the report gives ferry/QEMU for total time and
/// blackout, and --tcp-congestion becomes the system's for the measurement.
#[derive(Args)]
pub struct BenchArgs {
    /// The ferry binary whose `send` and `recv` are measured (default: this
    /// one), e.g. an older build for a before/after comparison under the
    /// same harness.
    #[arg(long, value_name = "PATH")]
    ferry_exe: Option<std::path::PathBuf>,
    /// Guest RAM size: a `mixed` dataset of this size is generated in
    /// --workdir (default 2G); with --live, the synthetic guest's memory
    /// (default 1G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Channel counts to measure, comma separated (default 1,2,4; with
    /// --live, 2).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<u16>,
    /// Runs per case; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Peers to measure alongside, comma separated: `qemu` (QEMU >= 9 multifd, needs /dev/kvm),
    /// `iperf3` (loopback, -P K), `plain` (with --tls-dir or --compress: ferry without them, in
    /// the same runs), `floor` (the least work any migration does here: K streams splice the
    /// dataset's non-zero pages into fresh anonymous memory, two processes, digests compared),
    /// `no-checksum` (ferry with `send --no-checksum`, in the same runs: what the page
    /// checksums cost).
    #[arg(long, value_delimiter = ',')]
    peer: Vec<String>,
    /// Use this dataset file instead of generating one.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Seed of the generated dataset (with --live, of the synthetic guest's
    /// memory and writes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to generate the dataset (tmpfs keeps the disk out of the measurement).
    #[arg(long, default_value = "/dev/shm")]
    workdir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also draw the results as an SVG plot to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Do not warm memory before each run. By default the harness touches
    /// and releases memory just before every run (ferry's and QEMU's alike)
    /// so that each destination starts from memory the host has backed; in
    /// a VM that backs memory lazily, cold first touches otherwise dominate.
    #[arg(long)]
    cold_memory: bool,
    /// Leave the VM's free page reporting on. By default, while memory is
    /// warmed, the harness pauses it (root; restored after): it hands the
    /// warmed memory back to the host a few seconds later, and each such
    /// wave stalls the whole VM for tens of milliseconds.
    #[arg(long)]
    keep_page_reporting: bool,
    /// TCP congestion control for every tool, or `system` to leave the
    /// system's as it is. QEMU cannot choose its own, so the bench makes
    /// this the system's for the whole measurement (as root) and puts the
    /// old one back after; the report says which was used. With --live,
    /// only ferry runs: its own sockets get it and the system's is left as
    /// it is.
    #[arg(long, default_value = "cubic")]
    tcp_congestion: String,
    /// Pass `--send-path PATH` to `ferry send` (splice, copy or zero-copy).
    #[arg(long)]
    send_path: Option<String>,
    /// Pass --no-checksum to `ferry send`.
    #[arg(long)]
    no_checksum: bool,
    /// TLS on every channel: ferry gets `--tls-dir DIR` on both ends, QEMU
    /// the same directory as its tls-creds-x509 (make one with
    /// `ferry certs --out DIR --host localhost 127.0.0.1`).
    #[arg(long)]
    tls_dir: Option<std::path::PathBuf>,
    /// Compress: `zstd[:LEVEL]` for ferry, and QEMU's multifd zstd at the
    /// same level (QEMU's levels start at 0).
    #[arg(long, default_value = "none", value_parser = crate::units::parse_compress)]
    compress: crate::units::Compress,
    /// Measure live precopy of a guest that keeps writing its memory (see
    /// above) instead of the bandwidth of an image guest.
    #[arg(long)]
    live: bool,
    /// With --live: the guest migrated (synthetic: writer threads; kvm:
    /// ferry's KVM micro-VM; both seeded from --seed).
    #[arg(long, value_enum, default_value_t = LiveGuestArg::Synthetic, requires = "live")]
    guest: LiveGuestArg,
    /// With --live: bytes a second all vCPUs dirty together, one 4 KiB page
    /// a write, e.g. 256M/s (the `/s` is optional).
    #[arg(long, default_value = "256M/s", value_parser = parse_rate, requires = "live")]
    dirty_rate: u64,
    /// With --live: where the vCPUs write: random, sequential, or
    /// hotset:PCT (only the first PCT% of memory).
    #[arg(long, default_value = "hotset:25", requires = "live")]
    dirty_pattern: String,
    /// With --live: dirty trackers, comma separated, one case each: bitmap
    /// (the guest marks an atomic bitmap), uffd (the kernel's userfaultfd
    /// write-protect, Linux 6.7+). One this kernel lacks is skipped with a
    /// note in the report. The KVM guest has kvm-log and kvm-ring. Default:
    /// bitmap,uffd for the synthetic guest, kvm-log for the KVM guest.
    #[arg(long, value_delimiter = ',', requires = "live")]
    dirty_tracker: Vec<String>,
    /// With --live: the guest's vCPUs (writer threads).
    #[arg(long, default_value_t = 2, requires = "live")]
    vcpus: u16,
    /// With --live: `ferry send --downtime-limit`, the longest pause the
    /// source plans for the final pass (30ms, 0.3s; a bare number is
    /// milliseconds).
    #[arg(long, default_value = "30ms", value_parser = parse_millis, requires = "live")]
    downtime_limit: Duration,
    /// With --live: `ferry send --auto-converge`, and QEMU's auto-converge
    /// capability with --peer qemu.
    #[arg(long, requires = "live")]
    auto_converge: bool,
    /// With --live --guest kvm: how long the guest runs on the destination
    /// before it reports (`ferry recv --run-after`; 2s, a bare number is
    /// seconds).
    #[arg(long, default_value = "2s", value_parser = crate::units::parse_secs, requires = "live")]
    run_after: Duration,
    /// Measure postcopy (issue #13's case) instead: a synthetic guest of
    /// --size (default 1G) whose 2 vCPUs write 1 GiB/s at random pages is
    /// sent with `ferry send
    /// --postcopy --postcopy-after N` into `ferry recv`, two processes over
    /// loopback, K channels (default 2); each run alternates that with the
    /// same plus `--no-postcopy-preempt` (skipped with a note when this
    /// ferry's `send` lacks the flag), a precopy of the same guest idle
    /// (`--dirty-rate 0`), and an in-process postcopy whose destination
    /// memory must pass the replay check. The report gives medians and
    /// ranges of total time, downtime, fault latency p50/p99/max, requests
    /// and the guest's blocked time, the replay checks equal, and total
    /// over the idle precopy's. --peer qemu adds QEMU 10's postcopy of the
    /// KVM micro-VM with the same size, vCPUs, rate and pattern
    /// (postcopy-ram, postcopy-preempt; QEMU 10.0 refuses multifd with postcopy; migrate-start-postcopy
    /// after the same passes), or says why it cannot run here.
    #[arg(long, conflicts_with = "live")]
    postcopy: bool,
    /// With --postcopy: precopy passes before the switch (0: switch before
    /// the first; QEMU then gets migrate-start-postcopy at once).
    #[arg(long, default_value_t = 1, requires = "postcopy", value_name = "N")]
    postcopy_after: u64,
    /// With --postcopy: skip the in-process replay-check migration.
    #[arg(long, requires = "postcopy")]
    no_replay_check: bool,
}

/// The guest `ferry bench --live` migrates.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LiveGuestArg {
    /// `ferry send --guest synthetic`: vCPU threads writing memory.
    Synthetic,
    /// `ferry send --guest kvm`: ferry's KVM micro-VM (needs /dev/kvm).
    Kvm,
}

impl From<LiveGuestArg> for LiveGuest {
    fn from(g: LiveGuestArg) -> Self {
        match g {
            LiveGuestArg::Synthetic => LiveGuest::Synthetic,
            LiveGuestArg::Kvm => LiveGuest::Kvm,
        }
    }
}

/// A rate in bytes a second: a size (4096, 64M, 1G) with an optional `/s`.
fn parse_rate(s: &str) -> Result<u64, String> {
    parse_size(s.trim().strip_suffix("/s").unwrap_or(s))
}

pub fn run(a: BenchArgs) -> anyhow::Result<bool> {
    for p in &a.peer {
        anyhow::ensure!(
            ["qemu", "iperf3", "plain", "floor", "no-checksum"].contains(&p.as_str()),
            "unknown peer '{p}' (expected qemu, iperf3, plain, floor or no-checksum)"
        );
    }
    let mut send_args = Vec::new();
    if let Some(p) = &a.send_path {
        send_args.extend(["--send-path".to_string(), p.clone()]);
    }
    if a.no_checksum {
        send_args.push("--no-checksum".to_string());
    }
    let config = BenchConfig {
        ferry_exe: match &a.ferry_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("locating the ferry binary")?,
        },
        size: a.size.unwrap_or(if a.live || a.postcopy {
            1 << 30
        } else {
            2 << 30
        }),
        channels: match (a.channels.is_empty(), a.live || a.postcopy) {
            (false, _) => a.channels.clone(),
            (true, false) => vec![1, 2, 4],
            (true, true) => vec![2],
        },
        runs: a.runs.max(1),
        peer_qemu: a.peer.iter().any(|p| p == "qemu"),
        peer_iperf: a.peer.iter().any(|p| p == "iperf3"),
        peer_plain: a.peer.iter().any(|p| p == "plain"),
        peer_floor: a.peer.iter().any(|p| p == "floor"),
        peer_no_checksum: a.peer.iter().any(|p| p == "no-checksum"),
        dataset: a.dataset.clone(),
        seed: a.seed,
        workdir: a.workdir.clone(),
        send_args,
        warm_memory: !a.cold_memory,
        keep_page_reporting: a.keep_page_reporting,
        congestion: crate::units::congestion(&a.tcp_congestion),
        tls_dir: a.tls_dir.clone(),
        zstd_level: a.compress.0,
    };
    // A plot that cannot be written fails now, not after the whole run.
    if let Some(p) = &a.plot {
        crate::output::check_output_path(p)?;
    }
    if a.postcopy {
        anyhow::ensure!(
            a.plot.is_none(),
            "--plot draws the bandwidth cases; --postcopy reports as a table or --json"
        );
        // The case: 2 vCPUs writing 1 GiB/s at random.
        let pc = PostcopyOptions {
            postcopy_after: a.postcopy_after,
            replay_check: !a.no_replay_check,
            ..PostcopyOptions::default()
        };
        let report = run_postcopy(&config, &pc, &mut |line| eprintln!("ferry bench: {line}"))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            println!("{}", report.table());
        }
        return Ok(true);
    }
    if a.live {
        anyhow::ensure!(
            a.plot.is_none(),
            "--plot draws the bandwidth cases; --live reports as a table or --json"
        );
        let guest: LiveGuest = a.guest.into();
        let trackers = if !a.dirty_tracker.is_empty() {
            a.dirty_tracker.clone()
        } else if guest == LiveGuest::Kvm {
            vec!["kvm-log".into()]
        } else {
            vec!["bitmap".into(), "uffd".into()]
        };
        let live = LiveOptions {
            guest,
            vcpus: a.vcpus,
            dirty_rate: a.dirty_rate,
            dirty_pattern: a.dirty_pattern.clone(),
            trackers,
            downtime_limit: a.downtime_limit,
            auto_converge: a.auto_converge,
            run_after: a.run_after,
        };
        let report = run_live(&config, &live, &mut |line| eprintln!("ferry bench: {line}"))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
        } else {
            println!("{}", report.table());
        }
        return Ok(true);
    }
    let report = run_bench(&config, &mut |line| eprintln!("ferry bench: {line}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        println!("{}", report.table());
    }
    if let Some(p) = &a.plot {
        report
            .plot_svg(p)
            .with_context(|| format!("writing plot {}", p.display()))?;
        eprintln!("ferry bench: plot written to {}", p.display());
    }
    Ok(true)
}
