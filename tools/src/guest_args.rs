//! The guest a source-side command (`send`, `save`) works on: an image guest
//! whose RAM is a file's bytes, a synthetic live guest whose vCPU threads
//! keep writing, or a KVM micro-VM running ferry's guest program. Both
//! commands take these options the same way.

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// RAM is the bytes of --ram; nothing writes it (one pass).
    Image,
    /// --size bytes (seeded from --ram if given) that vCPU threads keep writing.
    Synthetic,
    /// A KVM micro-VM (needs /dev/kvm): --size of RAM, --vcpus vCPUs running
    /// ferry's guest program, which writes pages at --dirty-rate in
    /// --dirty-pattern and keeps verifying them (its self-check).
    Kvm,
}

/// How a live guest's writes are tracked (`--dirty-tracker`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TrackerArg {
    /// Synthetic guest: the writer marks an atomic bitmap.
    Bitmap,
    /// Synthetic guest: userfaultfd async write-protect read with
    /// PAGEMAP_SCAN (Linux 6.7+).
    Uffd,
    /// KVM guest: KVM_GET_DIRTY_LOG, with KVM_CLEAR_DIRTY_LOG (manual
    /// protect) where the kernel has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.
    KvmLog,
    /// KVM guest: KVM's per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING), where
    /// the kernel has it and it works.
    KvmRing,
}

impl TrackerArg {
    fn kind(self) -> GuestKind {
        match self {
            Self::Bitmap | Self::Uffd => GuestKind::Synthetic,
            Self::KvmLog | Self::KvmRing => GuestKind::Kvm,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bitmap => "bitmap",
            Self::Uffd => "uffd",
            Self::KvmLog => "kvm-log",
            Self::KvmRing => "kvm-ring",
        }
    }
}

#[derive(Args)]
pub struct GuestArgs {
    /// File whose bytes are the guest's RAM (e.g. made by `ferry gen`); its
    /// size must be a multiple of 4 KiB. A synthetic guest's memory is
    /// seeded from it.
    #[arg(long)]
    pub ram: Option<PathBuf>,
    /// Which guest: the image of --ram, a synthetic live guest, or a KVM
    /// micro-VM (`kvm`: needs a usable /dev/kvm; its guest program is
    /// assembled from vmm/guest/guest.S in the build).
    #[arg(long, value_enum, default_value_t = GuestKind::Image)]
    pub guest: GuestKind,
    /// Synthetic or KVM guest: memory size, e.g. 64M, 2G (synthetic
    /// default: the size of --ram; a KVM guest needs it: a multiple of
    /// 2 MiB from 4 MiB to 3 GiB).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Synthetic guest: writer threads; KVM guest: vCPUs (1 to 32).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub vcpus: u16,
    /// Synthetic or KVM guest: bytes per second all vCPUs dirty together,
    /// one 4 KiB page per write (e.g. 256M: 256 MiB/s; a KVM guest's vCPUs
    /// pace themselves by the TSC, and 0 lets them write as fast as they can).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub dirty_rate: u64,
    /// Synthetic or KVM guest: random, sequential, or hotset:PCT (writes
    /// only in the first PCT% of memory; a KVM guest: of each vCPU's slice).
    #[arg(long, default_value = "random")]
    pub dirty_pattern: DirtyPattern,
    /// How the live guest's writes are tracked. Synthetic guest: bitmap
    /// (the default) or uffd; a background snapshot of it needs bitmap (it
    /// write-protects memory itself). KVM guest: kvm-log (the default) or
    /// kvm-ring.
    #[arg(long, value_enum)]
    pub dirty_tracker: Option<TrackerArg>,
    /// Synthetic or KVM guest: seed of the initial memory (synthetic,
    /// without --ram) and of the vCPUs' writes.
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
            GuestKind::Synthetic => Ok(Box::new(self.build_synthetic(resources)?)),
            GuestKind::Kvm => Ok(Box::new(crate::kvm::boot(self, resources)?)),
        }
    }
}

impl GuestArgs {
    /// Starts the synthetic guest (whatever --guest says), owning `resources`.
    pub fn build_synthetic(&self, resources: Resources) -> anyhow::Result<SyntheticGuest> {
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
            tracker: match self.dirty_tracker {
                Some(TrackerArg::Uffd) => TrackerKind::Uffd,
                _ => TrackerKind::Bitmap,
            },
        };
        Ok(SyntheticGuest::start(memory, &config, resources)?)
    }
}

const LIVE: &[GuestKind] = &[GuestKind::Synthetic, GuestKind::Kvm];
const IMAGE: &[GuestKind] = &[GuestKind::Image];

