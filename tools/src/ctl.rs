//! `ferry ctl`: talk to a running `ferry send` or `ferry recv` through its
//! control socket (QMP-shaped JSON lines; see the controller's `control`
//! module for the protocol).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::units::{duration, parse_millis, parse_size, parse_timeout};

/// The keys `migrate-set-parameters` takes (the controller's `control`
/// module decides; keep in step with it) and what each expects.
const SET_KEYS: &[(&str, &str)] = &[
    (
        "downtime-limit",
        "longest pause for the final pass: milliseconds, or 300ms, 1.5s",
    ),
    (
        "max-bandwidth",
        "pass rate limit in bytes/s, e.g. 100M (MiB/s); 0: none",
    ),
    (
        "avail-switchover-bandwidth",
        "bytes/s to assume when deciding to switch over; 0: measured",
    ),
    ("auto-converge", "true or false"),
    (
        "cpu-throttle-initial",
        "auto-converge's first throttle, percent 1-99",
    ),
    (
        "cpu-throttle-increment",
        "auto-converge's step, percent 1-99",
    ),
    (
        "max-cpu-throttle",
        "auto-converge's highest throttle, percent 1-99",
    ),
    (
        "pause-before-switchover",
        "true or false: wait in pre-switchover for `continue`",
    ),
    ("max-passes", "give up after this many passes; 0: never"),
    (
        "checkpoint-delay",
        "COLO: time between periodic checkpoints (ms, or 100ms, 1s); at once",
    ),
];

fn set_keys_help() -> String {
    let mut s = String::from("Keys:\n");
    for (k, what) in SET_KEYS {
        s.push_str(&format!("  {k:<28}{what}\n"));
    }
    s
}

fn set_key_names() -> String {
    SET_KEYS
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Query or steer a running migration through its control socket.
///
/// Prints the reply as one JSON line on stdout; exit status 0 for a
/// `return`, 1 for an `error`.
#[derive(Args)]
pub struct CtlArgs {
    /// The socket given to `ferry send --control` or `ferry recv --control`.
    socket: PathBuf,
    #[command(subcommand)]
    command: CtlCommand,
    /// Give up if no reply comes within this long (10s, 500ms, 1m; a bare
    /// number is seconds; more than 0). `events` waits for ever once connected.
    #[arg(long, default_value = "10s", value_parser = parse_timeout, allow_negative_numbers = true)]
    timeout: Duration,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// query-migrate: status, times, transferred/remaining bytes, rates.
    Query,
    /// query-migrate-parameters.
    Params,
    /// migrate-cancel: stop the migration; the source guest keeps running.
    Cancel,
    /// migrate-continue: leave pre-switchover (see send --pause-before-switchover).
    Continue,
    /// migrate-start-postcopy: switch to postcopy after the pass in flight
    /// (needs `send --postcopy`).
    StartPostcopy,
    /// migrate-recover URI: on a destination in postcopy-paused, listen
    /// on URI (tcp:HOST:PORT) for the source's `resume`.
    Recover { uri: String },
    /// migrate-resume URI: on a source in postcopy-paused, reconnect every
    /// channel (main and preempt) to URI, where the destination recovers.
    Resume { uri: String },
    /// migrate-set-parameters KEY=VALUE...: e.g. downtime-limit=500ms
    /// max-bandwidth=100M auto-converge=true (keys below).
    #[command(after_help = set_keys_help())]
    Set {
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// COLO: take a checkpoint now.
    Checkpoint,
    /// COLO: fail over now (QEMU's x-colo-lost-heartbeat): this side goes
    /// on alone.
    Failover,
    /// COLO: mode, last mode, failover state and reason, live figures.
    QueryColoStatus,
    /// COLO: stop the guest on both sides and end.
    Poweroff,
    /// Print events until the migration ends (or the socket closes).
    Events,
    /// Send one raw JSON request line.
    Raw { request: String },
}

pub fn run(a: CtlArgs) -> anyhow::Result<bool> {
    // The request line (None: listen to events); bad settings are refused
    // before connecting.
    let request = match &a.command {
        CtlCommand::Query => Some(json!({ "execute": "query-migrate" }).to_string()),
        CtlCommand::Params => Some(json!({ "execute": "query-migrate-parameters" }).to_string()),
        CtlCommand::Cancel => Some(json!({ "execute": "migrate-cancel" }).to_string()),
        CtlCommand::Continue => Some(
            json!({ "execute": "migrate-continue", "arguments": { "state": "pre-switchover" } })
                .to_string(),
        ),
        CtlCommand::StartPostcopy => {
            Some(json!({ "execute": "migrate-start-postcopy" }).to_string())
        }
        CtlCommand::Recover { uri } => {
            Some(json!({ "execute": "migrate-recover", "arguments": { "uri": uri } }).to_string())
        }
        CtlCommand::Resume { uri } => {
            Some(json!({ "execute": "migrate-resume", "arguments": { "uri": uri } }).to_string())
        }
        CtlCommand::Set { settings } => Some(
            json!({ "execute": "migrate-set-parameters", "arguments": parse_settings(settings)? })
                .to_string(),
        ),
        CtlCommand::Checkpoint => Some(json!({ "execute": "colo-checkpoint" }).to_string()),
        CtlCommand::Failover => Some(json!({ "execute": "x-colo-lost-heartbeat" }).to_string()),
        CtlCommand::QueryColoStatus => Some(json!({ "execute": "query-colo-status" }).to_string()),
        CtlCommand::Poweroff => Some(json!({ "execute": "colo-poweroff" }).to_string()),
        CtlCommand::Events => None,
        CtlCommand::Raw { request } => Some(request.trim().to_string()),
    };
    let mut conn = Conn::open(&a.socket, a.timeout)?;
    let greeting = conn.read_json().context("reading the greeting")?;
    if greeting.get("QMP").is_none() {
        bail!(
            "{} is not a ferry control socket: {greeting}",
            a.socket.display()
        );
    }
    match request {
        Some(line) => {
            conn.send(&line)?;
            print_reply(&mut conn)
        }
        None => {
            // Events come when the migration moves on, which may take long.
            conn.reader.get_ref().set_read_timeout(None)?;
            print_events(&mut conn)
        }
    }
}

/// A connection to a control socket, its path and reply timeout kept for
/// error messages.
struct Conn {
    reader: BufReader<UnixStream>,
    path: PathBuf,
    timeout: Duration,
}

impl Conn {
    fn open(path: &Path, timeout: Duration) -> anyhow::Result<Conn> {
        let shown = path.display();
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => anyhow!(
                "no control socket at {shown} (it appears once the migration has started \
                 its setup; is `ferry send --control {shown}` or `ferry recv --control \
                 {shown}` running?)"
            ),
            ErrorKind::ConnectionRefused => anyhow!(
                "nothing accepts connections at {shown}: not a socket, or the ferry that \
                 opened it has exited ({e})"
            ),
            _ => anyhow!("connecting to the control socket {shown}: {e}"),
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream),
            path: path.to_path_buf(),
            timeout,
        })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let mut s = self.reader.get_ref();
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| self.io_error(e, "sending the request"))
    }

    /// The next non-empty line, as JSON.
    fn read_json(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| self.io_error(e, "reading"))?;
            if n == 0 {
                return Err(Closed.into());
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).with_context(|| {
                    format!(
                        "the control socket {} sent a line that is not JSON: {}",
                        self.path.display(),
                        line.trim()
                    )
                });
            }
        }
    }

    fn io_error(&self, e: std::io::Error, doing: &str) -> anyhow::Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => anyhow!(
                "no reply from the control socket {} within {} (a busy or stuck ferry? \
                 try a longer --timeout)",
                self.path.display(),
                duration(self.timeout)
            ),
            _ => anyhow!("{doing} the control socket {}: {e}", self.path.display()),
        }
    }
}

