//! Postcopy's preempt channels, accepted after setup: a session's own in
//! any order, sorted by index; one from another session refused, naming
//! both sessions, and told why.

use std::time::Duration;

use ferry_transport::{
    accept_preempt, await_accept, connect_channel_secure, AcceptOptions, ChannelHello, Listener,
    Role, SessionId, SocketTuning, TransportError,
};

fn listener() -> Listener {
    Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default()).unwrap()
}

fn connect(
    l: &Listener,
    session: SessionId,
    index: u16,
) -> std::thread::JoinHandle<Result<(), TransportError>> {
    let uri = l.uri().clone();
    std::thread::spawn(move || {
        let hello = ChannelHello {
            session,
            role: Role::Preempt,
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
