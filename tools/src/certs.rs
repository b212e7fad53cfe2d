//! `ferry certs`: a CA and server/client certificate pairs for `--tls-dir`.

use std::path::PathBuf;

use clap::Args;
use ferry_transport::certs::{generate, CertRequest};

/// Generate a CA and server and client certificates for --tls-dir.
///
/// Writes ca-cert.pem, ca-key.pem, server-cert.pem, server-key.pem,
/// client-cert.pem and client-key.pem into DIR (QEMU's x509 layout, so QEMU
/// can use the same directory); key files are readable by their owner only.
/// Give the receiver the whole directory, the sender ca-cert.pem and the
/// client pair.
#[derive(Args)]
pub struct CertsArgs {
    /// Directory to write (created if missing; existing files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Names the receiver is reached by (DNS names or IP addresses), as
    /// senders will write them in --to; repeat or list several.
    #[arg(long, num_args = 1.., required = true)]
    host: Vec<String>,
    /// Days the certificates stay valid (1 to 36500).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

pub fn run(a: CertsArgs) -> anyhow::Result<bool> {
    generate(
        &a.out,
        &CertRequest {
            hosts: a.host.clone(),
            days: a.days,
            expired: false,
        },
    )?;
    eprintln!(
        "ferry certs: wrote a CA, a server certificate for {} and a client certificate to {}",
        a.host.join(", "),
        a.out.display()
    );
    Ok(true)
}
