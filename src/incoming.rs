//! The destination side of a migration.
//!
//! 1. accept one session's channels, in any order (transport sorts them);
//! 2. read SETUP, build memory shaped like the source's (or check that the
//!    memory we were given matches it), start the receiver pool, answer
//!    SETUP_ACK;
//! 3. follow the main channel: PASS_END waits for that pass to land on every
//!    channel, DEVICE_STATE is kept, COMPLETE ends the stream;
//! 4. check that every page arrived and no page is left with a bad checksum,
//!    then answer SHUT (success) on the return path.
//!
//! On any failure the destination answers SHUT with the error text, so the
//! source can report it, and returns the error: it never reports success for
//! an incomplete migration.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use ferry_multifd::{ReceiverOptions, ReceiverPool};
use ferry_ram::{Digest, GuestMemory, PageBitmap};
use ferry_transport::{accept_session, AcceptOptions, Channel, Listener};

use crate::protocol::{Message, Setup, CAP_CHECKSUM, CAP_ZSTD};
use crate::{Failed, MigrationError, Progress, Role, Summary};

/// Where the destination's guest memory comes from.
#[derive(Clone)]
pub enum DestinationMemory {
    /// Fresh anonymous memory shaped like the source's.
    Anonymous,
    /// Fresh memory backed by a new file at this path (one block), or
    /// `PATH.NAME` per block.
    Files(PathBuf),
    /// Memory the caller (a VMM) already has; the source's blocks must match
    /// it by name, length and page size.
    Provided(Arc<GuestMemory>),
}

#[derive(Clone)]
pub struct IncomingOptions {
    pub memory: DestinationMemory,
    pub accept: AcceptOptions,
    /// Compression this destination insists on: `Some(true)` refuses a
    /// source that does not compress, `Some(false)` one that does; `None`
    /// takes what the source announces.
    pub compression: Option<bool>,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            memory: DestinationMemory::Anonymous,
            accept: AcceptOptions::default(),
            compression: None,
        }
    }
}

/// A completed incoming migration: the guest's memory and device state.
pub struct IncomingOutcome {
    pub summary: Summary,
    pub memory: Arc<GuestMemory>,
    pub device_state: Vec<u8>,
}

/// Accepts one migration on `listener` and receives it.
pub fn migrate_in(
    listener: &Listener,
    opts: &IncomingOptions,
    progress: &Progress,
) -> Result<IncomingOutcome, Failed> {
    let mut summary = Summary::new(Role::Destination, listener.uri().to_string());
    let mut started = Instant::now();
    let mut state = Received::default();
    let result = run(
        listener,
        opts,
        progress,
        &mut summary,
        &mut started,
        &mut state,
    );
    summary.finish(started, result.as_ref().err().map(ToString::to_string));
    match (result, state.memory) {
        (Ok(()), Some(memory)) => Ok(IncomingOutcome {
            summary,
            memory,
            device_state: state.device_state,
        }),
        (Err(error), _) => Err(Failed {
            error,
            summary: Box::new(summary),
        }),
        (Ok(()), None) => unreachable!("a completed migration has memory"),
    }
}

#[derive(Default)]
struct Received {
    memory: Option<Arc<GuestMemory>>,
    device_state: Vec<u8>,
}

enum Event {
    Main(Result<(Message, u64), MigrationError>),
    MultifdFailed,
}

fn run(
    listener: &Listener,
    opts: &IncomingOptions,
    progress: &Progress,
    summary: &mut Summary,
    started: &mut Instant,
    out: &mut Received,
) -> Result<(), MigrationError> {
    progress.set_phase("waiting for the source");
    let session = accept_session(listener, &opts.accept)?;
    *started = Instant::now();
    summary.session = session.session.to_string();
    summary.channels = session.multifd.len() as u16;
    summary.wire_bytes +=
        (ferry_transport::HELLO_LEN as u64 + 8) * (session.multifd.len() as u64 + 1);
    summary.tls = listener.is_tls();
    let main: Arc<dyn Channel> = Arc::from(session.main);
    let result = receive(main.clone(), session.multifd, opts, progress, summary, out);
    let shut = Message::Shut {
        error: result.as_ref().err().map(ToString::to_string),
    };
    match shut.write(&*main) {
        Ok(n) => summary.wire_bytes += n,
        Err(e) if result.is_ok() => return Err(e),
        Err(_) => {}
    }
    // End cleanly (TLS: close_notify); the source may be gone already.
    let _ = main.finish();
    main.shutdown();
    result
}

