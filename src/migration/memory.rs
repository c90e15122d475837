//! Guest memory over the migration stream: dirty tracking on the source
//! (KVM's dirty log for vCPU writes, merged with the VMM's own bitmap for
//! device writes), sending page ranges with all-zero pages as markers, and
//! writing received pages straight into the destination's guest memory.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::protocol::{
    send_frame, stripe_owner, FrameHeader, Kind, ProtocolError, MAX_MEMORY_CHUNK, PAGE_SIZE, STRIPE,
};
use crate::sparse::{data_extents, is_zero};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vm::{Vm, VmError};

/// Per region, one bit per 4 KiB page.
pub type DirtyBitmaps = Vec<Vec<u64>>;

/// Starts tracking: KVM logs vCPU writes from now on, and the VMM's bitmap
/// is cleared (what it recorded before is covered by the first full pass).
pub fn start_dirty_tracking(vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    vm.set_memory(mem, true)?;
    for region in mem.iter() {
        (**region).bitmap().reset();
    }
    Ok(())
}

pub fn stop_dirty_tracking(vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    vm.set_memory(mem, false)
}

/// Pages written since the last call, by vCPUs or by the VMM.
pub fn collect_dirty(vm: &Vm, mem: &GuestMemoryMmap) -> Result<DirtyBitmaps, VmError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut kvm = vm.dirty_log(slot as u32, region.len() as usize)?;
        let vmm = (**region).bitmap().get_and_reset();
        for (k, v) in kvm.iter_mut().zip(vmm.iter()) {
            *k |= *v;
        }
        out.push(kvm);
    }
    Ok(out)
}

/// `into |= from`, region by region.
pub fn merge_into(into: &mut DirtyBitmaps, from: &DirtyBitmaps) {
    for (a, b) in into.iter_mut().zip(from.iter()) {
        for (x, y) in a.iter_mut().zip(b.iter()) {
            *x |= *y;
        }
    }
}

pub fn count_pages(bitmaps: &DirtyBitmaps) -> u64 {
    bitmaps
        .iter()
        .flat_map(|b| b.iter())
        .map(|w| w.count_ones() as u64)
        .sum()
}

/// Runs of set bits as guest-physical `(start, len)` ranges. The bitmap is
/// walked a word (64 pages) at a time: an idle 16 GiB guest's final pass
/// looks at 64 Ki words, not 4 Mi bits, while the guest is paused.
pub fn dirty_ranges(mem: &GuestMemoryMmap, bitmaps: &DirtyBitmaps) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for (region, bits) in mem.iter().zip(bitmaps.iter()) {
        let base = region.start_addr().raw_value();
        let pages = region.len() / PAGE_SIZE;
        let mut push = |start: u64, end: u64| {
            let end = end.min(pages);
            if end > start {
                out.push((base + start * PAGE_SIZE, (end - start) * PAGE_SIZE));
            }
        };
        let mut run: Option<u64> = None;
        for (i, &word) in bits.iter().enumerate().take(pages.div_ceil(64) as usize) {
            let first = i as u64 * 64;
            match (word, run) {
                (0, None) => continue,
                (0, Some(start)) => {
                    push(start, first);
                    run = None;
                    continue;
                }
                (u64::MAX, _) => {
                    run.get_or_insert(first);
                    continue;
                }
                _ => {}
            }
            // A mixed word: walk its runs of ones and zeros.
            let mut bit = 0u32;
            while bit < 64 {
                let rest = word >> bit;
                if rest & 1 == 1 {
                    let ones = (!rest).trailing_zeros().min(64 - bit);
                    run.get_or_insert(first + u64::from(bit));
                    bit += ones;
                } else {
                    if let Some(start) = run.take() {
                        push(start, first + u64::from(bit));
                    }
                    if rest == 0 {
                        break;
                    }
                    bit += rest.trailing_zeros();
                }
            }
        }
        if let Some(start) = run {
            push(start, pages);
        }
    }
    out
}

