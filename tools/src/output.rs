//! What `send`, `recv` and `demo` print: a progress bar while a migration
//! runs, then a human summary or one JSON object.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::{Progress, Summary};
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

/// Prints the end of a migration: JSON on stdout, or text on stderr.
pub fn print_summary(tool: &str, s: &Summary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(s).expect("a summary serializes")
        );
        return;
    }
    if let Some(e) = &s.error {
        eprintln!("ferry {tool}: failed after {:.3} s: {e}", s.seconds);
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
    if let Some(d) = &s.digest {
        eprintln!("  digest of guest RAM: {d}");
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
        let stop = Arc::new(AtomicBool::new(false));
        let thread = enabled.then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || draw(&progress, &stop))
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

fn draw(progress: &Progress, stop: &AtomicBool) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
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
        bar.set_position(t.ram_bytes);
        let wire = t.wire_bytes as f64 / t0.elapsed().as_secs_f64().max(1e-3) / 1e9;
        bar.set_message(format!("{} {:.2} GB/s wire", progress.phase(), wire));
        std::thread::sleep(Duration::from_millis(50));
    }
    bar.finish_and_clear();
}
