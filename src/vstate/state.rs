//! Saving and restoring what KVM holds for a VM and its vCPUs: registers,
//! FPU/XSAVE, LAPIC, MSRs, events, MP state, and the in-kernel irqchip, PIT
//! and clock. Used by snapshots and live migration alike.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} {what}: {source}")]
    Kvm {
        op: &'static str,
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("cannot build the MSR list ({0} entries)")]
    MsrList(usize),
    #[error("cannot build the CPUID list ({0} entries)")]
    CpuidList(usize),
}

fn kerr<'a>(op: &'static str, what: &'a str) -> impl FnOnce(kvm_ioctls::Error) -> StateError + 'a {
    move |source| StateError::Kvm {
        op,
        what: what.to_string(),
        source,
    }
}

/// One vCPU, as KVM sees it.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmArchState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The MSRs worth saving on this host: everything KVM lists as saveable
/// (`KVM_GET_MSR_INDEX_LIST`, which includes the emulated ones), minus those
/// this vCPU refuses to read (some hosts list MSRs they then reject).
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(kerr("get", "the MSR index list"))?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    let mut good = Vec::with_capacity(candidates.len());
    // KVM_GET_MSRS stops at the first MSR it cannot read: keep what came
    // before it, drop it, go on with the rest.
    while !candidates.is_empty() {
        let entries: Vec<kvm_msr_entry> = candidates
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::MsrList(entries.len()))?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(kerr("get", "MSRs"))?
            .min(candidates.len());
        good.extend_from_slice(&candidates[..n]);
        candidates.drain(..(n + 1).min(candidates.len()));
    }
    Ok(good)
}

/// Saves a vCPU. `cpuid` is the CPUID the VMM set on it: saved as set, not
/// as `KVM_GET_CPUID2` reads it back, because some KVMs (this host's PVM)
/// report bits there that `KVM_GET_SUPPORTED_CPUID` does not offer, and a
/// saved state carrying them could never migrate to a host like this one.
pub fn save_vcpu(
    index: u8,
    fd: &VcpuFd,
    cpuid: &[kvm_bindings::kvm_cpuid_entry2],
    msr_indices: &[u32],
) -> Result<VcpuState, StateError> {
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::MsrList(entries.len()))?;
    let n = fd.get_msrs(&mut msrs).map_err(kerr("get", "MSRs"))?;
    let msrs = msrs.as_slice()[..n].to_vec();
    Ok(VcpuState {
        index,
        cpuid: cpuid.to_vec(),
        mp_state: fd.get_mp_state().map_err(kerr("get", "MP state"))?,
        regs: fd.get_regs().map_err(kerr("get", "registers"))?,
        sregs: fd.get_sregs().map_err(kerr("get", "special registers"))?,
        xsave: fd.get_xsave().map_err(kerr("get", "XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kerr("get", "XCRs"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(kerr("get", "debug registers"))?,
        lapic: fd.get_lapic().map_err(kerr("get", "LAPIC"))?,
        msrs,
        vcpu_events: fd.get_vcpu_events().map_err(kerr("get", "vCPU events"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Restores a vCPU. MSRs KVM refuses to set are returned (by index) rather
/// than failing the restore: some hosts list read-only MSRs as saveable.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<Vec<u32>, StateError> {
    let cpuid =
        CpuId::from_entries(&state.cpuid).map_err(|_| StateError::CpuidList(state.cpuid.len()))?;
    fd.set_cpuid2(&cpuid).map_err(kerr("set", "CPUID"))?;
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz)
                .map_err(kerr("set", "the TSC frequency"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kerr("set", "MP state"))?;
    fd.set_regs(&state.regs).map_err(kerr("set", "registers"))?;
    fd.set_sregs(&state.sregs)
        .map_err(kerr("set", "special registers"))?;
    // SAFETY: the buffer is a full kvm_xsave, the size KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kerr("set", "XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kerr("set", "XCRs"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kerr("set", "debug registers"))?;
    fd.set_lapic(&state.lapic).map_err(kerr("set", "LAPIC"))?;
    let mut refused = Vec::new();
    let mut rest: &[kvm_msr_entry] = &state.msrs;
    while !rest.is_empty() {
        let msrs = Msrs::from_entries(rest).map_err(|_| StateError::MsrList(rest.len()))?;
        let n = fd.set_msrs(&msrs).map_err(kerr("set", "MSRs"))?;
        if n < rest.len() {
            refused.push(rest[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(kerr("set", "vCPU events"))?;
    Ok(refused)
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kerr("get", what))?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<VmArchState, StateError> {
    Ok(VmArchState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "the master PIC")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "the slave PIC")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "the IOAPIC")?,
        pit: vm.get_pit2().map_err(kerr("get", "the PIT"))?,
        clock: vm.get_clock().map_err(kerr("get", "the KVM clock"))?,
    })
}

pub fn restore_vm(vm: &VmFd, state: &VmArchState) -> Result<(), StateError> {
    vm.set_pit2(&state.pit).map_err(kerr("set", "the PIT"))?;
    // KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME; the others are
    // reports from KVM_GET_CLOCK.
    let mut clock = state.clock;
    clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kerr("set", "the KVM clock"))?;
    vm.set_irqchip(&state.pic_master)
        .map_err(kerr("set", "the master PIC"))?;
    vm.set_irqchip(&state.pic_slave)
        .map_err(kerr("set", "the slave PIC"))?;
    vm.set_irqchip(&state.ioapic)
        .map_err(kerr("set", "the IOAPIC"))?;
    Ok(())
}
