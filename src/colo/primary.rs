//! COLO's primary side ([`run_primary`]): opens the COLO session after the
//! migration, then takes checkpoints until failover or poweroff (see the
//! module doc of [`super`]).

use super::*;

/// The primary's side: after `migrate_out` completed (the guest paused,
/// handed over), opens a COLO session to the secondary at `uri` and runs
/// COLO until failover or poweroff. The guest runs on at the end unless
/// it was powered off (or the test killed this side).
#[allow(clippy::too_many_arguments)]
pub fn run_primary(
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    uri: &ChannelUri,
    link: &OutgoingOptions,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: Arc<dyn OutputSink>,
) -> ColoSummary {
    ctl.status.enter(ColoMode::Primary);
    let dead_flag = Arc::new(AtomicBool::new(false));
    let compare = Arc::new(Mutex::new(Comparator::new()));
    let mut figures = Figures::new();
    let killed = Arc::new(AtomicBool::new(false));
    let killer = spawn_killer(opts, ctl, &killed, Some(dead_flag.clone()));
    let result = primary_loop(
        guest,
        outputs,
        uri,
        link,
        opts,
        ctl,
        &sink,
        &compare,
        &dead_flag,
        &mut figures,
    );
    let detected = Instant::now();
    let result = wind_down(result, &killed, killer, opts, ctl);
    let (end, running) = match &result {
        Err(ColoRunError::Killed(_)) => {
            dead_flag.store(true, Ordering::SeqCst);
            let _ = guest.pause();
            ("killed", false)
        }
        Ok(()) => ("poweroff", false),
        Err(e) => {
            // The secondary is lost (or a failover was asked for): go on alone.
            tracing::warn!("COLO primary: {e}; going on alone");
            begin_failover(ctl, e);
            let mut c = compare.lock().unwrap();
            let released = c.secondary_lost(outputs.take());
            sink.release(&released);
            drop(c);
            let _ = guest.resume();
            ("failover", true)
        }
    };
    let failover_ms = (end == "failover").then(|| detected.elapsed().as_secs_f64() * 1e3);
    if end == "failover" {
        ctl.status.complete();
    }
    if end == "poweroff" {
        let _ = guest.pause();
    }
    let stats = compare.lock().unwrap().stats();
    let mut s = figures.summary("primary", ctl, stats, end, failover_ms, running);
    s.released = stats.released + figures.released;
    s
}

