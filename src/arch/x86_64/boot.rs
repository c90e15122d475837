//! Loading a Linux kernel (ELF vmlinux or bzImage), its command line and
//! initrd, and writing `boot_params` with the e820 map: the x86_64 Linux boot
//! protocol, 64-bit entry.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::layout::*;
use crate::vstate::memory::{ram_ranges, GuestMemoryMmap, MMIO_HOLE_START};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// bzImage: the 64-bit entry sits 0x200 past the protected-mode code start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF vmlinux nor a bzImage ({elf}; {bzimage})")]
    KernelFormat {
        path: String,
        elf: linux_loader::loader::Error,
        bzimage: linux_loader::loader::Error,
    },
    #[error("{0} is a bzImage without a 64-bit entry point")]
    No64BitEntry(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below the kernel")]
    InitrdTooBig { path: String, size: u64 },
    #[error("cannot load initrd {path}: {why}")]
    Initrd { path: String, why: String },
    #[error("cannot write boot_params: {0}")]
    BootParams(linux_loader::configurator::Error),
}

/// Where the guest starts, and what the loader reported.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    pub entry: u64,
    pub kernel_end: u64,
}

fn open(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open {
        path: path.display().to_string(),
        source,
    })
}

/// Loads `kernel` into guest memory and returns its 64-bit entry point plus
/// the bzImage setup header (None for ELF).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
) -> Result<
    (
        KernelEntry,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    BootError,
> {
    let mut file = open(kernel)?;
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let elf_err = match Elf::load(mem, None, &mut file, highmem) {
        Ok(r) => {
            return Ok((
                KernelEntry {
                    entry: r.kernel_load.raw_value(),
                    kernel_end: r.kernel_end,
                },
                None,
            ))
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut file, highmem) {
        Ok(r) => {
            let hdr = r.setup_header.ok_or_else(|| BootError::KernelFormat {
                path: kernel.display().to_string(),
                elf: elf_err,
                bzimage: linux_loader::loader::Error::InvalidKernelStartAddress,
            })?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(kernel.display().to_string()));
            }
            Ok((
                KernelEntry {
                    entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                    kernel_end: r.kernel_end,
                },
                Some(hdr),
            ))
        }
        Err(bz) => Err(BootError::KernelFormat {
            path: kernel.display().to_string(),
            elf: elf_err,
            bzimage: bz,
        }),
    }
}

/// Copies the initrd page-aligned to the top of low RAM; returns
/// `(address, size)`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = open(path)?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Open {
            path: path.display().to_string(),
            source,
        })?
        .len();
    let low_end = mem.last_addr().raw_value().min(MMIO_HOLE_START - 1) + 1;
    let too_big = || BootError::InitrdTooBig {
        path: path.display().to_string(),
        size,
    };
    if size == 0 {
        // Nothing to copy, and no address to give: the top of RAM is not in
        // guest memory, so even an empty slice there does not exist.
        return Ok((0, 0));
    }
    let addr = low_end.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIGH_MEMORY_START) {
        return Err(too_big());
    }
    let mut slice = mem
        .get_slice(GuestAddress(addr), size as usize)
        .map_err(|e| BootError::Initrd {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::Initrd {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    Ok((addr, size))
}

/// The e820 map for RAM of `mem_size` bytes.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let (start, len) = if start.raw_value() == 0 {
            (HIGH_MEMORY_START, len - HIGH_MEMORY_START)
        } else {
            (start.raw_value(), len)
        };
        map.push(boot_e820_entry {
            addr: start,
            size: len,
            r#type: E820_RAM,
        });
    }
    map
}

/// Loads the kernel, command line and initrd and writes `boot_params`;
/// returns the entry point.
pub fn configure_linux_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<u64, BootError> {
    let (entry, setup_header) = load_kernel(mem, kernel)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, entry.kernel_end)?;
        // An empty initrd is no initrd: Linux looks at ramdisk_image only
        // when ramdisk_size is not zero.
        if size > 0 {
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }
    }
    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)?;
    Ok(entry.entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Boots the test kernel's set-up with an initrd holding `contents`.
    fn boot_params_with_initrd(contents: &[u8]) -> (boot_params, GuestMemoryMmap) {
        let dir = tempfile::tempdir().expect("tempdir");
        let initrd = dir.path().join("initrd");
        std::fs::write(&initrd, contents).expect("write initrd");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory");
        let mut cmdline = Cmdline::new(256).expect("cmdline");
        cmdline.insert_str("console=ttyS0").expect("cmdline");
        configure_linux_boot(
            &mem,
            64 << 20,
            Path::new(env!("FERRY_TESTKERNEL")),
            Some(&initrd),
            &cmdline,
        )
        .expect("boot set-up");
        let params = mem
            .read_obj(GuestAddress(ZERO_PAGE_START))
            .expect("boot_params");
        (params, mem)
    }

    #[test]
    fn an_empty_initrd_is_no_initrd() {
        let (params, _) = boot_params_with_initrd(b"");
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!((image, size), (0, 0));
    }

    #[test]
    fn an_initrd_is_copied_page_aligned_below_the_top_of_ram() {
        let (params, mem) = boot_params_with_initrd(b"initrd!");
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!(size, 7);
        assert_eq!(image % 4096, 0);
        assert!(u64::from(image) + 7 <= 64 << 20 && u64::from(image) >= (63 << 20));
        let mut copied = [0u8; 7];
        mem.read_slice(&mut copied, GuestAddress(image.into()))
            .expect("read initrd");
        assert_eq!(&copied, b"initrd!");
    }

    #[test]
    fn e820_small_and_large() {
        let m = e820_map(64 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!((m[2].addr, m[2].size), (1 << 20, 63 << 20));
        let usable: u64 = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(usable, (64 << 20) - (HIGH_MEMORY_START - EBDA_START));
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 4);
        let (addr, size) = (big[3].addr, big[3].size);
        assert_eq!(addr, 1 << 32);
        assert_eq!(size, (5 << 30) - MMIO_HOLE_START);
    }
}
