//! CPUID for each vCPU: what KVM supports, with the hypervisor bit, the
//! topology (one socket, one thread per core, APIC id = vCPU index) and the
//! hypervisor leaves that tell the guest its TSC frequency.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("too many CPUID entries for KVM ({0})")]
    TooManyEntries(usize),
}

/// Bits needed to hold `n` distinct ids.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Derives vCPU `index`'s CPUID (of `count` vCPUs) from KVM's supported set.
pub fn vcpu_cpuid(
    supported: &CpuId,
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Result<CpuId, CpuidError> {
    let apic_id = index as u32;
    let count = count as u32;
    let core_bits = bits_for(count);
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        // Rebuilt below.
        .filter(|e| {
            !matches!(
                e.function,
                LEAF_TOPOLOGY | LEAF_EXT_TOPOLOGY | LEAF_HYPERVISOR_TIMING
            )
        })
        .collect();

    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ecx |= ECX_HYPERVISOR;
                // APIC id, logical processor count, CLFLUSH size (8 x 8 bytes).
                e.ebx = (apic_id << 24) | ((count.max(1) & 0xff) << 16) | (8 << 8);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // Cores per package, and one thread per core shares L1/L2;
                // the L3 is shared by the package.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax &= 0x3fff;
                if e.eax & 0x1f != 0 {
                    e.eax |= ((count - 1) << 26) | (sharing << 14);
                }
            }
            LEAF_HYPERVISOR => {
                e.eax = LEAF_HYPERVISOR_TIMING;
            }
            _ => {}
        }
    }

    // Leaf 0xB: level 0 = SMT (one thread per core), level 1 = core.
    let topo = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function: LEAF_TOPOLOGY,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: index | (level_type << 8),
        edx: apic_id,
        ..Default::default()
    };
    entries.push(topo(0, 0, 1, 1));
    entries.push(topo(1, core_bits, count, 2));
    entries.push(topo(2, 0, 0, 0));

    if let Some(khz) = tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    } else if let Some(e) = entries.iter_mut().find(|e| e.function == LEAF_HYPERVISOR) {
        e.eax = LEAF_HYPERVISOR + 1;
    }

    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(entries.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn topology_and_hypervisor_leaves() {
        let supported = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_HYPERVISOR,
                eax: 0x4000_0001,
                ..Default::default()
            },
        ])
        .unwrap();
        let c = vcpu_cpuid(&supported, 2, 3, Some(2_000_000)).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 3);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        let core = find(&c, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
        assert_eq!(find(&c, LEAF_HYPERVISOR, 0).eax, LEAF_HYPERVISOR_TIMING);
        assert_eq!(find(&c, LEAF_HYPERVISOR_TIMING, 0).eax, 2_000_000);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }
}
