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
//! - `migrate-cancel`: cancels a migration that has not finished (an
//!   error saying why in postcopy: neither side alone holds the guest);
//! - `migrate-continue` with `{"state":"pre-switchover"}`;
//! - `migrate-recover` (destination) / `migrate-resume` (source) with
//!   `{"uri":"tcp:HOST:PORT"}`: recover a postcopy in postcopy-paused;
//! - `migrate-set-parameters` with any of `downtime-limit` (ms),
//!   `max-bandwidth` and `avail-switchover-bandwidth` (bytes/s),
//!   `cpu-throttle-initial`, `cpu-throttle-increment`, `max-cpu-throttle`
//!   (percent), `auto-converge` and `pause-before-switchover` (booleans),
//!   `max-passes`, and in COLO `checkpoint-delay` (ms, takes effect at
//!   once). All are checked before any is applied.
//! - COLO (`send --colo`, `recv --colo`): `colo-checkpoint` (a checkpoint
//!   now), `x-colo-lost-heartbeat` (QEMU's name: fail over now),
//!   `query-colo-status` (mode, last mode, failover state, reason; plus
//!   live checkpoint figures), `colo-poweroff` (stop the guest on both
//!   sides and end).
//!
//! A malformed request gets an error reply and the connection stays open;
//! a line longer than 64 KiB ends the connection after its error reply.
//!
//! One thread serves the listening socket and every client with poll(2);
//! nothing it does blocks. Each client has its own outgoing queue: replies
//! and events are queued and written as the client reads them. A client
//! whose queue passes 256 KiB, or that reads nothing for 2 s while output
//! waits, is dropped, so a client that stops reading never holds up the
//! migration, the other clients or the process's exit. At most 16 clients
//! are served at once; a further connection gets one error line and is
//! closed. Dropping the server gives queued output at most half a second
//! to leave, then closes everything.
//!
//! The socket file is created with mode 0600 whatever the umask: its mode
//! is set between bind() and listen(), and no connect() succeeds before
//! listen() ([`ferry_transport::listen_unix`]). A stale socket at the path
//! (nobody listens) is replaced; a live one, a directory or any other file
//! is refused and left untouched.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_transport::TransportError;
use serde_json::{json, Map, Value};

use crate::{Event, Parameters, Progress};

