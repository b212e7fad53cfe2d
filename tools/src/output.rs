//! What `send`, `recv` and `demo` print: a progress bar while a migration
//! runs (or JSON event lines with `--json`), then a human summary or the
//! summary JSON object, always the last line.

use std::path::Path;

use anyhow::Context;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::{FileSummary, Progress, Status, Summary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::units::bytes;

/// An error and its causes, each cause added only if the text so far does
/// not already say it (ferry's typed errors quote their source).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text = format!("{text}: {c}");
        }
    }
    text
}

/// For `--json` runs that fail before a migration starts (bad URI, missing
/// file): still one JSON object on stdout with the error, and exit status 1.
pub fn json_on_early_failure(
    tool: &str,
    json: bool,
    result: anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    match result {
        Err(e) if json => {
            println!(
                "{}",
                serde_json::json!({ "status": "failed", "error": error_chain(&e) })
            );
            eprintln!("ferry {tool}: error: {}", error_chain(&e));
            Ok(false)
        }
        other => other,
    }
}

/// The part of a final report every command shares: with `--json` the one
/// JSON object on stdout; else, for a failure, one line on stderr. True if
/// that was all there is to print.
fn printed_json_or_failure(
    tool: &str,
    summary: &impl serde::Serialize,
    error: Option<&str>,
    seconds: f64,
    json: bool,
) -> bool {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("a summary serializes")
        );
        return true;
    }
    if let Some(e) = error {
        eprintln!("ferry {tool}: failed after {seconds:.3} s: {e}");
        return true;
    }
    false
}

