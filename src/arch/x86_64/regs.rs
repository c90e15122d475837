//! Boot-time vCPU state: general registers, long-mode special registers with
//! the GDT and identity page tables, FPU, boot MSRs and the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{segment_from_gdt, BOOT_GDT, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 0x800;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot {what} into guest memory")]
    GuestMemory { what: &'static str },
    #[error("cannot {op} vCPU {what}: {source}")]
    Kvm {
        op: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm_err(op: &'static str, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, what, source }
}

/// Writes the boot GDT, an empty IDT and the identity page tables.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let gdt_err = |_| RegsError::GuestMemory { what: "GDT" };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(gdt_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestMemory { what: "IDT" })?;

    let pt_err = |_| RegsError::GuestMemory {
        what: "page tables",
    };
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(pt_err)?;
    let pd_count = IDENTITY_MAP_SIZE >> 30;
    let mut pdes = Vec::with_capacity((pd_count * 512) as usize * 8);
    for i in 0..pd_count {
        let pd = PDE_START + i * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPTE_START + i * 8))
            .map_err(pt_err)?;
        for j in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = ((i << 30) | (j << 21)) | 0x83;
            pdes.extend_from_slice(&entry.to_le_bytes());
        }
    }
    mem.write_slice(&pdes, GuestAddress(PDE_START))
        .map_err(pt_err)?;
    Ok(())
}

/// Long mode, paging on, flat segments from the boot GDT.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("get", "sregs"))?;
    let code = segment_from_gdt(BOOT_GDT[2], CODE_SELECTOR);
    let data = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
    let tss = segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set", "sregs"))
}

/// Entry point, boot stack, and `rsi` pointing at the zero page (Linux
/// 64-bit boot protocol).
pub fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("set", "regs"))
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("set", "FPU"))
}

/// The MSRs Linux expects sane at entry.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("set", "MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would leave them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get", "LAPIC"))?;
    let mut set = |reg: usize, mode: u32| {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    };
    set(APIC_LVT0, APIC_MODE_EXTINT);
    set(APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm_err("set", "LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn page_tables_identity_map_4gib() {
        let (_f, mem) = create_guest_memory(64 << 20).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        for i in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + i * 8)).unwrap();
            assert_eq!(pdpte, (PDE_START + i * 0x1000) | 3);
        }
        // The PDE that maps 0xd000_0000 (virtio MMIO) maps it to itself.
        let idx = 0xd000_0000u64 >> 21;
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + idx * 8)).unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
        let gdt: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(gdt, BOOT_GDT[2]);
    }
}
