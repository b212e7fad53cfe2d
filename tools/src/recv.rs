//! `ferry recv`: accept one incoming migration, hold the guest's memory and
//! run the guest (a synthetic or KVM guest continues its workload here).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry::{
    default_guest_builder, migrate_in, AcceptOptions, ChannelUri, ControlServer, DestinationMemory,
    Guest, GuestBuilder, IncomingOptions, Listener, Progress, Resources, SetupLimits, SocketTuning,
    SyntheticGuest, TlsServer, TrackerKind, Workload,
};

use crate::output::{print_summary, EventPrinter};
use crate::units::parse_size;

/// Accept one incoming migration on a listening socket.
///
/// Prints `ferry: listening on URI` on stderr once ready (with the real port
/// when PORT is 0). Any connection that is not a channel of the migration
/// (another program, another session) ends the migration with an error.
/// The result is `completed` only when every page and the device state have
/// landed and every checksum held; only then does the guest run here.
#[derive(Args)]
pub struct RecvArgs {
    /// Where to listen: tcp:HOST:PORT (PORT 0 picks a free one), unix:PATH
    /// (an existing file there is never removed, only a stale socket), or
    /// fd:N, a listening socket this process inherited.
    #[arg(long)]
    listen: String,
    /// Keep the received RAM in this file (sparse where pages are zero). It is
    /// written under a temporary name beside it and renamed into place only
    /// when the migration completed and was verified: an existing file is
    /// never truncated by a failed migration, and a failure leaves nothing.
    /// A guest of several blocks gets one file per block: FILE.NAME, the
    /// block's name with characters other than letters, digits, '.', '_'
    /// and '-' replaced by '_'. Default: anonymous memory.
    #[arg(long)]
    ram_out: Option<PathBuf>,
    /// Write the received device state to this file (checked before
    /// listening; written before the source is told the migration
    /// completed, so a failure to write it fails the migration).
    #[arg(long)]
    device_state_out: Option<PathBuf>,
    /// Print JSON: events as they happen (one object a line), then the
    /// summary object last, instead of text.
    #[arg(long)]
    json: bool,
    /// Open a control socket (QMP-shaped JSON lines) here; see `ferry ctl`.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Keep a migrated synthetic or KVM guest running this long (2s, 500ms,
    /// 1m; a bare number is seconds), then report how far its workload went
    /// on from where the source stopped; for a KVM guest also its
    /// self-check (a wrong word, or a vCPU that stopped, fails the run). An
    /// image guest has no workload. A KVM guest needs a usable /dev/kvm
    /// here: the VM is built from the received vCPU state and resumed.
    #[arg(long, value_parser = crate::units::parse_secs, allow_negative_numbers = true)]
    run_after: Option<Duration>,
    /// Lock files standing for the guest's shared resources: taken when the
    /// guest starts here (fails if the source still holds them). Repeatable.
    #[arg(long)]
    lock: Vec<PathBuf>,
    /// Verify the switchover even if the source does not ask (`send
    /// --verify-switchover`): hash all guest memory and the device state
    /// before the guest runs here, compare that with the source's digest,
    /// and complete only if they are equal. It counts in the downtime
    /// (about 80 ms per GiB here). Without it on either side, the guest runs
    /// once every page has landed with its checksum checked, and the
    /// summaries say the switchover was not verified.
    #[arg(long)]
    verify_switchover: bool,
    /// Never verify the switchover here: refuse, at setup, a source that
    /// asks for it (`send --verify-switchover`). Not verifying is the
    /// default already; this makes the refusal explicit.
    #[arg(long, conflicts_with = "verify_switchover")]
    no_digest: bool,
    /// Populate fresh memory just ahead of the pages arriving: a helper
    /// thread faults in the next 32 MiB past the receive cursor
    /// (MADV_POPULATE_WRITE), so the receivers copy into memory that is
    /// already there. Ranges the source sends as zero pages are skipped, so
    /// a sparse guest costs at most 32 MiB more per hole; never done with
    /// postcopy or --ram-out. Off by default: on this project's machines it
    /// won no time in a quiet A/B (2 GiB, K=1 and 2, docs/MEASUREMENTS.md).
    #[arg(long)]
    prefault: bool,
    /// Give up if no source connects within this long (30s, 500ms, 2m; a
    /// bare number is seconds; more than 0). Default: wait for ever.
    #[arg(long, value_parser = crate::units::parse_timeout, allow_negative_numbers = true)]
    timeout: Option<Duration>,
    /// Socket receive buffer size (SO_RCVBUF), e.g. 4M; default: kernel autotuning.
    #[arg(long, value_parser = parse_size)]
    socket_buffer: Option<u64>,
    /// TCP congestion control for the migration's sockets, or `system` (the
    /// default) for the machine's. On loopback and LANs `cubic` is much
    /// faster than a pacing algorithm such as bbr (2 GiB, 2 channels,
    /// loopback: 0.38 s with cubic, 0.65 s with bbr); over a long, lossy
    /// path bbr may win.
    #[arg(long, default_value = "system")]
    tcp_congestion: String,
    /// TLS on every channel, with credentials from this directory in QEMU's
    /// layout: server-cert.pem + server-key.pem (this side's certificate)
    /// and ca-cert.pem (the CA every sender's client certificate must be
    /// signed by; senders without one are refused). `ferry certs` makes a set.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Insist on a compression setting: `zstd` refuses a sender that does
    /// not compress, `none` one that does. Default: take what the sender
    /// announces.
    #[arg(long, value_parser = ["zstd", "none"])]
    compress: Option<String>,
    /// The most guest RAM a source may announce (all blocks together),
    /// checked before any memory or file is made, e.g. 16G. Default: this
    /// host's physical memory.
    #[arg(long, value_parser = parse_size)]
    max_guest: Option<u64>,
    #[command(flatten)]
    peer: crate::peer::PeerArgs,
    /// Serve the migration's figures (those of `ferry ctl SOCK query`) in
    /// Prometheus's text format at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Postcopy, after a link failure: `manual` waits in postcopy-paused
    /// for `ferry ctl SOCK recover URI`; `auto` listens again on --listen
    /// by itself.
    #[arg(long, default_value = "manual", value_name = "MODE")]
    postcopy_recover: ferry::postcopy::RecoverMode,
    #[command(flatten)]
    colo: crate::colo::ColoArgs,
    /// Expect a KVM guest (`send --guest kvm`): build its VM over the
    /// memory (KVM_CREATE_VM, the memory slots) while the pages arrive,
    /// so that only its vCPUs and their state are left for the
    /// switchover, inside the downtime (2 GiB: ~10 ms less under this
    /// project's nested KVM). Another kind of guest just leaves that VM
    /// unused; where /dev/kvm is not usable the switchover builds the VM
    /// as without this option (and says why it cannot). The memory is
    /// also kept in base pages, as the source VM's is (no transparent huge
    /// page: each scattered page would fault in and zero 2 MiB).
    #[arg(long)]
    prebuild_kvm: bool,
    /// Hand the guest on: once it has run here for --run-after (0 without
    /// it), live-migrate it, running, to `ferry recv` at this URI
    /// (tcp:HOST:PORT or unix:PATH; plain, 2 channels, the default
    /// downtime limit, this side's --tcp-congestion), as `ferry send`
    /// would, and print that migration's summary
    /// after this one's. A chain of `recv --forward-to` processes moves one
    /// guest from process to process (a ping-pong between two hosts). The
    /// workload figures are then taken without pausing the guest, and
    /// this side's digest of memory is not taken (the guest runs on).
    #[arg(long, value_name = "URI")]
    forward_to: Option<String>,
}

