//! virtio-blk backed by a raw image file.
//!
//! Requests are served synchronously on the event-loop thread with positional
//! I/O (pread/pwrite) straight between the image file and guest memory, so
//! once `process_queue` returns nothing is in flight: pausing the device for
//! a snapshot only needs the event loop to stop calling it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

use crate::devices::persist::Persist;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryError, ReadVolatile, VolatileMemoryError,
    VolatileSlice, WriteVolatile,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateError, GuestErrorLog, GuestMemoryMmap, IrqTrigger, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1, VIRTIO_INT_VRING, VIRTIO_RING_F_INDIRECT_DESC,
};

pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use: the ring minus the header
/// and status descriptors (virtio-blk drivers size their scatter lists by it).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const HEADER_LEN: u64 = 16;
/// The most host memory one mirrored write holds at a time.
const MIRROR_CHUNK: u64 = 1 << 20;
/// virtio_blk_config up to and including blk_size; later fields read as 0.
const CONFIG_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {0} is neither a regular file nor a block device; give the path of a raw image"
    )]
    NotRegularFile(PathBuf),
    #[error(
        "disk image {path} is in use by {holder} ({held} lock); stop the VM that uses it, or attach it read-only everywhere"
    )]
    Locked {
        path: PathBuf,
        holder: String,
        /// The kind of lock that is in the way: "write" or "read".
        held: &'static str,
    },
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of 512; pad or truncate it")]
    UnalignedSize { path: PathBuf, size: u64 },
    #[error("cannot create an event fd for block device {id}: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("saved state describes a disk of {saved} sectors, {path} has {actual}")]
    CapacityMismatch {
        path: PathBuf,
        saved: u64,
        actual: u64,
    },
    #[error("saved acked features {acked:#x} are not offered by this device ({avail:#x}); check read_only")]
    Features { acked: u64, avail: u64 },
    #[error("saved state is of drive {saved:?} (read_only {saved_ro}), restored as drive {id:?} (read_only {ro})")]
    StateMismatch {
        id: String,
        ro: bool,
        saved: String,
        saved_ro: bool,
    },
    #[error("cannot start the request thread of drive {id}: {source}")]
    Worker {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot complete a request in the used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
    #[error("cannot raise the interrupt: {0}")]
    Interrupt(#[source] io::Error),

    // Request failures: reported to the driver as a status byte.
    #[error("request header is {0} bytes, expected 16")]
    HeaderTooShort(u64),
    #[error("descriptor chain has no device-writable byte for the status")]
    NoStatusByte,
    #[error("device-readable descriptor after a device-writable one")]
    DescriptorOrder,
    #[error("descriptor address overflows")]
    AddressOverflow,
    #[error("request of {len} bytes at sector {sector} does not fit the {capacity}-sector disk")]
    OutOfRange {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("flush failed: {0}")]
    Flush(#[source] io::Error),
    #[error("write failed: {0}")]
    Write(#[source] io::Error),
}

impl BlockError {
    fn status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What the guest saw of a block device. The image it is rebuilt on is the
/// restoring host's choice (`BlockArgs`), never a path in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub id: String,
    pub read_only: bool,
    /// Capacity when saved, checked against the image on restore.
    pub sectors: u64,
    pub acked_features: u64,
}

/// A contiguous piece of guest memory in a descriptor chain.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

fn total_len(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// The bytes `[start, start + len)` of the stream formed by `segs`.
fn sub_range(segs: &[Seg], mut start: u64, mut len: u64) -> Result<Vec<Seg>, BlockError> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if start >= s.len {
            start -= s.len;
            continue;
        }
        let take = (s.len - start).min(len);
        let addr = s
            .addr
            .checked_add(start)
            .ok_or(BlockError::AddressOverflow)?;
        out.push(Seg { addr, len: take });
        start = 0;
        len -= take;
    }
    Ok(out)
}

/// The image file at a position that advances with each transfer; it moves
/// data with pread/pwrite so the file's own offset is never used and the fd
/// can be shared with other readers (e.g. a storage migration copier).
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off_t(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EOVERFLOW))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    /// Fills `buf` unless end of file comes first.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.offset(done)?;
            let offset = self.off_t()?;
            let guard = rest.ptr_guard_mut();
            // SAFETY: the fd is open for the lifetime of `self.file`; the
            // guard's pointer is valid for writes of `rest.len()` bytes of
            // mapped guest memory (VolatileSlice invariant) and stays mapped
            // while the guard lives. The kernel writes at most that many.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast::<libc::c_void>(),
                    rest.len(),
                    offset,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Unknown how much landed: report it all as written.
                buf.bitmap().mark_dirty(0, buf.len());
                return Err(VolatileMemoryError::IOError(e));
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            done += n;
            self.offset += n as u64;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        loop {
            let offset = self.off_t()?;
            let guard = buf.ptr_guard();
            // SAFETY: the fd is open for the lifetime of `self.file`; the
            // guard's pointer is valid for reads of `buf.len()` bytes of
            // mapped guest memory while the guard lives.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().cast::<libc::c_void>(),
                    buf.len(),
                    offset,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(VolatileMemoryError::IOError(e));
            }
            self.offset += n as u64;
            return Ok(n as usize);
        }
    }
}

/// The image and what requests are checked against; kept apart from the
/// queue so that a request can borrow it while the queue is borrowed mutably.
/// Receives a copy of every guest write once it is on the local image, and
/// every flush, before the guest sees the request complete. Storage
/// migration uses it to keep a remote copy current; the device knows
/// nothing more about it. A mirror deals with its own failures: the guest's
/// request has succeeded on the local image whatever the mirror does.
pub trait WriteMirror: Send + Sync {
    fn write(&self, offset: u64, data: &[u8]);
    fn flush(&self);
}

