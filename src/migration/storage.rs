//! Storage migration: the VM's files are copied into the share while the
//! guest runs — disk images in large chunks in the background, skipping
//! holes and all-zero runs so sparse images stay sparse — and from the
//! moment the copy starts every guest write is mirrored to the copy before
//! the guest sees it complete, so the copy converges whatever the guest
//! does.
//!
//! A chunk being copied and a guest write to the same range never leave
//! stale data: both take the chunk's lock around their write to the copy,
//! and the mirror writes only after the guest's data is on the local image.
//! So if the copier read the chunk before the guest wrote it, the mirror's
//! write lands after the copier's; if after, the copier read the new data.

use crate::util::lock;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::share::{Share, ShareError, ShareFile};
use crate::devices::virtio::block::WriteMirror;
use crate::sparse::{data_extents, is_zero};

/// The bulk copier's unit of work and of locking: large enough for the
/// network, small enough that a guest write to the chunk being copied, or
/// queued behind its transfer, does not wait long.
pub const CHUNK: u64 = 1 << 20;
/// While the guest writes (a mirrored write within this window), the copier
/// leaves it this much room before each chunk, so that mirrored writes do
/// not queue behind the bulk copy: guest I/O comes first, the copy still
/// progresses.
const GUEST_ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);
const GUEST_ROOM: std::time::Duration = std::time::Duration::from_millis(3);
/// Zero detection granularity inside a chunk: runs of zero blocks of this
/// size are not written, so they stay holes on the destination.
const ZERO_BLOCK: usize = 64 << 10;
/// A bandwidth-limit wait looks at its cancel flag this often.
const PACER_SLICE: std::time::Duration = std::time::Duration::from_millis(10);

/// Locks over chunk indices of one file.
#[derive(Default)]
struct ChunkLocks {
    held: Mutex<HashSet<u64>>,
    cond: Condvar,
}

struct ChunkGuard<'a> {
    locks: &'a ChunkLocks,
    chunks: std::ops::RangeInclusive<u64>,
}

impl ChunkLocks {
    /// Takes chunks `first..=last`, all at once, waiting while any is held.
    fn lock(&self, first: u64, last: u64) -> ChunkGuard<'_> {
        let mut held = lock(&self.held);
        while (first..=last).any(|c| held.contains(&c)) {
            held = self.cond.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        for c in first..=last {
            held.insert(c);
        }
        ChunkGuard {
            locks: self,
            chunks: first..=last,
        }
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.locks.held);
        for c in self.chunks.clone() {
            held.remove(&c);
        }
        self.locks.cond.notify_all();
    }
}

/// Paces everything a migration sends to `bandwidth_mib_s`: memory frames
/// and the bulk storage copy draw from the same budget.
pub struct Pacer {
    start: std::time::Instant,
    bytes_per_s: Option<f64>,
    sent: AtomicU64,
}

impl Pacer {
    pub fn new(bytes_per_s: Option<f64>) -> Pacer {
        Pacer {
            start: std::time::Instant::now(),
            bytes_per_s,
            sent: AtomicU64::new(0),
        }
    }

    /// Accounts for `n` bytes and sleeps as long as the budget requires, or
    /// until `cancel` is set: at a low limit one chunk's wait is seconds.
    pub fn consume(&self, n: u64, cancel: &AtomicBool) {
        let total = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(rate) = self.bytes_per_s {
            let due = std::time::Duration::from_secs_f64(total as f64 / rate);
            while !cancel.load(Ordering::SeqCst) {
                let Some(rest) = due.checked_sub(self.start.elapsed()) else {
                    break;
                };
                std::thread::sleep(rest.min(PACER_SLICE));
            }
        }
    }
}

/// Counters and the first failure, shared by the copier and the mirrors.
#[derive(Default)]
pub struct StorageProgress {
    pub total_bytes: u64,
    pub copied_bytes: AtomicU64,
    pub mirrored_writes: AtomicU64,
    pub mirrored_bytes: AtomicU64,
    pub copy_done: AtomicBool,
    cancel: AtomicBool,
    /// When the last mirrored write started, in ns since `epoch`.
    last_mirror_ns: AtomicU64,
    epoch: std::sync::OnceLock<std::time::Instant>,
    failure: Mutex<Option<Arc<StorageError>>>,
}

