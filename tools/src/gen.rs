//! `ferry gen`: writes a deterministic dataset to use as guest RAM.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ferry_ram::pattern::{write_file, Pattern};

use crate::units::{bytes, parse_size};

/// Write a deterministic dataset (guest RAM image) to a file.
///
/// Pattern `mixed` models real guest memory: for 4 KiB page i, i%4==0 is all
/// zero, i%4==1 is random bytes masked to their low 4 bits, the rest random.
/// The same size, pattern and seed always give the same bytes.
#[derive(Args)]
pub struct GenArgs {
    /// Size of the dataset, a multiple of 1 MiB (e.g. 64M, 2G).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Page contents: mixed, random or zero.
    #[arg(long, default_value = "mixed", value_parser = clap::value_parser!(Pattern))]
    pattern: Pattern,
    /// Seed of the random bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// File to write (created or truncated).
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
}

pub fn run(a: GenArgs) -> anyhow::Result<bool> {
    let t = Instant::now();
    write_file(&a.output, a.size, a.pattern, a.seed)?;
    eprintln!(
        "ferry gen: wrote {} ({:?}, seed {}) to {} in {:.2} s",
        bytes(a.size),
        a.pattern,
        a.seed,
        a.output.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(true)
}