/// Prints the end of a migration: JSON on stdout, or text on stderr.
pub fn print_summary(tool: &str, s: &Summary, json: bool) {
    if printed_json_or_failure(tool, s, s.error.as_deref(), s.seconds, json) {
        return;
    }
    eprintln!(
        "ferry {tool}: completed in {:.3} s: a guest of {} over {} channel(s), session {}",
        s.seconds,
        bytes(s.guest_bytes),
        s.channels,
        s.session
    );
    let again = s.ram_bytes.saturating_sub(s.guest_bytes);
    eprintln!(
        "  pages: {} normal, {} zero, {} in all{}; wire: {} at {}; guest RAM at {}",
        s.pages_normal,
        s.pages_zero,
        bytes(s.ram_bytes),
        if again > 0 {
            format!(" ({} of them sent again)", bytes(again))
        } else {
            String::new()
        },
        bytes(s.wire_bytes),
        crate::units::rate(s.gbps_wire * 1e9),
        crate::units::rate(s.gbps_ram * 1e9),
    );
    let in_flight = match s.role {
        ferry::Role::Source => s.pages_changed_in_flight,
        ferry::Role::Destination => s.checksum_mismatches,
    };
    eprintln!(
        "  checksums: {}; device state: {} bytes",
        match (s.checksum, in_flight) {
            (false, _) => "off".to_string(),
            (true, 0) => "on, every page checked".to_string(),
            (true, n) => format!(
                "on, every page checked; {n} page(s) changed by the guest while in flight \
                 and were sent again"
            ),
        },
        s.device_state_bytes
    );
    eprintln!(
        "  TLS: {}; compression: {}",
        if s.tls { "on" } else { "off" },
        match &s.compression {
            Some(c) => format!(
                "{c}, {} packet(s) compressed, ratio {:.2}",
                s.compressed_packets, s.compression_ratio
            ),
            None => "off".into(),
        }
    );
    if !s.send_path.is_empty() {
        eprintln!(
            "  send path: {}{}",
            s.send_path,
            s.send_path_note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    if let Some(zc) = &s.zero_copy {
        eprintln!(
            "  zero-copy: {} sends, {} copied by the kernel{}",
            zc.sends,
            zc.copied,
            zc.note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
    }
    if s.passes > 1 || s.dirty_tracker.is_some() {
        eprintln!(
            "  live: {} passes, {} dirty-log syncs{}{}{}",
            s.passes,
            s.dirty_sync_count,
            s.downtime_ms
                .map(|d| format!(", downtime {d:.1} ms"))
                .unwrap_or_default(),
            s.dirty_tracker
                .as_deref()
                .map(|t| format!(", tracker {t}"))
                .unwrap_or_default(),
            if s.throttle_percent > 0 {
                format!(", throttle up to {}%", s.throttle_percent)
            } else {
                String::new()
            }
        );
    }
    match (&s.switchover_digest, s.verified) {
        (Some(d), true) => eprintln!(
            "  memory and device state at switchover: identical on both sides (digest {d})"
        ),
        (Some(d), false) if s.completed() => eprintln!(
            "  switchover not verified (neither side asked for --verify-switchover); this \
             side's digest of memory and device state at switchover: {d}"
        ),
        (Some(d), false) => eprintln!("  digest of memory and device state at switchover: {d}"),
        (None, false) if s.completed() => eprintln!(
            "  switchover not verified (neither side asked for --verify-switchover): every \
             page landed{}, no digest of memory was compared",
            if s.checksum {
                " with its checksum checked"
            } else {
                ""
            }
        ),
        (None, _) => {}
    }
    if let Some(d) = &s.digest {
        eprintln!("  digest of guest RAM now: {d}");
    }
}

/// With `--json`: prints each event of a migration as one JSON line on
/// stdout while it runs.
pub struct EventPrinter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EventPrinter {
    pub fn start(progress: &Progress) -> Self {
        let events = progress.subscribe();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || loop {
            match events.recv_timeout(Duration::from_millis(50)) {
                Ok(e) => println!("{}", e.to_json()),
                Err(_) if s.load(Ordering::SeqCst) => break,
                Err(_) => {}
            }
        });
        Self { stop, thread }
    }

    /// Prints the events still queued, then stops (the migration has ended).
    pub fn finish(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// Prints the end of a save, restore or verify: JSON on stdout, or text on stderr.
pub fn print_file_summary(tool: &str, s: &FileSummary, json: bool) {
    if printed_json_or_failure(tool, s, s.error.as_deref(), s.seconds, json) {
        return;
    }
    eprintln!(
        "ferry {tool}: completed in {:.3} s: {} of guest RAM ({}), {} of page data in {} ({}), {} thread(s)",
        s.seconds,
        bytes(s.ram_bytes),
        crate::units::rate(s.gbps * 1e9),
        bytes(s.file_bytes),
        s.path,
        crate::units::rate(s.gbps_file * 1e9),
        s.channels
    );
    eprintln!(
        "  pages: {} present, {} zero (never marked present); file {} bytes, {} on disk",
        s.pages_normal,
        s.pages_zero,
        s.file_len,
        bytes(s.file_disk_bytes),
    );
    match (s.direct_io, &s.direct_io_fallback) {
        (true, _) => eprintln!("  page I/O: O_DIRECT (--io {})", s.io),
        (false, Some(why)) => eprintln!("  page I/O: buffered, O_DIRECT not used: {why}"),
        (false, None) => eprintln!("  page I/O: buffered (--io {})", s.io),
    }
    if let Some(n) = &s.note {
        eprintln!("  note: {n}");
    }
    eprintln!("  device state: {} bytes", s.device_state_bytes);
    if let Some(l) = &s.lazy {
        eprintln!(
            "  lazy: memory usable after {:.2} ms, first write done after {}; {} region(s) loaded on fault (longest {:.2} ms), {} prefetched",
            l.ready_ms,
            l.first_write_ms
                .map_or("-".into(), |ms| format!("{ms:.2} ms")),
            l.fault_regions,
            l.max_fault_ms,
            l.prefetched_regions
        );
    }
    if let (Some(passes), Some(ms)) = (s.passes, s.downtime_ms) {
        eprintln!("  live: {passes} pass(es), guest paused {ms:.2} ms for the last");
    }
    if let Some(ms) = s.pause_ms {
        eprintln!(
            "  background: guest paused {ms:.2} ms; {} region(s) saved ahead of a write (longest wait {:.2} ms), {} in order",
            s.fault_regions.unwrap_or(0),
            s.max_fault_ms.unwrap_or(0.0),
            s.ordered_regions.unwrap_or(0)
        );
    }
    if let Some(d) = &s.digest {
        eprintln!("  digest of guest RAM: {d}");
    }
    for (what, d) in [
        ("at switchover", &s.switchover_digest),
        ("at the pause", &s.digest_at_pause),
        ("restored from the file", &s.file_digest),
    ] {
        if let Some(d) = d {
            eprintln!("  digest of RAM and device state {what}: {d}");
        }
    }
}

/// A progress bar on stderr fed from a migration's [`Progress`]; hidden when
/// stderr is not a terminal or `enabled` is false.
pub struct ProgressView {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProgressView {
    pub fn start(progress: Arc<Progress>, enabled: bool) -> Self {
        Self::start_for(progress, enabled, "wire")
    }

    /// As [`ProgressView::start`], naming the bytes moved `what` ("wire", "file").
    pub fn start_for(progress: Arc<Progress>, enabled: bool, what: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || draw(&progress, &stop, what))
        });
        Self { stop, thread }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bar: elapsed time, the pass's progress (pass 1: every page; later
/// passes: the dirty set), and a line of live figures with the ETA.
fn draw(progress: &Progress, stop: &AtomicBool, what: &str) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:24}] {binary_bytes}/{binary_total_bytes} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let live = progress.live();
        let total = live.total;
        let f = progress.figures();
        match live.remaining {
            // A pass of the dirty set: what it has covered of that set.
            Some(left) if f.pass > 0 => {
                bar.set_length(f.remaining_bytes.max(left).max(1));
                bar.set_position(f.remaining_bytes.max(left) - left);
            }
            _ => {
                bar.set_length(total.max(1));
                bar.set_position(live.ram_bytes.min(total));
            }
        }
        let rate = if live.bandwidth > 0.0 {
            live.bandwidth
        } else {
            live.transferred as f64 / t0.elapsed().as_secs_f64().max(1e-3)
        };
        bar.set_message(live_line(progress, &live, &f, rate, what));
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
}

/// Status, pass, rate, ETA, and for live passes the dirty rate, expected
/// downtime and throttle.
fn live_line(
    progress: &Progress,
    live: &ferry::LiveFigures,
    f: &ferry::PassFigures,
    rate: f64,
    what: &str,
) -> String {
    let page = progress.page_size.load(Ordering::Relaxed);
    let status = progress.status();
    let mut line = format!(
        "{} pass {} {} {what} ETA {}",
        if status == Status::Active {
            progress.phase()
        } else {
            status.as_str()
        },
        live.pass.max(1),
        crate::units::rate(rate),
        live.eta_ms.map_or("-".into(), crate::units::clock),
    );
    if f.pass > 0 {
        line += &format!(
            " dirty {} exp. downtime {:.0} ms",
            crate::units::rate(f.dirty_pages_rate * page as f64),
            f.expected_downtime_ms
        );
    }
    if f.throttle_percent > 0 {
        line += &format!(" throttle {}%", f.throttle_percent);
    }
    if let Some(pc) = progress.postcopy_live() {
        line += &format!(
            " postcopy: {} page(s) left, {} request(s)",
            pc.pages_left, pc.requests
        );
    }
    line
}

/// An output path must be creatable: not a directory, in an existing
/// directory this process may write to.
pub fn check_output_path(p: &Path) -> anyhow::Result<()> {
    if p.is_dir() {
        anyhow::bail!("{} is a directory; give a file path", p.display());
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write {}: its directory {} does not exist",
            p.display(),
            dir.display()
        );
    }
    // The one reliable test of "may I create a file there".
    let probe = tempfile::Builder::new()
        .prefix(".ferry-probe-")
        .tempfile_in(dir)
        .with_context(|| {
            format!(
                "cannot write {}: no file can be created in {}",
                p.display(),
                dir.display()
            )
        })?;
    drop(probe);
    Ok(())
}
