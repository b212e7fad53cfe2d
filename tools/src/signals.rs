//! Ctrl-C and SIGTERM while a migration or a save runs: the first signal
//! cancels it through the same path as the control socket's
//! `migrate-cancel` (the source guest runs on, the summary says
//! `cancelled`, the exit status is non-zero); a second one exits at once
//! with the shell's status for that signal (130 for SIGINT, 143 for
//! SIGTERM), as does a signal before there is anything to cancel.
//!
//! `main` calls [`install`] first thing for the commands that cancel, so no
//! signal ever meets the default action half way through their setup; and
//! for `bench`, which cancels nothing but must put back the system settings
//! it changed ([`before_exit`]) when a signal ends it.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry::{Progress, Status};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What the first signal cancels, once a command has something to cancel.
struct Watched {
    progress: Arc<Progress>,
    /// The progress has a status (a migration): while it is `none`,
    /// nothing has started (`recv` waiting for a source) and the first
    /// signal exits at once. A save's progress has none.
    has_status: bool,
    /// Removed before an immediate exit (a save's unfinished file).
    remove: Option<PathBuf>,
}

static WATCHED: Mutex<Option<Watched>> = Mutex::new(None);

/// Run before a signal ends the process (`ferry bench`: put back the
/// system settings it changed for the measurement).
static BEFORE_EXIT: Mutex<Option<fn()>> = Mutex::new(None);

/// Has `f` run before a signal ends the process.
pub fn before_exit(f: fn()) {
    *BEFORE_EXIT.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
}

/// Catches SIGINT and SIGTERM from now on, in a watcher thread. Until a
/// command hands over its progress ([`cancel_on_signal`],
/// [`cancel_save_on_signal`]) there is nothing to cancel and a signal
/// exits at once, with the shell's status for it. Returns once the
/// signals are caught, or failed to be, with a warning: they then keep
/// their default action, ending the process.
pub fn install() {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    // The watcher registers the handlers itself, so that signals are never
    // caught without a thread to act on them.
    let spawned = std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            let mut signals = match Signals::new([SIGINT, SIGTERM]) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut cancelling = false;
            for sig in signals.forever() {
                let watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
                if !cancelling {
                    if let Some(w) = watched.as_ref() {
                        let started = !w.has_status || w.progress.status() != Status::None;
                        if started && w.progress.cancel() {
                            cancelling = true;
                            say("ferry: cancelling (press Ctrl-C again to exit at once)\n");
                            continue;
                        }
                        if w.progress.status() == Status::Device {
                            cancelling = true;
                            say("ferry: the guest is switching over and can no longer be \
                                 cancelled (press Ctrl-C again to exit at once)\n");
                            continue;
                        }
                    }
                    // Nothing (left) to cancel: exit as without a handler.
                }
                if let Some(p) = watched.as_ref().and_then(|w| w.remove.as_ref()) {
                    let _ = std::fs::remove_file(p);
                }
                if let Some(f) = *BEFORE_EXIT.lock().unwrap_or_else(|e| e.into_inner()) {
                    f();
                }
                std::process::exit(128 + sig);
            }
        });
    let registered = match spawned {
        Ok(_) => ready
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the signal watcher ended"))),
        Err(e) => Err(e),
    };
    if let Err(e) = registered {
        tracing::warn!(
            "cannot catch SIGINT/SIGTERM ({e}); Ctrl-C ends the process without cancelling"
        );
    }
}

/// For `send` and `recv`: from now on the first signal cancels `progress`'s
/// migration, a second one exits at once. While it has not started (`recv`
/// waiting for a source) or once it has ended, the first signal exits.
pub fn cancel_on_signal(progress: &Arc<Progress>) {
    watch(Watched {
        progress: progress.clone(),
        has_status: true,
        remove: None,
    });
}

/// For `save`: the first signal cancels, a second one removes `partial`
/// (the unfinished file) and exits at once.
pub fn cancel_save_on_signal(progress: &Arc<Progress>, partial: PathBuf) {
    watch(Watched {
        progress: progress.clone(),
        has_status: false,
        remove: Some(partial),
    });
}

fn watch(w: Watched) {
    *WATCHED.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
}

/// One write, so the line is never interleaved with other output.
fn say(line: &str) {
    let _ = std::io::stderr().write_all(line.as_bytes());
}
