//! `ferry`: move a guest's memory to another host over many channels.
//!
//! Subcommands: `gen` (datasets), `send` / `recv` (the two ends of a
//! migration), `ctl` (the control socket of a running send or recv), `save` /
//! `restore` / `inspect` / `verify` (a guest in a file), `demo` (both ends
//! over loopback, in one process), `bench` (ferry against QEMU, iperf3 and
//! the floor peer, whose two processes are the hidden `floor-peer`),
//! `certs` (TLS credentials for `--tls-dir`), and `completions` / `man` (shell
//! completions and manual pages made from this command line). Each prints a
//! human summary, or one JSON object with `--json`; the exit status is 0 only
//! for a completed run. `-v`/`-q` and `--log-format` set what is logged to
//! stderr (see [`init_logging`]).

mod bench;
mod certs;
mod colo;
mod ctl;
mod demo;
mod file_io;
mod floor_peer;
mod gen;
mod guest_args;
mod inspect;
mod kvm;
mod output;
mod peer;
mod recv;
mod restore;
mod save;
mod send;
mod signals;
mod units;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "ferry",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("FERRY_GIT_COMMIT"), ")"),
    about = "Live-migration transport: moves a guest's memory over many parallel channels",
    long_about = "ferry moves the memory and device state of a guest to another process or host over \
                  K parallel channels (multifd), sending straight from guest memory with io_uring.\n\n\
                  Start `ferry recv` on the destination, then `ferry send` on the source. \
                  `ferry save` / `ferry restore` put a guest in a file and back. \
                  `ferry demo` runs both ends over loopback; `ferry bench` measures ferry against QEMU and iperf3.\n\n\
                  Logging goes to stderr: warnings and errors by default, more with -v (info: channels, \
                  passes, switchover, failures; -vv: debug; -vvv: trace), only errors with -q. \
                  FERRY_LOG (or RUST_LOG), in tracing's filter syntax (e.g. FERRY_LOG=ferry=debug), \
                  overrides both. Colours only when stderr is a terminal.\n\n\
                  Sizes are IEC (K, M, G, T: powers of 1024); durations take ms, s, m, h."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output on stderr: -v info, -vv debug, -vvv trace.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    /// Only errors in the log (the summary is still printed).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// How log lines look: `text` for people, `json` (one object a line) for
    /// log collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
    /// The floor peer's two processes, run by `ferry bench --peer floor`.
    #[command(hide = true)]
    FloorPeer(floor_peer::FloorPeerArgs),
    Completions(CompletionsArgs),
    Man(ManArgs),
}

/// Print a shell completion script for ferry on stdout.
///
/// For bash: `ferry completions bash > /etc/bash_completion.d/ferry` (or
/// `source <(ferry completions bash)`); zsh: put `ferry completions zsh` in a
/// file named `_ferry` on $fpath.
#[derive(clap::Args)]
struct CompletionsArgs {
    shell: clap_complete::Shell,
}

/// Print ferry's manual page (roff) on stdout, or write one page per
/// command into a directory.
///
/// `ferry man | man -l -` shows it; `ferry man --out-dir /usr/local/share/man/man1`
/// installs ferry.1, ferry-send.1, ferry-recv.1 and the others.
#[derive(clap::Args)]
struct ManArgs {
    /// Write ferry.1 and ferry-COMMAND.1 here instead of printing ferry.1.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    // SAFETY: first thing in main: no other thread exists yet.
    unsafe { ferry_transport::tls::keep_freed_heap() };
    let cli = parse_cli();
    init_logging(&cli);
    if matches!(
        cli.command,
        Command::Send(_) | Command::Recv(_) | Command::Save(_) | Command::Bench(_)
    ) {
        signals::install();
    }
    if matches!(cli.command, Command::Bench(_)) {
        signals::before_exit(ferry_bench::restore_system_settings);
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
        Command::FloorPeer(a) => floor_peer::run(a),
        Command::Completions(a) => {
            clap_complete::generate(
                a.shell,
                &mut Cli::command(),
                "ferry",
                &mut std::io::stdout(),
            );
            Ok(true)
        }
        Command::Man(a) => man(a),
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

/// Logs to stderr: the level from -v/-q unless FERRY_LOG or RUST_LOG says
/// otherwise; ANSI colours only on a terminal; text or JSON lines.
fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = ["FERRY_LOG", "RUST_LOG"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `ferry man`: the manual page of ferry, or of every command.
fn man(a: ManArgs) -> anyhow::Result<bool> {
    let cmd = Cli::command();
    let Some(dir) = a.out_dir else {
        clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
        return Ok(true);
    };
    std::fs::create_dir_all(&dir)?;
    let write = |name: String, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut f = std::fs::File::create(&path)?;
        clap_mangen::Man::new(c)
            .title(name.clone())
            .render(&mut f)?;
        eprintln!("ferry: wrote {}", path.display());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write(format!("ferry-{}", sub.get_name()), sub.clone())?;
    }
    write("ferry".into(), cmd)?;
    Ok(true)
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