/// The longest request line accepted.
const MAX_LINE: usize = 64 << 10;
/// How often the server looks for new events and stalled clients.
const TICK: Duration = Duration::from_millis(50);
/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Output waiting for one client beyond which it is dropped.
const MAX_QUEUED: usize = 256 << 10;
/// How long a client with output waiting may read nothing.
const STALL: Duration = Duration::from_secs(2);
/// How long queued output may take to leave once the server stops.
const FLUSH_ON_STOP: Duration = Duration::from_millis(500);
/// Bytes read from one client per turn, so one cannot starve the others.
const READ_PER_TURN: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "another ferry is using the control socket {path}: stop it, or give this one another \
         path"
    )]
    InUse { path: PathBuf },
    #[error("control socket: {0}")]
    Path(#[source] TransportError),
    #[error("control socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("control socket {path}: cannot start its thread: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

/// A running control socket; dropping it closes the socket and removes it.
pub struct ControlServer {
    path: PathBuf,
    /// The socket file we created (device, inode): removed on drop only
    /// while it is still ours.
    file: Option<(u64, u64)>,
    stop: Arc<AtomicBool>,
    /// Wakes the server thread out of poll() when it is to stop.
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens at `path` (mode 0600). A stale socket file there is
    /// replaced; a socket another process listens on, a directory or any
    /// other file is refused and left as it is.
    pub fn start(path: &Path, progress: Arc<Progress>) -> Result<Self, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.into(),
            source,
        };
        let listener =
            ferry_transport::listen_unix(path, Some(0o600), 64).map_err(|e| match e {
                TransportError::UnixInUse { path } => ControlError::InUse { path },
                other => ControlError::Path(other),
            })?;
        let file = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let remove = || {
            let _ = std::fs::remove_file(path);
        };
        let setup = || {
            listener.set_nonblocking(true)?;
            let (wake, woken) = UnixStream::pair()?;
            wake.set_nonblocking(true)?;
            woken.set_nonblocking(true)?;
            Ok::<_, io::Error>((wake, woken))
        };
        let (wake, woken) = setup().map_err(|e| {
            remove();
            bind_err(e)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let events = progress.subscribe();
        let server = Server {
            listener,
            woken,
            progress,
            events,
            stop: stop.clone(),
            clients: Vec::new(),
            accept_paused_until: None,
        };
        let thread = std::thread::Builder::new()
            .name("ferry-control".into())
            .spawn(move || server.run())
            .map_err(|source| {
                remove();
                ControlError::Thread {
                    path: path.into(),
                    source,
                }
            })?;
        Ok(Self {
            path: path.into(),
            file,
            stop,
            wake,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    /// Returns within about [`FLUSH_ON_STOP`] whatever the clients do.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = (&self.wake).write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.file.is_some() && now == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The server thread's state: the listening socket and every client.
struct Server {
    listener: UnixListener,
    woken: UnixStream,
    progress: Arc<Progress>,
    events: mpsc::Receiver<Event>,
    stop: Arc<AtomicBool>,
    clients: Vec<Client>,
    /// After an accept error (e.g. out of file descriptors), the listener
    /// is left out of poll() until then, instead of spinning on it.
    accept_paused_until: Option<Instant>,
}

/// One connection: its partial request line and its queued output.
struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written.
    written: usize,
    /// When output last left (or was queued with nothing waiting).
    progress_at: Instant,
    /// No more requests are read; closed once the output has left.
    closing: bool,
    /// Set once the connection is to be closed now.
    end: Option<End>,
}

/// Why a connection is closed before its output has left.
enum End {
    /// The client closed it (EPIPE, reset).
    Gone,
    /// The server drops it, for this reason.
    Dropped(String),
}

impl End {
    /// `Gone` for a peer that closed the connection, else `Dropped`.
    fn from_io(what: &str, e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Self::Gone,
            _ => Self::Dropped(format!("{what} failed: {e}")),
        }
    }
}

impl Client {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            progress_at: Instant::now(),
            closing: false,
            end: None,
        }
    }

    fn pending(&self) -> usize {
        self.output.len() - self.written
    }

    /// Queues one line; a queue past [`MAX_QUEUED`] drops the client.
    fn queue(&mut self, line: &[u8]) {
        if self.end.is_some() {
            return;
        }
        if self.pending() == 0 {
            self.output.clear();
            self.written = 0;
            self.progress_at = Instant::now();
        }
        self.output.extend_from_slice(line);
        if self.pending() > MAX_QUEUED {
            self.end = Some(End::Dropped(format!(
                "it let more than {} KiB of replies and events pile up unread",
                MAX_QUEUED >> 10
            )));
        }
    }

    fn queue_value(&mut self, v: &Value) {
        let mut text = v.to_string();
        text.push('\n');
        self.queue(text.as_bytes());
    }

    /// Writes what the socket takes now, never waiting.
    fn flush(&mut self) {
        while self.end.is_none() && self.pending() > 0 {
            match send_now(&self.stream, &self.output[self.written..]) {
                Ok(n) => {
                    self.written += n;
                    self.progress_at = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => self.end = Some(End::from_io("writing to it", &e)),
            }
        }
        if self.pending() == 0 && self.written > 0 {
            self.output.clear();
            self.written = 0;
        } else if self.written > MAX_QUEUED {
            self.output.drain(..self.written);
            self.written = 0;
        }
    }

    /// Reads what has arrived and answers each complete request line.
    fn read(&mut self, progress: &Progress) {
        let mut buf = [0u8; 8192];
        let mut taken = 0;
        while !self.closing && self.end.is_none() && taken < READ_PER_TURN {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // The client is done sending: answer a last line
                    // without newline, then close once answered.
                    if !self.input.is_empty() {
                        self.input.push(b'\n');
                        self.answer(progress);
                    }
                    self.closing = true;
                }
                Ok(n) => {
                    taken += n;
                    self.input.extend_from_slice(&buf[..n]);
                    self.answer(progress);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => self.end = Some(End::from_io("reading from it", &e)),
            }
        }
    }

    /// Answers every complete line in `input`; a line longer than
    /// [`MAX_LINE`] gets an error reply and ends the connection.
    fn answer(&mut self, progress: &Progress) {
        let mut start = 0;
        while let Some(nl) = self.input[start..].iter().position(|&b| b == b'\n') {
            let line = &self.input[start..start + nl];
            start += nl + 1;
            if line.len() > MAX_LINE {
                self.too_long();
                return;
            }
            let text = String::from_utf8_lossy(line);
            if text.trim().is_empty() {
                continue;
            }
            let reply = handle(&text, progress);
            self.queue_value(&reply);
            if self.end.is_some() {
                return;
            }
        }
        self.input.drain(..start);
        if self.input.len() > MAX_LINE {
            self.too_long();
        }
    }

    fn too_long(&mut self) {
        self.input.clear();
        self.queue_value(&error_reply(
            None,
            "GenericError",
            &format!("request longer than {MAX_LINE} bytes; closing the connection"),
        ));
        self.closing = true;
    }
}

/// Writes without blocking and without SIGPIPE (an embedding process may
/// not ignore it): a closed peer is an EPIPE error, a full socket
/// `WouldBlock`.
fn send_now(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice of `buf.len()` readable bytes and the
    // descriptor is owned by `stream`, open for the whole call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Waits at most `timeout` for one of `fds` to be ready; EINTR counts as
/// a timeout.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a live, initialised slice of `fds.len()` pollfd
    // structs that poll() may write `revents` into.
    unsafe {
        libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms);
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn greeting() -> Value {
    json!({ "QMP": { "version": { "ferry": env!("CARGO_PKG_VERSION") },
                     "capabilities": [] } })
}

impl Server {
    fn run(mut self) {
        while !self.stop.load(Ordering::SeqCst) {
            let listening = self.accept_paused_until.is_none_or(|t| Instant::now() >= t);
            let mut fds = vec![
                pollfd(self.woken.as_raw_fd(), libc::POLLIN),
                pollfd(
                    self.listener.as_raw_fd(),
                    if listening { libc::POLLIN } else { 0 },
                ),
            ];
            fds.extend(self.clients.iter().map(|c| {
                let mut ev = 0;
                if !c.closing {
                    ev |= libc::POLLIN;
                }
                if c.pending() > 0 {
                    ev |= libc::POLLOUT;
                }
                pollfd(c.stream.as_raw_fd(), ev)
            }));
            poll(&mut fds, TICK);
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            if listening && fds[1].revents != 0 {
                self.accept();
            }
            for (c, fd) in self.clients.iter_mut().zip(&fds[2..]) {
                if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    c.read(&self.progress);
                }
            }
            self.forward_events();
            for c in &mut self.clients {
                c.flush();
            }
            self.reap();
        }
        self.finish();
    }

    /// Accepts every waiting connection; beyond [`MAX_CLIENTS`] each gets
    /// an error line (if its socket takes it now) and is closed.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= MAX_CLIENTS {
                        let mut line = error_reply(
                            None,
                            "GenericError",
                            &format!(
                                "too many control clients ({MAX_CLIENTS}); close one and \
                                 connect again"
                            ),
                        )
                        .to_string();
                        line.push('\n');
                        let _ = send_now(&stream, line.as_bytes());
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("control socket: a new client: {e}");
                        continue;
                    }
                    let mut c = Client::new(stream);
                    c.queue_value(&greeting());
                    self.clients.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("control socket: accepting a client: {e}");
                    self.accept_paused_until = Some(Instant::now() + TICK * 4);
                    return;
                }
            }
        }
    }

    /// Queues every new event for every client.
    fn forward_events(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            let mut line = e.to_json().to_string();
            line.push('\n');
            for c in self.clients.iter_mut().filter(|c| !c.closing) {
                c.queue(line.as_bytes());
            }
        }
    }

    /// Drops clients that failed, closed, or stalled.
    fn reap(&mut self) {
        self.clients.retain_mut(|c| {
            if c.end.is_none() && c.pending() > 0 && c.progress_at.elapsed() > STALL {
                c.end = Some(End::Dropped(format!(
                    "it read nothing for {} s with replies or events waiting",
                    STALL.as_secs()
                )));
            }
            match &c.end {
                Some(End::Dropped(why)) => {
                    tracing::warn!("control socket: dropping a client: {why}");
                    false
                }
                Some(End::Gone) => false,
                None => !(c.closing && c.pending() == 0),
            }
        });
    }

    /// The server is stopping: the last events and queued output get at
    /// most [`FLUSH_ON_STOP`] to leave, then every connection closes.
    fn finish(&mut self) {
        self.forward_events();
        let deadline = Instant::now() + FLUSH_ON_STOP;
        loop {
            for c in &mut self.clients {
                c.flush();
            }
            self.clients.retain(|c| c.end.is_none() && c.pending() > 0);
            let left = deadline.saturating_duration_since(Instant::now());
            if self.clients.is_empty() || left.is_zero() {
                break;
            }
            let mut fds: Vec<_> = self
                .clients
                .iter()
                .map(|c| pollfd(c.stream.as_raw_fd(), libc::POLLOUT))
                .collect();
            poll(&mut fds, left);
        }
    }
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
        "migrate-cancel" => match progress.cancel_refusal() {
            Some(why) => Err(why),
            None => {
                progress.cancel();
                Ok(json!({}))
            }
        },
        // Postcopy recovery (QEMU: `migrate-recover` on the destination,
        // `migrate` with `resume` on the source).
        "migrate-recover" | "migrate-resume" => match args.get("uri").and_then(Value::as_str) {
            Some(uri) => {
                let what = cmd.trim_start_matches("migrate-");
                progress.request_recover(what, uri).map(|()| json!({}))
            }
            None => Err(format!("{cmd} needs \"uri\" (e.g. \"tcp:HOST:PORT\")")),
        },
        "migrate-continue" => match args.get("state").and_then(Value::as_str) {
            Some(state) => progress.continue_from(state).map(|()| json!({})),
            None => Err("migrate-continue needs \"state\" (e.g. \"pre-switchover\")".into()),
        },
        "migrate-start-postcopy" => progress.start_postcopy().map(|()| json!({})),
        "migrate-set-parameters" => set_with_colo(progress, args).map(|()| json!({})),
        "colo-checkpoint" | "x-colo-lost-heartbeat" | "query-colo-status" | "colo-poweroff" => {
            match progress.colo() {
                None => Err(format!("{cmd}: COLO is not running here")),
                Some(c) => match cmd {
                    "colo-checkpoint" => {
                        c.checkpoint();
                        Ok(json!({}))
                    }
                    "x-colo-lost-heartbeat" => {
                        if c.failover() {
                            Ok(json!({}))
                        } else {
                            Err("x-colo-lost-heartbeat: COLO is over already".into())
                        }
                    }
                    "colo-poweroff" => {
                        c.poweroff();
                        Ok(json!({}))
                    }
                    _ => Ok(json!({
                        "status": c.query(),
                        "live": c.live(),
                        "checkpoint-delay": c.triggers.delay().as_millis() as u64,
                    })),
                },
            }
        }
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

