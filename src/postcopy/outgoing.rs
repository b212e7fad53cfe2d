//! The source's postcopy phase: `Source::postcopy` (the switch, then the
//! page requests served until the destination's SHUT), the preempt
//! channels' connection, and the completion check. A child module of
//! `outgoing.rs` (declared there with `#[path]`), so it reaches the
//! source's private state; the data path itself is [`crate::postcopy`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_ram::{Digest, PageBitmap};
use ferry_transport::{
    await_accept, connect_channel_secure, Channel, ChannelHello, ChannelUri, Role, SessionId,
    SocketTuning,
};

use super::{
    local_or_destination, unexpected, Link, OutgoingOptions, RecvTimeoutError, ReturnPath, Source,
    POLL,
};
use crate::protocol::Message;
use crate::session::{Phase, Session};
use crate::MigrationError;

impl Source<'_> {
    /// Postcopy (seed 004's `postcopy_start`): pause, end the precopy
    /// stream, send the package (discard list and device state); from then
    /// on the guest is the destination's. Page requests are answered on
    /// preempt[0] while preempt[1..=K] push every other stale page; the
    /// destination's SHUT says every page is placed. Any failure after the
    /// package leaves the guest paused here ([`POSTCOPY_PAUSED`]).
    pub(super) fn postcopy(
        &mut self,
        session: &mut Session,
        s: &mut Link,
    ) -> Result<(), MigrationError> {
        // The destination takes the package only once the last pass has
        // landed there whole, and a pass's tail can still be on its way
        // (loopback's socket buffers hold tens of MB: ~50 ms of downtime
        // at the 1 GiB/s case). The first pass's landing is
        // announced (SWITCHOVER_ACK): wait for it while the guest still
        // runs; pages it dirties meanwhile join the discard list.
        if !s.switchover_acked {
            let t = Instant::now();
            let what = "SWITCHOVER_ACK";
            match super::wait_reply(self.progress, &s.return_path, self.opts.setup_timeout, what)? {
                Message::SwitchoverAck => s.switchover_acked = true,
                Message::Shut { error: Some(e) } => return Err(MigrationError::Destination(e)),
                other => return Err(unexpected(what, &other)),
            }
            tracing::debug!(
                waited_ms = t.elapsed().as_secs_f64() * 1e3,
                "postcopy switch (source): the first pass landed, guest still running"
            );
        }
        let paused_at = Instant::now();
        tracing::info!(
            remaining = self.progress.figures().remaining_bytes,
            "switching to postcopy: pausing the guest"
        );
        self.guest.pause()?;
        let step = |what: &str| {
            tracing::debug!(
                at_ms = paused_at.elapsed().as_secs_f64() * 1e3,
                "postcopy switch (source): {what}"
            )
        };
        step("guest paused");
        session.enter(Phase::PostcopyActive)?;
        self.progress.set_phase("postcopy-active");
        self.guest.resources().inactivate()?;
        session.sync()?;
        step("last pass's sync done");
        let totals = match s.pool.finish() {
            Ok(t) => t,
            Err(e) => return Err(local_or_destination(e, &s.return_path)),
        };
        self.summary.add_totals(&totals);
        self.summary.precopy_bytes = self.progress.figures().precopy_bytes;
        self.summary.passes = s.pool.generation();
        step("precopy stream finished");
        let device_state = self.guest.save_device_state()?;
        step("device state saved");
        self.summary.device_state_bytes = device_state.len() as u64;
        self.summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
        let discard = session.pending().clone();
        let stale: u64 = discard.iter().map(PageBitmap::count).sum();
        let package = crate::postcopy::wire::encode_package(&discard, &device_state);
        step("package built");
        self.in_postcopy = true;
        self.handed_over = true;
        self.summary.wire_bytes += s.main.send(&Message::PostcopyPackage(package))?;
        step("package sent");
        let server = Arc::new(crate::postcopy::PageServer::new(
            self.memory.clone(),
            discard,
        ));
        // The push waits for RESUMED: until then the destination drops
        // its stale pages and starts the guest, the downtime, and on a
        // machine of few cores the push would take the CPUs from it.
        let gate = Arc::new(PushGate::default());
        let pushers: Vec<_> = s.preempt[1..]
            .iter()
            .map(|ch| {
                let (server, ch, gate) = (server.clone(), ch.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    server.push(ch.as_ref())
                })
            })
            .collect();
        let served = self.serve_postcopy(s, &server, paused_at, &gate);
        gate.open();
        if served.is_err() {
            for ch in &s.preempt {
                ch.shutdown();
            }
        }
        for p in pushers {
            match p.join() {
                Ok(Err(e)) if served.is_ok() => {
                    // Every page is placed already (SHUT came): a push cut
                    // short by the destination's close changes nothing.
                    tracing::debug!("postcopy push after completion: {e}");
                }
                _ => {}
            }
        }
        let (requests, request_bytes, pushed_bytes) = server.figures();
        self.progress.set_postcopy_live(crate::PostcopyLive {
            pages_left: server.pending_pages(),
            requests,
            bytes: request_bytes + pushed_bytes,
        });
        self.summary.postcopy = Some(crate::PostcopyReport {
            postcopy_requests: requests,
            postcopy_bytes: request_bytes + pushed_bytes,
            postcopy_discarded_pages: stale,
            ..Default::default()
        });
        self.summary.wire_bytes += request_bytes + pushed_bytes;
        served?;
        // The guest stays paused here for good: memory is as it was at
        // the switch, the reference for the destination's replay check.
        let (memory, digest) = self.switchover_digest(&device_state);
        self.summary.switchover_digest = Some(digest.to_string());
        self.summary.digest = Some(memory.to_string());
        Ok(())
    }

    /// Answers page requests until the destination's SHUT.
    fn serve_postcopy(
        &mut self,
        s: &mut Link,
        server: &crate::postcopy::PageServer,
        paused_at: Instant,
        gate: &PushGate,
    ) -> Result<(), MigrationError> {
        let urgent = s.preempt[0].clone();
        let mut shown: Option<Instant> = None;
        loop {
            if shown.is_none_or(|t| t.elapsed() >= POLL) {
                shown = Some(Instant::now());
                let (requests, a, b) = server.figures();
                self.progress.set_postcopy_live(crate::PostcopyLive {
                    pages_left: server.pending_pages(),
                    requests,
                    bytes: a + b,
                });
            }
            let m = match s.return_path.recv_timeout(POLL) {
                Ok(m) => m?,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::MainClosed {
                        peer: "destination",
                        during: "in postcopy",
                    })
                }
            };
            match m {
                Message::PageRequest(run) => {
                    if let Err(e) = server.serve(&run, "return path", urgent.as_ref()) {
                        // A request sent just before the destination placed
                        // its last page (by the push) finds the preempt
                        // channel closed: its SHUT says it completed.
                        let io = matches!(e, crate::postcopy::PostcopyError::Io { .. });
                        if io && completed_meanwhile(&s.return_path, self.opts.peer_timeout) {
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                }
                Message::Resumed { unix_nanos, .. } => {
                    gate.open();
                    let downtime = paused_at.elapsed();
                    tracing::info!(
                        downtime_ms = downtime.as_secs_f64() * 1e3,
                        "the destination runs the guest (postcopy)"
                    );
                    self.progress.set_downtime(downtime);
                    self.summary.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
                    self.summary.destination_resumed_at_unix = Some(unix_nanos as f64 / 1e9);
                }
                Message::SwitchoverAck => {}
                Message::Shut { error: None } => {
                    let _ = crate::postcopy::send_end(urgent.as_ref());
                    return Ok(());
                }
                Message::Shut { error: Some(e) } => return Err(MigrationError::Destination(e)),
                other => return Err(unexpected("PAGE_REQUEST, RESUMED or SHUT", &other)),
            }
        }
    }
}

