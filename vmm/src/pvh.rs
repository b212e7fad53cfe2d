//! The guest program as a PVH ELF, and how ferry's VMM boots it the way
//! QEMU (`-kernel guest.elf -append ...`), Cloud Hypervisor and Firecracker
//! do: load the ELF's segments at their physical addresses, build the PVH
//! `hvm_start_info` (with a memory map and the command line) in guest
//! memory, and enter the 32-bit entry the ELF's Xen note names in flat
//! protected mode, paging off, EBX = the start_info's address. The guest
//! builds its own page tables and enters long mode (`guest/guest.S`).
//!
//! The ELF (built by `build.rs` from `guest/guest.S` and `guest/guest.ld`):
//!
//! ```text
//! ELF64, little-endian, x86-64 (EM_X86_64 = 62), EXEC
//! PT_LOAD   within CODE .. CODE + CODE_MAX (1 MiB, 64 KiB)
//! PT_NOTE   the note    namesz u32 = 4, descsz u32 = 4, type u32 = 18
//!           (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen\0", desc u32 = the
//!           32-bit entry's physical address
//! ```
//!
//! `hvm_start_info`, version 1 (Xen's public/arch-x86/hvm/start_info.h; all
//! little-endian), at [`START_INFO`]:
//!
//! ```text
//! off size field
//!   0   4  magic            0x336ec578
//!   4   4  version          1 (the memory map fields exist)
//!   8   4  flags            0
//!  12   4  nr_modules       0
//!  16   8  modlist_paddr    0
//!  24   8  cmdline_paddr    CMDLINE: the command line, NUL-terminated
//!  32   8  rsdp_paddr       0 (no ACPI)
//!  40   8  memmap_paddr     MEMMAP
//!  48   4  memmap_entries   1
//!  52   4  reserved         0
//! memory map entry (hvm_memmap_table_entry), 24 bytes, at MEMMAP:
//!   0   8  addr             0
//!   8   8  size             the guest's RAM bytes
//!  16   4  type             1 (RAM, as in E820)
//!  20   4  reserved         0
//! ```
//!
//! The guest takes its RAM from the map's RAM entry that holds the
//! generation table (`TABLE`), up to `MAX_MEMORY`. The ELF's entry and
//! segments sit at 1 MiB and up, as rust-vmm's linux-loader (Firecracker,
//! Cloud Hypervisor) requires of a kernel; those VMMs put their
//! start_info at 0x6000, its memory map at 0x7000 and the command line at
//! 0x20000, which the guest leaves alone until it has read them (layout.rs).
//!
//! The command line: words `key=value` separated by spaces; a value is a
//! decimal number (stored as a u64) with an optional `K`, `M` or `G`
//! suffix (binary); words without `=` and unknown keys are ignored (so a
//! loader's own words do no harm); a bad number stops the guest with a
//! `fatal` line (see [`crate::port`]). The keys:
//!
//! ```text
//! vcpus=N       vCPUs that work, 1..=32 (default 1); the BSP starts the
//!               others (INIT, SIPI); vCPUs with an APIC ID >= N park
//! rate=BYTES    bytes per second the whole guest writes, in page-sized
//!               writes spread over the vCPUs, paced by the TSC (default
//!               0: as fast as it can; needs tsc_khz)
//! pattern=P     0 random (default), 1 sequential, 2 hot set
//! hot=PCT       the hot set: PCT (1..=100) percent of each vCPU's slice
//! seed=N        the random pattern's seed (default 1)
//! tsc_khz=KHZ   the TSC's frequency, 1000..=100000000 (default: unknown;
//!               progress lines then come every ~1e9 ticks and carry no
//!               maxgap_us)
//! port=PORT     the report port, decimal (default 0xe9 = 233, QEMU's
//!               isa-debugcon; 1016 = 0x3f8 writes the lines to the COM1
//!               UART of a VMM without a debug port, e.g. Firecracker)
//! report_ms=MS  milliseconds between two progress lines of a vCPU, at
//!               most 3600000 (default 1000; 0: none)
//! zeroed=1      RAM above 1 MiB is already zero: the guest does not
//!               clear its work area at boot (ferry's VMM; QEMU's firmware
//!               leaves tables in RAM, so leave it out there)
//! output_every=N  each vCPU emits an output record (port.rs) after every
//!               N-th page write (default 0: none; ferry's VMM adds it
//!               only when asked, [`crate::Vm::boot_with_output`])
//! ```

