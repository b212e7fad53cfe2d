//! `ferry ctl`: talk to a running `ferry send` or `ferry recv` through its
//! control socket (QMP-shaped JSON lines; see the controller's `control`
//! module for the protocol).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

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
    /// Give up if no reply comes within this many seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
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
    /// migrate-set-parameters KEY=VALUE...: e.g. downtime-limit=500
    /// max-bandwidth=100000000 auto-converge=true.
    Set {
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Print events until the migration ends (or the socket closes).
    Events,
    /// Send one raw JSON request line.
    Raw { request: String },
}

pub fn run(a: CtlArgs) -> anyhow::Result<bool> {
    let stream = UnixStream::connect(&a.socket)
        .with_context(|| format!("connecting to {}", a.socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs_f64(a.timeout.max(0.1))))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let greeting = read_json(&mut reader).context("reading the greeting")?;
    if greeting.get("QMP").is_none() {
        bail!(
            "{} is not a ferry control socket: {greeting}",
            a.socket.display()
        );
    }
    let request = match &a.command {
        CtlCommand::Query => json!({ "execute": "query-migrate" }),
        CtlCommand::Params => json!({ "execute": "query-migrate-parameters" }),
        CtlCommand::Cancel => json!({ "execute": "migrate-cancel" }),
        CtlCommand::Continue => {
            json!({ "execute": "migrate-continue", "arguments": { "state": "pre-switchover" } })
        }
        CtlCommand::Set { settings } => {
            json!({ "execute": "migrate-set-parameters", "arguments": parse_settings(settings)? })
        }
        CtlCommand::Events => return print_events(&mut reader),
        CtlCommand::Raw { request } => {
            let mut s = &stream;
            s.write_all(format!("{}\n", request.trim()).as_bytes())?;
            return print_reply(&mut reader);
        }
    };
    let mut s = &stream;
    s.write_all(format!("{request}\n").as_bytes())?;
    print_reply(&mut reader)
}

/// Prints the reply (skipping events that arrive first).
fn print_reply(reader: &mut BufReader<UnixStream>) -> anyhow::Result<bool> {
    loop {
        let v = read_json(reader).context("reading the reply")?;
        if v.get("event").is_some() {
            continue;
        }
        println!("{v}");
        return Ok(v.get("return").is_some());
    }
}

fn print_events(reader: &mut BufReader<UnixStream>) -> anyhow::Result<bool> {
    loop {
        let v = match read_json(reader) {
            Ok(v) => v,
            Err(e) if e.downcast_ref::<std::io::Error>().is_some() => return Ok(true),
            Err(e) => return Err(e),
        };
        println!("{v}");
        let status = v["data"]["status"].as_str().unwrap_or("");
        if matches!(status, "completed" | "failed" | "cancelled") {
            return Ok(true);
        }
    }
}

fn read_json(reader: &mut BufReader<UnixStream>) -> anyhow::Result<Value> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the control socket closed",
            )
            .into());
        }
        if !line.trim().is_empty() {
            return Ok(serde_json::from_str(line.trim())?);
        }
    }
}

/// `KEY=VALUE` pairs as JSON arguments: numbers, true/false, else strings.
fn parse_settings(settings: &[String]) -> anyhow::Result<Value> {
    let mut args = serde_json::Map::new();
    for s in settings {
        let Some((k, v)) = s.split_once('=') else {
            bail!("'{s}': expected KEY=VALUE");
        };
        let value = if let Ok(n) = v.parse::<u64>() {
            json!(n)
        } else if let Ok(b) = v.parse::<bool>() {
            json!(b)
        } else {
            json!(v)
        };
        args.insert(k.to_string(), value);
    }
    Ok(Value::Object(args))
}