struct Disk {
    file: File,
    /// Whether this open file description holds the image lock.
    locked: bool,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    mirror: Option<Arc<dyn WriteMirror>>,
}

impl Disk {
    /// Serves one descriptor chain. Returns the used length (bytes written to
    /// guest memory) and the failure, if any, for the log.
    fn handle(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> (u32, Option<BlockError>) {
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut misordered = false;
        for d in descs {
            let seg = Seg {
                addr: d.addr(),
                len: u64::from(d.len()),
            };
            if d.is_write_only() {
                writable.push(seg);
            } else {
                misordered |= !writable.is_empty();
                readable.push(seg);
            }
        }

        // The status is the last device-writable byte of the chain (any
        // descriptor layout is allowed since VERSION_1).
        let Some(last) = writable.iter().rev().find(|s| s.len > 0) else {
            return (0, Some(BlockError::NoStatusByte));
        };
        let Some(status_addr) = last.addr.checked_add(last.len - 1) else {
            return (0, Some(BlockError::AddressOverflow));
        };
        let data_len = total_len(&writable) - 1;

        let (status, written, err) = if misordered {
            (
                VIRTIO_BLK_S_IOERR as u8,
                0,
                Some(BlockError::DescriptorOrder),
            )
        } else {
            let result = sub_range(&writable, 0, data_len)
                .map_err(|e| (e, 0))
                .and_then(|data| self.execute(mem, &readable, &data, data_len));
            match result {
                Ok(n) => (VIRTIO_BLK_S_OK as u8, n, None),
                Err((e, n)) => (e.status(), n, Some(e)),
            }
        };
        match mem.write_obj(status, status_addr) {
            Ok(()) => (written.saturating_add(1), err),
            Err(e) => (written, Some(BlockError::GuestMemory(e))),
        }
    }

    /// Runs the request; on success returns the bytes written to guest data
    /// buffers, on failure the error and the bytes written before it.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        readable: &[Seg],
        data_in: &[Seg],
        data_in_len: u64,
    ) -> Result<u32, (BlockError, u32)> {
        let fail = |e| (e, 0);
        let readable_len = total_len(readable);
        if readable_len < HEADER_LEN {
            return Err(fail(BlockError::HeaderTooShort(readable_len)));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        let mut pos = 0;
        for s in sub_range(readable, 0, HEADER_LEN).map_err(fail)? {
            let end = pos + s.len as usize;
            mem.read_slice(&mut hdr[pos..end], s.addr)
                .map_err(|e| fail(BlockError::GuestMemory(e)))?;
            pos = end;
        }
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);

        match req_type {
            VIRTIO_BLK_T_IN => {
                let start = self.check_range(sector, data_in_len).map_err(fail)?;
                let mut file = FileAt {
                    file: &self.file,
                    offset: start,
                };
                let res = data_in.iter().try_for_each(|s| {
                    mem.read_exact_volatile_from(s.addr, &mut file, s.len as usize)
                });
                let written = u32::try_from(file.offset - start).unwrap_or(u32::MAX);
                res.map_err(|e| (BlockError::GuestMemory(e), written))?;
                Ok(written)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(fail(BlockError::ReadOnly));
                }
                let len = readable_len - HEADER_LEN;
                let start = self.check_range(sector, len).map_err(fail)?;
                let data = sub_range(readable, HEADER_LEN, len).map_err(fail)?;
                let mut file = FileAt {
                    file: &self.file,
                    offset: start,
                };
                match &self.mirror {
                    None => {
                        for s in &data {
                            mem.write_all_volatile_to(s.addr, &mut file, s.len as usize)
                                .map_err(|e| fail(BlockError::GuestMemory(e)))?;
                        }
                    }
                    Some(mirror) => self
                        .write_mirrored(mem, &data, start, len, mirror.as_ref())
                        .map_err(fail)?,
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.file
                    .sync_data()
                    .map_err(|e| fail(BlockError::Flush(e)))?;
                if let Some(mirror) = &self.mirror {
                    mirror.flush();
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let want = data_in_len.min(ID_BYTES as u64);
                let mut written = 0;
                for s in sub_range(data_in, 0, want).map_err(fail)? {
                    let end = written + s.len as usize;
                    mem.write_slice(&self.id[written..end], s.addr)
                        .map_err(|e| (BlockError::GuestMemory(e), written as u32))?;
                    written = end;
                }
                Ok(written as u32)
            }
            t => Err(fail(BlockError::Unsupported(t))),
        }
    }

    /// A guest write of `len` bytes from `data` to the image at `start` and
    /// to `mirror`. One snapshot of the guest's buffer serves both sides, so
    /// that a guest changing it mid-request cannot make the copy differ from
    /// the image; it is taken a bounded chunk at a time, so that a request of
    /// any length costs at most MIRROR_CHUNK of host memory.
    fn write_mirrored(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Seg],
        start: u64,
        len: u64,
        mirror: &dyn WriteMirror,
    ) -> Result<(), BlockError> {
        let mut buf = vec![0u8; len.min(MIRROR_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(MIRROR_CHUNK);
            let chunk = &mut buf[..n as usize];
            let mut pos = 0;
            for s in sub_range(data, done, n)? {
                let end = pos + s.len as usize;
                mem.read_slice(&mut chunk[pos..end], s.addr)
                    .map_err(BlockError::GuestMemory)?;
                pos = end;
            }
            std::os::unix::fs::FileExt::write_all_at(&self.file, chunk, start + done)
                .map_err(BlockError::Write)?;
            mirror.write(start + done, chunk);
            done += n;
        }
        Ok(())
    }

    /// Checks that `len` bytes at `sector` lie on the disk; returns the byte
    /// offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, BlockError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedLength(len));
        }
        let out_of_range = BlockError::OutOfRange {
            sector,
            len,
            capacity: self.sectors,
        };
        match sector.checked_add(len / SECTOR_SIZE) {
            Some(end) if end <= self.sectors => Ok(sector * SECTOR_SIZE),
            _ => Err(out_of_range),
        }
    }
}