/// Every range of guest memory that may hold data. With the memfd behind
/// guest RAM, ranges the guest never touched (holes) are left out: they are
/// zero, and so is a fresh destination.
pub fn populated_ranges(
    mem: &GuestMemoryMmap,
    memfd: Option<&File>,
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let base = region.start_addr().raw_value();
        let len = region.len();
        match memfd {
            None => out.push((base, len)),
            Some(fd) => {
                for (data, hole) in data_extents(fd, file_offset, file_offset + len)? {
                    // Whole pages: shmem reports extents per page anyway.
                    let data = data & !(PAGE_SIZE - 1);
                    let hole = ((hole + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)).min(file_offset + len);
                    out.push((base + data - file_offset, hole - data));
                }
            }
        }
        file_offset += len;
    }
    Ok(out)
}

/// `ranges` dealt out to `connections` connections by stripe
/// ([`stripe_owner`]): each range is cut at stripe boundaries and every
/// piece goes to the list of the connection that owns it, in address order.
/// With one connection the ranges stay as they are.
pub fn split_by_stripe(ranges: &[(u64, u64)], connections: u32) -> Vec<Vec<(u64, u64)>> {
    let n = connections.max(1);
    if n == 1 {
        return vec![ranges.to_vec()];
    }
    let mut out = vec![Vec::new(); n as usize];
    for &(gpa, len) in ranges {
        let end = gpa + len;
        let mut at = gpa;
        while at < end {
            let stripe_end = (at / STRIPE + 1) * STRIPE;
            let to = stripe_end.min(end);
            let lane: &mut Vec<(u64, u64)> = &mut out[stripe_owner(at, n) as usize];
            lane.push((at, to - at));
            at = to;
        }
    }
    out
}

/// Sends guest memory, counting what goes on the wire.
pub struct PageSender<'a, W: Write> {
    pub w: &'a mut W,
    mem: &'a GuestMemoryMmap,
    buf: Vec<u8>,
    pub wire_bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
}

impl<'a, W: Write> PageSender<'a, W> {
    pub fn new(w: &'a mut W, mem: &'a GuestMemoryMmap) -> Self {
        Self {
            w,
            mem,
            buf: vec![0u8; MAX_MEMORY_CHUNK],
            wire_bytes: 0,
            data_pages: 0,
            zero_pages: 0,
        }
    }

    /// Sends `[gpa, gpa + len)`. While the guest runs (`guest_paused` false)
    /// pages are first copied out, so that the checksum matches what is
    /// sent even if the guest writes them meanwhile (the dirty log catches
    /// the write); once it is paused, frames go out straight from guest
    /// memory with no copy. `between` runs after every chunk (bandwidth
    /// limit, cancellation).
    pub fn send_range(
        &mut self,
        gpa: u64,
        len: u64,
        guest_paused: bool,
        between: &mut dyn FnMut(u64) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let mut done = 0u64;
        while done < len {
            let addr = gpa + done;
            let n = (len - done).min(MAX_MEMORY_CHUNK as u64) as usize;
            if guest_paused {
                let host = self.mem.get_host_address(GuestAddress(addr)).map_err(|e| {
                    ProtocolError::Malformed {
                        kind: Kind::MemoryPages,
                        why: e.to_string(),
                    }
                })?;
                // SAFETY: `addr..addr+n` lies within one region (ranges come
                // from region-bounded bitmaps and chunks never cross a
                // region end), the mapping outlives this call, and the
                // vCPUs are paused and devices drained, so nothing writes it.
                let data = unsafe { std::slice::from_raw_parts(host as *const u8, n) };
                self.send_chunk(addr, data)?;
            } else {
                let mut buf = std::mem::take(&mut self.buf);
                let res = self
                    .mem
                    .read_slice(&mut buf[..n], GuestAddress(addr))
                    .map_err(|e| ProtocolError::Malformed {
                        kind: Kind::MemoryPages,
                        why: e.to_string(),
                    })
                    .and_then(|_| self.send_chunk(addr, &buf[..n]));
                self.buf = buf;
                res?;
            }
            done += n as u64;
            between(self.wire_bytes)?;
        }
        Ok(())
    }

