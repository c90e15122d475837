//! ferry-testkernel: the tiny guest that Ferry's tests, demos and benchmarks
//! boot. docs/testkernel.md is its contract (serial lines, block and page
//! formats). It runs under KVM's instruction emulator at ~2 M instructions/s,
//! so it never formats, never uses SSE, and keeps every path short.

#![no_std]
#![no_main]

mod blk;
mod blkwrite;
mod boot;
mod hw;
mod net;
mod serial;

use hw::{cpuid, halt, inb, outb, peek16, peek32, peek64, peek8, rd64, rdtsc, wr64};
use serial::{line, put_dec, putc, puts};

// The linker script is only named in rustflags; including it makes cargo
// relink when it changes.
const _: &[u8] = include_bytes!("../linker.ld");

extern "C" {
    /// End of the image, bss included (linker script).
    static _end: u8;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    halt()
}

/// Referenced by the precompiled `core` in unoptimised builds; never called
/// with panic=abort.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Common entry: exactly one of the two is non-zero.
#[no_mangle]
extern "C" fn kmain(boot_params: u64, start_info: u64) -> ! {
    let (cmdline, map) = boot_info(boot_params, start_info);
    let mut mem = 0u64;
    for (_, size) in map.usable() {
        mem = mem.wrapping_add(size);
    }
    puts(b"testkernel: booted cpus=");
    put_dec(cpus());
    puts(b" mem=");
    put_dec(mem.wrapping_add(1 << 19) >> 20);
    puts(b" cmdline=\"");
    puts(cmdline);
    puts(b"\"\n");

    let cfg = Config::parse(cmdline);
    net::init(cmdline);
    match cfg.workload {
        b"blk" => blk::run(cmdline, &cfg),
        b"blkwrite" => blkwrite::run(cmdline, &cfg, map),
        b"dirty" => dirty(&cfg, map),
        b"idle" => idle(),
        other => {
            puts(b"testkernel: FAIL unknown workload ");
            puts(other);
            putc(b'\n');
        }
    }
    done()
}

fn done() -> ! {
    line(b"done");
    outb(0x64, 0xfe); // i8042 reset
    halt()
}

/// A memory map in guest memory. e820 (20-byte) and PVH (24-byte) entries
/// share the layout addr u64 @0, size u64 @8, type u32 @16.
#[derive(Clone, Copy)]
struct MemMap {
    base: u64,
    count: u64,
    stride: u64,
}

impl MemMap {
    /// (addr, size) of the usable (type 1) ranges.
    fn usable(self) -> impl Iterator<Item = (u64, u64)> {
        (0..self.count)
            .map(move |i| self.base + i * self.stride)
            .filter(|&e| peek32(e + 16) == 1)
            .map(|e| (peek64(e), peek64(e + 8)))
    }
}

/// The command line and memory map, from boot_params or hvm_start_info.
fn boot_info(boot_params: u64, start_info: u64) -> (&'static [u8], MemMap) {
    let mut map = MemMap {
        base: 0,
        count: 0,
        stride: 0,
    };
    let mut cmdline = 0;
    if boot_params != 0 {
        let bp = boot_params;
        if peek32(bp + 0x202) == u32::from_le_bytes(*b"HdrS") {
            cmdline = peek32(bp + 0x228) as u64 | (peek32(bp + 0x0c8) as u64) << 32;
        }
        map = MemMap {
            base: bp + 0x2d0,
            count: (peek8(bp + 0x1e8) as u64).min(128),
            stride: 20,
        };
    } else if start_info != 0 && peek32(start_info) == 0x336e_c578 {
        let si = start_info;
        cmdline = peek64(si + 24);
        // The memory map fields exist from version 1 on.
        if peek32(si + 4) >= 1 {
            map = MemMap {
                base: peek64(si + 40),
                count: (peek32(si + 48) as u64).min(128),
                stride: 24,
            };
        }
    }
    (cstr(cmdline), map)
}

/// A NUL-terminated string in guest memory (at most 4 KiB).
fn cstr(addr: u64) -> &'static [u8] {
    let mut n = 0;
    if addr != 0 {
        while n < 4096 && peek8(addr + n) != 0 {
            n += 1;
        }
    }
    // SAFETY: the n bytes at addr were just read; a zero address gives n = 0.
    unsafe { core::slice::from_raw_parts(addr as *const u8, n as usize) }
}

