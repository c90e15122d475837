//! A polled virtio-blk driver over modern (version 2) virtio-mmio with one
//! request in flight, the contract's block header, and the `blk` workload:
//! write blocks once and read them back. `blkwrite` builds on the same parts.

use crate::hw::{memset, rd16, rd32, rd64, rd8, wr16, wr32, wr64, wr8};
use crate::serial::{put_dec, putc, puts};
use crate::{Config, Tokens, GOLDEN};
use core::ptr::addr_of;

// virtio-mmio registers.
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CAPACITY: u64 = 0x100;

const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_FAILED: u32 = 128;

// Feature bits 0..31 we take when offered; VIRTIO_F_VERSION_1 (bit 32) is
// required.
const F_SEG_MAX: u32 = 1 << 2;
const F_RO: u32 = 1 << 5;
const F_BLK_SIZE: u32 = 1 << 6;
const F_FLUSH: u32 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const D_NEXT: u32 = 1;
const D_WRITE: u32 = 2;

/// Enough for one 3-descriptor chain; a power of two, as split rings need.
const QSIZE: u32 = 4;

pub const BLOCK: u64 = 4096;
const MAGIC_W0: u64 = 0x4b4c_4259_5252_4546; // "FERRYBLK"

#[repr(C, align(4096))]
struct Page([u8; 4096]);

/// Split ring: descriptors at 0, avail at 0x100, used at 0x200.
static mut RING: Page = Page([0; 4096]);
/// The buffer blocks are written from: zero past the header words, and only
/// the header words ever change, so a block costs four stores, not 4 KiB.
static mut DATA: Page = Page([0; 4096]);
/// Where `blkwrite` reads blocks back into, so that whatever the disk holds
/// past the header never leaks into DATA and from there into later writes.
static mut READ: Page = Page([0; 4096]);
/// Request header (16 bytes), then the status byte at 16.
#[repr(C, align(16))]
struct Req([u8; 32]);
static mut REQ: Req = Req([0; 32]);

fn ring() -> u64 {
    addr_of!(RING) as u64
}
pub fn data() -> u64 {
    addr_of!(DATA) as u64
}
pub fn read_buf() -> u64 {
    addr_of!(READ) as u64
}
fn req() -> u64 {
    addr_of!(REQ) as u64
}

/// Word 3 of a block header, from the block number and word 2.
#[inline(always)]
pub fn check_word(b: u64, w2: u64) -> u64 {
    (MAGIC_W0 ^ b.rotate_left(17) ^ w2.rotate_left(31)).wrapping_mul(GOLDEN)
}

/// Writes the header of block `b` (word 2 = `w2`) into `buf`.
#[inline(always)]
pub fn put_header(buf: u64, b: u64, w2: u64) {
    wr64(buf, MAGIC_W0);
    wr64(buf + 8, b);
    wr64(buf + 16, w2);
    wr64(buf + 24, check_word(b, w2));
}

/// Zeroes the header words, so that a read that never lands fails the check.
#[inline(always)]
pub fn clear_header(buf: u64) {
    for i in 0..4 {
        wr64(buf + 8 * i, 0);
    }
}

/// Whether `buf` holds the header of block `b` with word 2 = `w2`.
#[inline(always)]
pub fn header_is(buf: u64, b: u64, w2: u64) -> bool {
    rd64(buf) == MAGIC_W0
        && rd64(buf + 8) == b
        && rd64(buf + 16) == w2
        && rd64(buf + 24) == check_word(b, w2)
}

/// Word 2 of the header in `buf` if it is a well-formed header of block `b`.
pub fn header_w2(buf: u64, b: u64) -> Option<u64> {
    let w2 = rd64(buf + 16);
    header_is(buf, b, w2).then_some(w2)
}

