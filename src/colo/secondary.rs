//! COLO's secondary side ([`run_secondary`]): the guest builder that
//! keeps the RAM cache, and the loop that receives each checkpoint and
//! loads it (see the module doc of [`super`]).

use super::*;

/// What the secondary's guest builder leaves for [`run_secondary`].
pub struct SecondaryParts {
    /// The cache, a copy of the memory as migrated (taken before the
    /// guest first ran).
    pub cache: RamCache,
    pub outputs: Arc<OutputQueue>,
}

/// How a secondary builds a guest of a kind ferry does not know (the KVM
/// micro-VM of ferry-vmm, which depends on ferry): given the migrated
/// memory, the device state and the hook its outputs go to, `None` if the
/// state is not of its kind, else the guest paused, its dirty log
/// started, every `output_every`-th write of a vCPU an output record to
/// the hook (or an error saying why it cannot).
pub type ColoGuestKind = Arc<
    dyn Fn(Arc<GuestMemory>, &[u8], u64, OutputHook) -> Option<Result<Box<dyn Guest>, GuestError>>
        + Send
        + Sync,
>;

/// A guest builder for `recv --colo`: the synthetic guest, with its dirty
/// log started and its outputs queued before it first runs, and the RAM
/// cache copied from the migrated memory.
pub fn secondary_builder(
    output_every: u64,
    jitter_ppm: u32,
    tee: Option<OutputHook>,
) -> (GuestBuilder, Arc<OnceLock<SecondaryParts>>) {
    secondary_builder_with(output_every, jitter_ppm, tee, None)
}

/// [`secondary_builder`] that dispatches on the state's kind: the
/// synthetic guest's, or `other`'s (the KVM guest's, say). Jitter is the
/// synthetic guest's only: another kind's state with `jitter_ppm` > 0 is
/// refused.
pub fn secondary_builder_with(
    output_every: u64,
    jitter_ppm: u32,
    tee: Option<OutputHook>,
    other: Option<ColoGuestKind>,
) -> (GuestBuilder, Arc<OnceLock<SecondaryParts>>) {
    let parts: Arc<OnceLock<SecondaryParts>> = Arc::new(OnceLock::new());
    let slot = parts.clone();
    let builder: GuestBuilder = Arc::new(move |memory, state| {
        let synthetic = crate::synthetic::is_synthetic_state(state);
        if !synthetic && other.is_none() {
            return Err(GuestError::Control(
                "COLO's secondary runs the synthetic guest only here (no other kind of guest \
                 was given to its builder)"
                    .into(),
            ));
        }
        if !synthetic && jitter_ppm > 0 {
            return Err(GuestError::Control(
                "--colo-jitter makes the synthetic guest non-deterministic; this guest is not \
                 the synthetic one (a KVM guest's outputs follow its own state): leave it out"
                    .into(),
            ));
        }
        let outputs = OutputQueue::new();
        let queue = outputs.hook();
        let hook: OutputHook = match tee.clone() {
            Some(tee) => Arc::new(move |r| {
                tee(r);
                queue(r)
            }),
            None => queue,
        };
        // The cache is the memory as migrated, before the guest first runs.
        let cache = RamCache::copy_of(&memory).map_err(|e| GuestError::Control(format!("{e}")))?;
        let g: Box<dyn Guest> = if synthetic {
            let g = SyntheticGuest::from_device_state(
                memory,
                state,
                crate::TrackerKind::Bitmap,
                Resources::none(false),
            )?;
            g.dirty_log()
                .expect("synthetic guests have a log")
                .start()?;
            g.set_output(output_every, Some(hook));
            g.set_jitter(jitter_ppm);
            Box::new(g)
        } else {
            let build = other.as_ref().expect("checked above");
            match build(memory, state, output_every, hook) {
                None => {
                    return Err(GuestError::Control(
                        "COLO's secondary runs the synthetic or the KVM guest; this device \
                         state is neither's"
                            .into(),
                    ))
                }
                Some(r) => r?,
            }
        };
        let _ = slot.set(SecondaryParts { cache, outputs });
        Ok(g)
    });
    (builder, parts)
}

