//! Polled 16550 output at 0x3f8, and number printing without `core::fmt`
//! (whose precompiled code uses SSE).

use crate::hw::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THRE: u8 = 1 << 5;

/// Bytes written since the last LSR check. THRE means the (16-byte) FIFO is
/// empty, so one check per 16 bytes suffices: each port read is a VM exit.
static mut SENT: u8 = 0;

pub fn puts(s: &[u8]) {
    // SAFETY: single CPU, no interrupts: nothing else touches SENT. Kept in a
    // local so the loop does not reload it after every port write.
    let mut sent = unsafe { SENT };
    for &c in s {
        if sent == 0 {
            while inb(LSR) & LSR_THRE == 0 {}
        }
        outb(COM1, c);
        sent = (sent + 1) & 15;
    }
    // SAFETY: as above.
    unsafe { SENT = sent };
}

pub fn putc(c: u8) {
    puts(&[c]);
}

pub fn put_dec(mut v: u64) {
    let mut buf = [0u8; 20]; // u64::MAX has 20 digits
    let mut i = buf.len();
    loop {
        i -= 1;
        // SAFETY: at most 20 digits, so i stays in 0..20.
        unsafe { *buf.get_unchecked_mut(i) = b'0' + (v % 10) as u8 };
        v /= 10;
        if v == 0 {
            break;
        }
    }
    // SAFETY: i is in 0..20.
    puts(unsafe { buf.get_unchecked(i..) });
}

/// `testkernel: <a>` + newline: most lines are a fixed text.
pub fn line(a: &[u8]) {
    puts(b"testkernel: ");
    puts(a);
    putc(b'\n');
}
