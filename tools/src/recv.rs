//! `ferry recv`: accept one incoming migration and hold the guest's memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ferry::{
    migrate_in, AcceptOptions, ChannelUri, DestinationMemory, IncomingOptions, Listener, Progress,
    SocketTuning, TlsServer,
};

use crate::output::print_summary;
use crate::units::parse_size;

/// Accept one incoming migration on a listening socket.
///
/// Prints `ferry: listening on URI` on stderr once ready (with the real port
/// when PORT is 0). Any connection that is not a channel of the migration
/// (another program, another session) ends the migration with an error.
/// The result is `completed` only when every page and the device state have
/// landed and every checksum held.
#[derive(Args)]
pub struct RecvArgs {
    /// Where to listen: tcp:HOST:PORT (PORT 0 picks a free one) or unix:PATH.
    #[arg(long)]
    listen: String,
    /// Keep the received RAM in this file (created or truncated; sparse where
    /// pages are zero). Default: anonymous memory.
    #[arg(long)]
    ram_out: Option<PathBuf>,
    /// Write the received device state to this file.
    #[arg(long)]
    device_state_out: Option<PathBuf>,
    /// Print one JSON object with the result instead of text.
    #[arg(long)]
    json: bool,
    /// Give up if no source connects within this many seconds (default: wait for ever).
    #[arg(long)]
    timeout: Option<f64>,
    /// Socket receive buffer size (SO_RCVBUF), e.g. 4M; default: kernel autotuning.
    #[arg(long, value_parser = parse_size)]
    socket_buffer: Option<u64>,
    /// TCP congestion control for the migration's sockets, or `system` for
    /// the machine's default. cubic suits loopback and LANs; a pacing
    /// algorithm (bbr) spends CPU on timers there.
    #[arg(long, default_value = "cubic")]
    tcp_congestion: String,
    /// TLS on every channel, with credentials from this directory in QEMU's
    /// layout: server-cert.pem + server-key.pem (this side's certificate)
    /// and ca-cert.pem (the CA every sender's client certificate must be
    /// signed by; senders without one are refused). `ferry certs` makes a set.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Insist on a compression setting: `zstd` refuses a sender that does
    /// not compress, `none` one that does. Default: take what the sender
    /// announces.
    #[arg(long, value_parser = ["zstd", "none"])]
    compress: Option<String>,
}

pub fn run(a: RecvArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("recv", json, migrate(a))
}

fn migrate(a: RecvArgs) -> anyhow::Result<bool> {
    let uri: ChannelUri = a.listen.parse()?;
    let tuning = SocketTuning {
        recv_buffer: a.socket_buffer.map(|n| n as usize),
        congestion: crate::units::congestion(&a.tcp_congestion),
        ..Default::default()
    };
    let mut listener = Listener::bind(&uri, tuning)?;
    if let Some(d) = &a.tls_dir {
        listener = listener.with_tls(Arc::new(TlsServer::load(d)?));
    }
    // One write, so a script reading stderr never sees half the line.
    let ready = format!("ferry: listening on {}\n", listener.uri());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), ready.as_bytes());
    let opts = IncomingOptions {
        memory: a
            .ram_out
            .clone()
            .map_or(DestinationMemory::Anonymous, DestinationMemory::Files),
        accept: AcceptOptions {
            first_timeout: a.timeout.map(Duration::from_secs_f64),
            ..Default::default()
        },
        compression: a.compress.as_deref().map(|c| c == "zstd"),
    };
    let progress = Arc::new(Progress::default());
    match migrate_in(&listener, &opts, &progress) {
        Ok(mut outcome) => {
            outcome.summary.digest = Some(outcome.memory.digest().to_string());
            if let Some(p) = &a.device_state_out {
                std::fs::write(p, &outcome.device_state)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            print_summary("recv", &outcome.summary, a.json);
            Ok(true)
        }
        Err(f) => {
            print_summary("recv", &f.summary, a.json);
            Ok(false)
        }
    }
}
