//! The guest program's ports: its output records for COLO (one 32-bit
//! `out` each to 0xea, [`parse_record`], format below), and its report
//! port: ASCII lines, written a byte at a time
//! (`out dx, al`, 8 bits) to one I/O port (`port=` on the command line,
//! default 0xe9: QEMU's `isa-debugcon`, so `-device
//! isa-debugcon,iobase=0xe9,chardev=C` puts them in a file). The vCPUs take
//! a lock in guest memory around each line, so lines do not interleave.
//! Numbers are unsigned decimal (u64) unless marked hex (`0x` and
//! lower-case digits). Each line ends with `\n`:
//!
//! ```text
//! ferry boot vcpu=N
//!     vCPU N (its initial APIC ID) set itself up and starts working
//! ferry progress vcpu=N writes=W verified=V errors=E maxgap_ticks=G [maxgap_us=U] gap_ticks=g [gap_us=u] [gap_end_tsc=T]
//!     every report_ms: vCPU N's counters (its status block in guest
//!     memory): pages written, pages verified, self-check failures, and
//!     the largest gap between two consecutive TSC reads of its loop, over
//!     its whole life (maxgap) and since its previous progress line (gap),
//!     in TSC ticks and in microseconds when the command line gave tsc_khz;
//!     the time a vCPU spends writing its own lines is not counted. The
//!     first line after a blackout (a pause, a migration's switchover)
//!     carries it in gap; gap_end_tsc is the vCPU's TSC when it ran again
//!     after the window's largest gap (0: no gap yet), so the gap spans
//!     [T - g, T] of the guest's clock (older guests omit it)
//! ferry error vcpu=N addr=0xADDR
//!     the self-check found a wrong word at guest physical ADDR (hex)
//! ferry fatal REASON
//!     the boot parameters were refused (REASON is free text); the BSP halts
//! ```
//!
//! A line that does not parse is ignored: a vCPU paused by a migration in
//! the middle of a line finishes it on the destination, whose VMM sees only
//! its tail.
//!
//! The gap is the blackout as the guest sees it in its own TSC. For a
//! pause and resume it is the pause. Across a migration it depends on the
//! TSC the destination gives the vCPU: ferry's VMM restores IA32_TSC with
//! the other MSRs (as QEMU does), which would hide the time before the
//! state's load, but KVM takes a restored TSC within a second of the new
//! VM's own as a synchronisation and lets it run on (then the gap is
//! close to the whole downtime: 73 ms against ferry's downtime_ms of 70 in
//! one run here). At least, it counts from the state's load to the vCPU's
//! next instruction.

/// Output records (COLO compares them as a real guest's packets; the
/// guest emits them only with `output_every=N`, N > 0): each is one
/// 32-bit `out dx, eax` to [`OUTPUT_PORT`] (0xea), after the vCPU stored
/// the record in its status block. The VMM reads it at that exit, while
/// the vCPU is stopped in it, so one exit is one whole record and a pause
/// never splits one:
///
/// ```text
/// the out's 4 bytes, little-endian u32:
///   bits 31..16  tag   RECORD_TAG (0xc010)
///   bits 15..0   vcpu  the emitting vCPU's index (must be the vCPU that
///                      exited: a record names its own vCPU only)
/// the vCPU's status block (STATUS + vcpu << STATUS_SHIFT), u64 each:
///   S_OUT_SEQ    (+144)  seq    the record's number, writes / output_every
///                               (from 1; 0 is malformed)
///   S_OUT_VALUE  (+152)  value  mix(writes, rng, cursor): a function of
///                               the vCPU's state only
/// ```
///
/// Anything else (another access size, a wrong tag or vCPU, a status
/// block outside memory, seq 0) is a [`RecordError`] naming the vCPU and
/// the field; the VMM stops the VM with it as a guest failure.
pub use crate::layout::{OUTPUT_PORT, RECORD_TAG};

/// A malformed output record: which vCPU's, which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("vCPU {vcpu}: malformed output record: {field}: {why}")]
pub struct RecordError {
    pub vcpu: usize,
    pub field: &'static str,
    pub why: String,
}

