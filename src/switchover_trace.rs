//! Timestamps of a switchover's steps, for finding where a blackout goes.
//! With `FERRY_SWITCHOVER_TRACE` set in the environment, [`mark`] prints
//! `ferry-switchover LABEL UNIX_NS` on stderr (one line a step); the two
//! processes of a migration on one host share the clock, so their lines
//! merge into one timeline. Without the variable a mark costs one atomic
//! load.

use std::sync::OnceLock;

/// Whether marks print (callers that format a label test this first).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRY_SWITCHOVER_TRACE").is_some())
}

/// Notes that step `label` happened now (see the module's note).
pub fn mark(label: &str) {
    if enabled() {
        eprintln!("ferry-switchover {label} {}", crate::outgoing::unix_nanos());
    }
}
