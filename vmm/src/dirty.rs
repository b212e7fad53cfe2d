//! KVM's dirty log as ferry's [`DirtyLog`]: KVM_GET_DIRTY_LOG per memory
//! slot (one slot per RAM block), each bit a 4 KiB page, ORed into the
//! pass's bitmaps. The kernel returns and clears the slot's bitmap in one
//! ioctl and write-protects the pages again, so a write after a sync shows
//! in the next one.

use std::sync::Arc;

use ferry_ram::{DirtyLog, PageBitmap, RamError};
use kvm_ioctls::VmFd;

use crate::vm::Slot;

pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<Slot>,
}

impl KvmDirtyLog {
    pub(crate) fn new(vm: Arc<VmFd>, slots: Vec<Slot>) -> Self {
        Self { vm, slots }
    }

    fn fetch(&self, slot: &Slot) -> Result<Vec<u64>, RamError> {
        self.vm
            .get_dirty_log(slot.slot, slot.len as usize)
            .map_err(|e| RamError::DirtyLog {
                tracker: "kvm-log",
                block: format!("slot {}", slot.slot),
                what: "KVM_GET_DIRTY_LOG".into(),
                source: std::io::Error::from_raw_os_error(e.errno()),
            })
    }
}

impl DirtyLog for KvmDirtyLog {
    fn name(&self) -> &'static str {
        "kvm-log"
    }

    /// Slots are registered with KVM_MEM_LOG_DIRTY_PAGES from the start:
    /// starting drops what the log gathered so far.
    fn start(&self) -> Result<(), RamError> {
        for s in &self.slots {
            self.fetch(s)?;
        }
        Ok(())
    }

    fn sync(&self, into: &[PageBitmap]) -> Result<u64, RamError> {
        let mut dirty = 0;
        for s in &self.slots {
            let words = self.fetch(s)?;
            let Some(pass) = into.get(s.block) else {
                continue;
            };
            for (w, &bits) in words.iter().enumerate() {
                let first = w as u64 * 64;
                if bits == 0 || first >= s.pages {
                    continue;
                }
                let left = s.pages - first;
                let bits = if left < 64 {
                    bits & ((1u64 << left) - 1)
                } else {
                    bits
                };
                pass.or_word(w, bits);
                dirty += u64::from(bits.count_ones());
            }
        }
        Ok(dirty)
    }

    /// The slots keep logging (it costs write faults only after a sync).
    fn stop(&self) -> Result<(), RamError> {
        Ok(())
    }

    /// KVM sees the guest's writes itself.
    fn mark(&self, _block: usize, _page: u64) {}
}