/// One whole-file OFD lock operation (`F_OFD_SETLK` or `F_OFD_GETLK`).
fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_int) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; all zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start = l_len = 0: the whole file, however it grows; l_pid must be 0
    // for OFD locks.
    // SAFETY: fcntl with a lock command reads and (GETLK) writes `fl`, a
    // valid flock owned by this frame; the fd is open for `file`'s lifetime.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

/// A virtio-blk device with one request queue.
pub struct Block {
    id: String,
    path: PathBuf,
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    irq: Arc<IrqTrigger>,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    log: GuestErrorLog,
}

impl Block {
    /// A duplicate of the image's descriptor (same open file description,
    /// so the image lock stays where it is), for a storage copy to read.
    pub fn image_file(&self) -> io::Result<File> {
        self.disk.file.try_clone()
    }

    /// Opens the raw image at `path` (read-write unless `read_only`) and
    /// locks it (see [`Block::lock_image`]).
    pub fn new(id: String, path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let mut block = Block::open_unlocked(id, path, read_only)?;
        block.lock_image()?;
        Ok(block)
    }

    /// Opens the image without taking its lock: for a migration destination
    /// on shared storage, whose source holds the lock until it hands over.
    /// [`Block::lock_image`] must follow before the guest runs.
    pub fn open_unlocked(id: String, path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        use std::os::unix::fs::FileTypeExt;
        let is_disk = |m: &std::fs::Metadata| m.is_file() || m.file_type().is_block_device();
        // Checked before opening: opening a FIFO would block.
        if !is_disk(&std::fs::metadata(path).map_err(open_err)?) {
            return Err(BlockError::NotRegularFile(path.to_path_buf()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !is_disk(&meta) {
            return Err(BlockError::NotRegularFile(path.to_path_buf()));
        }
        // A block device's metadata says 0 bytes; its end says its size.
        let size = if meta.is_file() {
            meta.len()
        } else {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: path.to_path_buf(),
                size,
            });
        }
        let sectors = size / SECTOR_SIZE;

        let mut disk_id = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        disk_id[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
            | (1u64 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        let evt_err = |source| BlockError::EventFd {
            id: id.clone(),
            source,
        };
        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(evt_err)?;
        let irq = IrqTrigger::new().map_err(evt_err)?;

        Ok(Block {
            path: path.to_path_buf(),
            disk: Disk {
                file,
                locked: false,
                sectors,
                read_only,
                id: disk_id,
                mirror: None,
            },
            id,
            avail_features,
            acked_features: 0,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            queue_evts: [queue_evt],
            irq: Arc::new(irq),
            mem: None,
            queues: Vec::new(),
            log: GuestErrorLog::new("virtio-blk"),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Locks the image as QEMU does, so that no two VMs write one image:
    /// exclusively when writable, shared when read-only. OFD locks belong to
    /// this open file description, so a second open of the same inode (a
    /// hard link, a symlink, the same file named twice) conflicts even in
    /// this process, and the lock goes away with the last fd. Idempotent.
    pub fn lock_image(&mut self) -> Result<(), BlockError> {
        if self.disk.locked {
            return Ok(());
        }
        let kind = if self.disk.read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        match ofd_lock(&self.disk.file, libc::F_OFD_SETLK, kind) {
            Ok(_) => {
                self.disk.locked = true;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                // Who is in the way, if the kernel tells: OFD locks (ours,
                // QEMU's) report no pid, classic POSIX locks do.
                let (holder, held) = match ofd_lock(&self.disk.file, libc::F_OFD_GETLK, kind) {
                    Ok(l) if l.l_type == libc::F_UNLCK as i16 => ("another process".into(), "a"),
                    Ok(l) => (
                        if l.l_pid > 0 {
                            format!("process {}", l.l_pid)
                        } else {
                            "another process".into()
                        },
                        if l.l_type == libc::F_WRLCK as i16 {
                            "write"
                        } else {
                            "read"
                        },
                    ),
                    Err(_) => ("another process".into(), "a"),
                };
                Err(BlockError::Locked {
                    path: self.path.clone(),
                    holder,
                    held,
                })
            }
            Err(source) => Err(BlockError::Lock {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Gives the image lock up: the guest runs elsewhere now (a migration
    /// hand-over on shared storage), or is about to.
    pub fn unlock_image(&mut self) -> Result<(), BlockError> {
        if !self.disk.locked {
            return Ok(());
        }
        ofd_lock(&self.disk.file, libc::F_OFD_SETLK, libc::F_UNLCK).map_err(|source| {
            BlockError::Lock {
                path: self.path.clone(),
                source,
            }
        })?;
        self.disk.locked = false;
        Ok(())
    }

    pub fn image_locked(&self) -> bool {
        self.disk.locked
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors
    }

    /// Serves every available request, then raises the interrupt if the
    /// driver wants one. Returns whether any request was completed.
    /// Starts (Some) or stops (None) mirroring guest writes and flushes.
    pub fn set_mirror(&mut self, mirror: Option<Arc<dyn WriteMirror>>) {
        self.disk.mirror = mirror;
    }

    pub fn process_queue(&mut self) -> Result<bool, BlockError> {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.first_mut()) else {
            return Ok(false);
        };
        let mut completed = false;
        let mut descs = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            descs.clear();
            descs.extend(chain);
            let (len, err) = self.disk.handle(mem, &descs);
            if let Some(e) = err {
                self.log
                    .log(format_args!("{}: request {head}: {e}", self.id));
            }
            queue
                .add_used(mem, head, len)
                .map_err(BlockError::UsedRing)?;
            completed = true;
        }
        if completed && super::needs_interrupt(queue, mem).map_err(BlockError::UsedRing)? {
            self.irq
                .trigger(VIRTIO_INT_VRING)
                .map_err(BlockError::Interrupt)?;
        }
        Ok(completed)
    }
}

/// Serves a drive's requests on a thread of its own, instead of the event
/// loop: a slow request (a write mirrored over the network during a storage
/// migration, a flush) then holds up only this drive, never the network
/// devices, the console or the control socket. Requests are served in ring
/// order, one batch at a time, exactly as [`Block::process_queue`] does; a
/// request completes once it is done (on the image and, while mirroring, on
/// the copy). Quiescing takes the device's lock, so it waits for the batch
/// in progress. Dropping the worker stops the thread.
pub struct BlockWorker {
    stop: EventFd,
}

impl BlockWorker {
    /// Starts serving `block` (its queue event wakes the thread).
    pub fn start(block: &Arc<Mutex<Block>>) -> Result<BlockWorker, BlockError> {
        let (id, evt) = {
            let b = crate::util::lock(block);
            (b.id.clone(), b.queue_evts[0].try_clone())
        };
        let err = |source| BlockError::Worker {
            id: id.clone(),
            source,
        };
        let evt = evt.map_err(err)?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(err)?;
        let stopped = stop.try_clone().map_err(err)?;
        let weak = Arc::downgrade(block);
        // Issue 10: narrowed before it serves a request; a list that cannot
        // go in fails the start, instead of leaving the drive unserved.
        crate::security::spawn_narrowed(
            format!("blk-{}", id.chars().take(11).collect::<String>()),
            ThreadFilter::Block,
            move || serve(&weak, &evt, &stopped),
        )
        .map_err(err)?;
        Ok(BlockWorker { stop })
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

use crate::security::ThreadFilter;

/// The worker's loop: wait for the queue event (or the stop), serve.
fn serve(block: &Weak<Mutex<Block>>, evt: &EventFd, stop: &EventFd) {
    loop {
        // A worker started before the process filter was in (library use)
        // narrows itself once it is.
        if !crate::security::narrow_thread("virtio-blk request thread", ThreadFilter::Block) {
            return;
        }
        let mut fds = [
            libc::pollfd {
                fd: evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, owned by this frame.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!(
                "ferry: virtio-blk: request thread: poll: {}",
                io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let _ = evt.read();
        let Some(block) = block.upgrade() else {
            return;
        };
        let mut guard = crate::util::lock(&block);
        let b = &mut *guard;
        if let Err(e) = b.process_queue() {
            b.log.log(format_args!("{}: {e}", b.id));
        }
    }
}

/// The drive a block device is rebuilt as: from this host's config.
#[derive(Debug, Clone)]
pub struct BlockArgs {
    pub id: String,
    pub path: PathBuf,
    pub read_only: bool,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: self.id.clone(),
            read_only: self.disk.read_only,
            sectors: self.disk.sectors,
            acked_features: self.acked_features,
        }
    }

    /// Opens `args.path` and checks that it is the disk the guest saw. The
    /// transport's restore activates the device. The image is not locked:
    /// when to lock is the caller's choice (a migration destination on
    /// shared storage may only lock once the source has let go).
    fn restore(args: BlockArgs, state: &BlockState) -> Result<Block, BlockError> {
        let mut block = Block::open_unlocked(args.id, &args.path, args.read_only)?;
        if block.disk.sectors != state.sectors {
            return Err(BlockError::CapacityMismatch {
                path: args.path,
                saved: state.sectors,
                actual: block.disk.sectors,
            });
        }
        if state.acked_features & !block.avail_features != 0 {
            return Err(BlockError::Features {
                acked: state.acked_features,
                avail: block.avail_features,
            });
        }
        if block.id != state.id || block.disk.read_only != state.read_only {
            return Err(BlockError::StateMismatch {
                id: block.id,
                ro: block.disk.read_only,
                saved: state.id.clone(),
                saved_ro: state.read_only,
            });
        }
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.log.log(format_args!(
            "{}: {}-byte write to read-only config space at {offset:#x}; ignored",
            self.id,
            data.len()
        ));
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.mem.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().position(|q| !q.is_valid(&mem)) {
            return Err(ActivateError::InvalidQueue(i));
        }
        self.mem = Some(mem);
        self.queues = queues;
        // Requests made available before a snapshot may never have been
        // announced to this instance: look at the ring once.
        self.queue_evts[0]
            .write(1)
            .map_err(ActivateError::QueueEvent)
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn reset(&mut self) {
        self.mem = None;
        self.queues.clear();
        self.acked_features = 0;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                eprintln!(
                    "ferry: virtio-blk: {}: cannot watch queue {i} event: {e:?}",
                    self.id
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(evt) = self.queue_evts.get(index) else {
            self.log
                .log(format_args!("{}: event for unknown queue {index}", self.id));
            return;
        };
        if !events.event_set().contains(EventSet::IN) {
            self.log.log(format_args!(
                "{}: unexpected events {:?} on queue {index}",
                self.id,
                events.event_set()
            ));
            return;
        }
        if let Err(e) = evt.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                self.log.log(format_args!(
                    "{}: reading queue {index} event: {e}",
                    self.id
                ));
            }
        }
        if let Err(e) = self.process_queue() {
            self.log.log(format_args!("{}: {e}", self.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::Mutex;

    use event_manager::{EventManager, SubscriberOps};
    use tempfile::NamedTempFile;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

    use super::*;

    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const INDIRECT: u64 = 0x4_0000;
    const UNTOUCHED: u64 = 0x5_0000;
    const MEM_SIZE: usize = 0x10_0000;
    const DISK_SECTORS: u64 = 64;

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// An image whose every byte is derived from its offset.
    fn image(sectors: u64) -> NamedTempFile {
        let mut f = NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        f
    }

    fn file_bytes(f: &NamedTempFile) -> Vec<u8> {
        let mut v = Vec::new();
        let mut file = f.reopen().unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut v).unwrap();
        v
    }

    fn activated(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        path: &Path,
        ro: bool,
    ) -> Block {
        let mut block = Block::new("disk-0".to_string(), path, ro).unwrap();
        block.set_acked_features(block.avail_features());
        block
            .activate(mem.clone(), vec![vq.create_queue::<Queue>().unwrap()])
            .unwrap();
        // Drain the activation kick.
        assert_eq!(block.queue_events()[0].read().unwrap(), 1);
        block
    }

    /// Publishes one chain whose descriptors start at index `*next`.
    fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, next: &mut u16, parts: &[(u64, u32, u16)]) {
        let first = *next;
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i == parts.len() - 1;
                let idx = first + i as u16;
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(Descriptor::new(
                    addr,
                    len,
                    flags,
                    if last { 0 } else { idx + 1 },
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
        *next += parts.len() as u16;
    }

    fn write_header(mem: &GuestMemoryMmap, req_type: u32, sector: u64) {
        mem.write_obj(req_type, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Publishes a request in the usual three-part layout.
    fn add_request(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        next: &mut u16,
        req_type: u32,
        sector: u64,
        data: Option<(u32, u16)>,
    ) {
        write_header(mem, req_type, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut parts = vec![(HDR, 16, R)];
        if let Some((len, flags)) = data {
            parts.push((DATA, len, flags));
        }
        parts.push((STATUS, 1, W));
        add_chain(vq, next, &parts);
    }

    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i as usize).unwrap().load();
        (e.id(), e.len())
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    #[test]
    fn write_then_read_roundtrip() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;

        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_OUT, 3, Some((1024, R)));
        assert!(block.process_queue().unwrap());
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 1));
        let on_disk = file_bytes(&img);
        assert_eq!(&on_disk[3 * 512..5 * 512], &pattern[..]);
        // Neighbours untouched.
        assert_eq!(on_disk[3 * 512 - 1], ((3 * 512 - 1) % 251) as u8);
        assert_eq!(on_disk[5 * 512], ((5 * 512) % 251) as u8);

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_IN, 3, Some((1024, W)));
        assert!(block.process_queue().unwrap());
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(used(&vq, 1), (3, 1024 + 1));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);

        // Nothing left to do.
        assert!(!block.process_queue().unwrap());
    }

    #[derive(Default)]
    struct RecordingMirror {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
        flushes: std::sync::atomic::AtomicU32,
    }

    impl WriteMirror for RecordingMirror {
        fn write(&self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
        fn flush(&self) {
            self.flushes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn mirror_sees_every_write_and_flush_after_the_image() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mirror = Arc::new(RecordingMirror::default());
        block.set_mirror(Some(mirror.clone()));
        let mut next = 0;
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 1) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_OUT, 5, Some((1024, R)));
        assert!(block.process_queue().unwrap());
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(block.process_queue().unwrap());
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let on_disk = file_bytes(&img);
        assert_eq!(&on_disk[5 * 512..7 * 512], &pattern[..]);
        let writes = mirror.writes.lock().unwrap().clone();
        assert_eq!(writes, vec![(5 * 512, pattern.clone())]);
        assert_eq!(mirror.flushes.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Reads are not mirrored; a detached mirror sees nothing more.
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_IN, 5, Some((1024, W)));
        assert!(block.process_queue().unwrap());
        block.set_mirror(None);
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_OUT, 9, Some((1024, R)));
        assert!(block.process_queue().unwrap());
        assert_eq!(mirror.writes.lock().unwrap().len(), 1);
    }

    #[test]
    fn long_mirrored_write_goes_in_bounded_chunks() {
        // 3 MiB + 512 over three descriptors whose edges do not fall on
        // chunk edges.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let img = image(8 << 11);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mirror = Arc::new(RecordingMirror::default());
        block.set_mirror(Some(mirror.clone()));
        let lens = [3 << 19, 1 << 20, (1 << 19) + 512];
        let total: usize = lens.iter().sum();
        let pattern: Vec<u8> = (0..total).map(|i| (i * 31 / 7) as u8).collect();
        let base = 1u64 << 20;
        mem.write_slice(&pattern, GuestAddress(base)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 8);
        let mut parts = vec![(HDR, 16, R)];
        let mut at = base;
        for l in lens {
            parts.push((at, l as u32, R));
            at += l as u64;
        }
        parts.push((STATUS, 1, W));
        let mut next = 0;
        add_chain(&vq, &mut next, &parts);
        assert!(block.process_queue().unwrap());
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let on_disk = file_bytes(&img);
        assert_eq!(&on_disk[8 * 512..8 * 512 + total], &pattern[..]);
        let writes = mirror.writes.lock().unwrap().clone();
        assert_eq!(writes.len(), 4, "3 MiB + 512 in 1 MiB chunks");
        let mut expect_at = 8 * 512;
        let mut seen = Vec::new();
        for (offset, data) in &writes {
            assert!(data.len() as u64 <= MIRROR_CHUNK);
            assert_eq!(*offset, expect_at);
            expect_at += data.len() as u64;
            seen.extend_from_slice(data);
        }
        assert_eq!(seen, pattern);
    }

    #[test]
    fn read_scattered_over_descriptors_and_any_layout() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        // Sector 1 read into a 100-byte piece, a 412-byte piece, and a last
        // descriptor holding both the final 512 data bytes and the status.
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        add_chain(
            &vq,
            &mut next,
            &[
                (HDR, 16, R),
                (DATA, 100, W),
                (DATA + 0x1000, 412, W),
                (DATA + 0x2000, 513, W),
            ],
        );
        block.process_queue().unwrap();
        assert_eq!(used(&vq, 0), (0, 1025));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(DATA + 0x2000 + 512))
                .unwrap(),
            0
        );
        let expect: Vec<u8> = (512..1536u64).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got[..100], GuestAddress(DATA)).unwrap();
        mem.read_slice(&mut got[100..512], GuestAddress(DATA + 0x1000))
            .unwrap();
        mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x2000))
            .unwrap();
        assert_eq!(got, expect);
    }

    #[test]
    fn indirect_descriptors() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        assert_ne!(
            block.acked_features() & (1 << VIRTIO_RING_F_INDIRECT_DESC),
            0
        );
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let table = [(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)];
        for (i, &(addr, len, flags)) in table.iter().enumerate() {
            let (flags, next) = if i < 2 {
                (flags | VRING_DESC_F_NEXT as u16, i as u16 + 1)
            } else {
                (flags, 0)
            };
            let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(INDIRECT + 16 * i as u64))
                .unwrap();
        }
        let mut next = 0;
        add_chain(
            &vq,
            &mut next,
            &[(INDIRECT, 48, VRING_DESC_F_INDIRECT as u16)],
        );
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 513));
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(
            got,
            (0..512u64).map(|i| (i % 251) as u8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn flush() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 1));
    }

    #[test]
    fn get_id_exact_bytes() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        mem.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_GET_ID, 0, Some((32, W)));
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(used(&vq, 0), (0, 21));
        let mut got = [0u8; 32];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let mut expect = [0u8; 32];
        expect[..6].copy_from_slice(b"disk-0");
        expect[20..].fill(0xaa);
        assert_eq!(got, expect);

