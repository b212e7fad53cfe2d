//! `unix:PATH` listeners never delete what is not theirs: a user's file or
//! a directory at PATH is refused and left as it was, a live listener's
//! socket is not stolen, and only a stale socket file is replaced.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use ferry_transport::{listen_unix, Channel, ChannelUri, Listener, SocketTuning, TransportError};

const LONG: Option<Duration> = Some(Duration::from_secs(60));

fn uri(path: &Path) -> ChannelUri {
    format!("unix:{}", path.display()).parse().unwrap()
}

fn bind(path: &Path) -> Result<Listener, TransportError> {
    Listener::bind(&uri(path), SocketTuning::default())
}

/// Connects to `path`, sends `word`, and checks `l` accepts that
/// connection. The connection a refused bind's probe made may come first;
/// it carries nothing.
fn accepts(l: &Listener, path: &Path, word: &[u8]) {
    let mut c = UnixStream::connect(path).expect("the listener's socket answers");
    c.write_all(word).unwrap();
    drop(c);
    for _ in 0..2 {
        let ch = l.accept(LONG).expect("accepts");
        let mut got = vec![0u8; word.len()];
        if ch.read_exact(&mut got).is_ok() {
            assert_eq!(got, word);
            return;
        }
    }
    panic!("the client's connection never arrived");
}

#[test]
fn a_regular_file_at_the_path_survives_and_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("important.txt");
    std::fs::write(&path, b"do not delete me").unwrap();
    let e = bind(&path).err().expect("refused");
    assert!(
        matches!(
            &e,
            TransportError::UnixNotSocket {
                kind: "regular file",
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    for part in [
        path.display().to_string().as_str(),
        "not a unix socket",
        "left untouched",
    ] {
        assert!(text.contains(part), "{text} lacks {part}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"do not delete me");

    // A symbolic link (even to a socket) is not followed nor removed.
    let target = d.path().join("real.sock");
    let _real = bind(&target).unwrap();
    let link = d.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = bind(&link).err().expect("refused");
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
}

#[test]
fn a_live_listener_keeps_its_socket() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("live.sock");
    let first = bind(&path).unwrap();
    let e = bind(&path).err().expect("second bind refused");
    assert!(matches!(e, TransportError::UnixInUse { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&format!(
            "unix socket {} is in use by another listener",
            path.display()
        )),
        "{e}"
    );
    accepts(&first, &path, b"still mine");
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("stale.sock");
    // A listener that went away without removing its file.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "the stale file is there");
    let l = bind(&path).expect("a stale socket is replaced");
    accepts(&l, &path, b"fresh");
}

#[test]
fn a_directory_at_the_path_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("sockets");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    let e = bind(&path).err().expect("refused");
    assert!(matches!(e, TransportError::UnixIsDirectory { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains(&format!("{} is a directory", path.display())),
        "{e}"
    );
    assert!(path.join("keep").exists());
}

#[test]
fn dropping_a_listener_leaves_a_newer_listeners_socket() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("reused.sock");
    let old = bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let new = bind(&path).unwrap();
    drop(old);
    assert!(path.exists(), "the newer listener's socket stays");
    accepts(&new, &path, b"newer");
    drop(new);
    assert!(!path.exists(), "a listener removes its own socket");
}

#[test]
fn listen_unix_sets_the_mode_before_anyone_can_connect() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("private.sock");
    let l = listen_unix(&path, Some(0o600), 8).unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"x").unwrap();
    let (mut s, _) = l.accept().unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}
