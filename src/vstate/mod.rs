//! The thin KVM layer: guest memory, the VM (memory slots, irqchip, PIT,
//! dirty log) and vCPUs (run loop, pause, boot state).

pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;
