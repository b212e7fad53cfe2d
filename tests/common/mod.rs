//! Helpers shared by the controller's integration tests: guests filled with
//! datasets, and a destination running on its own thread.

#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;

use ferry::{
    migrate_in, ChannelUri, Failed, GuestMemory, ImageGuest, IncomingOptions, IncomingOutcome,
    Listener, Progress, SocketTuning,
};
use ferry_ram::pattern::{fill_block, Pattern};
use ferry_ram::BlockSpec;

pub const MIB: u64 = 1 << 20;

/// Anonymous memory with one block per (name, MiB), filled with `pattern`.
pub fn memory(blocks: &[(&str, u64)], pattern: Pattern, seed: u64) -> Arc<GuestMemory> {
    let specs: Vec<BlockSpec> = blocks
        .iter()
        .map(|(n, mib)| BlockSpec {
            name: n.to_string(),
            len: mib * MIB,
            page_size: 4096,
        })
        .collect();
    let mem = GuestMemory::anonymous(&specs).unwrap();
    for (i, b) in mem.blocks().iter().enumerate() {
        fill_block(b, pattern, seed + i as u64);
    }
    Arc::new(mem)
}

pub fn image_guest(mem: Arc<GuestMemory>) -> ImageGuest {
    ImageGuest::from_memory(mem, b"device state of the test guest".to_vec())
}

/// A listener on a free loopback port and its URI.
pub fn listener() -> (Listener, ChannelUri) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default()).unwrap();
    let uri = l.uri().clone();
    (l, uri)
}

/// Runs the destination on its own thread.
pub fn spawn_destination(
    l: Listener,
    opts: IncomingOptions,
) -> JoinHandle<Result<IncomingOutcome, Failed>> {
    std::thread::spawn(move || migrate_in(&l, &opts, &Progress::default()))
}

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `secs`: a hang is a failure, not a stuck CI run.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
}
