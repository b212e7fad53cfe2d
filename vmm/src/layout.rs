//! The micro-VM's guest physical memory layout and the guest program's
//! parameter and status blocks: the one place both sides read them from.
//! `build.rs` includes this file and hands every constant in
//! [`ASM_SYMBOLS`] to the assembler (`--defsym`) and the linker script's
//! load address, so `guest/guest.S` and the VMM cannot disagree.
//!
//! ```text
//! 0x0000_0500  the VMM's flat 32-bit GDT for the PVH entry (null, code
//!              0x08, data 0x10, TSS 0x18); the guest loads its own
//! 0x0000_1000  the APs' real-mode start: the BSP copies it here from the
//!              program before it sends SIPI (vector TRAMPOLINE >> 12)
//! 0x0000_7000  PVH boot data, written by ferry's VMM: hvm_start_info, its
//!              memory map, the command line (see pvh.rs). Other loaders
//!              put theirs elsewhere (Firecracker and Cloud Hypervisor at
//!              0x6000, 0x7000 and 0x20000, QEMU's below 0xa0000); the
//!              guest writes nothing below 0x8000 (but the trampoline) nor
//!              in 0x10000..0x40000 before it has read them
//! 0x0000_8000  parameters (written by the guest's BSP from the command
//!              line before the other vCPUs start, read-only after)
//! 0x0000_9000  status: one 256-byte block per vCPU (the guest's counters)
//! 0x0000_b000  PML4          0xc000 PDPT          0xd000..0x10fff 4 PDs
//!              (built by the guest: identity map of the first 4 GiB in
//!              2 MiB pages, 3..4 GiB uncached)
//! 0x0004_0000  stacks: 4 KiB per vCPU
//! 0x0010_0000  the guest program, an ELF loaded at its physical address
//!              (at most 64 KiB; at 1 MiB, where Firecracker's and Cloud
//!              Hypervisor's loaders want a kernel)
//! 0x0011_0000  generation table: one u32 per 4 KiB page of RAM
//! WORK_START   the work area (2 MiB aligned, to the end of RAM): the pages
//!              the vCPUs write and verify, split evenly between vCPUs
//! ```

/// The guest's page size: every write fills one page.
pub const PAGE: u64 = 4096;
pub const GDT: u64 = 0x500;
/// Where the APs start (real mode, page aligned, below 1 MiB).
pub const TRAMPOLINE: u64 = 0x1000;
pub const PML4: u64 = 0xb000;
pub const PDPT: u64 = 0xc000;
pub const PD: u64 = 0xd000;
/// Page directories (1 GiB each) the identity map covers.
pub const PDS: u64 = 4;
/// Where ferry's VMM writes the PVH `hvm_start_info`, its memory map and
/// the command line (pvh.rs).
pub const START_INFO: u64 = 0x7000;
pub const MEMMAP: u64 = 0x7040;
pub const CMDLINE: u64 = 0x7100;
/// The command line's room, its NUL included.
pub const CMDLINE_MAX: u64 = 0x8000 - CMDLINE;
pub const PARAMS: u64 = 0x8000;
pub const STATUS: u64 = 0x9000;
/// log2 of a status block's size (256 bytes).
pub const STATUS_SHIFT: u64 = 8;
pub const CODE: u64 = 0x10_0000;
pub const CODE_MAX: u64 = 0x1_0000;
pub const STACKS: u64 = 0x4_0000;
pub const TABLE: u64 = 0x11_0000;
/// At most this many vCPUs (status blocks and stacks are sized for it).
pub const MAX_VCPUS: u64 = 32;
/// Guest RAM must stay below KVM's TSS and identity map pages (just under
/// 4 GiB) and within the identity map; the guest uses at most this much of
/// a larger RAM region.
pub const MAX_MEMORY: u64 = 3 << 30;
pub const MIN_MEMORY: u64 = 4 << 20;

