//! The destination's postcopy phase: `postcopy_in`, after the package.
//! A child module of `incoming.rs` (declared there with `#[path]`), so it
//! reaches the destination's private state; the data path itself is
//! [`crate::postcopy`].

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry_multifd::ReceiverPool;
use ferry_ram::{Digest, GuestMemory};

use super::{Event, IncomingOptions, Received};
use crate::protocol::{MainChannel, Message};
use crate::session::{Phase, Phases};
use crate::{MigrationError, Summary};

/// Postcopy on the destination (after the package): the precopy stream
/// has ended; the memory is registered with userfaultfd, the stale pages
/// dropped, the guest built from the package's device state and resumed
/// (RESUMED ends the downtime), its faults asked for on the return path
/// and served on the preempt channels with the background push; SHUT
/// (from `run`) tells the source once every page is placed. A failure
/// after the resume leaves the guest's threads on missing pages blocked
/// for good (the guest and the userfaultfd are never released: the
/// process ends with them), never running on a page it was not sent.
#[allow(clippy::too_many_arguments)]
pub(super) fn postcopy_in(
    main: &Arc<MainChannel>,
    inbox: &mpsc::Receiver<Event>,
    pool: ReceiverPool,
    memory: Arc<GuestMemory>,
    preempt: Vec<Box<dyn ferry_transport::Channel>>,
    opts: &IncomingOptions,
    phases: &mut Phases,
    summary: &mut Summary,
    out: &mut Received,
) -> Result<(), MigrationError> {
    use crate::postcopy::{wire, PostcopyDestination, RequestFn};
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
    let to_source = main.clone();
    let request: RequestFn = Arc::new(move |run| {
        to_source
            .send(&Message::PageRequest(run))
            .map(drop)
            .map_err(|e| e.to_string())
    });
    let t = Instant::now();
    let mut pc = PostcopyDestination::start(memory.clone(), &discard, request)?;
    step("memory registered, stale pages dropped");
    // preempt[0] carries the answers to page requests; the others the push.
    for (i, ch) in preempt.into_iter().enumerate() {
        if i == 0 {
            pc.read_pages(Arc::from(ch))?;
        } else {
            pc.read_background_pages(Arc::from(ch))?;
        }
    }
    step("page readers started");
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
    let mut failure = sent.err().map(|e| e.to_string());
    // Wait for every page, watching the main channel: its failure is the
    // link's.
    while failure.is_none() && !pc.wait_ended(Duration::from_millis(50)) {
        progress.set_postcopy_live(crate::PostcopyLive {
            pages_left: pc.missing(),
            requests: pc.requests(),
            bytes: pc.bytes(),
        });
        match inbox.try_recv() {
            Ok(Event::Main(Err(e))) => failure = Some(e.to_string()),
            Ok(Event::Main(Ok((m, _)))) => {
                failure = Some(format!(
                    "unexpected {} from the source in postcopy",
                    m.name()
                ))
            }
            // A cancel is refused in postcopy; the pool has finished.
            Ok(Event::Cancelled | Event::MultifdFailed) => {}
            Err(_) => {}
        }
    }
    if let Some(why) = &failure {
        pc.fail(why);
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
        fault_latency_p50_us: Some(s.fault_p50_us),
        fault_latency_p99_us: Some(s.fault_p99_us),
        fault_latency_max_us: Some(s.fault_max_us),
        guest_blocked_ms: Some(s.blocked_ms),
        postcopy_duplicate_pages: Some(s.duplicate_pages),
    });
    summary.wire_bytes += s.bytes;
    match stats {
        Ok(_) => {
            out.guest = Some(guest);
            Ok(())
        }
        Err(e) => {
            let _ = phases.enter(Phase::PostcopyPaused);
            // Paused for good: the guest's threads on missing pages stay
            // blocked, and nothing may release them onto zero pages.
            std::mem::forget(guest);
            std::mem::forget(pc);
            Err(MigrationError::PostcopyPaused(e.to_string()))
        }
    }
}
