//! The micro-VM's device state: every vCPU's registers and the VM's KVM
//! clock, as one versioned binary blob (ferry carries it opaquely).
//!
//! Format, version 1 (all integers little-endian):
//!
//! ```text
//! header, 28 bytes:
//!   magic     8   "FERRYKVM"
//!   version   4   u32, 1
//!   vcpus     4   u32, 1..=32
//!   memory    8   u64, guest RAM bytes (the destination's must match)
//!   crc       4   crc32 (IEEE) of the 24 bytes above
//! then sections, in this order: for each vCPU 0..vcpus, the nine vCPU
//! sections regs, sregs, xsave, xcrs, msrs, lapic, events, mp_state,
//! debugregs; then the VM's clock. Each section:
//!   tag       2   u16: 1 regs, 2 sregs, 3 xsave, 4 xcrs, 5 msrs, 6 lapic,
//!                 7 events, 8 mp_state, 9 debugregs, 10 clock
//!   vcpu      2   u16: the vCPU index; 0xffff for the clock
//!   len       4   u32: payload bytes, fixed per tag (below)
//!   crc       4   crc32 of tag, vcpu, len and the payload
//!   payload   len bytes: the kernel's struct exactly as the KVM_GET_*
//!             ioctl filled it (x86-64 layout):
//!             regs       kvm_regs          144   KVM_GET_REGS
//!             sregs      kvm_sregs         312   KVM_GET_SREGS
//!             xsave      kvm_xsave        4096   KVM_GET_XSAVE (x87, SSE, AVX...)
//!             xcrs       kvm_xcrs          392   KVM_GET_XCRS
//!             msrs       kvm_msr_entry[N]  16 N  KVM_GET_MSRS over [`MSRS`], in
//!                                                that order (index u32,
//!                                                reserved u32, data u64)
//!             lapic      kvm_lapic_state  1024   KVM_GET_LAPIC
//!             events     kvm_vcpu_events    64   KVM_GET_VCPU_EVENTS
//!             mp_state   kvm_mp_state        4   KVM_GET_MP_STATE
//!             debugregs  kvm_debugregs     128   KVM_GET_DEBUGREGS
//!             clock      kvm_clock_data     48   KVM_GET_CLOCK
//! nothing after the clock.
//! ```
//!
//! A state is refused (before anything is loaded into a vCPU) if any of
//! that does not hold; the error names the field: `header`, `vCPU 1 sregs`,
//! `vCPU 0 msrs`, `clock`, `end`.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::error::StateError;
use crate::layout::MAX_VCPUS;

pub const MAGIC: &[u8; 8] = b"FERRYKVM";
pub const VERSION: u32 = 1;
const HEADER: usize = 28;
const SECTION_HEADER: usize = 12;
const CLOCK_VCPU: u16 = 0xffff;

/// The MSRs saved and restored, in this order (KVM_GET_MSRS must read all).
pub const MSRS: &[(u32, &str)] = &[
    (0x10, "IA32_TSC"),
    (0x174, "IA32_SYSENTER_CS"),
    (0x175, "IA32_SYSENTER_ESP"),
    (0x176, "IA32_SYSENTER_EIP"),
    (0x277, "IA32_PAT"),
    (0x1a0, "IA32_MISC_ENABLE"),
    (0xc000_0081, "STAR"),
    (0xc000_0082, "LSTAR"),
    (0xc000_0083, "CSTAR"),
    (0xc000_0084, "SFMASK"),
    (0xc000_0102, "KERNEL_GS_BASE"),
    (0x4b56_4d00, "KVM_WALL_CLOCK_NEW"),
    (0x4b56_4d01, "KVM_SYSTEM_TIME_NEW"),
];

/// The sections of one vCPU, in order, with their tags.
const VCPU_SECTIONS: [(u16, &str); 9] = [
    (1, "regs"),
    (2, "sregs"),
    (3, "xsave"),
    (4, "xcrs"),
    (5, "msrs"),
    (6, "lapic"),
    (7, "events"),
    (8, "mp_state"),
    (9, "debugregs"),
];
const CLOCK_TAG: u16 = 10;

