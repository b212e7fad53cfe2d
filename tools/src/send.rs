//! `ferry send`: migrate a guest — an image guest (a file's bytes as RAM), a
//! synthetic live guest or a KVM micro-VM — to a destination where `ferry
//! recv` listens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry::{
    migrate_out, ChannelUri, ControlServer, OutgoingOptions, Parameters, Progress, Resources,
    SendPath, SenderOptions, SocketTuning, TlsClient,
};

use crate::guest_args::GuestArgs;
use crate::output::{print_summary, EventPrinter, ProgressView};
use crate::units::parse_size;

/// Migrate a guest to a destination, live.
///
/// Opens a main channel and K multifd channels to the destination, sends
/// the memory layout, then passes of pages while the guest runs (zero pages
/// as offsets only) until what is left fits the downtime limit; then pauses
/// the guest, sends the last dirty pages and the device state, and waits for
/// the destination to run the guest.
#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Where `ferry recv` listens: tcp:HOST:PORT or unix:PATH. Or
    /// exec:COMMAND: the command runs once per channel (main and each
    /// multifd channel, each through `sh -c`) with its stdin and stdout as
    /// that channel, e.g. `exec:ssh host socat - TCP:localhost:4444`. Or
    /// fd:N,M,...: inherited connected sockets, one per channel, main first.
    #[arg(long)]
    to: String,
    /// Longest pause of the guest for the final pass: 300ms, 1.5s...; a
    /// bare number is milliseconds. Live (synthetic or KVM) guest only.
    #[arg(
        long,
        default_value = "300ms",
        value_parser = crate::units::parse_millis,
        allow_negative_numbers = true
    )]
    downtime_limit: Duration,
    /// Rate limit for the passes in bytes per second, with K/M/G suffixes
    /// in powers of 1024 (e.g. 500M: 500 MiB/s); 0: none.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    max_bandwidth: u64,
    /// Bandwidth to assume for the switchover decision instead of the
    /// measured one, in bytes per second (e.g. 1G); 0: measured.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    avail_switchover_bandwidth: u64,
    /// Throttle the guest's vCPUs when passes stop shrinking (20%, then
    /// +10% per pass that fails to shrink, up to 99%). Live (synthetic or KVM)
    /// guest only.
    #[arg(long)]
    auto_converge: bool,
    /// Wait in pre-switchover, guest paused, until `ferry ctl PATH continue`.
    #[arg(long)]
    pause_before_switchover: bool,
    /// Give up (status failed, guest keeps running) after this many passes
    /// without converging; 0: never. Live (synthetic or KVM) guest only.
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
    /// Verify the switchover: the destination hashes all guest memory and
    /// the device state before its guest runs and compares that with this
    /// side's digest, and both sides say `completed` only if they are
    /// equal. It counts in the downtime (about 80 ms per GiB here). Off by
    /// default (unless `recv --verify-switchover`): the destination then
    /// runs the guest once every page has landed with its checksum checked,
    /// and the summaries say the switchover was not verified. A destination
    /// started with --no-digest refuses a source that asks.
    #[arg(long)]
    verify_switchover: bool,
    /// Pages per packet, a multiple of 64 (128 pages = 512 KiB of 4 KiB pages),
    /// at most 4096; at most 960 when sending with io_uring sendmsg (copy or
    /// zero-copy, and compressed packets), whose calls take 1024 iovecs.
    #[arg(long, default_value_t = 128)]
    packet_pages: u32,
    /// Packets prepared or in flight per channel.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Socket send buffer size (SO_SNDBUF), e.g. 4M (the kernel caps it
    /// at net.core.wmem_max); default: kernel autotuning.
    #[arg(long, value_parser = parse_size)]
    socket_buffer: Option<u64>,
    /// TCP congestion control for the migration's sockets, or `system` (the
    /// default) for the machine's. On loopback and LANs `cubic` is much
    /// faster than a pacing algorithm such as bbr (2 GiB, 2 channels,
    /// loopback: 0.38 s with cubic, 0.65 s with bbr); over a long, lossy
    /// path bbr may win.
    #[arg(long, default_value = "system")]
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
    #[command(flatten)]
    peer: crate::peer::PeerArgs,
    /// Allow postcopy (announced to the destination, which must be able to
    /// register its memory with userfaultfd): the guest moves to the
    /// destination at once and the pages it still lacks follow, asked for
    /// on demand over a preempt channel and pushed over K more. The switch
    /// comes on `ferry ctl SOCK start-postcopy`, after --postcopy-after
    /// passes, or when precopy does not converge (the dirty bytes left
    /// stop shrinking and exceed what the downtime limit allows). A link
    /// failure after the switch pauses both sides (postcopy-paused; the
    /// guest never resumes here) until `ferry ctl RECV_SOCK recover URI`
    /// and `ferry ctl SEND_SOCK resume URI` reconnect every channel (or
    /// --postcopy-recover auto).
    #[arg(long)]
    postcopy: bool,
    /// With --postcopy: switch after this many precopy passes. 0 switches
    /// before the first pass: the shortest downtime (nothing to sync, no
    /// pass to wait for), every page then follows in postcopy, moved in
    /// whole 2 MiB huge pages where the destination's kernel has
    /// UFFDIO_MOVE (Linux 6.8+; a fault then waits for its whole region).
    /// For a guest that dirties most of its memory in a pass this is also
    /// the fastest to finish.
    #[arg(long, requires = "postcopy", value_name = "N")]
    postcopy_after: Option<u64>,
    /// With --postcopy: answer page requests on the first push channel,
    /// behind the background stream, instead of on the preempt channel
    /// (for contrast: the fault latency without preemption).
    #[arg(long, requires = "postcopy")]
    no_postcopy_preempt: bool,
    /// With --postcopy, after a link failure: `manual` waits in
    /// postcopy-paused for `ferry ctl SOCK resume URI`; `auto` reconnects
    /// to --to by itself, retrying with backoff (100 ms doubling to 5 s).
    #[arg(
        long,
        requires = "postcopy",
        default_value = "manual",
        value_name = "MODE"
    )]
    postcopy_recover: ferry::postcopy::RecoverMode,
    /// Serve the migration's figures (those of `ferry ctl SOCK query`) in
    /// Prometheus's text format at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    #[command(flatten)]
    colo: crate::colo::ColoArgs,
}