    /// Declares `[gpa, gpa + len)` (within one region) zero without
    /// reading it: one frame whatever the length.
    pub fn send_zero(&mut self, gpa: u64, len: u64) -> Result<(), ProtocolError> {
        let count = len / PAGE_SIZE;
        self.wire_bytes += send_frame(
            self.w,
            Kind::ZeroPages,
            &[&gpa.to_le_bytes(), &count.to_le_bytes()],
        )?;
        self.zero_pages += count;
        Ok(())
    }

    /// One chunk: runs of zero pages become ZeroPages markers, the rest
    /// MemoryPages frames.
    fn send_chunk(&mut self, addr: u64, data: &[u8]) -> Result<(), ProtocolError> {
        let pages = data.len() / PAGE_SIZE as usize;
        let mut i = 0;
        while i < pages {
            let zero = is_zero(&data[i * 4096..(i + 1) * 4096]);
            let mut j = i + 1;
            while j < pages && is_zero(&data[j * 4096..(j + 1) * 4096]) == zero {
                j += 1;
            }
            let start = addr + (i as u64) * PAGE_SIZE;
            if zero {
                let count = (j - i) as u64;
                self.wire_bytes += send_frame(
                    self.w,
                    Kind::ZeroPages,
                    &[&start.to_le_bytes(), &count.to_le_bytes()],
                )?;
                self.zero_pages += count;
            } else {
                self.wire_bytes += send_frame(
                    self.w,
                    Kind::MemoryPages,
                    &[&start.to_le_bytes(), &data[i * 4096..j * 4096]],
                )?;
                self.data_pages += (j - i) as u64;
            }
            i = j;
        }
        Ok(())
    }
}

/// How far past the last data frame the destination prefaults: pass 1
/// sends each populated range in address order, so the pages right after a
/// frame are most likely the next to arrive.
pub const PREFAULT_AHEAD: u64 = 8 << 20;
/// Requests the helper may have queued; more are dropped (it is behind, and
/// the receive thread faults the pages in itself meanwhile).
const PREFAULT_QUEUE: usize = 8;
/// The helper populates a request this much at a time and looks between
/// pieces whether it should stop: pass 1's end then waits for at most one
/// piece, not for the whole queue (up to 8 x 8 MiB, which took 10 to 12 ms
/// here and held up the receive of everything after it, the Seal of an
/// idle guest's pause included).
const PREFAULT_PIECE: u64 = 1 << 20;

/// Faults in, on a helper thread, the destination's guest memory just ahead
/// of the stream (`MADV_POPULATE_WRITE`), so that the receiving thread
/// copies into pages that exist instead of taking a first-touch fault per
/// page. It only ever touches guest memory within [`PREFAULT_AHEAD`] past a
/// received data frame: a sparse guest stays mostly unallocated (at most
/// that much per populated range, within the guest's size that the
/// destination checked before creating it).
pub struct Prefaulter {
    requests: Option<std::sync::mpsc::SyncSender<(u64, u64)>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    mem: GuestMemoryMmap,
    /// Everything below this (in the current region) was asked for.
    asked_to: u64,
}