/// One vCPU's state, as KVM reports it.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    /// One entry per [`MSRS`] item, in that order.
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        let mut xsave = Box::new(kvm_xsave::new_zeroed());
        xsave.region = self.xsave.region;
        Self {
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            msrs: self.msrs.clone(),
            lapic: self.lapic,
            events: self.events,
            mp_state: self.mp_state,
            debugregs: self.debugregs,
        }
    }
}

impl VcpuState {
    /// All zero (what a test or a loader starts from).
    pub fn zeroed() -> Self {
        Self {
            regs: kvm_regs::new_zeroed(),
            sregs: kvm_sregs::new_zeroed(),
            xsave: Box::new(kvm_xsave::new_zeroed()),
            xcrs: kvm_xcrs::new_zeroed(),
            msrs: MSRS
                .iter()
                .map(|&(index, _)| kvm_msr_entry {
                    index,
                    ..kvm_msr_entry::new_zeroed()
                })
                .collect(),
            lapic: kvm_lapic_state::new_zeroed(),
            events: kvm_vcpu_events::new_zeroed(),
            mp_state: kvm_mp_state::new_zeroed(),
            debugregs: kvm_debugregs::new_zeroed(),
        }
    }

    fn section(&self, tag: u16) -> &[u8] {
        match tag {
            1 => self.regs.as_bytes(),
            2 => self.sregs.as_bytes(),
            3 => self.xsave.as_bytes(),
            4 => self.xcrs.as_bytes(),
            5 => self.msrs.as_bytes(),
            6 => self.lapic.as_bytes(),
            7 => self.events.as_bytes(),
            8 => self.mp_state.as_bytes(),
            9 => self.debugregs.as_bytes(),
            _ => unreachable!("vCPU section tags are 1..=9"),
        }
    }
}

/// The whole VM's state.
#[derive(Clone)]
pub struct VmState {
    /// Guest RAM bytes.
    pub memory: u64,
    pub vcpus: Vec<VcpuState>,
    pub clock: kvm_clock_data,
}

/// A section's payload size, by tag.
fn section_len(tag: u16) -> usize {
    match tag {
        1 => size_of::<kvm_regs>(),
        2 => size_of::<kvm_sregs>(),
        3 => size_of::<kvm_xsave>(),
        4 => size_of::<kvm_xcrs>(),
        5 => size_of::<kvm_msr_entry>() * MSRS.len(),
        6 => size_of::<kvm_lapic_state>(),
        7 => size_of::<kvm_vcpu_events>(),
        8 => size_of::<kvm_mp_state>(),
        9 => size_of::<kvm_debugregs>(),
        CLOCK_TAG => size_of::<kvm_clock_data>(),
        _ => 0,
    }
}

