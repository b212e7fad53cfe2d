//! TLS channels: rustls (aws-lc-rs provider) on every channel of a migration.
//!
//! Owns the credentials ([`TlsClient`], [`TlsServer`], loaded from a directory
//! in QEMU's x509 layout), the handshake that runs right after TCP
//! connect/accept and before ferry's own hello (which then travels inside
//! TLS), and [`TlsChannel`], a [`Channel`] whose bytes are TLS records.
//!
//! The server always verifies the client's certificate against `ca-cert.pem`;
//! the client verifies the server's certificate and name. Every failure says
//! which check failed ([`describe`]). Each channel ends with close_notify
//! ([`Channel::finish`]), so a reader tells a clean end ("the peer ended the
//! TLS session") from a cut connection ("closed without close_notify").
//!
//! The data path drives a TLS channel with its own io_uring and buffers:
//! [`TlsChannel::seal`] encrypts a gather list into the caller's buffer, which
//! the caller then sends; [`TlsChannel::read_plain`] asks the caller for
//! ciphertext (the caller receives it however it likes) and hands back
//! plaintext. rustls's buffered API copies plaintext once on each side (into
//! its record buffer when sealing, out of its plaintext queue when reading),
//! and it allocates and frees a buffer per 16 KiB record. With glibc's
//! default trim threshold that memory goes back to the kernel after every
//! packet and is faulted in again (with a TLB shootdown each time), which
//! cost 0.5–1 s of a 2 GiB TLS migration here. [`keep_freed_heap`] raises
//! the threshold; the `ferry` binary calls it first thing, and an embedding
//! VMM should too.
//!
//! rustls 0.23's unbuffered API would not change this: its
//! `WriteTraffic::encrypt` still encrypts each record into a fresh `Vec` and
//! copies it out, and `ReadTraffic::next_record` still hands out a `Vec`
//! per record (rustls's own TODO: "requires in-place decryption"). Kernel
//! TLS would remove the copies, but this kernel is built without it
//! (`CONFIG_TLS` is not set).

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};
use socket2::Socket;

use crate::{Channel, SocketChannel, TransportError};

/// Keeps freed heap memory in the process instead of handing it back to
/// the kernel at once (glibc: trim threshold at its maximum, mmap threshold
/// at 32 MiB). rustls allocates a buffer per 16 KiB TLS record and frees it
/// a moment later; with glibc's defaults every packet's worth of records
/// was unmapped and faulted in again, with a TLB shootdown each time.
/// Measured on 2 GiB `mixed`, K=2, TLS: 1.36–1.91 s without, 0.84–0.91 s
/// with. Does nothing on other C libraries.
///
/// # Safety
/// glibc's `mallopt` is not thread-safe (its manual: "MT-Unsafe
/// const:mallopt"): call this before the process starts any other thread,
/// e.g. first thing in `main`.
pub unsafe fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc malloc's tuning, and the caller
    // guarantees no other thread exists to allocate meanwhile.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // The largest value glibc takes (half its 64 MiB thread heap).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
    }
}

/// File names inside a TLS directory, as QEMU names them.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ciphertext read per receive on the blocking path (main channel).
const READ_CHUNK: usize = 64 << 10;

/// aws-lc-rs with AES-128-GCM preferred: it is the fastest suite on CPUs
/// with AES-NI, and 128-bit keys are what QEMU's gnutls picks too.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        match name.as_str() {
            "TLS13_AES_128_GCM_SHA256" => 0,
            "TLS13_AES_256_GCM_SHA384" => 1,
            _ => 2,
        }
    });
    Arc::new(p)
}