/// Options of `send` and `save` that only some guest kinds use, and why
/// the others cannot: (subcommands, option id, the kinds it needs, reason).
const KIND_ONLY: &[(&[&str], &str, &[GuestKind], &str)] = &[
    (
        &["send", "save"],
        "ram",
        &[GuestKind::Image, GuestKind::Synthetic],
        "a KVM guest boots ferry's guest program in --size of fresh RAM",
    ),
    (
        &["send", "save"],
        "size",
        LIVE,
        "an image guest's size is the size of its --ram file",
    ),
    (
        &["send", "save"],
        "vcpus",
        LIVE,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_rate",
        LIVE,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_pattern",
        LIVE,
        "an image guest has no vCPUs: nothing writes its memory",
    ),
    (
        &["send", "save"],
        "dirty_tracker",
        LIVE,
        "an image guest's memory never changes, so it has no dirty log",
    ),
    (
        &["send", "save"],
        "seed",
        LIVE,
        "an image guest's memory is the bytes of --ram and nothing writes it",
    ),
    (
        &["send", "save"],
        "device_state",
        IMAGE,
        "a live guest's device state is its own (vCPU counters and RNG state, or KVM vCPU registers)",
    ),
    (
        &["send"],
        "auto_converge",
        LIVE,
        "it throttles a running guest's vCPUs; an image guest has none",
    ),
    (
        &["send"],
        "downtime_limit",
        LIVE,
        "an image guest goes in one pass: nothing dirties its memory, so there is \
         no switchover decision to steer",
    ),
    (
        &["send"],
        "max_passes",
        LIVE,
        "an image guest goes in one pass: nothing dirties its memory",
    ),
    (
        &["save"],
        "downtime_limit",
        LIVE,
        "it steers a live save of a running guest; an image guest is saved in one pass",
    ),
    (
        &["save"],
        "max_passes",
        LIVE,
        "it steers a live save of a running guest; an image guest is saved in one pass",
    ),
    (
        &["send"],
        "colo_jitter",
        &[GuestKind::Synthetic],
        "it makes the synthetic guest's writes slightly non-deterministic; a KVM \
         guest's outputs follow its own state (the two copies agree until their \
         states differ)",
    ),
    (
        &["save"],
        "background",
        LIVE,
        "a background snapshot lets a running guest run on; an image guest does not \
         run (save it without --background)",
    ),
];

fn kinds_text(kinds: &[GuestKind]) -> &'static str {
    match kinds {
        [GuestKind::Image] => "an image guest (--guest image, the default)",
        [GuestKind::Synthetic] => "a synthetic guest (--guest synthetic)",
        [GuestKind::Kvm] => "a KVM guest (--guest kvm)",
        [GuestKind::Image, GuestKind::Synthetic] => {
            "an image or synthetic guest (--guest image or synthetic)"
        }
        _ => "a live guest (--guest synthetic or kvm)",
    }
}

/// Refuses an option given on the command line of `send` or `save` that
/// the chosen guest kind would silently ignore, and a dirty tracker of
/// another kind of guest; the error names the option and says why. `sub`
/// is the subcommand's matches.
pub fn check_kind_options(subcommand: &str, sub: &ArgMatches) -> Result<(), String> {
    let Ok(Some(&kind)) = sub.try_get_one::<GuestKind>("guest") else {
        return Ok(());
    };
    for &(commands, id, needs, why) in KIND_ONLY {
        if !commands.contains(&subcommand) || needs.contains(&kind) {
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
            return Err(format!(
                "{option} only applies to {}: {why}",
                kinds_text(needs)
            ));
        }
    }
    if let Ok(Some(&tracker)) = sub.try_get_one::<TrackerArg>("dirty_tracker") {
        if kind != GuestKind::Image && tracker.kind() != kind {
            let why = match kind {
                GuestKind::Kvm => "a KVM guest's writes are tracked by KVM: kvm-log or kvm-ring",
                _ => "a synthetic guest's writes are tracked by bitmap or uffd",
            };
            return Err(format!(
                "--dirty-tracker {} only applies to {}: {why}",
                tracker.name(),
                kinds_text(&[tracker.kind()])
            ));
        }
    }
    Ok(())
}

/// `recv --run-after`: how long to let the migrated guest run, if it has a
/// workload to run. An image guest has none (nothing writes its memory):
/// then says so on stderr and returns None, keeping the migrated guest.
pub fn run_after(after: Option<Duration>, device_state: &[u8]) -> Option<Duration> {
    let after = after?;
    if ferry::synthetic::is_synthetic_state(device_state) || ferry_vmm::is_kvm_state(device_state) {
        return Some(after);
    }
    eprintln!(
        "ferry recv: note: --run-after had no workload to run: the migrated guest is an \
         image guest, whose memory nothing writes (the workload is a synthetic or KVM \
         guest's); the migration itself is unaffected"
    );
    None
}
