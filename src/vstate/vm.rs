//! The VM file descriptor: memory slots, in-kernel irqchip and PIT, irqfd and
//! ioeventfd registration.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemoryMmap;

/// Where KVM keeps the TSS it needs for real-mode emulation on Intel: three
/// pages just below the BIOS area, inside the MMIO hole.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("cannot create the VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set the TSS address: {0}")]
    Tss(kvm_ioctls::Error),
    #[error("cannot create the in-kernel irqchip: {0}")]
    IrqChip(kvm_ioctls::Error),
    #[error("cannot create the in-kernel PIT: {0}")]
    Pit(kvm_ioctls::Error),
    #[error("cannot register guest memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot register irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the dirty log of memory slot {slot}: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot read the supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// A VM with `mem` as its RAM, the in-kernel irqchip and the PIT.
    ///
    /// The order matters: on this host's KVM the first
    /// `KVM_SET_USER_MEMORY_REGION` costs ~7 ms (6-11 measured) when it comes
    /// after `KVM_CREATE_IRQCHIP`, and 0.04-0.1 ms before it, so the memory
    /// slots are registered first (as Cloud Hypervisor does).
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = crate::security::kvm().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
            (kvm_ioctls::Cap::Irqfd, "KVM_CAP_IRQFD"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS).map_err(VmError::Tss)?;
        let vm = Self { kvm, fd };
        crate::startup::mark("create-vm");
        vm.set_memory(mem, false)?;
        crate::startup::mark("memory-slots");
        let fd = &vm.fd;
        fd.create_irq_chip().map_err(VmError::IrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(vm)
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot (slot = region
    /// index), with KVM dirty logging when `log_dirty`.
    pub fn set_memory(&self, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
        let flags = if log_dirty {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MemorySlot {
                    slot,
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                })?;
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps for the whole life of the VM.
            unsafe { self.fd.set_user_memory_region(desc) }
                .map_err(|source| VmError::MemorySlot { slot, source })?;
        }
        Ok(())
    }

    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// Makes guest writes of `datamatch` to the MMIO address `addr` signal
    /// `evt` inside KVM, without an exit to the VMM.
    pub fn register_mmio_ioevent(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }

    /// KVM's dirty log of slot `slot` (`size` bytes), cleared as it is read.
    pub fn dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    pub fn supported_cpuid(&self) -> Result<kvm_bindings::CpuId, VmError> {
        host_cpuid()
    }
}

/// What CPUID KVM supports on this host. It needs only `/dev/kvm`, not a VM,
/// so a fresh boot asks for it (~0.7 ms here) while the VM is created.
pub fn host_cpuid() -> Result<kvm_bindings::CpuId, VmError> {
    crate::security::kvm()
        .map_err(VmError::OpenKvm)?
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::SupportedCpuid)
}
