//! `ferry send`: migrate a guest — an image guest (a file's bytes as RAM) or
//! a synthetic live guest — to a destination where `ferry recv` listens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use ferry::synthetic::synthetic_memory;
use ferry::{
    migrate_out, ChannelUri, ControlServer, DirtyPattern, Guest, ImageGuest, OutgoingOptions,
    Parameters, Progress, Resources, SendPath, SenderOptions, SocketTuning, SyntheticConfig,
    SyntheticGuest, TlsClient, TrackerKind,
};

use crate::output::{print_summary, EventPrinter, ProgressView};
use crate::units::parse_size;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// RAM is the bytes of --ram; nothing writes it (one pass).
    Image,
    /// --size bytes (seeded from --ram if given) that vCPU threads keep writing.
    Synthetic,
}

/// Migrate a guest to a destination, live.
///
/// Opens a main channel and K multifd channels to the destination, sends
/// the memory layout, then passes of pages while the guest runs (zero pages
/// as offsets only) until what is left fits the downtime limit; then pauses
/// the guest, sends the last dirty pages and the device state, and waits for
/// the destination to run the guest.
#[derive(Args)]
pub struct SendArgs {
    /// File whose bytes are the guest's RAM (e.g. made by `ferry gen`); its
    /// size must be a multiple of 4 KiB. A synthetic guest's memory is
    /// seeded from it.
    #[arg(long)]
    ram: Option<PathBuf>,
    /// Where `ferry recv` listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// What to migrate.
    #[arg(long, value_enum, default_value_t = GuestKind::Image)]
    guest: GuestKind,
    /// Synthetic guest: memory size (default: the size of --ram).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Synthetic guest: writer threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    vcpus: u16,
    /// Synthetic guest: bytes per second all vCPUs dirty together, one
    /// 4 KiB page per write (e.g. 256M).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    dirty_rate: u64,
    /// Synthetic guest: random, sequential, or hotset:PCT (writes only in
    /// the first PCT% of memory).
    #[arg(long, default_value = "random")]
    dirty_pattern: DirtyPattern,
    /// Synthetic guest: bitmap (the writer marks an atomic bitmap) or uffd
    /// (userfaultfd async write-protect read with PAGEMAP_SCAN, Linux 6.7+).
    #[arg(long, default_value = "bitmap")]
    dirty_tracker: TrackerKind,
    /// Synthetic guest: seed of the initial memory (without --ram) and of
    /// the vCPUs' writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest pause of the guest for the final pass, in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Rate limit for the passes in bytes per second (e.g. 500M); 0: none.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    max_bandwidth: u64,
    /// Bandwidth to assume for the switchover decision instead of the
    /// measured one (bytes per second); 0: measured.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    avail_switchover_bandwidth: u64,
    /// Throttle the guest's vCPUs when passes stop shrinking (20%, then
    /// +10% per pass that fails to shrink, up to 99%).
    #[arg(long)]
    auto_converge: bool,
    /// Wait in pre-switchover, guest paused, until `ferry ctl PATH continue`.
    #[arg(long)]
    pause_before_switchover: bool,
    /// Give up (status failed, guest keeps running) after this many passes
    /// without converging; 0: never.
    #[arg(long, default_value_t = 0)]
    max_passes: u64,
    /// Open a control socket (QMP-shaped JSON lines) here; see `ferry ctl`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// A lock file standing for a shared resource (a disk) the guest owns:
    /// held while it runs here, released at switchover, taken back if the
    /// migration fails. Repeatable.
    #[arg(long)]
    lock: Vec<PathBuf>,
    /// Number of parallel multifd channels (one thread and one io_uring each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    /// Print JSON: events as they happen (one object a line), then the
    /// summary object last, instead of text and a progress bar.
    #[arg(long)]
    json: bool,
    /// How packets reach the sockets. `splice`: the socket takes references
    /// to the guest pages through a pipe (vmsplice + splice), the sender
    /// copies nothing. `copy`: io_uring sendmsg, the kernel copies pages into
    /// socket buffers. `zero-copy`: io_uring sendmsg_zc (MSG_ZEROCOPY), pages
    /// pinned until the kernel is done with them; the copies the kernel still
    /// makes are counted and reported (loopback always copies).
    #[arg(long, value_enum, default_value_t = PathArg::Splice)]
    send_path: PathArg,
    /// Shorthand for `--send-path zero-copy`.
    #[arg(long, conflicts_with = "send_path")]
    zero_copy: bool,
    /// Do not compute crc32 checksums over packets (the receiver then cannot
    /// detect corrupted payloads).
    #[arg(long)]
    no_checksum: bool,
    /// Pages per packet, a multiple of 64 (128 pages = 512 KiB of 4 KiB pages).
    #[arg(long, default_value_t = 128)]
    packet_pages: u32,
    /// Packets prepared or in flight per channel.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Image guest: file holding the device state (default: a short text
    /// describing the image).
    #[arg(long)]
    device_state: Option<PathBuf>,
    /// Socket send buffer size (SO_SNDBUF), e.g. 4M; default: kernel autotuning.
    #[arg(long, value_parser = parse_size)]
    socket_buffer: Option<u64>,
    /// TCP congestion control for the migration's sockets, or `system` for
    /// the machine's default. cubic suits loopback and LANs; a pacing
    /// algorithm (bbr) spends CPU on timers there.
    #[arg(long, default_value = "cubic")]
    tcp_congestion: String,
    /// TLS on every channel, with credentials from this directory in QEMU's
    /// layout: ca-cert.pem (the CA the receiver's certificate must be signed
    /// by) and client-cert.pem + client-key.pem (this side's certificate;
    /// without them the receiver refuses us). `ferry certs` makes a set.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// The name the receiver's certificate must be valid for (default: the
    /// host in --to; `localhost` for unix:).
    #[arg(long, requires = "tls_dir")]
    tls_hostname: Option<String>,
    /// Compress each packet's pages: `none`, `zstd` (level 1) or
    /// `zstd:LEVEL` (negative levels are faster, e.g. zstd:-3). A packet
    /// that does not shrink goes raw.
    #[arg(long, default_value = "none", value_parser = crate::units::parse_compress)]
    compress: crate::units::Compress,
}

