//! What `send`, `recv` and `demo` print: a progress bar while a migration
//! runs (or JSON event lines with `--json`), then a human summary or the
//! summary JSON object, always the last line.

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
        "ferry {tool}: completed in {:.3} s: {} of guest RAM over {} channel(s), session {}",
        s.seconds,
        bytes(s.ram_bytes),
        s.channels,
        s.session
    );
    eprintln!(
        "  pages: {} normal, {} zero; wire: {} ({:.2} GB/s); guest RAM {:.2} GB/s",
        s.pages_normal,
        s.pages_zero,
        bytes(s.wire_bytes),
        s.gbps_wire,
        s.gbps_ram
    );
    eprintln!(
        "  checksums: {}; device state: {} bytes",
        if s.checksum {
            format!("on, {} mismatched page(s)", s.checksum_mismatches)
        } else {
            "off".into()
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
    if s.passes > 1 || s.downtime_ms.is_some() {
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
        (Some(d), Some(true)) => eprintln!(
            "  memory and device state at switchover: identical on both sides (digest {d})"
        ),
        (Some(d), _) => eprintln!(
            "  digest of memory and device state at switchover: {d} (not compared with the \
             other side: the destination runs with --no-digest)"
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
        "ferry {tool}: completed in {:.3} s: {} of guest RAM ({:.2} GB/s), {} of page data in {} ({:.2} GB/s), {} thread(s)",
        s.seconds,
        bytes(s.ram_bytes),
        s.gbps,
        bytes(s.file_bytes),
        s.path,
        s.gbps_file,
        s.channels
    );
    eprintln!(
        "  pages: {} present, {} zero (holes); file {} bytes, {} on disk; O_DIRECT: {}",
        s.pages_normal,
        s.pages_zero,
        s.file_len,
        bytes(s.file_disk_bytes),
        if s.direct_io { "on" } else { "off" }
    );
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

fn draw(progress: &Progress, stop: &AtomicBool, what: &str) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:24}] {bytes}/{total_bytes} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let total = progress.total_ram_bytes();
        if total > 0 {
            bar.set_length(total);
        }
        let t = progress.totals();
        let f = progress.figures();
        if f.pass == 0 {
            // Pass 1 moves every page: the bar is its progress.
            bar.set_position(t.ram_bytes.min(total));
            let wire = t.wire_bytes as f64 / t0.elapsed().as_secs_f64().max(1e-3) / 1e9;
            bar.set_message(format!("{} {:.2} GB/s {what}", progress.phase(), wire));
        } else {
            bar.set_position(total.saturating_sub(f.remaining_bytes));
            bar.set_message(live_line(progress, &f, t.wire_bytes));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish_and_clear();
}

/// Pass, transferred, remaining, throughput, dirty rate, expected downtime.
fn live_line(progress: &Progress, f: &ferry::PassFigures, wire: u64) -> String {
    let page = progress.page_size.load(Ordering::Relaxed);
    let status = progress.status();
    format!(
        "{} pass {} sent {} left {} {:.0} MB/s dirty {:.0} MB/s exp. downtime {:.0} ms{}",
        if status == Status::Active {
            "active"
        } else {
            status.as_str()
        },
        f.pass + 1,
        bytes(wire),
        bytes(f.remaining_bytes),
        f.bandwidth / 1e6,
        f.dirty_pages_rate * page as f64 / 1e6,
        f.expected_downtime_ms,
        if f.throttle_percent > 0 {
            format!(" throttle {}%", f.throttle_percent)
        } else {
            String::new()
        }
    )
}
