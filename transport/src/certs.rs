//! `ferry certs`: a CA and a server and client pair in QEMU's x509 layout
//! (rcgen), for tests and first-time users.
//!
//! Writes `ca-cert.pem`, `ca-key.pem`, `server-cert.pem`, `server-key.pem`,
//! `client-cert.pem` and `client-key.pem` into a directory; key files are
//! created with mode 0600. The server certificate names every host given
//! (DNS names or IP addresses) as subject alternative names.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};
use crate::TransportError;

/// What to generate.
#[derive(Clone, Debug)]
pub struct CertRequest {
    /// Names the server certificate is valid for.
    pub hosts: Vec<String>,
    /// Days the certificates are valid from now.
    pub days: u32,
    /// Test aid: leaf certificates that expired long ago.
    pub expired: bool,
}

impl Default for CertRequest {
    fn default() -> Self {
        Self {
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            days: 365,
            expired: false,
        }
    }
}

fn err(path: &Path, why: impl std::fmt::Display) -> TransportError {
    TransportError::TlsFiles {
        path: path.display().to_string(),
        why: why.to_string(),
    }
}

/// Generates a CA, a server pair and a client pair into `dir` (created if
/// missing; existing files are replaced).
pub fn generate(dir: &Path, req: &CertRequest) -> Result<(), TransportError> {
    if req.hosts.is_empty() {
        return Err(err(dir, "at least one host name is needed"));
    }
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    let rc = |e: rcgen::Error| err(dir, format!("generating certificates: {e}"));
    let now = time::OffsetDateTime::now_utc();
    let (leaf_from, leaf_to) = if req.expired {
        (
            rcgen::date_time_ymd(2000, 1, 1),
            rcgen::date_time_ymd(2001, 1, 1),
        )
    } else {
        (
            now - time::Duration::hours(1),
            now + time::Duration::days(i64::from(req.days)),
        )
    };

    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    // A name of its own, so a certificate from another ferry CA is told
    // apart by issuer name (unknown issuer), not only by its signature.
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| err(dir, e))?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    ca.distinguished_name
        .push(DnType::CommonName, format!("ferry migration CA {id}"));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - time::Duration::hours(1);
    ca.not_after = now + time::Duration::days(i64::from(req.days.max(1)) + 1);
    let ca_cert = ca.self_signed(&ca_key).map_err(rc)?;

    let leaf = |names: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(rc)?;
        let mut p = CertificateParams::new(names).map_err(rc)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        p.not_before = leaf_from;
        p.not_after = leaf_to;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(rc)?;
        Ok::<_, TransportError>((cert, key))
    };
    let (server, server_key) = leaf(
        req.hosts.clone(),
        &req.hosts[0],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client, client_key) = leaf(
        vec!["ferry-client".into()],
        "ferry-client",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    write(dir, CA_CERT, &ca_cert.pem(), false)?;
    write(dir, "ca-key.pem", &ca_key.serialize_pem(), true)?;
    write(dir, SERVER_CERT, &server.pem(), false)?;
    write(dir, SERVER_KEY, &server_key.serialize_pem(), true)?;
    write(dir, CLIENT_CERT, &client.pem(), false)?;
    write(dir, CLIENT_KEY, &client_key.serialize_pem(), true)?;
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> Result<(), TransportError> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(|e| err(&path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| err(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_qemu_layout_with_private_keys() {
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), &CertRequest::default()).unwrap();
        for f in [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY] {
            let meta = std::fs::metadata(d.path().join(f)).unwrap();
            assert!(meta.len() > 100, "{f}");
            if f.ends_with("key.pem") {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
            }
        }
        crate::TlsServer::load(d.path()).unwrap();
        assert!(crate::TlsClient::load(d.path(), None)
            .unwrap()
            .has_client_cert());
    }
}
