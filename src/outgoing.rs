//! The source side of a migration.
//!
//! 1. open the session: main channel, then K multifd channels, each with its
//!    hello; then wait for the destination to accept them all;
//! 2. send SETUP (blocks, page size, capabilities) and wait for SETUP_ACK on
//!    the return path;
//! 3. pause the guest and send one pass of every page through the sender
//!    pool, then PASS_END, the device state and COMPLETE;
//! 4. wait for the destination's SHUT: it says whether every page and the
//!    device state landed.
//!
//! Any failure leaves the source guest running (it is resumed) and its
//! memory untouched; if the destination explains why it failed, that
//! explanation is the error reported.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_multifd::{SendPath, SenderOptions, SenderPool};
use ferry_ram::{Digest, PageBitmap};
use ferry_transport::{
    await_accept, connect_channel_secure, Channel, ChannelHello, ChannelUri, Role, SessionId,
    SocketTuning, TlsClient,
};

use crate::protocol::{Message, Setup, CAP_CHECKSUM, CAP_ZSTD};
use crate::summary::ZeroCopyReport;
use crate::{Failed, Guest, MigrationError, Progress, Role as SummaryRole, Summary};

#[derive(Clone, Debug)]
pub struct OutgoingOptions {
    /// Multifd channels (K).
    pub channels: u16,
    pub sender: SenderOptions,
    pub tuning: SocketTuning,
    /// How long to wait for the destination to accept channels and setup.
    pub setup_timeout: Duration,
    /// How long to wait for the destination's final word after COMPLETE.
    pub completion_timeout: Duration,
    /// TLS on every channel, with these credentials.
    pub tls: Option<Arc<TlsClient>>,
}

impl Default for OutgoingOptions {
    fn default() -> Self {
        Self {
            channels: 2,
            sender: SenderOptions::default(),
            tuning: SocketTuning::default(),
            setup_timeout: Duration::from_secs(30),
            completion_timeout: Duration::from_secs(120),
            tls: None,
        }
    }
}

