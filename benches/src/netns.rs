//! A real, slower link for tests and benchmarks: two network namespaces
//! joined by a veth pair whose both ends are shaped with `tc qdisc tbf`.
//!
//! [`NetLink::up`] builds `ferry<pid>s` (source, 10.77.0.1/24) and
//! `ferry<pid>d` (destination, 10.77.0.2/24); [`NetLink::command`] runs a
//! program inside one of them; dropping the link deletes both namespaces
//! (and with them the veth pair). It needs root and `ip`/`tc` (iproute2);
//! [`NetLink::up`] says which is missing, so callers can skip cleanly.

use std::process::Command;

use crate::BenchError;

/// Which end of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

pub struct NetLink {
    source: String,
    destination: String,
}

/// The destination's address inside its namespace.
pub const DESTINATION_ADDR: &str = "10.77.0.2";

fn run(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| BenchError::Setup(format!("cannot run {}: {e}", args[0])))?;
    if !out.status.success() {
        return Err(BenchError::Setup(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl NetLink {
    /// Builds the two namespaces and the shaped veth pair, `rate` being a
    /// tc rate such as `1gbit`.
    pub fn up(rate: &str) -> Result<Self, BenchError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(BenchError::Setup(
                "network namespaces need root (run as root, or skip this)".into(),
            ));
        }
        let pid = std::process::id();
        let link = Self {
            source: format!("ferry{pid}s"),
            destination: format!("ferry{pid}d"),
        };
        let (s, d) = (link.source.as_str(), link.destination.as_str());
        let (vs, vd) = (format!("fv{pid}s"), format!("fv{pid}d"));
        run(&["ip", "netns", "add", s])?;
        // From here on, Drop cleans up whatever exists.
        run(&["ip", "netns", "add", d])?;
        run(&[
            "ip", "link", "add", &vs, "netns", s, "type", "veth", "peer", "name", &vd, "netns", d,
        ])?;
        for (ns, dev, addr) in [(s, &vs, "10.77.0.1/24"), (d, &vd, "10.77.0.2/24")] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                rate, "burst", "256kb", "latency", "50ms",
            ])?;
        }
        Ok(link)
    }

    /// `program` to be run inside one end's namespace.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(side), program]);
        c
    }

    pub fn namespace(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.source,
            Side::Destination => &self.destination,
        }
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        for ns in [&self.source, &self.destination] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
