//! Channel URIs: `tcp:HOST:PORT` and `unix:PATH`, as QEMU writes them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::TransportError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelUri {
    /// `tcp:HOST:PORT`; HOST may be a name, an IPv4 address or `[v6]`.
    Tcp { host: String, port: u16 },
    /// `unix:PATH`, a stream socket in the file system.
    Unix(PathBuf),
}

impl FromStr for ChannelUri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::BadUri {
            uri: s.into(),
            why: why.into(),
        };
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("port must be a number from 0 to 65535"))?;
            Ok(Self::Tcp {
                host: host.into(),
                port,
            })
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Self::Unix(path.into()))
        } else {
            Err(bad("expected tcp:HOST:PORT or unix:PATH"))
        }
    }
}

impl fmt::Display for ChannelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:80",
            "tcp:host.example:0",
            "unix:/tmp/x.sock",
        ] {
            assert_eq!(s.parse::<ChannelUri>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_garbage_with_reason() {
        for s in [
            "tcp:1.2.3.4",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "http://x",
            "",
        ] {
            let e = s.parse::<ChannelUri>().unwrap_err().to_string();
            assert!(e.contains("bad URI"), "{s}: {e}");
        }
    }
}