/// The control socket closed: the migration ended, or its ferry exited.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the control socket closed")
    }
}

impl std::error::Error for Closed {}

/// Prints the reply (skipping events that arrive first).
fn print_reply(conn: &mut Conn) -> anyhow::Result<bool> {
    loop {
        let v = conn.read_json().context("waiting for the reply")?;
        if v.get("event").is_some() {
            continue;
        }
        println!("{v}");
        return Ok(v.get("return").is_some());
    }
}

fn print_events(conn: &mut Conn) -> anyhow::Result<bool> {
    loop {
        let v = match conn.read_json() {
            Ok(v) => v,
            Err(e) if e.downcast_ref::<Closed>().is_some() => return Ok(true),
            Err(e) => return Err(e),
        };
        println!("{v}");
        let status = v["data"]["status"].as_str().unwrap_or("");
        if matches!(status, "completed" | "failed" | "cancelled") {
            return Ok(true);
        }
    }
}

/// `KEY=VALUE` pairs as JSON arguments. Keys are checked against
/// [`SET_KEYS`]; `downtime-limit` takes a duration (a bare number is
/// milliseconds), the bandwidths a size (100M); other values go as
/// numbers, true/false, else strings, for the server to check.
fn parse_settings(settings: &[String]) -> anyhow::Result<Value> {
    let mut args = serde_json::Map::new();
    for s in settings {
        let Some((k, v)) = s.split_once('=') else {
            bail!(
                "'{s}': expected KEY=VALUE, e.g. downtime-limit=500ms (keys: {})",
                set_key_names()
            );
        };
        if !SET_KEYS.iter().any(|(key, _)| *key == k) {
            bail!(
                "unknown parameter '{k}'; the parameters are: {}",
                set_key_names()
            );
        }
        let value = match k {
            "downtime-limit" | "checkpoint-delay" => {
                let d = parse_millis(v).map_err(|e| anyhow!("{k}: {e}"))?;
                json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            }
            "max-bandwidth" | "avail-switchover-bandwidth" => {
                json!(parse_size(v).map_err(|e| anyhow!("{k}: {e}"))?)
            }
            _ => {
                if let Ok(n) = v.parse::<u64>() {
                    json!(n)
                } else if let Ok(b) = v.parse::<bool>() {
                    json!(b)
                } else {
                    json!(v)
                }
            }
        };
        args.insert(k.to_string(), value);
    }
    Ok(Value::Object(args))
}
