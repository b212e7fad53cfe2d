//! Helpers shared by the controller's integration tests: guests filled with
//! datasets, running synthetic guests, a destination and a source each on
//! its own thread, and waits bounded by the test's deadline.

#![allow(dead_code)]

use std::sync::Arc;
use std::thread::JoinHandle;

use ferry::synthetic::synthetic_memory;
use ferry::{
    migrate_in, migrate_out, ChannelUri, DirtyPattern, Failed, GuestMemory, ImageGuest,
    IncomingOptions, IncomingOutcome, Listener, OutgoingOptions, Parameters, Progress, Resources,
    SocketTuning, Summary, SyntheticConfig, SyntheticGuest, TrackerKind,
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

/// A destination that verifies the switchover by itself (the default is
/// to verify only when the source asks): before its guest runs it compares
/// its digest of memory and device state with the source's, and both
/// summaries then carry equal `switchover_digest`s and `verified`.
pub fn verifying() -> IncomingOptions {
    IncomingOptions {
        verify_switchover: Some(true),
        ..Default::default()
    }
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

/// Polls until `cond` holds (the test's own deadline, [`within`], bounds
/// the wait).
pub fn wait_until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The workload most live tests run: 2 vCPUs writing `rate` bytes/s with
/// `pattern` (seed 3), dirty pages tracked by `tracker`.
pub fn workload(rate: u64, pattern: DirtyPattern, tracker: TrackerKind) -> SyntheticConfig {
    SyntheticConfig {
        vcpus: 2,
        dirty_rate: rate,
        pattern,
        seed: 3,
        tracker,
    }
}

/// A synthetic guest of `mib` MiB (memory seed `memory_seed`) running
/// `config`, holding `resources`.
pub fn synthetic_guest(
    mib: u64,
    memory_seed: u64,
    config: &SyntheticConfig,
    resources: Resources,
) -> SyntheticGuest {
    let mem = synthetic_memory(mib * MIB, None, memory_seed).unwrap();
    SyntheticGuest::start(mem, config, resources).unwrap()
}

/// A synthetic guest of `mib` MiB running [`workload`], holding no resources.
pub fn synthetic(
    mib: u64,
    rate: u64,
    pattern: DirtyPattern,
    tracker: TrackerKind,
) -> SyntheticGuest {
    synthetic_guest(
        mib,
        5,
        &workload(rate, pattern, tracker),
        Resources::none(true),
    )
}

/// Migration progress (and control) with these parameters.
pub fn progress_with(parameters: Parameters) -> Arc<Progress> {
    Arc::new(Progress::with_parameters(parameters))
}

/// Runs the source of a default migration on its own thread.
pub fn spawn_source(
    guest: Arc<SyntheticGuest>,
    uri: ChannelUri,
    progress: Arc<Progress>,
) -> JoinHandle<Result<Summary, Failed>> {
    std::thread::spawn(move || migrate_out(&*guest, &uri, &OutgoingOptions::default(), &progress))
}
