//! TLS and zstd end to end over real loopback sockets: migrations arrive
//! byte-identical with TLS, with compression and with both; and every bad
//! credential or tampered byte ends both sides with an error saying which
//! check failed, within the test's deadline (nothing hangs).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;

use common::*;
use ferry::{
    migrate_out, ChannelUri, IncomingOptions, Listener, OutgoingOptions, Progress, SendPath,
    SocketTuning, TlsClient, TlsServer,
};
use ferry_ram::pattern::Pattern;
use ferry_transport::certs::{generate, CertRequest};

fn certs(dir: &Path, hosts: &[&str], expired: bool) {
    generate(
        dir,
        &CertRequest {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            days: 30,
            expired,
        },
    )
    .unwrap();
}

/// A fresh CA + pairs for localhost and 127.0.0.1.
fn cert_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    certs(d.path(), &["localhost", "127.0.0.1"], false);
    d
}

fn tls_listener(server_dir: &Path) -> (Listener, ChannelUri) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap(), SocketTuning::default())
        .unwrap()
        .with_tls(Arc::new(TlsServer::load(server_dir).unwrap()));
    let uri = l.uri().clone();
    (l, uri)
}

fn client(dir: &Path, hostname: Option<&str>) -> Arc<TlsClient> {
    Arc::new(TlsClient::load(dir, hostname.map(String::from)).unwrap())
}

/// Migrates 32 MiB of `mixed` with the given TLS and compression settings
/// and checks the destination holds the source's bytes.
fn round_trip(channels: u16, tls: bool, compress: Option<i32>) {
    within(60, move || {
        let dir = cert_dir();
        let mem = memory(&[("ram", 24), ("rom", 8)], Pattern::Mixed, 5);
        let (l, uri) = if tls {
            tls_listener(dir.path())
        } else {
            listener()
        };
        let dst = spawn_destination(l, IncomingOptions::default());
        let mut opts = OutgoingOptions {
            channels,
            tls: tls.then(|| client(dir.path(), None)),
            ..Default::default()
        };
        opts.sender.compress = compress;
        let sent = migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default())
            .expect("source completes");
        let got = dst.join().unwrap().expect("destination completes");
        assert_eq!(got.memory.digest(), mem.digest(), "byte-identical");
        assert_eq!(got.device_state, b"device state of the test guest");
        assert_eq!(sent.tls, tls);
        assert_eq!(got.summary.tls, tls);
        if compress.is_some_and(|l| l >= 1) {
            // The low-entropy quarter of `mixed` shrinks; random pages go raw
            // (zstd's negative levels leave literals uncompressed, so
            // `mixed` does not shrink there).
            assert!(sent.compressed_packets > 0, "{sent:?}");
            assert!(sent.compression_ratio > 1.0, "{sent:?}");
            assert_eq!(got.summary.compressed_packets, sent.compressed_packets);
            assert_eq!(got.summary.compression.as_deref(), Some("zstd"));
        }
        if tls || compress.is_some() {
            assert_eq!(sent.send_path, SendPath::Copy.name());
        }
    });
}

#[test]
fn tls_one_channel() {
    round_trip(1, true, None);
}

#[test]
fn tls_two_channels() {
    round_trip(2, true, None);
}

#[test]
fn tls_four_channels() {
    round_trip(4, true, None);
}

#[test]
fn zstd_one_channel() {
    round_trip(1, false, Some(1));
}

#[test]
fn zstd_two_channels_fast_level() {
    round_trip(2, false, Some(-1));
}

#[test]
fn zstd_four_channels_level_3() {
    round_trip(4, false, Some(3));
}

#[test]
fn tls_and_zstd_two_channels() {
    round_trip(2, true, Some(1));
}

#[test]
fn tls_and_zstd_four_channels() {
    round_trip(4, true, Some(1));
}

/// Runs a migration expected to fail: returns (source error, destination error).
fn failing(listener: Listener, uri: ChannelUri, tls: Option<Arc<TlsClient>>) -> (String, String) {
    failing_with(listener, uri, tls, 2)
}

fn failing_with(
    listener: Listener,
    uri: ChannelUri,
    tls: Option<Arc<TlsClient>>,
    channels: u16,
) -> (String, String) {
    within(20, move || {
        let mem = memory(&[("ram", 4)], Pattern::Mixed, 1);
        let dst = spawn_destination(listener, IncomingOptions::default());
        let opts = OutgoingOptions {
            channels,
            tls,
            ..Default::default()
        };
        let src = match migrate_out(&image_guest(mem), &uri, &opts, &Progress::default()) {
            Ok(_) => panic!("the source completed"),
            Err(e) => e.to_string(),
        };
        let dst = match dst.join().unwrap() {
            Ok(_) => panic!("the destination completed"),
            Err(e) => e.to_string(),
        };
        eprintln!("source: {src}\ndestination: {dst}");
        (src, dst)
    })
}

