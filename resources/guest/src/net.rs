//! A polled virtio-net responder, on with `testkernel.net=IP/PREFIX`, that
//! runs beside any workload: the workloads call [`poll`] from their loops.
//! It answers ARP requests for its address, ICMP echo requests and UDP on
//! port 7 (echo), each by turning the request around in a transmit buffer:
//! swapped addresses and ports, the ICMP type and its checksum patched (a
//! swap changes no other checksum). Nothing else is answered or printed.
//!
//! Cheap by design (~2 M guest instructions/s): an idle poll is one flag and
//! one ring index read, a reply is a `rep movsq` copy and a few stores.
//!
//! With `VIRTIO_NET_F_GUEST_ANNOUNCE` (negotiated with the control queue
//! unless `testkernel.net_announce=off`), every 512th poll reads
//! InterruptStatus; on a config change with `VIRTIO_NET_S_ANNOUNCE` set it
//! sends three gratuitous ARPs for its address, as Linux does after a
//! migration, acknowledges with `VIRTIO_NET_CTRL_ANNOUNCE_ACK` and prints
//! `testkernel: net announced`.

use crate::hw::{memcpy, rd16, rd32, rd8, wr16, wr32, wr64, wr8};
use crate::serial::{put_dec, putc, puts};
use crate::Tokens;
use core::ptr::{addr_of, addr_of_mut};

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
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG: u64 = 0x100;

const F_MAC: u32 = 1 << 5;
const F_STATUS: u32 = 1 << 16;
const F_CTRL_VQ: u32 = 1 << 17;
const F_GUEST_ANNOUNCE: u32 = 1 << 21;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
/// Control queue entries: one command in flight.
const CTRL_QSIZE: u64 = 4;
/// Polls between two looks at InterruptStatus (an MMIO exit each).
const ANNOUNCE_CHECK_MASK: u32 = 0x1ff;

/// Entries per queue (a power of two); one 2 KiB buffer each.
const QSIZE: u64 = 16;
const BUF: u64 = 2048;
const HDR: u64 = 12;

#[repr(C, align(4096))]
struct Rings([u8; 3 * 4096]);
#[repr(C, align(4096))]
struct Bufs([u8; (2 * QSIZE * BUF) as usize]);

/// rx ring at 0, tx ring at 4096, control ring at 8192: descriptors at +0,
/// avail +0x100, used +0x200; the control command at +0x800, its ack +0x810.
static mut RINGS: Rings = Rings([0; 3 * 4096]);
/// rx buffers, then tx buffers.
static mut BUFS: Bufs = Bufs([0; (2 * QSIZE * BUF) as usize]);

struct State {
    on: bool,
    base: u64,
    ip: [u8; 4],
    mac: [u8; 6],
    /// Next rx used entry to look at; our rx avail index.
    rx_used: u16,
    rx_avail: u16,
    /// Our tx avail index; how many the device has used.
    tx_avail: u16,
    /// GUEST_ANNOUNCE negotiated; polls counted between checks.
    announce: bool,
    polls: u32,
    ctrl_avail: u16,
}

static mut STATE: State = State {
    on: false,
    base: 0,
    ip: [0; 4],
    mac: [0; 6],
    rx_used: 0,
    rx_avail: 0,
    tx_avail: 0,
    announce: false,
    polls: 0,
    ctrl_avail: 0,
};

fn st() -> &'static mut State {
    // SAFETY: one CPU, no interrupts: nothing else holds a reference.
    unsafe { &mut *addr_of_mut!(STATE) }
}
fn ring(q: u64) -> u64 {
    addr_of!(RINGS) as u64 + q * 4096
}
fn buf(q: u64, i: u64) -> u64 {
    addr_of!(BUFS) as u64 + (q * QSIZE + i) * BUF
}

/// `a.b.c.d` (a `/prefix` after it is accepted and not needed: replies go
/// back to whoever asked).
fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut rest = s;
    for (i, b) in ip.iter_mut().enumerate() {
        let (v, r) = crate::parse_num(rest)?;
        if v > 255 {
            return None;
        }
        *b = v as u8;
        rest = match (i, r.first()) {
            (3, None | Some(b'/')) => r,
            (0..=2, Some(b'.')) => r.get(1..)?,
            _ => return None,
        };
    }
    Some(ip)
}