/// The secondary's side: after `migrate_in` completed with a guest from
/// [`secondary_builder`], accepts the primary's COLO session on
/// `listener` and runs COLO until failover or poweroff.
#[allow(clippy::too_many_arguments)]
pub fn run_secondary(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    listener: &Listener,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    sink: Arc<dyn OutputSink>,
) -> ColoSummary {
    ctl.status.enter(ColoMode::Secondary);
    let mut figures = Figures::new();
    // Outputs since the last commit (and those inherited with it).
    let since_commit = Arc::new(Mutex::new(Vec::<Record>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let killer = spawn_killer(opts, ctl, &killed, None);
    let result = secondary_loop(
        guest,
        parts,
        listener,
        opts,
        ctl,
        &since_commit,
        &mut figures,
    );
    let detected = Instant::now();
    let result = wind_down(result, &killed, killer, opts, ctl);
    let (end, running) = match &result {
        Err(ColoRunError::Killed(_)) => {
            let _ = guest.pause();
            ("killed", false)
        }
        Err(e @ ColoRunError::Refused(_)) => {
            // Never a replica: the primary goes on alone, this copy stops.
            let _ = guest.pause();
            ctl.status
                .request(FailoverReason::Error, Some(e.to_string()));
            ("refused", false)
        }
        Ok(()) => {
            let _ = guest.pause();
            ("poweroff", false)
        }
        Err(e) => {
            tracing::warn!("COLO secondary: {e}; taking over");
            begin_failover(ctl, e);
            // Whatever the client may lack: every output since the last
            // commit, then the rest as it comes.
            let mut mine = std::mem::take(&mut *since_commit.lock().unwrap());
            mine.extend(parts.outputs.take());
            sink.release(&mine);
            figures.released += mine.len() as u64;
            let _ = guest.resume();
            ("failover", true)
        }
    };
    let failover_ms = (end == "failover").then(|| detected.elapsed().as_secs_f64() * 1e3);
    if end == "failover" {
        ctl.status.complete();
    }
    figures.summary(
        "secondary",
        ctl,
        CompareStats::default(),
        end,
        failover_ms,
        running,
    )
}

/// Forwards the secondary's outputs to the sink after failover, until
/// `stop`; call on a thread of its own.
pub fn forward_outputs(outputs: &OutputQueue, sink: &dyn OutputSink, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(OUTPUT_TICK);
        let r = outputs.take();
        if !r.is_empty() {
            sink.release(&r);
        }
    }
    let r = outputs.take();
    if !r.is_empty() {
        sink.release(&r);
    }
}

fn secondary_loop(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    listener: &Listener,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    since_commit: &Arc<Mutex<Vec<Record>>>,
    figures: &mut Figures,
) -> Result<(), ColoRunError> {
    let memory = guest.memory().clone();
    let log = guest
        .dirty_log()
        .ok_or_else(|| ColoRunError::Protocol("COLO needs a guest with a dirty log".into()))?;
    let session = accept_session(
        listener,
        &AcceptOptions {
            first_timeout: Some(opts.setup_timeout),
            ..AcceptOptions::default()
        },
    )?;
    let main = MainChannel::new(Arc::from(session.main), opts.heartbeat_timeout)?;
    main.start_heartbeat(crate::protocol::heartbeat_interval(opts.heartbeat_timeout))?;
    let setup = match main.recv("primary")? {
        (Message::Setup(s), _) => s,
        (m, _) => {
            return Err(ColoRunError::Protocol(format!(
                "expected SETUP on the COLO session, got {}",
                m.name()
            )))
        }
    };
    if setup.blocks != memory.specs()
        || usize::from(setup.multifd_channels) != session.multifd.len()
    {
        return Err(ColoRunError::Protocol(format!(
            "the COLO session's SETUP announces {} multifd channels and blocks {:?}; this \
             secondary has {} channels and blocks {:?}",
            setup.multifd_channels,
            setup.blocks,
            session.multifd.len(),
            memory.specs()
        )));
    }
    match colo_recv(&main, "primary")? {
        (
            ColoMessage::ColoSetup {
                output_every,
                verify,
            },
            _,
        ) => {
            let differ = if output_every != opts.output_every {
                Some(format!(
                    "--colo-output-every differs: the primary has {output_every}, this secondary \
                     {}; give both sides the same value",
                    opts.output_every
                ))
            } else if verify != opts.verify {
                Some(format!(
                    "--colo-verify differs: the primary has it {}, this secondary {}; give it \
                     to both sides or to neither",
                    if verify { "on" } else { "off" },
                    if opts.verify { "on" } else { "off" }
                ))
            } else {
                None
            };
            if let Some(why) = differ {
                let _ = main.send(&Message::Shut {
                    error: Some(format!("the secondary refused COLO: {why}")),
                });
                return Err(ColoRunError::Refused(why));
            }
        }
        (m, _) => {
            return Err(ColoRunError::Protocol(format!(
                "expected COLO_SETUP after SETUP, got {}",
                m.name()
            )))
        }
    }
    let pool = ReceiverPool::start(
        session.multifd,
        parts.cache.memory().clone(),
        ReceiverOptions {
            fresh_memory: false,
            compressed: setup.capabilities & CAP_ZSTD != 0,
            checksums: setup.capabilities & CAP_CHECKSUM != 0,
        },
        || {},
    )?;
    {
        let main = main.clone();
        *ctl.silencer.lock().unwrap() = Some(Box::new(move || main.stop_heartbeat()));
    }
    {
        let (main, stop) = (main.clone(), pool.interrupter());
        *ctl.breaker.lock().unwrap() = Some(Box::new(move || {
            stop("failover");
            main.channel().shutdown();
        }));
    }
    // Sends the queued outputs (and keeps them): one sender at a time, so
    // none overtakes a REPLY.
    let forward = Arc::new(Mutex::new(()));
    let send_outputs = {
        let (main, outputs, since_commit, forward) = (
            main.clone(),
            parts.outputs.clone(),
            since_commit.clone(),
            forward.clone(),
        );
        move || -> Result<(), ColoRunError> {
            let _turn = forward.lock().unwrap();
            let r = outputs.take();
            if r.is_empty() {
                return Ok(());
            }
            since_commit.lock().unwrap().extend_from_slice(&r);
            colo_send(&main, &ColoMessage::Output(r))?;
            Ok(())
        }
    };
    colo_send(&main, &ColoMessage::CheckpointReady)?;
    guest.resume()?;
    let paused = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (send_outputs, paused, ctl) = (send_outputs.clone(), paused.clone(), ctl.clone());
        spawn_output_ticker(stop.clone(), move || {
            silenced(&ctl) || paused.load(Ordering::SeqCst) || send_outputs().is_ok()
        })?
    };
    let result = secondary_checkpoints(
        guest,
        parts,
        opts,
        ctl,
        since_commit,
        figures,
        &main,
        &pool,
        log,
        &memory,
        &send_outputs,
        &paused,
    );
    stop.store(true, Ordering::SeqCst);
    let _ = forwarder.join();
    if !matches!(result, Err(ColoRunError::Killed(_))) {
        // Whatever was queued but not forwarded is the survivor's too.
        let _turn = forward.lock().unwrap();
        since_commit.lock().unwrap().extend(parts.outputs.take());
    }
    main.stop_heartbeat();
    pool.abort("COLO ended");
    main.channel().shutdown();
    result
}

