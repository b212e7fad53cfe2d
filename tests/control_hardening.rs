//! The control socket against misbehaving clients and a crowded path: a
//! client that stops reading holds up neither a live migration, nor other
//! clients, nor the server's drop; connections beyond the cap get an error
//! line; and only a stale socket at the path is ever replaced.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry::{ControlServer, DirtyPattern, Parameters, Progress, Status, TrackerKind};
use serde_json::{json, Value};

const LONG: Option<Duration> = Some(Duration::from_secs(60));

/// A client that reads every line, keeping events aside.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(LONG).unwrap();
        let mut c = Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
            events: Vec::new(),
        };
        let g = c.line().expect("a greeting");
        assert!(g["QMP"].is_object(), "greeting first: {g}");
        c
    }
    /// The next line, `None` at the end of the connection.
    fn line(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.reader.read_line(&mut l).expect("a line within 60 s") {
            0 => None,
            _ => Some(serde_json::from_str(&l).unwrap()),
        }
    }
    fn query(&mut self) -> Value {
        self.stream
            .write_all(b"{\"execute\":\"query-migrate\"}\n")
            .unwrap();
        loop {
            let v = self.line().expect("open");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v["return"].clone();
            }
        }
    }
    fn await_status_event(&mut self, status: &str) {
        while !self
            .events
            .iter()
            .any(|e| e["event"] == "MIGRATION" && e["data"]["status"] == status)
        {
            let v = self.line().expect("open");
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// Drops the server and checks it returns in good time (generous: the
/// server itself allows half a second) and removes its socket file.
fn drop_promptly(server: ControlServer, path: &Path) {
    let t = Instant::now();
    drop(server);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "drop took {:?}",
        t.elapsed()
    );
    assert!(!path.exists(), "the socket file is removed");
}

#[test]
fn a_client_that_stops_reading_holds_up_neither_the_migration_nor_the_exit() {
    within(180, || {
        const REQUESTS: usize = 4000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let guest = Arc::new(synthetic(
            16,
            2 * MIB,
            DirtyPattern::Hotset(10),
            TrackerKind::Bitmap,
        ));
        let progress = progress_with(Parameters {
            max_bandwidth: 8 * MIB,
            ..Default::default()
        });
        let server = ControlServer::start(&path, progress.clone()).unwrap();

        // Asks for ~3 MB of replies and reads none of them.
        let stuck = UnixStream::connect(&path).unwrap();
        stuck
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let flood = b"{\"execute\":\"query-migrate\"}\n".repeat(REQUESTS);
        let mut good = Client::connect(&path);

        let (l, uri) = listener();
        let dst = spawn_destination(l, verifying());
        let src = spawn_source(guest, uri, progress.clone());
        // Once cut off the stuck client's writes fail; that is expected.
        let _ = (&stuck).write_all(&flood);
        wait_until(|| progress.status() == Status::Active);
        assert!(
            good.query()["status"].is_string(),
            "others are still served"
        );

        let sent = src.join().unwrap().expect("the migration completes");
        let got = dst.join().unwrap().expect("the destination completes");
        assert_eq!(sent.switchover_digest, got.summary.switchover_digest);
        assert_eq!(good.query()["status"], "completed");
        good.await_status_event("completed");

        // The server closed the stuck client on its own (EOF, or a reset
        // as it left requests unread, while the server still runs), before
        // it had every reply.
        stuck.set_read_timeout(LONG).unwrap();
        let mut replies = Vec::new();
        if let Err(e) = (&stuck).read_to_end(&mut replies) {
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "the server closes the stuck client: {e}"
            );
        }
        let n = replies
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"{\"return\""))
            .count();
        assert!(n < REQUESTS, "it got all {n} replies");

        drop_promptly(server, &path);
        // The well-behaved client sees the end of the connection.
        while good.line().is_some() {}
    });
}