fn files_err(path: &Path, why: impl fmt::Display) -> TransportError {
    TransportError::TlsFiles {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let bytes = std::fs::read(path).map_err(|e| files_err(path, e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| files_err(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(files_err(path, "holds no certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let bytes = std::fs::read(path).map_err(|e| files_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| files_err(path, format!("holds no usable private key: {e}")))
}

fn load_roots(dir: &Path) -> Result<Arc<RootCertStore>, TransportError> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for c in load_certs(&path)? {
        roots
            .add(c)
            .map_err(|e| files_err(&path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The connecting side's credentials: the CA that must have signed the
/// server's certificate, and the client's own pair (if present).
pub struct TlsClient {
    config: Arc<ClientConfig>,
    hostname: Option<String>,
    has_client_cert: bool,
    /// Our certificate's validity window, to explain a peer's refusal.
    own: Option<Validity>,
    dir: PathBuf,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsClient({})", self.dir.display())
    }
}

impl TlsClient {
    /// Loads `ca-cert.pem` and, if both exist, `client-cert.pem` and
    /// `client-key.pem` from `dir`. Without a client pair the client connects
    /// without a certificate (and a verifying server refuses it, saying so).
    /// `hostname` overrides the name checked against the server's certificate.
    pub fn load(dir: &Path, hostname: Option<String>) -> Result<Self, TransportError> {
        let roots = load_roots(dir)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| files_err(dir, e))?
            .with_root_certificates(roots);
        let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
        // Some(window) when we present a certificate (its window, if readable).
        let (config, client_cert) = match (cert.exists(), key.exists()) {
            (true, true) => {
                let chain = load_certs(&cert)?;
                let own = validity(&chain[0]);
                let k = load_key(&key)?;
                let c = builder
                    .with_client_auth_cert(chain, k)
                    .map_err(|e| files_err(&key, format!("does not match {CLIENT_CERT}: {e}")))?;
                (c, Some(own))
            }
            (false, false) => {
                tracing::warn!(
                    "{}: no {CLIENT_CERT}/{CLIENT_KEY}: connecting without a client certificate",
                    dir.display()
                );
                (builder.with_no_client_auth(), None)
            }
            (true, false) => return Err(files_err(&key, "missing (client-cert.pem is there)")),
            (false, true) => return Err(files_err(&cert, "missing (client-key.pem is there)")),
        };
        Ok(Self {
            config: Arc::new(config),
            hostname,
            has_client_cert: client_cert.is_some(),
            own: client_cert.flatten(),
            dir: dir.to_path_buf(),
        })
    }

    pub fn has_client_cert(&self) -> bool {
        self.has_client_cert
    }

    /// The name checked against the server's certificate for a connection
    /// to `host`: the override if given, else `host`.
    pub fn server_name(&self, host: &str) -> String {
        self.hostname.clone().unwrap_or_else(|| host.to_string())
    }

    /// Runs the client handshake on a connected socket.
    pub fn handshake(&self, ch: SocketChannel, host: &str) -> Result<TlsChannel, TransportError> {
        let name_text = self.server_name(host);
        let (socket, label) = ch.into_parts();
        let name = ServerName::try_from(name_text.clone()).map_err(|e| TransportError::Tls {
            channel: label.clone(),
            why: format!("'{name_text}' is not a valid server name: {e}"),
        })?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| {
            TransportError::Tls {
                channel: label.clone(),
                why: describe(&e),
            }
        })?;
        handshake(socket, label, conn.into(), &name_text, self.own)
    }
}

/// The listening side's credentials: its certificate and key, and the CA
/// every client certificate must be signed by.
pub struct TlsServer {
    config: Arc<ServerConfig>,
    /// Our certificate's validity window, to explain a peer's refusal.
    own: Option<Validity>,
    dir: PathBuf,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsServer({})", self.dir.display())
    }
}

impl TlsServer {
    /// Loads `ca-cert.pem`, `server-cert.pem` and `server-key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let roots = load_roots(dir)?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| files_err(&dir.join(CA_CERT), e))?;
        let (cert, key) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        let chain = load_certs(&cert)?;
        let own = validity(&chain[0]);
        let k = load_key(&key)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| files_err(dir, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, k)
            .map_err(|e| files_err(&key, format!("does not match {SERVER_CERT}: {e}")))?;
        // Every channel is a fresh, full handshake; tickets would be dead weight.
        config.send_tls13_tickets = 0;
        Ok(Self {
            config: Arc::new(config),
            own,
            dir: dir.to_path_buf(),
        })
    }

    /// Runs the server handshake on an accepted socket. A plaintext ferry
    /// hello is refused with a plaintext reply saying TLS is required.
    pub fn handshake(&self, ch: SocketChannel) -> Result<TlsChannel, TransportError> {
        let first = peek_first(&ch, HANDSHAKE_TIMEOUT)?;
        if first.starts_with(b"FERRY") {
            let why =
                "a plaintext ferry client at a TLS listener (start the sender with --tls-dir)";
            let _ = crate::handshake::send_reply(&ch, Some(why));
            return Err(TransportError::Tls {
                channel: ch.label().into(),
                why: why.into(),
            });
        }
        if first.first() != Some(&0x16) {
            return Err(TransportError::Tls {
                channel: ch.label().into(),
                why: format!(
                    "not a TLS client hello (first bytes {:?})",
                    String::from_utf8_lossy(&first).escape_debug().to_string()
                ),
            });
        }
        let (socket, label) = ch.into_parts();
        let conn = rustls::ServerConnection::new(self.config.clone()).map_err(|e| {
            TransportError::Tls {
                channel: label.clone(),
                why: describe(&e),
            }
        })?;
        handshake(socket, label, conn.into(), "", self.own)
    }
}

/// Waits (at most `timeout`) for the first bytes of a connection, without
/// consuming them.
fn peek_first(ch: &SocketChannel, timeout: Duration) -> Result<Vec<u8>, TransportError> {
    let io = |source| TransportError::Io {
        channel: ch.label().into(),
        what: "waiting for the first bytes",
        source,
    };
    let s = ch.socket();
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 5];
    let r = s.recv_with_flags(&mut buf, libc::MSG_PEEK | libc::MSG_WAITALL);
    s.set_read_timeout(None).map_err(io)?;
    let n = r.map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransportError::Timeout {
            what: format!("a handshake on {}", ch.label()),
            secs: timeout.as_secs_f64(),
        },
        _ => io(e),
    })?;
    // SAFETY: recv initialised the first n bytes.
    Ok(buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect())
}

fn handshake(
    socket: Socket,
    label: String,
    mut conn: rustls::Connection,
    server_name: &str,
    own: Option<Validity>,
) -> Result<TlsChannel, TransportError> {
    let io = |what, source| TransportError::Io {
        channel: label.clone(),
        what,
        source,
    };
    socket
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| io("setting a handshake timeout", e))?;
    socket
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| io("setting a handshake timeout", e))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut &socket) {
            return Err(TransportError::Tls {
                channel: label,
                why: format!("handshake failed: {}", describe_io(&e, server_name, own)),
            });
        }
    }
    socket
        .set_read_timeout(None)
        .and_then(|()| socket.set_write_timeout(None))
        .map_err(|e| io("clearing the handshake timeout", e))?;
    tracing::debug!(
        "{label}: TLS {:?} {:?}",
        conn.protocol_version(),
        conn.negotiated_cipher_suite().map(|s| s.suite())
    );
    Ok(TlsChannel {
        socket,
        label,
        conn: Mutex::new(conn),
        writing: Mutex::new(Vec::new()),
        reading: Mutex::new(RecvBuf::default()),
        own,
    })
}

