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
    #[error("kernel {path}: {why}")]
    BadKernel { path: String, why: String },
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

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EHDR_LEN: usize = 64;
const PHDR_LEN: u64 = 56;
const PT_LOAD: u32 = 1;
const EM_X86_64: u16 = 62;
/// More program headers than any kernel has; what claims more is refused
/// before a table of that size is read.
const MAX_PHDRS: u64 = 256;
/// bzImage setup header fields (Documentation/arch/x86/boot.rst).
const BZ_SETUP_SECTS: usize = 0x1f1;
const BZ_SYSSIZE: usize = 0x1f4;
const BZ_BOOT_FLAG: usize = 0x1fe;
const BZ_HEADER: usize = 0x202;
const BZ_VERSION: usize = 0x206;
const BZ_LOADFLAGS: usize = 0x211;
const BZ_CODE32_START: usize = 0x214;
const BZ_INIT_SIZE: usize = 0x260;
const BZ_LOADED_HIGH: u8 = 1;
/// The oldest boot protocol with `xloadflags` (and so a 64-bit entry).
const BZ_MIN_VERSION: u16 = 0x020c;

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Whether `[addr, addr + len)` lies in one guest RAM region.
fn in_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    use vm_memory::GuestMemoryRegion;
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    mem.iter().any(|r| {
        let start = r.start_addr().raw_value();
        addr >= start && end <= start + r.len()
    })
}