/// Enabled processors of the MP table, else CPUID leaf 0xB, else 1.
fn cpus() -> u64 {
    let fp = find_mp(0x9fc00, 0xa0000).or_else(|| find_mp(0xf0000, 0x100000));
    if let Some(fp) = fp {
        let table = peek32(fp + 4) as u64;
        if table != 0 && peek32(table) == u32::from_le_bytes(*b"PCMP") {
            let mut e = table + 44;
            let mut n = 0;
            for _ in 0..peek16(table + 34) {
                match peek8(e) {
                    0 => {
                        n += (peek8(e + 3) & 1) as u64; // CPU flags: enabled
                        e += 20;
                    }
                    1..=4 => e += 8,
                    _ => break,
                }
            }
            if n != 0 {
                return n;
            }
        }
    }
    if cpuid(0, 0)[0] >= 0xb {
        let n = cpuid(0xb, 1)[1] & 0xffff;
        if n != 0 {
            return n as u64;
        }
    }
    1
}

/// The `_MP_` floating pointer on a 16-byte boundary in [from, to).
fn find_mp(from: u64, to: u64) -> Option<u64> {
    (from..to)
        .step_by(16)
        .find(|&a| peek32(a) == u32::from_le_bytes(*b"_MP_"))
}

pub struct Config {
    workload: &'static [u8],
    blk_blocks: u64,
    blk_seed: u64,
    blk_flush_every: u64,
    /// None when not given: `dirty` defaults to 16, `blkwrite` to 0 (off).
    dirty_mib: Option<u64>,
}

impl Config {
    fn parse(cmdline: &'static [u8]) -> Config {
        let mut c = Config {
            workload: b"idle",
            blk_blocks: 256,
            blk_seed: 1,
            blk_flush_every: 64,
            dirty_mib: None,
        };
        // Later occurrences win, as in Linux; malformed numbers are ignored.
        for tok in Tokens(cmdline) {
            if let Some(v) = tok.strip_prefix(b"testkernel.workload=") {
                c.workload = v;
            } else if let Some(v) = tok.strip_prefix(b"testkernel.blk_blocks=") {
                c.blk_blocks = number(v).unwrap_or(c.blk_blocks);
            } else if let Some(v) = tok.strip_prefix(b"testkernel.blk_seed=") {
                c.blk_seed = number(v).unwrap_or(c.blk_seed);
            } else if let Some(v) = tok.strip_prefix(b"testkernel.blk_flush_every=") {
                c.blk_flush_every = number(v).unwrap_or(c.blk_flush_every);
            } else if let Some(v) = tok.strip_prefix(b"testkernel.dirty_mib=") {
                c.dirty_mib = number(v).or(c.dirty_mib);
            }
        }
        c
    }
}

/// Whitespace-separated words of the command line.
struct Tokens(&'static [u8]);

impl Iterator for Tokens {
    type Item = &'static [u8];
    fn next(&mut self) -> Option<&'static [u8]> {
        let start = self.0.iter().position(|&c| c > b' ')?;
        let s = self.0.get(start..)?;
        let end = s.iter().position(|&c| c <= b' ').unwrap_or(s.len());
        let (tok, rest) = s.split_at_checked(end)?;
        self.0 = rest;
        Some(tok)
    }
}

/// A leading decimal or 0x-hex number, and what follows it.
fn parse_num(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, s) = match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(hex) => (16, hex),
        None => (10, s),
    };
    let mut v = 0u64;
    let mut n = 0;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            b'A'..=b'F' if radix == 16 => c - b'A' + 10,
            _ => break,
        };
        v = v.wrapping_mul(radix).wrapping_add(d as u64);
        n += 1;
    }
    if n == 0 {
        return None;
    }
    Some((v, s.get(n..)?))
}

