//! The guest-physical memory map Ferry gives every x86_64 guest.

/// Boot GDT (NULL, NULL, CODE 0x10, DATA 0x18, TSS 0x20).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT; the guest installs its own.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` (the zero page).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, four PDs of 2 MiB pages (4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// How much the boot page tables identity-map.
pub const IDENTITY_MAP_SIZE: u64 = 4 << 30;
/// Kernel command line, and its maximum size including the NUL.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The MP table lives at the start of the EBDA.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Everything from the EBDA to 1 MiB is reserved (EBDA, VGA, BIOS).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at or above 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// virtio-mmio transports, one 4 KiB window each, from here up.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (ISA IRQs below are legacy devices).
pub const FIRST_VIRTIO_IRQ: u32 = 5;
/// Last GSI the IOAPIC routes.
pub const LAST_IRQ: u32 = 23;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// COM1 and its IRQ.
pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data (0x60) to command (0x64) ports.
pub const I8042_PORT: u64 = 0x60;