impl StorageProgress {
    fn fail(&self, why: StorageError) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            *f = Some(Arc::new(why));
        }
    }

    /// The first failure of the copier or a mirror.
    pub fn failure(&self) -> Option<Arc<StorageError>> {
        lock(&self.failure).clone()
    }

    fn now_ns(&self) -> u64 {
        self.epoch
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }

    fn guest_writing(&self) {
        self.last_mirror_ns
            .store(self.now_ns().max(1), Ordering::Relaxed);
    }

    fn guest_active(&self) -> bool {
        let last = self.last_mirror_ns.load(Ordering::Relaxed);
        last != 0 && self.now_ns().saturating_sub(last) < GUEST_ACTIVE_WINDOW.as_nanos() as u64
    }

    /// Waits a little if the guest is writing, so its writes go first.
    fn make_room_for_guest(&self) {
        if self.guest_active() {
            std::thread::sleep(GUEST_ROOM);
        }
    }
}

/// Mirrors one drive's guest writes into its copy.
pub struct Mirror {
    name: String,
    file: Arc<dyn ShareFile>,
    locks: Arc<ChunkLocks>,
    progress: Arc<StorageProgress>,
    failed: AtomicBool,
}

impl WriteMirror for Mirror {
    fn write(&self, offset: u64, data: &[u8]) {
        if data.is_empty() || self.failed.load(Ordering::SeqCst) {
            return;
        }
        self.progress.guest_writing();
        let _guard = self
            .locks
            .lock(offset / CHUNK, (offset + data.len() as u64 - 1) / CHUNK);
        match self.file.write_mirrored(offset, data) {
            Ok(()) => {
                self.progress
                    .mirrored_writes
                    .fetch_add(1, Ordering::Relaxed);
                self.progress
                    .mirrored_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Err(source) => self.give_up(StorageError::Mirror {
                what: "mirroring a guest write to",
                name: self.name.clone(),
                source,
            }),
        }
    }

    fn flush(&self) {
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        if let Err(source) = self.file.sync() {
            self.give_up(StorageError::Mirror {
                what: "flushing the copy of",
                name: self.name.clone(),
                source,
            });
        }
    }
}

impl Mirror {
    /// Stops mirroring: the migration fails, the guest goes on locally.
    fn give_up(&self, why: StorageError) {
        self.failed.store(true, Ordering::SeqCst);
        self.progress.fail(why);
    }
}

impl CopyItem {
    /// A descriptor to read the file through: a duplicate of the VM's own
    /// when it holds one (it shares the image lock's open file description,
    /// so closing it releases nothing), else the path opened read-only.
    pub fn open(&self) -> std::io::Result<File> {
        match &self.file {
            Some(f) => f.try_clone(),
            None => File::open(&self.source),
        }
    }
}

/// One file to copy into the share.
#[derive(Debug, Clone)]
pub struct CopyItem {
    /// Name in the share.
    pub name: String,
    /// Local path.
    pub source: PathBuf,
    /// The VM's own open descriptor of it, read instead of opening
    /// `source` again: after a privilege drop the path may be closed to us.
    pub file: Option<Arc<File>>,
    /// Disk images are mirrored and copied sparse; other files (kernel,
    /// initrd) are copied whole.
    pub mirrored: bool,
}

struct Target {
    item: CopyItem,
    size: u64,
    file: Arc<dyn ShareFile>,
    locks: Arc<ChunkLocks>,
}

impl Target {
    /// Makes the copy durable on the destination.
    fn commit(&self) -> Result<(), StorageError> {
        self.file.sync().map_err(|source| StorageError::Commit {
            name: self.item.name.clone(),
            source,
        })
    }
}

/// A storage copy in progress.
pub struct StorageCopy {
    pub progress: Arc<StorageProgress>,
    targets: Vec<Arc<Target>>,
    share: Arc<dyn Share>,
    extra: Vec<(String, Vec<u8>)>,
    thread: Option<JoinHandle<()>>,
}

/// Share errors say what failed, a full destination disk included.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot read {path}: {source}")]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Extents {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("share: {0}")]
    Share(#[from] ShareError),
    #[error("copying {name}: {source}")]
    Copy { name: String, source: ShareError },
    #[error("committing {name}: {source}")]
    Commit { name: String, source: ShareError },
    #[error("{what} {name}: {source}")]
    Mirror {
        what: &'static str,
        name: String,
        source: ShareError,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("the bulk copy did not complete")]
    Incomplete,
    /// The copier's or a mirror's failure, found at the end of the copy.
    #[error("storage copy failed: {0}")]
    Failed(Arc<StorageError>),
    /// The same, found while the copy runs.
    #[error("{0}")]
    Reported(Arc<StorageError>),
    #[error("the destination offered no share for the copy")]
    NoOffer,
    #[error("the destination offered a share without a valid access secret")]
    NoShareSecret,
    #[error("the destination offered a bad share directory {0:?}")]
    BadShareDir(String),
    #[error("the destination offered neither an NFS share nor a mounted directory")]
    NoShare,
    #[error("cannot reach the share: {0}")]
    Unreachable(ShareError),
    #[error("cannot start the copy: {0}")]
    Start(std::io::Error),
}

impl StorageCopy {
    /// Creates every file in the share (sized, sparse) and the mirrors for
    /// the mirrored ones (in `items` order). Nothing is copied yet: attach
    /// the mirrors to the devices first, then call `start_copy`, so that no
    /// write slips between the two.
    pub fn prepare(
        share: Arc<dyn Share>,
        items: Vec<CopyItem>,
        extra: Vec<(String, Vec<u8>)>,
    ) -> Result<(StorageCopy, Vec<Arc<Mirror>>), StorageError> {
        let mut progress = StorageProgress::default();
        let mut targets = Vec::new();
        for item in items {
            let size = item
                .open()
                .and_then(|f| f.metadata())
                .map_err(|source| StorageError::Local {
                    path: item.source.clone(),
                    source,
                })?
                .len();
            let file = share.create(&item.name, size)?;
            progress.total_bytes += size;
            targets.push(Arc::new(Target {
                item,
                size,
                file,
                locks: Arc::new(ChunkLocks::default()),
            }));
        }
        let progress = Arc::new(progress);
        let mirrors = targets
            .iter()
            .filter(|t| t.item.mirrored)
            .map(|t| {
                Arc::new(Mirror {
                    name: t.item.name.clone(),
                    file: t.file.clone(),
                    locks: t.locks.clone(),
                    progress: progress.clone(),
                    failed: AtomicBool::new(false),
                })
            })
            .collect();
        Ok((
            StorageCopy {
                progress,
                targets,
                share,
                extra,
                thread: None,
            },
            mirrors,
        ))
    }

