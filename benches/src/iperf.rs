//! The iperf3 peer: what loopback TCP carries with K parallel streams.
//!
//! Runs `iperf3 -s -1 -p PORT` and `iperf3 -c 127.0.0.1 -p PORT -P K -t 3 -J`
//! and reads `end.sum_received` from the client's JSON. The client is retried
//! for a few seconds while the server is still starting (a refused connect
//! does not use up the server's single test).

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::run::{parse_json_object, wait_all, Proc, TAIL_LINES};
use crate::sys::{children_cpu_s, tail};
use crate::{BenchError, Sample};

const EXE: &str = "iperf3";
/// Seconds of each test.
const SECONDS: u32 = 3;
/// How long to retry connecting while the server starts.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether iperf3 can run here: its version line, or why not.
pub(crate) fn probe() -> Result<String, String> {
    let out = Command::new(EXE)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {EXE} --version: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    if first.starts_with("iperf 3") {
        Ok(first)
    } else {
        Err(format!("{EXE} --version printed '{first}', not iperf 3"))
    }
}

/// The figures read from a client's `-J` report.
#[derive(Debug, PartialEq)]
pub(crate) struct IperfResult {
    pub(crate) bytes: u64,
    pub(crate) seconds: f64,
    pub(crate) bits_per_second: f64,
}

impl IperfResult {
    pub(crate) fn gbytes_per_second(&self) -> f64 {
        self.bits_per_second / 8.0 / 1e9
    }
}

/// Reads `end.sum_received` from an iperf3 `-J` report; an `error` member
/// (iperf3's own failure) becomes the error text.
pub(crate) fn parse_report(v: &Value) -> Result<IperfResult, String> {
    if let Some(e) = v["error"].as_str() {
        return Err(e.to_string());
    }
    let sum = &v["end"]["sum_received"];
    let bits_per_second = sum["bits_per_second"]
        .as_f64()
        .ok_or("the report has no end.sum_received.bits_per_second")?;
    Ok(IperfResult {
        bytes: sum["bytes"].as_u64().unwrap_or(0),
        seconds: sum["seconds"].as_f64().unwrap_or(f64::from(SECONDS)),
        bits_per_second,
    })
}

fn free_port() -> Result<u16, BenchError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| BenchError::Process {
            process: "picking a free port for iperf3".into(),
            source,
        })
}

