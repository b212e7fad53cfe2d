//! The guest a source-side command (`send`, `save`) works on: an image guest
//! whose RAM is a file's bytes, or a synthetic live guest whose vCPU threads
//! keep writing. Both commands take these options the same way.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};
use ferry::synthetic::synthetic_memory;
use ferry::{
    DirtyPattern, Guest, ImageGuest, Resources, SyntheticConfig, SyntheticGuest, TrackerKind,
};

use crate::units::parse_size;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// RAM is the bytes of --ram; nothing writes it (one pass).
    Image,
    /// --size bytes (seeded from --ram if given) that vCPU threads keep writing.
    Synthetic,
}

#[derive(Args)]
pub struct GuestArgs {
    /// File whose bytes are the guest's RAM (e.g. made by `ferry gen`); its
    /// size must be a multiple of 4 KiB. A synthetic guest's memory is
    /// seeded from it.
    #[arg(long)]
    pub ram: Option<PathBuf>,
    /// Which guest: the image of --ram, or a synthetic live guest.
    #[arg(long, value_enum, default_value_t = GuestKind::Image)]
    pub guest: GuestKind,
    /// Synthetic guest: memory size, e.g. 64M, 2G (default: the size of --ram).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Synthetic guest: writer threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub vcpus: u16,
    /// Synthetic guest: bytes per second all vCPUs dirty together, one
    /// 4 KiB page per write (e.g. 256M: 256 MiB/s).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub dirty_rate: u64,
    /// Synthetic guest: random, sequential, or hotset:PCT (writes only in
    /// the first PCT% of memory).
    #[arg(long, default_value = "random")]
    pub dirty_pattern: DirtyPattern,
    /// Synthetic guest: bitmap (the writer marks an atomic bitmap) or uffd
    /// (userfaultfd async write-protect read with PAGEMAP_SCAN, Linux 6.7+).
    /// A background snapshot needs bitmap: it write-protects memory itself.
    #[arg(long, default_value = "bitmap")]
    pub dirty_tracker: TrackerKind,
    /// Synthetic guest: seed of the initial memory (without --ram) and of
    /// the vCPUs' writes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Image guest: file holding the device state (default: a short text
    /// describing the image).
    #[arg(long)]
    pub device_state: Option<PathBuf>,
}

impl GuestArgs {
    /// Opens the image guest or starts the synthetic one, owning `resources`.
    pub fn build(&self, resources: Resources) -> anyhow::Result<Box<dyn Guest>> {
        match self.guest {
            GuestKind::Image => {
                let ram = self
                    .ram
                    .as_ref()
                    .context("an image guest needs --ram FILE")?;
                let device_state = match &self.device_state {
                    Some(p) => Some(
                        std::fs::read(p)
                            .with_context(|| format!("reading device state {}", p.display()))?,
                    ),
                    None => None,
                };
                Ok(Box::new(
                    ImageGuest::open(ram, device_state)?.with_resources(resources),
                ))
            }
            GuestKind::Synthetic => {
                let size = match (self.size, &self.ram) {
                    (Some(s), _) => s,
                    (None, Some(p)) => std::fs::metadata(p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .len(),
                    (None, None) => anyhow::bail!("a synthetic guest needs --size or --ram"),
                };
                let memory = synthetic_memory(size, self.ram.as_deref(), self.seed)?;
                let config = SyntheticConfig {
                    vcpus: self.vcpus,
                    dirty_rate: self.dirty_rate,
                    pattern: self.dirty_pattern,
                    seed: self.seed,
                    tracker: self.dirty_tracker,
                };
                Ok(Box::new(SyntheticGuest::start(memory, &config, resources)?))
            }
        }
    }
}

/// Options of `send` and `save` that only one guest kind uses, and why the
/// other kind cannot: (subcommands, option id, the kind it needs, reason).
const KIND_ONLY: &[(&[&str], &str, GuestKind, &str)] = &[
    (
        &["send", "save"],
        "size",
        GuestKind::Synthetic,
        "an image guest's size is the size of its --ram file",
    ),
    (
        &["send", "save"],
        "vcpus",
        GuestKind::Synthetic,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_rate",
        GuestKind::Synthetic,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_pattern",
        GuestKind::Synthetic,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_tracker",
        GuestKind::Synthetic,
        "an image guest's memory never changes, so it has no dirty log",
    ),
    (
        &["send", "save"],
        "seed",
        GuestKind::Synthetic,
        "an image guest's memory is the bytes of --ram and nothing writes it",
    ),
    (
        &["send", "save"],
        "device_state",
        GuestKind::Image,
        "a synthetic guest's device state is its own vCPU counters and RNG state",
    ),
    (
        &["send"],
        "auto_converge",
        GuestKind::Synthetic,
        "it throttles a running guest's vCPUs; an image guest has none",
    ),
    (
        &["send"],
        "downtime_limit",
        GuestKind::Synthetic,
        "an image guest goes in one pass: nothing dirties its memory, so there is \
         no switchover decision to steer",
    ),
    (
        &["send"],
        "max_passes",
        GuestKind::Synthetic,
        "an image guest goes in one pass: nothing dirties its memory",
    ),
    (
        &["save"],
        "downtime_limit",
        GuestKind::Synthetic,
        "it steers a live save of a running guest; an image guest is saved in one pass",
    ),
    (
        &["save"],
        "max_passes",
        GuestKind::Synthetic,
        "it steers a live save of a running guest; an image guest is saved in one pass",
    ),
    (
        &["save"],
        "background",
        GuestKind::Synthetic,
        "a background snapshot lets a running guest run on; an image guest does not \
         run (save it without --background)",
    ),
];

/// Refuses an option given on the command line of `send` or `save` that
/// the chosen guest kind would silently ignore; the error names the option
/// and says why. `sub` is the subcommand's matches.
pub fn check_kind_options(subcommand: &str, sub: &ArgMatches) -> Result<(), String> {
    let Ok(Some(&kind)) = sub.try_get_one::<GuestKind>("guest") else {
        return Ok(());
    };
    for &(commands, id, needs, why) in KIND_ONLY {
        if !commands.contains(&subcommand) || kind == needs {
            continue;
        }
        let given = matches!(
            sub.try_contains_id(id)
                .ok()
                .and_then(|_| sub.value_source(id)),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if given {
            let option = format!("--{}", id.replace('_', "-"));
            let needs = match needs {
                GuestKind::Synthetic => "a synthetic guest (--guest synthetic)",
                GuestKind::Image => "an image guest (--guest image, the default)",
            };
            return Err(format!("{option} only applies to {needs}: {why}"));
        }
    }
    Ok(())
}

/// `recv --run-after`: how long to let the migrated guest run, if it has a
/// workload to run. An image guest has none (nothing writes its memory):
/// then says so on stderr and returns None, keeping the migrated guest.
pub fn run_after(after: Option<Duration>, device_state: &[u8]) -> Option<Duration> {
    let after = after?;
    if ferry::synthetic::is_synthetic_state(device_state) {
        return Some(after);
    }
    eprintln!(
        "ferry recv: note: --run-after had no workload to run: the migrated guest is an \
         image guest, whose memory nothing writes (the workload is a synthetic guest's); \
         the migration itself is unaffected"
    );
    None
}
