//! A guest's memory: its RAM blocks, in order, with unique names.

use std::path::Path;

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

    /// A layout with one block per spec, each backed by a new sparse file.
    /// With one block the file is `path` itself; with more, `path.NAME`.
    pub fn create_files(specs: &[BlockSpec], path: &Path) -> Result<Self, RamError> {
        let blocks = specs
            .iter()
            .map(|s| {
                let p = if specs.len() == 1 {
                    path.to_path_buf()
                } else {
                    path.with_extension(&s.name)
                };
                RamBlock::file(&s.name, &p, s.page_size, true, Some(s.len))
            })
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