/// Sets the responder up if the command line asks for it; prints
/// `testkernel: net up ip=… mac=…` or `testkernel: net FAIL <why>`.
pub fn init(cmdline: &'static [u8]) {
    let mut want = None;
    for tok in Tokens(cmdline) {
        if let Some(v) = tok.strip_prefix(b"testkernel.net=") {
            want = Some(v);
        }
    }
    let Some(v) = want else { return };
    let announce = !Tokens(cmdline).any(|t| t == b"testkernel.net_announce=off");
    let Some(ip) = parse_ip(v) else {
        return puts(b"testkernel: net FAIL address\n");
    };
    let Some(base) = find_device(cmdline) else {
        return puts(b"testkernel: net FAIL no device\n");
    };
    if let Err(why) = setup(base, announce) {
        wr32(base + STATUS, 128);
        puts(b"testkernel: net FAIL setup ");
        puts(why);
        return putc(b'\n');
    }
    let s = st();
    s.ip = ip;
    s.on = true;
    puts(b"testkernel: net up ip=");
    for (i, b) in ip.iter().enumerate() {
        if i > 0 {
            putc(b'.');
        }
        put_dec(*b as u64);
    }
    puts(b" mac=");
    for (i, b) in s.mac.iter().enumerate() {
        if i > 0 {
            putc(b':');
        }
        for n in [b >> 4, b & 15] {
            putc(if n < 10 { b'0' + n } else { b'a' + n - 10 });
        }
    }
    putc(b'\n');
    if s.announce {
        puts(b"testkernel: net announce=guest\n");
    }
}

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
        if base < 0xffff_f000
            && rd32(base + MAGIC) == u32::from_le_bytes(*b"virt")
            && rd32(base + DEVICE_ID) == 1
        {
            return Some(base);
        }
    }
    None
}

fn setup(b: u64, announce: bool) -> Result<(), &'static [u8]> {
    if rd32(b + VERSION) != 2 {
        return Err(b"version");
    }
    wr32(b + STATUS, 0);
    while rd32(b + STATUS) != 0 {}
    wr32(b + STATUS, 1 | 2);
    wr32(b + DEVICE_FEATURES_SEL, 1);
    if rd32(b + DEVICE_FEATURES) & 1 == 0 {
        return Err(b"features");
    }
    wr32(b + DEVICE_FEATURES_SEL, 0);
    let offered = rd32(b + DEVICE_FEATURES);
    if offered & F_MAC == 0 {
        return Err(b"no mac");
    }
    let both = F_CTRL_VQ | F_GUEST_ANNOUNCE;
    let guest_announce = announce && offered & both == both;
    let mut low = F_MAC;
    if guest_announce {
        low |= both | (offered & F_STATUS);
    }
    wr32(b + DRIVER_FEATURES_SEL, 1);
    wr32(b + DRIVER_FEATURES, 1);
    wr32(b + DRIVER_FEATURES_SEL, 0);
    wr32(b + DRIVER_FEATURES, low);
    wr32(b + STATUS, 1 | 2 | 8);
    if rd32(b + STATUS) & 8 == 0 {
        return Err(b"features");
    }
    let s = st();
    for (i, m) in s.mac.iter_mut().enumerate() {
        *m = rd8(b + CONFIG + i as u64);
    }
    for q in 0..2 {
        wr32(b + QUEUE_SEL, q as u32);
        if rd32(b + QUEUE_READY) != 0 || (rd32(b + QUEUE_NUM_MAX) as u64) < QSIZE {
            return Err(b"queue");
        }
        wr32(b + QUEUE_NUM, QSIZE as u32);
        let r = ring(q);
        for i in 0..QSIZE {
            let d = r + 16 * i;
            wr64(d, buf(q, i));
            wr32(d + 8, BUF as u32);
            // rx buffers are the device's to write; tx ones it reads.
            wr32(d + 12, if q == 0 { D_WRITE as u32 } else { 0 });
            // rx: every buffer on offer from the start.
            wr16(r + 0x104 + 2 * i, i as u16);
        }
        wr16(r + 0x100, 1); // NO_INTERRUPT: we poll
        wr16(r + 0x102, if q == 0 { QSIZE as u16 } else { 0 });
        for (reg, addr) in [
            (QUEUE_DESC, r),
            (QUEUE_DRIVER, r + 0x100),
            (QUEUE_DEVICE, r + 0x200),
        ] {
            wr32(b + reg, addr as u32);
            wr32(b + reg + 4, (addr >> 32) as u32);
        }
        wr32(b + QUEUE_READY, 1);
    }
    if guest_announce {
        // The control queue: descriptor 0 the class and command (device
        // reads), chained to descriptor 1, the ack byte (device writes).
        wr32(b + QUEUE_SEL, 2);
        if rd32(b + QUEUE_READY) != 0 || (rd32(b + QUEUE_NUM_MAX) as u64) < CTRL_QSIZE {
            return Err(b"ctrl queue");
        }
        wr32(b + QUEUE_NUM, CTRL_QSIZE as u32);
        let r = ring(2);
        wr64(r, r + 0x800);
        wr32(r + 8, 2);
        wr32(r + 12, D_NEXT as u32 | 1 << 16);
        wr64(r + 16, r + 0x810);
        wr32(r + 24, 1);
        wr32(r + 28, D_WRITE as u32);
        wr16(r + 0x100, 1); // NO_INTERRUPT: we poll
        for (reg, addr) in [
            (QUEUE_DESC, r),
            (QUEUE_DRIVER, r + 0x100),
            (QUEUE_DEVICE, r + 0x200),
        ] {
            wr32(b + reg, addr as u32);
            wr32(b + reg + 4, (addr >> 32) as u32);
        }
        wr32(b + QUEUE_READY, 1);
    }
    s.announce = guest_announce;
    s.base = b;
    s.rx_avail = QSIZE as u16;
    wr32(b + STATUS, 1 | 2 | 8 | 4);
    wr32(b + QUEUE_NOTIFY, 0);
    Ok(())
}