/// Which TLS check failed, in words, for a rustls error.
pub fn describe(e: &rustls::Error) -> String {
    describe_own(e, None)
}

/// Like [`describe`]; `own` is the validity window of the certificate we
/// presented, which tells what a `certificate_expired` alert from the peer
/// means (rustls sends that one alert for "expired" and "not valid yet").
fn describe_own(e: &rustls::Error, own: Option<Validity>) -> String {
    use rustls::Error as E;
    use AlertDescription as A;
    use CertificateError as C;
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the peer's certificate is not signed by our CA (ca-cert.pem): unknown issuer".into()
        }
        E::InvalidCertificate(C::BadSignature) => {
            "the peer's certificate is not signed by our CA (ca-cert.pem): its signature \
             does not verify"
                .into()
        }
        E::InvalidCertificate(C::ExpiredContext { time, not_after }) => format!(
            "the peer's certificate has expired (valid until {}; the time here is {})",
            utc(not_after.as_secs()),
            utc(time.as_secs())
        ),
        E::InvalidCertificate(C::Expired) => "the peer's certificate has expired".into(),
        E::InvalidCertificate(C::NotValidYetContext { time, not_before }) => format!(
            "the peer's certificate is not valid yet (valid from {}; the time here is {}): \
             wait, or check both hosts' clocks",
            utc(not_before.as_secs()),
            utc(time.as_secs())
        ),
        E::InvalidCertificate(C::NotValidYet) => "the peer's certificate is not valid yet".into(),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "hostname mismatch: the server's certificate is not valid for the name checked \
             (see --tls-hostname)"
                .into()
        }
        E::InvalidCertificate(other) => format!("the peer's certificate was refused: {other:?}"),
        E::NoCertificatesPresented => {
            "the client sent no certificate, and this server requires one \
             (client-cert.pem/client-key.pem)"
                .into()
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the server requires a client certificate and we sent none \
             (no client-cert.pem/client-key.pem)"
                .into()
        }
        E::AlertReceived(A::UnknownCA) => {
            "the peer does not trust our certificate: it is not signed by the peer's CA \
             (alert unknown_ca)"
                .into()
        }
        E::AlertReceived(A::CertificateExpired) => refused_as_expired(own),
        E::AlertReceived(A::BadCertificate) => {
            "the peer refused our certificate (alert bad_certificate)".into()
        }
        E::AlertReceived(A::BadRecordMac | A::DecryptError) => {
            "the peer could not authenticate a TLS record from us (tampered in transit?)".into()
        }
        E::AlertReceived(a) => format!("the peer sent TLS alert {a:?}"),
        E::DecryptError => {
            "a TLS record failed authentication: tampered with or corrupted in transit".into()
        }
        E::InvalidMessage(m) => format!("malformed TLS data ({m:?}): is the peer speaking TLS?"),
        other => other.to_string(),
    }
}

