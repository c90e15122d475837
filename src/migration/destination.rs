//! The receiving side, as one state machine (after Cloud Hypervisor's
//! `ReceiveMigrationState`): a `Receiver` listens and vets what connects; the
//! `IncomingMigration` it accepts receives memory straight into a fresh guest
//! memory, then the state, and owns the hand-over: the VMM builds the guest
//! when asked, and starts it only once the source has said go.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

mod lanes;

use lanes::{LaneHub, MemorySink};

use super::protocol::{
    expect, expect_small, parse_json, read_header, read_payload, send_json, Hello, HelloAck, Kind,
    PassEnd, Paused, ProtocolError, Reason, Seal, ShareOffer, StreamDigest, MAX_CONNECTIONS,
    PAGE_SIZE, PROTOCOL_VERSION,
};
use super::share::{NfsShareServer, ShareGuard};
use super::transport::{cert_names_any, explain_handshake_error, Channel, Security};
use crate::config::{SerialConfig, VmConfig};
use crate::devices::virtio::net::{parse_mac, NetError, Tap};
use crate::security::ThreadFilter;
use crate::snapshot::VmState;
use crate::util::lock;
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::vm::Vm;

/// How long the destination waits for the next frame before giving up (the
/// source sends heartbeats while it has nothing else to send).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_MEMORY: u64 = 16 << 20;
/// A Hello is a few KiB (vCPU 0's CPUID is most of it).
const MAX_HELLO: u64 = 1 << 20;
/// Everything before a migration is accepted — TLS handshake and Hello —
/// must be done within this, however the peer paces its bytes.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections being vetted at once; more are closed unread, so that a
/// flood costs a thread each for at most this many.
const MAX_PENDING: usize = 32;
/// Connections from one address being vetted at once: a peer that opens
/// many and stays silent fills only its own share of `MAX_PENDING`, and a
/// real source from another address still gets through.
const MAX_PENDING_PER_PEER: usize = 4;
/// Largest `Paused` payload: a MAC address for each of at most MAX_DRIVES
/// net devices, with room to spare.
const MAX_PAUSED: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("refused: {0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("--dir {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot create {path}: {}", crate::util::io_msg(source))]
    ShareDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the NFS share: {0}")]
    Share(#[from] super::share::ShareError),
    #[error("cannot set up the share: {0}")]
    ShareSetup(std::io::Error),
    #[error("cannot set up the VM: {0}")]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("cannot set up guest memory: {0}")]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error("cannot read this host's CPUID: {0}")]
    Cpuid(kvm_ioctls::Error),
    #[error("nothing was received to build the guest from")]
    NothingReceived,
    #[error("cannot build the guest here: {0}")]
    Build(String),
    #[error("--shared-storage-root {path}: {why}")]
    SharedRoot { path: PathBuf, why: String },
    /// The stream broke the rules of a complete, untampered migration.
    #[error("incomplete or altered stream: {0}")]
    Stream(String),
    #[error("destination disk full: the VM's files need {need_mib} MiB, --dir {} has {free_mib} MiB free", dir.display())]
    NoSpace {
        dir: PathBuf,
        need_mib: u64,
        free_mib: u64,
    },
    /// The sent state asks for something this destination does not allow.
    #[error("refused the VM state: {0}")]
    Untrusted(String),
    #[error("net device {id:?}: {source}")]
    Tap {
        id: String,
        #[source]
        source: NetError,
    },
}

/// What this destination decides for itself, whatever the source sends.
#[derive(Debug, Clone, Default)]
pub struct ReceivePolicy {
    /// `--shared-storage-root`: a guest that brings no copy of its files
    /// (`storage: "shared"`) may use files under this directory only.
    /// Without it, shared storage is refused.
    pub shared_storage_root: Option<PathBuf>,
    /// `--serial`: where the received guest's console goes (the sent config
    /// names a path on the source's host, which means nothing here).
    pub serial: SerialConfig,
    /// `--tap ID=TAP`: this host's tap for each net device, by id.
    pub taps: Vec<(String, String)>,
}

impl ReceivePolicy {
    /// Resolves the root once (symlinks and all), so that every check
    /// compares canonical paths.
    pub fn canonical(mut self) -> Result<ReceivePolicy, DestinationError> {
        if let Some(root) = &self.shared_storage_root {
            let bad = |why: String| DestinationError::SharedRoot {
                path: root.clone(),
                why,
            };
            let canon = std::fs::canonicalize(root).map_err(|e| bad(crate::util::io_msg(&e)))?;
            if !canon.is_dir() {
                return Err(bad("not a directory".into()));
            }
            self.shared_storage_root = Some(canon);
        }
        Ok(self)
    }
}

/// An exclusive `flock` on an open file or directory, held until dropped:
/// it tells a later `ferry receive` on the same `--dir` that this one is
/// alive, whatever became of its pid.
pub struct DirLock {
    _file: File,
}

/// Tries to take the lock without waiting: `Ok(None)` if another open
/// file holds it.
fn try_lock(path: &Path) -> std::io::Result<Option<DirLock>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    try_lock_file(file)
}

fn try_lock_file(file: File) -> std::io::Result<Option<DirLock>> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(Some(DirLock { _file: file }))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// `DIR/<migration id>/`: deleted on drop unless `keep` was called, so a
/// failed migration leaves nothing behind. While it exists this process
/// holds a lock on its marker and on the directory itself, so that no other
/// receiver takes it for a dead one's leftovers.
pub struct ShareDir {
    pub path: PathBuf,
    keep: bool,
    /// Held until the copy is complete (the marker goes with it).
    marker_lock: Option<DirLock>,
    /// Held for as long as the guest may use the directory.
    dir_lock: Option<DirLock>,
}

impl ShareDir {
    /// The marker, next to the directory (not in the share), that says a
    /// copy is incomplete: a later `ferry receive --dir` removes what a
    /// killed one left behind.
    fn marker(base: &Path, id: &str) -> PathBuf {
        base.join(format!(".{id}.partial"))
    }

    /// Creates marker and directory, both new: an id already in use (a
    /// running guest's directory, another receiver's copy) is refused, and
    /// nothing that was there is touched.
    fn create(base: &Path, id: &str) -> Result<ShareDir, DestinationError> {
        let path = base.join(id);
        let marker = Self::marker(base, id);
        let err = |p: &Path, source| DestinationError::ShareDir {
            path: p.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&marker)
            .map_err(|e| err(&marker, e))?;
        // Locked through the descriptor that created it, so that no other
        // receiver's cleanup can take it in between.
        let marker_lock = match try_lock_file(file) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(err(&marker, std::io::Error::from_raw_os_error(libc::EBUSY))),
            Err(e) => {
                let _ = std::fs::remove_file(&marker);
                return Err(err(&marker, e));
            }
        };
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&path) {
            drop(marker_lock);
            let _ = std::fs::remove_file(&marker);
            return Err(err(&path, e));
        }
        let dir_lock = try_lock(&path).ok().flatten();
        Ok(ShareDir {
            path,
            keep: false,
            marker_lock: Some(marker_lock),
            dir_lock,
        })
    }

    /// The guest runs on these files now.
    pub fn keep(&mut self) {
        self.keep = true;
        if let (Some(base), Some(id)) = (self.path.parent(), self.path.file_name()) {
            let _ = std::fs::remove_file(Self::marker(base, &id.to_string_lossy()));
        }
        self.marker_lock = None;
    }

    /// The lock that says the guest uses this directory; whoever runs the
    /// guest holds it.
    pub fn take_lock(&mut self) -> Option<DirLock> {
        self.dir_lock.take()
    }
}

impl Drop for ShareDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
            if let (Some(base), Some(id)) = (self.path.parent(), self.path.file_name()) {
                let _ = std::fs::remove_file(Self::marker(base, &id.to_string_lossy()));
            }
        }
    }
}

/// Removes incomplete copies that a killed `ferry receive` left in `base`:
/// those whose marker and directory no live process holds locked. A copy
/// another receiver is still making, or a directory a guest runs on, is
/// left alone.
pub fn remove_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        else {
            continue;
        };
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let dir = base.join(id);
        // Both locks, held until the removal is done, so that no receiver
        // starts on this id meanwhile.
        let marker_lock = match try_lock(&e.path()) {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(err) => {
                eprintln!(
                    "ferry: leaving {} alone: cannot lock its marker: {}",
                    dir.display(),
                    crate::util::io_msg(&err)
                );
                continue;
            }
        };
        let dir_lock = match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => match try_lock(&dir) {
                Ok(Some(l)) => Some(l),
                Ok(None) => {
                    eprintln!(
                        "ferry: leaving {} alone: a running ferry still uses it",
                        dir.display()
                    );
                    continue;
                }
                Err(_) => continue,
            },
            Ok(_) => {
                eprintln!("ferry: leaving {} alone: not a directory", dir.display());
                continue;
            }
            Err(_) => None,
        };
        eprintln!(
            "ferry: removing the incomplete copy {} left by an earlier migration",
            dir.display()
        );
        if dir_lock.is_some() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_file(e.path());
        drop((dir_lock, marker_lock));
    }
}