pub fn run(cmdline: &'static [u8], cfg: &Config) {
    const NAME: &[u8] = b"blk";
    let Some(mut dev) = open(cmdline, NAME) else {
        return;
    };
    let data = data();

    let st = dev.request(T_GET_ID, 0, data, 20, true);
    if st != 0 {
        fail(NAME, b"id status=");
        put_dec(st as u64);
        return putc(b'\n');
    }
    puts(b"testkernel: blk id=");
    for i in 0..20 {
        match rd8(data + i) {
            0 => break,
            c => putc(c),
        }
    }
    putc(b'\n');

    let n = dev.blocks(cfg.blk_blocks);
    let seed = cfg.blk_seed;
    for b in 0..n {
        put_header(data, b, seed);
        let st = dev.write(b);
        if st != 0 {
            return fail_block(NAME, b"write", st, b);
        }
    }
    let st = dev.flush();
    if st != 0 {
        fail(NAME, b"flush status=");
        put_dec(st as u64);
        return putc(b'\n');
    }
    for b in 0..n {
        clear_header(data);
        let st = dev.read(b, data);
        if st != 0 {
            return fail_block(NAME, b"read", st, b);
        }
        if !header_is(data, b, seed) {
            fail(NAME, b"verify block=");
            put_dec(b);
            return putc(b'\n');
        }
    }
    puts(b"testkernel: blk ok blocks=");
    put_dec(n);
    putc(b'\n');
}

/// `testkernel: <workload> FAIL <why>`, without the newline.
pub fn fail(workload: &[u8], why: &[u8]) {
    puts(b"testkernel: ");
    puts(workload);
    puts(b" FAIL ");
    puts(why);
}

/// `testkernel: <workload> FAIL <op> status=<s> block=<b>`.
pub fn fail_block(workload: &[u8], op: &[u8], status: u8, block: u64) {
    fail(workload, op);
    puts(b" status=");
    put_dec(status as u64);
    puts(b" block=");
    put_dec(block);
    putc(b'\n');
}

/// The first block device, set up, with DATA zeroed. Otherwise prints
/// `testkernel: <workload> FAIL <why>` and returns None.
pub fn open(cmdline: &'static [u8], workload: &[u8]) -> Option<Dev> {
    let Some(base) = find_device(cmdline) else {
        fail(workload, b"no device\n");
        return None;
    };
    match Dev::setup(base) {
        Ok(dev) => {
            // SAFETY: DATA is our own 4 KiB buffer; zeroed once, as the bytes
            // past the header words must be zero on disk.
            unsafe { memset(data() as *mut u8, 0, BLOCK as usize) };
            Some(dev)
        }
        Err(what) => {
            wr32(base + STATUS, S_FAILED);
            fail(workload, b"setup ");
            puts(what);
            putc(b'\n');
            None
        }
    }
}

/// The first `virtio_mmio.device=<size>@<base>:<irq>` that is a block device.
fn find_device(cmdline: &'static [u8]) -> Option<u64> {
    for tok in Tokens(cmdline) {
        let Some(v) = tok.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        let Some(at) = v.iter().position(|&c| c == b'@') else {
            continue;
        };
        let Some((base, _)) = v.get(at + 1..).and_then(crate::parse_num) else {
            continue;
        };
        // Only the first 4 GiB is mapped.
        if base < 0xffff_f000
            && rd32(base + MAGIC) == u32::from_le_bytes(*b"virt")
            && rd32(base + DEVICE_ID) == 2
        {
            return Some(base);
        }
    }
    None
}

pub struct Dev {
    base: u64,
    /// Our avail index; the device's used index catches up with it.
    idx: u16,
    /// FLUSH was negotiated.
    flush: bool,
}