fn copy(from: &Path, to: &Path, names: &[&str]) {
    for n in names {
        std::fs::copy(from.join(n), to.join(n)).unwrap();
    }
}

#[test]
fn wrong_ca_at_the_client_is_named() {
    let server = cert_dir();
    let other = cert_dir();
    // The client's own pair is good, but it trusts another CA.
    let c = tempfile::tempdir().unwrap();
    copy(
        server.path(),
        c.path(),
        &["client-cert.pem", "client-key.pem"],
    );
    copy(other.path(), c.path(), &["ca-cert.pem"]);
    let (l, uri) = tls_listener(server.path());
    let (src, dst) = failing(l, uri, Some(client(c.path(), None)));
    assert!(
        src.contains("TLS") && src.contains("not signed by our CA"),
        "{src}"
    );
    assert!(dst.contains("TLS") && dst.contains("unknown_ca"), "{dst}");
}

#[test]
fn missing_client_certificate_is_named() {
    let server = cert_dir();
    let c = tempfile::tempdir().unwrap();
    copy(server.path(), c.path(), &["ca-cert.pem"]);
    let tls = client(c.path(), None);
    assert!(!tls.has_client_cert());
    let (l, uri) = tls_listener(server.path());
    let (src, dst) = failing(l, uri, Some(tls));
    assert!(dst.contains("the client sent no certificate"), "{dst}");
    assert!(src.contains("requires a client certificate"), "{src}");
}

#[test]
fn client_certificate_from_another_ca_is_named() {
    let server = cert_dir();
    let other = cert_dir();
    let c = tempfile::tempdir().unwrap();
    copy(server.path(), c.path(), &["ca-cert.pem"]);
    copy(
        other.path(),
        c.path(),
        &["client-cert.pem", "client-key.pem"],
    );
    let (l, uri) = tls_listener(server.path());
    let (src, dst) = failing(l, uri, Some(client(c.path(), None)));
    assert!(dst.contains("not signed by our CA"), "{dst}");
    assert!(src.contains("does not trust our certificate"), "{src}");
}

#[test]
fn hostname_mismatch_is_named_and_the_override_is_checked() {
    let d = tempfile::tempdir().unwrap();
    certs(d.path(), &["migration.example"], false);
    let (l, uri) = tls_listener(d.path());
    let (src, dst) = failing(l, uri, Some(client(d.path(), None)));
    assert!(
        src.contains("hostname mismatch") && src.contains("'127.0.0.1'"),
        "{src}"
    );
    assert!(dst.contains("TLS"), "{dst}");

    // With --tls-hostname naming the certificate's host, it completes.
    within(30, move || {
        let mem = memory(&[("ram", 8)], Pattern::Mixed, 2);
        let (l, uri) = tls_listener(d.path());
        let dst = spawn_destination(l, IncomingOptions::default());
        let opts = OutgoingOptions {
            channels: 2,
            tls: Some(client(d.path(), Some("migration.example"))),
            ..Default::default()
        };
        migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default()).unwrap();
        assert_eq!(dst.join().unwrap().unwrap().memory.digest(), mem.digest());
    });
}

#[test]
fn expired_certificate_is_named() {
    let d = tempfile::tempdir().unwrap();
    certs(d.path(), &["localhost", "127.0.0.1"], true);
    let (l, uri) = tls_listener(d.path());
    let (src, dst) = failing(l, uri, Some(client(d.path(), None)));
    assert!(src.contains("certificate has expired"), "{src}");
    assert!(dst.contains("TLS"), "{dst}");
}

#[test]
fn plaintext_client_at_a_tls_listener_is_named() {
    let d = cert_dir();
    let (l, uri) = tls_listener(d.path());
    let (src, dst) = failing(l, uri, None);
    assert!(
        dst.contains("plaintext ferry client at a TLS listener"),
        "{dst}"
    );
    assert!(
        src.contains("refused") && src.contains("plaintext ferry client at a TLS listener"),
        "{src}"
    );
}

#[test]
fn tls_client_at_a_plaintext_listener_is_named() {
    let d = cert_dir();
    let (l, uri) = listener();
    let (src, dst) = failing(l, uri, Some(client(d.path(), None)));
    assert!(
        dst.contains("TLS client hello") && dst.contains("plaintext"),
        "{dst}"
    );
    assert!(
        src.contains("TLS") && src.contains("plaintext listener"),
        "{src}"
    );
}

