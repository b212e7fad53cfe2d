//! `ferry bench`: ferry against its peers on this machine, in one run.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use ferry_bench::{run as run_bench, BenchConfig};

use crate::units::parse_size;

/// Measure migration bandwidth: ferry (sender and receiver as two processes
/// over loopback) for each channel count, with QEMU 10 multifd and iperf3 on
/// the same dataset and link side by side when asked.
///
/// Reports medians of --runs runs: wall time from starting `send` until the
/// receiver holds every page (digests checked on both sides), GB/s of guest
/// RAM and on the wire, CPU% of both processes, each side's CPU cost in
/// core-seconds per GiB of guest RAM (from its own rusage), and ratios
/// against the peers.
#[derive(Args)]
pub struct BenchArgs {
    /// The ferry binary whose `send` and `recv` are measured (default: this
    /// one), e.g. an older build for a before/after comparison under the
    /// same harness.
    #[arg(long, value_name = "PATH")]
    ferry_exe: Option<std::path::PathBuf>,
    /// Guest RAM size (a `mixed` dataset of this size is generated in --workdir).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// Channel counts to measure, comma separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    channels: Vec<u16>,
    /// Runs per case; the report gives medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Peers to measure alongside, comma separated: `qemu` (QEMU >= 9 multifd, needs /dev/kvm),
    /// `iperf3` (loopback, -P K), `plain` (with --tls-dir or --compress: ferry without them, in
    /// the same runs), `floor` (the least work any migration does here: K streams splice the
    /// dataset's non-zero pages into fresh anonymous memory, two processes, digests compared).
    #[arg(long, value_delimiter = ',')]
    peer: Vec<String>,
    /// Use this dataset file instead of generating one.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Seed of the generated dataset.
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
    /// TCP congestion control for every tool, or `system` to leave the
    /// system's as it is. QEMU cannot choose its own, so the bench makes
    /// this the system's for the whole measurement (as root) and puts the
    /// old one back after; the report says which was used.
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
}

pub fn run(a: BenchArgs) -> anyhow::Result<bool> {
    for p in &a.peer {
        anyhow::ensure!(
            ["qemu", "iperf3", "plain", "floor"].contains(&p.as_str()),
            "unknown peer '{p}' (expected qemu, iperf3, plain or floor)"
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
        size: a.size,
        channels: a.channels.clone(),
        runs: a.runs.max(1),
        peer_qemu: a.peer.iter().any(|p| p == "qemu"),
        peer_iperf: a.peer.iter().any(|p| p == "iperf3"),
        peer_plain: a.peer.iter().any(|p| p == "plain"),
        peer_floor: a.peer.iter().any(|p| p == "floor"),
        dataset: a.dataset.clone(),
        seed: a.seed,
        workdir: a.workdir.clone(),
        send_args,
        warm_memory: !a.cold_memory,
        congestion: crate::units::congestion(&a.tcp_congestion),
        tls_dir: a.tls_dir.clone(),
        zstd_level: a.compress.0,
    };
    // A plot that cannot be written fails now, not after the whole run.
    if let Some(p) = &a.plot {
        crate::output::check_output_path(p)?;
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