/// A whole-word number.
fn number(s: &[u8]) -> Option<u64> {
    match parse_num(s)? {
        (v, b"") => Some(v),
        _ => None,
    }
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The `dirty` workload: rewrite a header in every page of the region, pass
/// after pass, checking the previous pass's header first. Returns only if the
/// region does not fit.
fn dirty(cfg: &Config, map: MemMap) {
    let Some((start, pages)) = dirty_region(cfg.dirty_mib.unwrap_or(16), map) else {
        line(b"dirty FAIL region");
        return;
    };
    let mut g = 1;
    loop {
        let bad = if g == 1 {
            dirty_pages(start, 0, pages, g, false)
        } else {
            dirty_pages(start, 0, pages, g, true)
        };
        if let Some(i) = bad {
            dirty_fail(i, g);
        }
        puts(b"testkernel: dirty pass=");
        put_dec(g);
        puts(b" ok\n");
        g += 1;
    }
}

/// (start, pages) of the `mib` MiB region at the first 2 MiB boundary past
/// the image, if it lies inside one usable range below 4 GiB.
fn dirty_region(mib: u64, map: MemMap) -> Option<(u64, u64)> {
    const TWO_MIB: u64 = 2 << 20;
    let image_end = core::ptr::addr_of!(_end) as u64;
    let start = (image_end + TWO_MIB - 1) & !(TWO_MIB - 1);
    let end = start + (mib.min(1 << 20) << 20);
    // Only the first 4 GiB is mapped.
    let fits = mib != 0
        && end <= 1 << 32
        && map
            .usable()
            .any(|(a, s)| a <= start && end <= a.wrapping_add(s));
    fits.then_some((start, mib << 8))
}

/// `testkernel: dirty FAIL page=<i> pass=<g>`, then stop.
fn dirty_fail(i: u64, g: u64) -> ! {
    puts(b"testkernel: dirty FAIL page=");
    put_dec(i);
    puts(b" pass=");
    put_dec(g);
    putc(b'\n');
    halt()
}

/// Pass `g` over pages [first, end) of the region; with `check`, first
/// verifies pass g-1's header of each page. Returns the first bad page.
#[inline(always)]
fn dirty_pages(start: u64, first: u64, end: u64, g: u64, check: bool) -> Option<u64> {
    const MASK: u64 = 0x5a5a_5a5a_5a5a_5a5a;
    // Word 2 is ((i ^ rotl(g, 32)) * GOLDEN) ^ MASK. With i < 2^32 and
    // g < 2^32 the xor joins disjoint bits, i.e. is an addition, so the
    // product is i * GOLDEN + rotl(g, 32) * GOLDEN: one add per page, not a
    // multiply.
    let g_new = g.rotate_left(32).wrapping_mul(GOLDEN);
    let g_old = g.wrapping_sub(1).rotate_left(32).wrapping_mul(GOLDEN);
    let mut p = start + first * 4096;
    let mut i = first;
    let mut i_k = first.wrapping_mul(GOLDEN); // i * GOLDEN
    while i < end {
        if i & 31 == 0 {
            net::poll();
        }
        if check {
            let diff = (rd64(p) ^ i)
                | (rd64(p + 8) ^ (g - 1))
                | (rd64(p + 16) ^ (i_k.wrapping_add(g_old) ^ MASK));
            if diff != 0 {
                return Some(i);
            }
        }
        wr64(p, i);
        wr64(p + 8, g);
        wr64(p + 16, i_k.wrapping_add(g_new) ^ MASK);
        p += 4096;
        i += 1;
        i_k = i_k.wrapping_add(GOLDEN);
    }
    None
}

/// The `idle` workload: a tick line about every second, by the TSC.
fn idle() -> ! {
    let period = tsc_khz().wrapping_mul(1000).max(1);
    let mut next = rdtsc().wrapping_add(period);
    let mut n = 1;
    loop {
        while (rdtsc().wrapping_sub(next) as i64) < 0 {
            net::poll();
            core::hint::spin_loop();
        }
        puts(b"testkernel: tick ");
        put_dec(n);
        putc(b'\n');
        n += 1;
        next = next.wrapping_add(period);
        // After a long stop (a paused VM) go on from now instead of catching
        // up with a burst of ticks.
        let now = rdtsc();
        if (now.wrapping_sub(next) as i64) > 0 {
            next = now.wrapping_add(period);
        }
    }
}

/// TSC frequency in kHz: the hypervisor's timing leaf, else the PIT.
fn tsc_khz() -> u64 {
    let hypervisor = cpuid(1, 0)[2] & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000, 0)[0] >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0)[0];
        if khz != 0 {
            return khz as u64;
        }
    }
    pit_khz()
}

/// Counts TSC ticks while PIT channel 2 (gated by port 0x61, speaker off)
/// counts down 25 ms in mode 0; its output goes high at terminal count.
fn pit_khz() -> u64 {
    const MS: u64 = 25;
    const LATCH: u64 = 1_193_182 * MS / 1000;
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, LATCH as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let t0 = rdtsc();
    while inb(0x61) & 0x20 == 0 {}
    rdtsc().wrapping_sub(t0) / MS
}
