//! Channel URIs, as QEMU writes them: `tcp:HOST:PORT`, `unix:PATH`,
//! `exec:COMMAND`, `fd:N` and `file:PATH`.
//!
//! `file:PATH` names a saved-guest file (the mapped-ram layout, see
//! `ferry_ram::mapped`): the file commands (save, restore, inspect) take it;
//! the socket functions refuse it.
//!
//! With K multifd channels a session has K+1 streams (main first). `exec:`
//! runs COMMAND once per stream (`sh -c`), its stdin and stdout joined to
//! one end of a socketpair whose other end is the channel: the command
//! carries the bytes to a listening `ferry recv` (`exec:socat -
//! TCP:host:4444`, `exec:ssh host socat - UNIX-CONNECT:/run/ferry.sock`).
//! `fd:N,M,...` names descriptors this process inherited: on the sending
//! side one connected stream socket per stream, in order (main, then
//! multifd 0..K); on the receiving side one listening socket.

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
    /// `exec:COMMAND`, run through `sh -c` once per stream (sending side).
    Exec(String),
    /// `fd:N[,M...]`: inherited socket descriptors.
    Fd(Vec<i32>),
    /// `file:PATH`, a saved-guest file (file mode, not a socket).
    File(PathBuf),
}

impl FromStr for ChannelUri {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = |why: &str| TransportError::BadUri {
            uri: s.into(),
            why: why.into(),
        };
        if let Some(rest) = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("unix://"))
        {
            let kind = if s.starts_with("tcp") { "tcp" } else { "unix" };
            return Err(bad(&format!(
                "write {kind}:{rest} (QEMU's form, without '//')"
            )));
        }
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
        } else if let Some(cmd) = s.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(bad("empty command"));
            }
            Ok(Self::Exec(cmd.into()))
        } else if let Some(list) = s.strip_prefix("fd:") {
            let fds = list
                .split(',')
                .map(|n| n.trim().parse::<i32>().ok().filter(|&n| n >= 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("expected fd:N or fd:N,M,... with descriptor numbers"))?;
            Ok(Self::Fd(fds))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(Self::File(path.into()))
        } else {
            Err(bad(
                "expected tcp:HOST:PORT, unix:PATH, exec:COMMAND, fd:N[,M...] or file:PATH",
            ))
        }
    }
}

impl fmt::Display for ChannelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Exec(cmd) => write!(f, "exec:{cmd}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Fd(fds) => {
                let list: Vec<String> = fds.iter().map(ToString::to_string).collect();
                write!(f, "fd:{}", list.join(","))
            }
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
            "exec:ssh host socat - TCP:localhost:4444",
            "fd:3",
            "fd:3,4,5",
            "file:/tmp/guest.ferry",
            "file:relative/dir/g.img",
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
            "exec: ",
            "fd:",
            "fd:3,x",
            "fd:-1",
            "file:",
        ] {
            let e = s.parse::<ChannelUri>().unwrap_err().to_string();
            assert!(e.contains("bad URI"), "{s}: {e}");
        }
    }

    #[test]
    fn file_uri_names_its_path() {
        let u: ChannelUri = "file:/dev/shm/a:b.img".parse().unwrap();
        assert_eq!(u, ChannelUri::File("/dev/shm/a:b.img".into()));
        assert_eq!(u.to_string(), "file:/dev/shm/a:b.img");
        assert_eq!(
            ChannelUri::File("x".into())
                .to_string()
                .parse::<ChannelUri>()
                .unwrap(),
            ChannelUri::File("x".into())
        );
    }

    #[test]
    fn a_url_style_uri_says_how_to_write_it() {
        let e = "tcp://0.0.0.0:4444"
            .parse::<ChannelUri>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("write tcp:0.0.0.0:4444"), "{e}");
    }
}