// Parameters (u64 each, at PARAMS + offset; the guest's BSP fills them from
// the command line, pvh.rs documents the keys).
pub const P_MAGIC: u64 = 0;
pub const P_VCPUS: u64 = 8;
/// Guest physical address of the work area's first page.
pub const P_WORK_START: u64 = 16;
/// Pages in the work area.
pub const P_WORK_PAGES: u64 = 24;
pub const P_TABLE: u64 = 32;
/// TSC ticks between two page writes of one vCPU; 0: as fast as it can.
pub const P_TSC_PER_WRITE: u64 = 40;
/// 0 random, 1 sequential, 2 hot set (`P_HOT_PCT` percent of each slice).
pub const P_PATTERN: u64 = 48;
pub const P_HOT_PCT: u64 = 56;
pub const P_SEED: u64 = 64;
/// Bytes per second the whole guest writes (`rate=`).
pub const P_RATE: u64 = 72;
/// The TSC's frequency in kHz (`tsc_khz=`), 0 if not given.
pub const P_TSC_KHZ: u64 = 80;
/// The report port (`port=`).
pub const P_PORT: u64 = 88;
/// Milliseconds between two progress lines of a vCPU (`report_ms=`).
pub const P_REPORT_MS: u64 = 96;
/// The same in TSC ticks (0: no progress lines).
pub const P_REPORT_TICKS: u64 = 104;
/// 1: RAM above 1 MiB is already zero, the BSP need not clear it.
pub const P_ZEROED: u64 = 112;
/// The RAM the guest uses (the end of the RAM region holding `TABLE`,
/// at most `MAX_MEMORY`, 2 MiB aligned).
pub const P_MEMORY: u64 = 120;
/// The report lock (a u32 taken with `xchg`): one line at a time.
pub const P_PRINT_LOCK: u64 = 128;
/// Each vCPU emits an output record every this many page writes
/// (`output_every=`; 0, the default: none). See [`crate::port`].
pub const P_OUTPUT_EVERY: u64 = 136;
/// "FERRYVM2" little-endian.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"FERRYVM2");

// Status block fields (u64 each, at STATUS + vcpu << STATUS_SHIFT + offset).
/// Pages written.
pub const S_WRITES: u64 = 0;
/// The largest gap seen between two consecutive TSC reads (ticks), the
/// time the guest spent in its own reports left out.
pub const S_MAX_GAP: u64 = 8;
pub const S_LAST_TSC: u64 = 16;
/// Pages verified.
pub const S_VERIFIED: u64 = 24;
/// Verification failures.
pub const S_ERRORS: u64 = 32;
/// Address of the first word that failed verification (0: none).
pub const S_FIRST_ERROR: u64 = 40;
pub const S_RNG: u64 = 48;
pub const S_CURSOR: u64 = 56;
pub const S_VCURSOR: u64 = 64;
pub const S_NEXT_DUE: u64 = 72;
/// This vCPU's slice: first page (index in the work area) and page count.
pub const S_SLICE_FIRST: u64 = 80;
pub const S_SLICE_PAGES: u64 = 88;
/// Pages the pattern picks from (the slice, or its hot set).
pub const S_PICK_PAGES: u64 = 96;
/// 1 once the vCPU has set itself up.
pub const S_BOOTED: u64 = 104;
/// The vCPU's index (its initial APIC ID).
pub const S_INDEX: u64 = 112;
/// The TSC at which the next progress line is due.
pub const S_NEXT_REPORT: u64 = 120;
/// The largest gap between two consecutive TSC reads since the last
/// progress line (ticks; reset by each line): the line that follows a
/// blackout carries it.
pub const S_WINDOW_GAP: u64 = 128;
/// The TSC read that ended the window's largest gap (the guest's clock
/// when it ran again after it), for placing the gap on a timeline.
pub const S_WINDOW_GAP_END: u64 = 136;
/// The number of the vCPU's latest output record (writes / output_every),
/// written before the record's `out` (port.rs).
pub const S_OUT_SEQ: u64 = 144;
/// The latest output record's value, derived from the vCPU's own state.
pub const S_OUT_VALUE: u64 = 152;