use ferry_ram::vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::vm::{VmConfig, WritePattern};

/// The guest program: a PVH ELF, assembled and linked by `build.rs`.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// The Xen ELF note type naming the 32-bit PVH entry.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// A guest ELF that cannot be booted; each names what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("guest ELF: not a little-endian ELF64 file")]
    NotElf64,
    #[error("guest ELF: machine {0}, not x86-64 (62)")]
    Machine(u16),
    #[error("guest ELF: {what} at byte {offset}: {need} bytes needed, the file has {len}")]
    Truncated {
        what: String,
        offset: u64,
        need: u64,
        len: usize,
    },
    #[error("guest ELF: program header {index} (physical {paddr:#x}, {memsz} bytes): {why}")]
    Segment {
        index: usize,
        paddr: u64,
        memsz: u64,
        why: String,
    },
    #[error("guest ELF: no loadable segment")]
    NoSegment,
    #[error("guest ELF: no Xen PHYS32_ENTRY note (type 18): not a PVH kernel")]
    NoEntryNote,
    #[error("guest ELF: the PVH entry {0:#x} is outside the loaded segments")]
    Entry(u64),
}

/// One loadable segment: `filesz` bytes of the file from `offset` at
/// physical `paddr`, then zeros up to `memsz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// A checked PVH ELF: its segments (inside `CODE .. CODE + CODE_MAX`) and
/// its 32-bit entry.
#[derive(Clone, Debug)]
pub struct PvhElf<'a> {
    pub file: &'a [u8],
    pub segments: Vec<Segment>,
    pub entry: u32,
}

fn field(file: &[u8], offset: u64, len: u64, what: &str) -> Result<u64, ElfError> {
    let truncated = || ElfError::Truncated {
        what: what.to_string(),
        offset,
        need: len,
        len: file.len(),
    };
    let start = usize::try_from(offset).map_err(|_| truncated())?;
    let end = start.checked_add(len as usize).ok_or_else(truncated)?;
    let bytes = file.get(start..end).ok_or_else(truncated)?;
    let mut v = [0u8; 8];
    v[..bytes.len()].copy_from_slice(bytes);
    Ok(u64::from_le_bytes(v))
}