#[allow(clippy::too_many_arguments)]
fn primary_loop(
    guest: &dyn Guest,
    outputs: &Arc<OutputQueue>,
    uri: &ChannelUri,
    link: &OutgoingOptions,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: &Arc<dyn OutputSink>,
    compare: &Arc<Mutex<Comparator>>,
    dead_flag: &Arc<AtomicBool>,
    figures: &mut Figures,
) -> Result<(), ColoRunError> {
    let memory = guest.memory().clone();
    let log = guest
        .dirty_log()
        .ok_or_else(|| ColoRunError::Protocol("COLO needs a guest with a dirty log".into()))?;
    let link = OutgoingOptions {
        peer_timeout: opts.heartbeat_timeout,
        ..link.clone()
    };
    let (main, multifd) = open_session(uri, &link, SessionId::random())?;
    let main = MainChannel::new(Arc::from(main), opts.heartbeat_timeout)?;
    main.start_heartbeat(crate::protocol::heartbeat_interval(opts.heartbeat_timeout))?;
    let mut sender = link.sender.clone();
    sender.stall_timeout = Some(opts.heartbeat_timeout);
    // A checkpoint's pages are few and scattered: the largest packets the
    // path takes carry more of them per packet (1640 pages of 1 GiB went
    // in 6-13 ms with 128-page packets, 3-4 ms with 4096).
    sender.packet_pages = if link.tls.is_some()
        || (sender.path == ferry_multifd::SendPath::Splice && sender.compress.is_none())
    {
        ferry_multifd::MAX_PACKET_PAGES
    } else {
        COLO_SENDMSG_PACKET_PAGES
    };
    let packet_pages = sender.packet_pages;
    let mut pool = SenderPool::start(multifd, memory.clone(), sender)?;
    {
        let main = main.clone();
        *ctl.silencer.lock().unwrap() = Some(Box::new(move || main.stop_heartbeat()));
    }
    {
        let (abort, main) = (pool.aborter(), main.clone());
        *ctl.breaker.lock().unwrap() = Some(Box::new(move || {
            abort();
            main.channel().shutdown();
        }));
    }
    let setup = Setup {
        capabilities: CAP_COLO
            | if link.sender.checksum {
                CAP_CHECKSUM
            } else {
                0
            }
            | if link.sender.compress.is_some() {
                CAP_ZSTD
            } else {
                0
            },
        multifd_channels: link.channels,
        packet_pages,
        blocks: memory.specs(),
    };
    main.send(&Message::Setup(setup))?;
    colo_send(
        &main,
        &ColoMessage::ColoSetup {
            output_every: opts.output_every,
            verify: opts.verify,
        },
    )?;

    // The reader: outputs to the comparator, the rest to this loop.
    let expect = Arc::new(Mutex::new(Expect::new(Side::Primary)));
    let (tx, rx) = mpsc::channel::<Result<(ColoMessage, u64), ColoRunError>>();
    let reader = {
        let (main, expect, compare, sink, ctl, dead_flag) = (
            main.clone(),
            expect.clone(),
            compare.clone(),
            sink.clone(),
            ctl.clone(),
            dead_flag.clone(),
        );
        std::thread::Builder::new()
            .name("ferry-colo-read".into())
            .spawn(move || loop {
                let got = colo_recv(&main, "secondary").and_then(|(m, n)| {
                    expect.lock().unwrap().check(&m)?;
                    Ok((m, n))
                });
                match got {
                    Ok((ColoMessage::Output(records), _)) => {
                        let mut c = compare.lock().unwrap();
                        if dead_flag.load(Ordering::SeqCst) {
                            return;
                        }
                        if feed_records(&mut c, records, Comparator::secondary, &*sink) {
                            ctl.triggers.request(TriggerKind::Mismatch);
                        }
                    }
                    Ok(m) => {
                        if let ColoMessage::VmstateLoaded { .. } = &m.0 {
                            // The secondary equals this side now: release
                            // what was held, before any output of the
                            // secondary's next run is read.
                            let mut c = compare.lock().unwrap();
                            if dead_flag.load(Ordering::SeqCst) {
                                return;
                            }
                            let released = c.release_all();
                            sink.release(&released);
                        }
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        ctl.triggers.stop();
                        return;
                    }
                }
            })
            .map_err(|e| MigrationError::Thread("COLO reader", e))?
    };
    let link = PrimaryLink {
        guest,
        outputs,
        opts,
        ctl,
        sink,
        compare,
        dead_flag,
        main: &main,
        expect: &expect,
        log,
        memory: &memory,
    };
    let result = primary_checkpoints(link, figures, &mut pool, &rx);
    if matches!(result, Err(ColoRunError::Killed(_))) {
        dead_flag.store(true, Ordering::SeqCst);
    }
    if let Ok(()) = &result {
        // Poweroff: tell the secondary, then close.
        let _ = colo_send(&main, &ColoMessage::GuestShutdown);
        let _ = main.channel().finish();
    }
    main.stop_heartbeat();
    if ctl.silenced.load(Ordering::SeqCst) {
        // A hung host: the sockets stay open, silent, while the peer's
        // heartbeat timeout runs.
        std::thread::sleep(opts.heartbeat_timeout * 3);
    }
    pool.abort();
    main.channel().shutdown();
    let _ = reader.join();
    result
}

/// What the primary's checkpoint loop works with, set up by
/// `primary_loop` and handed to each checkpoint whole.
#[derive(Clone, Copy)]
struct PrimaryLink<'a> {
    guest: &'a dyn Guest,
    outputs: &'a Arc<OutputQueue>,
    opts: &'a ColoOptions,
    ctl: &'a Arc<ColoControl>,
    sink: &'a Arc<dyn OutputSink>,
    compare: &'a Arc<Mutex<Comparator>>,
    dead_flag: &'a Arc<AtomicBool>,
    main: &'a Arc<MainChannel>,
    expect: &'a Arc<Mutex<Expect>>,
    log: &'a dyn ferry_ram::DirtyLog,
    memory: &'a Arc<GuestMemory>,
}

