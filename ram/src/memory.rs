//! A guest's memory: its RAM blocks, in order, with unique names.

use std::path::{Path, PathBuf};

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
}

impl GuestMemory {
    pub fn new(blocks: Vec<RamBlock>) -> Result<Self, RamError> {
        for (i, b) in blocks.iter().enumerate() {
            if blocks[..i].iter().any(|o| o.name() == b.name()) {
                return Err(RamError::DuplicateName(b.name().into()));
            }
        }
        Ok(Self { blocks })
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