impl<'a> PvhElf<'a> {
    /// Checks `file` and finds its segments and PVH entry.
    pub fn parse(file: &'a [u8]) -> Result<Self, ElfError> {
        if file.len() < 64 || &file[..4] != b"\x7fELF" || file[4] != 2 || file[5] != 1 {
            return Err(ElfError::NotElf64);
        }
        let machine = field(file, 18, 2, "e_machine")? as u16;
        if machine != EM_X86_64 {
            return Err(ElfError::Machine(machine));
        }
        let phoff = field(file, 32, 8, "e_phoff")?;
        let phentsize = field(file, 54, 2, "e_phentsize")?;
        let phnum = field(file, 56, 2, "e_phnum")?;
        if phentsize < 56 {
            return Err(ElfError::Truncated {
                what: "e_phentsize".into(),
                offset: 54,
                need: 56,
                len: phentsize as usize,
            });
        }
        let mut segments = Vec::new();
        let mut entry = None;
        for index in 0..phnum as usize {
            let ph = phoff + index as u64 * phentsize;
            let what = |f: &str| format!("program header {index} {f}");
            let p_type = field(file, ph, 4, &what("p_type"))? as u32;
            let offset = field(file, ph + 8, 8, &what("p_offset"))?;
            let paddr = field(file, ph + 24, 8, &what("p_paddr"))?;
            let filesz = field(file, ph + 32, 8, &what("p_filesz"))?;
            let memsz = field(file, ph + 40, 8, &what("p_memsz"))?;
            let bad = |why: &str| ElfError::Segment {
                index,
                paddr,
                memsz,
                why: why.to_string(),
            };
            // The bytes must be in the file.
            field(file, offset, 0, &what("contents"))?;
            if offset.saturating_add(filesz) > file.len() as u64 {
                return Err(ElfError::Truncated {
                    what: what("contents"),
                    offset,
                    need: filesz,
                    len: file.len(),
                });
            }
            match p_type {
                PT_LOAD => {
                    if filesz > memsz {
                        return Err(bad("more bytes in the file than in memory"));
                    }
                    if paddr < CODE || paddr.saturating_add(memsz) > CODE + CODE_MAX {
                        return Err(bad(&format!(
                            "outside the program's room {CODE:#x}..{:#x}",
                            CODE + CODE_MAX
                        )));
                    }
                    segments.push(Segment {
                        paddr,
                        offset,
                        filesz,
                        memsz,
                    });
                }
                PT_NOTE => {
                    if let Some(e) = find_entry_note(&file[offset as usize..][..filesz as usize]) {
                        entry = Some(e);
                    }
                }
                _ => {}
            }
        }
        segments.sort_by_key(|s| s.paddr);
        if segments.is_empty() {
            return Err(ElfError::NoSegment);
        }
        for w in segments.windows(2) {
            if w[0].paddr + w[0].memsz > w[1].paddr {
                return Err(ElfError::Segment {
                    index: 0,
                    paddr: w[1].paddr,
                    memsz: w[1].memsz,
                    why: "overlaps another segment".into(),
                });
            }
        }
        let entry = entry.ok_or(ElfError::NoEntryNote)?;
        if !segments
            .iter()
            .any(|s| (s.paddr..s.paddr + s.memsz).contains(&u64::from(entry)))
        {
            return Err(ElfError::Entry(entry.into()));
        }
        Ok(Self {
            file,
            segments,
            entry,
        })
    }

    /// Copies the segments into `mem` (zeros past each one's file bytes).
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<(), String> {
        for s in &self.segments {
            let bytes = &self.file[s.offset as usize..][..s.filesz as usize];
            mem.write_slice(bytes, GuestAddress(s.paddr))
                .map_err(|e| format!("the guest program at {:#x}: {e}", s.paddr))?;
            let zeros = vec![0u8; (s.memsz - s.filesz) as usize];
            mem.write_slice(&zeros, GuestAddress(s.paddr + s.filesz))
                .map_err(|e| format!("the guest program at {:#x}: {e}", s.paddr + s.filesz))?;
        }
        Ok(())
    }
}

/// The PHYS32_ENTRY address in a PT_NOTE segment's notes, if there.
fn find_entry_note(mut notes: &[u8]) -> Option<u32> {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    while notes.len() >= 12 {
        let word = |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().unwrap());
        let (namesz, descsz, kind) = (word(0) as usize, word(4) as usize, word(8));
        let name_end = 12usize.checked_add(align4(namesz)?)?;
        let desc_end = name_end.checked_add(align4(descsz)?)?;
        if desc_end > notes.len() {
            return None;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[12..12 + namesz] == b"Xen\0" {
            let desc = &notes[name_end..name_end + descsz];
            return match descsz {
                4 => Some(u32::from_le_bytes(desc.try_into().unwrap())),
                8 => u32::try_from(u64::from_le_bytes(desc.try_into().unwrap())).ok(),
                _ => None,
            };
        }
        notes = &notes[desc_end..];
    }
    None
}

/// The guest's boot parameters, as its command line carries them (the
/// keys are in the module doc); `None` leaves a key out (the guest's
/// default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootParams {
    pub vcpus: usize,
    /// Bytes per second, the whole guest.
    pub rate: u64,
    pub pattern: WritePattern,
    pub seed: u64,
    pub tsc_khz: Option<u32>,
    pub report_ms: Option<u64>,
    /// RAM above 1 MiB is known to be zero (a fresh mapping).
    pub zeroed: bool,
}

impl BootParams {
    /// The parameters of `config` for ferry's VMM (fresh, zeroed RAM).
    pub fn of(config: &VmConfig, tsc_khz: u32) -> Self {
        Self {
            vcpus: config.vcpus,
            rate: config.dirty_rate,
            pattern: config.pattern,
            seed: config.seed,
            tsc_khz: Some(tsc_khz),
            report_ms: None,
            zeroed: true,
        }
    }