/// The receive buffer in front of a migration connection: it batches the
/// small reads (frame headers, ZeroPages); a page payload, larger, goes
/// past it from the connection straight into guest memory once what is
/// buffered is used up. (At 1 MiB every payload was copied through it: 7
/// to 10 % of the receive threads' samples.)
pub(crate) const RECEIVE_BUFFER: usize = 64 << 10;

/// Which guest pages the stream has covered: `seen` (sent, or declared
/// zero) must be complete before a restore; `data` marks pages that hold
/// received data, the only ones a later ZeroPages needs to clear (the rest
/// of a fresh memfd is zero already, and writing zeros would allocate it).
struct PageMap {
    /// (guest-physical start, length, index of its first page).
    regions: Vec<(u64, u64, u64)>,
    pages: u64,
    seen: Vec<u64>,
    data: Vec<u64>,
}

impl PageMap {
    fn new(mem: &GuestMemoryMmap) -> PageMap {
        let mut regions = Vec::new();
        let mut pages = 0;
        for r in mem.iter() {
            regions.push((r.start_addr().raw_value(), r.len(), pages));
            pages += r.len() / PAGE_SIZE;
        }
        let words = pages.div_ceil(64) as usize;
        PageMap {
            regions,
            pages,
            seen: vec![0; words],
            data: vec![0; words],
        }
    }

    /// The page index range of `[gpa, gpa + len)`, which the frame checks
    /// already placed inside one region.
    fn pages_of(&self, gpa: u64, len: u64) -> std::ops::Range<u64> {
        for &(start, rlen, first) in &self.regions {
            if gpa >= start && gpa - start < rlen {
                let p = first + (gpa - start) / PAGE_SIZE;
                return p..p + len / PAGE_SIZE;
            }
        }
        0..0
    }

    /// The words `pages` covers, each with the mask of its bits in range:
    /// a ZeroPages frame can cover a whole region (4 M pages for 16 GiB),
    /// and bit-by-bit loops over it held the receive thread for
    /// milliseconds per frame, so far that pass 1 was still being read
    /// when the source paused.
    fn words(pages: std::ops::Range<u64>) -> impl Iterator<Item = (usize, u64)> {
        let mut p = pages.start;
        std::iter::from_fn(move || {
            if p >= pages.end {
                return None;
            }
            let b = p % 64;
            let n = (64 - b).min(pages.end - p);
            let mask = if n == 64 { !0 } else { ((1u64 << n) - 1) << b };
            let w = (p / 64) as usize;
            p += n;
            Some((w, mask))
        })
    }

    fn set(bits: &mut [u64], pages: std::ops::Range<u64>, on: bool) {
        for (w, mask) in Self::words(pages) {
            if on {
                bits[w] |= mask;
            } else {
                bits[w] &= !mask;
            }
        }
    }

    fn got_data(&mut self, gpa: u64, len: u64) {
        let pages = self.pages_of(gpa, len);
        Self::set(&mut self.seen, pages.clone(), true);
        Self::set(&mut self.data, pages, true);
    }

    /// Marks `[gpa, gpa + len)` zero; returns the runs of it that hold
    /// received data and must be cleared, as (gpa, len).
    fn got_zero(&mut self, gpa: u64, len: u64) -> Vec<(u64, u64)> {
        let pages = self.pages_of(gpa, len);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, mask) in Self::words(pages.clone()) {
            let mut hits = self.data[w] & mask;
            while hits != 0 {
                let p = w as u64 * 64 + u64::from(hits.trailing_zeros());
                hits &= hits - 1;
                let at = gpa + (p - pages.start) * PAGE_SIZE;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == at => *l += PAGE_SIZE,
                    _ => runs.push((at, PAGE_SIZE)),
                }
            }
        }
        Self::set(&mut self.seen, pages.clone(), true);
        Self::set(&mut self.data, pages, false);
        runs
    }

    /// The pages never sent nor declared zero: how many, and the address of
    /// the first.
    fn missing(&self) -> Option<(u64, u64)> {
        let mut count = 0u64;
        let mut first = None;
        for (i, &w) in self.seen.iter().enumerate() {
            let base = i as u64 * 64;
            // Bits past the last page are not pages.
            let valid = if self.pages - base >= 64 {
                !0u64
            } else {
                (1u64 << (self.pages - base)) - 1
            };
            let unseen = !w & valid;
            if unseen != 0 {
                count += u64::from(unseen.count_ones());
                first.get_or_insert(base + u64::from(unseen.trailing_zeros()));
            }
        }
        let first = first?;
        let gpa = self
            .regions
            .iter()
            .rev()
            .find(|r| r.2 <= first)
            .map(|&(start, _, f)| start + (first - f) * PAGE_SIZE)
            .unwrap_or(0);
        Some((count, gpa))
    }
}

/// Where a migration being received stands. Each frame is valid in some
/// states only; anything else ends the migration (`Aborted`) and the source
/// is told why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveState {
    /// Handshake accepted; the VM, its memory and the share are set up.
    Established,
    /// Memory arriving; `passes` pre-copy passes completed.
    Memory { passes: u32 },
    /// The source is paused and sent the last pages and the device state.
    StateReceived,
    /// The guest is built here, not running; waiting for the source's go.
    Ready,
    /// The guest runs here; the source stops for good.
    Running,
    /// Failed; nothing received is kept.
    Aborted,
}

/// What a received frame makes the destination do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Pages,
    ZeroPages,
    PassEnd,
    Heartbeat,
    State,
    PeerError,
    Seal,
    Paused,
}

/// Which frames each state takes while receiving (`Established` and
/// `Memory`); any other frame, or any frame in another state, is a protocol
/// error. The source's `Error` is taken in every state.
fn frame_step(state: ReceiveState, kind: Kind) -> Result<Step, ProtocolError> {
    use ReceiveState::*;
    let receiving = matches!(state, Established | Memory { .. });
    Ok(match kind {
        Kind::Error => Step::PeerError,
        Kind::Heartbeat if receiving => Step::Heartbeat,
        Kind::MemoryPages if receiving => Step::Pages,
        Kind::ZeroPages if receiving => Step::ZeroPages,
        Kind::PassEnd if receiving => Step::PassEnd,
        Kind::State if receiving => Step::State,
        Kind::Seal if receiving => Step::Seal,
        Kind::Paused if receiving => Step::Paused,
        other => {
            return Err(ProtocolError::Unexpected {
                expected: if receiving {
                    "memory or state"
                } else {
                    "nothing while the guest is handed over"
                },
                got: other,
            })
        }
    })
}

/// The state after an accepted frame of `kind`.
fn next_state(state: ReceiveState, kind: Kind) -> ReceiveState {
    use ReceiveState::*;
    match (state, kind) {
        (Established, Kind::PassEnd) => Memory { passes: 1 },
        (Memory { passes }, Kind::PassEnd) => Memory { passes: passes + 1 },
        (_, Kind::State) => StateReceived,
        (s, _) => s,
    }
}

/// A listening `ferry receive`.
pub struct Receiver {
    listener: TcpListener,
    vetting: Arc<Vetting>,
}

/// What every connection is checked with before it may become a migration.
#[derive(Clone)]
struct Vetting {
    dir: Option<PathBuf>,
    policy: ReceivePolicy,
    security: Security,
    /// With TLS: the client certificate must name one of these (if any).
    allow_clients: Vec<ServerName<'static>>,
}

impl Receiver {
    /// Listens on `addr`. With `dir`, storage migrations put the VM's files
    /// under it; incomplete copies left there by a killed receiver go first.
    pub fn bind(
        addr: &str,
        dir: Option<&Path>,
        security: Security,
        allow_clients: Vec<ServerName<'static>>,
    ) -> Result<Receiver, DestinationError> {
        if let Some(d) = dir {
            if !d.is_dir() {
                return Err(DestinationError::NotADirectory(d.to_path_buf()));
            }
            remove_leftovers(d);
        }
        let listener = TcpListener::bind(addr).map_err(|source| DestinationError::Listen {
            addr: addr.to_string(),
            source,
        })?;
        Ok(Receiver {
            listener,
            vetting: Arc::new(Vetting {
                dir: dir.map(Path::to_path_buf),
                policy: ReceivePolicy::default(),
                security,
                allow_clients,
            }),
        })
    }