impl Prefaulter {
    pub fn start(mem: &GuestMemoryMmap) -> std::io::Result<Prefaulter> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, u64)>(PREFAULT_QUEUE);
        let helper_mem = mem.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                // Without its filter the receive thread faults pages in.
                if !crate::security::narrow_thread(
                    "prefault",
                    crate::security::ThreadFilter::Prefault,
                ) {
                    return;
                }
                while let Ok((gpa, len)) = rx.recv() {
                    let mut at = gpa;
                    while at < gpa + len {
                        if stopped.load(Ordering::Relaxed) {
                            return;
                        }
                        let n = (gpa + len - at).min(PREFAULT_PIECE);
                        if !populate(&helper_mem, at, n) {
                            // No MADV_POPULATE_WRITE here (Linux < 5.14): the
                            // receive thread faults pages in as before.
                            return;
                        }
                        at += n;
                    }
                }
            })?;
        Ok(Prefaulter {
            requests: Some(tx),
            stop,
            thread: Some(thread),
            mem: mem.clone(),
            asked_to: 0,
        })
    }

    /// A data frame ended at `end`: have the next pages faulted in.
    pub fn received_up_to(&mut self, end: u64) {
        let Some(region) = self.mem.find_region(GuestAddress(end)) else {
            return;
        };
        let region_end = region.start_addr().raw_value() + region.len();
        // Ask in steps of half the distance, not for every frame.
        if self.asked_to > end && self.asked_to - end > PREFAULT_AHEAD / 2 {
            return;
        }
        let from = self.asked_to.max(end);
        let to = (end + PREFAULT_AHEAD).min(region_end);
        if to > from {
            if let Some(tx) = &self.requests {
                if tx.try_send((from, to - from)).is_ok() {
                    self.asked_to = to;
                }
            }
        }
    }
}

impl Prefaulter {
    /// Lets the helper do what was asked, then ends it.
    #[cfg(test)]
    fn finish(mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops the helper within one [`PREFAULT_PIECE`], whatever is queued.
impl Drop for Prefaulter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `MADV_POPULATE_WRITE` over `[gpa, gpa + len)` (within one region).
/// False when the kernel does not know the advice.
fn populate(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    let Ok(host) = host_range(mem, Kind::MemoryPages, gpa, len) else {
        return true;
    };
    // SAFETY: the range lies in a live mapping of `mem` (host_range checked
    // it; the clone keeps the mapping alive). Populating writes no data:
    // pages already present are left as they are, missing ones come zeroed.
    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
}

/// Host memory for `[gpa, gpa + len)` on the destination, checked to lie in
/// one region.
fn host_range(
    mem: &GuestMemoryMmap,
    kind: Kind,
    gpa: u64,
    len: u64,
) -> Result<*mut u8, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { kind, why };
    if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
        return Err(bad(format!("range {gpa:#x}+{len:#x} is not page aligned")));
    }
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or_else(|| bad(format!("address {gpa:#x} is outside guest memory")))?;
    let offset = gpa - region.start_addr().raw_value();
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(bad(format!(
            "range {gpa:#x}+{len:#x} runs past guest memory"
        )));
    }
    region
        .get_host_address(MemoryRegionAddress(offset))
        .map_err(|e| bad(e.to_string()))
}

/// Receives a MemoryPages frame straight into guest memory and checks it.
/// The destination's vCPUs are not running yet.
pub fn receive_pages<R: Read>(
    r: &mut R,
    h: &FrameHeader,
    mem: &GuestMemoryMmap,
) -> Result<u64, ProtocolError> {
    receive_pages_at(r, h, mem).map(|(_, pages)| pages)
}

/// As [`receive_pages`]; returns the frame's address and page count.
pub fn receive_pages_at<R: Read>(
    r: &mut R,
    h: &FrameHeader,
    mem: &GuestMemoryMmap,
) -> Result<(u64, u64), ProtocolError> {
    receive_pages_checked(r, h, mem, &|_, _| Ok(()))
}