    /// Starts the bulk copy in the background.
    pub fn start_copy(&mut self, pacer: Arc<Pacer>) -> std::io::Result<()> {
        let targets = self.targets.clone();
        let progress = self.progress.clone();
        let share = self.share.clone();
        let extra = std::mem::take(&mut self.extra);
        self.thread = Some(
            std::thread::Builder::new()
                .name("storage-copy".into())
                .spawn(move || {
                    // Issue 10: narrowed before it reads a byte; its
                    // workers inherit the list.
                    let narrowed = crate::security::seccomp::narrow_when_confined(
                        crate::security::ThreadFilter::StorageCopy,
                    )
                    .map_err(|e| StorageError::Start(std::io::Error::other(e.to_string())));
                    let result = narrowed
                        .and_then(|_| copy_all(&targets, &progress, &pacer))
                        .and_then(|()| {
                            for (name, bytes) in &extra {
                                let f = share.create(name, bytes.len() as u64)?;
                                f.write_at(0, bytes)?;
                                f.sync()?;
                            }
                            // Commit the bulk of the copy now, while the guest
                            // runs: the final commit, in the pause, then only
                            // has what was mirrored since.
                            targets.iter().try_for_each(|t| t.commit())
                        });
                    match result {
                        Ok(()) => progress.copy_done.store(true, Ordering::SeqCst),
                        Err(why) => progress.fail(why),
                    }
                })?,
        );
        Ok(())
    }

