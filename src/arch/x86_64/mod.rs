//! x86_64 boot: guest physical layout, kernel loading and the Linux boot
//! protocol, GDT and page tables, CPUID, MSRs and the MP table.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