/// As [`receive_pages_at`], with `allowed(gpa, len)` asked before a byte
/// of page data is written: a connection may write only its own stripes.
pub fn receive_pages_checked<R: Read>(
    r: &mut R,
    h: &FrameHeader,
    mem: &GuestMemoryMmap,
    allowed: &dyn Fn(u64, u64) -> Result<(), ProtocolError>,
) -> Result<(u64, u64), ProtocolError> {
    if h.len < 8 + PAGE_SIZE || h.len - 8 > MAX_MEMORY_CHUNK as u64 {
        return Err(ProtocolError::Malformed {
            kind: Kind::MemoryPages,
            why: format!("{} bytes", h.len),
        });
    }
    let mut addr = [0u8; 8];
    r.read_exact(&mut addr)?;
    let gpa = u64::from_le_bytes(addr);
    let len = h.len - 8;
    let host = host_range(mem, Kind::MemoryPages, gpa, len)?;
    allowed(gpa, len)?;
    // SAFETY: host_range checked that the range lies inside one live region;
    // no vCPU runs on the destination yet, and with several connections
    // `allowed` keeps each to its own stripes, so nothing else writes it.
    let data = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
    r.read_exact(data)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&addr);
    crc.update(data);
    if crc.finalize() != h.crc {
        return Err(ProtocolError::PayloadChecksum(Kind::MemoryPages));
    }
    Ok((gpa, len / PAGE_SIZE))
}

/// Receives a ZeroPages frame: zeroes the range.
pub fn receive_zero<R: Read>(
    r: &mut R,
    h: &FrameHeader,
    mem: &GuestMemoryMmap,
) -> Result<u64, ProtocolError> {
    let (gpa, count) = read_zero_range(r, h, mem)?;
    zero_range(mem, Kind::ZeroPages, gpa, count * PAGE_SIZE)?;
    Ok(count)
}

/// Reads a ZeroPages frame and checks that its range lies in guest memory;
/// returns (address, page count) without touching memory.
pub fn read_zero_range<R: Read>(
    r: &mut R,
    h: &FrameHeader,
    mem: &GuestMemoryMmap,
) -> Result<(u64, u64), ProtocolError> {
    if h.len != 16 {
        return Err(ProtocolError::Malformed {
            kind: Kind::ZeroPages,
            why: format!("{} bytes", h.len),
        });
    }
    let p = super::protocol::read_payload(r, h)?;
    let gpa = u64::from_le_bytes(p[0..8].try_into().unwrap());
    let count = u64::from_le_bytes(p[8..16].try_into().unwrap());
    let len = count
        .checked_mul(PAGE_SIZE)
        .ok_or(ProtocolError::Malformed {
            kind: Kind::ZeroPages,
            why: format!("{count} pages"),
        })?;
    host_range(mem, Kind::ZeroPages, gpa, len)?;
    Ok((gpa, count))
}

/// Zeroes `[gpa, gpa + len)` of guest memory on the destination.
pub fn zero_range(
    mem: &GuestMemoryMmap,
    kind: Kind,
    gpa: u64,
    len: u64,
) -> Result<(), ProtocolError> {
    let host = host_range(mem, kind, gpa, len)?;
    // SAFETY: as in receive_pages.
    unsafe { std::ptr::write_bytes(host, 0, len as usize) };
    Ok(())
}

