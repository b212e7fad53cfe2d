//! A guest's memory: its RAM blocks, in order, with unique names, laid out
//! in guest physical memory as a vm-memory `GuestMemoryMmap` (so a VMM that
//! holds one hands it over without a copy, and gets one back); and the
//! files that back them when memory is kept in files (made in place, or
//! staged under temporary names and moved into place once complete).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::{Digest, RamBlock, RamError};

/// What a block looks like, without its bytes: what a migration's setup
/// message carries so the destination can build the same layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockSpec {
    pub name: String,
    pub len: u64,
    pub page_size: u32,
}

pub struct GuestMemory {
    blocks: Vec<RamBlock>,
    /// The same mappings as vm-memory regions at the blocks' guest bases.
    layout: GuestMemoryMmap,
}

impl GuestMemory {
    /// Memory made of `blocks`, laid out one after another in guest
    /// physical memory from address 0, in order.
    pub fn new(blocks: Vec<RamBlock>) -> Result<Self, RamError> {
        let mut base = 0u64;
        let placed = blocks
            .into_iter()
            .map(|b| {
                let at = GuestAddress(base);
                base += b.len();
                b.at_guest_base(at)
            })
            .collect();
        Self::with_blocks(placed)
    }

    /// Memory over the regions of a VMM's `GuestMemoryMmap`, shared (the
    /// mappings are the VMM's, not copies), each a block named by its
    /// guest address (`ram@0x100000`) with `page_size` pages.
    pub fn from_guest_memory_mmap(
        memory: &GuestMemoryMmap,
        page_size: u32,
    ) -> Result<Self, RamError> {
        let blocks = memory
            .iter()
            .map(|r| {
                let base = r.start_addr();
                RamBlock::from_region(
                    &format!("ram@{:#x}", base.raw_value()),
                    page_size,
                    r.get_mmap(),
                    base,
                )
            })
            .collect::<Result<_, _>>()?;
        Self::with_blocks(blocks)
    }

