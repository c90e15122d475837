//! Emulated devices: the PIO/MMIO bus, legacy serial and i8042, virtio.

pub mod bus;
pub mod i8042;
pub mod persist;
pub mod serial;
pub mod virtio;