    /// The command line.
    pub fn cmdline(&self) -> String {
        let (pattern, hot) = match self.pattern {
            WritePattern::Random => (0, 100),
            WritePattern::Sequential => (1, 100),
            WritePattern::Hotset(p) => (2, u64::from(p)),
        };
        let mut s = format!(
            "vcpus={} rate={} pattern={pattern} hot={hot} seed={}",
            self.vcpus, self.rate, self.seed
        );
        if let Some(k) = self.tsc_khz {
            s += &format!(" tsc_khz={k}");
        }
        if let Some(ms) = self.report_ms {
            s += &format!(" report_ms={ms}");
        }
        if self.zeroed {
            s += " zeroed=1";
        }
        s
    }
}

/// Writes the `hvm_start_info` (version 1), its one-entry memory map (RAM
/// from 0 to `memory`) and `cmdline` at their places in the layout.
pub fn write_start_info(mem: &GuestMemoryMmap, memory: u64, cmdline: &str) -> Result<(), String> {
    if cmdline.len() as u64 >= CMDLINE_MAX || cmdline.contains('\0') {
        return Err(format!(
            "a command line of {} bytes: at most {} and no NUL",
            cmdline.len(),
            CMDLINE_MAX - 1
        ));
    }
    let mut info = [0u8; 56];
    info[0..4].copy_from_slice(&START_INFO_MAGIC.to_le_bytes());
    info[4..8].copy_from_slice(&1u32.to_le_bytes());
    info[24..32].copy_from_slice(&CMDLINE.to_le_bytes());
    info[40..48].copy_from_slice(&MEMMAP.to_le_bytes());
    info[48..52].copy_from_slice(&1u32.to_le_bytes());
    let mut entry = [0u8; 24];
    entry[8..16].copy_from_slice(&memory.to_le_bytes());
    entry[16..20].copy_from_slice(&1u32.to_le_bytes());
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    for (addr, bytes) in [
        (START_INFO, &info[..]),
        (MEMMAP, &entry[..]),
        (CMDLINE, &line),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| format!("PVH boot data at {addr:#x}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_guest_is_a_pvh_elf_at_code() {
        let elf = PvhElf::parse(GUEST_ELF).unwrap();
        assert_eq!(elf.segments[0].paddr, CODE);
        assert!(u64::from(elf.entry) > CODE);
    }

    #[test]
    fn damaged_elves_are_refused_naming_what() {
        let mut bad = GUEST_ELF.to_vec();
        bad[18] = 3;
        assert!(matches!(PvhElf::parse(&bad), Err(ElfError::Machine(3))));
        let e = PvhElf::parse(&GUEST_ELF[..100]).unwrap_err().to_string();
        assert!(e.contains("program header 0"), "{e}");
        // The note's type changed: no entry.
        let at = GUEST_ELF
            .windows(4)
            .position(|w| w == b"Xen\0")
            .expect("the note's name");
        let mut bad = GUEST_ELF.to_vec();
        bad[at - 4] = 17;
        assert!(matches!(PvhElf::parse(&bad), Err(ElfError::NoEntryNote)));
        assert!(matches!(
            PvhElf::parse(b"not an elf"),
            Err(ElfError::NotElf64)
        ));
    }

    #[test]
    fn the_command_line_names_every_parameter() {
        let c = VmConfig {
            memory: 16 << 20,
            vcpus: 2,
            dirty_rate: 8 << 20,
            pattern: WritePattern::Hotset(25),
            seed: 7,
            tracker: Default::default(),
        };
        assert_eq!(
            BootParams::of(&c, 2_500_000).cmdline(),
            "vcpus=2 rate=8388608 pattern=2 hot=25 seed=7 tsc_khz=2500000 zeroed=1"
        );
        let q = BootParams {
            tsc_khz: None,
            report_ms: Some(200),
            zeroed: false,
            ..BootParams::of(&c, 1)
        };
        assert_eq!(
            q.cmdline(),
            "vcpus=2 rate=8388608 pattern=2 hot=25 seed=7 report_ms=200"
        );
    }
}