/// A TCP proxy in front of `target` that flips one byte of the source's
/// stream on its `victim`-th connection, `at` bytes in.
fn tampering_proxy(target: ChannelUri, victim: usize, at: usize) -> ChannelUri {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let ChannelUri::Tcp { port: tport, .. } = target else {
        unreachable!()
    };
    std::thread::spawn(move || {
        for (i, conn) in l.incoming().take(8).enumerate() {
            let Ok(a) = conn else { return };
            let Ok(b) = TcpStream::connect(("127.0.0.1", tport)) else {
                return;
            };
            let pipe = |mut from: TcpStream, mut to: TcpStream, flip: Option<usize>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut seen = 0usize;
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(at) = flip {
                            if seen <= at && at < seen + n {
                                buf[at - seen] ^= 0x40;
                            }
                        }
                        seen += n;
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                })
            };
            pipe(
                a.try_clone().unwrap(),
                b.try_clone().unwrap(),
                (i == victim).then_some(at),
            );
            pipe(b, a, None);
        }
    });
    format!("tcp:127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn tampered_record_is_named() {
    let d = cert_dir();
    let (l, uri) = tls_listener(d.path());
    // One multifd channel (connection 1) carries all 3 MiB of payload;
    // 1 MiB in is the middle of its pages.
    let proxied = tampering_proxy(uri, 1, 1 << 20);
    let (src, dst) = failing_with(l, proxied, Some(client(d.path(), Some("localhost"))), 1);
    assert!(
        dst.contains("multifd[0]") && dst.contains("failed authentication"),
        "{dst}"
    );
    assert!(
        src.contains("failed authentication") || src.contains("multifd"),
        "{src}"
    );
}

#[test]
fn compression_mismatch_at_setup_is_named() {
    within(20, || {
        let mem = memory(&[("ram", 4)], Pattern::Mixed, 1);
        let (l, uri) = listener();
        let dst = spawn_destination(
            l,
            IncomingOptions {
                compression: Some(false),
                ..Default::default()
            },
        );
        let mut opts = OutgoingOptions::default();
        opts.sender.compress = Some(1);
        let src = migrate_out(&image_guest(mem), &uri, &opts, &Progress::default())
            .err()
            .unwrap()
            .to_string();
        let dst = dst.join().unwrap().err().unwrap().to_string();
        assert!(dst.contains("--compress none"), "{dst}");
        assert!(src.contains("--compress none"), "{src}");
    });
}

/// A TLS channel's reader tells a clean end (close_notify) from a cut.
#[test]
fn clean_end_and_cut_connection_are_told_apart() {
    for clean in [true, false] {
        within(20, move || {
            let d = cert_dir();
            let (l, uri) = tls_listener(d.path());
            let server = std::thread::spawn(move || {
                let ch = l.accept_channel(None).unwrap();
                let mut b = [0u8; 5];
                ch.read_exact(&mut b).unwrap();
                assert_eq!(&b, b"hello");
                ch.read_exact(&mut b).unwrap_err().to_string()
            });
            let raw = ferry_transport::connect(&uri, &SocketTuning::default()).unwrap();
            let ch = client(d.path(), None).handshake(raw, "127.0.0.1").unwrap();
            use ferry_transport::Channel;
            ch.write_all(b"hello").unwrap();
            if clean {
                ch.finish().unwrap();
            }
            ch.shutdown();
            let e = server.join().unwrap();
            if clean {
                assert!(e.contains("close_notify") && !e.contains("cut"), "{e}");
            } else {
                assert!(e.contains("connection cut"), "{e}");
            }
        });
    }
}

/// Over a unix socket the name checked is `localhost`.
#[test]
fn tls_over_a_unix_socket() {
    within(30, || {
        let dir = cert_dir();
        let sock = dir.path().join("ferry.sock");
        let uri: ChannelUri = format!("unix:{}", sock.display()).parse().unwrap();
        let l = Listener::bind(&uri, SocketTuning::default())
            .unwrap()
            .with_tls(Arc::new(TlsServer::load(dir.path()).unwrap()));
        let mem = memory(&[("ram", 8)], Pattern::Mixed, 3);
        let dst = spawn_destination(l, IncomingOptions::default());
        let opts = OutgoingOptions {
            channels: 2,
            tls: Some(client(dir.path(), None)),
            ..Default::default()
        };
        let sent = migrate_out(&image_guest(mem.clone()), &uri, &opts, &Progress::default())
            .expect("source completes");
        let got = dst.join().unwrap().expect("destination completes");
        assert!(sent.tls && got.summary.tls);
        assert_eq!(got.memory.digest(), mem.digest());
    });
}

/// Missing or mismatched credential files are named.
#[test]
fn credential_errors_name_the_file() {
    let d = cert_dir();
    let e = TlsServer::load(&d.path().join("nowhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");
    std::fs::remove_file(d.path().join("server-key.pem")).unwrap();
    let e = TlsServer::load(d.path()).unwrap_err().to_string();
    assert!(e.contains("server-key.pem"), "{e}");
    std::fs::remove_file(d.path().join("client-key.pem")).unwrap();
    let e = TlsClient::load(d.path(), None).unwrap_err().to_string();
    assert!(e.contains("client-key.pem") && e.contains("missing"), "{e}");
    // A key that does not belong to the certificate.
    let other = cert_dir();
    std::fs::copy(
        other.path().join("client-key.pem"),
        d.path().join("client-key.pem"),
    )
    .unwrap();
    let e = TlsClient::load(d.path(), None).unwrap_err().to_string();
    assert!(e.contains("client-key.pem"), "{e}");
}
