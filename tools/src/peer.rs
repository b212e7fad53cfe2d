//! `--peer-timeout`, shared by `send` and `recv`: how long a silent peer
//! or a stalled channel is tolerated before the migration fails.

use std::time::Duration;

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct PeerArgs {
    /// Fail the migration when the other side sends nothing for this long
    /// (each side sends a heartbeat on the main channel when it has nothing
    /// else to say), or when a channel that owes data makes no progress for
    /// this long. Also the sockets' TCP_USER_TIMEOUT. Seconds, or with a
    /// unit: 500ms, 5s, 2m.
    #[arg(long, default_value = "5s", value_parser = parse_peer_timeout)]
    pub peer_timeout: Duration,
}

fn parse_peer_timeout(s: &str) -> Result<Duration, String> {
    let d = crate::units::parse_duration(s, crate::units::BareUnit::Seconds)?;
    if d < Duration::from_millis(100) {
        return Err(format!(
            "'{s}': the peer timeout must be at least 100ms (heartbeats go out four times per timeout)"
        ));
    }
    Ok(d)
}
