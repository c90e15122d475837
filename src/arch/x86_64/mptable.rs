//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! learns its CPUs, its IOAPIC and how ISA IRQs reach it.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, IOAPIC_ADDR, LAST_IRQ, MPTABLE_START};
use crate::vstate::memory::GuestMemoryMmap;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
/// Stepping/family/model reported per CPU, and FPU|APIC feature flags.
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4) | 3;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The table bytes for `num_cpus` CPUs, placed at `start`.
pub fn build(num_cpus: u8, start: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..=LAST_IRQ as u8 {
        entries.extend_from_slice(&[ENTRY_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0 of every LAPIC is ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);

    let entry_count = (num_cpus as usize + 1 + 1 + (LAST_IRQ as usize + 1) + 2) as u16;
    let table_len = (MPC_HEADER_SIZE + entries.len()) as u16;
    let mut mpc = Vec::with_capacity(table_len as usize);
    mpc.extend_from_slice(b"PCMP");
    mpc.extend_from_slice(&table_len.to_le_bytes());
    mpc.push(4); // spec revision 1.4
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"FERRY   ");
    mpc.extend_from_slice(b"FERRYVMM    ");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    mpc.extend_from_slice(&0u16.to_le_bytes());
    mpc.extend_from_slice(&entry_count.to_le_bytes());
    mpc.extend_from_slice(&APIC_ADDR.to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table
    mpc.extend_from_slice(&entries);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((start + MPF_SIZE as u64) as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision 1.4
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: the table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&mpc);
    Ok(mpf)
}

pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_cpu_entries() {
        let t = build(3, MPTABLE_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(mpc.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus: Vec<&[u8]> = mpc[44..]
            .chunks(20)
            .take(3)
            .filter(|e| e[0] == ENTRY_PROCESSOR)
            .collect();
        assert_eq!(cpus.len(), 3);
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BSP);
        assert_eq!((cpus[2][1], cpus[2][3]), (2, CPU_ENABLED));
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
    }
}
