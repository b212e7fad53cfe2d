//! The guest: whatever ferry migrates. A VMM implements [`Guest`] over its
//! own memory and devices; ferry ships the [`ImageGuest`], whose RAM is a
//! file's bytes (a paused VM's RAM file, or a dataset from `ferry gen`).

use std::path::Path;
use std::sync::Arc;

use ferry_ram::{GuestMemory, RamError, DEFAULT_PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("device state: {0}")]
    DeviceState(String),
    #[error("guest control: {0}")]
    Control(String),
}

/// What the controller needs of a guest.
pub trait Guest: Send + Sync {
    /// The guest's RAM blocks.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// Stops the guest (its vCPUs) so memory no longer changes.
    fn pause(&self) -> Result<(), GuestError>;
    /// Lets the guest run again: on the source after a failed or cancelled
    /// migration, on the destination after a completed one.
    fn resume(&self) -> Result<(), GuestError>;
    /// The guest's device state, opaque to ferry.
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError>;
}

/// A guest that is only memory: a file's bytes, never running.
pub struct ImageGuest {
    memory: Arc<GuestMemory>,
    device_state: Vec<u8>,
}

/// The name of an image guest's single RAM block.
pub const IMAGE_BLOCK: &str = "ram";

impl ImageGuest {
    /// Maps `path` read-only as the guest's RAM. Without `device_state`,
    /// the guest's device state is a short text describing the image.
    pub fn open(path: &Path, device_state: Option<Vec<u8>>) -> Result<Self, GuestError> {
        let memory = Arc::new(GuestMemory::from_file(
            IMAGE_BLOCK,
            path,
            DEFAULT_PAGE_SIZE,
            false,
        )?);
        let device_state = device_state.unwrap_or_else(|| {
            format!(
                "ferry image guest\nram: {}\nbytes: {}\n",
                path.display(),
                memory.total_bytes()
            )
            .into_bytes()
        });
        Ok(Self {
            memory,
            device_state,
        })
    }

    /// An image guest over memory the caller built.
    pub fn from_memory(memory: Arc<GuestMemory>, device_state: Vec<u8>) -> Self {
        Self {
            memory,
            device_state,
        }
    }
}

impl Guest for ImageGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
    fn pause(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.device_state.clone())
    }
}