impl Dev {
    fn setup(b: u64) -> Result<Dev, &'static [u8]> {
        // Legacy (version 1) devices have another queue layout.
        if rd32(b + VERSION) != 2 {
            return Err(b"version");
        }
        wr32(b + STATUS, 0);
        while rd32(b + STATUS) != 0 {}
        wr32(b + STATUS, S_ACK);
        wr32(b + STATUS, S_ACK | S_DRIVER);
        wr32(b + DEVICE_FEATURES_SEL, 1);
        if rd32(b + DEVICE_FEATURES) & 1 == 0 {
            return Err(b"features");
        }
        wr32(b + DEVICE_FEATURES_SEL, 0);
        let low = rd32(b + DEVICE_FEATURES) & (F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH);
        wr32(b + DRIVER_FEATURES_SEL, 1);
        wr32(b + DRIVER_FEATURES, 1);
        wr32(b + DRIVER_FEATURES_SEL, 0);
        wr32(b + DRIVER_FEATURES, low);
        wr32(b + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if rd32(b + STATUS) & S_FEATURES_OK == 0 {
            return Err(b"features");
        }

        wr32(b + QUEUE_SEL, 0);
        if rd32(b + QUEUE_READY) != 0 || rd32(b + QUEUE_NUM_MAX) < QSIZE {
            return Err(b"queue");
        }
        wr32(b + QUEUE_NUM, QSIZE);
        // Descriptors: header -> data -> status, over fixed buffers. Only
        // the data buffer, length and direction and the header's `next`
        // change per request.
        let (r, q) = (ring(), req());
        wr64(r, q);
        wr32(r + 8, 16);
        wr64(r + 32, q + 16);
        wr32(r + 40, 1);
        wr32(r + 44, D_WRITE);
        wr32(q + 4, 0); // header: reserved
        wr32(r + 0x100, 1); // avail: flags = NO_INTERRUPT (we poll), idx = 0
        wr32(r + 0x200, 0); // used: flags, idx
        for (reg, addr) in [
            (QUEUE_DESC, r),
            (QUEUE_DRIVER, r + 0x100),
            (QUEUE_DEVICE, r + 0x200),
        ] {
            wr32(b + reg, addr as u32);
            wr32(b + reg + 4, (addr >> 32) as u32);
        }
        wr32(b + QUEUE_READY, 1);
        wr32(b + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        Ok(Dev {
            base: b,
            idx: 0,
            flush: low & F_FLUSH != 0,
        })
    }

    /// `min(capacity / 4 KiB, limit)`.
    pub fn blocks(&self, limit: u64) -> u64 {
        let c = self.base + CAPACITY;
        let sectors = rd32(c) as u64 | (rd32(c + 4) as u64) << 32;
        (sectors / (BLOCK / 512)).min(limit)
    }

    /// Writes 4 KiB block `b` from DATA.
    pub fn write(&mut self, b: u64) -> u8 {
        self.request(T_OUT, b * (BLOCK / 512), data(), BLOCK as u32, false)
    }

    /// Reads 4 KiB block `b` into `buf`.
    pub fn read(&mut self, b: u64, buf: u64) -> u8 {
        self.request(T_IN, b * (BLOCK / 512), buf, BLOCK as u32, true)
    }

    /// FLUSH if negotiated (else the device has no write cache to flush).
    pub fn flush(&mut self) -> u8 {
        if !self.flush {
            return 0;
        }
        self.request(T_FLUSH, 0, 0, 0, false)
    }

    /// One request, polled to completion; returns the device's status byte.
    /// `len == 0` sends no data descriptor (flush).
    fn request(&mut self, typ: u32, sector: u64, buf: u64, len: u32, device_writes: bool) -> u8 {
        let (r, q) = (ring(), req());
        wr32(q, typ);
        wr64(q + 8, sector);
        wr8(q + 16, 0xff); // a completion must overwrite it
        if len == 0 {
            wr32(r + 12, D_NEXT | 2 << 16);
        } else {
            wr32(r + 12, D_NEXT | 1 << 16);
            wr64(r + 16, buf);
            wr32(r + 24, len);
            let dir = if device_writes { D_WRITE } else { 0 };
            wr32(r + 28, D_NEXT | dir | 2 << 16);
        }
        wr16(r + 0x104 + 2 * (self.idx as u64 % QSIZE as u64), 0);
        self.idx = self.idx.wrapping_add(1);
        // Volatile accesses keep program order and x86 stores are not
        // reordered with each other, so no fence is needed before publishing.
        wr16(r + 0x102, self.idx);
        wr32(self.base + QUEUE_NOTIFY, 0);
        while rd16(r + 0x202) != self.idx {
            crate::net::poll();
            core::hint::spin_loop();
        }
        rd8(q + 16)
    }
}
