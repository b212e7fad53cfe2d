//! Postcopy's preempt channels, accepted after setup: a session's own in
//! any order, sorted by index; one from another session refused, naming
//! both sessions, and told why.

use std::time::Duration;

use ferry_transport::{
    accept_preempt, accept_recovery, await_accept, connect_channel_secure, AcceptOptions,
    ChannelHello, Listener, Role, SessionId, SocketTuning, TransportError,
};

fn listener() -> Listener {
    Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default()).unwrap()
}

fn connect(
    l: &Listener,
    session: SessionId,
    index: u16,
) -> std::thread::JoinHandle<Result<(), TransportError>> {
    connect_as(l, session, Role::Preempt, index)
}

fn connect_as(
    l: &Listener,
    session: SessionId,
    role: Role,
    index: u16,
) -> std::thread::JoinHandle<Result<(), TransportError>> {
    let uri = l.uri().clone();
    std::thread::spawn(move || {
        let hello = ChannelHello {
            session,
            role,
            index,
            multifd_channels: 1,
        };
        let ch = connect_channel_secure(&uri, &SocketTuning::default(), &hello, None)?;
        await_accept(ch.as_ref(), Duration::from_secs(30))
    })
}

#[test]
fn a_sessions_preempt_channels_are_sorted_by_index() {
    let l = listener();
    let ours = SessionId::random();
    let late = connect(&l, ours, 1);
    std::thread::sleep(Duration::from_millis(20));
    let early = connect(&l, ours, 0);
    let got = accept_preempt(&l, ours, 2, &AcceptOptions::default()).unwrap();
    assert_eq!(got.len(), 2);
    assert!(
        got[0].label().starts_with("preempt[0]"),
        "{}",
        got[0].label()
    );
    assert!(
        got[1].label().starts_with("preempt[1]"),
        "{}",
        got[1].label()
    );
    early.join().unwrap().unwrap();
    late.join().unwrap().unwrap();
}

#[test]
fn a_preempt_channel_from_another_session_is_refused_naming_it() {
    let l = listener();
    let (ours, theirs) = (SessionId::random(), SessionId::random());
    let stranger = connect(&l, theirs, 0);
    let Err(e) = accept_preempt(&l, ours, 2, &AcceptOptions::default()) else {
        panic!("a stranger's preempt channel was accepted");
    };
    assert!(matches!(e, TransportError::ForeignSession { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&theirs.to_string()) && text.contains(&ours.to_string()),
        "{text}"
    );
    let told = stranger.join().unwrap().unwrap_err().to_string();
    assert!(told.contains("refused"), "{told}");
}

/// A postcopy recovery takes the session's main channel and its preempt
/// channels, in any order; a multifd channel, a second main channel or a
/// stranger's channel is refused, named, and told why.
#[test]
fn a_recovery_takes_main_and_preempt_of_its_session_only() {
    let l = listener();
    let ours = SessionId::random();
    let p1 = connect(&l, ours, 1);
    std::thread::sleep(Duration::from_millis(20));
    let main = connect_as(&l, ours, Role::Main, 0);
    std::thread::sleep(Duration::from_millis(20));
    let p0 = connect(&l, ours, 0);
    let got = accept_recovery(&l, ours, 2, None, &AcceptOptions::default()).unwrap();
    assert!(got.main.label().starts_with("main"), "{}", got.main.label());
    assert_eq!(got.preempt.len(), 2);
    assert!(
        got.preempt[1].label().starts_with("preempt[1]"),
        "{}",
        got.preempt[1].label()
    );
    for t in [p1, main, p0] {
        t.join().unwrap().unwrap();
    }
    for (role, index, says) in [
        (Role::Multifd, 0, "multifd[0] in a postcopy recovery"),
        (Role::Preempt, 2, "preempt[2]"),
    ] {
        let c = connect_as(&l, ours, role, index);
        let e = accept_recovery(&l, ours, 2, None, &AcceptOptions::default())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(says), "{e}");
        let told = c.join().unwrap().unwrap_err().to_string();
        assert!(told.contains("refused"), "{told}");
    }
    let theirs = SessionId::random();
    let c = connect_as(&l, theirs, Role::Main, 0);
    let Err(e) = accept_recovery(&l, ours, 2, None, &AcceptOptions::default()) else {
        panic!("a stranger's channel was accepted");
    };
    assert!(matches!(e, TransportError::ForeignSession { .. }), "{e}");
    assert!(c.join().unwrap().is_err());
    // A recovery that never comes ends at its timeout, saying what is missing.
    let e = accept_recovery(
        &l,
        ours,
        2,
        Some(Duration::from_millis(50)),
        &AcceptOptions::default(),
    )
    .err()
    .expect("timed out")
    .to_string();
    assert!(
        e.contains("recovery channels (main missing, 0 of 2 preempt)"),
        "{e}"
    );
}