#[test]
fn a_client_that_stops_reading_does_not_hold_up_the_drop() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, Arc::new(Progress::default())).unwrap();
        let mut good = Client::connect(&path);
        let reply_len = good.query().to_string().len() + 12;
        // Replies enough to fill the stuck client's socket (its send
        // buffer, wmem_default) and about 96 KiB more, well under what
        // the server queues before dropping a client: when the server is
        // dropped it is most likely still trying to write to it.
        let wmem: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(212_992);
        let requests = (wmem + (96 << 10)) / reply_len;
        let stuck = UnixStream::connect(&path).unwrap();
        stuck
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (&stuck)
            .write_all(&b"{\"execute\":\"query-migrate\"}\n".repeat(requests))
            .expect("the server reads every request");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(good.query()["status"], "none", "others are still served");
        drop_promptly(server, &path);
    });
}

#[test]
fn connections_beyond_the_cap_get_an_error_line_and_are_closed() {
    within(120, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let server = ControlServer::start(&path, Arc::new(Progress::default())).unwrap();
        let mut served: Vec<Client> = (0..ferry::control::MAX_CLIENTS)
            .map(|_| Client::connect(&path))
            .collect();
        assert_eq!(served.len(), 16);
        for _ in 0..4 {
            let s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(LONG).unwrap();
            let mut r = BufReader::new(s);
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            assert_eq!(v["error"]["class"], "GenericError", "{v}");
            assert!(
                v["error"]["desc"]
                    .as_str()
                    .unwrap()
                    .starts_with("too many control clients (16)"),
                "{v}"
            );
            l.clear();
            assert_eq!(r.read_line(&mut l).unwrap(), 0, "then closed: {l}");
        }
        // The 16 are still served.
        for c in &mut served {
            assert_eq!(c.query()["status"], "none");
        }
        // A slot frees once a client leaves.
        drop(served.pop());
        let mut next = loop {
            let s = UnixStream::connect(&path).unwrap();
            s.set_read_timeout(LONG).unwrap();
            let mut l = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut l)
                .unwrap();
            let v: Value = serde_json::from_str(&l).unwrap();
            if v["QMP"].is_object() {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        next.write_all(json!({"execute":"query-migrate"}).to_string().as_bytes())
            .unwrap();
        next.write_all(b"\n").unwrap();
        let mut l = String::new();
        BufReader::new(next).read_line(&mut l).unwrap();
        assert!(l.contains("\"status\":\"none\""), "{l}");
        drop_promptly(server, &path);
    });
}

#[test]
fn a_regular_file_at_the_path_survives_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("important.txt");
    std::fs::write(&path, b"precious").unwrap();
    let e = ControlServer::start(&path, Arc::new(Progress::default()))
        .err()
        .expect("refused")
        .to_string();
    for part in [
        path.display().to_string().as_str(),
        "regular file, not a unix socket",
        "left untouched",
    ] {
        assert!(e.contains(part), "{e} lacks {part}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn a_live_control_socket_is_not_taken_over() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let first = ControlServer::start(&path, Arc::new(Progress::default())).unwrap();
        let e = ControlServer::start(&path, Arc::new(Progress::default()))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains(&format!(
                "another ferry is using the control socket {}",
                path.display()
            )),
            "{e}"
        );
        let mut c = Client::connect(&path);
        assert_eq!(
            c.query()["status"],
            "none",
            "the first server still answers"
        );
        drop_promptly(first, &path);
    });
}

#[test]
fn a_directory_at_the_path_is_named_and_a_stale_socket_replaced() {
    within(60, || {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sockets");
        std::fs::create_dir(&sub).unwrap();
        let e = ControlServer::start(&sub, Arc::new(Progress::default()))
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains(&format!("{} is a directory", sub.display())),
            "{e}"
        );
        assert!(sub.is_dir());

        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists(), "a stale socket file is there");
        let server = ControlServer::start(&path, Arc::new(Progress::default()))
            .expect("a stale socket is replaced");
        let mut c = Client::connect(&path);
        assert_eq!(c.query()["status"], "none");
        drop_promptly(server, &path);
    });
}
