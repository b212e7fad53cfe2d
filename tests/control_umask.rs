//! The control socket is created with mode 0600 even under umask 0, and a
//! crowd of connections costs no threads. Alone in its own test binary:
//! the umask is process-wide, so no other test may create files while it
//! is 0, and the thread count is only meaningful with nothing else running.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use ferry::{ControlServer, Progress};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn socket_is_private_under_umask_0_and_connections_cost_no_threads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let plain = dir.path().join("plain.sock");

    // SAFETY (of the libc call): umask only swaps the process's file mode
    // mask; no other test runs in this binary to be affected by it.
    let old = unsafe { libc::umask(0) };
    let server = ControlServer::start(&path, Arc::new(Progress::default()));
    // Under the same umask a plain bind gives a world-accessible socket:
    // the umask really was 0.
    let plain_listener = UnixListener::bind(&plain);
    // SAFETY: as above, restoring the mask found.
    unsafe { libc::umask(old) };
    let server = server.unwrap();
    let _plain_listener = plain_listener.unwrap();
    let mode = |p| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&plain), 0o777, "umask 0 in effect");
    assert_eq!(mode(&path), 0o600, "the control socket is private");

    // 200 connections, 184 of them beyond the cap: no thread per connection.
    let before = threads();
    let conns: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = threads();
    assert!(
        during <= before + 1,
        "{before} threads before, {during} with 200 clients"
    );
    drop(conns);
    drop(server);
    assert!(!path.exists());
}
