//! The control socket: a unix socket speaking JSON lines in QMP's shape,
//! for `ferry send --control` and `ferry recv --control`.
//!
//! On connect the server sends a greeting, `{"QMP":{"version":{...},
//! "capabilities":[]}}`. Each request is one line, a JSON object
//! `{"execute":NAME,"arguments":{...},"id":ANY}` (arguments and id are
//! optional; id is echoed). Each reply is one line: `{"return":{...}}` or
//! `{"error":{"class":CLASS,"desc":TEXT}}`. Events arrive on every
//! connection as they happen: `{"event":"MIGRATION","data":{"status":S},
//! "timestamp":{...}}` and `{"event":"MIGRATION_PASS","data":{...}}`.
//!
//! Commands:
//! - `qmp_capabilities`: accepted, nothing to negotiate;
//! - `query-migrate`: status, times, ram figures (see [`Progress::query`]);
//! - `query-migrate-parameters`;
//! - `migrate-cancel`: cancels a migration that has not finished;
//! - `migrate-continue` with `{"state":"pre-switchover"}`;
//! - `migrate-set-parameters` with any of `downtime-limit` (ms),
//!   `max-bandwidth` and `avail-switchover-bandwidth` (bytes/s),
//!   `cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle`
//!   (percent), `auto-converge` and `pause-before-switchover` (booleans),
//!   `max-passes`. All are checked before any is applied.
//!
//! A malformed request gets an error reply and the connection stays open;
//! a line longer than 64 KiB ends the connection after its error reply.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::{Parameters, Progress};

/// The longest request line accepted.
const MAX_LINE: u64 = 64 << 10;
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: cannot start its thread: {source}")]
    Thread {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running control socket; dropping it closes the socket and removes it.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens at `path` (an existing socket file there is replaced).
    pub fn start(path: &Path, progress: Arc<Progress>) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.into(),
            source,
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-control".into())
                .spawn(move || accept_loop(&listener, &progress, &stop))
                .map_err(|source| ControlError::Thread {
                    path: path.into(),
                    source,
                })?
        };
        Ok(Self {
            path: path.into(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, progress: &Arc<Progress>, stop: &Arc<AtomicBool>) {
    let mut clients = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (progress, stop) = (progress.clone(), stop.clone());
                if let Ok(t) = std::thread::Builder::new()
                    .name("ferry-control-client".into())
                    .spawn(move || serve(stream, &progress, &stop))
                {
                    clients.push(t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                std::thread::sleep(POLL);
            }
        }
        clients.retain(|t: &JoinHandle<()>| !t.is_finished());
    }
    for t in clients {
        let _ = t.join();
    }
}

/// One client: greeting, then a reply per request line; events are
/// written by a forwarder thread through the same (locked) stream.
fn serve(stream: UnixStream, progress: &Progress, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(POLL));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let writer = Arc::new(Mutex::new(write_half));
    let greeting = json!({ "QMP": { "version": { "ferry": env!("CARGO_PKG_VERSION") },
                                    "capabilities": [] } });
    if send(&writer, &greeting).is_err() {
        return;
    }
    let events = progress.subscribe();
    let closed = Arc::new(AtomicBool::new(false));
    let forwarder = {
        let (writer, closed) = (writer.clone(), closed.clone());
        std::thread::spawn(move || {
            while !closed.load(Ordering::SeqCst) {
                match events.recv_timeout(POLL) {
                    Ok(e) => {
                        if send(&writer, &e.to_json()).is_err() {
                            break;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(_) => break,
                }
            }
        })
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match read_line(&mut reader, &mut line) {
            Ok(LineRead::Line) => {
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    line.clear();
                    continue;
                }
                let reply = handle(&text, progress);
                line.clear();
                if send(&writer, &reply).is_err() {
                    break;
                }
            }
            Ok(LineRead::Pending) => {}
            Ok(LineRead::TooLong) => {
                let _ = send(
                    &writer,
                    &error_reply(
                        None,
                        "GenericError",
                        &format!("request longer than {MAX_LINE} bytes"),
                    ),
                );
                break;
            }
            Ok(LineRead::Eof) | Err(_) => break,
        }
    }
    closed.store(true, Ordering::SeqCst);
    let _ = forwarder.join();
}

enum LineRead {
    Line,
    Pending,
    TooLong,
    Eof,
}

/// Reads into `line` up to a newline; `Pending` when the read timed out
/// with the line still incomplete (it is kept for the next call).
fn read_line(reader: &mut BufReader<UnixStream>, line: &mut Vec<u8>) -> std::io::Result<LineRead> {
    let room = MAX_LINE + 1 - (line.len() as u64).min(MAX_LINE);
    match reader.by_ref().take(room).read_until(b'\n', line) {
        Ok(0) if line.is_empty() => Ok(LineRead::Eof),
        Ok(_) if line.last() == Some(&b'\n') => Ok(LineRead::Line),
        Ok(_) if line.len() as u64 > MAX_LINE => Ok(LineRead::TooLong),
        Ok(0) => Ok(LineRead::Line), // EOF after a last line without newline
        Ok(_) => Ok(LineRead::Pending),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(LineRead::Pending)
        }
        Err(e) => Err(e),
    }
}