    /// What this destination chooses whatever it is sent (checked now, so
    /// that a bad flag fails before the first migration does).
    pub fn with_policy(mut self, policy: ReceivePolicy) -> Result<Receiver, DestinationError> {
        // Not shared yet: accept() hands out clones only while it runs.
        Arc::make_mut(&mut self.vetting).policy = policy.canonical()?;
        Ok(self)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits for one migration. Each connection is vetted on a thread of
    /// its own (TLS handshake, client name, Hello, all within
    /// [`HANDSHAKE_DEADLINE`]), so a slow or silent peer holds up nobody;
    /// those that fail are refused and logged, and the wait goes on. The
    /// first valid one wins: the VM and its memory are set up, the share
    /// offered, and the migration is `Established`. A `Receiver` takes one
    /// migration: it stops listening then.
    pub fn accept(&self) -> Result<IncomingMigration, DestinationError> {
        let listen_err = |source| DestinationError::Listen {
            addr: self
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            source,
        };
        let listener = self.listener.try_clone().map_err(listen_err)?;
        let (tx, rx) = mpsc::channel::<(Channel, SocketAddr, Hello)>();
        let won = Arc::new(AtomicBool::new(false));
        let vetting = self.vetting.clone();
        let acceptor = {
            let won = won.clone();
            std::thread::Builder::new()
                .name("ferry-accept".into())
                .spawn(move || accept_loop(listener, vetting, won, tx))
                .map_err(listen_err)?
        };
        let winner = rx.recv();
        // Wakes the acceptor out of accept() for good.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        let _ = acceptor.join();
        let (stream, peer, hello) =
            winner.map_err(|_| listen_err(std::io::Error::other("the listening thread ended")))?;
        eprintln!(
            "ferry: receiving migration {} from {peer}: {} vCPUs, {} MiB",
            hello.migration_id,
            hello.vcpus,
            hello.memory_size >> 20
        );
        IncomingMigration::establish(
            stream,
            peer,
            hello,
            self.vetting.dir.as_deref(),
            &self.vetting.policy,
            &self.vetting.security,
        )
    }
}

/// One connection being vetted, counted in the total and for its peer's
/// address until dropped.
struct PendingSlot {
    total: Arc<AtomicUsize>,
    per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        let mut per_peer = lock(&self.per_peer);
        if let Some(n) = per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&self.ip);
            }
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    vetting: Arc<Vetting>,
    won: Arc<AtomicBool>,
    tx: mpsc::Sender<(Channel, SocketAddr, Hello)>,
) {
    if !crate::security::narrow_thread("migration accept", ThreadFilter::Acceptor) {
        return;
    }
    let pending = Arc::new(AtomicUsize::new(0));
    let per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let accepted = listener.accept();
        if won.load(Ordering::SeqCst) {
            return;
        }
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ferry: accept failed: {e}");
                // Out of descriptors, say: no reason to spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if pending.load(Ordering::SeqCst) >= MAX_PENDING {
            eprintln!(
                "ferry: refused a connection from {peer}: {MAX_PENDING} handshakes already pending"
            );
            continue;
        }
        {
            let mut per_peer = lock(&per_peer);
            let n = per_peer.entry(peer.ip()).or_default();
            if *n >= MAX_PENDING_PER_PEER {
                eprintln!(
                    "ferry: refused a connection from {peer}: {MAX_PENDING_PER_PEER} handshakes from {} already pending",
                    peer.ip()
                );
                continue;
            }
            *n += 1;
        }
        pending.fetch_add(1, Ordering::SeqCst);
        // Counted down however the thread ends, or if it cannot start.
        let slot = PendingSlot {
            total: pending.clone(),
            per_peer: per_peer.clone(),
            ip: peer.ip(),
        };
        let (vetting, won, tx) = (vetting.clone(), won.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-handshake".into())
            .spawn(move || {
                let _slot = slot;
                // Pre-authentication input meets the narrowest list.
                if !crate::security::narrow_thread("handshake", ThreadFilter::Handshake) {
                    return;
                }
                match vet(tcp, peer, &vetting) {
                    Ok((mut stream, hello)) => {
                        if won
                            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        {
                            let _ = tx.send((stream, peer, hello));
                        } else {
                            let e = DestinationError::Refused(
                                "this ferry receive has already accepted another migration".into(),
                            );
                            eprintln!("ferry: refused a connection from {peer}: {e}");
                            tell_source(&mut stream, &e);
                        }
                    }
                    Err(e) => eprintln!("ferry: refused a connection from {peer}: {e}"),
                }
            });
        if spawned.is_err() {
            eprintln!("ferry: refused a connection from {peer}: cannot start a thread for it");
        }
    }
}

/// Everything a connection must pass before it is a migration: TLS (or
/// the explicit plaintext of `--insecure`), the client's name, a valid
/// Hello, all before one deadline. The peer is told why it is refused
/// wherever it can still read us.
fn vet(
    tcp: TcpStream,
    peer: SocketAddr,
    v: &Vetting,
) -> Result<(Channel, Hello), DestinationError> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    tcp.set_nodelay(true).ok();
    let mut stream = match &v.security {
        Security::Tls(id) => {
            if starts_like_plain_ferry(&tcp, deadline) {
                let e = DestinationError::Refused(
                    "this ferry receive takes only TLS migrations: give the source \"tls_dir\" \
                     (ferry ctl migrate --tls-dir; certificates from ferry tls-init)"
                        .into(),
                );
                let mut plain = tcp;
                tell_source(&mut plain, &e);
                linger_close(&plain, PRE_AUTH_DRAIN);
                return Err(e);
            }
            let stream = Channel::accept(tcp, id, deadline)
                .map_err(|e| DestinationError::Tls(explain_handshake_error(&e)))?;
            if !v.allow_clients.is_empty() {
                let named = stream
                    .peer_certificate()
                    .is_some_and(|c| cert_names_any(&c, &v.allow_clients));
                if !named {
                    let e = DestinationError::Refused(format!(
                        "the client certificate of {} names none of the clients this ferry receive allows (--allow-client {})",
                        peer.ip(),
                        v.allow_clients
                            .iter()
                            .map(|n| n.to_str().into_owned())
                            .collect::<Vec<_>>()
                            .join(", --allow-client ")
                    ));
                    let mut stream = stream;
                    tell_source(&mut stream, &e);
                    let _ = stream.flush();
                    linger_close(stream.tcp(), PRE_AUTH_DRAIN);
                    return Err(e);
                }
            }
            stream
        }
        Security::Insecure => {
            let mut stream = Channel::plain(tcp);
            stream.set_deadline(deadline);
            stream
        }
    };
    match handshake(&mut stream, v.dir.as_deref(), &v.policy) {
        Ok(hello) => {
            stream.clear_deadline(Some(IDLE_TIMEOUT));
            Ok((stream, hello))
        }
        Err(DestinationError::Protocol(ProtocolError::BadMagic(m)))
            if m[0] == 0x16 && !stream.is_tls() =>
        {
            // The plaintext Error frame would only garble its handshake.
            Err(DestinationError::Refused(
                "the peer speaks TLS, but this ferry receive runs --insecure".into(),
            ))
        }
        Err(e) => {
            if !matches!(e, DestinationError::Protocol(ProtocolError::Io(_))) {
                tell_source(&mut stream, &e);
                let _ = stream.flush();
            }
            Err(e)
        }
    }
}

/// How long a refusal waits for the peer's last bytes, in all.
const LINGER: Duration = Duration::from_secs(2);
/// What an unauthenticated peer may still send after its refusal (a TLS
/// record or two, a Hello) before we close anyway.
const PRE_AUTH_DRAIN: usize = 1 << 20;
/// What an authenticated source may still send after a refusal: the rest
/// of the frame it was in, up to a memory chunk, and what the socket
/// buffers hold.
const ABORT_DRAIN: usize = super::protocol::MAX_MEMORY_CHUNK + (4 << 20);