    /// Completes the copy once the guest is paused and its devices drained:
    /// the bulk copy must be done, no mirror may have failed, and every copy
    /// is made durable on the destination.
    pub fn finish(&mut self) -> Result<(), StorageError> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(why) = self.progress.failure() {
            return Err(StorageError::Failed(why));
        }
        if !self.progress.copy_done.load(Ordering::SeqCst) {
            return Err(StorageError::Incomplete);
        }
        self.targets.iter().try_for_each(|t| t.commit())
    }

    /// Stops the copy (the mirrors must have been detached already).
    pub fn abort(&mut self) {
        self.progress.cancel.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StorageCopy {
    fn drop(&mut self) {
        self.abort();
    }
}

/// How many chunks the bulk copy has in flight at once: each worker reads
/// its chunk while the others' WRITEs are on the wire, over a share
/// connection of its own, so the link never waits for a round trip or for
/// the local disk.
pub const COPY_WINDOW: usize = 4;

/// One chunk of one file to copy: `[from, to)` within chunk `chunk`.
struct Job {
    target: usize,
    chunk: u64,
    from: u64,
    to: u64,
}

/// Hands out the chunks of every target's data extents in file order.
struct Jobs {
    targets: Vec<(usize, std::vec::IntoIter<(u64, u64)>)>,
    /// The extent being cut into chunks: (target, next chunk, extent).
    current: Option<(usize, u64, (u64, u64))>,
    /// `next` has answered None: every chunk is handed out.
    exhausted: bool,
}

impl Jobs {
    fn next(&mut self) -> Option<Job> {
        let job = self.cut();
        self.exhausted = job.is_none();
        job
    }

    fn cut(&mut self) -> Option<Job> {
        loop {
            if let Some((target, chunk, (start, end))) = self.current {
                if chunk * CHUNK < end {
                    self.current = Some((target, chunk + 1, (start, end)));
                    return Some(Job {
                        target,
                        chunk,
                        from: (chunk * CHUNK).max(start),
                        to: ((chunk + 1) * CHUNK).min(end),
                    });
                }
                self.current = None;
            }
            let (target, extents) = self.targets.first_mut()?;
            match extents.next() {
                Some(extent) => self.current = Some((*target, extent.0 / CHUNK, extent)),
                None => {
                    self.targets.remove(0);
                }
            }
        }
    }
}

fn copy_all(
    targets: &[Arc<Target>],
    progress: &StorageProgress,
    pacer: &Pacer,
) -> Result<(), StorageError> {
    let mut sources = Vec::with_capacity(targets.len());
    let mut plan = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        let src = t.item.open().map_err(|source| StorageError::Local {
            path: t.item.source.clone(),
            source,
        })?;
        let extents = if t.item.mirrored {
            data_extents(&src, 0, t.size).map_err(|source| StorageError::Extents {
                path: t.item.source.clone(),
                source,
            })?
        } else {
            vec![(0, t.size)]
        };
        let skipped = t.size - extents.iter().map(|(a, b)| b - a).sum::<u64>();
        progress.copied_bytes.fetch_add(skipped, Ordering::Relaxed);
        sources.push(src);
        plan.push((i, extents.into_iter()));
    }
    let jobs = Mutex::new(Jobs {
        targets: plan,
        current: None,
        exhausted: false,
    });
    let first_error = Mutex::new(None);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<(), StorageError> {
        for n in 0..COPY_WINDOW {
            let (jobs, sources, first_error, stop) = (&jobs, &sources, &first_error, &stop);
            std::thread::Builder::new()
                .name(format!("storage-copy{n}"))
                .spawn_scoped(scope, move || {
                    if let Err(why) = copy_worker(n, targets, sources, jobs, stop, progress, pacer)
                    {
                        stop.store(true, Ordering::SeqCst);
                        lock(first_error).get_or_insert(why);
                    }
                })
                .map_err(StorageError::Start)?;
        }
        Ok(())
    })?;
    match first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// Copies chunks until there are none left or another worker failed.
fn copy_worker(
    index: usize,
    targets: &[Arc<Target>],
    sources: &[File],
    jobs: &Mutex<Jobs>,
    stop: &AtomicBool,
    progress: &StorageProgress,
    pacer: &Pacer,
) -> Result<(), StorageError> {
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        if progress.cancel.load(Ordering::SeqCst) {
            return Err(StorageError::Cancelled);
        }
        if let Some(why) = progress.failure() {
            return Err(StorageError::Failed(why));
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        // While the guest writes, one chunk at a time is in flight, not a
        // window of them: its mirrored writes do not queue behind the
        // copy's at the destination. (Between chunks, not holding a lock.)
        // A worker standing aside still ends once every chunk is handed
        // out: a guest that never stops writing must not keep the copy
        // from completing.
        if index > 0 && progress.guest_active() {
            if lock(jobs).exhausted {
                return Ok(());
            }
            std::thread::sleep(GUEST_ROOM);
            continue;
        }
        let Some(job) = lock(jobs).next() else {
            return Ok(());
        };
        progress.make_room_for_guest();
        // Paced before the chunk is locked: a guest write to this chunk
        // never waits for the bandwidth limit. (Zero runs inside a data
        // extent are counted though not sent: the pace errs on the slow side.)
        pacer.consume(job.to - job.from, &progress.cancel);
        copy_chunk(&targets[job.target], &sources[job.target], &job, &mut buf)?;
        progress
            .copied_bytes
            .fetch_add(job.to - job.from, Ordering::Relaxed);
    }
}

/// Reads one chunk and writes its non-zero runs (zero runs stay holes),
/// holding the chunk's lock for both, so a guest write to it lands after.
fn copy_chunk(t: &Target, src: &File, job: &Job, buf: &mut [u8]) -> Result<(), StorageError> {
    let n = (job.to - job.from) as usize;
    let _guard = t.locks.lock(job.chunk, job.chunk);
    src.read_exact_at(&mut buf[..n], job.from)
        .map_err(|source| StorageError::Local {
            path: t.item.source.clone(),
            source,
        })?;
    let mut i = 0;
    while i < n {
        let blk = |i: usize| &buf[i..(i + ZERO_BLOCK).min(n)];
        if is_zero(blk(i)) {
            i += ZERO_BLOCK;
            continue;
        }
        let run = i;
        while i < n && !is_zero(blk(i)) {
            i += ZERO_BLOCK;
        }
        let run_end = i.min(n);
        t.file
            .write_at(job.from + run as u64, &buf[run..run_end])
            .map_err(|source| StorageError::Copy {
                name: t.item.name.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::share::MountedShare;

    fn image(path: &std::path::Path, size: u64, data: &[(u64, u64)]) {
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        for &(off, len) in data {
            let bytes: Vec<u8> = (0..len).map(|i| ((off + i) % 251 + 1) as u8).collect();
            f.write_all_at(&bytes, off).unwrap();
        }
    }

    /// The workers' chunks cover every extent exactly, each within one
    /// chunk (so one lock covers it), files in order.
    #[test]
    fn jobs_cut_extents_into_whole_chunk_pieces() {
        let mut jobs = Jobs {
            targets: vec![
                (0, vec![(0, 10)].into_iter()),
                (1, vec![].into_iter()),
                (
                    2,
                    vec![(CHUNK - 5, 3 * CHUNK + 7), (5 * CHUNK, 6 * CHUNK)].into_iter(),
                ),
            ],
            current: None,
            exhausted: false,
        };
        let mut got = Vec::new();
        while let Some(j) = jobs.next() {
            assert_eq!(j.from / CHUNK, j.chunk);
            assert_eq!((j.to - 1) / CHUNK, j.chunk);
            got.push((j.target, j.from, j.to));
        }
        assert_eq!(
            got,
            vec![
                (0, 0, 10),
                (2, CHUNK - 5, CHUNK),
                (2, CHUNK, 2 * CHUNK),
                (2, 2 * CHUNK, 3 * CHUNK),
                (2, 3 * CHUNK, 3 * CHUNK + 7),
                (2, 5 * CHUNK, 6 * CHUNK),
            ]
        );
    }

    #[test]
    fn copy_with_concurrent_mirrored_writes_converges_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        let size = 64 << 20;
        image(
            &src,
            size,
            &[(0, 3 << 20), (20 << 20, 5 << 20), (60 << 20, 4096)],
        );
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"kernel bytes").unwrap();
        let share_dir = dir.path().join("share");
        std::fs::create_dir(&share_dir).unwrap();
        let share: Arc<dyn Share> = Arc::new(MountedShare::new(&share_dir).unwrap());
        let (mut copy, mirrors) = StorageCopy::prepare(
            share,
            vec![
                CopyItem {
                    name: "kernel".into(),
                    source: kernel.clone(),
                    file: None,
                    mirrored: false,
                },
                CopyItem {
                    name: "d.img".into(),
                    source: src.clone(),
                    file: None,
                    mirrored: true,
                },
            ],
            vec![("vm.json".into(), b"{}".to_vec())],
        )
        .unwrap();
        assert_eq!(mirrors.len(), 1);
        let mirror = mirrors[0].clone();
        copy.start_copy(Arc::new(Pacer::new(None))).unwrap();

        // A "guest" writing all over the disk, holes included, while the
        // copy runs: local image first, then the mirror, as the device does.
        let local = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        let mut x = 12345u64;
        for i in 0..400u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size / 512 - 16) * 512;
            let data = vec![(i % 200 + 7) as u8; 512 * (1 + (x % 16) as usize)];
            local.write_all_at(&data, off).unwrap();
            mirror.write(off, &data);
            if i % 50 == 0 {
                mirror.flush();
            }
        }
        while !copy.progress.copy_done.load(Ordering::SeqCst) {
            assert!(copy.progress.failure().is_none());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        copy.finish().unwrap();
        assert_eq!(
            std::fs::read(share_dir.join("d.img")).unwrap(),
            std::fs::read(&src).unwrap(),
            "the copy diverged from the image"
        );
        assert_eq!(
            std::fs::read(share_dir.join("kernel")).unwrap(),
            b"kernel bytes"
        );
        assert_eq!(std::fs::read(share_dir.join("vm.json")).unwrap(), b"{}");
        assert_eq!(copy.progress.mirrored_writes.load(Ordering::SeqCst), 400);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(share_dir.join("d.img")).unwrap().blocks() * 512;
        // 8 MiB of data plus what the guest wrote, nowhere near 64 MiB.
        assert!(allocated < 24 << 20, "{allocated}");
    }

    /// A guest that writes without pause for the whole copy (a database, a
    /// build) must not hold the copy back for ever: the workers that stand
    /// aside while it writes end once the last chunk is handed out.
    #[test]
    fn copy_completes_while_the_guest_never_stops_writing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        let size = 16 << 20;
        image(&src, size, &[(0, 6 << 20), (10 << 20, 1 << 20)]);
        let share_dir = dir.path().join("share");
        std::fs::create_dir(&share_dir).unwrap();
        let share: Arc<dyn Share> = Arc::new(MountedShare::new(&share_dir).unwrap());
        let (mut copy, mirrors) = StorageCopy::prepare(
            share,
            vec![CopyItem {
                name: "d.img".into(),
                source: src.clone(),
                file: None,
                mirrored: true,
            }],
            vec![],
        )
        .unwrap();
        let mirror = mirrors[0].clone();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let (src, done) = (src.clone(), done.clone());
            std::thread::spawn(move || {
                let local = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
                let mut n = 0u64;
                while !done.load(Ordering::SeqCst) {
                    let off = (n * 7919 % (size / 4096)) * 4096;
                    let data = [(n % 250 + 1) as u8; 4096];
                    local.write_all_at(&data, off).unwrap();
                    mirror.write(off, &data);
                    n += 1;
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                n
            })
        };
        // The guest is writing before the copy starts and all through it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        copy.start_copy(Arc::new(Pacer::new(None))).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let completed = loop {
            if copy.progress.copy_done.load(Ordering::SeqCst) {
                break true;
            }
            assert!(copy.progress.failure().is_none());
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        done.store(true, Ordering::SeqCst);
        let writes = writer.join().unwrap();
        assert!(
            completed,
            "the copy never completed while the guest kept writing ({} of {} bytes copied)",
            copy.progress.copied_bytes.load(Ordering::SeqCst),
            copy.progress.total_bytes
        );
        copy.finish().unwrap();
        assert!(writes > 0);
        assert_eq!(
            std::fs::read(share_dir.join("d.img")).unwrap(),
            std::fs::read(&src).unwrap(),
            "the copy diverged from the image"
        );
    }

