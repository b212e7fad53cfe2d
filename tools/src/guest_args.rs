//! The guest a source-side command (`send`, `save`) works on: an image guest
//! whose RAM is a file's bytes, or a synthetic live guest whose vCPU threads
//! keep writing. Both commands take these options the same way.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
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
    /// Synthetic guest: memory size (default: the size of --ram).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Synthetic guest: writer threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub vcpus: u16,
    /// Synthetic guest: bytes per second all vCPUs dirty together, one
    /// 4 KiB page per write (e.g. 256M).
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