/// Closes after a refusal that the peer may still be sending into: closing
/// with its bytes unread would reset the connection, and the reset could
/// overtake our reason on its way to the peer.
/// At most `max_bytes` are drained, within 2 s.
/// The 2 s are one deadline for the whole drain: a peer trickling a byte
/// at a time cannot keep it going.
fn linger_close(tcp: &TcpStream, max_bytes: usize) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 16 << 10];
    let mut left = max_bytes;
    while left > 0 {
        let rest = deadline.saturating_duration_since(Instant::now());
        if rest.is_zero() || tcp.set_read_timeout(Some(rest)).is_err() {
            break;
        }
        match (&*tcp).read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// A TLS client opens with a handshake record (0x16); a plaintext Ferry
/// source with the frame magic.
fn starts_like_plain_ferry(tcp: &TcpStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first), Ok(1) if first[0] == b'F')
}

/// What the VMM builds the guest from.
pub struct Received {
    pub state: VmState,
    pub vm: Vm,
    pub memfd: File,
    pub mem: GuestMemoryMmap,
    /// Held by whoever runs the guest, for as long as it runs on the copied
    /// files: a later `ferry receive` on the same `--dir` leaves them alone.
    pub dir_lock: Option<DirLock>,
    /// Each net device's tap (by id), open since the handshake: frames for
    /// the guest have queued on them since the source paused.
    pub taps: Vec<(String, Tap)>,
}

/// One migration being received, from handshake to hand-over.
pub struct IncomingMigration {
    state: ReceiveState,
    stream: Channel,
    peer: SocketAddr,
    hello: Hello,
    /// Until the guest is built: the VM (slots registered), its memory.
    guest: Option<(Vm, File)>,
    mem: GuestMemoryMmap,
    /// Where the VM's files are copied (storage migration); removed again
    /// if the guest never runs here.
    share_dir: Option<ShareDir>,
    /// Serves `share_dir` until the state arrives.
    share_server: Option<NfsShareServer>,
    vm_state: Option<VmState>,
    policy: ReceivePolicy,
    /// Over every frame since `HelloAck`, seeded with its nonce.
    digest: StreamDigest,
    /// A `Seal` matching the digest arrived; only `State` may follow.
    sealed: bool,
    /// Where pages go and which were covered, for the channel and the
    /// lanes alike.
    sink: Arc<MemorySink>,
    /// The extra memory connections, with `Hello.connections` > 1.
    lanes: Option<Arc<LaneHub>>,
    /// This host's tap for each of `hello.net_ids`, in that order.
    taps: Vec<(String, Tap)>,
    /// The source said it paused (`Paused`), and the guest was announced.
    announced: bool,
}

impl Drop for IncomingMigration {
    fn drop(&mut self) {
        // Lanes still open end with the migration, whichever way it ends.
        if let Some(l) = &self.lanes {
            l.stop();
        }
    }
}

impl IncomingMigration {
    /// Sets up what the handshake asked for and acknowledges it.
    fn establish(
        mut stream: Channel,
        peer: SocketAddr,
        hello: Hello,
        dir: Option<&Path>,
        policy: &ReceivePolicy,
        security: &Security,
    ) -> Result<IncomingMigration, DestinationError> {
        let setup = (|| {
            let nonce = crate::util::random_hex::<16>().map_err(DestinationError::ShareSetup)?;
            let share = open_share(&stream, peer, &hello, dir, security)?;
            let (memfd, mem) = create_guest_memory(hello.memory_size)?;
            let vm = Vm::new(&mem)?;
            let sink = Arc::new(MemorySink::new(&mem, hello.connections));
            let lanes = if hello.connections > 1 {
                Some(LaneHub::start(
                    &stream, peer, &hello, security, &nonce, &sink,
                )?)
            } else {
                None
            };
            let taps = open_taps(&hello.net_ids, &policy.taps)?;
            Ok::<_, DestinationError>((vm, memfd, mem, share, nonce, sink, lanes, taps))
        })();
        let (vm, memfd, mem, share, nonce, sink, lanes, taps) = match setup {
            Ok(s) => s,
            Err(e) => {
                tell_source(&mut stream, &e);
                return Err(e);
            }
        };
        let (share_dir, share_server, offer) = match share {
            Some((d, s, o)) => (Some(d), s, Some(o)),
            None => (None, None, None),
        };
        send_json(
            &mut stream,
            Kind::HelloAck,
            &HelloAck {
                protocol: PROTOCOL_VERSION,
                migration_id: hello.migration_id.clone(),
                vcpus: hello.vcpus,
                memory_size: hello.memory_size,
                share: offer,
                nonce: nonce.clone(),
                lanes: lanes.as_ref().map(|l| l.1.clone()),
            },
        )?;
        stream.flush().map_err(ProtocolError::from)?;
        Ok(IncomingMigration {
            state: ReceiveState::Established,
            stream,
            peer,
            hello,
            guest: Some((vm, memfd)),
            sink,
            lanes: lanes.map(|l| l.0),
            mem,
            share_dir,
            share_server,
            vm_state: None,
            policy: policy.clone(),
            digest: StreamDigest::new(&nonce),
            sealed: false,
            taps,
            announced: false,
        })
    }

    pub fn state(&self) -> ReceiveState {
        self.state
    }

