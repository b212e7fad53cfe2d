//! The control socket over a real unix socket while a live migration runs:
//! every command, events, and malformed requests that leave it up.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use common::*;
use ferry::{
    ControlServer, DirtyPattern, Guest, IncomingOptions, Parameters, Resources, Status,
    SyntheticConfig, TrackerKind,
};
use serde_json::{json, Value};

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Client {
    fn connect(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        let mut c = Self {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
            events: Vec::new(),
        };
        assert!(c.line()["QMP"].is_object(), "greeting first");
        c
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        assert!(self.reader.read_line(&mut l).unwrap() > 0, "socket closed");
        serde_json::from_str(&l).unwrap()
    }
    /// Sends a raw line and returns the reply, keeping events aside.
    fn raw(&mut self, text: &str) -> Value {
        self.stream
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }
    fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.raw(&json!({ "execute": cmd, "arguments": args }).to_string())
    }
    fn query(&mut self) -> Value {
        self.execute("query-migrate", json!({}))["return"].clone()
    }
    /// Reads events until one MIGRATION event with `status` has arrived
    /// (it may follow the replies that already show the new status; the
    /// test's deadline bounds the wait).
    fn await_status_event(&mut self, status: &str) {
        let seen = |events: &[Value]| {
            events
                .iter()
                .any(|e| e["event"] == "MIGRATION" && e["data"]["status"] == status)
        };
        while !seen(&self.events) {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

#[test]
fn every_command_over_the_socket_during_a_live_migration() {
    within(120, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let guest = Arc::new(synthetic(
            16,
            2 * MIB,
            DirtyPattern::Hotset(10),
            TrackerKind::Bitmap,
        ));
        let progress = progress_with(Parameters {
            max_bandwidth: 2 * MIB,
            pause_before_switchover: true,
            ..Default::default()
        });
        let _server = ControlServer::start(&path, progress.clone()).unwrap();
        let mut c = Client::connect(&path);

        // Malformed requests: clear errors, and the socket stays up.
        let r = c.raw("{not json");
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("malformed"),
            "{r}"
        );
        let r = c.raw("{\"arguments\":{}}");
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("execute"),
            "{r}"
        );
        let r = c.raw("{\"execute\":\"migrate-frobnicate\",\"id\":\"a\"}");
        assert_eq!(
            (r["error"]["class"].as_str(), &r["id"]),
            (Some("CommandNotFound"), &json!("a"))
        );
        let r = c.execute(
            "migrate-set-parameters",
            json!({ "downtime-limit": "soon" }),
        );
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap()
                .contains("downtime-limit"),
            "{r}"
        );
        assert_eq!(
            c.query()["status"],
            "none",
            "still answering after bad requests"
        );

        let (l, uri) = listener();
        let dst = spawn_destination(l, verifying());
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::Active && progress.totals().ram_bytes > 0);
        let q = c.query();
        assert_eq!(q["status"], "active");
        for key in [
            "transferred",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "mbps",
            "pages-per-second",
            "dirty-sync-count",
            "multifd-bytes",
            "precopy-bytes",
            "downtime-bytes",
            "remaining",
            "dirty-pages-rate",
            "page-size",
        ] {
            assert!(
                q["ram"].get(key).is_some(),
                "query-migrate lacks ram.{key}: {q}"
            );
        }
        assert!(
            q["setup-time"].is_u64() && q["total-time"].is_u64() && q["expected-downtime"].is_u64(),
            "{q}"
        );
        assert_eq!(q["ram"]["total"], 16 * MIB);

        // Lift the rate limit; pass 1 then finishes quickly.
        let r = c.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 0, "downtime-limit": 2000 }),
        );
        assert_eq!(r, json!({ "return": {} }));
        let p = c.execute("query-migrate-parameters", json!({}))["return"].clone();
        assert_eq!(
            (p["max-bandwidth"].as_u64(), p["downtime-limit"].as_u64()),
            (Some(0), Some(2000))
        );
        let r = c.execute("migrate-continue", json!({ "state": "pre-switchover" }));
        assert!(
            r["error"]["desc"].as_str().unwrap().contains("active"),
            "not there yet: {r}"
        );

        wait_until(|| progress.status() == Status::PreSwitchover);
        assert_eq!(c.query()["status"], "pre-switchover");
        assert_eq!(
            c.execute("migrate-continue", json!({ "state": "pre-switchover" })),
            json!({ "return": {} })
        );
        let sent = src.join().unwrap().expect("completes");
        let got = dst.join().unwrap().expect("destination completes");
        assert_eq!(sent.switchover_digest, got.summary.switchover_digest);
        let q = c.query();
        assert_eq!(q["status"], "completed");
        assert!(
            q["downtime"].is_u64() && q.get("expected-downtime").is_none(),
            "{q}"
        );
        assert!(q["ram"].get("remaining").is_none());
        // A cancel after the end changes nothing.
        assert_eq!(
            c.execute("migrate-cancel", json!({})),
            json!({ "return": {} })
        );
        assert_eq!(c.query()["status"], "completed");

        // Events arrived on the connection in order.
        c.await_status_event("completed");
        let statuses: Vec<String> = c
            .events
            .iter()
            .filter(|e| e["event"] == "MIGRATION")
            .map(|e| e["data"]["status"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            statuses,
            ["setup", "active", "pre-switchover", "device", "completed"]
        );
        assert!(c.events.iter().any(|e| e["event"] == "MIGRATION_PASS"));
    });
}

#[test]
fn migrate_cancel_over_the_socket() {
    within(120, || {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let config = SyntheticConfig {
            vcpus: 1,
            ..workload(MIB, DirtyPattern::Sequential, TrackerKind::Uffd)
        };
        let guest = Arc::new(synthetic_guest(16, 2, &config, Resources::none(true)));
        let progress = progress_with(Parameters {
            max_bandwidth: MIB,
            ..Default::default()
        });
        let _server = ControlServer::start(&path, progress.clone()).unwrap();
        let mut c = Client::connect(&path);
        let (l, uri) = listener();
        let dst = spawn_destination(l, IncomingOptions::default());
        let src = spawn_source(guest.clone(), uri, progress.clone());
        wait_until(|| progress.status() == Status::Active);
        assert_eq!(
            c.execute("migrate-cancel", json!({})),
            json!({ "return": {} })
        );
        let failed = src.join().unwrap().unwrap_err();
        assert_eq!(failed.summary.status, "cancelled");
        assert!(dst.join().unwrap().is_err());
        let q = c.query();
        assert_eq!(q["status"], "cancelled");
        assert!(q["error-desc"].as_str().unwrap().contains("cancelled"));
        assert!(guest.is_running());
    });
}