/// An output record as the port and the status block give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRecord {
    pub vcpu: u16,
    pub seq: u64,
    pub value: u64,
}

/// Parses the record vCPU `vcpu` gave with `data` (the `out`'s bytes);
/// `status(offset)` reads a u64 of its status block.
pub fn parse_record(
    vcpu: usize,
    data: &[u8],
    status: impl Fn(u64) -> Result<u64, String>,
) -> Result<PortRecord, RecordError> {
    let err = |field: &'static str, why: String| RecordError { vcpu, field, why };
    let word: [u8; 4] = data.try_into().map_err(|_| {
        err(
            "size",
            format!("a {}-byte write, not 4 (out dx, eax)", data.len()),
        )
    })?;
    let word = u32::from_le_bytes(word);
    let tag = u64::from(word >> 16);
    if tag != RECORD_TAG {
        return Err(err("tag", format!("{tag:#x}, not {RECORD_TAG:#x}")));
    }
    let named = usize::from(word as u16);
    if named != vcpu {
        return Err(err(
            "vcpu",
            format!("the record names vCPU {named}, but vCPU {vcpu} wrote it"),
        ));
    }
    let vcpu16 = u16::try_from(vcpu).map_err(|_| err("vcpu", format!("{vcpu} > 65535")))?;
    let seq = status(crate::layout::S_OUT_SEQ).map_err(|e| err("seq", e))?;
    if seq == 0 {
        return Err(err("seq", "0 (records count from 1)".into()));
    }
    let value = status(crate::layout::S_OUT_VALUE).map_err(|e| err("value", e))?;
    Ok(PortRecord {
        vcpu: vcpu16,
        seq,
        value,
    })
}

/// One parsed report line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortLine {
    Boot { vcpu: usize },
    Progress(Progress),
    Error { vcpu: usize, addr: u64 },
    Fatal(String),
}

/// A `progress` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub vcpu: usize,
    pub writes: u64,
    pub verified: u64,
    pub errors: u64,
    pub max_gap_ticks: u64,
    /// Present when the guest knows its TSC's frequency.
    pub max_gap_us: Option<u64>,
    /// The largest gap since the vCPU's previous progress line.
    pub gap_ticks: u64,
    pub gap_us: Option<u64>,
    /// The TSC that ended the window's largest gap, where the guest gives it.
    pub gap_end_tsc: Option<u64>,
}

/// Parses one line (without its `\n`); `None` if it is not a whole report.
pub fn parse_line(line: &str) -> Option<PortLine> {
    let rest = line.strip_prefix("ferry ")?;
    if let Some(reason) = rest.strip_prefix("fatal ") {
        return Some(PortLine::Fatal(reason.to_string()));
    }
    let mut words = rest.split(' ');
    let kind = words.next()?;
    let mut fields = Vec::new();
    for w in words {
        let (k, v) = w.split_once('=')?;
        fields.push((k, v));
    }
    let get = |key: &str| -> Option<&str> { fields.iter().find(|(k, _)| *k == key).map(|f| f.1) };
    let num = |key: &str| -> Option<u64> { get(key)?.parse().ok() };
    let vcpu = num("vcpu")? as usize;
    match kind {
        "boot" if fields.len() == 1 => Some(PortLine::Boot { vcpu }),
        "error" => {
            let addr = u64::from_str_radix(get("addr")?.strip_prefix("0x")?, 16).ok()?;
            Some(PortLine::Error { vcpu, addr })
        }
        "progress" => Some(PortLine::Progress(Progress {
            vcpu,
            writes: num("writes")?,
            verified: num("verified")?,
            errors: num("errors")?,
            max_gap_ticks: num("maxgap_ticks")?,
            max_gap_us: match get("maxgap_us") {
                Some(v) => Some(v.parse().ok()?),
                None => None,
            },
            gap_ticks: num("gap_ticks")?,
            gap_us: match get("gap_us") {
                Some(v) => Some(v.parse().ok()?),
                None => None,
            },
            gap_end_tsc: match get("gap_end_tsc") {
                Some(v) => Some(v.parse().ok()?),
                None => None,
            },
        })),
        _ => None,
    }
}