    /// Ends the migration: the source learns why, nothing received is kept.
    fn abort(&mut self, e: DestinationError) -> DestinationError {
        if self.state != ReceiveState::Aborted {
            if let Some(l) = &self.lanes {
                l.stop();
            }
            match e {
                // The source sent the reason itself: no echo.
                DestinationError::Protocol(ProtocolError::Peer(_)) => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                }
                // The connection failed or went quiet: say why if it still
                // can be said, and close at once, so that the source sees
                // the end even when our reason could not be written.
                DestinationError::Protocol(ProtocolError::Io(_)) => {
                    tell_source(&mut self.stream, &e);
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                }
                _ => {
                    tell_source(&mut self.stream, &e);
                    let _ = self.stream.flush();
                    // The source may still be sending (a refusal mid-stream):
                    // closing with its bytes unread would reset the
                    // connection, and the reset can overtake the reason. It
                    // sees our end at once (shutdown of our side) while we
                    // drain, bounded in bytes and time.
                    // A refusal on a frame's header leaves its whole
                    // payload (up to a memory chunk) still to come.
                    linger_close(self.stream.tcp(), ABORT_DRAIN);
                }
            }
            self.state = ReceiveState::Aborted;
            self.share_server = None;
        }
        e
    }

    /// Receives memory, then the state: `Established` to `StateReceived`.
    pub fn receive(&mut self) -> Result<(), DestinationError> {
        let stream = self
            .stream
            .try_clone()
            .map_err(|e| self.abort(ProtocolError::from(e).into()))?;
        let mut reader = BufReader::with_capacity(RECEIVE_BUFFER, stream);
        while self.state != ReceiveState::StateReceived {
            if let Err(e) = self.next_frame(&mut reader) {
                return Err(self.abort(e));
            }
        }
        // The source completed the storage copy before it sent the state.
        self.share_server = None;
        Ok(())
    }

    /// One frame, and the transition it makes.
    fn next_frame(&mut self, reader: &mut impl Read) -> Result<(), DestinationError> {
        if let Some(e) = self.lanes.as_ref().and_then(|l| l.failure()) {
            return Err(e);
        }
        let h = read_header(reader)?;
        let step = frame_step(self.state, h.kind)?;
        if self.sealed && !matches!(step, Step::State | Step::PeerError) {
            return Err(DestinationError::Stream(format!(
                "a {:?} frame after the Seal",
                h.kind
            )));
        }
        if step != Step::Seal {
            self.digest.add(&h);
        }
        match step {
            Step::PeerError => {
                let r: Reason = parse_json(Kind::Error, &read_payload(reader, &h)?)?;
                return Err(ProtocolError::Peer(r.reason).into());
            }
            Step::Heartbeat => {
                read_payload(reader, &h)?;
            }
            Step::Pages | Step::ZeroPages => self.sink.frame(0, reader, &h)?,
            Step::PassEnd => {
                let _: PassEnd = parse_json(Kind::PassEnd, &read_payload(reader, &h)?)?;
                // Later passes send scattered pages, already present. Its
                // thread is joined outside the lock.
                let prefault = lock(&self.sink.prefault).take();
                drop(prefault);
            }
            Step::Paused => {
                if h.len > MAX_PAUSED {
                    return Err(ProtocolError::TooLarge {
                        kind: Kind::Paused,
                        len: h.len,
                        max: MAX_PAUSED,
                    }
                    .into());
                }
                let paused: Paused = parse_json(Kind::Paused, &read_payload(reader, &h)?)?;
                self.announce(&paused)?;
                send_json(&mut self.stream, Kind::Announced, &serde_json::json!({}))?;
                self.stream.flush().map_err(ProtocolError::from)?;
            }
            Step::Seal => {
                let got: Seal = parse_json(Kind::Seal, &read_payload(reader, &h)?)?;
                check_seal(&got, &self.digest, "recorded for another migration")?;
                // Every lane's frames are in once it sealed them.
                if let Some(l) = &self.lanes {
                    l.wait_sealed(IDLE_TIMEOUT)?;
                }
                // The seal ends the memory: all of it must be here.
                let missing = lock(&self.sink.pages).missing();
                if let Some((count, gpa)) = missing {
                    return Err(DestinationError::Stream(format!(
                        "{count} pages of guest memory were never sent nor declared zero \
                         (the first at {gpa:#x})"
                    )));
                }
                self.sealed = true;
            }
            Step::State => {
                if !self.sealed {
                    return Err(DestinationError::Stream(
                        "the state came without a Seal of the stream before it".into(),
                    ));
                }
                let payload = read_payload(reader, &h)?;
                let mut state: VmState = parse_json(Kind::State, &payload)?;
                check_state(&self.hello, &state)?;
                // The copy is complete: nothing more may be written to it
                // while it is checked and opened.
                self.share_server = None;
                self.place(&mut state.config)?;
                self.vm_state = Some(state);
            }
        }
        self.state = next_state(self.state, h.kind);
        Ok(())
    }

    /// Makes the received config this destination's own: every host
    /// resource it names is chosen here (the copies in the share
    /// directory, files under `--shared-storage-root`, `--serial`), and the
    /// result must pass the checks a config file passes.
    fn place(&self, config: &mut VmConfig) -> Result<(), DestinationError> {
        config.api_socket = None;
        config.serial = self.policy.serial.clone();
        place_taps(config, &self.policy.taps)?;
        match (&self.share_dir, &self.hello.storage) {
            (Some(dir), Some(offer)) => {
                check_share_contents(&dir.path, &offer.files, &offer.sizes)?;
                local_paths(config, &dir.path);
                // The copies exist; nothing is created from a sent size.
                for d in config.drives.iter_mut() {
                    d.create_size_mib = None;
                }
                let announced = |p: &Path| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| offer.files.iter().any(|f| f == n))
                };
                let mut named = vec![("kernel".to_string(), &config.kernel)];
                named.extend(config.initrd.iter().map(|p| ("initrd".to_string(), p)));
                for (i, d) in config.drives.iter().enumerate() {
                    named.push((format!("drives[{i}]"), &d.path));
                }
                for (what, p) in named {
                    if !announced(p) {
                        return Err(DestinationError::Untrusted(format!(
                            "{what} is {}, which is not a file announced for the share",
                            p.display()
                        )));
                    }
                }
            }
            _ => {
                let Some(root) = &self.policy.shared_storage_root else {
                    return Err(DestinationError::Untrusted(
                        "shared storage needs --shared-storage-root on the destination".into(),
                    ));
                };
                config.kernel = under_root(root, "kernel", &config.kernel)?;
                if let Some(initrd) = &config.initrd {
                    config.initrd = Some(under_root(root, "initrd", initrd)?);
                }
                for (i, d) in config.drives.iter_mut().enumerate() {
                    d.path = under_root(root, &format!("drives[{i}].path"), &d.path)?;
                    // Shared files exist already; nothing is created here.
                    d.create_size_mib = None;
                }
            }
        }
        config.validate().map_err(|e| match e {
            crate::config::ConfigError::Invalid { problems } => {
                DestinationError::Untrusted(problems.join("; "))
            }
            e => DestinationError::Untrusted(e.to_string()),
        })
    }

    /// The hand-over, `StateReceived` to `Running`: `build` makes the guest
    /// (not running) from what was received; then the source is told we are
    /// ready, and only on its go does `start` run the guest here, which the
    /// source then hears. Until the go the guest is the source's: any
    /// failure before it is sent to the source, which resumes the guest.
    pub fn hand_over<M, E>(
        mut self,
        build: impl FnOnce(Received) -> Result<M, E>,
        start: impl FnOnce(&mut M) -> Result<(), E>,
    ) -> Result<M, E>
    where
        E: From<DestinationError> + std::fmt::Display,
    {
        let (Some(state), Some((vm, memfd))) = (self.vm_state.take(), self.guest.take()) else {
            return Err(self.abort(DestinationError::NothingReceived).into());
        };
        let received = Received {
            state,
            vm,
            memfd,
            mem: self.mem.clone(),
            dir_lock: self.share_dir.as_mut().and_then(ShareDir::take_lock),
            taps: std::mem::take(&mut self.taps),
        };
        let mut guest = match build(received) {
            Ok(g) => g,
            Err(e) => {
                self.abort(DestinationError::Build(e.to_string()));
                return Err(e);
            }
        };
        if let Err(e) = self.ready_and_wait_go() {
            return Err(self.abort(e).into());
        }
        // From now on the guest runs on the copied files here.
        if let Some(d) = self.share_dir.as_mut() {
            d.keep();
        }
        start(&mut guest)?;
        self.state = ReceiveState::Running;
        // The source waits for this to stop for good; if it never hears it,
        // it stays paused rather than run the guest twice.
        if let Err(e) = send_json(&mut self.stream, Kind::Resumed, &serde_json::json!({}))
            .and_then(|_| self.stream.flush().map_err(ProtocolError::from))
        {
            eprintln!("ferry: could not confirm the resume to {}: {e}", self.peer);
        }
        eprintln!(
            "ferry: migration {} from {} complete; the guest runs here",
            self.hello.migration_id, self.peer
        );
        Ok(guest)
    }

    /// The source paused: every frame for the guest from now on had better
    /// queue on this host's taps, to be delivered when it runs here, than
    /// reach the paused source. What the taps queued before is stale (the
    /// switch sent it here by flooding; the source had it too) and goes.
    /// Should the migration fail, the source announces itself back.
    fn announce(&mut self, paused: &Paused) -> Result<(), DestinationError> {
        if self.announced {
            return Err(DestinationError::Stream("a second Paused frame".into()));
        }
        if paused.macs.len() != self.taps.len() {
            return Err(DestinationError::Stream(format!(
                "Paused names {} net devices, the handshake {}",
                paused.macs.len(),
                self.taps.len()
            )));
        }
        let macs = paused
            .macs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                parse_mac(m).map_err(|why| {
                    DestinationError::Stream(format!("Paused: net[{i}] address: {why}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.announced = true;
        for ((id, tap), mac) in self.taps.iter().zip(&macs) {
            let stale = tap.discard_queued();
            match tap.announce(mac) {
                Ok(()) => eprintln!(
                    "ferry: the source paused: net {id} announced on {} ({stale} stale frames \
                     discarded)",
                    tap.name()
                ),
                // The device announces again when it is built and when the
                // guest runs.
                Err(e) => eprintln!("ferry: net {id}: announcement on {}: {e}", tap.name()),
            }
        }
        Ok(())
    }

    /// `StateReceived` to `Ready`, and waits for the source's go.
    fn ready_and_wait_go(&mut self) -> Result<(), DestinationError> {
        send_json(&mut self.stream, Kind::Ready, &serde_json::json!({}))?;
        self.stream.flush().map_err(ProtocolError::from)?;
        self.state = ReceiveState::Ready;
        expect(&mut self.stream, Kind::Go)?;
        Ok(())
    }
}

/// The copies live in the share directory, named as the source's config
/// says: the config is the one place that names the guest's files.
fn local_paths(config: &mut crate::config::VmConfig, dir: &Path) {
    let local = |p: &Path| dir.join(p.file_name().unwrap_or(p.as_os_str()));
    config.kernel = local(&config.kernel);
    config.initrd = config.initrd.as_deref().map(local);
    for drive in config.drives.iter_mut() {
        drive.path = local(&drive.path);
    }
}

/// A shared-storage path, resolved here (symlinks and `..` included),
/// must lie under the root this destination allows.
fn under_root(root: &Path, what: &str, path: &Path) -> Result<PathBuf, DestinationError> {
    let canon = std::fs::canonicalize(path).map_err(|e| {
        DestinationError::Untrusted(format!(
            "{what}: {}: {}",
            path.display(),
            crate::util::io_msg(&e)
        ))
    })?;
    if !canon.starts_with(root) {
        return Err(DestinationError::Untrusted(format!(
            "{what}: {} is outside --shared-storage-root {}",
            path.display(),
            root.display()
        )));
    }
    Ok(canon)
}

/// What is in the share directory when the copy is done: only announced
/// regular files, none larger than announced (a source that writes through
/// its own mount is not held to this by the NFS server).
fn check_share_contents(
    dir: &Path,
    files: &[String],
    sizes: &[u64],
) -> Result<(), DestinationError> {
    let limits: HashMap<&str, u64> = files
        .iter()
        .map(String::as_str)
        .zip(sizes.iter().copied())
        .collect();
    let entries = std::fs::read_dir(dir).map_err(|source| DestinationError::ShareDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in entries {
        let e = e.map_err(|source| DestinationError::ShareDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = e.file_name().to_string_lossy().into_owned();
        let meta =
            std::fs::symlink_metadata(e.path()).map_err(|source| DestinationError::ShareDir {
                path: e.path(),
                source,
            })?;
        match limits.get(name.as_str()) {
            Some(&max) if meta.is_file() && meta.len() <= max => {}
            Some(&max) if meta.is_file() => {
                return Err(DestinationError::Untrusted(format!(
                    "share file {name} is {} bytes, {max} were announced",
                    meta.len()
                )))
            }
            _ => {
                return Err(DestinationError::Untrusted(format!(
                    "{name} in the share is not an announced regular file"
                )))
            }
        }
        // Guest data: for this host's owner only.
        if meta.mode() & 0o077 != 0 {
            let _ = std::fs::set_permissions(
                e.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            );
        }
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain data, for which all zeros is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes only into the struct we pass; the path is a
    // NUL-terminated string that outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Best effort: the source learns why we give up.
fn tell_source(stream: &mut impl Write, why: &dyn std::fmt::Display) {
    let _ = send_json(
        stream,
        Kind::Error,
        &Reason {
            reason: why.to_string(),
        },
    );
}

/// Reads and vets the source's Hello: nothing is created or allocated for
/// a Hello that fails here, and the receiver goes on listening.
fn handshake(
    stream: &mut impl Read,
    dir: Option<&Path>,
    policy: &ReceivePolicy,
) -> Result<Hello, DestinationError> {
    // Before anything is known of the peer, it gets no more than this.
    let hello: Hello = parse_json(Kind::Hello, &expect_small(stream, Kind::Hello, MAX_HELLO)?)?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(DestinationError::Refused(format!(
            "migration protocol version {}, this ferry speaks version {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    if hello.connections == 0 || hello.connections > MAX_CONNECTIONS {
        return Err(DestinationError::Refused(format!(
            "{} memory connections asked for; this ferry receive takes 1 to {MAX_CONNECTIONS}",
            hello.connections
        )));
    }
    if hello.migration_id.is_empty()
        || hello.migration_id.len() > 64
        || !hello.migration_id.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(DestinationError::Refused("invalid migration id".into()));
    }
    match (&hello.storage, dir) {
        (Some(_), None) => {
            return Err(DestinationError::Refused(
                "the source wants to copy the VM's files, but this ferry receive has no --dir to put them in"
                    .into(),
            ));
        }
        (Some(offer), Some(base)) => check_offer(offer, base, &hello.migration_id)?,
        (None, _) if policy.shared_storage_root.is_none() => {
            return Err(DestinationError::Refused(
                "the source wants shared storage (its files at the same paths here), but this \
                 ferry receive has no --shared-storage-root to allow any"
                    .into(),
            ));
        }
        (None, _) => {}
    }
    if let Some(p) = crate::config::vcpus_problem(hello.vcpus) {
        return Err(DestinationError::Refused(format!(
            "{} vCPUs is not a VM this ferry can run: {p}",
            hello.vcpus
        )));
    }
    let host_mib = crate::util::host_memory_mib();
    let mib_problem =
        if hello.memory_size < MIN_MEMORY || !hello.memory_size.is_multiple_of(1 << 20) {
            Some("not a whole number of MiB, at least 16".to_string())
        } else if host_mib.is_none() {
            // Without the host's size there is no limit to check against.
            Some("this host's memory size is unknown (/proc/meminfo)".to_string())
        } else {
            crate::config::memory_problem(hello.memory_size >> 20)
        };
    if let Some(p) = mib_problem {
        return Err(DestinationError::Refused(format!(
            "guest memory of {} bytes does not fit this host ({} MiB): {p}",
            hello.memory_size,
            host_mib.unwrap_or(0)
        )));
    }
    check_cpuid(&hello.cpuid)?;
    check_net_ids(&hello.net_ids, &policy.taps)?;
    Ok(hello)
}

/// Every announced net device must have a tap here (`--tap`).
fn check_net_ids(ids: &[String], taps: &[(String, String)]) -> Result<(), DestinationError> {
    if ids.len() > crate::config::MAX_DRIVES
        || ids
            .iter()
            .any(|id| id.is_empty() || id.len() > crate::config::MAX_DRIVE_ID_LEN)
    {
        return Err(DestinationError::Refused("invalid net device ids".into()));
    }
    for (i, id) in ids.iter().enumerate() {
        if !taps.iter().any(|(t, _)| t == id) {
            return Err(DestinationError::Refused(no_tap(i, id)));
        }
    }
    Ok(())
}

/// Opens this host's tap for each net device the handshake named, so that
/// the guest can be announced there the moment the source pauses, and a tap
/// that cannot be had refuses the migration before any memory moves.
fn open_taps(
    ids: &[String],
    taps: &[(String, String)],
) -> Result<Vec<(String, Tap)>, DestinationError> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let name = taps
                .iter()
                .find(|(t, _)| t == id)
                .map(|(_, name)| name)
                .ok_or_else(|| DestinationError::Refused(no_tap(i, id)))?;
            let tap = Tap::open(name).map_err(|source| DestinationError::Tap {
                id: id.clone(),
                source,
            })?;
            Ok((id.clone(), tap))
        })
        .collect()
}

fn no_tap(index: usize, id: &str) -> String {
    // The id is bounded and shown quoted, so that it cannot pass for
    // anything else in the message.
    format!(
        "net[{index}] (id {id:?}) has no tap on the destination: start `ferry receive` with \
         --tap {}=TAP",
        id.escape_default()
    )
}

/// The files a storage copy announces: plain names, one size each, and an
/// id not in use under `--dir`.
fn check_offer(
    offer: &super::protocol::StorageOffer,
    base: &Path,
    id: &str,
) -> Result<(), DestinationError> {
    let plain = |n: &String| {
        !n.is_empty()
            && n.len() <= 255
            && n != "."
            && n != ".."
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    };
    let mut names: Vec<&String> = offer.files.iter().collect();
    names.sort();
    names.dedup();
    if offer.files.len() > 64 || !offer.files.iter().all(plain) || names.len() != offer.files.len()
    {
        return Err(DestinationError::Refused(
            "invalid file names for the share".into(),
        ));
    }
    if offer.sizes.len() != offer.files.len() {
        return Err(DestinationError::Refused(format!(
            "the storage offer gives {} sizes for {} files",
            offer.sizes.len(),
            offer.files.len()
        )));
    }
    for p in [base.join(id), ShareDir::marker(base, id)] {
        if std::fs::symlink_metadata(&p).is_ok() {
            return Err(DestinationError::Refused(format!(
                "migration id {id} is already in use in --dir {} ({} exists)",
                base.display(),
                p.display()
            )));
        }
    }
    Ok(())
}

/// The feature bits a guest may have come to rely on, by (leaf, subleaf,
/// register): every one it sees must be supported here.
const FEATURE_REGS: &[(u32, u32, usize, u32)] = &[
    // leaf 1 EDX, minus HTT (topology is ours to set).
    (1, 0, 3, !(1 << 28)),
    // leaf 1 ECX, minus the hypervisor bit (ours to set).
    (1, 0, 2, !(1 << 31)),
    (7, 0, 1, !0),
    (7, 0, 2, !0),
    (7, 0, 3, !0),
    (0xd, 1, 0, !0),
    (0x8000_0001, 0, 2, !0),
    (0x8000_0001, 0, 3, !0),
];

fn check_cpuid(guest: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), DestinationError> {
    let kvm = crate::security::kvm().map_err(DestinationError::Cpuid)?;
    let host = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(DestinationError::Cpuid)?;
    let find = |set: &[kvm_bindings::kvm_cpuid_entry2], leaf: u32, sub: u32| {
        set.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    };
    let reg = |e: &kvm_bindings::kvm_cpuid_entry2, r: usize| [e.eax, e.ebx, e.ecx, e.edx][r];
    for &(leaf, sub, r, mask) in FEATURE_REGS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host.as_slice(), leaf, sub)
            .map(|h| reg(&h, r))
            .unwrap_or(0);
        let missing = reg(&g, r) & mask & !h;
        if missing != 0 {
            return Err(DestinationError::Refused(format!(
                "the guest uses CPU features this host lacks: CPUID leaf {leaf:#x}.{sub} {} bits {missing:#x}",
                ["EAX", "EBX", "ECX", "EDX"][r]
            )));
        }
    }
    Ok(())
}

/// Sets up the share for a storage migration: `DIR/<id>/`, served over NFS
/// (only to `peer`) unless the source writes through its own mount.
fn open_share(
    stream: &Channel,
    peer: SocketAddr,
    hello: &Hello,
    dir: Option<&Path>,
    security: &Security,
) -> Result<Option<(ShareDir, Option<NfsShareServer>, ShareOffer)>, DestinationError> {
    let (Some(offer), Some(base)) = (&hello.storage, dir) else {
        return Ok(None);
    };
    // Refused before a byte is copied, rather than failing halfway.
    let need = offer
        .data_bytes
        .unwrap_or_else(|| offer.sizes.iter().fold(0u64, |a, &b| a.saturating_add(b)));
    let free = free_bytes(base).map_err(DestinationError::ShareSetup)?;
    if need > free {
        return Err(DestinationError::NoSpace {
            dir: base.to_path_buf(),
            need_mib: need.div_ceil(1 << 20),
            free_mib: free >> 20,
        });
    }
    let share_dir = ShareDir::create(base, &hello.migration_id)?;
    if offer.mounted_share {
        let offer = ShareOffer {
            dir_name: hello.migration_id.clone(),
            nfs_port: None,
            export: None,
            secret: None,
        };
        return Ok(Some((share_dir, None, offer)));
    }
    let local: IpAddr = stream
        .local_addr()
        .map_err(DestinationError::ShareSetup)?
        .ip();
    let export = format!(
        "/ferry-{}",
        crate::util::random_hex::<16>().map_err(DestinationError::ShareSetup)?
    );
    let secret = crate::util::random_bytes::<{ super::share::SECRET_LEN }>()
        .map_err(DestinationError::ShareSetup)?;
    let guard = ShareGuard {
        tls: match security {
            Security::Tls(id) => Some(id.server_config()),
            Security::Insecure => None,
        },
        // The share's client must be the channel's, not only from its CA.
        peer_cert: stream.peer_certificate(),
        secret: Some(secret),
    };
    let files = offer
        .files
        .iter()
        .cloned()
        .zip(offer.sizes.iter().copied())
        .collect();
    let server = NfsShareServer::start_for(
        &share_dir.path,
        local,
        &export,
        Some(peer.ip()),
        guard,
        files,
    )?;
    eprintln!(
        "ferry: sharing {} over NFSv3 at {local}:{} as {export} (only to {})",
        share_dir.path.display(),
        server.port(),
        peer.ip()
    );
    let offer = ShareOffer {
        dir_name: hello.migration_id.clone(),
        nfs_port: Some(server.port()),
        export: Some(export),
        secret: Some(super::share::secret_hex(&secret)),
    };
    Ok(Some((share_dir, Some(server), offer)))
}

/// Every net device gets the tap this host chose for it; one it did not
/// choose for is refused.
fn place_taps(config: &mut VmConfig, taps: &[(String, String)]) -> Result<(), DestinationError> {
    for (i, net) in config.net.iter_mut().enumerate() {
        match taps.iter().find(|(id, _)| *id == net.id) {
            Some((_, tap)) => net.tap = tap.clone(),
            None => return Err(DestinationError::Untrusted(no_tap(i, &net.id))),
        }
    }
    Ok(())
}

/// The state must describe the VM the handshake announced.
fn check_state(hello: &Hello, state: &VmState) -> Result<(), DestinationError> {
    let bad = |why: String| {
        DestinationError::Protocol(ProtocolError::Malformed {
            kind: Kind::State,
            why,
        })
    };
    if state.memory_size != hello.memory_size
        || state.config.memory_mib.checked_mul(1 << 20) != Some(hello.memory_size)
    {
        return Err(bad("memory size differs from the handshake".into()));
    }
    if state.vcpus.len() != hello.vcpus as usize || state.config.vcpus != hello.vcpus {
        return Err(bad("vCPU count differs from the handshake".into()));
    }
    if state.drives.len() != state.config.drives.len() {
        return Err(bad("drive states do not match the config".into()));
    }
    if state.nets.len() != state.config.net.len()
        || !state
            .config
            .net
            .iter()
            .map(|n| &n.id)
            .eq(hello.net_ids.iter())
    {
        return Err(bad(
            "net devices differ from the handshake or from their states".into(),
        ));
    }
    Ok(())
}

/// Refuses a `Seal` that does not match what arrived on its connection:
/// frames lost, repeated, or (`elsewhere`) taken from another stream.
fn check_seal(got: &Seal, digest: &StreamDigest, elsewhere: &str) -> Result<(), DestinationError> {
    let want = digest.seal();
    if got.frames != want.frames || got.digest != want.digest {
        return Err(DestinationError::Stream(format!(
            "the source sealed {} frames with digest {:08x}, this destination received {} \
             with digest {:08x} (frames lost, repeated, or {elsewhere})",
            got.frames, got.digest, want.frames, want.digest
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReceiveState::*;

    #[test]
    fn memory_then_state_is_the_only_way_to_a_received_guest() {
        let mut st = Established;
        for kind in [
            Kind::MemoryPages,
            Kind::ZeroPages,
            Kind::PassEnd,
            Kind::Heartbeat,
            Kind::MemoryPages,
            Kind::PassEnd,
        ] {
            frame_step(st, kind).unwrap();
            st = next_state(st, kind);
        }
        assert_eq!(st, Memory { passes: 2 });
        assert_eq!(frame_step(st, Kind::State).unwrap(), Step::State);
        assert_eq!(next_state(st, Kind::State), StateReceived);
        // A state with no memory before it is allowed: a guest of zero pages
        // still sends its state (and check_state vets it).
        assert_eq!(frame_step(Established, Kind::State).unwrap(), Step::State);
    }

    #[test]
    fn hand_over_frames_are_refused_while_receiving() {
        for st in [Established, Memory { passes: 3 }] {
            for kind in [
                Kind::Go,
                Kind::Ready,
                Kind::Resumed,
                Kind::Hello,
                Kind::HelloAck,
            ] {
                assert!(
                    matches!(
                        frame_step(st, kind),
                        Err(ProtocolError::Unexpected { got, .. }) if got == kind
                    ),
                    "{kind:?} in {st:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_but_an_error_is_taken_once_the_state_arrived() {
        for st in [StateReceived, Ready, Running, Aborted] {
            for kind in [
                Kind::MemoryPages,
                Kind::ZeroPages,
                Kind::State,
                Kind::PassEnd,
            ] {
                assert!(frame_step(st, kind).is_err(), "{kind:?} in {st:?}");
            }
            assert_eq!(frame_step(st, Kind::Error).unwrap(), Step::PeerError);
        }
    }

    /// A peer that trickles bytes after its refusal does not hold the
    /// drain beyond its one deadline (each byte used to restart the read
    /// timeout: 1 MiB at a byte a second was days).
    #[test]
    fn a_trickling_peer_cannot_hold_the_linger_open() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let trickler = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !s2.load(Ordering::SeqCst) && sent < 600 {
                if std::io::Write::write_all(&mut peer, b"x").is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            sent
        });
        let t = Instant::now();
        linger_close(&ours, PRE_AUTH_DRAIN);
        let took = t.elapsed();
        stop.store(true, Ordering::SeqCst);
        let sent = trickler.join().unwrap();
        // Liveness, not speed: it ended while the peer was still sending.
        assert!(took < Duration::from_secs(25), "{took:?}");
        assert!(
            sent < 600,
            "the drain outlasted the trickler ({sent} bytes)"
        );
    }

    #[test]
    fn copied_files_are_named_inside_the_share_directory() {
        let mut config: crate::config::VmConfig = serde_json::from_value(serde_json::json!({
            "kernel": "kernel",
            "initrd": "initrd",
            "drives": [{"id": "d0", "path": "../../etc/drive0-d0.img"}],
        }))
        .unwrap();
        config.kernel = "/somewhere/kernel".into();
        local_paths(&mut config, Path::new("/dst/abc"));
        assert_eq!(config.kernel, Path::new("/dst/abc/kernel"));
        assert_eq!(config.initrd.as_deref(), Some(Path::new("/dst/abc/initrd")));
        assert_eq!(config.drives[0].path, Path::new("/dst/abc/drive0-d0.img"));
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ferry-dest-test-{}",
            crate::util::random_hex::<8>().unwrap()
        ));
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn leftovers_are_removed_only_when_no_live_receiver_holds_them() {
        let base = tempdir();
        // A dead receiver's copy: marker and directory, nobody holds them.
        std::fs::create_dir(base.join("aa11")).unwrap();
        std::fs::write(base.join("aa11/disk.img"), b"partial").unwrap();
        std::fs::write(base.join(".aa11.partial"), b"").unwrap();
        // A live receiver's copy in progress: this process holds it.
        let mut live = ShareDir::create(&base, "bb22").unwrap();
        std::fs::write(live.path.join("disk.img"), b"copying").unwrap();
        // A guest that runs on its copy: no marker, directory held.
        let mut running = ShareDir::create(&base, "cc33").unwrap();
        running.keep();
        let guest_lock = running.take_lock();
        assert!(guest_lock.is_some());
        std::fs::write(base.join("cc33/disk.img"), b"running").unwrap();
        // A forged marker naming the running guest's directory.
        std::fs::write(base.join(".cc33.partial"), b"").unwrap();

        remove_leftovers(&base);
        assert!(!base.join("aa11").exists());
        assert!(!base.join(".aa11.partial").exists());
        assert_eq!(
            std::fs::read(base.join("bb22/disk.img")).unwrap(),
            b"copying"
        );
        assert!(base.join(".bb22.partial").exists());
        assert_eq!(
            std::fs::read(base.join("cc33/disk.img")).unwrap(),
            b"running"
        );

        // Once nobody holds them (their receiver died), they go too.
        live.keep = true;
        drop(live);
        remove_leftovers(&base);
        assert!(!base.join("bb22").exists());
        // The guest still runs: the directory stays while its lock is held.
        assert!(base.join("cc33/disk.img").exists());
        drop(guest_lock);
        drop(running);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn an_id_in_use_is_refused_and_nothing_is_touched() {
        let base = tempdir();
        std::fs::create_dir(base.join("dd44")).unwrap();
        std::fs::write(base.join("dd44/disk.img"), b"a guest's disk").unwrap();
        assert!(ShareDir::create(&base, "dd44").is_err());
        assert_eq!(
            std::fs::read(base.join("dd44/disk.img")).unwrap(),
            b"a guest's disk"
        );
        // No marker was left behind for a later cleanup to act on.
        assert!(!base.join(".dd44.partial").exists());
        remove_leftovers(&base);
        assert!(base.join("dd44/disk.img").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_page_map_needs_every_page_once_and_clears_only_received_data() {
        let (_fd, mem) = create_guest_memory(16 << 20).unwrap();
        let mut map = PageMap::new(&mem);
        let pages = (16 << 20) / PAGE_SIZE;
        assert_eq!(map.missing(), Some((pages, 0)));
        map.got_data(0, 8 * PAGE_SIZE);
        // Zero over data and fresh pages: only the data needs clearing.
        assert_eq!(
            map.got_zero(4 * PAGE_SIZE, 8 * PAGE_SIZE),
            vec![(4 * PAGE_SIZE, 4 * PAGE_SIZE)]
        );
        assert_eq!(map.got_zero(4 * PAGE_SIZE, 8 * PAGE_SIZE), vec![]);
        assert_eq!(map.missing(), Some((pages - 12, 12 * PAGE_SIZE)));
        map.got_zero(12 * PAGE_SIZE, (pages - 12) * PAGE_SIZE);
        assert_eq!(map.missing(), None);
    }

    /// The word-at-a-time marking agrees with a page-by-page model on
    /// ranges of every alignment and length, word edges included.
    #[test]
    fn the_page_map_marks_whole_words_like_page_by_page() {
        let (_fd, mem) = create_guest_memory(4 << 20).unwrap();
        let pages = (4 << 20) / PAGE_SIZE;
        let mut map = PageMap::new(&mem);
        let (mut seen, mut data) = (vec![false; pages as usize], vec![false; pages as usize]);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let first = x % pages;
            let count = match round % 4 {
                0 => 1 + (x >> 20) % 3,
                1 => 1 + (x >> 20) % 130,
                2 => 64 - first % 64,
                _ => 1 + (x >> 20) % (pages - first).min(700),
            }
            .min(pages - first);
            let (gpa, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
            let range = first as usize..(first + count) as usize;
            if (x >> 40).is_multiple_of(3) {
                let mut want: Vec<(u64, u64)> = Vec::new();
                for p in range.clone().filter(|&p| data[p]) {
                    let at = p as u64 * PAGE_SIZE;
                    match want.last_mut() {
                        Some((s, l)) if *s + *l == at => *l += PAGE_SIZE,
                        _ => want.push((at, PAGE_SIZE)),
                    }
                }
                assert_eq!(map.got_zero(gpa, len), want, "round {round}");
                range.clone().for_each(|p| data[p] = false);
            } else {
                map.got_data(gpa, len);
                range.clone().for_each(|p| data[p] = true);
            }
            range.for_each(|p| seen[p] = true);
        }
        let bit = |bits: &[u64], p: usize| bits[p / 64] & (1 << (p % 64)) != 0;
        for p in 0..pages as usize {
            assert_eq!(bit(&map.seen, p), seen[p], "seen, page {p}");
            assert_eq!(bit(&map.data, p), data[p], "data, page {p}");
        }
        let unseen = seen.iter().filter(|s| !**s).count() as u64;
        let first = seen.iter().position(|s| !*s).map(|p| p as u64 * PAGE_SIZE);
        assert_eq!(map.missing(), first.map(|f| (unseen, f)));
    }

    #[test]
    fn the_page_map_follows_memory_above_the_mmio_hole() {
        // 3 GiB below the hole, 16 MiB at 4 GiB: a sparse memfd, nothing
        // is touched.
        let (_fd, mem) = create_guest_memory((3 << 30) + (16 << 20)).unwrap();
        let mut map = PageMap::new(&mem);
        map.got_zero(0, 3 << 30);
        assert_eq!(map.missing(), Some((4096, 4 << 30)));
        map.got_data(4 << 30, 4 * PAGE_SIZE);
        assert_eq!(map.missing(), Some((4092, (4 << 30) + 4 * PAGE_SIZE)));
        map.got_zero((4 << 30) + 4 * PAGE_SIZE, (16 << 20) - 4 * PAGE_SIZE);
        assert_eq!(map.missing(), None);
    }

    #[test]
    fn share_contents_must_be_announced_and_within_size() {
        let dir = tempdir();
        let files = vec!["disk.img".to_string(), "vm.json".to_string()];
        std::fs::write(dir.join("disk.img"), [0u8; 100]).unwrap();
        check_share_contents(&dir, &files, &[100, 10]).unwrap();
        let err = check_share_contents(&dir, &files, &[99, 10]).unwrap_err();
        assert!(err.to_string().contains("100 bytes, 99"), "{err}");
        std::os::unix::fs::symlink("/etc/passwd", dir.join("vm.json")).unwrap();
        let err = check_share_contents(&dir, &files, &[100, 10]).unwrap_err();
        assert!(err.to_string().contains("vm.json"), "{err}");
        std::fs::remove_file(dir.join("vm.json")).unwrap();
        std::fs::write(dir.join("extra"), b"").unwrap();
        let err = check_share_contents(&dir, &files, &[100, 10]).unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shared_storage_paths_must_resolve_under_the_root() {
        let base = tempdir();
        let root = base.join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("disk.img"), b"").unwrap();
        std::fs::write(base.join("outside.img"), b"").unwrap();
        std::os::unix::fs::symlink(base.join("outside.img"), root.join("link.img")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(
            under_root(&root, "d", &root.join("disk.img")).unwrap(),
            root.join("disk.img")
        );
        for p in [
            root.join("link.img"),
            root.join("../outside.img"),
            base.join("outside.img"),
        ] {
            let err = under_root(&root, "d", &p).unwrap_err();
            assert!(
                err.to_string().contains("outside --shared-storage-root"),
                "{err}"
            );
        }
        assert!(under_root(&root, "d", &root.join("missing.img")).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
