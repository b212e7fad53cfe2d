//! The destination's postcopy phase: `postcopy_in`, after the package.
//! A child module of `incoming.rs` (declared there with `#[path]`), so it
//! reaches the destination's private state; the data path itself is
//! [`crate::postcopy`]. Owns the destination's pause and recovery loop
//! (`recover`, `resume`) and the thread watching the main channel.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_multifd::ReceiverPool;
use ferry_ram::{Digest, GuestMemory};

use ferry_transport::{ChannelUri, Listener, SessionId, SocketTuning};

use super::{Event, IncomingOptions, Received};
use crate::protocol::{heartbeat_interval, MainChannel, Message};
use crate::session::{Phase, Phases};
use crate::{MigrationError, Summary};

/// Postcopy on the destination (after the package): the precopy stream
/// has ended; the memory is registered with userfaultfd, the stale pages
/// dropped, the guest built from the package's device state and resumed
/// (RESUMED ends the downtime), its faults asked for on the return path
/// and served on the preempt channels with the background push; SHUT
/// (from `run`) tells the source once every page is placed.
///
/// A link failure (a channel breaks, the main channel goes silent, a
/// request cannot be sent) pauses: postcopy-paused, the guest's threads
/// on missing pages blocked, new faults held. `recover URI` (or, with
/// `--postcopy-recover auto`, by itself) listens again
/// (postcopy-recover-setup), takes the source's main and preempt
/// channels of this session only, sends the received-pages bitmap
/// (postcopy-recover), asks again for the pages requested and not placed,
/// and goes on (postcopy-active). A failure that no recovery mends (a bad
/// frame) leaves the guest's threads on missing pages blocked for good
/// (the guest and the userfaultfd are never released: the process ends
/// with them), never running on a page it was not sent.
#[allow(clippy::too_many_arguments)]
pub(super) fn postcopy_in(
    main: &Arc<MainChannel>,
    inbox: &mpsc::Receiver<Event>,
    pool: ReceiverPool,
    memory: Arc<GuestMemory>,
    preempt: Vec<Box<dyn ferry_transport::Channel>>,
    recovery: Option<(&Listener, SessionId, u16)>,
    opts: &IncomingOptions,
    phases: &mut Phases,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    use crate::postcopy::{wire, PostcopyDestination};
    let progress = phases.progress();
    if preempt.is_empty() {
        return Err(MigrationError::Protocol(
            "POSTCOPY_PACKAGE without the postcopy capability".into(),
        ));
    }
    let t0 = Instant::now();
    let step = |what: &str| {
        tracing::debug!(
            at_ms = t0.elapsed().as_secs_f64() * 1e3,
            "postcopy switch (destination): {what}"
        )
    };
    let package = out.package.take().unwrap_or_default();
    let (discard, device_state) = wire::decode_package(&package, &memory.specs())?;
    step("package decoded");
    // No pass landed here: every page is still to come, so a discard list
    // that leaves one out would have it taken as final, never sent.
    if summary.passes == 0 {
        wire::check_whole_discard(&discard)?;
    }
    // A page whose last precopy copy failed its checksum was written
    // while in flight: it is stale, in the discard list, and comes again.
    let counters = pool.counters().clone();
    let page_sizes: Vec<u64> = memory
        .blocks()
        .iter()
        .map(|b| u64::from(b.page_size()))
        .collect();
    let finished = pool.finish_within_resending(Some(opts.peer_timeout), |block, offset| {
        discard
            .get(block)
            .is_some_and(|d| d.test(offset / page_sizes[block]))
    });
    summary.add_totals(&counters.snapshot());
    finished?;
    step("precopy stream finished");
    phases.enter(Phase::PostcopyActive)?;
    progress.set_phase("postcopy-active");
    summary.device_state_bytes = device_state.len() as u64;
    summary.device_state_digest = Some(Digest::of_bytes(&device_state).to_string());
    out.device_state = device_state;
    let t = Instant::now();
    let early = out.early_dropped.take();
    let mut pc =
        PostcopyDestination::start(memory.clone(), &discard, early.as_deref(), requester(main))?;
    pc.ask_for_regions(out.postcopy_regions);
    step("memory registered, stale pages dropped");
    // The replay check knows the synthetic guest's writes only; any other
    // guest (the KVM micro-VM checks its own memory) gets no reference, a
    // copy of its whole memory for nothing.
    if opts.postcopy_reference && crate::synthetic::is_synthetic_state(&out.device_state) {
        pc.keep_reference();
    }
    // preempt[0] carries the answers to page requests; the others the push.
    for (i, ch) in preempt.into_iter().enumerate() {
        if i == 0 {
            pc.read_pages(Arc::from(ch))?;
        } else {
            pc.read_background_pages(Arc::from(ch))?;
        }
    }
    step("page readers started");
    watch_main(main.clone(), &pc);
    let guest = (opts.build_guest)(memory, &out.device_state)?;
    step("guest built");
    guest.resources().activate()?;
    if let Some(keep) = &opts.keep {
        keep(&out.device_state).map_err(MigrationError::Keep)?;
    }
    guest.resume()?;
    step("guest resumed");
    summary.resume_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    summary.guest_running = true;
    tracing::info!("the guest runs here (postcopy)");
    let sent = main.send(&Message::Resumed {
        unix_nanos: crate::outgoing::unix_nanos(),
        digest: None,
    });
    if let Err(e) = sent {
        pc.pause_link(&format!("sending RESUMED: {e}"));
    }
    let mut current = main.clone();
    let mut recoveries = 0u64;
    let mut gave_up: Option<String> = None;
    // Wait for every page; a link failure pauses, then recovers.
    while !pc.wait_ended(Duration::from_millis(50)) {
        progress.set_postcopy_live(crate::PostcopyLive {
            pages_left: pc.missing(),
            requests: pc.requests(),
            bytes: pc.bytes(),
        });
        // A cancel is refused in postcopy; the pool has finished, and the
        // main channel is watched by `watch_main`.
        while inbox.try_recv().is_ok() {}
        let Some(why) = pc.paused() else { continue };
        current.stop_heartbeat();
        current.channel().shutdown();
        match recover(&mut pc, &why, recovery, opts, phases) {
            Ok(now) => {
                recoveries += 1;
                current = now.clone();
                out.recovered_main = Some(now);
            }
            Err(e) => {
                gave_up = Some(e);
                pc.fail("given up in postcopy-paused");
                break;
            }
        }
    }
    let stats = pc.finish(opts.peer_timeout);
    let s = pc.stats();
    progress.set_postcopy_live(crate::PostcopyLive {
        pages_left: pc.missing(),
        requests: s.requests,
        bytes: s.bytes,
    });
    summary.postcopy = Some(crate::PostcopyReport {
        postcopy_requests: s.requests,
        postcopy_bytes: s.bytes,
        postcopy_discarded_pages: s.discarded_pages,
        postcopy_early_discarded_pages: early
            .as_ref()
            .map(|e| e.iter().map(ferry_ram::PageBitmap::count).sum()),
        fault_latency_p50_us: Some(s.fault_p50_us),
        fault_latency_p99_us: Some(s.fault_p99_us),
        fault_latency_max_us: Some(s.fault_max_us),
        guest_blocked_ms: Some(s.blocked_ms),
        postcopy_duplicate_pages: Some(s.duplicate_pages),
        postcopy_huge_pages_moved: Some(s.huge_pages_moved),
        recoveries,
        ..Default::default()
    });
    summary.wire_bytes += s.bytes;
    match (stats, gave_up) {
        (Ok(_), None) => {
            out.reference = pc
                .reference()
                .and_then(|mut r| (r.len() == 1).then(|| r.remove(0)));
            out.guest = Some(guest);
            Ok(())
        }
        (stats, gave_up) => {
            let e = gave_up.unwrap_or_else(|| {
                stats
                    .err()
                    .map_or_else(|| "failed".to_string(), |e| e.to_string())
            });
            if !matches!(phases.phase(), Phase::PostcopyPaused) {
                let _ = phases.enter(Phase::PostcopyPaused);
            }
            // Paused for good: the guest's threads on missing pages stay
            // blocked, and nothing may release them onto zero pages.
            std::mem::forget(guest);
            std::mem::forget(pc);
            Err(MigrationError::PostcopyPaused(e))
        }
    }
}

