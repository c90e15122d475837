//! Ferry: a small KVM micro-VMM whose reason to exist is combined live
//! migration and storage migration. See `DESIGN.md` in the shared folder and
//! `docs/` for the architecture.

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod migration;
pub mod security;
pub mod signals;
pub mod snapshot;
pub mod sparse;
pub mod startup;
pub mod util;
pub mod vmm;
pub mod vstate;

/// When this process started, as near as Rust code can tell: `main` calls
/// [`mark_process_start`] first thing. Start-up figures are measured from it.
static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

pub fn mark_process_start() {
    PROCESS_START.get_or_init(std::time::Instant::now);
}

pub fn process_start() -> std::time::Instant {
    *PROCESS_START.get_or_init(std::time::Instant::now)
}
