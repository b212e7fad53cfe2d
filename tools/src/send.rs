//! `ferry send`: migrate an image guest (a file's bytes as RAM) to a
//! destination where `ferry recv` listens.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use ferry::{
    migrate_out, ChannelUri, Guest, ImageGuest, OutgoingOptions, Progress, SendPath, SenderOptions,
    SocketTuning, TlsClient,
};

use crate::output::{print_summary, ProgressView};
use crate::units::parse_size;

/// Migrate a guest whose RAM is a file's bytes (the image guest) to a destination.
///
/// Opens a main channel and K multifd channels to the destination, sends the
/// memory layout, every page (zero pages as offsets only) and the device
/// state, and waits for the destination to confirm that everything landed.
#[derive(Args)]
pub struct SendArgs {
    /// File whose bytes are the guest's RAM (e.g. made by `ferry gen`); its
    /// size must be a multiple of 4 KiB.
    #[arg(long)]
    ram: PathBuf,
    /// Where `ferry recv` listens: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    to: String,
    /// Number of parallel multifd channels (one thread and one io_uring each).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    /// Print one JSON object with the result instead of text and a progress bar.
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
    /// File holding the guest's device state (default: a short text describing the image).
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

fn migrate(a: SendArgs) -> anyhow::Result<bool> {
    let uri: ChannelUri = a.to.parse()?;
    let device_state = match &a.device_state {
        Some(p) => Some(
            std::fs::read(p).with_context(|| format!("reading device state {}", p.display()))?,
        ),
        None => None,
    };
    let guest = ImageGuest::open(&a.ram, device_state)?;
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
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start(progress.clone(), !a.json);
    let result = migrate_out(&guest, &uri, &opts, &progress);
    drop(view);
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
