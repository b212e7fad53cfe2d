//! The guest: whatever ferry migrates. A VMM implements [`Guest`] over its
//! own memory, dirty log, vCPUs, devices and shared resources; ferry ships
//! the [`ImageGuest`] (a file's bytes as RAM, never running) and the
//! [`crate::SyntheticGuest`] (memory that worker threads keep writing).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ferry_ram::{DirtyLog, GuestMemory, RamError, DEFAULT_PAGE_SIZE};

use crate::Resources;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Ram(#[from] RamError),
    #[error("device state: {0}")]
    DeviceState(String),
    #[error("guest control: {0}")]
    Control(String),
    #[error("shared resources: {0}")]
    Resource(String),
}

/// What the controller needs of a guest.
pub trait Guest: Send + Sync {
    /// The guest's RAM blocks.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// Which pages the guest wrote since the last sync. `None`: the guest
    /// never writes its memory, so one pass moves it all.
    fn dirty_log(&self) -> Option<&dyn DirtyLog>;
    /// Stops the guest (its vCPUs); when this returns, memory no longer changes.
    fn pause(&self) -> Result<(), GuestError>;
    /// Lets the guest run again: on the source after a failed or cancelled
    /// migration, on the destination after a completed one.
    fn resume(&self) -> Result<(), GuestError>;
    fn is_running(&self) -> bool;
    /// The guest's device state, opaque to ferry. Called while paused.
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Loads a device state saved by `save_device_state` (on the
    /// destination, before resume).
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError>;
    /// Slows the guest's vCPUs by `percent` (auto-converge); 0 lifts it.
    fn set_throttle(&self, percent: u8);
    /// The shared resources and whether this side owns them.
    fn resources(&self) -> &Resources;
}

/// Builds the destination's guest from received memory and device state;
/// the guest comes back paused, its resources inactive.
pub type GuestBuilder =
    Arc<dyn Fn(Arc<GuestMemory>, &[u8]) -> Result<Box<dyn Guest>, GuestError> + Send + Sync>;

/// The default destination guest: a synthetic guest if the device state is
/// one's, else an image guest holding the memory and the state.
pub fn default_guest_builder() -> GuestBuilder {
    Arc::new(|memory, state| {
        if crate::synthetic::is_synthetic_state(state) {
            let g = crate::SyntheticGuest::from_device_state(
                memory,
                state,
                crate::TrackerKind::Bitmap,
                Resources::none(false),
            )?;
            Ok(Box::new(g) as Box<dyn Guest>)
        } else {
            let g =
                ImageGuest::from_memory(memory, Vec::new()).with_resources(Resources::none(false));
            g.pause()?;
            g.load_device_state(state)?;
            Ok(Box::new(g) as Box<dyn Guest>)
        }
    })
}

/// A guest that is only memory: a file's bytes, never writing them.
pub struct ImageGuest {
    memory: Arc<GuestMemory>,
    device_state: Mutex<Vec<u8>>,
    running: AtomicBool,
    resources: Resources,
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
        Ok(Self::from_memory(memory, device_state))
    }

    /// A running image guest over memory the caller built, owning no
    /// shared resources until [`ImageGuest::with_resources`].
    pub fn from_memory(memory: Arc<GuestMemory>, device_state: Vec<u8>) -> Self {
        Self {
            memory,
            device_state: Mutex::new(device_state),
            running: AtomicBool::new(true),
            resources: Resources::none(true),
        }
    }

    pub fn with_resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }
}

impl Guest for ImageGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
    fn dirty_log(&self) -> Option<&dyn DirtyLog> {
        None
    }
    fn pause(&self) -> Result<(), GuestError> {
        self.running.store(false, Ordering::Release);
        Ok(())
    }
    fn resume(&self) -> Result<(), GuestError> {
        self.running.store(true, Ordering::Release);
        Ok(())
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.device_state.lock().unwrap().clone())
    }
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        *self.device_state.lock().unwrap() = state.to_vec();
        Ok(())
    }
    fn set_throttle(&self, _percent: u8) {}
    fn resources(&self) -> &Resources {
        &self.resources
    }
}
