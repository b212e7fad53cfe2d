//! The listening side of a session: accept connections, read each one's
//! hello, and sort them into main + multifd[0..K] of ONE session, whatever
//! order they arrive in.
//!
//! The main channel names the session. Channels that arrive before it wait.
//! A connection that is not a ferry channel, speaks another version, or
//! belongs to another session ends the accept with an error naming it (and
//! a channel of another session is told why it was refused).

use std::time::{Duration, Instant};

use crate::handshake::{read_hello, send_reply};
use crate::{Channel, ChannelHello, Listener, Role, SessionId, TransportError};

#[derive(Clone, Debug)]
pub struct AcceptOptions {
    /// How long a new connection may take to send its hello.
    pub hello_timeout: Duration,
    /// How long to wait for the first connection; `None` waits for ever.
    pub first_timeout: Option<Duration>,
    /// Once the first channel is in, how long the rest may take.
    pub rest_timeout: Duration,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            first_timeout: None,
            rest_timeout: Duration::from_secs(30),
        }
    }
}

/// All channels of one accepted session, each labelled with its role.
pub struct IncomingSession {
    pub session: SessionId,
    pub main: Box<dyn Channel>,
    pub multifd: Vec<Box<dyn Channel>>,
}

pub fn accept_session(
    listener: &Listener,
    opts: &AcceptOptions,
) -> Result<IncomingSession, TransportError> {
    let mut main: Option<(ChannelHello, Box<dyn Channel>)> = None;
    let mut multifd: Vec<(ChannelHello, Box<dyn Channel>)> = Vec::new();
    let mut deadline: Option<Instant> = None;
    loop {
        if let Some((hello, _)) = &main {
            if multifd.len() == usize::from(hello.multifd_channels) {
                break;
            }
        }
        let timeout = match deadline {
            None => opts.first_timeout,
            Some(d) => Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
        };
        let mut ch = listener
            .accept_channel(timeout)
            .map_err(|e| match (e, &main) {
                (TransportError::Timeout { secs, .. }, Some((h, _))) if deadline.is_some() => {
                    TransportError::Timeout {
                        what: format!(
                            "the rest of session {}'s channels ({} of {} multifd channels arrived)",
                            h.session,
                            multifd.len(),
                            h.multifd_channels
                        ),
                        secs,
                    }
                }
                (e, _) => e,
            })?;
        deadline.get_or_insert_with(|| Instant::now() + opts.rest_timeout);
        let hello = read_hello(ch.as_ref(), opts.hello_timeout)?;
        let peer = ch
            .label()
            .trim_start_matches("connection from ")
            .to_string();
        ch.set_label(format!("{} ({peer})", hello.name()));
        match hello.role {
            Role::Main if main.is_some() => {
                return Err(refuse(ch.as_ref(), "a second main channel"))
            }
            Role::Main => main = Some((hello, ch)),
            Role::Multifd => {
                if multifd
                    .iter()
                    .any(|(h, _)| h.index == hello.index && h.session == hello.session)
                {
                    return Err(refuse(ch.as_ref(), "a second channel with this index"));
                }
                multifd.push((hello, ch));
            }
            Role::Preempt => {
                return Err(refuse(
                    ch.as_ref(),
                    "a preempt channel, but postcopy is not supported yet",
                ))
            }
        }
        if let Some((mh, _)) = &main {
            check_members(mh, &multifd)?;
        }
    }
    let (mh, main) = main.expect("loop ends only with a main channel");
    multifd.sort_by_key(|(h, _)| h.index);
    for (_, ch) in &multifd {
        send_reply(ch.as_ref(), None)?;
    }
    send_reply(main.as_ref(), None)?;
    Ok(IncomingSession {
        session: mh.session,
        main,
        multifd: multifd.into_iter().map(|(_, c)| c).collect(),
    })
}

/// Accepts a session's `count` preempt channels (postcopy: index 0 for
/// urgent pages, the others for the background push), which its source
/// opens once setup is done, in any order. A connection that is not a
/// preempt channel of `session` ends the accept with an error naming it
/// (and a channel of another session is told why it was refused). Sorted
/// by index.
pub fn accept_preempt(
    listener: &Listener,
    session: SessionId,
    count: u16,
    opts: &AcceptOptions,
) -> Result<Vec<Box<dyn Channel>>, TransportError> {
    let deadline = Instant::now() + opts.rest_timeout;
    let mut got: Vec<(u16, Box<dyn Channel>)> = Vec::new();
    while got.len() < usize::from(count) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut ch = listener.accept_channel(Some(left)).map_err(|e| match e {
            TransportError::Timeout { secs, .. } => TransportError::Timeout {
                what: format!(
                    "session {session}'s preempt channels ({} of {count} arrived)",
                    got.len()
                ),
                secs,
            },
            e => e,
        })?;
        let hello = read_hello(ch.as_ref(), opts.hello_timeout)?;
        let peer = ch
            .label()
            .trim_start_matches("connection from ")
            .to_string();
        ch.set_label(format!("{}[{}] ({peer})", hello.name(), hello.index));
        if hello.session != session {
            let e = TransportError::ForeignSession {
                channel: ch.label().into(),
                found: hello.session.to_string(),
                expected: session.to_string(),
            };
            let _ = send_reply(ch.as_ref(), Some(&e.to_string()));
            return Err(e);
        }
        if hello.role != Role::Preempt {
            return Err(refuse(ch.as_ref(), "not a preempt channel, after setup"));
        }
        if hello.index >= count || got.iter().any(|(i, _)| *i == hello.index) {
            return Err(refuse(
                ch.as_ref(),
                &format!("preempt index {} of {count}, or a second one", hello.index),
            ));
        }
        got.push((hello.index, ch));
    }
    got.sort_by_key(|(i, _)| *i);
    for (_, ch) in &got {
        send_reply(ch.as_ref(), None)?;
    }
    Ok(got.into_iter().map(|(_, c)| c).collect())
}