/// Answers every frame that has arrived. Costs next to nothing when none
/// did, or when the responder is off.
#[inline(always)]
pub fn poll() {
    let s = st();
    if s.on && rd16(ring(0) + 0x202) != s.rx_used {
        serve(s);
    }
    if s.announce {
        s.polls = s.polls.wrapping_add(1);
        if s.polls & ANNOUNCE_CHECK_MASK == 0 {
            check_announce(s);
        }
    }
}

/// On a config change asking for it (VIRTIO_NET_S_ANNOUNCE): gratuitous
/// ARPs, then VIRTIO_NET_CTRL_ANNOUNCE_ACK.
#[inline(never)]
fn check_announce(s: &mut State) {
    let b = s.base;
    let isr = rd32(b + INTERRUPT_STATUS);
    if isr & 2 == 0 {
        return;
    }
    wr32(b + INTERRUPT_ACK, 2);
    if rd16(b + CONFIG + 6) & 2 == 0 {
        return;
    }
    let mut sent = 0;
    for _ in 0..3 {
        sent += garp(s) as u32;
    }
    wr16(ring(1) + 0x102, s.tx_avail);
    wr32(b + QUEUE_NOTIFY, 1);
    // ANNOUNCE (3), ACK (0); the device overwrites the ack byte.
    let r = ring(2);
    wr8(r + 0x800, 3);
    wr8(r + 0x801, 0);
    wr8(r + 0x810, 0xff);
    wr16(r + 0x104 + 2 * (s.ctrl_avail as u64 % CTRL_QSIZE), 0);
    s.ctrl_avail = s.ctrl_avail.wrapping_add(1);
    wr16(r + 0x102, s.ctrl_avail);
    wr32(b + QUEUE_NOTIFY, 2);
    let mut spins = 0u32;
    while rd16(r + 0x202) != s.ctrl_avail {
        spins += 1;
        if spins > 1 << 20 {
            return puts(b"testkernel: net announce FAIL no ack\n");
        }
        core::hint::spin_loop();
    }
    if rd8(r + 0x810) != 0 || sent == 0 {
        return puts(b"testkernel: net announce FAIL ack\n");
    }
    puts(b"testkernel: net announced garps=");
    put_dec(sent as u64);
    putc(b'\n');
}

/// A free tx buffer's slot; when all are in flight, hands them over and
/// waits (bounded) for the device to send one.
fn tx_slot(s: &mut State) -> Option<u64> {
    let tx = ring(1);
    if s.tx_avail.wrapping_sub(rd16(tx + 0x202)) as u64 >= QSIZE {
        wr16(tx + 0x102, s.tx_avail);
        wr32(s.base + QUEUE_NOTIFY, 1);
        let mut spins = 0u32;
        while s.tx_avail.wrapping_sub(rd16(tx + 0x202)) as u64 >= QSIZE {
            spins += 1;
            if spins > 1 << 20 {
                return None;
            }
            core::hint::spin_loop();
        }
    }
    Some(s.tx_avail as u64 % QSIZE)
}

/// Queues a gratuitous ARP (a broadcast request for our own address from
/// it), not yet handed to the device.
fn garp(s: &mut State) -> bool {
    let Some(slot) = tx_slot(s) else {
        return false;
    };
    let t = buf(1, slot);
    for i in 0..(HDR + 60) / 4 {
        wr32(t + 4 * i, 0);
    }
    let e = t + HDR;
    let ip = u32::from_ne_bytes(s.ip);
    for i in 0..6 {
        wr8(e + i, 0xff);
    }
    // SAFETY: 6-byte fields inside our own 2 KiB buffer.
    unsafe {
        memcpy((e + 6) as *mut u8, s.mac.as_ptr(), 6);
        memcpy((e + 22) as *mut u8, s.mac.as_ptr(), 6);
    }
    wr16(e + 12, 0x0806u16.to_be());
    wr16(e + 14, 1u16.to_be());
    wr16(e + 16, 0x0800u16.to_be());
    wr8(e + 18, 6);
    wr8(e + 19, 4);
    wr16(e + 20, 1u16.to_be());
    wr32(e + 28, ip);
    wr32(e + 38, ip);
    let tx = ring(1);
    wr32(tx + 16 * slot + 8, (HDR + 60) as u32);
    wr16(tx + 0x104 + 2 * slot, slot as u16);
    s.tx_avail = s.tx_avail.wrapping_add(1);
    true
}