pub fn run(a: SendArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("send", json, migrate(a))
}

fn build_guest(a: &SendArgs) -> anyhow::Result<Box<dyn Guest>> {
    let resources = Resources::new(&a.lock, true)?;
    match a.guest {
        GuestKind::Image => {
            let ram = a.ram.as_ref().context("an image guest needs --ram FILE")?;
            let device_state = match &a.device_state {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("reading device state {}", p.display()))?,
                ),
                None => None,
            };
            Ok(Box::new(
                ImageGuest::open(ram, device_state)?.with_resources(resources),
            ))
        }
        GuestKind::Synthetic => {
            let size = match (a.size, &a.ram) {
                (Some(s), _) => s,
                (None, Some(p)) => std::fs::metadata(p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .len(),
                (None, None) => anyhow::bail!("a synthetic guest needs --size or --ram"),
            };
            let memory = synthetic_memory(size, a.ram.as_deref(), a.seed)?;
            let config = SyntheticConfig {
                vcpus: a.vcpus,
                dirty_rate: a.dirty_rate,
                pattern: a.dirty_pattern,
                seed: a.seed,
                tracker: a.dirty_tracker,
            };
            Ok(Box::new(SyntheticGuest::start(memory, &config, resources)?))
        }
    }
}

fn migrate(a: SendArgs) -> anyhow::Result<bool> {
    let uri: ChannelUri = a.to.parse()?;
    let guest = build_guest(&a)?;
    let opts = OutgoingOptions {
        channels: a.channels,
        sender: SenderOptions {
            packet_pages: a.packet_pages,
            checksum: !a.no_checksum,
            path: if a.zero_copy {
                SendPath::ZeroCopy
            } else {
                a.send_path.into()
            },
            slots: a.inflight,
            compress: a.compress.0,
        },
        tls: match &a.tls_dir {
            Some(d) => Some(Arc::new(TlsClient::load(d, a.tls_hostname.clone())?)),
            None => None,
        },
        tuning: SocketTuning {
            send_buffer: a.socket_buffer.map(|n| n as usize),
            congestion: crate::units::congestion(&a.tcp_congestion),
            ..Default::default()
        },
        ..Default::default()
    };
    let progress = Arc::new(Progress::with_parameters(Parameters {
        downtime_limit: Duration::from_millis(a.downtime_limit),
        max_bandwidth: a.max_bandwidth,
        avail_switchover_bandwidth: a.avail_switchover_bandwidth,
        auto_converge: a.auto_converge,
        pause_before_switchover: a.pause_before_switchover,
        max_passes: a.max_passes,
        ..Default::default()
    }));
    let control = match &a.control {
        Some(p) => Some(ControlServer::start(p, progress.clone())?),
        None => None,
    };
    let events = a.json.then(|| EventPrinter::start(&progress));
    let view = ProgressView::start(progress.clone(), !a.json);
    let result = migrate_out(&*guest, &uri, &opts, &progress);
    drop(view);
    if let Some(e) = events {
        e.finish();
    }
    drop(control);
    let (mut summary, ok) = match result {
        Ok(s) => (s, true),
        Err(f) => (*f.summary, false),
    };
    if ok {
        summary.digest = Some(guest.memory().digest().to_string());
    }
    print_summary("send", &summary, a.json);
    Ok(ok)
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PathArg {
    Splice,
    Copy,
    ZeroCopy,
}

impl From<PathArg> for SendPath {
    fn from(p: PathArg) -> Self {
        match p {
            PathArg::Splice => SendPath::Splice,
            PathArg::Copy => SendPath::Copy,
            PathArg::ZeroCopy => SendPath::ZeroCopy,
        }
    }
}
