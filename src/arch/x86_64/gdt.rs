//! The boot GDT. The Linux 64-bit boot protocol wants flat segments at
//! selectors 0x10 (code) and 0x18 (data).

use kvm_bindings::kvm_segment;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// Builds a descriptor from flags (access byte in bits 0-7, G/DB/L/AVL in
/// bits 12-15), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// NULL, NULL, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The `kvm_segment` that loading `entry` into a segment register with
/// `selector` produces.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_flat_long_mode() {
        let s = segment_from_gdt(BOOT_GDT[2], CODE_SELECTOR);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!((s.l, s.db, s.present, s.s, s.type_), (1, 0, 1, 1, 0xb));
        let d = segment_from_gdt(BOOT_GDT[3], DATA_SELECTOR);
        assert_eq!((d.l, d.db, d.type_, d.g), (0, 1, 3, 1));
        let t = segment_from_gdt(BOOT_GDT[4], TSS_SELECTOR);
        assert_eq!((t.s, t.type_), (0, 0xb));
    }
}