fn primary_checkpoints(
    link: PrimaryLink<'_>,
    figures: &mut Figures,
    pool: &mut SenderPool,
    rx: &Receiver<Result<(ColoMessage, u64), ColoRunError>>,
) -> Result<(), ColoRunError> {
    let PrimaryLink {
        guest,
        outputs,
        opts,
        ctl,
        sink,
        compare,
        dead_flag,
        log,
        ..
    } = link;
    let wait = |what: &'static str| -> Result<(ColoMessage, u64), ColoRunError> {
        match rx.recv_timeout(opts.heartbeat_timeout * 2) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(ColoRunError::Protocol(format!(
                "no {what} from the secondary within {:.1} s (twice --heartbeat-timeout)",
                (opts.heartbeat_timeout * 2).as_secs_f64()
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(ColoRunError::Protocol(format!(
                "the COLO reader ended while {what} was due"
            ))),
        }
    };
    // CHECKPOINT_READY: the secondary's cache and receivers are ready.
    wait("CHECKPOINT_READY")?;
    // Outputs made before the switchover (the secondary starts after
    // them) went to the client as they would without COLO.
    let before = outputs.take();
    sink.release(&before);
    figures.released += before.len() as u64;
    // The guest's memory equals the secondary's cache now: track from here.
    log.start()?;
    guest.resume()?;
    let pump_stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let (outputs, compare, sink, ctl, dead_flag) = (
            outputs.clone(),
            compare.clone(),
            sink.clone(),
            ctl.clone(),
            dead_flag.clone(),
        );
        spawn_output_ticker(pump_stop.clone(), move || {
            feed_primary(&outputs, &compare, &*sink, &ctl, &dead_flag);
            true
        })?
    };
    let result = (|| -> Result<(), ColoRunError> {
        let mut n = 0u64;
        loop {
            if ctl.status.failover_pending() {
                return Err(ColoRunError::FailoverRequested);
            }
            if let Ok(m) = rx.try_recv() {
                // Only errors come between checkpoints.
                let m = m?;
                return Err(ColoRunError::Protocol(format!(
                    "{} from the secondary between checkpoints",
                    m.0.name()
                )));
            }
            if ctl.triggers.is_stopped() {
                return Err(ColoRunError::Protocol("COLO was stopped".into()));
            }
            if ctl.poweroff.load(Ordering::SeqCst) || opts.max_checkpoints.is_some_and(|m| n >= m) {
                guest.pause()?;
                return Ok(());
            }
            if ctl.triggers.wait(Duration::from_millis(20)).is_none() {
                continue;
            }
            n += 1;
            let r = primary_checkpoint(n, link, figures, pool, &wait);
            ctl.triggers.done();
            r?;
        }
    })();
    pump_stop.store(true, Ordering::SeqCst);
    let _ = pump.join();
    result
}

/// Feeds `records` to one side of the comparator (`side`:
/// [`Comparator::primary`] or [`Comparator::secondary`]), releasing to
/// `sink` what it lets go; true if any record mismatched.
fn feed_records(
    c: &mut Comparator,
    records: Vec<Record>,
    side: fn(&mut Comparator, Record) -> ferry_colo::compare::Fed,
    sink: &dyn OutputSink,
) -> bool {
    let mut mismatch = false;
    for r in records {
        let fed = side(c, r);
        mismatch |= fed.mismatch;
        if !fed.released.is_empty() {
            sink.release(&fed.released);
        }
    }
    mismatch
}

fn feed_primary(
    outputs: &OutputQueue,
    compare: &Mutex<Comparator>,
    sink: &dyn OutputSink,
    ctl: &ColoControl,
    dead_flag: &AtomicBool,
) {
    let records = outputs.take();
    if records.is_empty() {
        return;
    }
    let mut c = compare.lock().unwrap();
    if dead_flag.load(Ordering::SeqCst) {
        return;
    }
    let mismatch = feed_records(&mut c, records, Comparator::primary, sink);
    let s = c.stats();
    drop(c);
    {
        let mut l = ctl.live.lock().unwrap();
        l.mismatches = s.mismatches;
        l.released = s.released;
        l.held = s.held;
    }
    if mismatch {
        ctl.triggers.request(TriggerKind::Mismatch);
    }
}