/// What a `certificate_expired` alert from the peer means, judged by our
/// own certificate's window and our clock.
fn refused_as_expired(own: Option<Validity>) -> String {
    const ALERT: &str = "(alert certificate_expired)";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match own {
        Some(v) if now < v.not_before => format!(
            "the peer refused our certificate: it is not valid yet (valid from {}) {ALERT}",
            utc(v.not_before as u64)
        ),
        Some(v) if now > v.not_after => format!(
            "the peer refused our certificate: it has expired (valid until {}) {ALERT}",
            utc(v.not_after as u64)
        ),
        Some(v) => format!(
            "the peer refused our certificate as expired or not valid yet, though it is valid \
             here from {} to {}: check the peer's clock {ALERT}",
            utc(v.not_before as u64),
            utc(v.not_after as u64)
        ),
        None => format!("the peer refused our certificate as expired or not valid yet {ALERT}"),
    }
}

/// The window a certificate is valid in, in seconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

/// Reads the validity window out of a DER certificate (RFC 5280:
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
/// OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore,
/// notAfter }, ... }, ... }`). `None` if the bytes are not shaped so: the
/// window only refines an error message.
fn validity(cert: &[u8]) -> Option<Validity> {
    /// Splits one DER element off `input`: (tag, contents, rest).
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    /// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
    fn time(tag: u8, text: &[u8]) -> Option<i64> {
        let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
        let (year, rest) = match (tag, text.len()) {
            (0x17, 12) => {
                let yy: i32 = text[..2].parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
            }
            (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
            _ => return None,
        };
        let num = |i: usize| rest.get(i..i + 2)?.parse::<u8>().ok();
        let date = time::Date::from_calendar_date(year, num(0)?.try_into().ok()?, num(2)?).ok()?;
        let t = time::Time::from_hms(num(4)?, num(6)?, num(8)?).ok()?;
        Some(
            time::PrimitiveDateTime::new(date, t)
                .assume_utc()
                .unix_timestamp(),
        )
    }
    let (0x30, cert, _) = element(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = element(cert)? else {
        return None;
    };
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2; // version
    }
    for _ in 0..3 {
        tbs = element(tbs)?.2; // serial number, signature algorithm, issuer
    }
    let (0x30, window, _) = element(tbs)? else {
        return None;
    };
    let (tag, from, rest) = element(window)?;
    let not_before = time(tag, from)?;
    let (tag, to, _) = element(rest)?;
    let not_after = time(tag, to)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(secs: u64) -> String {
    match i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
    {
        Some(t) => format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        None => format!("{secs} s after 1970"),
    }
}

/// Like [`describe`] for an I/O error that may carry a rustls error.
fn describe_io(e: &io::Error, server_name: &str, own: Option<Validity>) -> String {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        let mut s = describe_own(t, own);
        if matches!(
            t,
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ) && !server_name.is_empty()
        {
            s.push_str(&format!(": '{server_name}'"));
        }
        return s;
    }
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<TlsFailure>()) {
        return t.0.clone();
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => format!(
            "the peer closed the connection during the TLS handshake ({e}); \
             is it a plaintext listener, or did it refuse us?"
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
            "no answer within {}s (is the peer speaking TLS?)",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
        _ => e.to_string(),
    }
}

/// A TLS failure carried inside an `io::Error`, in words.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsFailure(pub String);

fn tls_io_error(e: &rustls::Error, own: Option<Validity>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsFailure(describe_own(e, own)))
}

