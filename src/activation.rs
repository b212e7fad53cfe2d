//! Who owns a guest's shared resources (disks, locks): tracked in ONE place.
//!
//! Following the rule of QEMU's block-activation rework (seed 000's commit
//! message): one flag says whether this side holds the resources, every
//! change goes through [`Resources::activate`] / [`Resources::inactivate`],
//! inactivating what is already inactive is a no-op (never twice), and the
//! controller's single cleanup path reactivates them on the source after a
//! failed or cancelled switchover. A destination starts inactive and
//! activates only when it resumes a completed migration.
//!
//! The resources ferry's own guests hold are lock files: activation takes an
//! exclusive `flock` on each (failing if another owner holds it),
//! inactivation releases it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::GuestError;

struct Lock {
    path: PathBuf,
    file: Option<File>,
}

struct State {
    active: bool,
    locks: Vec<Lock>,
    activations: u64,
    inactivations: u64,
}

/// A guest's shared resources and whether this side owns them.
pub struct Resources {
    state: Mutex<State>,
}

impl Resources {
    /// Resources made of the given lock files, owned (`active`) or not.
    pub fn new(lock_files: &[PathBuf], active: bool) -> Result<Self, GuestError> {
        let r = Self {
            state: Mutex::new(State {
                active: false,
                locks: lock_files
                    .iter()
                    .map(|p| Lock {
                        path: p.clone(),
                        file: None,
                    })
                    .collect(),
                activations: 0,
                inactivations: 0,
            }),
        };
        if active {
            r.activate()?;
        }
        Ok(r)
    }

    /// No lock files; owned (`active`) or not.
    pub fn none(active: bool) -> Self {
        Self::new(&[], active).expect("no locks to take")
    }

    pub fn is_active(&self) -> bool {
        self.state.lock().unwrap().active
    }

    /// Takes every resource unless this side already owns them. Returns
    /// whether anything changed.
    pub fn activate(&self) -> Result<bool, GuestError> {
        let mut s = self.state.lock().unwrap();
        if s.active {
            return Ok(false);
        }
        for i in 0..s.locks.len() {
            if let Err(e) = take_lock(&mut s.locks[i]) {
                for l in &mut s.locks[..i] {
                    l.file = None;
                }
                return Err(e);
            }
        }
        s.active = true;
        s.activations += 1;
        Ok(true)
    }

    /// Releases every resource unless they are already released (never
    /// twice). Returns whether anything changed.
    pub fn inactivate(&self) -> Result<bool, GuestError> {
        let mut s = self.state.lock().unwrap();
        if !s.active {
            return Ok(false);
        }
        for l in &mut s.locks {
            // Closing the file releases its flock.
            l.file = None;
        }
        s.active = false;
        s.inactivations += 1;
        Ok(true)
    }

    /// How many times the resources were taken and released.
    pub fn transitions(&self) -> (u64, u64) {
        let s = self.state.lock().unwrap();
        (s.activations, s.inactivations)
    }
}

fn take_lock(l: &mut Lock) -> Result<(), GuestError> {
    let file = open_lock_file(&l.path)?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(GuestError::Resource(format!(
            "lock file {} is held by another owner: {}",
            l.path.display(),
            std::io::Error::last_os_error()
        )));
    }
    l.file = Some(file);
    Ok(())
}

fn open_lock_file(path: &Path) -> Result<File, GuestError> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| GuestError::Resource(format!("lock file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_owner_and_never_twice() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("disk.lock");
        let src = Resources::new(std::slice::from_ref(&lock), true).unwrap();
        assert!(src.is_active());
        let dst = Resources::new(std::slice::from_ref(&lock), false).unwrap();
        assert!(dst.activate().is_err(), "the source still owns the lock");
        assert!(src.inactivate().unwrap());
        assert!(
            !src.inactivate().unwrap(),
            "a second inactivation is a no-op"
        );
        assert!(dst.activate().unwrap());
        assert!(!dst.activate().unwrap());
        assert!(src.activate().is_err(), "now the destination owns it");
        assert_eq!(src.transitions(), (1, 1));
        assert_eq!(dst.transitions(), (1, 0));
    }
}
