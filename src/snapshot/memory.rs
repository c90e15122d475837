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

/// Writes guest memory into `out` (already empty), the regions back to back
/// as in the memfd, skipping all-zero pages. With the memfd at hand, pages
/// the guest never touched are skipped without being read. Returns the bytes
/// written. The VM must be paused.
pub fn write_sparse(
    mem: &GuestMemoryMmap,
    memfd: Option<&File>,
    out: &File,
    total: u64,
) -> std::io::Result<u64> {
    out.set_len(total)?;
    let mut file_offset = 0u64;
    let mut written = 0u64;
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
                }
            }
        }
        file_offset += len;
    }
    Ok(written)
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
            let written = write_sparse(&mem, fd, &out, size).unwrap();
            assert_eq!(written, 2 * PAGE as u64);
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