pub fn run(a: SendArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("send", json, migrate(a))
}

fn migrate(a: SendArgs) -> anyhow::Result<bool> {
    let uri: ChannelUri = a.to.parse()?;
    // The control socket and metrics endpoint come first, so `ferry ctl`
    // finds them while a large guest is still being built.
    let progress = Arc::new(Progress::with_parameters(Parameters {
        downtime_limit: a.downtime_limit,
        max_bandwidth: a.max_bandwidth,
        avail_switchover_bandwidth: a.avail_switchover_bandwidth,
        auto_converge: a.auto_converge,
        pause_before_switchover: a.pause_before_switchover,
        max_passes: a.max_passes,
        ..Default::default()
    }));
    crate::signals::cancel_on_signal(&progress);
    let control = match &a.control {
        Some(p) => Some(ControlServer::start(p, progress.clone())?),
        None => None,
    };
    let metrics = match &a.metrics_listen {
        Some(addr) => Some(ferry::MetricsServer::start(addr, progress.clone())?),
        None => None,
    };
    let resources = Resources::new(&a.lock, true)?;
    // COLO: the synthetic guest (or the KVM guest with --guest kvm), its
    // outputs queued for comparison.
    let (colo, built) = if a.colo.colo {
        let outputs = ferry::colo::OutputQueue::new();
        let g: Box<dyn ferry::Guest> = match a.guest.guest {
            crate::guest_args::GuestKind::Kvm => {
                let g =
                    crate::kvm::boot_with_output(&a.guest, resources, a.colo.colo_output_every)?;
                g.set_output(Some(outputs.hook()));
                Box::new(g)
            }
            _ => {
                let g = a.guest.build_synthetic(resources)?;
                g.set_output(a.colo.colo_output_every, Some(outputs.hook()));
                g.set_jitter(a.colo.colo_jitter);
                Box::new(g)
            }
        };
        (Some((g, outputs, a.colo.control(&progress))), None)
    } else {
        (None, Some(a.guest.build(resources)?))
    };
    let guest: &dyn ferry::Guest = match (&colo, &built) {
        (Some((g, _, _)), _) => &**g,
        (None, Some(b)) => &**b,
        (None, None) => unreachable!("one of the two was built"),
    };
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
            stall_timeout: Some(a.peer.peer_timeout),
        },
        peer_timeout: a.peer.peer_timeout,
        verify_switchover: a.verify_switchover,
        tls: match &a.tls_dir {
            Some(d) => Some(Arc::new(TlsClient::load(d, a.tls_hostname.clone())?)),
            None => None,
        },
        tuning: SocketTuning {
            send_buffer: a.socket_buffer.map(|n| n as usize),
            congestion: crate::units::congestion(&a.tcp_congestion),
            ..Default::default()
        },
        postcopy: a.postcopy,
        postcopy_after: a.postcopy_after,
        postcopy_preempt: !a.no_postcopy_preempt,
        postcopy_recover: a.postcopy_recover,
        colo: a.colo.colo,
        ..Default::default()
    };
    let events = a.json.then(|| EventPrinter::start(&progress));
    let view = ProgressView::start(progress.clone(), !a.json);
    let result = migrate_out(guest, &uri, &opts, &progress);
    drop(view);
    let (mut summary, ok) = match result {
        Ok(s) => (s, true),
        Err(f) => (*f.summary, false),
    };
    if ok && summary.digest.is_none() {
        summary.digest = Some(guest.memory().digest().to_string());
    }
    if let (true, Some((g, outputs, ctl))) = (ok, &colo) {
        let s = crate::colo::primary(&a.colo, &**g, outputs, &uri, &opts, ctl, &progress, a.json)?;
        summary.guest_running = g.is_running();
        summary.colo = Some(s);
    }
    // The events go on through COLO (status colo, then its end).
    if let Some(e) = events {
        e.finish();
    }
    drop((control, metrics));
    print_summary("send", &summary, a.json);
    if let (Some(s), false) = (&summary.colo, a.json) {
        crate::colo::print(s);
    }
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
