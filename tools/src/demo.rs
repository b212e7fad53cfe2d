//! `ferry demo`: the main job on a built-in guest. Both ends of a migration
//! run in this process over loopback TCP; the result says whether the
//! destination holds exactly the source's bytes.

use std::sync::Arc;

use clap::Args;
use ferry::{
    migrate_in, migrate_out, BlockSpec, GuestMemory, ImageGuest, IncomingOptions, Listener,
    OutgoingOptions, Progress, SocketTuning,
};
use ferry_ram::pattern::{fill_block, Pattern};

use crate::output::{print_summary, ProgressView};
use crate::units::{bytes, parse_size};

/// Migrate a built-in guest over loopback TCP and check the result.
///
/// The guest's RAM is the `mixed` dataset (a quarter zero pages, a quarter
/// low-entropy, half random); both ends run in this process on real sockets.
/// The source asks for the switchover to be verified (`send
/// --verify-switchover`): PASS means both sides compared their digests of
/// memory and device state before the destination's guest ran, and the
/// memory each holds afterwards is the same.
#[derive(Args)]
pub struct DemoArgs {
    /// Guest RAM size (a multiple of 1 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Number of multifd channels.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    channels: u16,
    /// Print the two sides' summaries as JSON lines.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DemoArgs) -> anyhow::Result<bool> {
    let spec = [BlockSpec {
        name: "pc.ram".into(),
        len: a.size,
        page_size: 4096,
    }];
    let memory = Arc::new(GuestMemory::anonymous(&spec)?);
    fill_block(&memory.blocks()[0], Pattern::Mixed, 1);
    let guest = ImageGuest::from_memory(memory.clone(), b"ferry demo guest".to_vec());

    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?, SocketTuning::default())?;
    let uri = listener.uri().clone();
    if !a.json {
        eprintln!(
            "ferry demo: migrating a {} guest over {uri} with {} channel(s)",
            bytes(a.size),
            a.channels
        );
    }
    let dst = std::thread::spawn(move || {
        migrate_in(&listener, &IncomingOptions::default(), &Progress::default())
    });
    let progress = Arc::new(Progress::default());
    let view = ProgressView::start(progress.clone(), !a.json);
    let sent = migrate_out(
        &guest,
        &uri,
        &OutgoingOptions {
            channels: a.channels,
            verify_switchover: true,
            ..Default::default()
        },
        &progress,
    );
    drop(view);
    let received = dst
        .join()
        .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;

    let mut src = match sent {
        Ok(s) => s,
        Err(f) => *f.summary,
    };
    src.digest = Some(memory.digest().to_string());
    let (mut dst, held) = match received {
        Ok(o) => (o.summary, Some(o.memory)),
        Err(f) => (*f.summary, None),
    };
    dst.digest = held.map(|m| m.digest().to_string());
    print_summary("demo (source)", &src, a.json);
    print_summary("demo (destination)", &dst, a.json);
    let ok = src.completed()
        && dst.completed()
        && src.verified
        && dst.verified
        && src.digest == dst.digest;
    if !a.json {
        eprintln!(
            "ferry demo: {}",
            if ok {
                "PASS: the destination holds exactly the source's memory (switchover verified)"
            } else {
                "FAIL: see above"
            }
        );
    }
    Ok(ok)
}