pub fn run(a: RecvArgs) -> anyhow::Result<bool> {
    let json = a.json;
    crate::output::json_on_early_failure("recv", json, migrate(a))
}

fn migrate(a: RecvArgs) -> anyhow::Result<bool> {
    let uri: ChannelUri = a.listen.parse()?;
    let forward: Option<ChannelUri> = a.forward_to.as_deref().map(str::parse).transpose()?;
    // Every output is checked before a source can connect: a migration
    // must not complete on the source and then fail here for a bad path.
    for p in a.ram_out.iter().chain(&a.device_state_out) {
        crate::output::check_output_path(p)?;
    }
    // Where the guest builder leaves a KVM guest it built.
    let arrived: crate::kvm::ArrivedSlot = Default::default();
    let prebuilt = a.prebuild_kvm.then(crate::kvm::Prebuilt::default);
    let tuning = SocketTuning {
        recv_buffer: a.socket_buffer.map(|n| n as usize),
        congestion: crate::units::congestion(&a.tcp_congestion),
        user_timeout: Some(a.peer.peer_timeout),
        ..Default::default()
    };
    let mut listener = Listener::bind(&uri, tuning)?;
    if let Some(d) = &a.tls_dir {
        listener = listener.with_tls(Arc::new(TlsServer::load(d)?));
    }
    // COLO: the synthetic or KVM guest with its dirty log, outputs and
    // RAM cache.
    let colo_parts = a.colo.colo.then(|| {
        ferry::colo::secondary_builder_with(
            a.colo.colo_output_every,
            a.colo.colo_jitter,
            None,
            Some(crate::colo::kvm_kind(arrived.clone())),
        )
    });
    let mut opts = IncomingOptions {
        memory: a
            .ram_out
            .clone()
            .map_or(DestinationMemory::Anonymous, DestinationMemory::Files),
        accept: AcceptOptions {
            first_timeout: a.timeout,
            ..Default::default()
        },
        build_guest: crate::kvm::builder(
            guest_builder(&a.lock),
            {
                let locks = a.lock.clone();
                move || Resources::new(&locks, false)
            },
            arrived.clone(),
            prebuilt.clone(),
        ),
        verify_switchover: match (a.verify_switchover, a.no_digest) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        compression: a.compress.as_deref().map(|c| c == "zstd"),
        peer_timeout: a.peer.peer_timeout,
        limits: SetupLimits {
            max_guest_bytes: a.max_guest.unwrap_or_else(ferry::physical_memory),
            ..Default::default()
        },
        keep: a
            .device_state_out
            .clone()
            .map(|p| Arc::new(move |state: &[u8]| write_replacing(&p, state)) as ferry::KeepHook),
        postcopy_recover: a.postcopy_recover,
        // A postcopy's replay check (--run-after) needs the memory as it
        // was at the switch.
        postcopy_reference: a.run_after.is_some(),
        postcopy_paused_timeout: None,
        colo: false,
        prepare_guest: prebuilt.as_ref().map(crate::kvm::Prebuilt::hook),
        prefault: a.prefault,
    };
    if let Some((builder, _)) = &colo_parts {
        opts.build_guest = builder.clone();
        opts.colo = true;
    }
    let progress = Arc::new(Progress::default());
    crate::signals::cancel_on_signal(&progress);
    let colo_ctl = a.colo.colo.then(|| a.colo.control(&progress));
    let control = match &a.control {
        Some(p) => Some(ControlServer::start(p, progress.clone())?),
        None => None,
    };
    let metrics = match &a.metrics_listen {
        Some(addr) => Some(ferry::MetricsServer::start(addr, progress.clone())?),
        None => None,
    };
    // Ready: the control socket and metrics endpoint are up too. One
    // write, so a script reading stderr never sees half the line.
    let ready = format!("ferry: listening on {}\n", listener.uri());
    let _ = std::io::Write::write_all(&mut std::io::stderr(), ready.as_bytes());
    let mut events = a.json.then(|| EventPrinter::start(&progress));
    let result = migrate_in(&listener, &opts, &progress);
    // With COLO next, the events go on through it (status colo, then its
    // end).
    if !(a.colo.colo && result.is_ok()) {
        if let Some(e) = events.take() {
            e.finish();
        }
    }
    match result {
        Ok(outcome) if forward.is_some() => {
            let kvm = crate::kvm::take_arrived(&arrived)?;
            let uri = forward.expect("forward is some");
            forward_guest(outcome, kvm, &uri, &a)
        }
        Ok(mut outcome) => {
            if let (Some((_, parts)), Some(ctl)) = (&colo_parts, &colo_ctl) {
                let parts = parts
                    .get()
                    .ok_or_else(|| anyhow::anyhow!("the COLO guest builder did not run"))?;
                let s = crate::colo::secondary(
                    &a.colo,
                    &*outcome.guest,
                    parts,
                    &listener,
                    ctl,
                    &progress,
                    a.json,
                )?;
                outcome.summary.guest_running = outcome.guest.is_running();
                outcome.summary.colo = Some(s);
            }
            if let Some(e) = events.take() {
                e.finish();
            }
            drop((control, metrics));
            let kvm = crate::kvm::take_arrived(&arrived)?;
            if let Some(after) = crate::guest_args::run_after(a.run_after, &outcome.device_state) {
                outcome.summary.workload = match &kvm {
                    Some(k) => Some(crate::kvm::run_workload(k, after.as_secs_f64())?),
                    None => {
                        run_workload(&*outcome.guest, &outcome.device_state, after.as_secs_f64())?
                    }
                };
            }
            outcome.guest.pause()?;
            if let (Some(reference), Some(w), None) = (
                outcome.postcopy_reference.as_ref(),
                outcome.summary.workload.as_mut(),
                &kvm,
            ) {
                // Postcopy: the memory must be the switch's with this
                // side's writes replayed (the guest is paused). The
                // synthetic guest's only: a KVM guest's self-check is its
                // own (`kvm::verdict`).
                let now = outcome.guest.save_device_state()?;
                let r =
                    ferry::replay_check(reference, &outcome.device_state, &outcome.memory, &now)?;
                w.replay_equal = Some(r.equal());
                w.replay_writes = Some(r.writes);
                w.replay_differing_pages = Some(r.differing);
            }
            // SAFETY: the guest was paused just above (`Guest::pause`: its
            // memory no longer changes), and the migration's receiver
            // threads ended before `migrate_in` returned.
            let digest = unsafe { ferry::Digest::of_still_memory(&outcome.memory) };
            outcome.summary.digest = Some(digest.to_string());
            let failed = outcome
                .summary
                .workload
                .as_ref()
                .and_then(crate::kvm::verdict)
                .or_else(|| {
                    let w = outcome.summary.workload.as_ref()?;
                    (w.replay_equal == Some(false)).then(|| {
                        format!(
                            "the postcopy replay check found {} page(s) that differ from the \
                             source's at the switch with this side's writes replayed",
                            w.replay_differing_pages.unwrap_or(0)
                        )
                    })
                });
            // A secondary that refused COLO or was killed never held a
            // replica: the migration completed, COLO did not.
            let failed = failed.or_else(|| {
                let c = outcome.summary.colo.as_ref()?;
                matches!(c.end, "refused" | "killed").then(|| {
                    format!(
                        "COLO ended {}: {}",
                        c.end,
                        c.status.error.as_deref().unwrap_or("no reason given")
                    )
                })
            });
            print_summary("recv", &outcome.summary, a.json);
            if let (Some(s), false) = (&outcome.summary.colo, a.json) {
                crate::colo::print(s);
            }
            if let Some(w) = outcome.summary.workload.as_ref().filter(|_| !a.json) {
                print_workload(w);
            }
            if let Some(why) = &failed {
                eprintln!("ferry recv: the migration completed, but {why}");
            }
            Ok(failed.is_none())
        }
        Err(f) => {
            drop((control, metrics));
            print_summary("recv", &f.summary, a.json);
            Ok(false)
        }
    }
}