        // Longer ids are truncated to 20 bytes, without a terminator. The
        // first device lets go of the image (and its lock) first.
        drop(block);
        let long = "abcdefghijklmnopqrstuvwxyz".to_string();
        let mut block = Block::new(long, img.path(), false).unwrap();
        let vq2 = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        block
            .activate(mem.clone(), vec![vq2.create_queue::<Queue>().unwrap()])
            .unwrap();
        let mut next = 0;
        add_request(&mem, &vq2, &mut next, VIRTIO_BLK_T_GET_ID, 0, Some((20, W)));
        block.process_queue().unwrap();
        mem.read_slice(&mut got[..20], GuestAddress(DATA)).unwrap();
        assert_eq!(&got[..20], b"abcdefghijklmnopqrst");
        assert_eq!(used(&vq2, 0), (0, 21));
    }

    #[test]
    fn read_only_refuses_out() {
        let img = image(DISK_SECTORS);
        let before = file_bytes(&img);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), true);
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut next = 0;
        mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_OUT, 0, Some((512, R)));
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(used(&vq, 0), (0, 1));
        assert_eq!(file_bytes(&img), before);

        // Reads still work.
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_IN, 0, Some((512, W)));
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn past_end_fails_and_touches_nothing() {
        let img = image(DISK_SECTORS);
        let before = file_bytes(&img);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;

        mem.write_slice(&[0x77; 1024], GuestAddress(DATA)).unwrap();
        for (t, sector, flags) in [
            (VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, R),
            (VIRTIO_BLK_T_IN, DISK_SECTORS - 1, W),
            (VIRTIO_BLK_T_IN, u64::MAX, W),
            (VIRTIO_BLK_T_OUT, u64::MAX - 1, R),
        ] {
            add_request(&mem, &vq, &mut next, t, sector, Some((1024, flags)));
            assert!(block.process_queue().unwrap());
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "type {t} sector {sector}");
            let mut buf = [0u8; 1024];
            mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
            assert_eq!(buf, [0x77; 1024]);
        }
        assert_eq!(file_bytes(&img), before);

        // The last sector itself is fine.
        add_request(
            &mem,
            &vq,
            &mut next,
            VIRTIO_BLK_T_OUT,
            DISK_SECTORS - 1,
            Some((512, R)),
        );
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn unaligned_length_fails() {
        let img = image(DISK_SECTORS);
        let before = file_bytes(&img);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_OUT, 0, Some((100, R)));
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(file_bytes(&img), before);
    }

    #[test]
    fn unsupported_type() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        for t in [virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD, 0xdead] {
            add_request(&mem, &vq, &mut next, t, 0, Some((512, W)));
            block.process_queue().unwrap();
            assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
        }
        assert_eq!(used(&vq, 1), (3, 1));
    }

    #[test]
    fn malformed_chains() {
        let img = image(DISK_SECTORS);
        let before = file_bytes(&img);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 32);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();

        // No device-writable descriptor at all: consumed with length 0.
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        add_chain(&vq, &mut next, &[(HDR, 16, R), (DATA, 512, R)]);
        block.process_queue().unwrap();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(file_bytes(&img), before);

        // Header device-writable: nothing readable, IOERR in the status.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_chain(
            &vq,
            &mut next,
            &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)],
        );
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
        assert_eq!(used(&vq, 1), (2, 1));
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(HDR)).unwrap(),
            VIRTIO_BLK_T_IN
        );

        // Header too short.
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_chain(&vq, &mut next, &[(HDR, 8, R), (STATUS, 1, W)]);
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Readable after writable.
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_chain(
            &vq,
            &mut next,
            &[
                (HDR, 16, R),
                (DATA + 0x1000, 8, W),
                (DATA, 512, R),
                (STATUS, 1, W),
            ],
        );
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Data buffer outside guest memory.
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_chain(
            &vq,
            &mut next,
            &[
                (HDR, 16, R),
                (MEM_SIZE as u64 - 256, 512, W),
                (STATUS, 1, W),
            ],
        );
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Status byte outside guest memory: consumed, nothing written.
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        add_chain(&vq, &mut next, &[(HDR, 16, R), (1 << 40, 1, W)]);
        block.process_queue().unwrap();

        // Header outside guest memory.
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_chain(&vq, &mut next, &[(u64::MAX - 8, 16, R), (STATUS, 1, W)]);
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);

        // Indirect table with a bad length ends the chain: no status.
        add_chain(
            &vq,
            &mut next,
            &[(INDIRECT, 17, VRING_DESC_F_INDIRECT as u16)],
        );
        block.process_queue().unwrap();

        assert_eq!(vq.used().idx().load(), 8);
        assert_eq!(used(&vq, 5).1, 0);
        assert_eq!(used(&vq, 7).1, 0);
        assert_eq!(file_bytes(&img), before);

        // The queue still works afterwards.
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn interrupt_raised_after_completion() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let irq = block.interrupt().clone();
        assert!(!block.process_queue().unwrap());
        assert_eq!(irq.status(), 0);
        assert!(irq.evt().read().is_err());

        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        block.process_queue().unwrap();
        assert_eq!(vq.used().idx().load(), 2);
        assert_eq!(irq.status(), VIRTIO_INT_VRING);
        // One interrupt for the batch.
        assert_eq!(irq.evt().read().unwrap(), 1);
    }

    #[test]
    fn no_interrupt_for_a_driver_that_asks_for_none() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let irq = block.interrupt().clone();
        let mut next = 0;
        // A polling driver: VRING_AVAIL_F_NO_INTERRUPT in the avail ring.
        mem.write_obj(1u16, vq.avail_addr()).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(block.process_queue().unwrap());
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        assert_eq!(irq.status(), 0);
        assert!(irq.evt().read().is_err(), "an interrupt the driver refused");
        // It clears the flag: the next completion interrupts again.
        mem.write_obj(0u16, vq.avail_addr()).unwrap();
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(block.process_queue().unwrap());
        assert_eq!(irq.status(), VIRTIO_INT_VRING);
        assert_eq!(irq.evt().read().unwrap(), 1);
    }

    #[test]
    fn device_writes_mark_dirty_bitmap() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let mut block = activated(&mem, &vq, img.path(), false);
        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_IN, 0, Some((8192, W)));
        // Forget what the test itself wrote.
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let mmap: &MmapRegion<_> = region;
        mmap.bitmap().reset();
        assert!(!region.bitmap().dirty_at(DATA as usize));

        block.process_queue().unwrap();
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        let bitmap = region.bitmap();
        assert!(bitmap.dirty_at(DATA as usize));
        assert!(bitmap.dirty_at(DATA as usize + 4096));
        assert!(bitmap.dirty_at(STATUS as usize));
        assert!(bitmap.dirty_at(vq.used_addr().0 as usize));
        // Read by the device only.
        assert!(!bitmap.dirty_at(HDR as usize));
        assert!(!bitmap.dirty_at(DATA as usize + 8192));
        assert!(!bitmap.dirty_at(UNTOUCHED as usize));
    }

    #[test]
    fn config_space() {
        let img = image(DISK_SECTORS);
        let block = Block::new("d".into(), img.path(), false).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
        let mut w = [0u8; 4];
        block.read_config(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), u32::from(QUEUE_SIZE) - 2);
        block.read_config(20, &mut w);
        assert_eq!(u32::from_le_bytes(w), 512);
        // Straddling and past the end read as zero.
        let mut w = [0xffu8; 8];
        block.read_config(20, &mut w);
        assert_eq!(w, [0, 2, 0, 0, 0, 0, 0, 0]);
        block.read_config(u64::MAX, &mut w);
        assert_eq!(w, [0; 8]);
        let f = block.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(block.device_type(), TYPE_BLOCK);
        assert_eq!(block.queue_max_sizes(), &[256]);
    }

    #[test]
    fn image_locks_keep_a_second_writer_out() {
        let img = image(DISK_SECTORS);
        let mut first = Block::new("a".into(), img.path(), false).unwrap();
        assert!(first.image_locked());
        // A second open file description of the same inode conflicts, in
        // this process too.
        for ro in [false, true] {
            match Block::new("b".into(), img.path(), ro) {
                Err(BlockError::Locked { path, held, .. }) => {
                    assert_eq!(path, img.path());
                    assert_eq!(held, "write");
                }
                other => panic!("expected a lock conflict, got {:?}", other.err()),
            }
        }
        // Unlocked (a migration hand-over), another may take it; ours then
        // cannot be taken back until that one lets go.
        first.unlock_image().unwrap();
        let second = Block::new("b".into(), img.path(), false).unwrap();
        assert!(matches!(first.lock_image(), Err(BlockError::Locked { .. })));
        drop(second);
        first.lock_image().unwrap();
        // Readers share.
        drop(first);
        let r1 = Block::new("r1".into(), img.path(), true).unwrap();
        let r2 = Block::new("r2".into(), img.path(), true).unwrap();
        assert!(r1.image_locked() && r2.image_locked());
        match Block::new("w".into(), img.path(), false) {
            Err(BlockError::Locked { held, .. }) => assert_eq!(held, "read"),
            other => panic!("expected a lock conflict, got {:?}", other.err()),
        }
        // Opened for a migration destination: no lock until asked.
        let unlocked = Block::open_unlocked("u".into(), img.path(), false).unwrap();
        assert!(!unlocked.image_locked());
    }

    #[test]
    fn refuses_bad_images() {
        let dir = tempfile::tempdir().unwrap();
        let err = Block::new("d".into(), dir.path(), false).err().unwrap();
        assert!(matches!(err, BlockError::NotRegularFile(_)), "{err}");

        let mut f = NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 1000]).unwrap();
        let err = Block::new("d".into(), f.path(), false).err().unwrap();
        assert!(
            matches!(err, BlockError::UnalignedSize { size: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not a multiple of 512"));

        let err = Block::new("d".into(), &dir.path().join("missing"), true)
            .err()
            .unwrap();
        assert!(matches!(err, BlockError::Open { .. }), "{err}");
    }

    #[test]
    fn not_processed_before_activation_or_after_reset() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut block = Block::new("d".into(), img.path(), false).unwrap();
        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        assert!(!block.process_queue().unwrap());
        assert_eq!(vq.used().idx().load(), 0);

        block
            .activate(mem.clone(), vec![vq.create_queue::<Queue>().unwrap()])
            .unwrap();
        assert!(matches!(
            block.activate(mem.clone(), vec![vq.create_queue::<Queue>().unwrap()]),
            Err(ActivateError::AlreadyActivated)
        ));
        block.reset();
        assert!(!block.is_activated());
        assert!(!block.process_queue().unwrap());
        assert!(matches!(
            block.activate(mem.clone(), vec![]),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
    }

    #[test]
    fn event_manager_drives_the_queue() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Arc::new(Mutex::new(activated(&mem, &vq, img.path(), false)));
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(block.clone());

        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        block.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        // The event was consumed.
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
    }

    /// The request thread serves the queue when it is notified, and goes
    /// when its worker is dropped (the device stays usable).
    #[test]
    fn a_worker_thread_serves_the_queue_until_dropped() {
        let img = image(DISK_SECTORS);
        let mem = test_mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let block = Arc::new(Mutex::new(activated(&mem, &vq, img.path(), false)));
        let _ = block.lock().unwrap().queue_events()[0].read();
        let worker = BlockWorker::start(&block).unwrap();
        let mut next = 0;
        add_request(&mem, &vq, &mut next, VIRTIO_BLK_T_FLUSH, 0, None);
        block.lock().unwrap().queue_events()[0].write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while vq.used().idx().load() != 1 {
            assert!(std::time::Instant::now() < deadline, "not served");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
        drop(worker);
        // Only the test holds the device now that the thread is gone.
        while Arc::strong_count(&block) != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "thread still holds it"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn state_roundtrip() {
        let img = image(DISK_SECTORS);
        let mut block = Block::new("disk-0".into(), img.path(), true).unwrap();
        block.set_acked_features(block.avail_features() | (1 << 40));
        let state = block.save();
        assert_eq!(state.acked_features, block.avail_features());
        let json = serde_json::to_string(&state).unwrap();
        let back: BlockState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let args = BlockArgs {
            id: "disk-0".into(),
            path: img.path().to_path_buf(),
            read_only: true,
        };
        let restored = Block::restore(args.clone(), &back).unwrap();
        assert_eq!(restored.save(), state);

        let mut wrong = state.clone();
        wrong.sectors += 1;
        assert!(matches!(
            Block::restore(args.clone(), &wrong),
            Err(BlockError::CapacityMismatch { .. })
        ));
        // RO was negotiated; a writable device does not offer it.
        let writable = BlockArgs {
            read_only: false,
            ..args.clone()
        };
        assert!(matches!(
            Block::restore(writable, &state),
            Err(BlockError::Features { .. })
        ));
        // The state of another drive is refused.
        let other = BlockArgs {
            id: "disk-1".into(),
            ..args
        };
        assert!(matches!(
            Block::restore(other, &state),
            Err(BlockError::StateMismatch { .. })
        ));
        // Saved state from before drive paths left it still loads.
        let old = r#"{"id":"disk-0","path":"/elsewhere/x.img","read_only":true,"sectors":0,"acked_features":0}"#;
        let old: BlockState = serde_json::from_str(old).unwrap();
        assert_eq!(old.id, "disk-0");
    }
}
