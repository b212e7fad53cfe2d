//! The metrics endpoint: the figures of `query-migrate` in Prometheus's
//! text exposition format (version 0.0.4), over plain HTTP, for
//! `ferry send --metrics-listen ADDR` and `ferry recv --metrics-listen ADDR`.
//!
//! One thread serves one request at a time: it reads the request head (at
//! most 8 KiB, within 1 s), answers `GET /metrics` (or `GET /`) and closes.
//! Every read and write has a deadline, so a client that stalls delays
//! other scrapes by at most a couple of seconds and never the migration,
//! which only ever shares [`Progress`] with this thread.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::Progress;

const MAX_HEAD: usize = 8 << 10;
const IO_DEADLINE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running metrics endpoint; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (`HOST:PORT`; port 0 picks a free one).
    pub fn start(addr: &str, progress: Arc<Progress>) -> Result<Self, MetricsError> {
        let err = |source| MetricsError::Bind {
            addr: addr.into(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let local = listener.local_addr().map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-metrics".into())
                .spawn(move || serve(&listener, &progress, &stop))
                .map_err(err)?
        };
        Ok(Self {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on (with the real port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: &TcpListener, progress: &Progress, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, progress) {
                    tracing::debug!("metrics client: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("metrics endpoint: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn answer(mut stream: TcpStream, progress: &Progress) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_DEADLINE))?;
    stream.set_write_timeout(Some(IO_DEADLINE))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return reply(&mut stream, "431 Request Header Fields Too Large", "");
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics" | "/")) => {
            reply(&mut stream, "200 OK", &exposition(&progress.query()))
        }
        (Some("GET"), Some(_)) => reply(&mut stream, "404 Not Found", "try /metrics\n"),
        _ => reply(&mut stream, "405 Method Not Allowed", "GET /metrics\n"),
    }
}

fn reply(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

/// One metric: name, help text, type, and where its value is in the
/// `query-migrate` answer, with the factor that turns it into base units.
struct Metric {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    path: &'static [&'static str],
    scale: f64,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "ferry_setup_seconds",
        help: "Time spent in setup.",
        kind: "gauge",
        path: &["setup-time"],
        scale: 1e-3,
    },
    Metric {
        name: "ferry_total_seconds",
        help: "Time since the migration started.",
        kind: "gauge",
        path: &["total-time"],
        scale: 1e-3,
    },
    Metric {
        name: "ferry_downtime_seconds",
        help: "Guest paused until the destination ran it (once known).",
        kind: "gauge",
        path: &["downtime"],
        scale: 1e-3,
    },
    Metric {
        name: "ferry_expected_downtime_seconds",
        help: "Downtime a switchover now would take.",
        kind: "gauge",
        path: &["expected-downtime"],
        scale: 1e-3,
    },
    Metric {
        name: "ferry_ram_transferred_bytes",
        help: "Bytes on the wire so far.",
        kind: "counter",
        path: &["ram", "transferred"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_remaining_bytes",
        help: "Dirty bytes still to send.",
        kind: "gauge",
        path: &["ram", "remaining"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_total_bytes",
        help: "Guest RAM the migration covers.",
        kind: "gauge",
        path: &["ram", "total"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_zero_pages",
        help: "Zero pages (sent as offsets only).",
        kind: "counter",
        path: &["ram", "duplicate"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_normal_pages",
        help: "Pages sent with their bytes.",
        kind: "counter",
        path: &["ram", "normal"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_bits_per_second",
        help: "Wire rate over the last second.",
        kind: "gauge",
        path: &["ram", "mbps"],
        scale: 1e6,
    },
    Metric {
        name: "ferry_ram_pages_per_second",
        help: "Pages per second of the last pass.",
        kind: "gauge",
        path: &["ram", "pages-per-second"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_dirty_pages_per_second",
        help: "Pages the guest dirtied per second.",
        kind: "gauge",
        path: &["ram", "dirty-pages-rate"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_dirty_syncs",
        help: "Dirty-log syncs so far.",
        kind: "counter",
        path: &["ram", "dirty-sync-count"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_precopy_bytes",
        help: "Bytes sent while the guest ran.",
        kind: "counter",
        path: &["ram", "precopy-bytes"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_ram_downtime_bytes",
        help: "Bytes sent while the guest was paused.",
        kind: "counter",
        path: &["ram", "downtime-bytes"],
        scale: 1.0,
    },
    Metric {
        name: "ferry_cpu_throttle_percent",
        help: "Auto-converge throttle of the guest.",
        kind: "gauge",
        path: &["cpu-throttle-percentage"],
        scale: 1.0,
    },
];

/// Every statuses' gauge is written, 1 for the current one, so a
/// dashboard can graph each.
const STATUSES: &[&str] = &[
    "none",
    "setup",
    "active",
    "pre-switchover",
    "device",
    "completed",
    "failed",
    "cancelling",
    "cancelled",
];

/// The exposition of one `query-migrate` answer; figures it does not have
/// (downtime before the switchover, say) are left out.
pub fn exposition(q: &Value) -> String {
    let mut out = String::new();
    out.push_str("# HELP ferry_status The migration's status (1 for the current one).\n");
    out.push_str("# TYPE ferry_status gauge\n");
    let status = q["status"].as_str().unwrap_or("none");
    for s in STATUSES {
        out.push_str(&format!(
            "ferry_status{{status=\"{s}\"}} {}\n",
            u8::from(*s == status)
        ));
    }
    for m in METRICS {
        let v = m.path.iter().fold(q, |v, k| &v[*k]);
        let Some(x) = v.as_f64() else { continue };
        out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            m.name, m.help, m.name, m.kind
        ));
        out.push_str(&format!("{} {}\n", m.name, x * m.scale));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_present_is_exposed_in_base_units() {
        let p = Progress::default();
        let text = exposition(&p.query());
        assert!(text.contains("ferry_status{status=\"none\"} 1\n"), "{text}");
        assert!(
            text.contains("ferry_status{status=\"active\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE ferry_ram_transferred_bytes counter\n"));
        let q = serde_json::json!({"status": "active", "total-time": 1500,
            "ram": {"mbps": 80.0, "remaining": 4096}});
        let text = exposition(&q);
        assert!(text.contains("ferry_total_seconds 1.5\n"), "{text}");
        assert!(
            text.contains("ferry_ram_bits_per_second 80000000\n"),
            "{text}"
        );
        assert!(text.contains("ferry_ram_remaining_bytes 4096\n"), "{text}");
        assert!(
            !text.contains("ferry_downtime_seconds"),
            "absent figures stay out"
        );
    }

    #[test]
    fn scrapes_over_http_and_refuses_other_requests() {
        let progress = Arc::new(Progress::default());
        let server = MetricsServer::start("127.0.0.1:0", progress).unwrap();
        let get = |req: &str| {
            let mut s = TcpStream::connect(server.local_addr()).unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        };
        let ok = get("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("ferry_status{status=\"none\"} 1"), "{ok}");
        assert!(get("GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // A client that sends nothing is dropped after the deadline; the
        // next scrape is still answered.
        let _silent = TcpStream::connect(server.local_addr()).unwrap();
        assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
    }
}