/// Ciphertext received but not yet handed to rustls.
#[derive(Default)]
pub struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A channel whose bytes are TLS records over a TCP or unix socket.
///
/// Thread-safe: the main channel's reader and writer threads share it. The
/// connection lock is never held across a blocking socket call: a writer
/// encrypts under it into its own buffer, then writes that buffer holding
/// only the write-order lock; a reader receives ciphertext holding only the
/// read lock.
pub struct TlsChannel {
    socket: Socket,
    label: String,
    conn: Mutex<rustls::Connection>,
    /// Write order, and the ciphertext buffer of blocking writes.
    writing: Mutex<Vec<u8>>,
    /// One reader at a time, and its ciphertext not yet given to rustls.
    reading: Mutex<RecvBuf>,
    /// Our certificate's validity window (a peer's refusal may come after
    /// the handshake: a TLS 1.3 server checks the client's certificate then).
    own: Option<Validity>,
}

impl fmt::Debug for TlsChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsChannel({})", self.label)
    }
}

impl TlsChannel {
    /// Encrypts `plain` (a gather list, in order) as TLS records appended
    /// to `out`. The records must reach the socket in the order they were
    /// sealed: one thread seals and sends a channel's records.
    pub fn seal(&self, plain: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
        let mut conn = self.conn.lock().unwrap();
        seal_locked(&mut conn, plain, out)
    }

    /// Encrypts `plain` as TLS records and writes them to the socket as
    /// rustls makes them (from its record buffer to the kernel, with no
    /// copy of ours between); returns when all are written, with their
    /// length. One thread seals and sends a channel's records.
    pub fn seal_and_send(&self, plain: &[IoSlice<'_>]) -> io::Result<u64> {
        let mut conn = self.conn.lock().unwrap();
        let mut out = CountingWriter {
            inner: &self.socket,
            written: 0,
        };
        seal_locked(&mut conn, plain, &mut out)?;
        Ok(out.written)
    }

    /// Fills `dst` with plaintext. `recv` is asked for more ciphertext when
    /// rustls has no plaintext left; it fills the slice it is given (at
    /// least one byte) and returns how many bytes it wrote, 0 at the end of
    /// the stream. Returns how many bytes of `dst` were filled: fewer only
    /// when the peer ended the TLS session cleanly (close_notify). A
    /// connection that ends without close_notify is an `UnexpectedEof` error
    /// ("connection cut"), a record that fails authentication an
    /// `InvalidData` error naming the check.
    pub fn read_plain(
        &self,
        dst: &mut [u8],
        recv: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut rb = self.reading.lock().unwrap();
        if rb.buf.len() < READ_CHUNK {
            rb.buf.resize(READ_CHUNK, 0);
        }
        let mut got = 0;
        while got < dst.len() {
            let mut conn = self.conn.lock().unwrap();
            match conn.reader().read(&mut dst[got..]) {
                Ok(0) => return Ok(got),
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection cut: closed without TLS close_notify",
                    ))
                }
                Err(e) => return Err(e),
            }
            if rb.start == rb.end {
                drop(conn);
                let RecvBuf { buf, start, end } = &mut *rb;
                let n = recv(buf)?;
                (*start, *end) = (0, n);
                conn = self.conn.lock().unwrap();
                if n == 0 {
                    // Tell rustls the stream ended; reader() then says how.
                    conn.read_tls(&mut io::empty())?;
                    conn.process_new_packets()
                        .map_err(|e| tls_io_error(&e, self.own))?;
                    continue;
                }
            }
            let RecvBuf { buf, start, end } = &mut *rb;
            while *start < *end {
                let mut cipher = &buf[*start..*end];
                let fed = conn.read_tls(&mut cipher);
                if let Ok(k) = fed {
                    *start += k;
                }
                let state = conn.process_new_packets().map_err(|e| {
                    let _ = conn.write_tls(&mut &self.socket);
                    tls_io_error(&e, self.own)
                })?;
                if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
                    break;
                }
                // rustls refused more ciphertext yet has nothing to give.
                fed?;
            }
        }
        Ok(got)
    }

    /// Sends close_notify: the peer's reads then end cleanly.
    fn close_notify(&self) -> io::Result<()> {
        let mut out = self.writing.lock().unwrap();
        out.clear();
        {
            let mut conn = self.conn.lock().unwrap();
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut *out)?;
            }
        }
        (&self.socket).write_all(&out)
    }
}

