//! Ferry: a small KVM micro-VMM whose reason to exist is combined live
//! migration and storage migration. See `DESIGN.md` in the shared folder and
//! `docs/` for the architecture.

pub mod api;
pub mod arch;
pub mod config;
pub mod devices;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
