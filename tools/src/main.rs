//! `ferry`: move a guest's memory to another host over many channels.
//!
//! Subcommands: `gen` (datasets), `send` / `recv` (the two ends of a
//! migration), `ctl` (the control socket of a running send or recv), `save` /
//! `restore` / `inspect` / `verify` (a guest in a file), `demo` (both ends
//! over loopback, in one process), `bench` (ferry against QEMU and iperf3)
//! and `certs` (TLS credentials for `--tls-dir`). Each prints a human
//! summary, or one JSON object with `--json`; the exit status is 0 only for
//! a completed run.

mod bench;
mod certs;
mod ctl;
mod demo;
mod gen;
mod guest_args;
mod inspect;
mod output;
mod peer;
mod recv;
mod restore;
mod save;
mod send;
mod signals;
mod units;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migration transport: moves a guest's memory over many parallel channels",
    long_about = "ferry moves the memory and device state of a guest to another process or host over \
                  K parallel channels (multifd), sending straight from guest memory with io_uring.\n\n\
                  Start `ferry recv` on the destination, then `ferry send` on the source. \
                  `ferry save` / `ferry restore` put a guest in a file and back. \
                  `ferry demo` runs both ends over loopback; `ferry bench` measures ferry against QEMU and iperf3."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Gen(gen::GenArgs),
    Send(send::SendArgs),
    Recv(recv::RecvArgs),
    Save(save::SaveArgs),
    Restore(restore::RestoreArgs),
    Inspect(inspect::InspectArgs),
    Verify(inspect::VerifyArgs),
    Demo(demo::DemoArgs),
    Bench(bench::BenchArgs),
    Ctl(ctl::CtlArgs),
    Certs(certs::CertsArgs),
}

fn main() -> ExitCode {
    // SAFETY: first thing in main: no other thread exists yet.
    unsafe { ferry_transport::tls::keep_freed_heap() };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("FERRY_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = parse_cli();
    if matches!(
        cli.command,
        Command::Send(_) | Command::Recv(_) | Command::Save(_)
    ) {
        signals::install();
    }
    let result = match cli.command {
        Command::Gen(a) => gen::run(a),
        Command::Send(a) => send::run(a),
        Command::Recv(a) => recv::run(a),
        Command::Save(a) => save::run(a),
        Command::Restore(a) => restore::run(a),
        Command::Inspect(a) => inspect::inspect(a),
        Command::Verify(a) => inspect::verify(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Ctl(a) => ctl::run(a),
        Command::Certs(a) => certs::run(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferry: error: {}", output::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The command line, with the checks clap cannot express (an option that
/// the chosen guest kind would ignore) made usage errors like clap's own.
fn parse_cli() -> Cli {
    let mut cmd = Cli::command();
    let matches = cmd.get_matches_mut();
    if let Some((name, sub)) = matches.subcommand() {
        if let Err(msg) = guest_args::check_kind_options(name, sub) {
            let mut sub_cmd = cmd.find_subcommand(name).cloned().unwrap_or(cmd);
            sub_cmd.error(ErrorKind::ArgumentConflict, msg).exit();
        }
    }
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