    fn with_blocks(blocks: Vec<RamBlock>) -> Result<Self, RamError> {
        for (i, b) in blocks.iter().enumerate() {
            if blocks[..i].iter().any(|o| o.name() == b.name()) {
                return Err(RamError::DuplicateName(b.name().into()));
            }
        }
        let regions = blocks
            .iter()
            .map(|b| {
                GuestRegionMmap::with_arc(Arc::clone(b.region()), b.guest_base())
                    .map(Arc::new)
                    .ok_or_else(|| RamError::GuestLayout(b.name().into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let layout = GuestMemoryMmap::from_arc_regions(regions).map_err(|_| {
            RamError::GuestLayout(
                blocks
                    .iter()
                    .map(|b| b.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
        Ok(Self { blocks, layout })
    }

    /// The memory as vm-memory's `GuestMemoryMmap`: the same mappings (no
    /// copy), one region per block at its guest base.
    pub fn guest_memory_mmap(&self) -> &GuestMemoryMmap {
        &self.layout
    }

    /// Fresh zeroed anonymous memory with the given layout.
    pub fn anonymous(specs: &[BlockSpec]) -> Result<Self, RamError> {
        Self::new(
            specs
                .iter()
                .map(|s| RamBlock::anonymous(&s.name, s.len, s.page_size))
                .collect::<Result<_, _>>()?,
        )
    }

    /// Like [`GuestMemory::anonymous`], in base pages only (no transparent
    /// huge pages): what a kernel dirty log needs to track 4 KiB pages.
    pub fn anonymous_base_pages(specs: &[BlockSpec]) -> Result<Self, RamError> {
        Self::new(
            specs
                .iter()
                .map(|s| RamBlock::anonymous_base_pages(&s.name, s.len, s.page_size))
                .collect::<Result<_, _>>()?,
        )
    }

    /// One block whose bytes are the file's (an image guest's RAM).
    pub fn from_file(
        name: &str,
        path: &Path,
        page_size: u32,
        writable: bool,
    ) -> Result<Self, RamError> {
        Self::new(vec![RamBlock::file(name, path, page_size, writable, None)?])
    }

    /// A layout with one block per spec, each backed by a new sparse file
    /// at [`block_file_paths`]`(specs, path)`.
    pub fn create_files(specs: &[BlockSpec], path: &Path) -> Result<Self, RamError> {
        let blocks = specs
            .iter()
            .zip(block_file_paths(specs, path)?)
            .map(|(s, p)| RamBlock::file(&s.name, &p, s.page_size, true, Some(s.len)))
            .collect::<Result<_, _>>()?;
        Self::new(blocks)
    }

    /// Like [`GuestMemory::create_files`], for a path where a file may
    /// already lie: each block's file is made new (never opened through a
    /// symbolic link, never truncating anything) under a hidden temporary
    /// name beside its final path ([`block_file_paths`]), and moved there
    /// only by [`StagedFiles::commit`]; dropped before that, the temporary
    /// files are removed. So whatever lies at the final paths is untouched
    /// until the memory is complete, and then replaced whole. A symbolic
    /// link, directory, FIFO, device or socket at a final path is refused
    /// before anything is made.
    pub fn create_files_staged(
        specs: &[BlockSpec],
        path: &Path,
    ) -> Result<(Self, StagedFiles), RamError> {
        let finals = block_file_paths(specs, path)?;
        for f in &finals {
            crate::mapped::check_output_path(
                f,
                "choose a path where nothing is, or a regular file to replace",
            )?;
        }
        let mut staged = StagedFiles {
            pending: Vec::with_capacity(finals.len()),
        };
        let mut blocks = Vec::with_capacity(specs.len());
        for (s, f) in specs.iter().zip(finals) {
            let tmp = create_temporary(&f, s.len)?;
            staged.pending.push((tmp.clone(), f));
            blocks.push(RamBlock::file(&s.name, &tmp, s.page_size, true, None)?);
        }
        Ok((Self::new(blocks)?, staged))
    }

    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }
    pub fn block(&self, index: usize) -> Option<&RamBlock> {
        self.blocks.get(index)
    }
    pub fn find(&self, name: &str) -> Option<(usize, &RamBlock)> {
        self.blocks
            .iter()
            .enumerate()
            .find(|(_, b)| b.name() == name)
    }
    pub fn specs(&self) -> Vec<BlockSpec> {
        self.blocks
            .iter()
            .map(|b| BlockSpec {
                name: b.name().into(),
                len: b.len(),
                page_size: b.page_size(),
            })
            .collect()
    }
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(RamBlock::len).sum()
    }
    pub fn total_pages(&self) -> u64 {
        self.blocks.iter().map(RamBlock::pages).sum()
    }

    /// The digest of every block's name, length and bytes.
    pub fn digest(&self) -> Digest {
        Digest::of_memory(self)
    }
}

/// RAM files written under temporary names (see
/// [`GuestMemory::create_files_staged`]): moved to their final paths by
/// [`StagedFiles::commit`], removed if dropped before.
pub struct StagedFiles {
    /// (temporary path, final path) of each file not moved yet.
    pending: Vec<(PathBuf, PathBuf)>,
}

impl StagedFiles {
    /// The final paths, in block order.
    pub fn final_paths(&self) -> Vec<PathBuf> {
        self.pending.iter().map(|(_, f)| f.clone()).collect()
    }

    /// Moves every file to its final path (replacing what lies there, in
    /// one rename each). If a rename fails, the files not moved yet are
    /// removed; the ones before stay moved.
    pub fn commit(mut self) -> Result<(), RamError> {
        while !self.pending.is_empty() {
            let (tmp, fin) = self.pending.remove(0);
            if let Err(source) = std::fs::rename(&tmp, &fin) {
                let _ = std::fs::remove_file(&tmp);
                return Err(RamError::PathIo {
                    path: fin,
                    what: "moving the finished RAM file into place",
                    source,
                });
            }
        }
        Ok(())
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (tmp, _) in self.pending.drain(..) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Makes a new sparse file of `len` bytes beside `final_path`, under a
/// hidden name of its own (`.NAME.incomplete-PID-N`), and returns its path.
fn create_temporary(final_path: &Path, len: u64) -> Result<PathBuf, RamError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = final_path
        .file_name()
        .map_or_else(|| "ram".into(), |n| n.to_string_lossy().into_owned());
    let io = |path: &Path, what, source| RamError::PathIo {
        path: path.into(),
        what,
        source,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp =
            final_path.with_file_name(format!(".{name}.incomplete-{}-{n}", std::process::id()));
        let made = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp);
        match made {
            Ok(f) => {
                if let Err(e) = f.set_len(len) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(io(&tmp, "sizing a new RAM file", e));
                }
                return Ok(tmp);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 100 => continue,
            Err(e) => return Err(io(final_path, "creating a RAM file beside this path", e)),
        }
    }
}

/// Where [`GuestMemory::create_files`] keeps each block of `specs`: with
/// one block, `path` itself; with more, `path` with `.NAME` appended, where
/// NAME is the block's name with every character other than ASCII letters,
/// digits, `.`, `_` and `-` replaced by `_` (block names come from the
/// wire or a file and may hold `/`, as QEMU's `0000:00:02.0/vga.vram`
/// does). So every file lies beside `path` and starts with its name. Two
/// names that come out the same are refused.
pub fn block_file_paths(specs: &[BlockSpec], path: &Path) -> Result<Vec<PathBuf>, RamError> {
    if specs.len() == 1 {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut paths: Vec<PathBuf> = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let safe: String = s
            .name
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => c,
                _ => '_',
            })
            .collect();
        let mut name = path.as_os_str().to_os_string();
        name.push(".");
        name.push(&safe);
        let p = PathBuf::from(name);
        if let Some(j) = paths.iter().position(|q| *q == p) {
            return Err(RamError::SharedFile {
                first: specs[j].name.clone(),
                second: specs[i].name.clone(),
                path: p,
            });
        }
        paths.push(p);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> BlockSpec {
        BlockSpec {
            name: name.into(),
            len: 4096,
            page_size: 4096,
        }
    }

    fn hidden_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    /// Staged RAM files leave what lies at their paths alone until commit,
    /// then replace it whole; dropped uncommitted, they leave nothing.
    #[test]
    fn staged_files_replace_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vm.ram");
        std::fs::write(&out, b"old contents").unwrap();
        let specs = [BlockSpec {
            name: "ram".into(),
            len: 1 << 20,
            page_size: 4096,
        }];
        let (mem, staged) = GuestMemory::create_files_staged(&specs, &out).unwrap();
        mem.blocks()[0].zero_page(0);
        // SAFETY: page 3 lies inside the block's writable mapping.
        unsafe { *mem.blocks()[0].page_addr(3).unwrap() = 7 };
        assert_eq!(std::fs::read(&out).unwrap(), b"old contents");
        assert_eq!(hidden_files(dir.path()).len(), 1);
        drop(staged);
        assert_eq!(std::fs::read(&out).unwrap(), b"old contents");
        assert!(hidden_files(dir.path()).is_empty());
        drop(mem);

        let (mem, staged) = GuestMemory::create_files_staged(&specs, &out).unwrap();
        // SAFETY: as above.
        unsafe { *mem.blocks()[0].page_addr(3).unwrap() = 7 };
        staged.commit().unwrap();
        drop(mem);
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(bytes[3 * 4096], 7);
        assert!(hidden_files(dir.path()).is_empty());
    }

    /// A symbolic link at the path is refused, and its target untouched.
    #[test]
    fn staged_files_refuse_a_symbolic_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("vm.ram");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = GuestMemory::create_files_staged(&[spec("ram")], &link)
            .err()
            .expect("refused")
            .to_string();
        assert!(
            e.contains("vm.ram is a symbolic link, not a regular file"),
            "{e}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(hidden_files(dir.path()).is_empty());
    }

    #[test]
    fn block_files_stay_beside_the_path_and_never_share_one() {
        let base = Path::new("/d/vm.ram");
        assert_eq!(
            block_file_paths(&[spec("../../etc/x")], base).unwrap(),
            [PathBuf::from("/d/vm.ram")],
            "one block: the path itself"
        );
        let paths = block_file_paths(
            &[spec("pc.ram"), spec("../../etc/passwd"), spec("a b")],
            base,
        )
        .unwrap();
        assert_eq!(
            paths,
            [
                PathBuf::from("/d/vm.ram.pc.ram"),
                PathBuf::from("/d/vm.ram..._.._etc_passwd"),
                PathBuf::from("/d/vm.ram.a_b"),
            ]
        );
        assert!(paths.iter().all(|p| p.parent() == Some(Path::new("/d"))));
        let e = block_file_paths(&[spec("a/b"), spec("a_b")], base).unwrap_err();
        assert!(
            e.to_string().contains("'a/b' and 'a_b'") && e.to_string().contains("vm.ram.a_b"),
            "{e}"
        );
    }
}