#[allow(clippy::too_many_arguments)]
fn secondary_checkpoints(
    guest: &dyn Guest,
    parts: &SecondaryParts,
    opts: &ColoOptions,
    ctl: &Arc<ColoControl>,
    since_commit: &Arc<Mutex<Vec<Record>>>,
    figures: &mut Figures,
    main: &Arc<MainChannel>,
    pool: &ReceiverPool,
    log: &dyn ferry_ram::DirtyLog,
    memory: &Arc<GuestMemory>,
    send_outputs: &dyn Fn() -> Result<(), ColoRunError>,
    paused: &AtomicBool,
) -> Result<(), ColoRunError> {
    let mut expect = Expect::new(Side::Secondary);
    let mut pending: Option<(Vec<PageBitmap>, u64, Vec<Record>)> = None;
    let mut size_bytes = 0u64;
    let mut pool_bytes = pool.counters().snapshot().wire_bytes;
    loop {
        if ctl.status.failover_pending() {
            return Err(ColoRunError::FailoverRequested);
        }
        if silenced(ctl) {
            // A hung host reads nothing it acts on and says nothing.
            loop {
                colo_recv(main, "primary")?;
            }
        }
        let (m, n) = colo_recv(main, "primary")?;
        size_bytes += n;
        expect.check(&m)?;
        let cp = expect.checkpoint();
        match m {
            ColoMessage::GuestShutdown => return Ok(()),
            ColoMessage::CheckpointRequest { .. } => {
                paused.store(true, Ordering::SeqCst);
                guest.pause()?;
                // Every output made before the pause goes before REPLY.
                send_outputs()?;
                live_send(ctl, main, &ColoMessage::CheckpointReply { checkpoint: cp })?;
                dead(opts.kill, cp, KillStage::AfterRequest, ctl, None)?;
            }
            ColoMessage::VmstateSend {
                generation,
                dirty,
                held,
                ..
            } => {
                let dirty = parts.cache.dirty_from_words(&dirty)?;
                dead(opts.kill, cp, KillStage::MidCheckpoint, ctl, None)?;
                pending = Some((dirty, generation, held));
            }
            ColoMessage::VmstateSize { .. } => {}
            ColoMessage::Vmstate(state) => {
                let (dirty, generation, held) = pending
                    .take()
                    .ok_or_else(|| ColoRunError::Protocol("VMSTATE without VMSTATE_SEND".into()))?;
                // The whole checkpoint is here once its pages are.
                pool.wait_sync_within(generation, Some(opts.heartbeat_timeout))?;
                live_send(ctl, main, &ColoMessage::VmstateReceived { checkpoint: cp })?;
                dead(opts.kill, cp, KillStage::AfterReceived, ctl, None)?;
                // Commit: from here a failover waits for the load.
                ctl.status.set_loading(true);
                let loaded = (|| -> Result<u64, ColoRunError> {
                    let own = fresh_bitmaps(memory);
                    log.sync(&own)?;
                    let pages = parts.cache.commit(memory, &dirty, &own)?;
                    if let Some(LoadHook(hook)) = &opts.test_during_load {
                        hook();
                    }
                    if opts.test_load_error_at == Some(cp) {
                        return Err(GuestError::DeviceState(format!(
                            "checkpoint {cp}: load failed (test)"
                        ))
                        .into());
                    }
                    guest.load_device_state(&state)?;
                    figures.last_state = state;
                    Ok(pages)
                })();
                ctl.status.set_loading(false);
                let pages = loaded?;
                // The primary's unreleased outputs are this side's now.
                *since_commit.lock().unwrap() = held;
                expect.loaded();
                let now = pool.counters().snapshot().wire_bytes;
                figures.bytes.push(size_bytes + now - pool_bytes);
                figures.pages.push(pages);
                (size_bytes, pool_bytes) = (0, now);
                if ctl.status.failover_pending() {
                    // RELAUNCH: the failover asked for during the load.
                    return Err(ColoRunError::FailoverRequested);
                }
                let digest = opts.verify.then(|| memory.digest().0);
                live_send(
                    ctl,
                    main,
                    &ColoMessage::VmstateLoaded {
                        checkpoint: cp,
                        digest,
                    },
                )?;
                paused.store(false, Ordering::SeqCst);
                guest.resume()?;
                ctl.live.lock().unwrap().checkpoints = cp;
            }
            other => {
                return Err(ColoRunError::Protocol(format!(
                    "{} from the primary",
                    other.name()
                )))
            }
        }
    }
}