/// Checks an ELF kernel's headers before linux-loader sees it: every
/// loadable segment inside guest RAM above the boot tables (its memory
/// size, not just its file bytes), its file bytes inside the file, and the
/// entry inside a loaded segment. Reads at most the header and
/// `MAX_PHDRS` program headers.
fn check_elf(mem: &GuestMemoryMmap, file: &File, file_len: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut eh = [0u8; EHDR_LEN];
    file.read_exact_at(&mut eh, 0)
        .map_err(|_| format!("an ELF file of {file_len} bytes is too short for its header"))?;
    if eh[4] != 2 || eh[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let machine = le16(&eh, 18);
    if machine != EM_X86_64 {
        return Err(format!(
            "an ELF file for machine {machine}, not x86_64 (62)"
        ));
    }
    let entry = le64(&eh, 24);
    let phoff = le64(&eh, 32);
    let phentsize = u64::from(le16(&eh, 54));
    let phnum = u64::from(le16(&eh, 56));
    if phnum == 0 {
        return Err("the ELF file has no program headers, so nothing to load".into());
    }
    if phentsize != PHDR_LEN {
        return Err(format!(
            "ELF program headers of {phentsize} bytes, not {PHDR_LEN}"
        ));
    }
    if phnum > MAX_PHDRS {
        return Err(format!("{phnum} ELF program headers (at most {MAX_PHDRS})"));
    }
    let table_len = phnum * PHDR_LEN;
    if phoff
        .checked_add(table_len)
        .is_none_or(|end| end > file_len)
    {
        return Err(format!(
            "the ELF program header table ({table_len} bytes at offset {phoff:#x}) lies past \
             the end of the {file_len}-byte file"
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, phoff)
        .map_err(|e| format!("cannot read the ELF program headers: {e}"))?;
    let mut loaded = Vec::new();
    for (i, ph) in table.chunks_exact(PHDR_LEN as usize).enumerate() {
        if le32(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) =
            (le64(ph, 8), le64(ph, 24), le64(ph, 32), le64(ph, 40));
        if filesz > memsz {
            return Err(format!(
                "ELF segment {i} has {filesz} bytes in the file but only {memsz} in memory"
            ));
        }
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(format!(
                "ELF segment {i} ({filesz} bytes at file offset {offset:#x}) lies past the end of \
                 the {file_len}-byte file"
            ));
        }
        if paddr < HIGH_MEMORY_START {
            return Err(format!(
                "ELF segment {i} is loaded at {paddr:#x}, below 1 MiB where the boot tables are"
            ));
        }
        if !in_ram(mem, paddr, memsz) {
            return Err(format!(
                "ELF segment {i} ({memsz} bytes at {paddr:#x}) does not fit in guest RAM; give \
                 the VM more memory or check the kernel"
            ));
        }
        loaded.push((paddr, filesz));
    }
    if loaded.is_empty() {
        return Err("the ELF file has no loadable (PT_LOAD) segment".into());
    }
    if !loaded.iter().any(|&(a, len)| entry >= a && entry - a < len) {
        return Err(format!(
            "the ELF entry point {entry:#x} is not inside a loaded segment"
        ));
    }
    Ok(())
}

/// Checks a bzImage's setup header against the file and guest RAM before
/// linux-loader sees it, so that a header that lies is named for what it
/// claims.
fn check_bzimage(mem: &GuestMemoryMmap, file: &File, file_len: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; 0x268];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| format!("a {file_len}-byte file is too short for a bzImage setup header"))?;
    let version = le16(&h, BZ_VERSION);
    if version < BZ_MIN_VERSION {
        return Err(format!(
            "bzImage boot protocol {}.{:02} is too old (2.12 or later has the 64-bit entry)",
            version >> 8,
            version & 0xff
        ));
    }
    let sects = match h[BZ_SETUP_SECTS] {
        0 => 4,
        n => u64::from(n),
    };
    let setup_len = (sects + 1) * 512;
    if setup_len >= file_len {
        return Err(format!(
            "the bzImage setup header says the setup code is {setup_len} bytes, but the file \
             has only {file_len}"
        ));
    }
    let kernel_len = u64::from(le32(&h, BZ_SYSSIZE)) * 16;
    if kernel_len == 0 || kernel_len > file_len - setup_len {
        return Err(format!(
            "the bzImage setup header says the kernel is {kernel_len} bytes, but the file holds \
             {} after the setup code",
            file_len - setup_len
        ));
    }
    if h[BZ_LOADFLAGS] & BZ_LOADED_HIGH == 0 {
        return Err("a bzImage that loads below 1 MiB (zImage) is not supported".into());
    }
    let load = u64::from(le32(&h, BZ_CODE32_START));
    if load < HIGH_MEMORY_START {
        return Err(format!(
            "the bzImage setup header puts the kernel at {load:#x}, below 1 MiB"
        ));
    }
    let needs = kernel_len.max(u64::from(le32(&h, BZ_INIT_SIZE)));
    if !in_ram(mem, load, needs) {
        return Err(format!(
            "the bzImage needs {needs} bytes of memory at {load:#x}, more than guest RAM has \
             there; give the VM more memory"
        ));
    }
    Ok(())
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
    let bad = |why: String| BootError::BadKernel {
        path: kernel.display().to_string(),
        why,
    };
    let file_len = file
        .metadata()
        .map_err(|source| BootError::Open {
            path: kernel.display().to_string(),
            source,
        })?
        .len();
    // Which format it claims decides which checks it must pass, and which
    // loader's complaint is the one that matters.
    let mut head = [0u8; BZ_HEADER + 4];
    let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).unwrap_or(0);
    let is_elf = n >= 4 && &head[..4] == ELF_MAGIC;
    let is_bz = n == head.len()
        && le16(&head, BZ_BOOT_FLAG) == KERNEL_BOOT_FLAG_MAGIC
        && le32(&head, BZ_HEADER) == KERNEL_HDR_MAGIC;
    if is_elf {
        check_elf(mem, &file, file_len).map_err(bad)?;
    } else if is_bz {
        check_bzimage(mem, &file, file_len).map_err(bad)?;
    } else {
        return Err(bad(
            "neither an ELF vmlinux (no ELF magic) nor a bzImage (no \"HdrS\" setup header)".into(),
        ));
    }
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    if is_bz {
        return load_bzimage(mem, kernel, &mut file, highmem);
    }
    let r = Elf::load(mem, None, &mut file, highmem)
        .map_err(|e| bad(format!("the ELF loader refused it: {e}")))?;
    Ok((
        KernelEntry {
            entry: r.kernel_load.raw_value(),
            kernel_end: r.kernel_end,
        },
        None,
    ))
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    file: &mut File,
    highmem: Option<GuestAddress>,
) -> Result<
    (
        KernelEntry,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    BootError,
> {
    let refused = |why: String| BootError::BadKernel {
        path: kernel.display().to_string(),
        why,
    };
    let r = BzImage::load(mem, None, file, highmem)
        .map_err(|e| refused(format!("the bzImage loader refused it: {e}")))?;
    let hdr = r
        .setup_header
        .ok_or_else(|| refused("the bzImage loader found no setup header".into()))?;
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

    /// A minimal x86_64 ELF: `segs` as (type, paddr, filesz, memsz), each
    /// segment's bytes after the headers.
    fn elf(entry: u64, segs: &[(u32, u64, u64, u64)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_at = phoff + 56 * segs.len() as u64;
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&phoff.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut offset = data_at;
        for &(ty, paddr, filesz, memsz) in segs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&ty.to_le_bytes());
            ph[4..8].copy_from_slice(&5u32.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&paddr.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
            f.extend_from_slice(&ph);
            offset += filesz;
        }
        for &(_, _, filesz, _) in segs {
            f.extend(std::iter::repeat_n(0xf4u8, filesz as usize));
        }
        f
    }

    /// A bzImage header: `setup_sects`, `syssize` (16-byte units),
    /// `code32_start`, `init_size`, and `payload` bytes after the setup.
    fn bzimage(
        setup_sects: u8,
        syssize: u32,
        code32: u32,
        init_size: u32,
        payload: usize,
    ) -> Vec<u8> {
        let setup = (usize::from(setup_sects.max(1)) + 1) * 512;
        let mut f = vec![0u8; setup + payload];
        f[BZ_SETUP_SECTS] = setup_sects;
        f[BZ_SYSSIZE..BZ_SYSSIZE + 4].copy_from_slice(&syssize.to_le_bytes());
        f[BZ_BOOT_FLAG..BZ_BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[BZ_HEADER..BZ_HEADER + 4].copy_from_slice(b"HdrS");
        f[BZ_VERSION..BZ_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        f[BZ_LOADFLAGS] = BZ_LOADED_HIGH;
        f[BZ_CODE32_START..BZ_CODE32_START + 4].copy_from_slice(&code32.to_le_bytes());
        f[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        f[BZ_INIT_SIZE..BZ_INIT_SIZE + 4].copy_from_slice(&init_size.to_le_bytes());
        f
    }

    fn load(bytes: &[u8]) -> Result<KernelEntry, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, bytes).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        load_kernel(&mem, &path)
            .map(|(e, _)| e)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn lying_elf_kernels_are_refused_saying_why() {
        const MIB: u64 = 1 << 20;
        let ok = load(&elf(MIB + 4, &[(PT_LOAD, MIB, 64, 4096)])).unwrap();
        assert_eq!(ok.entry, MIB + 4);
        let cases: &[(Vec<u8>, &str)] = &[
            (
                elf(MIB, &[(4, MIB, 64, 64)]),
                "no loadable (PT_LOAD) segment",
            ),
            (elf(MIB, &[]), "no program headers"),
            // memsz reaching past the 64 MiB of RAM, with few file bytes.
            (
                elf(MIB, &[(PT_LOAD, MIB, 64, 1 << 30)]),
                "does not fit in guest RAM",
            ),
            (
                elf(MIB, &[(PT_LOAD, 63 * MIB, 64, 2 * MIB)]),
                "does not fit in guest RAM",
            ),
            (
                elf(MIB, &[(PT_LOAD, u64::MAX - 8, 64, 64)]),
                "does not fit in guest RAM",
            ),
            (elf(MIB, &[(PT_LOAD, 0x1000, 64, 64)]), "below 1 MiB"),
            (
                elf(2 * MIB, &[(PT_LOAD, MIB, 64, 64)]),
                "entry point 0x200000 is not inside",
            ),
            (elf(MIB, &[(PT_LOAD, MIB, 128, 64)]), "only 64 in memory"),
        ];
        for (bytes, want) in cases {
            let err = load(bytes).unwrap_err();
            assert!(err.contains(want), "wanted {want:?}: {err}");
            assert!(!err.contains("Unable to read"), "{err}");
        }
        // File bytes past the end of the file.
        let mut short = elf(MIB, &[(PT_LOAD, MIB, 4096, 4096)]);
        short.truncate(short.len() - 100);
        assert!(load(&short).unwrap_err().contains("past the end"));
        // A program header table past the end of the file.
        let mut table = elf(MIB, &[(PT_LOAD, MIB, 64, 64)]);
        table[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(load(&table).unwrap_err().contains("program header table"));
        // Not a kernel at all.
        let err = load(&[0x5a; 8192]).unwrap_err();
        assert!(err.contains("neither an ELF vmlinux"), "{err}");
    }

    #[test]
    fn lying_bzimages_are_refused_saying_why() {
        let cases: &[(Vec<u8>, &str)] = &[
            // syssize claims 1 MiB, the file holds 4 KiB after the setup.
            (
                bzimage(4, 1 << 16, 1 << 20, 0, 4096),
                "says the kernel is 1048576 bytes",
            ),
            (
                bzimage(4, 0, 1 << 20, 0, 4096),
                "says the kernel is 0 bytes",
            ),
            (
                {
                    let mut b = bzimage(4, 256, 1 << 20, 0, 4096);
                    b[BZ_SETUP_SECTS] = 200;
                    b
                },
                "setup code is 102912 bytes",
            ),
            (bzimage(4, 256, 0x1000, 0, 4096), "below 1 MiB"),
            (
                bzimage(4, 256, 1 << 20, 1 << 30, 4096),
                "needs 1073741824 bytes",
            ),
            (
                {
                    let mut b = bzimage(4, 256, 1 << 20, 0, 4096);
                    b[BZ_VERSION..BZ_VERSION + 2].copy_from_slice(&0x0204u16.to_le_bytes());
                    b
                },
                "boot protocol 2.04 is too old",
            ),
        ];
        for (bytes, want) in cases {
            let err = load(bytes).unwrap_err();
            assert!(err.contains(want), "wanted {want:?}: {err}");
        }
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