/// One `iperf3 -P streams` test over loopback.
/// One `iperf3 -P streams` run; `congestion` is passed as `-C` so the
/// link is measured with the same TCP congestion control ferry uses.
pub(crate) fn run_once(streams: u16, congestion: Option<&str>) -> Result<Sample, BenchError> {
    let fail = |msg: String| BenchError::Iperf { streams, msg };
    let cpu_err = |source| BenchError::Process {
        process: "getrusage".into(),
        source,
    };
    let cpu0 = children_cpu_s().map_err(cpu_err)?;
    let born = Instant::now();
    let port = free_port()?.to_string();
    let mut cmd = Command::new(EXE);
    cmd.args(["-s", "-1", "-p", &port]);
    let mut server = Proc::spawn("iperf3 server", cmd, None)?;
    std::thread::sleep(Duration::from_millis(100));

    let start = Instant::now();
    let report = loop {
        let mut cmd = Command::new(EXE);
        cmd.args(["-c", "127.0.0.1", "-p", &port, "-P", &streams.to_string()])
            .args(["-t", &SECONDS.to_string(), "-J"]);
        if let Some(cc) = congestion {
            cmd.args(["-C", cc]);
        }
        let mut client = Proc::spawn("iperf3 client", cmd, None)?;
        let limit = Duration::from_secs(u64::from(SECONDS) + 30);
        wait_all(
            &mut [&mut client],
            Instant::now() + limit,
            "iperf3 client",
            limit,
        )?;
        let fin = client.finish()?;
        let Some(v) = parse_json_object(&fin.stdout) else {
            return Err(fail(format!(
                "the client printed no JSON (exit {}); stderr tail:\n{}",
                fin.status,
                tail(&fin.stderr, TAIL_LINES)
            )));
        };
        match parse_report(&v) {
            Ok(r) => break r,
            Err(e)
                if e.contains("connect")
                    && start.elapsed() < START_TIMEOUT
                    && server.try_wait()?.is_none() =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(fail(format!(
                    "{e}; server stderr tail:\n{}",
                    tail(&server.stderr_so_far(), TAIL_LINES)
                )))
            }
        }
    };
    // The one-off server exits after its test; do not wait long for it.
    let grace = Duration::from_secs(5);
    if wait_all(
        &mut [&mut server],
        Instant::now() + grace,
        "iperf3 server",
        grace,
    )
    .is_err()
    {
        server.kill();
    }
    let died = Instant::now();
    let cpu1 = children_cpu_s().map_err(cpu_err)?;
    let detail = json!({
        "bits_per_second": report.bits_per_second,
        "gbytes_per_second": report.gbytes_per_second(),
        "bytes": report.bytes,
        "seconds": report.seconds,
    });
    let mut s = Sample::new(
        report.seconds,
        0,
        report.bytes,
        Some((
            (cpu1 - cpu0).max(0.0),
            died.duration_since(born).as_secs_f64(),
        )),
        detail,
    );
    // iperf3's own rate (bits/s over its exact interval) is the reference.
    s.gbps_wire = report.gbytes_per_second();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real `iperf3 -c 127.0.0.1 -P 2 -t 1 -J` (iperf 3.12).
    const SAMPLE: &str = r#"{
	"start":	{"version": "iperf 3.12", "test_start": {"protocol": "TCP", "num_streams": 2, "duration": 1}},
	"intervals":	[],
	"end":	{
		"streams":	[],
		"sum_sent":	{"start": 0, "end": 1.001089, "seconds": 1.001089, "bytes": 2321285120, "bits_per_second": 18550079922.963894, "retransmits": 0, "sender": true},
		"sum_received":	{"start": 0, "end": 1.00116, "seconds": 1.00116, "bytes": 2321285120, "bits_per_second": 18548764393.30377, "sender": true},
		"cpu_utilization_percent":	{"host_total": 64.13, "host_user": 1.26, "host_system": 62.86, "remote_total": 46.44, "remote_user": 0.50, "remote_system": 45.94},
		"sender_tcp_congestion":	"cubic",
		"receiver_tcp_congestion":	"cubic"
	}
}"#;

    const REFUSED: &str = r#"{
	"start":	{"connected": [], "version": "iperf 3.12"},
	"intervals":	[],
	"end":	{},
	"error":	"unable to connect to server: Connection refused"
}"#;

    #[test]
    fn parses_a_real_report() {
        let v = parse_json_object(SAMPLE).expect("json");
        let r = parse_report(&v).expect("report");
        assert_eq!(r.bytes, 2_321_285_120);
        assert!((r.seconds - 1.00116).abs() < 1e-9);
        assert!((r.gbytes_per_second() - 2.3186).abs() < 1e-3);
    }

    #[test]
    fn reports_iperf_errors() {
        let v = parse_json_object(REFUSED).expect("json");
        let e = parse_report(&v).err().unwrap_or_default();
        assert!(e.contains("unable to connect"), "{e}");
        assert!(parse_report(&json!({"end": {}})).is_err());
    }

    /// Needs iperf3: `cargo test -p ferry-bench -- --ignored`.
    #[test]
    #[ignore]
    fn real_iperf3_two_streams() {
        if let Err(why) = probe() {
            eprintln!("skipped: {why}");
            return;
        }
        let s = run_once(2, None).expect("iperf3 run");
        eprintln!("iperf3 -P 2: {s:?}");
        assert!(s.gbps_wire > 0.0 && s.gbps_ram.is_none());
    }
}