fn receive(
    main: Arc<dyn Channel>,
    multifd: Vec<Box<dyn Channel>>,
    opts: &IncomingOptions,
    progress: &Progress,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    progress.set_phase("setup");
    let setup = match Message::read(&*main, "source")? {
        (Message::Setup(s), n) => {
            summary.wire_bytes += n;
            s
        }
        (other, _) => {
            return Err(MigrationError::Protocol(format!(
                "expected SETUP, got {}",
                other.name()
            )))
        }
    };
    if usize::from(setup.multifd_channels) != multifd.len() {
        return Err(MigrationError::Setup(format!(
            "SETUP announces {} multifd channels, the session has {}",
            setup.multifd_channels,
            multifd.len()
        )));
    }
    summary.checksum = setup.capabilities & CAP_CHECKSUM != 0;
    let compressed = setup.capabilities & CAP_ZSTD != 0;
    match opts.compression {
        Some(true) if !compressed => {
            return Err(MigrationError::Setup(
                "this receiver requires zstd compression (--compress zstd), the source sends uncompressed"
                    .into(),
            ))
        }
        Some(false) if compressed => {
            return Err(MigrationError::Setup(
                "the source compresses with zstd, but this receiver was started with --compress none"
                    .into(),
            ))
        }
        _ => {}
    }
    summary.compression = compressed.then(|| "zstd".to_string());
    let memory = build_memory(&setup, &opts.memory)?;
    progress
        .total_ram_bytes
        .store(memory.total_bytes(), std::sync::atomic::Ordering::Relaxed);
    out.memory = Some(memory.clone());

    let (events, inbox) = mpsc::channel();
    let ropts = ReceiverOptions {
        fresh_memory: !matches!(opts.memory, DestinationMemory::Provided(_)),
        compressed,
    };
    let on_fail = events.clone();
    let pool = ReceiverPool::start(multifd, memory.clone(), ropts, move || {
        let _ = on_fail.send(Event::MultifdFailed);
    })?;
    progress.attach(pool.counters().clone());
    spawn_main_reader(main.clone(), events)?;
    summary.wire_bytes += Message::SetupAck.write(&*main)?;

    progress.set_phase("receiving");
    let counters = pool.counters().clone();
    let result = follow_main(&pool, &inbox, summary, out)
        .and_then(|()| check_all_received(&memory, pool.received()))
        .and_then(|()| pool.finish().map_err(MigrationError::from).map(drop));
    // What landed, whether or not the migration completed.
    summary.add_totals(&counters.snapshot());
    result
}

/// Every page of every block must have landed at least once.
fn check_all_received(memory: &GuestMemory, received: &[PageBitmap]) -> Result<(), MigrationError> {
    for (block, bits) in memory.blocks().iter().zip(received) {
        let missing = bits.pages() - bits.count();
        if missing > 0 {
            let first = (0..bits.pages()).find(|&p| !bits.test(p)).unwrap_or(0);
            return Err(MigrationError::MissingPages {
                block: block.name().into(),
                missing,
                first: first * u64::from(block.page_size()),
            });
        }
    }
    Ok(())
}

/// Follows the main channel until COMPLETE, the data path in step with it.
fn follow_main(
    pool: &ReceiverPool,
    inbox: &mpsc::Receiver<Event>,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    loop {
        let event = inbox
            .recv()
            .map_err(|_| MigrationError::Protocol("main channel reader stopped".into()))?;
        let (msg, n) = match event {
            Event::Main(m) => m?,
            Event::MultifdFailed => return Err(pool.error().into()),
        };
        summary.wire_bytes += n;
        match msg {
            Message::PassEnd { generation } => {
                pool.wait_sync(generation)?;
                summary.passes = generation;
            }
            Message::DeviceState(d) => {
                summary.device_state_bytes = d.len() as u64;
                summary.device_state_digest = Some(Digest::of_bytes(&d).to_string());
                out.device_state = d;
            }
            Message::Complete { generation } => {
                pool.wait_sync(generation)?;
                pool.check_checksums()?;
                if summary.device_state_digest.is_none() {
                    return Err(MigrationError::Protocol(
                        "COMPLETE before any DEVICE_STATE".into(),
                    ));
                }
                return Ok(());
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "unexpected {} from the source",
                    other.name()
                )))
            }
        }
    }
}

/// Reads source → destination messages on their own thread until COMPLETE.
fn spawn_main_reader(
    main: Arc<dyn Channel>,
    events: mpsc::Sender<Event>,
) -> Result<(), MigrationError> {
    std::thread::Builder::new()
        .name("ferry-main-reader".into())
        .spawn(move || loop {
            let m = Message::read(&*main, "source");
            let last = !matches!(
                m,
                Ok((Message::PassEnd { .. } | Message::DeviceState(_), _))
            );
            if events.send(Event::Main(m)).is_err() || last {
                break;
            }
        })
        .map_err(|e| MigrationError::Thread("main-channel reader", e))?;
    Ok(())
}

/// Builds (or checks) the destination memory for the source's layout.
fn build_memory(
    setup: &Setup,
    memory: &DestinationMemory,
) -> Result<Arc<GuestMemory>, MigrationError> {
    if setup.blocks.is_empty() {
        return Err(MigrationError::Setup(
            "the source announced no RAM blocks".into(),
        ));
    }
    let setup_err = |e: ferry_ram::RamError| MigrationError::Setup(e.to_string());
    match memory {
        DestinationMemory::Anonymous => Ok(Arc::new(
            GuestMemory::anonymous(&setup.blocks).map_err(setup_err)?,
        )),
        DestinationMemory::Files(path) => Ok(Arc::new(
            GuestMemory::create_files(&setup.blocks, path).map_err(setup_err)?,
        )),
        DestinationMemory::Provided(mem) => {
            if mem.blocks().len() != setup.blocks.len() {
                return Err(MigrationError::Setup(format!(
                    "the source has {} RAM block(s), the receiver {}",
                    setup.blocks.len(),
                    mem.blocks().len()
                )));
            }
            for (i, spec) in setup.blocks.iter().enumerate() {
                let names = || {
                    mem.blocks()
                        .iter()
                        .map(|b| b.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let Some((j, b)) = mem.find(&spec.name) else {
                    return Err(MigrationError::Setup(format!(
                        "block '{}' is unknown to the receiver (it has: {})",
                        spec.name,
                        names()
                    )));
                };
                if j != i || b.len() != spec.len || b.page_size() != spec.page_size {
                    return Err(MigrationError::Setup(format!(
                        "block '{}': the source has #{i}, {} bytes in {}-byte pages; the receiver has #{j}, {} bytes in {}-byte pages",
                        spec.name,
                        spec.len,
                        spec.page_size,
                        b.len(),
                        b.page_size()
                    )));
                }
            }
            Ok(mem.clone())
        }
    }
}
