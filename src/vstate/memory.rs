//! Guest RAM: one memfd, mapped shared, split into regions around the 32-bit
//! MMIO hole. The memfd lets snapshot and migration read guest memory without
//! copying through the mapping, and the per-region bitmap records the writes
//! the VMM itself makes (virtio DMA), which KVM's dirty log cannot see.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

/// Guest memory as the vCPUs and every device see it. The bitmap records the
/// writes the VMM makes into guest memory (DMA by devices), which KVM's dirty
/// log cannot see; live migration merges both.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Start of the 32-bit MMIO hole (devices, IOAPIC, LAPIC).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create): {0}")]
    Memfd(std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes: {source}")]
    SetLen { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Map(vm_memory::mmap::FromRangesError),
}

/// The guest-physical ranges `(start, length)` that RAM of `size` bytes
/// occupies: everything below the hole, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), size - MMIO_HOLE_START),
        ]
    }
}

/// Creates an anonymous memfd of `size` bytes.
pub fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is
    // checked before it is owned by a File.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::SetLen { size, source })?;
    Ok(file)
}

/// Maps `file` (at least `size` bytes) as guest RAM.
pub fn map_guest_memory(file: &File, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        regions.push((start, len as usize, Some(fo)));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)
}

/// Creates a memfd and maps it as guest RAM of `size` bytes.
pub fn create_guest_memory(size: u64) -> Result<(File, GuestMemoryMmap), MemoryError> {
    let file = create_memfd(size)?;
    let mem = map_guest_memory(&file, size)?;
    Ok((file, mem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(MMIO_HOLE_END), (4 << 30) - MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn memory_is_shared_with_the_memfd() {
        use std::os::unix::fs::FileExt;
        let (file, mem) = create_guest_memory(16 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        file.read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        // VMM writes are recorded in the dirty bitmap.
        let region = mem.find_region(GuestAddress(0x1000)).unwrap();
        assert!(region.bitmap().dirty_at(0x1000));
        assert!(!region.bitmap().dirty_at(0x3000));
    }
}