/// A writer that counts what it passed on.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn seal_locked(
    conn: &mut rustls::Connection,
    plain: &[IoSlice<'_>],
    out: &mut dyn Write,
) -> io::Result<()> {
    conn.set_buffer_limit(None);
    // With no buffer limit rustls takes all of it at once; the loop only
    // guards against a partial write.
    let mut first = 0;
    let mut skip = 0;
    while first < plain.len() {
        let mut rest: Vec<IoSlice<'_>> = Vec::with_capacity(plain.len() - first);
        rest.push(IoSlice::new(&plain[first][skip..]));
        rest.extend(plain[first + 1..].iter().map(|s| IoSlice::new(s)));
        let mut n = conn.writer().write_vectored(&rest)?;
        if n == 0 && rest.iter().any(|s| !s.is_empty()) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "TLS connection refused more plaintext",
            ));
        }
        while first < plain.len() && n >= plain[first].len() - skip {
            n -= plain[first].len() - skip;
            first += 1;
            skip = 0;
        }
        skip += n;
        while conn.wants_write() {
            conn.write_tls(out)?;
        }
    }
    Ok(())
}

impl Channel for TlsChannel {
    fn label(&self) -> &str {
        &self.label
    }
    fn set_label(&mut self, label: String) {
        self.label = label;
    }
    fn read_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let got = self.read_plain(buf, &mut |b| (&self.socket).read(b))?;
        if got < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer ended the TLS session (close_notify)",
            ));
        }
        Ok(())
    }
    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut out = self.writing.lock().unwrap();
        out.clear();
        {
            let mut conn = self.conn.lock().unwrap();
            seal_locked(&mut conn, &[IoSlice::new(buf)], &mut *out)?;
        }
        (&self.socket).write_all(&out)
    }
    fn uring_fd(&self) -> Option<RawFd> {
        Some(self.socket.as_raw_fd())
    }
    fn shutdown(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_write_timeout(timeout)
    }
    fn finish(&self) -> io::Result<()> {
        self.close_notify()
    }
    fn tls(&self) -> Option<&TlsChannel> {
        Some(self)
    }
    fn tls_shared(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<TlsChannel>> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate valid over [from, to].
    fn cert(from: time::OffsetDateTime, to: time::OffsetDateTime) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = from;
        p.not_after = to;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn validity_window_is_read_from_the_certificate() {
        // UTCTime (before 2050) and GeneralizedTime (from 2050) both.
        let from = rcgen::date_time_ymd(2031, 2, 3) + time::Duration::seconds(4 * 3600 + 5);
        let to = rcgen::date_time_ymd(2061, 12, 31);
        let v = validity(&cert(from, to)).expect("a window");
        assert_eq!(
            v,
            Validity {
                not_before: from.unix_timestamp(),
                not_after: to.unix_timestamp()
            }
        );
        assert_eq!(utc(v.not_before as u64), "2031-02-03 04:00:05 UTC");
        assert_eq!(utc(v.not_after as u64), "2061-12-31 00:00:00 UTC");
        assert_eq!(validity(b"\x30\x03\x02\x01"), None, "truncated DER");
    }

    #[test]
    fn a_refusal_as_expired_is_explained_by_our_own_window() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let day = 86_400;
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateExpired);
        let text = |not_before, not_after| {
            describe_own(
                &alert,
                Some(Validity {
                    not_before,
                    not_after,
                }),
            )
        };
        let future = text(now + 10 * day, now + 20 * day);
        assert!(
            future.contains("not valid yet (valid from ") && !future.contains("expired ("),
            "{future}"
        );
        let past = text(now - 20 * day, now - 10 * day);
        assert!(past.contains("has expired (valid until "), "{past}");
        let fine = text(now - day, now + day);
        assert!(fine.contains("check the peer's clock"), "{fine}");
        let unknown = describe_own(&alert, None);
        assert!(unknown.contains("expired or not valid yet"), "{unknown}");
    }
}