/// Page requests go out on `main` (the return path).
fn requester(main: &Arc<MainChannel>) -> crate::postcopy::RequestFn {
    let to_source = main.clone();
    Arc::new(move |run| {
        to_source
            .send(&Message::PageRequest(run))
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// Reads `main` (heartbeats) until it fails, which pauses this link of
/// `pc` (a later link is not touched).
fn watch_main(main: Arc<MainChannel>, pc: &crate::postcopy::PostcopyDestination) {
    let pause = pc.pauser();
    let _ = std::thread::Builder::new()
        .name("ferry-pc-main".into())
        .spawn(move || loop {
            match main.recv("source") {
                Ok((m, _)) => tracing::warn!("{} from the source in postcopy, ignored", m.name()),
                Err(e) => return pause(&format!("main channel: {e}")),
            }
        });
}

/// `postcopy_pause_incoming` then `migration_ioc_process_incoming` for a
/// resume (seed 004): postcopy-paused until `recover URI` (or at once,
/// again and again, with `--postcopy-recover auto`), then one attempt to
/// take the session's channels back; a failed attempt pauses again.
/// Returns the new main channel, or why it was given up.
fn recover(
    pc: &mut crate::postcopy::PostcopyDestination,
    why: &str,
    recovery: Option<(&Listener, SessionId, u16)>,
    opts: &IncomingOptions,
    phases: &mut Phases,
) -> Result<Arc<MainChannel>, String> {
    let progress = phases.progress();
    let Some((listener, session, count)) = recovery else {
        return Err(format!("{why} (no listener to recover on)"));
    };
    let mut why = why.to_string();
    loop {
        tracing::warn!("postcopy-paused: {why}");
        phases
            .enter(Phase::PostcopyPaused)
            .map_err(|e| e.to_string())?;
        progress.set_phase("postcopy-paused");
        let since = Instant::now();
        let fresh: Option<Listener> = loop {
            if let Some(u) = progress.take_recover() {
                if u == listener.uri().to_string() {
                    break None;
                }
                let bound = u
                    .parse::<ChannelUri>()
                    .map_err(|e| e.to_string())
                    .and_then(|uri| {
                        Listener::bind(&uri, SocketTuning::default()).map_err(|e| e.to_string())
                    });
                match bound {
                    Ok(l) => {
                        break Some(match listener.tls() {
                            Some(tls) => l.with_tls(tls),
                            None => l,
                        })
                    }
                    Err(e) => tracing::error!("recover {u}: {e}"),
                }
            }
            if opts.postcopy_recover == crate::postcopy::RecoverMode::Auto {
                break None;
            }
            if let Some(t) = opts.postcopy_paused_timeout {
                if since.elapsed() >= t {
                    return Err(format!(
                        "{why}; no recovery within {:.1} s",
                        t.as_secs_f64()
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let on = fresh.as_ref().unwrap_or(listener);
        phases
            .enter(Phase::PostcopyRecoverSetup)
            .map_err(|e| e.to_string())?;
        progress.set_phase("postcopy-recover-setup");
        tracing::info!(uri = %on.uri(), "postcopy: waiting for the source's channels");
        let wait = opts
            .postcopy_paused_timeout
            .map_or(opts.accept.rest_timeout, |t| {
                t.min(opts.accept.rest_timeout)
            });
        match ferry_transport::accept_recovery(on, session, count, Some(wait), &opts.accept)
            .map_err(|e| e.to_string())
            .and_then(|ch| resume(pc, ch.main, ch.preempt, opts, phases))
        {
            Ok(main) => {
                phases
                    .enter(Phase::PostcopyActive)
                    .map_err(|e| e.to_string())?;
                progress.set_phase("postcopy-active");
                return Ok(main);
            }
            Err(e) => why = format!("recovery failed: {e}"),
        }
    }
}

/// The channels are in: send the received-pages bitmap, then resume the
/// page flow on them.
fn resume(
    pc: &mut crate::postcopy::PostcopyDestination,
    main: Box<dyn ferry_transport::Channel>,
    preempt: Vec<Box<dyn ferry_transport::Channel>>,
    opts: &IncomingOptions,
    phases: &mut Phases,
) -> Result<Arc<MainChannel>, String> {
    phases
        .enter(Phase::PostcopyRecover)
        .map_err(|e| e.to_string())?;
    phases.progress().set_phase("postcopy-recover");
    let received = pc.received();
    let held: u64 = received.iter().map(ferry_ram::PageBitmap::count).sum();
    main.write_all(&crate::postcopy::wire::encode_received(&received))
        .map_err(|e| format!("sending the received-pages bitmap: {e}"))?;
    tracing::info!(held, "received-pages bitmap sent");
    let main = MainChannel::new(Arc::from(main), opts.peer_timeout).map_err(|e| e.to_string())?;
    main.start_heartbeat(heartbeat_interval(opts.peer_timeout))
        .map_err(|e| e.to_string())?;
    pc.resume_link(
        requester(&main),
        preempt.into_iter().map(Arc::from).collect(),
    )
    .map_err(|e| e.to_string())?;
    watch_main(main.clone(), pc);
    Ok(main)
}