/// `migrate-set-parameters`, taking COLO's `checkpoint-delay` (ms) out
/// first: checked with the rest, applied to COLO's triggers at once.
fn set_with_colo(progress: &Progress, args: &Map<String, Value>) -> Result<(), String> {
    let Some(v) = args.get("checkpoint-delay") else {
        return set_parameters(progress, args);
    };
    let Some(colo) = progress.colo() else {
        return Err("parameter 'checkpoint-delay' is for COLO, which is not running here".into());
    };
    let ms = v
        .as_u64()
        .filter(|&n| n <= 3_600_000)
        .ok_or_else(|| format!("checkpoint-delay: {v} is not milliseconds from 0 to 3600000"))?;
    let mut rest = args.clone();
    rest.remove("checkpoint-delay");
    if !rest.is_empty() {
        set_parameters(progress, &rest)?;
    }
    colo.triggers.set_delay(Duration::from_millis(ms));
    Ok(())
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
    use crate::PassFigures;
    use std::io::{BufRead, BufReader};

    /// Runs `f` on its own thread; a hang past `secs` fails the test.
    fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .unwrap_or_else(|_| panic!("did not finish within {secs} s"))
    }

    /// Events streamed faster than one client reads them: that client is
    /// cut off, another that reads gets every event in order, and the
    /// server still stops at once.
    #[test]
    fn a_client_that_never_reads_is_cut_off_and_others_get_every_event() {
        within(120, || {
            const EVENTS: u64 = 5000;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("ctl.sock");
            let progress = Arc::new(Progress::default());
            let server = ControlServer::start(&path, progress.clone()).unwrap();
            let stuck = UnixStream::connect(&path).unwrap();
            let good = UnixStream::connect(&path).unwrap();
            good.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut lines = BufReader::new(good).lines();
            let mut next = move || -> Value {
                serde_json::from_str(&lines.next().expect("connection open").unwrap()).unwrap()
            };
            // Both are served once the later one has its greeting.
            assert!(next()["QMP"].is_object());
            let reader = std::thread::spawn(move || {
                (0..EVENTS)
                    .map(|_| next()["data"]["pass"].as_u64().unwrap())
                    .collect::<Vec<_>>()
            });
            // About 1 MiB of events over 2.5 s: more than the stuck
            // client's socket and queue hold, at a pace any reader keeps.
            for batch in 0..EVENTS / 100 {
                for i in 0..100 {
                    progress.publish(Event::Pass(PassFigures {
                        pass: batch * 100 + i,
                        ..Default::default()
                    }));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let passes = reader.join().unwrap();
            assert_eq!(
                passes,
                (0..EVENTS).collect::<Vec<_>>(),
                "every event, in order"
            );
            // The server closed the stuck client (EOF while it still runs)
            // before it had all the events.
            stuck
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut got = Vec::new();
            (&stuck)
                .read_to_end(&mut got)
                .expect("the server closes the stuck client");
            let events = got
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b"{\"event"))
                .count();
            assert!(events < EVENTS as usize, "{events} events reached it");
            let t = Instant::now();
            drop(server);
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
            assert!(!path.exists(), "the socket file is removed");
        });
    }

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