impl VmState {
    /// The blob described in the module doc.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.vcpus.len() * 6500 + 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.memory.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        for (i, v) in self.vcpus.iter().enumerate() {
            for &(tag, _) in &VCPU_SECTIONS {
                put_section(&mut out, tag, i as u16, v.section(tag));
            }
        }
        put_section(&mut out, CLOCK_TAG, CLOCK_VCPU, self.clock.as_bytes());
        out
    }

    /// Parses and checks a blob; the error names the field that is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let header = "header";
        let h = bytes.get(..HEADER).ok_or(StateError::Truncated {
            field: header.into(),
            have: bytes.len(),
            need: HEADER,
        })?;
        if &h[..8] != MAGIC {
            return Err(invalid(
                header,
                format!(
                    "magic {:?}, expected \"FERRYKVM\"",
                    String::from_utf8_lossy(&h[..8])
                ),
            ));
        }
        let stored = u32::from_le_bytes(h[24..28].try_into().unwrap());
        let computed = crc32fast::hash(&h[..24]);
        if stored != computed {
            return Err(StateError::Crc {
                field: header.into(),
                stored,
                computed,
            });
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(invalid(
                "header version",
                format!("version {version}, this ferry reads {VERSION}"),
            ));
        }
        let vcpus = u32::from_le_bytes(h[12..16].try_into().unwrap());
        if vcpus == 0 || u64::from(vcpus) > MAX_VCPUS {
            return Err(invalid(
                "header vcpus",
                format!("{vcpus} vCPUs, expected 1..={MAX_VCPUS}"),
            ));
        }
        let memory = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let mut rest = &bytes[HEADER..];
        let mut states = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus as u16 {
            let mut v = VcpuState::zeroed();
            for &(tag, name) in &VCPU_SECTIONS {
                let field = format!("vCPU {i} {name}");
                let p = take_section(&mut rest, tag, i, &field)?;
                match tag {
                    1 => v.regs = read(p, &field)?,
                    2 => v.sregs = read(p, &field)?,
                    3 => v.xsave = Box::new(read(p, &field)?),
                    4 => v.xcrs = read(p, &field)?,
                    5 => v.msrs = read_msrs(p, &field)?,
                    6 => v.lapic = read(p, &field)?,
                    7 => v.events = read(p, &field)?,
                    8 => v.mp_state = read(p, &field)?,
                    _ => v.debugregs = read(p, &field)?,
                }
            }
            states.push(v);
        }
        let p = take_section(&mut rest, CLOCK_TAG, CLOCK_VCPU, "clock")?;
        let clock = read(p, "clock")?;
        if !rest.is_empty() {
            return Err(invalid(
                "end",
                format!("{} bytes after the clock", rest.len()),
            ));
        }
        Ok(Self {
            memory,
            vcpus: states,
            clock,
        })
    }
}

/// Whether `bytes` looks like a KVM micro-VM's state (its magic).
pub fn is_kvm_state(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

fn invalid(field: &str, what: String) -> StateError {
    StateError::Invalid {
        field: field.into(),
        what,
    }
}

fn put_section(out: &mut Vec<u8>, tag: u16, vcpu: u16, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&vcpu.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[start..]);
    h.update(payload);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Takes the next section, which must be `tag` of `vcpu`; returns its
/// payload after checking its length and crc.
fn take_section<'a>(
    rest: &mut &'a [u8],
    tag: u16,
    vcpu: u16,
    field: &str,
) -> Result<&'a [u8], StateError> {
    let h = rest.get(..SECTION_HEADER).ok_or(StateError::Truncated {
        field: field.into(),
        have: rest.len(),
        need: SECTION_HEADER,
    })?;
    let got_tag = u16::from_le_bytes([h[0], h[1]]);
    let got_vcpu = u16::from_le_bytes([h[2], h[3]]);
    let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let stored = u32::from_le_bytes(h[8..12].try_into().unwrap());
    if got_tag != tag || got_vcpu != vcpu {
        return Err(invalid(
            field,
            format!("found section tag {got_tag} of vCPU {got_vcpu} in its place"),
        ));
    }
    let want = section_len(tag);
    if len != want {
        return Err(invalid(field, format!("{len} bytes, the field is {want}")));
    }
    let payload = rest
        .get(SECTION_HEADER..SECTION_HEADER + len)
        .ok_or(StateError::Truncated {
            field: field.into(),
            have: rest.len() - SECTION_HEADER,
            need: len,
        })?;
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..8]);
    c.update(payload);
    let computed = c.finalize();
    if computed != stored {
        return Err(StateError::Crc {
            field: field.into(),
            stored,
            computed,
        });
    }
    *rest = &rest[SECTION_HEADER + len..];
    Ok(payload)
}

fn read<T: FromBytes>(payload: &[u8], field: &str) -> Result<T, StateError> {
    T::read_from_bytes(payload).map_err(|_| {
        invalid(
            field,
            format!("{} bytes, the field is {}", payload.len(), size_of::<T>()),
        )
    })
}