/// Holds the push threads until the destination runs the guest.
#[derive(Default)]
struct PushGate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl PushGate {
    fn wait(&self) {
        let open = self.open.lock().unwrap();
        drop(self.opened.wait_while(open, |o| !*o).unwrap());
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// Connects postcopy's 1 + K preempt channels (after SETUP_ACK: the
/// destination accepts them then) and waits until each is accepted.
pub(super) fn open_preempt(
    uri: &ChannelUri,
    opts: &OutgoingOptions,
    session: SessionId,
) -> Result<Vec<Arc<dyn Channel>>, MigrationError> {
    let tuning = SocketTuning {
        user_timeout: Some(opts.peer_timeout),
        ..opts.tuning.clone()
    };
    let mut out: Vec<Arc<dyn Channel>> = Vec::new();
    for i in 0..=opts.channels {
        let hello = ChannelHello {
            session,
            role: Role::Preempt,
            index: i,
            multifd_channels: opts.channels,
        };
        let ch = connect_channel_secure(uri, &tuning, &hello, opts.tls.as_deref())?;
        out.push(Arc::from(ch));
    }
    for ch in &out {
        await_accept(ch.as_ref(), opts.setup_timeout)?;
        ch.set_write_timeout(Some(opts.peer_timeout))
            .map_err(|source| MigrationError::MainIo {
                what: "setting the preempt channel's timeout".into(),
                source,
            })?;
    }
    Ok(out)
}

/// Whether the destination's clean SHUT (postcopy completed) comes within
/// `timeout`, past any page requests still queued.
fn completed_meanwhile(rp: &ReturnPath, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while let Ok(m) = rp.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        match m {
            Ok(Message::Shut { error: None }) => return true,
            Ok(Message::PageRequest(_) | Message::SwitchoverAck) => continue,
            _ => return false,
        }
    }
    false
}
