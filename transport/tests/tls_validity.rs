//! TLS certificates outside their validity window, over a real unix socket:
//! a certificate that is not valid yet is reported as such, with the date
//! it becomes valid, on the side that checks it and on the side that holds
//! it (which only hears rustls's `certificate_expired` alert, sent for both
//! cases), and never as "expired"; an expired one names the date it ended.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry_transport::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use ferry_transport::{connect, Channel, ChannelUri, Listener, SocketTuning, TlsClient, TlsServer};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration as Span, OffsetDateTime};

/// A CA valid now, and server and client pairs valid over the given windows,
/// written into `dir` in QEMU's layout.
fn write_certs(
    dir: &Path,
    server: (OffsetDateTime, OffsetDateTime),
    client: (OffsetDateTime, OffsetDateTime),
) {
    let now = OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "validity test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - Span::days(1);
    ca.not_after = now + Span::days(3650);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>, eku, (from, to)| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, "leaf");
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        p.not_before = from;
        p.not_after = to;
        (p.signed_by(&key, &ca_cert, &ca_key).unwrap(), key)
    };
    let (s, sk) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
        server,
    );
    let (c, ck) = leaf(
        vec!["ferry-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
        client,
    );
    for (name, text) in [
        (CA_CERT, ca_cert.pem()),
        (SERVER_CERT, s.pem()),
        (SERVER_KEY, sk.serialize_pem()),
        (CLIENT_CERT, c.pem()),
        (CLIENT_KEY, ck.serialize_pem()),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// Runs one TLS handshake over a unix socket, then the client reads one
/// byte (a TLS 1.3 server checks the client's certificate after the
/// client's handshake has ended, so the client hears of a refusal then).
/// Returns the client's and the server's error text.
fn handshake(dir: &Path) -> (String, String) {
    let sock = dir.join("tls.sock");
    let uri: ChannelUri = format!("unix:{}", sock.display()).parse().unwrap();
    let listener = Listener::bind(&uri, SocketTuning::default())
        .unwrap()
        .with_tls(Arc::new(TlsServer::load(dir).unwrap()));
    let server =
        std::thread::spawn(
            move || match listener.accept_channel(Some(Duration::from_secs(60))) {
                Ok(_) => panic!("the server accepted the handshake"),
                Err(e) => e.to_string(),
            },
        );
    let tls = TlsClient::load(dir, None).unwrap();
    let ch = connect(&uri, &SocketTuning::default())
        .and_then(|raw| tls.handshake(raw, "localhost"))
        .map_err(|e| e.to_string());
    let client = match ch {
        Err(e) => e,
        Ok(ch) => {
            ch.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            match ch.read_exact(&mut [0u8; 1]) {
                Err(e) => e.to_string(),
                Ok(()) => panic!("the client read a byte"),
            }
        }
    };
    let server = server.join().unwrap();
    eprintln!("client: {client}\nserver: {server}");
    (client, server)
}

/// As `utc` prints it: `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(t: OffsetDateTime) -> String {
    format!(
        "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Windows: (valid now, valid from 10 days on, and that start in words).
fn windows() -> (
    (OffsetDateTime, OffsetDateTime),
    (OffsetDateTime, OffsetDateTime),
    String,
) {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let start = now + Span::days(10);
    (
        (now - Span::days(1), now + Span::days(30)),
        (start, start + Span::days(30)),
        utc(start),
    )
}

#[test]
fn server_certificate_not_valid_yet_is_named_with_its_start() {
    let (ok, future, start) = windows();
    let d = tempfile::tempdir().unwrap();
    write_certs(d.path(), future, ok);
    let (client, server) = handshake(d.path());
    assert!(
        client.contains(&format!(
            "the peer's certificate is not valid yet (valid from {start}"
        )),
        "{client}"
    );
    assert!(
        server.contains(&format!(
            "refused our certificate: it is not valid yet (valid from {start})"
        )),
        "{server}"
    );
    for text in [&client, &server] {
        assert!(!text.contains("has expired"), "{text}");
    }
}

#[test]
fn client_certificate_not_valid_yet_is_named_with_its_start() {
    let (ok, future, start) = windows();
    let d = tempfile::tempdir().unwrap();
    write_certs(d.path(), ok, future);
    let (client, server) = handshake(d.path());
    assert!(
        server.contains(&format!(
            "the peer's certificate is not valid yet (valid from {start}"
        )),
        "{server}"
    );
    assert!(
        client.contains(&format!(
            "refused our certificate: it is not valid yet (valid from {start})"
        )),
        "{client}"
    );
    for text in [&client, &server] {
        assert!(!text.contains("has expired"), "{text}");
    }
}

#[test]
fn expired_certificate_is_named_with_its_end() {
    let (ok, _, _) = windows();
    let now = ok.0 + Span::days(1);
    let end = now - Span::days(10);
    let d = tempfile::tempdir().unwrap();
    write_certs(d.path(), (end - Span::days(30), end), ok);
    let (client, server) = handshake(d.path());
    assert!(
        client.contains(&format!(
            "the peer's certificate has expired (valid until {}",
            utc(end)
        )),
        "{client}"
    );
    assert!(
        server.contains(&format!(
            "refused our certificate: it has expired (valid until {})",
            utc(end)
        )),
        "{server}"
    );
}
