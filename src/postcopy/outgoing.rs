//! The source's postcopy phase: `Source::postcopy` (the switch, then the
//! page requests served until the destination's SHUT), the preempt
//! channels' connection, the completion check, and recovery: a link that
//! fails pauses (postcopy-paused, the guest paused here for good) until
//! `resume URI` or `--postcopy-recover auto` reconnects every channel
//! and the destination's received-pages bitmap says what to send again. A child module of
//! `outgoing.rs` (declared there with `#[path]`), so it reaches the
//! source's private state; the data path itself is [`crate::postcopy`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_ram::{Digest, PageBitmap};
use ferry_transport::{
    await_accept, connect_channel_secure, Channel, ChannelHello, ChannelUri, Role, SessionId,
    SocketTuning,
};

use std::sync::OnceLock;

use super::{
    local_or_destination, spawn_return_path, unexpected, Link, MainChannel, OutgoingOptions,
    RecvTimeoutError, ReturnPath, Source, POLL,
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
        //
        // Meanwhile the destination drops the pages dirty so far
        // (EARLY_DISCARD), most of the discard list: the downtime then
        // drops only those dirtied since (on 1 GiB at 1 GiB/s, 25-50 ms of
        // freeing pages fewer inside it).
        let early = if session.passes() > 0 {
            session.sync()?;
            let list = crate::postcopy::wire::encode_discard(session.pending());
            self.summary.wire_bytes += s.main.send(&Message::EarlyDiscard(list))?;
            Some(session.pending().iter().map(PageBitmap::count).sum::<u64>())
        } else {
            None
        };
        let t = Instant::now();
        let mut dropped = false;
        while early.is_some() && !(s.switchover_acked && dropped) {
            let what = if s.switchover_acked {
                "EARLY_DISCARDED"
            } else {
                "SWITCHOVER_ACK"
            };
            match super::wait_reply(self.progress, &s.return_path, self.opts.setup_timeout, what)? {
                Message::SwitchoverAck => s.switchover_acked = true,
                Message::EarlyDiscarded => dropped = true,
                Message::Shut { error: Some(e) } => return Err(MigrationError::Destination(e)),
                other => return Err(unexpected(what, &other)),
            }
        }
        if early.is_some() {
            tracing::debug!(
                waited_ms = t.elapsed().as_secs_f64() * 1e3,
                "postcopy switch (source): the passes landed and the pages dirty so far \
                 were dropped there, guest still running"
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
        // Kept whole: a recovery sends again what of it the destination lacks.
        let discarded: Vec<PageBitmap> = discard
            .iter()
            .map(|b| PageBitmap::from_words(b.pages(), &b.to_words()).expect("its own words"))
            .collect();
        let stale: u64 = discard.iter().map(PageBitmap::count).sum();
        let package = crate::postcopy::wire::encode_package(&discard, &device_state);
        step("package built");
        self.in_postcopy = true;
        self.handed_over = true;
        // From here on the destination may run the guest: any failure
        // pauses (the package may have arrived whole even if this send
        // failed), never resumes here.
        let package_sent = s.main.send(&Message::PostcopyPackage(package));
        if let Ok(n) = package_sent {
            self.summary.wire_bytes += n;
            step("package sent");
        }
        let mut report = crate::PostcopyReport {
            postcopy_discarded_pages: stale,
            postcopy_early_discarded_pages: early,
            ..Default::default()
        };
        let mut server = Arc::new(crate::postcopy::PageServer::new(
            self.memory.clone(),
            discard,
        ));
        let mut resumed_seen = false;
        let mut first = Some(package_sent);
        let result = loop {
            let served = match first.take() {
                Some(Err(e)) => Err(Served::LinkLost(format!("sending the package: {e}"))),
                _ => self.serve_link(s, &server, paused_at, &mut resumed_seen),
            };
            let (requests, request_bytes, pushed_bytes) = server.figures();
            let duplicate = server.duplicate_bytes();
            report.postcopy_requests += requests;
            report.postcopy_bytes += request_bytes + pushed_bytes;
            *report.postcopy_duplicate_bytes.get_or_insert(0) += duplicate;
            if report.recoveries > 0 {
                // What filled the pages the destination lacked, and the
                // second copies of request answers, apart.
                *report.recovery_bytes.get_or_insert(0) +=
                    request_bytes.saturating_sub(duplicate) + pushed_bytes;
                *report.recovery_duplicate_bytes.get_or_insert(0) += duplicate;
            }
            self.summary.wire_bytes += request_bytes + pushed_bytes;
            self.progress.set_postcopy_live(crate::PostcopyLive {
                pages_left: server.pending_pages(),
                requests: report.postcopy_requests,
                bytes: report.postcopy_bytes,
            });
            let why = match served {
                Ok(()) => break Ok(()),
                Err(Served::Failed(e)) => break Err(e),
                Err(Served::LinkLost(why)) => why,
            };
            // postcopy_pause: the guest stays paused here whatever comes.
            match self.pause_and_recover(session, s, &discarded, &why) {
                Ok((next, lacked)) => {
                    report.recoveries += 1;
                    *report.recovery_missing_pages.get_or_insert(0) += lacked;
                    server = next;
                }
                Err(e) => break Err(e),
            }
        };
        self.summary.postcopy = Some(report);
        result?;
        // The guest stays paused here for good: memory is as it was at
        // the switch, the reference for the destination's replay check.
        let (memory, digest) = self.switchover_digest(&device_state);
        self.summary.switchover_digest = Some(digest.to_string());
        self.summary.digest = Some(memory.to_string());
        Ok(())
    }

    /// Serves one link until the destination's SHUT (`Ok`), a failure of
    /// the link (`LinkLost`: pause and recover) or one that no recovery
    /// mends (`Failed`: the destination gave up, or broke the protocol).
    fn serve_link(
        &mut self,
        s: &mut Link,
        server: &Arc<crate::postcopy::PageServer>,
        paused_at: Instant,
        resumed_seen: &mut bool,
    ) -> Result<(), Served> {
        let lost: Arc<std::sync::Mutex<Option<String>>> = Default::default();
        let preempt = self.opts.postcopy_preempt;
        // On the first link the push waits for RESUMED: until then the
        // destination drops its stale pages and starts the guest (the
        // downtime), and on a machine of few cores the push would take
        // the CPUs from it. After a recovery the guest runs already.
        let gate = Arc::new(PushGate::default());
        if *resumed_seen {
            gate.open();
        }
        let pushers: Vec<_> = s.preempt[1..]
            .iter()
            .enumerate()
            .map(|(i, ch)| {
                let (server, ch, lost, gate) =
                    (server.clone(), ch.clone(), lost.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    if let Err(e) = server.push(ch.as_ref(), !preempt && i == 0) {
                        lost.lock().unwrap().get_or_insert(e.to_string());
                    }
                })
            })
            .collect();
        if !preempt {
            // Nothing goes on the preempt channel but its END.
            if let Err(e) = crate::postcopy::send_end(s.preempt[0].as_ref()) {
                lost.lock().unwrap().get_or_insert(e.to_string());
            }
        }
        // This thread answers requests: ahead of every ordinary thread
        // while it does (the push threads above were started before, and
        // never inherit it).
        let before = crate::postcopy::raise_priority("request server");
        // And the thread that reads the requests off the main channel
        // (`spawn_return_path`, named "ferry-return-path"), which answers
        // them itself as it reads them (a request it cannot answer comes
        // here, and its failure with it).
        crate::postcopy::raise_threads_named("ferry-return-pa", "return path");
        if preempt {
            let (server, urgent) = (server.clone(), s.preempt[0].clone());
            *s.answer_requests.lock().unwrap() = Some(Box::new(move |run| {
                server.serve(run, "return path", urgent.as_ref()).is_ok()
            }));
        }
        let mut served = self.serve_requests(s, server, paused_at, resumed_seen, &lost, &gate);
        crate::postcopy::restore_priority(before);
        if let Err(Served::LinkLost(_)) = &served {
            // A destination that ends (completed, or gave up and said why
            // on SHUT) closes its page channels first: its word comes
            // right after, and no recovery is wanted then.
            if let Some(end) = destination_word(&s.return_path) {
                served = end;
            }
        }
        if served.is_err() {
            // First: an answer the return-path reader is writing to a peer
            // that no longer reads must fail, not hold the hook's lock.
            for ch in &s.preempt {
                ch.shutdown();
            }
        }
        s.answer_requests.lock().unwrap().take();
        // Pushers still at the gate (the link failed before RESUMED) run
        // into their closed channels and end.
        gate.open();
        for p in pushers {
            // A push cut short once every page is placed (the destination
            // closed its channels after SHUT) changes nothing.
            let _ = p.join();
        }
        served
    }

    /// Answers page requests until the destination's SHUT.
    fn serve_requests(
        &mut self,
        s: &mut Link,
        server: &crate::postcopy::PageServer,
        paused_at: Instant,
        resumed_seen: &mut bool,
        lost: &std::sync::Mutex<Option<String>>,
        gate: &PushGate,
    ) -> Result<(), Served> {
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
            if let Some(why) = lost.lock().unwrap().take() {
                return Err(Served::LinkLost(why));
            }
            let m = match s.return_path.recv_timeout(POLL) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(Served::LinkLost(e.to_string())),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Served::LinkLost(
                        "the destination's return path closed in postcopy".into(),
                    ))
                }
            };
            match m {
                Message::PageRequest(run) => {
                    let served = if self.opts.postcopy_preempt {
                        server.serve(&run, "return path", urgent.as_ref())
                    } else {
                        server.queue(&run, "return path")
                    };
                    match served {
                        Ok(()) => {}
                        // A request sent just before the destination placed
                        // its last page (by the push) finds the preempt
                        // channel closed: its SHUT says it completed.
                        Err(e @ crate::postcopy::PostcopyError::Io { .. }) => {
                            if completed_meanwhile(&s.return_path, self.opts.peer_timeout) {
                                return Ok(());
                            }
                            return Err(Served::LinkLost(e.to_string()));
                        }
                        Err(e) => return Err(Served::Failed(e.into())),
                    }
                }
                Message::Resumed { unix_nanos, .. } if !*resumed_seen => {
                    *resumed_seen = true;
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
                Message::Resumed { .. } | Message::SwitchoverAck => {}
                Message::Shut { error: None } => {
                    let _ = crate::postcopy::send_end(urgent.as_ref());
                    return Ok(());
                }
                Message::Shut { error: Some(e) } => {
                    return Err(Served::Failed(MigrationError::Destination(e)))
                }
                other => {
                    return Err(Served::Failed(unexpected(
                        "PAGE_REQUEST, RESUMED or SHUT",
                        &other,
                    )))
                }
            }
        }
    }

    /// `postcopy_pause` and `postcopy_do_resume` (seed 004): the link is
    /// lost (`why`); every channel is shut, the phase is postcopy-paused,
    /// and the guest stays paused here. Then, on `resume URI` (or by
    /// itself with `--postcopy-recover auto`, with backoff), every channel
    /// is connected again with the session's id (postcopy-recover-setup),
    /// the destination's received-pages bitmap is read and checked, and a
    /// server for the pages it lacks is returned with their count
    /// (postcopy-recover → postcopy-active). A failed attempt pauses again.
    fn pause_and_recover(
        &mut self,
        session: &mut Session,
        s: &mut Link,
        discarded: &[PageBitmap],
        why: &str,
    ) -> Result<(Arc<crate::postcopy::PageServer>, u64), MigrationError> {
        let mut why = why.to_string();
        let mut backoff = Duration::from_millis(100);
        loop {
            tracing::warn!("postcopy-paused: {why}");
            s.main.stop_heartbeat();
            s.main.channel().shutdown();
            for ch in &s.preempt {
                ch.shutdown();
            }
            session.enter(Phase::PostcopyPaused)?;
            self.progress.set_phase("postcopy-paused");
            let since = Instant::now();
            let uri = loop {
                if let Some(u) = self.progress.take_recover() {
                    match u.parse::<ChannelUri>() {
                        Ok(u) => break u,
                        Err(e) => tracing::error!("resume {u}: {e}"),
                    }
                }
                if self.opts.postcopy_recover == crate::postcopy::RecoverMode::Auto
                    && since.elapsed() >= backoff
                {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    break self.uri.clone();
                }
                if let Some(t) = self.opts.postcopy_paused_timeout {
                    if since.elapsed() >= t {
                        return Err(MigrationError::PostcopyPaused(format!(
                            "{why}; no recovery within {:.1} s",
                            t.as_secs_f64()
                        )));
                    }
                }
                std::thread::sleep(POLL);
            };
            session.enter(Phase::PostcopyRecoverSetup)?;
            self.progress.set_phase("postcopy-recover-setup");
            tracing::info!(%uri, "postcopy: reconnecting every channel");
            match self.reconnect(session, s, &uri, discarded) {
                Ok(next) => {
                    session.enter(Phase::PostcopyActive)?;
                    self.progress.set_phase("postcopy-active");
                    tracing::info!(
                        lacked = next.1,
                        "postcopy recovered: sending what the destination lacks"
                    );
                    return Ok(next);
                }
                Err(e) => why = format!("recovery through {uri} failed: {e}"),
            }
        }
    }

    /// One recovery attempt (`migrate_handle_rp_recv_bitmap` here).
    fn reconnect(
        &mut self,
        session: &mut Session,
        s: &mut Link,
        uri: &ChannelUri,
        discarded: &[PageBitmap],
    ) -> Result<(Arc<crate::postcopy::PageServer>, u64), MigrationError> {
        let opts = self.opts;
        let tuning = SocketTuning {
            user_timeout: Some(opts.peer_timeout),
            ..opts.tuning.clone()
        };
        let hello = ChannelHello {
            session: s.session,
            role: Role::Main,
            index: 0,
            multifd_channels: opts.channels,
        };
        let main: Arc<dyn Channel> = Arc::from(connect_channel_secure(
            uri,
            &tuning,
            &hello,
            opts.tls.as_deref(),
        )?);
        let preempt = match open_preempt(uri, opts, s.session) {
            Ok(p) => p,
            Err(e) => {
                main.shutdown();
                return Err(e);
            }
        };
        let shut_all = || {
            main.shutdown();
            for ch in &preempt {
                ch.shutdown();
            }
        };
        if let Err(e) = await_accept(main.as_ref(), opts.setup_timeout) {
            shut_all();
            return Err(e.into());
        }
        session.enter(Phase::PostcopyRecover)?;
        self.progress.set_phase("postcopy-recover");
        let _ = main.set_read_timeout(Some(opts.peer_timeout));
        let label = main.label().to_string();
        let received = crate::postcopy::wire::read_received(
            &mut |b| main.read_exact(b),
            &self.memory.specs(),
            &label,
        );
        let received = match received {
            Ok(r) => r,
            Err(e) => {
                shut_all();
                return Err(e.into());
            }
        };
        let missing = crate::postcopy::wire::still_missing(discarded, &received);
        let lacked: u64 = missing.iter().map(PageBitmap::count).sum();
        let new_main = MainChannel::new(main.clone(), opts.peer_timeout)?;
        new_main.start_heartbeat(crate::protocol::heartbeat_interval(opts.peer_timeout))?;
        let answer_requests = super::RequestHook::default();
        let return_path = spawn_return_path(
            new_main.clone(),
            Arc::new(OnceLock::new()),
            answer_requests.clone(),
        )?;
        s.main = new_main;
        s.return_path = return_path;
        s.answer_requests = answer_requests;
        s.preempt = preempt;
        let server = Arc::new(crate::postcopy::PageServer::new(
            self.memory.clone(),
            Arc::new(missing),
        ));
        Ok((server, lacked))
    }
}

/// The destination's SHUT, if it comes within a moment (before its main
/// channel closes): `Ok` if it completed, its error if it gave up.
fn destination_word(rp: &ReturnPath) -> Option<Result<(), Served>> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match rp.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(Message::Shut { error: None })) => return Some(Ok(())),
            Ok(Ok(Message::Shut { error: Some(e) })) => {
                return Some(Err(Served::Failed(MigrationError::Destination(e))))
            }
            Ok(Ok(_)) => continue,
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// How serving one postcopy link ended, when it did not complete.
enum Served {
    /// The link failed: pause, and recover.
    LinkLost(String),
    /// Nothing to recover: the destination gave up or broke the protocol.
    Failed(MigrationError),
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