/// Migrates `guest` to the destination listening at `uri`.
pub fn migrate_out(
    guest: &dyn Guest,
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    progress: &Progress,
) -> Result<Summary, Failed> {
    let started = Instant::now();
    let mut summary = Summary::new(SummaryRole::Source, uri.to_string());
    summary.channels = opts.channels;
    summary.checksum = opts.sender.checksum;
    summary.tls = opts.tls.is_some();
    summary.compression = opts.sender.compress.map(|l| format!("zstd:{l}"));
    progress.total_ram_bytes.store(
        guest.memory().total_bytes(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let result = run(guest, uri, opts, progress, &mut summary);
    if result.is_err() {
        // The source guest keeps running whatever happened.
        if let Err(e) = guest.resume() {
            tracing::error!("resuming the source guest after a failed migration: {e}");
        }
    }
    summary.finish(started, result.as_ref().err().map(ToString::to_string));
    progress.set_phase(summary.status);
    match result {
        Ok(()) => Ok(summary),
        Err(error) => Err(Failed {
            error,
            summary: Box::new(summary),
        }),
    }
}

fn run(
    guest: &dyn Guest,
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    progress: &Progress,
    summary: &mut Summary,
) -> Result<(), MigrationError> {
    if opts.channels == 0 {
        return Err(MigrationError::Options(
            "at least one multifd channel is needed".into(),
        ));
    }
    progress.set_phase("connecting");
    let session = SessionId::random();
    summary.session = session.to_string();
    let (main, multifd) = open_session(uri, opts, session)?;
    summary.wire_bytes += (ferry_transport::HELLO_LEN as u64 + 8) * (u64::from(opts.channels) + 1);
    let main: Arc<dyn Channel> = Arc::from(main);
    let return_path = spawn_return_path(main.clone())?;
    let result = run_session(
        guest,
        main.as_ref(),
        multifd,
        &return_path,
        opts,
        progress,
        summary,
    );
    // End the main channel cleanly (TLS: close_notify); the destination
    // may already have closed its side, so this is best effort.
    let _ = main.finish();
    result
}

fn run_session(
    guest: &dyn Guest,
    main: &dyn Channel,
    multifd: Vec<Box<dyn Channel>>,
    return_path: &ReturnPath,
    opts: &OutgoingOptions,
    progress: &Progress,
    summary: &mut Summary,
) -> Result<(), MigrationError> {
    let memory = guest.memory().clone();

    progress.set_phase("setup");
    let setup = Setup {
        capabilities: if opts.sender.checksum {
            CAP_CHECKSUM
        } else {
            0
        } | if opts.sender.compress.is_some() {
            CAP_ZSTD
        } else {
            0
        },
        multifd_channels: opts.channels,
        packet_pages: opts.sender.packet_pages,
        blocks: memory.specs(),
    };
    summary.wire_bytes += Message::Setup(setup).write(main)?;
    match recv_timeout(return_path, opts.setup_timeout, "SETUP_ACK")? {
        Message::SetupAck => {}
        Message::Shut { error: Some(e) } => return Err(MigrationError::Setup(e)),
        other => {
            return Err(MigrationError::Protocol(format!(
                "expected SETUP_ACK, got {}",
                other.name()
            )))
        }
    }

    let mut pool = SenderPool::start(multifd, memory.clone(), opts.sender.clone())?;
    progress.attach(pool.counters().clone());
    summary.send_path = pool.path().name();
    summary.send_path_note = pool.path_note().map(String::from);
    summary.zero_copy = (opts.sender.path == SendPath::ZeroCopy).then(|| ZeroCopyReport {
        requested: true,
        used: pool.path() == SendPath::ZeroCopy,
        note: pool.path_note().map(String::from),
        ..Default::default()
    });

    guest.pause()?;
    progress.set_phase("sending");
    let all_pages = Arc::new(
        memory
            .blocks()
            .iter()
            .map(|b| PageBitmap::new(b.pages(), true))
            .collect::<Vec<_>>(),
    );
    let sent = pool.send_pass(all_pages);
    if let Err(e) = sent {
        return Err(destination_reason(return_path).unwrap_or(e.into()));
    }
    summary.passes = pool.generation();
    summary.wire_bytes += Message::PassEnd {
        generation: pool.generation(),
    }
    .write(main)?;

    progress.set_phase("device state");
    let device_state = guest.save_device_state()?;
    summary.device_state_bytes = device_state.len() as u64;
    summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
    summary.wire_bytes += Message::DeviceState(device_state).write(main)?;
    summary.wire_bytes += Message::Complete {
        generation: pool.generation(),
    }
    .write(main)?;
    let totals = pool
        .finish()
        .map_err(|e| destination_reason(return_path).unwrap_or(e.into()))?;
    summary.add_totals(&totals);
    if let Some(zc) = summary.zero_copy.as_mut() {
        (zc.sends, zc.copied) = (totals.zero_copy_sends, totals.zero_copy_copied);
    }

    progress.set_phase("completing");
    match recv_timeout(
        return_path,
        opts.completion_timeout,
        "the destination's SHUT",
    )? {
        Message::Shut { error: None } => Ok(()),
        Message::Shut { error: Some(e) } => Err(MigrationError::Destination(e)),
        other => Err(MigrationError::Protocol(format!(
            "expected SHUT, got {}",
            other.name()
        ))),
    }
}

type Channels = Vec<Box<dyn Channel>>;

/// Connects main and the multifd channels, then waits until the
/// destination has accepted every one of them.
fn open_session(
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    session: SessionId,
) -> Result<(Box<dyn Channel>, Channels), MigrationError> {
    let hello = |role, index| ChannelHello {
        session,
        role,
        index,
        multifd_channels: opts.channels,
    };
    let tls = opts.tls.as_deref();
    let main = connect_channel_secure(uri, &opts.tuning, &hello(Role::Main, 0), tls)?;
    let mut multifd: Vec<Box<dyn Channel>> = Vec::new();
    for i in 0..opts.channels {
        match connect_channel_secure(uri, &opts.tuning, &hello(Role::Multifd, i), tls) {
            Ok(ch) => multifd.push(ch),
            // With TLS 1.3 a server that refuses our certificate says so
            // only after our side of the handshake is done: its alert
            // waits on the main channel and explains this failure.
            Err(e) => return Err(pending_refusal(main.as_ref()).unwrap_or(e).into()),
        }
    }
    await_accept(main.as_ref(), opts.setup_timeout)?;
    for ch in &multifd {
        await_accept(ch.as_ref(), opts.setup_timeout)?;
    }
    Ok((main, multifd))
}

/// What the destination said on a channel it refused, if it said anything
/// (a TLS alert, a refusal) within a moment.
fn pending_refusal(ch: &dyn Channel) -> Option<ferry_transport::TransportError> {
    match await_accept(ch, Duration::from_millis(500)) {
        Err(e @ ferry_transport::TransportError::Io { .. })
        | Err(e @ ferry_transport::TransportError::Refused { .. }) => Some(e),
        _ => None,
    }
}

type ReturnPath = Receiver<Result<Message, MigrationError>>;

/// Reads the return path on its own thread until SHUT or an error.
fn spawn_return_path(main: Arc<dyn Channel>) -> Result<ReturnPath, MigrationError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ferry-return-path".into())
        .spawn(move || loop {
            let m = Message::read(&*main, "destination").map(|(m, _)| m);
            let last = !matches!(m, Ok(Message::SetupAck));
            if tx.send(m).is_err() || last {
                break;
            }
        })
        .map_err(|e| MigrationError::Thread("return-path", e))?;
    Ok(rx)
}

fn recv_timeout(rp: &ReturnPath, timeout: Duration, what: &str) -> Result<Message, MigrationError> {
    match rp.recv_timeout(timeout) {
        Ok(m) => m,
        Err(RecvTimeoutError::Timeout) => Err(MigrationError::Protocol(format!(
            "no {what} from the destination within {:.0}s",
            timeout.as_secs_f64()
        ))),
        Err(RecvTimeoutError::Disconnected) => Err(MigrationError::MainClosed {
            peer: "destination",
            during: "before the migration ended",
        }),
    }
}

/// After a local data-path failure: the destination's own account of what
/// went wrong, if it sends one promptly (it usually caused the failure).
fn destination_reason(rp: &ReturnPath) -> Option<MigrationError> {
    match rp.recv_timeout(Duration::from_secs(2)) {
        Ok(Ok(Message::Shut { error: Some(e) })) => Some(MigrationError::Destination(e)),
        _ => None,
    }
}
