//! The `blkwrite` workload: rewrite a working set of blocks round after
//! round, each block checked against the previous round (read back from the
//! disk) before it is overwritten, optionally dirtying memory in step. Meant
//! to run while the VM and its disk are migrated.

use crate::blk::{self, fail, fail_block};
use crate::hw::halt;
use crate::serial::{put_dec, putc, puts};
use crate::{dirty_fail, dirty_pages, dirty_region, Config, MemMap};

const NAME: &[u8] = b"blkwrite";

/// Returns only if there is nothing to run on (no device, no blocks, a dirty
/// region that does not fit); every other failure stops the CPU.
pub fn run(cmdline: &'static [u8], cfg: &Config, map: MemMap) {
    let Some(mut dev) = blk::open(cmdline, NAME) else {
        return;
    };
    let n = dev.blocks(cfg.blk_blocks);
    if n == 0 {
        return fail(NAME, b"no blocks\n");
    }
    let dirty = match cfg.dirty_mib.unwrap_or(0) {
        0 => None,
        mib => match dirty_region(mib, map) {
            Some(region) => Some(region),
            None => return fail(NAME, b"dirty region\n"),
        },
    };
    let (data, back) = (blk::data(), blk::read_buf());
    // Word 2 is (seed << 32) | round: the seed keeps its low 32 bits.
    let seed = cfg.blk_seed << 32;
    let flush_every = cfg.blk_flush_every;
    let mut to_flush = flush_every;
    let mut writes = 0u64;
    let mut r = 1u64;
    loop {
        for b in 0..n {
            // Round 1 reads nothing: whatever an earlier run left is ignored.
            if r > 1 {
                blk::clear_header(back);
                let st = dev.read(b, back);
                if st != 0 {
                    stop_io(b"read", st, b);
                }
                if !blk::header_is(back, b, seed | (r - 1)) {
                    // The generation of a well-formed header with our seed,
                    // else 0 (never written).
                    let got = blk::header_w2(back, b)
                        .filter(|w2| w2 >> 32 == seed >> 32)
                        .map_or(0, |w2| w2 & 0xffff_ffff);
                    puts(b"testkernel: blkwrite FAIL block=");
                    put_dec(b);
                    puts(b" round=");
                    put_dec(r);
                    puts(b" got=");
                    put_dec(got);
                    putc(b'\n');
                    halt();
                }
            }
            blk::put_header(data, b, seed | r);
            let st = dev.write(b);
            if st != 0 {
                stop_io(b"write", st, b);
            }
            writes += 1;
            if flush_every != 0 {
                to_flush -= 1;
                if to_flush == 0 {
                    to_flush = flush_every;
                    let st = dev.flush();
                    if st != 0 {
                        stop_io(b"flush", st, b);
                    }
                }
            }
            // Dirty pass r, one slice per block: the whole region per round.
            if let Some((start, pages)) = dirty {
                let (lo, hi) = (b * pages / n, (b + 1) * pages / n);
                let bad = if r == 1 {
                    dirty_pages(start, lo, hi, r, false)
                } else {
                    dirty_pages(start, lo, hi, r, true)
                };
                if let Some(i) = bad {
                    dirty_fail(i, r);
                }
            }
        }
        puts(b"testkernel: blkwrite round=");
        put_dec(r);
        puts(b" writes=");
        put_dec(writes);
        puts(b" ok\n");
        r += 1;
    }
}

fn stop_io(op: &[u8], status: u8, block: u64) -> ! {
    fail_block(NAME, op, status, block);
    halt()
}
