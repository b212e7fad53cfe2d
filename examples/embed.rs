//! Embedding ferry in a VMM: migrate guest memory that the VMM already holds
//! as a rust-vmm `GuestMemoryMmap`, over loopback TCP, with no copy of it.
//!
//! The "source VMM" owns a `GuestMemoryMmap` of two regions (one at guest
//! address 0, one above 4 GiB, as a PC's RAM is split), fills it, and hands
//! it to ferry with `GuestMemory::from_guest_memory_mmap`: ferry's blocks
//! share the VMM's mappings. The "destination VMM" does the same with empty
//! memory of the same layout and receives into it. At the end the
//! destination VMM reads the source's bytes through its own
//! `GuestMemoryMmap`, and both sides' digests agree.
//!
//! Run it with `cargo run --release --example embed`; `cargo test` runs it
//! too (as the test at the bottom).

use std::sync::Arc;

use ferry::{
    migrate_in, migrate_out, DestinationMemory, GuestMemory, ImageGuest, IncomingOptions, Listener,
    OutgoingOptions, Progress, SocketTuning,
};
use ferry_ram::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: usize = 1 << 20;
/// The VMM's layout: (guest address, length) of each RAM region.
const LAYOUT: [(u64, usize); 2] = [(0, 24 * MIB), (4 << 30, 8 * MIB)];

/// What one run found: the digests of both sides and the bytes moved.
struct Outcome {
    source_digest: String,
    destination_digest: String,
    ram_bytes: u64,
    identical: bool,
}

fn vmm_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        LAYOUT.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("the VMM maps its guest memory")
}

/// The source VMM's guest writes: a recognisable word every 4 KiB, with a
/// quarter of the pages left zero.
fn fill(mem: &GuestMemoryMmap) {
    for &(base, len) in &LAYOUT {
        for page in (0..len / 4096).filter(|p| p % 4 != 0) {
            let addr = GuestAddress(base + (page * 4096) as u64);
            let word = (base ^ (page as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes();
            mem.write_slice(&word, addr).expect("inside the guest");
        }
    }
}

fn run() -> Result<Outcome, Box<dyn std::error::Error>> {
    // The source VMM's memory, handed to ferry without a copy.
    let source_vmm = vmm_memory();
    fill(&source_vmm);
    let source = Arc::new(GuestMemory::from_guest_memory_mmap(&source_vmm, 4096)?);
    let guest = ImageGuest::from_memory(source.clone(), b"vcpu and device state".to_vec());

    // The destination VMM's empty memory of the same layout.
    let destination_vmm = vmm_memory();
    let destination = Arc::new(GuestMemory::from_guest_memory_mmap(&destination_vmm, 4096)?);
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse()?, SocketTuning::default())?;
    let uri = listener.uri().clone();
    let incoming = IncomingOptions {
        memory: DestinationMemory::Provided(destination),
        ..Default::default()
    };
    let receiving = std::thread::spawn(move || {
        migrate_in(&listener, &incoming, &Progress::default()).map_err(|e| e.to_string())
    });

    let opts = OutgoingOptions {
        channels: 2,
        ..Default::default()
    };
    let sent = migrate_out(&guest, &uri, &opts, &Progress::default())?;
    let received = receiving.join().expect("the destination thread")?;

    // The destination VMM sees the bytes through its own GuestMemoryMmap.
    let mut identical = received.device_state == b"vcpu and device state";
    for &(base, len) in &LAYOUT {
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        source_vmm.read_slice(&mut a, GuestAddress(base))?;
        destination_vmm.read_slice(&mut b, GuestAddress(base))?;
        identical &= a == b;
    }
    Ok(Outcome {
        source_digest: source.digest().to_string(),
        destination_digest: received.memory.digest().to_string(),
        ram_bytes: sent.ram_bytes,
        identical,
    })
}

fn main() {
    match run() {
        Ok(o) => {
            println!(
                "moved {} MiB from one GuestMemoryMmap to another over loopback TCP",
                o.ram_bytes >> 20
            );
            println!("source digest      {}", o.source_digest);
            println!("destination digest {}", o.destination_digest);
            if o.identical && o.source_digest == o.destination_digest {
                println!("embed: PASS: the destination VMM's memory equals the source's");
            } else {
                eprintln!("embed: FAIL: the destination's memory differs from the source's");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("embed: FAIL: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrates_a_guest_memory_mmap_over_loopback() {
        let o = super::run().expect("the migration completes");
        assert_eq!(o.ram_bytes, 32 << 20);
        assert_eq!(o.source_digest, o.destination_digest);
        assert!(o.identical, "the destination VMM reads the source's bytes");
    }
}