#[inline(never)]
fn serve(s: &mut State) {
    let rx = ring(0);
    let mut sent = false;
    while rd16(rx + 0x202) != s.rx_used {
        let e = rx + 0x204 + 8 * (s.rx_used as u64 % QSIZE);
        let id = rd32(e) as u64 % QSIZE;
        let len = (rd32(e + 4) as u64).min(BUF);
        s.rx_used = s.rx_used.wrapping_add(1);
        sent |= answer(s, buf(0, id), len);
        // The buffer goes back on offer.
        wr16(rx + 0x104 + 2 * (s.rx_avail as u64 % QSIZE), id as u16);
        s.rx_avail = s.rx_avail.wrapping_add(1);
    }
    wr16(rx + 0x102, s.rx_avail);
    if sent {
        wr16(ring(1) + 0x102, s.tx_avail);
        wr32(s.base + QUEUE_NOTIFY, 1);
    }
    wr32(s.base + QUEUE_NOTIFY, 0);
}

#[inline(always)]
fn be16(a: u64) -> u16 {
    u16::from_be(rd16(a))
}

/// Builds the reply to the frame at `f` (its virtio-net header first) in
/// the next tx buffer, if it deserves one and a buffer is free.
fn answer(s: &mut State, f: u64, len: u64) -> bool {
    let e = f + HDR;
    if len < HDR + 42 {
        return false;
    }
    let ip = u32::from_ne_bytes(s.ip);
    let kind = match be16(e + 12) {
        0x0806 => {
            // ARP request (Ethernet/IPv4) for our address.
            if be16(e + 14) != 1 || be16(e + 16) != 0x0800 || be16(e + 20) != 1 {
                return false;
            }
            if rd32(e + 38) != ip {
                return false;
            }
            0
        }
        0x0800 => {
            // IPv4 without options, not a fragment, to us.
            if rd8(e + 14) != 0x45 || be16(e + 20) & 0x3fff != 0 || rd32(e + 30) != ip {
                return false;
            }
            match rd8(e + 23) {
                1 if rd8(e + 34) == 8 => 1,
                17 if be16(e + 36) == 7 => 2,
                _ => return false,
            }
        }
        _ => return false,
    };
    let tx = ring(1);
    let Some(slot) = tx_slot(s) else {
        return false;
    };
    let t = buf(1, slot);
    // SAFETY: both are our own 2 KiB buffers and len <= 2 KiB.
    unsafe { memcpy(t as *mut u8, f as *const u8, len as usize) };
    let r = t + HDR;
    // Ethernet: back to the sender, from us.
    // SAFETY: within the buffer: 6-byte fields of the Ethernet header.
    unsafe {
        memcpy(r as *mut u8, (e + 6) as *const u8, 6);
        memcpy((r + 6) as *mut u8, s.mac.as_ptr(), 6);
    }
    match kind {
        0 => {
            wr16(r + 20, 2u16.to_be());
            // SAFETY: ARP fields inside the 42 bytes checked above.
            unsafe {
                memcpy((r + 32) as *mut u8, (e + 22) as *const u8, 10); // tha, tpa = sha, spa
                memcpy((r + 22) as *mut u8, s.mac.as_ptr(), 6);
            }
            wr32(r + 28, ip);
        }
        _ => {
            wr32(r + 26, ip);
            wr32(r + 30, rd32(e + 26));
            if kind == 1 {
                // Echo reply: type 8 -> 0, checksum + 0x0800 (RFC 1624).
                wr8(r + 34, 0);
                let c = be16(e + 36) as u32 + 0x0800;
                wr16(r + 36, (((c & 0xffff) + (c >> 16)) as u16).to_be());
            } else {
                wr16(r + 34, rd16(e + 36));
                wr16(r + 36, rd16(e + 34));
            }
        }
    }
    wr32(t, 0);
    wr32(t + 4, 0);
    wr32(t + 8, 0);
    let d = tx + 16 * slot;
    wr32(d + 8, len as u32);
    wr16(tx + 0x104 + 2 * slot, slot as u16);
    s.tx_avail = s.tx_avail.wrapping_add(1);
    true
}
