//! Raw hardware access: port I/O, physical memory (identity-mapped, so a
//! physical address is a pointer), CPUID/TSC, and the C memory functions the
//! compiler emits calls to.

use core::arch::asm;
use core::ptr::{read_unaligned, read_volatile, write_volatile};

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust (`nomem` lets
    // the compiler keep values in registers around it; asm is never dropped
    // or reordered with volatile accesses).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

// Physical memory the VMM wrote for us (boot_params, tables, cmdline), which
// may be unaligned (e820 entries are 20 bytes).
#[inline(always)]
pub fn peek8(a: u64) -> u8 {
    // SAFETY: all of the first 4 GiB is mapped; the VMM says what is where.
    unsafe { read_unaligned(a as *const u8) }
}
#[inline(always)]
pub fn peek16(a: u64) -> u16 {
    // SAFETY: as above.
    unsafe { read_unaligned(a as *const u16) }
}
#[inline(always)]
pub fn peek32(a: u64) -> u32 {
    // SAFETY: as above.
    unsafe { read_unaligned(a as *const u32) }
}
#[inline(always)]
pub fn peek64(a: u64) -> u64 {
    // SAFETY: as above.
    unsafe { read_unaligned(a as *const u64) }
}

// Memory shared with a device or checked after a migration: volatile, so every
// access really happens, in program order.
#[inline(always)]
pub fn rd8(a: u64) -> u8 {
    // SAFETY: callers pass MMIO registers or our own static buffers.
    unsafe { read_volatile(a as *const u8) }
}
#[inline(always)]
pub fn rd16(a: u64) -> u16 {
    // SAFETY: as above, naturally aligned.
    unsafe { read_volatile(a as *const u16) }
}
#[inline(always)]
pub fn rd32(a: u64) -> u32 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u32) }
}
#[inline(always)]
pub fn rd64(a: u64) -> u64 {
    // SAFETY: as above.
    unsafe { read_volatile(a as *const u64) }
}
#[inline(always)]
pub fn wr8(a: u64, v: u8) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u8, v) }
}
#[inline(always)]
pub fn wr16(a: u64, v: u16) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u16, v) }
}
#[inline(always)]
pub fn wr32(a: u64, v: u32) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u32, v) }
}
#[inline(always)]
pub fn wr64(a: u64, v: u64) {
    // SAFETY: as above.
    unsafe { write_volatile(a as *mut u64, v) }
}

#[inline(always)]
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and always present on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stop for good: interrupts are off, so HLT never returns under a VMM.
pub fn halt() -> ! {
    loop {
        // SAFETY: halting the CPU has no memory effects.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

// The C memory functions. String instructions, not loops: the compiler cannot
// turn them back into calls to themselves, and one `rep` instruction is far
// cheaper under emulation than a loop. The 8-byte forms cut the iterations.

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    asm!(
        "rep movsq",
        "mov ecx, {tail:e}",
        "rep movsb",
        tail = in(reg) n & 7,
        inout("rcx") n >> 3 => _,
        inout("rdi") dst => _,
        inout("rsi") src => _,
        options(nostack, preserves_flags)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or past its end: a forward copy is safe.
        return memcpy(dst, src, n);
    }
    // Overlapping with dst above src: copy backwards.
    asm!(
        "std",
        "rep movsb",
        "cld",
        inout("rcx") n => _,
        inout("rdi") dst.wrapping_add(n).wrapping_sub(1) => _,
        inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
        options(nostack)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    asm!(
        "rep stosq",
        "mov ecx, {tail:e}",
        "rep stosb",
        tail = in(reg) n & 7,
        inout("rcx") n >> 3 => _,
        inout("rdi") dst => _,
        in("rax") (c as u8 as u64).wrapping_mul(0x0101_0101_0101_0101),
        options(nostack, preserves_flags)
    );
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // Volatile so the loop is not recognised as a memcmp idiom.
        let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}