/// A postcopy recovery's channels: main, and preempt sorted by index.
pub struct RecoveryChannels {
    pub main: Box<dyn Channel>,
    pub preempt: Vec<Box<dyn Channel>>,
}

/// Accepts a postcopy recovery of `session` (after a link failure): its
/// main channel and its `preempt` preempt channels, in any order, each
/// with the session's id. A connection of another session, a multifd
/// channel, or a second channel with the same role and index is refused
/// (told why) and ends the accept with an error naming it. Returns main
/// and the preempt channels sorted by index; nothing is replied until all
/// are in.
pub fn accept_recovery(
    listener: &Listener,
    session: SessionId,
    preempt: u16,
    first_timeout: Option<Duration>,
    opts: &AcceptOptions,
) -> Result<RecoveryChannels, TransportError> {
    let mut main: Option<Box<dyn Channel>> = None;
    let mut got: Vec<(u16, Box<dyn Channel>)> = Vec::new();
    let mut deadline: Option<Instant> = None;
    while main.is_none() || got.len() < usize::from(preempt) {
        let timeout = match deadline {
            None => first_timeout,
            Some(d) => Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ),
        };
        let mut ch = listener.accept_channel(timeout).map_err(|e| match e {
            TransportError::Timeout { secs, .. } => TransportError::Timeout {
                what: format!(
                    "session {session}'s recovery channels (main {}, {} of {preempt} preempt)",
                    if main.is_some() { "in" } else { "missing" },
                    got.len()
                ),
                secs,
            },
            e => e,
        })?;
        deadline.get_or_insert_with(|| Instant::now() + opts.rest_timeout);
        let hello = read_hello(ch.as_ref(), opts.hello_timeout)?;
        let peer = ch
            .label()
            .trim_start_matches("connection from ")
            .to_string();
        ch.set_label(format!(
            "{}[{}] ({peer}, recovery)",
            hello.name(),
            hello.index
        ));
        if hello.session != session {
            let e = TransportError::ForeignSession {
                channel: ch.label().into(),
                found: hello.session.to_string(),
                expected: session.to_string(),
            };
            let _ = send_reply(ch.as_ref(), Some(&e.to_string()));
            return Err(e);
        }
        match hello.role {
            Role::Main if main.is_none() && hello.index == 0 => main = Some(ch),
            Role::Preempt
                if hello.index < preempt && !got.iter().any(|(i, _)| *i == hello.index) =>
            {
                got.push((hello.index, ch))
            }
            _ => {
                return Err(refuse(
                    ch.as_ref(),
                    &format!(
                        "{} in a postcopy recovery (it takes one main channel and {preempt} \
                         preempt channels, each once)",
                        hello.name()
                    ),
                ))
            }
        }
    }
    got.sort_by_key(|(i, _)| *i);
    for (_, ch) in &got {
        send_reply(ch.as_ref(), None)?;
    }
    let main = main.expect("the loop ends with a main channel");
    send_reply(main.as_ref(), None)?;
    Ok(RecoveryChannels {
        main,
        preempt: got.into_iter().map(|(_, c)| c).collect(),
    })
}

/// Every multifd channel so far must belong to main's session and fit its count.
fn check_members(
    main: &ChannelHello,
    multifd: &[(ChannelHello, Box<dyn Channel>)],
) -> Result<(), TransportError> {
    for (h, ch) in multifd {
        if h.session != main.session {
            let e = TransportError::ForeignSession {
                channel: ch.label().into(),
                found: h.session.to_string(),
                expected: main.session.to_string(),
            };
            let _ = send_reply(ch.as_ref(), Some(&e.to_string()));
            return Err(e);
        }
        if h.index >= main.multifd_channels || h.multifd_channels != main.multifd_channels {
            return Err(refuse(
                ch.as_ref(),
                &format!(
                    "index {} of {} channels, but main announced {}",
                    h.index, h.multifd_channels, main.multifd_channels
                ),
            ));
        }
    }
    Ok(())
}

fn refuse(ch: &dyn Channel, why: &str) -> TransportError {
    let reason = format!("refused {}: {why}", ch.label());
    let _ = send_reply(ch, Some(&reason));
    TransportError::BadHello {
        channel: ch.label().into(),
        why: why.into(),
    }
}