    /// A VMM that dropped its privileges copies through the descriptors it
    /// opened at set-up: the copy succeeds with the paths no longer
    /// openable (here: gone altogether), sparse image included.
    #[test]
    fn copy_reads_the_vms_own_descriptors_not_the_paths() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        let size = 16 << 20;
        image(&src, size, &[(1 << 20, 2 << 20), (12 << 20, 4096)]);
        let kernel = dir.path().join("kernel");
        std::fs::write(&kernel, b"held kernel").unwrap();
        let expected = std::fs::read(&src).unwrap();
        let held_disk = Arc::new(File::open(&src).unwrap());
        let held_kernel = Arc::new(File::open(&kernel).unwrap());
        std::fs::remove_file(&src).unwrap();
        std::fs::remove_file(&kernel).unwrap();
        let share_dir = dir.path().join("share");
        std::fs::create_dir(&share_dir).unwrap();
        let share: Arc<dyn Share> = Arc::new(MountedShare::new(&share_dir).unwrap());
        let (mut copy, _mirrors) = StorageCopy::prepare(
            share,
            vec![
                CopyItem {
                    name: "kernel".into(),
                    source: kernel.clone(),
                    file: Some(held_kernel),
                    mirrored: false,
                },
                CopyItem {
                    name: "d.img".into(),
                    source: src.clone(),
                    file: Some(held_disk.clone()),
                    mirrored: true,
                },
            ],
            vec![],
        )
        .unwrap();
        copy.start_copy(Arc::new(Pacer::new(None))).unwrap();
        while !copy.progress.copy_done.load(Ordering::SeqCst) {
            assert!(copy.progress.failure().is_none());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        copy.finish().unwrap();
        assert_eq!(std::fs::read(share_dir.join("d.img")).unwrap(), expected);
        assert_eq!(
            std::fs::read(share_dir.join("kernel")).unwrap(),
            b"held kernel"
        );
        // The VM's descriptor is still its own: still open, still readable.
        let mut b = [0u8; 1];
        held_disk.read_exact_at(&mut b, 1 << 20).unwrap();
        assert_eq!(b[0], expected[1 << 20]);

        // Without a held descriptor the missing path is reported by name.
        let share: Arc<dyn Share> = Arc::new(MountedShare::new(&share_dir).unwrap());
        let err = StorageCopy::prepare(
            share,
            vec![CopyItem {
                name: "gone.img".into(),
                source: src.clone(),
                file: None,
                mirrored: true,
            }],
            vec![],
        )
        .err()
        .expect("a missing image must be refused");
        assert!(err.to_string().contains("disk.img"), "{err}");
    }
}