fn send(writer: &Mutex<UnixStream>, v: &Value) -> std::io::Result<()> {
    let mut text = v.to_string();
    text.push('\n');
    writer.lock().unwrap().write_all(text.as_bytes())
}

fn error_reply(id: Option<&Value>, class: &str, desc: &str) -> Value {
    let mut r = json!({ "error": { "class": class, "desc": desc } });
    if let Some(id) = id {
        r["id"] = id.clone();
    }
    r
}

/// Answers one request line.
pub fn handle(line: &str, progress: &Progress) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return error_reply(
                None,
                "GenericError",
                &format!("malformed request (not JSON): {e}"),
            )
        }
    };
    let Some(obj) = req.as_object() else {
        return error_reply(None, "GenericError", "a request must be a JSON object");
    };
    let id = obj.get("id");
    let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
        return error_reply(
            id,
            "GenericError",
            "a request needs \"execute\" with a command name",
        );
    };
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return error_reply(id, "GenericError", "\"arguments\" must be an object"),
    };
    let result = match cmd {
        "qmp_capabilities" => Ok(json!({})),
        "query-migrate" => Ok(progress.query()),
        "query-migrate-parameters" => Ok(parameters_json(&progress.parameters())),
        "migrate-cancel" => {
            progress.cancel();
            Ok(json!({}))
        }
        "migrate-continue" => match args.get("state").and_then(Value::as_str) {
            Some(state) => progress.continue_from(state).map(|()| json!({})),
            None => Err("migrate-continue needs \"state\" (e.g. \"pre-switchover\")".into()),
        },
        "migrate-set-parameters" => set_parameters(progress, args).map(|()| json!({})),
        other => {
            return error_reply(
                id,
                "CommandNotFound",
                &format!("the command {other} has not been found"),
            )
        }
    };
    let mut reply = match result {
        Ok(v) => json!({ "return": v }),
        Err(desc) => return error_reply(id, "GenericError", &desc),
    };
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply
}

fn parameters_json(p: &Parameters) -> Value {
    json!({
        "downtime-limit": p.downtime_limit.as_millis() as u64,
        "max-bandwidth": p.max_bandwidth,
        "avail-switchover-bandwidth": p.avail_switchover_bandwidth,
        "cpu-throttle-initial": p.throttle_initial,
        "cpu-throttle-increment": p.throttle_increment,
        "max-cpu-throttle": p.throttle_max,
        "auto-converge": p.auto_converge,
        "pause-before-switchover": p.pause_before_switchover,
        "max-passes": p.max_passes,
    })
}

/// Checks every argument, then applies them all at once.
fn set_parameters(progress: &Progress, args: &Map<String, Value>) -> Result<(), String> {
    let mut p = progress.parameters();
    for (key, v) in args {
        let num = |max: u64| {
            v.as_u64()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("parameter '{key}' expects an integer from 0 to {max}"))
        };
        let pct = || {
            v.as_u64()
                .filter(|n| (1..=99).contains(n))
                .map(|n| n as u8)
                .ok_or_else(|| format!("parameter '{key}' expects a percentage from 1 to 99"))
        };
        let flag = || {
            v.as_bool()
                .ok_or_else(|| format!("parameter '{key}' expects true or false"))
        };
        match key.as_str() {
            "downtime-limit" => p.downtime_limit = Duration::from_millis(num(2_000_000)?),
            "max-bandwidth" => p.max_bandwidth = num(u64::MAX)?,
            "avail-switchover-bandwidth" => p.avail_switchover_bandwidth = num(u64::MAX)?,
            "cpu-throttle-initial" => p.throttle_initial = pct()?,
            "cpu-throttle-increment" => p.throttle_increment = pct()?,
            "max-cpu-throttle" => p.throttle_max = pct()?,
            "auto-converge" => p.auto_converge = flag()?,
            "pause-before-switchover" => p.pause_before_switchover = flag()?,
            "max-passes" => p.max_passes = num(u64::MAX)?,
            other => return Err(format!("parameter '{other}' is unexpected")),
        }
    }
    progress.set_parameters(|cur| *cur = p);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_errors() {
        let p = Progress::default();
        assert_eq!(
            handle("{\"execute\":\"query-migrate\"}", &p)["return"]["status"],
            "none"
        );
        let r = handle("{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":50,\"max-bandwidth\":1000},\"id\":7}", &p);
        assert_eq!(r, json!({"return":{}, "id": 7}));
        assert_eq!(p.parameters().downtime_limit, Duration::from_millis(50));
        let r = handle("{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"downtime-limit\":10,\"bogus\":1}}", &p);
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("'bogus'"),
            "{r}"
        );
        assert_eq!(
            p.parameters().downtime_limit,
            Duration::from_millis(50),
            "nothing applied"
        );
        for bad in [
            "{",
            "[1]",
            "{\"arguments\":{}}",
            "{\"execute\":\"migrate-continue\"}",
        ] {
            assert!(handle(bad, &p)["error"]["desc"].is_string(), "{bad}");
        }
        assert_eq!(
            handle("{\"execute\":\"nope\"}", &p)["error"]["class"],
            "CommandNotFound"
        );
        let r = handle(
            "{\"execute\":\"migrate-continue\",\"arguments\":{\"state\":\"pre-switchover\"}}",
            &p,
        );
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("'none'"),
            "{r}"
        );
    }
}
