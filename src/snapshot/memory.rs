//! Guest memory in snapshot files: written sparse (pages that are all zero
//! stay holes), mapped copy-on-write on restore so nothing is read up front.

use std::fs::File;

use crate::sparse::{data_extents, is_zero};
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

use crate::vstate::memory::{ram_ranges, GuestMemoryMmap};

const PAGE: usize = 4096;

/// The memory file is checksummed in chunks of this many bytes (of file
/// offset; the last one may be shorter). Only chunks that hold written data
/// get a checksum: the others are holes, zero by construction, and restore
/// checks that they still are.
pub const CHUNK: u64 = 2 << 20;

/// The checksum of one chunk of the memory file: its index and the CRC-32
/// of its bytes (holes read as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSum {
    pub index: u32,
    pub crc: u32,
}

/// Writes guest memory into `out` (already empty), the regions back to back
/// as in the memfd, skipping all-zero pages. With the memfd at hand, pages
/// the guest never touched are skipped without being read. Returns the bytes
/// written and the checksum of every chunk that holds data, in order. The
/// VM must be paused.
pub fn write_sparse(
    mem: &GuestMemoryMmap,
    memfd: Option<&File>,
    out: &File,
    total: u64,
) -> std::io::Result<(u64, Vec<ChunkSum>)> {
    out.set_len(total)?;
    let mut file_offset = 0u64;
    let mut written = 0u64;
    let mut sums = Vec::new();
    for region in mem.iter() {
        let len = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`;
        // the guest is paused and no device writes while we read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
        let extents = match memfd {
            Some(fd) => data_extents(fd, file_offset, file_offset + len)?
                .into_iter()
                .map(|(a, b)| (a - file_offset, b - file_offset))
                .collect(),
            None => vec![(0, len)],
        };
        // Chunks (region-relative indices) that got data; regions start on
        // chunk boundaries (the MMIO hole is at 3 GiB).
        let mut chunks: Vec<u64> = Vec::new();
        for (start, end) in extents {
            let mut page = start as usize & !(PAGE - 1);
            let end = end as usize;
            while page < end {
                // Find a run of non-zero pages and write it in one go.
                while page < end && is_zero(&bytes[page..(page + PAGE).min(end)]) {
                    page += PAGE;
                }
                let run_start = page;
                while page < end && !is_zero(&bytes[page..(page + PAGE).min(end)]) {
                    page += PAGE;
                }
                let run_end = page.min(end);
                if run_end > run_start {
                    out.write_all_at(&bytes[run_start..run_end], file_offset + run_start as u64)?;
                    written += (run_end - run_start) as u64;
                    let (first, last) = (run_start as u64 / CHUNK, (run_end as u64 - 1) / CHUNK);
                    for c in first..=last {
                        if chunks.last() != Some(&c) {
                            chunks.push(c);
                        }
                    }
                }
            }
        }
        for c in chunks {
            let a = (c * CHUNK) as usize;
            let b = ((c + 1) * CHUNK).min(len) as usize;
            let index = u32::try_from((file_offset + c * CHUNK) / CHUNK)
                .map_err(|_| std::io::Error::other("guest memory too large to checksum"))?;
            sums.push(ChunkSum {
                index,
                crc: crc32fast::hash(&bytes[a..b]),
            });
        }
        file_offset += len;
    }
    Ok((written, sums))
}

/// Why a memory file does not match its checksums.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the {len} bytes at offset {offset:#x} do not match their checksum")]
    Mismatch { offset: u64, len: u64 },
    #[error("the {len} bytes at offset {offset:#x} should be all zero and are not")]
    NotZero { offset: u64, len: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Bytes read (or zeros hashed) per step when verifying: a small buffer
/// reused throughout, since faulting in a fresh chunk-sized one costs more
/// than the reads on this host's nested KVM.
const VERIFY_STEP: usize = 64 << 10;
static ZEROS: [u8; VERIFY_STEP] = [0; VERIFY_STEP];

/// Checks the memory file against its chunk checksums (`sums` sorted by
/// index, in range: see decode), and that every other chunk is zero. Reads
/// only the file's data extents, through the file rather than a mapping;
/// holes are hashed as the zeros they are, unread.
pub fn verify(file: &File, size: u64, sums: &[ChunkSum]) -> Result<(), VerifyError> {
    let extents = data_extents(file, 0, size)?;
    let mut buf = vec![0u8; VERIFY_STEP];
    // Feeds `[a, b)` to `sink`: file bytes where there is data, zeros in
    // holes. `ext` is the index of the first extent that may overlap.
    let mut walk = |a: u64,
                    b: u64,
                    ext: &mut usize,
                    sink: &mut dyn FnMut(&[u8], bool) -> bool|
     -> Result<bool, VerifyError> {
        let mut pos = a;
        while pos < b {
            while *ext < extents.len() && extents[*ext].1 <= pos {
                *ext += 1;
            }
            let (data, until) = match extents.get(*ext) {
                Some(&(s, e)) if s <= pos => (true, e.min(b)),
                Some(&(s, _)) => (false, s.min(b)),
                None => (false, b),
            };
            while pos < until {
                let n = (until - pos).min(VERIFY_STEP as u64) as usize;
                let ok = if data {
                    file.read_exact_at(&mut buf[..n], pos)?;
                    sink(&buf[..n], true)
                } else {
                    sink(&ZEROS[..n], false)
                };
                if !ok {
                    return Ok(false);
                }
                pos += n as u64;
            }
        }
        Ok(true)
    };
    let chunk_range = |index: u64| {
        let a = index * CHUNK;
        (a, (a + CHUNK).min(size))
    };
    let mut ext = 0;
    let mut next = sums.iter().peekable();
    let chunks = size.div_ceil(CHUNK);
    let mut c = 0;
    while c < chunks {
        let (a, b) = chunk_range(c);
        if let Some(s) = next.next_if(|s| u64::from(s.index) == c) {
            let mut h = crc32fast::Hasher::new();
            walk(a, b, &mut ext, &mut |bytes, _| {
                h.update(bytes);
                true
            })?;
            if h.finalize() != s.crc {
                return Err(VerifyError::Mismatch {
                    offset: a,
                    len: b - a,
                });
            }
            c += 1;
            continue;
        }
        // No checksum: only holes, or data that is all zero. Skip straight
        // to the next chunk that holds data.
        while ext < extents.len() && extents[ext].1 <= a {
            ext += 1;
        }
        let Some(&(s, _)) = extents.get(ext) else {
            break;
        };
        if s >= b {
            c = (s / CHUNK).max(c + 1);
            if let Some(sum) = next.peek() {
                c = c.min(u64::from(sum.index));
            }
            continue;
        }
        let clean = walk(a, b, &mut ext, &mut |bytes, data| !data || is_zero(bytes))?;
        if !clean {
            return Err(VerifyError::NotZero {
                offset: a,
                len: b - a,
            });
        }
        c += 1;
    }
    Ok(())
}

/// Maps a snapshot's memory file as guest RAM, private and copy-on-write:
/// pages come in from the file as the guest touches them, and the guest's
/// writes never reach the file.
pub fn map_private(file: &File, size: u64) -> std::io::Result<GuestMemoryMmap> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size) {
        let mapping = MmapRegionBuilder::<AtomicBitmap>::new_with_bitmap(
            len as usize,
            vm_memory::bitmap::NewBitmap::with_len(len as usize),
        )
        .with_file_offset(FileOffset::new(file.try_clone()?, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
        .build()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, start)
                .ok_or_else(|| std::io::Error::other("guest region overflows"))?,
        );
        offset += len;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_refuses_a_flipped_byte_and_data_in_a_hole() {
        let size = 8 << 20;
        let (memfd, mem) = create_guest_memory(size).unwrap();
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress((2 << 20) - PAGE as u64))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let out = File::create(&path).unwrap();
        let (_, sums) = write_sparse(&mem, Some(&memfd), &out, size).unwrap();
        assert_eq!(sums.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1]);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        verify(&f, size, &sums).unwrap();
        // One flipped bit in data.
        f.write_all_at(&[0xaa], (2 << 20) + 5).unwrap();
        assert!(matches!(
            verify(&f, size, &sums),
            Err(VerifyError::Mismatch { offset, .. }) if offset == 2 << 20
        ));
        f.write_all_at(&[0xab], (2 << 20) + 5).unwrap();
        verify(&f, size, &sums).unwrap();
        // One byte in a hole, where no checksum is.
        f.write_all_at(&[1], (6 << 20) + 77).unwrap();
        assert!(matches!(
            verify(&f, size, &sums),
            Err(VerifyError::NotZero { .. })
        ));
        // A zero written into a hole is still zero.
        f.write_all_at(&[0], (6 << 20) + 77).unwrap();
        verify(&f, size, &sums).unwrap();
    }
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn sparse_roundtrip() {
        let size = 8 << 20;
        let (memfd, mem) = create_guest_memory(size).unwrap();
        mem.write_obj(0x1122_3344_u32, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(0x55_u8, GuestAddress((5 << 20) + 4095))
            .unwrap();
        // Touched but zero: must stay a hole.
        mem.write_obj(0_u64, GuestAddress(3 << 20)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for fd in [Some(&memfd), None] {
            let path = dir.path().join("mem");
            let _ = std::fs::remove_file(&path);
            let out = File::create(&path).unwrap();
            let (written, sums) = write_sparse(&mem, fd, &out, size).unwrap();
            assert_eq!(written, 2 * PAGE as u64);
            // The chunks holding data, and only those, are checksummed.
            let idx: Vec<u32> = sums.iter().map(|s| s.index).collect();
            assert_eq!(idx, vec![0, 2]);
            verify(&File::open(&path).unwrap(), size, &sums).unwrap();
            assert_eq!(out.metadata().unwrap().len(), size);
            let f = File::open(&path).unwrap();
            let restored = map_private(&f, size).unwrap();
            let v: u32 = restored.read_obj(GuestAddress(0x1000)).unwrap();
            assert_eq!(v, 0x1122_3344);
            let b: u8 = restored.read_obj(GuestAddress((5 << 20) + 4095)).unwrap();
            assert_eq!(b, 0x55);
            // Writes to the restored guest never reach the file.
            restored.write_obj(7_u32, GuestAddress(0x1000)).unwrap();
            let mut buf = [0u8; 4];
            f.read_exact_at(&mut buf, 0x1000).unwrap();
            assert_eq!(u32::from_le_bytes(buf), 0x1122_3344);
            // Sparse: only the two pages hold blocks.
            use std::os::unix::fs::MetadataExt;
            assert!(f.metadata().unwrap().blocks() * 512 <= 64 * 1024);
        }
    }
}