fn read_msrs(payload: &[u8], field: &str) -> Result<Vec<kvm_msr_entry>, StateError> {
    let entries = payload
        .chunks_exact(size_of::<kvm_msr_entry>())
        .map(|c| read::<kvm_msr_entry>(c, field))
        .collect::<Result<Vec<_>, _>>()?;
    for (e, &(index, name)) in entries.iter().zip(MSRS) {
        if e.index != index {
            return Err(invalid(
                field,
                format!("MSR {:#x} where {name} ({index:#x}) belongs", e.index),
            ));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vcpus: usize) -> VmState {
        let mut v = VcpuState::zeroed();
        v.regs.rip = 0x10_0042;
        v.regs.rflags = 2;
        v.sregs.cr0 = 0x8005_0033;
        v.msrs[0].data = 123_456_789;
        v.mp_state.mp_state = 0;
        let mut clock = kvm_clock_data::new_zeroed();
        clock.clock = 987_654_321;
        VmState {
            memory: 32 << 20,
            vcpus: vec![v; vcpus],
            clock,
        }
    }

    #[test]
    fn the_documented_sizes_hold() {
        for (tag, want) in [
            (1, 144),
            (2, 312),
            (3, 4096),
            (4, 392),
            (5, 16 * MSRS.len()),
            (6, 1024),
            (7, 64),
            (8, 4),
            (9, 128),
            (10, 48),
        ] {
            assert_eq!(section_len(tag), want, "tag {tag}");
        }
    }

    #[test]
    fn round_trips() {
        let s = sample(2);
        let bytes = s.encode();
        assert!(is_kvm_state(&bytes));
        let d = VmState::decode(&bytes).unwrap();
        assert_eq!(d.memory, s.memory);
        assert_eq!(d.vcpus.len(), 2);
        assert_eq!(d.vcpus[1].regs, s.vcpus[1].regs);
        assert_eq!(d.vcpus[1].sregs, s.vcpus[1].sregs);
        assert_eq!(d.vcpus[0].msrs[0].data, 123_456_789);
        assert_eq!(d.clock.clock, 987_654_321);
        assert_eq!(d.encode(), bytes);
    }

    /// The offset of vCPU `vcpu`'s section `tag`'s payload in the blob.
    fn payload_at(vcpu: usize, tag: u16) -> usize {
        let per_vcpu: usize = VCPU_SECTIONS
            .iter()
            .map(|&(t, _)| SECTION_HEADER + section_len(t))
            .sum();
        let before: usize = VCPU_SECTIONS
            .iter()
            .take_while(|&&(t, _)| t != tag)
            .map(|&(t, _)| SECTION_HEADER + section_len(t))
            .sum();
        HEADER + vcpu * per_vcpu + before + SECTION_HEADER
    }

    #[test]
    fn a_flipped_byte_is_refused_naming_its_field() {
        let bytes = sample(2).encode();
        for (vcpu, tag, name) in [
            (0, 2, "vCPU 0 sregs"),
            (1, 6, "vCPU 1 lapic"),
            (1, 5, "vCPU 1 msrs"),
        ] {
            let mut bad = bytes.clone();
            bad[payload_at(vcpu, tag) + 7] ^= 0x10;
            let e = VmState::decode(&bad).err().expect("refused").to_string();
            assert!(e.contains(name) && e.contains("crc"), "{e}");
        }
        let mut bad = bytes.clone();
        bad[13] ^= 1;
        let e = VmState::decode(&bad).err().unwrap().to_string();
        assert!(e.contains("header") && e.contains("crc"), "{e}");
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x80;
        let e = VmState::decode(&bad).err().unwrap().to_string();
        assert!(e.contains("clock"), "{e}");
    }

    #[test]
    fn truncated_or_padded_states_are_refused() {
        let bytes = sample(1).encode();
        let e = VmState::decode(&bytes[..20]).err().unwrap().to_string();
        assert!(e.contains("header") && e.contains("truncated"), "{e}");
        let cut = payload_at(0, 3) + 100;
        let e = VmState::decode(&bytes[..cut]).err().unwrap().to_string();
        assert!(e.contains("vCPU 0 xsave") && e.contains("truncated"), "{e}");
        let mut long = bytes.clone();
        long.push(0);
        let e = VmState::decode(&long).err().unwrap().to_string();
        assert!(e.contains("end"), "{e}");
        let e = VmState::decode(b"FERRYSAVxxxxxxxxxxxxxxxxxxxxxxxxxx")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("magic"), "{e}");
    }
}
