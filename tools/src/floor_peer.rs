//! `ferry floor-peer send|recv` (hidden): the two processes of `ferry bench
//! --peer floor`, run by the bench harness so each side has its own rusage.
//! The floor itself (wire format, sender, receiver) is
//! `benches/src/floor.rs`; this file only parses arguments and prints the
//! listening line (stderr) and the one JSON report (stdout).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use ferry_bench::floor;

/// The floor peer's two ends (used by `ferry bench --peer floor`).
#[derive(Args)]
pub struct FloorPeerArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand)]
enum Side {
    /// Receive into fresh anonymous memory of --size bytes over --channels
    /// connections to 127.0.0.1; prints `ferry floor: listening on ADDR`.
    Recv {
        #[arg(long)]
        size: u64,
        #[arg(long, default_value_t = 1)]
        channels: u16,
        /// TCP congestion control of the sockets, or `system`.
        #[arg(long, default_value = "system")]
        tcp_congestion: String,
    },
    /// Send the non-zero pages of --dataset to the receiver at --to.
    Send {
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        channels: u16,
        /// TCP congestion control of the sockets, or `system`.
        #[arg(long, default_value = "system")]
        tcp_congestion: String,
        /// `splice` (file → pipe per run, pipe → socket per chunk) or
        /// `sendfile` (one call per run).
        #[arg(long, default_value = "splice")]
        method: floor::Method,
    },
}

/// Prints the side's report (or `{"status":"failed","error":...}`) as JSON.
pub fn run(a: FloorPeerArgs) -> anyhow::Result<bool> {
    let report = match a.side {
        Side::Recv {
            size,
            channels,
            tcp_congestion,
        } => {
            let cc = crate::units::congestion(&tcp_congestion);
            floor::receive(size, channels, cc.as_deref(), |addr| {
                eprintln!("{}{addr}", floor::LISTENING);
            })
            .map(|r| serde_json::to_value(r).unwrap_or_default())
        }
        Side::Send {
            dataset,
            to,
            channels,
            tcp_congestion,
            method,
        } => {
            let cc = crate::units::congestion(&tcp_congestion);
            floor::send(&dataset, to, channels, cc.as_deref(), method)
                .map(|r| serde_json::to_value(r).unwrap_or_default())
        }
    };
    match report {
        Ok(v) => {
            println!("{v}");
            Ok(true)
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({ "status": "failed", "error": e.to_string() })
            );
            eprintln!("ferry floor-peer: error: {e}");
            Ok(false)
        }
    }
}