/// The report port when the command line names none (QEMU's isa-debugcon).
pub const DEFAULT_PORT: u64 = 0xe9;
/// The port output records go to (one 32-bit `out` per record, port.rs);
/// nothing sits there under QEMU, which drops the writes.
pub const OUTPUT_PORT: u64 = 0xea;
/// The upper 16 bits of an output record's 32-bit `out`.
pub const RECORD_TAG: u64 = 0xc010;

/// Where the work area starts for `memory` bytes of RAM: after a table of
/// one u32 per page of RAM, rounded up to 2 MiB.
pub const fn work_start(memory: u64) -> u64 {
    let end = TABLE + memory / PAGE * 4;
    (end + (2 << 20) - 1) & !((2 << 20) - 1)
}

/// The symbols `guest/guest.S` uses, as `build.rs` defines them.
pub const ASM_SYMBOLS: &[(&str, u64)] = &[
    ("PAGE", PAGE),
    ("TRAMPOLINE", TRAMPOLINE),
    ("PML4", PML4),
    ("PDPT", PDPT),
    ("PD", PD),
    ("PDS", PDS),
    ("PARAMS", PARAMS),
    ("STATUS", STATUS),
    ("STATUS_SHIFT", STATUS_SHIFT),
    ("CODE", CODE),
    ("STACKS", STACKS),
    ("TABLE", TABLE),
    ("MAX_VCPUS", MAX_VCPUS),
    ("MAX_MEMORY", MAX_MEMORY),
    ("DEFAULT_PORT", DEFAULT_PORT),
    ("PARAMS_MAGIC", PARAMS_MAGIC),
    ("P_MAGIC", P_MAGIC),
    ("P_VCPUS", P_VCPUS),
    ("P_WORK_START", P_WORK_START),
    ("P_WORK_PAGES", P_WORK_PAGES),
    ("P_TABLE", P_TABLE),
    ("P_TSC_PER_WRITE", P_TSC_PER_WRITE),
    ("P_PATTERN", P_PATTERN),
    ("P_HOT_PCT", P_HOT_PCT),
    ("P_SEED", P_SEED),
    ("P_RATE", P_RATE),
    ("P_TSC_KHZ", P_TSC_KHZ),
    ("P_PORT", P_PORT),
    ("P_REPORT_MS", P_REPORT_MS),
    ("P_REPORT_TICKS", P_REPORT_TICKS),
    ("P_ZEROED", P_ZEROED),
    ("P_MEMORY", P_MEMORY),
    ("P_PRINT_LOCK", P_PRINT_LOCK),
    ("P_OUTPUT_EVERY", P_OUTPUT_EVERY),
    ("OUTPUT_PORT", OUTPUT_PORT),
    ("RECORD_TAG", RECORD_TAG),
    ("S_WRITES", S_WRITES),
    ("S_MAX_GAP", S_MAX_GAP),
    ("S_LAST_TSC", S_LAST_TSC),
    ("S_VERIFIED", S_VERIFIED),
    ("S_ERRORS", S_ERRORS),
    ("S_FIRST_ERROR", S_FIRST_ERROR),
    ("S_RNG", S_RNG),
    ("S_CURSOR", S_CURSOR),
    ("S_VCURSOR", S_VCURSOR),
    ("S_NEXT_DUE", S_NEXT_DUE),
    ("S_SLICE_FIRST", S_SLICE_FIRST),
    ("S_SLICE_PAGES", S_SLICE_PAGES),
    ("S_PICK_PAGES", S_PICK_PAGES),
    ("S_BOOTED", S_BOOTED),
    ("S_INDEX", S_INDEX),
    ("S_NEXT_REPORT", S_NEXT_REPORT),
    ("S_WINDOW_GAP", S_WINDOW_GAP),
    ("S_WINDOW_GAP_END", S_WINDOW_GAP_END),
    ("S_OUT_SEQ", S_OUT_SEQ),
    ("S_OUT_VALUE", S_OUT_VALUE),
];