/// The ranges of guest memory that `populated` (sorted, as
/// [`populated_ranges`] gives them) leaves out, each within one region:
/// pass 1 declares them zero, so that the destination can tell a complete
/// stream from one that lost a frame.
pub fn unpopulated_ranges(mem: &GuestMemoryMmap, populated: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        let mut at = start;
        for &(gpa, len) in populated.iter().filter(|r| r.0 >= start && r.0 < end) {
            if gpa > at {
                out.push((at, gpa - at));
            }
            at = at.max(gpa + len);
        }
        if at < end {
            out.push((at, end - at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::read_header;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn ranges_and_pages_roundtrip() {
        let (memfd, src) = create_guest_memory(8 << 20).unwrap();
        src.write_obj(0xabcd_u64, GuestAddress(0x3000)).unwrap();
        src.write_obj(0x1234_u64, GuestAddress(0x5008)).unwrap();
        src.write_obj(0_u64, GuestAddress(0x6000)).unwrap(); // touched, zero
        let ranges = populated_ranges(&src, Some(&memfd)).unwrap();
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!(total < 8 << 20, "holes are skipped: {ranges:x?}");
        let covered = |x: u64| ranges.iter().any(|&(a, l)| a <= x && x < a + l);
        assert!(covered(0x3000) && covered(0x5008), "{ranges:x?}");

        let mut wire = Vec::new();
        let mut s = PageSender::new(&mut wire, &src);
        for (a, l) in &ranges {
            s.send_range(*a, *l, false, &mut |_| Ok(())).unwrap();
        }
        assert_eq!(s.data_pages, 2);

        let (_fd, dst) = create_guest_memory(8 << 20).unwrap();
        dst.write_obj(0xffff_u64, GuestAddress(0x6000)).unwrap(); // must be zeroed
        let mut r = &wire[..];
        while !r.is_empty() {
            let h = read_header(&mut r).unwrap();
            match h.kind {
                Kind::MemoryPages => receive_pages(&mut r, &h, &dst).map(|_| ()).unwrap(),
                Kind::ZeroPages => receive_zero(&mut r, &h, &dst).map(|_| ()).unwrap(),
                k => panic!("{k:?}"),
            }
        }
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0xabcd);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x5008)).unwrap(), 0x1234);
        assert_eq!(dst.read_obj::<u64>(GuestAddress(0x6000)).unwrap(), 0);
    }

    #[test]
    fn bitmap_runs() {
        let (_fd, mem) = create_guest_memory(1 << 20).unwrap();
        let mut bits = vec![vec![0u64; 4]];
        bits[0][0] = 0b1110_0001;
        bits[0][1] = 1 << 63;
        bits[0][2] = 1;
        assert_eq!(count_pages(&bits), 6);
        assert_eq!(
            dirty_ranges(&mem, &bits),
            vec![(0, 4096), (5 * 4096, 3 * 4096), (127 * 4096, 2 * 4096)]
        );
    }

    /// The word walk against a page-by-page reference, on patterns that
    /// cross word boundaries, fill words and end mid-word.
    #[test]
    fn bitmap_runs_match_a_bit_by_bit_walk() {
        let (_fd, mem) = create_guest_memory(1 << 20).unwrap();
        let pages = (1u64 << 20) / PAGE_SIZE;
        let reference = |bits: &[u64]| {
            let mut out = Vec::new();
            let mut run = None;
            for page in 0..=pages {
                let set = page < pages && bits[(page / 64) as usize] & (1 << (page % 64)) != 0;
                match (set, run) {
                    (true, None) => run = Some(page),
                    (false, Some(s)) => {
                        out.push((s * PAGE_SIZE, (page - s) * PAGE_SIZE));
                        run = None;
                    }
                    _ => {}
                }
            }
            out
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..200 {
            let bits: Vec<u64> = (0..4)
                .map(|i| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match (round + i) % 5 {
                        0 => 0,
                        1 => u64::MAX,
                        2 => x,
                        3 => x >> (x % 64),
                        _ => !(x << (x % 64)),
                    }
                })
                .collect();
            let bits = vec![bits];
            assert_eq!(dirty_ranges(&mem, &bits), reference(&bits[0]), "{bits:x?}");
        }
        assert_eq!(
            dirty_ranges(&mem, &vec![vec![u64::MAX; 4]]),
            vec![(0, 1 << 20)]
        );
    }

    /// Pages resident in the mapping of `[gpa, gpa + len)`.
    fn resident(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> usize {
        let host = host_range(mem, Kind::MemoryPages, gpa, len).unwrap();
        let mut vec = vec![0u8; (len / PAGE_SIZE) as usize];
        // SAFETY: a live, page-aligned mapping; `vec` has a byte per page.
        let r = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        assert_eq!(r, 0);
        vec.iter().filter(|b| *b & 1 == 1).count()
    }

    #[test]
    fn prefault_populates_just_ahead_of_the_stream() {
        let (_fd, mem) = create_guest_memory(64 << 20).unwrap();
        let mut p = Prefaulter::start(&mem).unwrap();
        p.received_up_to(1 << 20);
        p.finish(); // handles what was queued, then ends
        let ahead = (PREFAULT_AHEAD / PAGE_SIZE) as usize;
        let got = resident(&mem, 1 << 20, PREFAULT_AHEAD);
        // A kernel without MADV_POPULATE_WRITE leaves it all to the stream.
        assert!(got == ahead || got == 0, "{got} of {ahead}");
        let beyond = (1 << 20) + PREFAULT_AHEAD;
        assert_eq!(resident(&mem, beyond, (64 << 20) - beyond), 0);
        assert_eq!(resident(&mem, 0, 1 << 20), 0);
        // A frame ending at the memory's end asks for nothing.
        let mut p = Prefaulter::start(&mem).unwrap();
        p.received_up_to(64 << 20);
        p.received_up_to(u64::MAX - 4095);
    }

    #[test]
    fn hostile_frames_are_refused() {
        let (_fd, dst) = create_guest_memory(1 << 20).unwrap();
        let mut wire = Vec::new();
        // Past the end of guest memory.
        send_frame(
            &mut wire,
            Kind::MemoryPages,
            &[&(1u64 << 20).to_le_bytes(), &[0u8; 4096]],
        )
        .unwrap();
        let mut r = &wire[..];
        let h = read_header(&mut r).unwrap();
        assert!(receive_pages(&mut r, &h, &dst).is_err());
        // Unaligned, and a zero range overflowing.
        let mut wire = Vec::new();
        send_frame(
            &mut wire,
            Kind::MemoryPages,
            &[&3u64.to_le_bytes(), &[0u8; 4096]],
        )
        .unwrap();
        send_frame(
            &mut wire,
            Kind::ZeroPages,
            &[&0u64.to_le_bytes(), &u64::MAX.to_le_bytes()],
        )
        .unwrap();
        let mut r = &wire[..];
        let h = read_header(&mut r).unwrap();
        assert!(receive_pages(&mut r, &h, &dst).is_err());
        let mut r = &wire[HEADER + 4104..];
        let h = read_header(&mut r).unwrap();
        assert!(receive_zero(&mut r, &h, &dst).is_err());
    }
    const HEADER: usize = crate::migration::protocol::HEADER_LEN;

    #[test]
    fn ranges_are_dealt_out_by_stripe() {
        let s = STRIPE;
        let ranges = [(0, 4096), (s - 4096, 3 * 4096), (3 * s, 2 * s + 8192)];
        assert_eq!(split_by_stripe(&ranges, 1), vec![ranges.to_vec()]);
        let lanes = split_by_stripe(&ranges, 3);
        assert_eq!(
            lanes,
            vec![
                vec![(0, 4096), (s - 4096, 4096), (3 * s, s)],
                vec![(s, 8192), (4 * s, s)],
                vec![(5 * s, 8192)],
            ]
        );
        for (i, lane) in lanes.iter().enumerate() {
            for &(gpa, len) in lane {
                assert_eq!(stripe_owner(gpa, 3), i as u32);
                assert!(crate::migration::protocol::within_stripe(gpa, len));
            }
        }
        let total: u64 = lanes.iter().flatten().map(|r| r.1).sum();
        assert_eq!(total, ranges.iter().map(|r| r.1).sum::<u64>());
    }

    #[test]
    fn unpopulated_ranges_are_the_rest_of_each_region() {
        let (_fd, mem) = create_guest_memory(16 << 20).unwrap();
        let end = 16u64 << 20;
        assert_eq!(unpopulated_ranges(&mem, &[]), vec![(0, end)]);
        assert_eq!(
            unpopulated_ranges(&mem, &[(0, 4096), (8192, 4096), (end - 4096, 4096)]),
            vec![(4096, 4096), (12288, end - 4096 - 12288)]
        );
        assert_eq!(unpopulated_ranges(&mem, &[(0, end)]), vec![]);
    }
}