fn primary_checkpoint(
    n: u64,
    link: PrimaryLink<'_>,
    figures: &mut Figures,
    pool: &mut SenderPool,
    wait: &dyn Fn(&'static str) -> Result<(ColoMessage, u64), ColoRunError>,
) -> Result<(), ColoRunError> {
    let PrimaryLink {
        guest,
        outputs,
        opts,
        ctl,
        sink,
        compare,
        dead_flag,
        main,
        expect,
        log,
        memory,
    } = link;
    let mut bytes = 0u64;
    let before = pool.counters().snapshot().wire_bytes;
    expect.lock().unwrap().requested(n);
    bytes += live_send(ctl, main, &ColoMessage::CheckpointRequest { checkpoint: n })?;
    dead(opts.kill, n, KillStage::AfterRequest, ctl, Some(dead_flag))?;
    let (_, b) = wait("CHECKPOINT_REPLY")?;
    bytes += b;
    guest.pause()?;
    let paused = Instant::now();
    let result = (|| -> Result<(), ColoRunError> {
        // Every output made before the pause is compared or held now.
        feed_primary(outputs, compare, &**sink, ctl, dead_flag);
        let dirty = Arc::new(fresh_bitmaps(memory));
        log.sync(&dirty)?;
        let synced = paused.elapsed();
        let pages: u64 = dirty.iter().map(PageBitmap::count).sum();
        let held = compare.lock().unwrap().held();
        bytes += live_send(
            ctl,
            main,
            &ColoMessage::VmstateSend {
                checkpoint: n,
                generation: pool.generation() + 1,
                dirty: RamCache::words_of(&dirty),
                held,
            },
        )?;
        dead(opts.kill, n, KillStage::MidCheckpoint, ctl, Some(dead_flag))?;
        pool.send_pass(dirty)?;
        let sent = paused.elapsed();
        let state = guest.save_device_state()?;
        bytes += live_send(
            ctl,
            main,
            &ColoMessage::VmstateSize {
                size: state.len() as u64,
            },
        )?;
        bytes += live_send(ctl, main, &ColoMessage::Vmstate(state))?;
        let digest = opts.verify.then(|| memory.digest().0);
        bytes += wait("VMSTATE_RECEIVED")?.1;
        let received = paused.elapsed();
        dead(opts.kill, n, KillStage::AfterReceived, ctl, Some(dead_flag))?;
        let (loaded, b) = wait("VMSTATE_LOADED")?;
        bytes += b;
        tracing::debug!(
            checkpoint = n,
            pages,
            synced_ms = synced.as_secs_f64() * 1e3,
            sent_ms = sent.as_secs_f64() * 1e3,
            received_ms = received.as_secs_f64() * 1e3,
            loaded_ms = paused.elapsed().as_secs_f64() * 1e3,
            "COLO checkpoint (times since the pause)"
        );
        if let (
            Some(primary),
            ColoMessage::VmstateLoaded {
                digest: Some(secondary),
                ..
            },
        ) = (digest, &loaded)
        {
            if primary != *secondary {
                return Err(ColoRunError::Diverged {
                    checkpoint: n,
                    primary,
                    secondary: *secondary,
                });
            }
        }
        bytes += pool.counters().snapshot().wire_bytes - before;
        figures.bytes.push(bytes);
        figures.pages.push(pages);
        Ok(())
    })();
    if result.is_ok() {
        guest.resume()?;
        let pause = paused.elapsed();
        let _ = figures.pauses.record(pause.as_micros() as u64);
        figures.pause_list.push(pause.as_micros() as u64);
        let mut l = ctl.live.lock().unwrap();
        l.checkpoints = n;
        l.last_pause_ms = pause.as_secs_f64() * 1e3;
        l.last_bytes = bytes;
    }
    result
}
