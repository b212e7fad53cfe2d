//! Timestamps of a switchover's steps, for finding where a blackout goes.
//! With `FERRY_SWITCHOVER_TRACE` set in the environment, [`mark`] prints
//! `ferry-switchover LABEL UNIX_NS` on stderr (one line a step); the two
//! processes of a migration on one host share the clock, so their lines
//! merge into one timeline. Without the variable a mark costs one atomic
//! load. Each mark is followed by `ferry-clock TSC UNIX_NS`, the host's TSC
//! read beside the same clock, so a guest whose TSC is the host's (a
//! nested kvm_pvm guest's is) can have its own TSC readings, such as the
//! `gap_end_tsc` of its progress lines, put on the same timeline.

use std::sync::OnceLock;

/// Whether marks print (callers that format a label test this first).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERRY_SWITCHOVER_TRACE").is_some())
}

/// Notes that step `label` happened now (see the module's note).
pub fn mark(label: &str) {
    if enabled() {
        let ns = crate::outgoing::unix_nanos();
        eprintln!("ferry-switchover {label} {ns}");
        eprintln!("ferry-clock {} {ns}", host_tsc());
    }
}

/// [`mark`] with a label built only when marks print.
pub fn mark_with(label: impl FnOnce() -> String) {
    if enabled() {
        mark(&label());
    }
}

/// The host's TSC (0 off x86_64).
fn host_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC reads a counter; it touches no memory and every x86_64
    // CPU has it.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}