/// `recv --forward-to URI`: lets the guest that arrived run for
/// --run-after, takes its workload without pausing it, prints this
/// migration's summary, then live-migrates the running guest to `uri` and
/// prints that one's (`ferry send`'s, role `send`).
fn forward_guest(
    mut outcome: ferry::IncomingOutcome,
    kvm: Option<crate::kvm::Arrived>,
    uri: &ChannelUri,
    a: &RecvArgs,
) -> anyhow::Result<bool> {
    let secs = a.run_after.unwrap_or_default().as_secs_f64();
    outcome.summary.workload = match &kvm {
        // Without --run-after the guest is handed on at once, unmeasured.
        Some(k) if a.run_after.is_some() => {
            std::thread::sleep(Duration::from_secs_f64(secs));
            Some(crate::kvm::workload(k, secs)?)
        }
        Some(_) => None,
        None if a.run_after.is_some() => {
            let w = run_workload(&*outcome.guest, &outcome.device_state, secs)?;
            outcome.guest.resume()?;
            w
        }
        None => None,
    };
    let failed = outcome
        .summary
        .workload
        .as_ref()
        .and_then(crate::kvm::verdict);
    print_summary("recv", &outcome.summary, a.json);
    if let Some(w) = outcome.summary.workload.as_ref().filter(|_| !a.json) {
        print_workload(w);
    }
    if let Some(why) = &failed {
        eprintln!("ferry recv: the migration completed, but {why}; not forwarding the guest");
        outcome.guest.pause()?;
        return Ok(false);
    }
    let opts = ferry::OutgoingOptions {
        channels: 2,
        tuning: SocketTuning {
            congestion: crate::units::congestion(&a.tcp_congestion),
            ..Default::default()
        },
        ..Default::default()
    };
    let progress = Progress::default();
    let (mut summary, ok) = match ferry::migrate_out(&*outcome.guest, uri, &opts, &progress) {
        Ok(s) => (s, true),
        Err(f) => (*f.summary, false),
    };
    if ok && summary.digest.is_none() {
        summary.digest = Some(outcome.guest.memory().digest().to_string());
    }
    print_summary("send", &summary, a.json);
    Ok(ok)
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fail = |e: std::io::Error| format!("writing the device state to {}: {e}", path.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".ferry-device-state-")
        .tempfile_in(dir)
        .map_err(fail)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(fail)?;
    tmp.as_file().sync_all().map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// The default guests, owning `locks` once they resume.
fn guest_builder(locks: &[PathBuf]) -> GuestBuilder {
    if locks.is_empty() {
        return default_guest_builder();
    }
    let locks = locks.to_vec();
    Arc::new(move |memory, state| {
        if ferry::synthetic::is_synthetic_state(state) {
            let g = SyntheticGuest::from_device_state(
                memory,
                state,
                TrackerKind::Bitmap,
                Resources::new(&locks, false)?,
            )?;
            Ok(Box::new(g) as Box<dyn Guest>)
        } else {
            let g = ferry::ImageGuest::from_memory(memory, Vec::new())
                .with_resources(Resources::new(&locks, false)?);
            g.pause()?;
            g.load_device_state(state)?;
            Ok(Box::new(g) as Box<dyn Guest>)
        }
    })
}

/// Lets the guest run `secs` seconds; for a synthetic guest, compares its
/// write counters with those it arrived with.
pub fn run_workload(
    guest: &dyn Guest,
    arrived: &[u8],
    secs: f64,
) -> anyhow::Result<Option<Workload>> {
    if !ferry::synthetic::is_synthetic_state(arrived) {
        std::thread::sleep(Duration::from_secs_f64(secs));
        return Ok(None);
    }
    std::thread::sleep(Duration::from_secs_f64(secs));
    guest.pause()?;
    let writes = |state: &[u8]| -> anyhow::Result<u64> {
        let v: serde_json::Value = serde_json::from_slice(state)?;
        Ok(v["vcpus"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(|c| c["writes"].as_u64()).sum()))
    };
    let before = writes(arrived)?;
    let after = writes(&guest.save_device_state()?)?;
    Ok(Some(Workload {
        writes_at_switchover: before,
        writes_after: after,
        seconds: secs,
        continued: after > before,
        ..Default::default()
    }))
}

pub fn print_workload(w: &Workload) {
    eprintln!(
        "  workload: {} writes at switchover, {} after {:.1} s here: {}",
        w.writes_at_switchover,
        w.writes_after,
        w.seconds,
        if w.continued {
            "continued"
        } else {
            "did NOT continue"
        }
    );
    if let Some(n) = w.self_check_errors {
        eprintln!(
            "  guest self-check: {}",
            if n == 0 {
                "clean".to_string()
            } else {
                format!(
                    "{n} wrong word(s), first at {}",
                    w.self_check_first_error.as_deref().unwrap_or("?")
                )
            }
        );
    }
    if let Some(equal) = w.replay_equal {
        eprintln!(
            "  postcopy replay check: {} ({} write(s) replayed{})",
            if equal { "equal" } else { "DIFFERENT" },
            w.replay_writes.unwrap_or(0),
            match w.replay_differing_pages {
                Some(n) if n > 0 => format!(", {n} page(s) differ"),
                _ => String::new(),
            }
        );
    }
    if let Some(f) = &w.guest_failure {
        eprintln!("  guest stopped: {f}");
    }
}