/// Collects a vCPU's port bytes into lines.
#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
}

/// A line longer than this is not the guest's: dropped.
const MAX_LINE: usize = 256;

impl LineBuffer {
    /// Adds one byte; returns the line it completed, if any.
    pub fn push(&mut self, byte: u8) -> Option<String> {
        if byte == b'\n' {
            let line = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            return Some(line);
        }
        if self.buf.len() < MAX_LINE {
            self.buf.push(byte);
        }
        None
    }
}

/// Every line of `text` that parses (a debugcon file, say).
pub fn parse_all(text: &str) -> Vec<PortLine> {
    text.lines().filter_map(parse_line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_malformed_ones_name_the_field() {
        let status = |off: u64| -> Result<u64, String> {
            match off {
                crate::layout::S_OUT_SEQ => Ok(7),
                crate::layout::S_OUT_VALUE => Ok(0xabc),
                o => Err(format!("offset {o}")),
            }
        };
        let word = |tag: u32, v: u32| ((tag << 16) | v).to_le_bytes();
        assert_eq!(
            parse_record(3, &word(0xc010, 3), status),
            Ok(PortRecord {
                vcpu: 3,
                seq: 7,
                value: 0xabc
            })
        );
        let field = |r: Result<PortRecord, RecordError>| r.unwrap_err().field;
        assert_eq!(field(parse_record(3, &[0x03], status)), "size");
        assert_eq!(field(parse_record(3, &word(0xc011, 3), status)), "tag");
        assert_eq!(field(parse_record(3, &word(0xc010, 2), status)), "vcpu");
        assert_eq!(field(parse_record(3, &word(0xc010, 3), |_| Ok(0))), "seq");
        let e = parse_record(1, &word(0xc010, 1), |off| {
            if off == crate::layout::S_OUT_SEQ {
                Ok(1)
            } else {
                Err("outside memory".into())
            }
        })
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "vCPU 1: malformed output record: value: outside memory"
        );
    }

    #[test]
    fn lines_parse_and_partial_ones_do_not() {
        assert_eq!(
            parse_line("ferry boot vcpu=3"),
            Some(PortLine::Boot { vcpu: 3 })
        );
        assert_eq!(
            parse_line("ferry error vcpu=0 addr=0x7fff010"),
            Some(PortLine::Error {
                vcpu: 0,
                addr: 0x7fff010
            })
        );
        assert_eq!(
            parse_line(
                "ferry progress vcpu=1 writes=10 verified=20 errors=0 maxgap_ticks=300 maxgap_us=4 gap_ticks=30 gap_us=0 gap_end_tsc=123456"
            ),
            Some(PortLine::Progress(Progress {
                vcpu: 1,
                writes: 10,
                verified: 20,
                errors: 0,
                max_gap_ticks: 300,
                max_gap_us: Some(4),
                gap_ticks: 30,
                gap_us: Some(0),
                gap_end_tsc: Some(123456),
            }))
        );
        assert_eq!(
            parse_line(
                "ferry progress vcpu=1 writes=10 verified=20 errors=0 maxgap_ticks=300 gap_ticks=3"
            )
            .and_then(|l| match l {
                PortLine::Progress(p) => p.max_gap_us,
                _ => Some(0),
            }),
            None
        );
        assert_eq!(
            parse_line("ferry fatal vcpus= must be 1 to 32"),
            Some(PortLine::Fatal("vcpus= must be 1 to 32".into()))
        );
        for bad in [
            "rogress vcpu=1 writes=10",
            "ferry progress vcpu=1 writes=10",
            "ferry boot vcpu=x",
            "ferry progress vcpu=1 writes=1 verified=1 errors=0 maxgap_ticks=3 gap_ticks=3 gap_end_tsc=x",
            "ferry error vcpu=0 addr=12",
            "",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
        let mut b = LineBuffer::default();
        let got: Vec<_> = b"ferry boot vcpu=0\nferry"
            .iter()
            .filter_map(|&c| b.push(c))
            .collect();
        assert_eq!(got, vec!["ferry boot vcpu=0".to_string()]);
    }
}
