//! The destination side of the share: an NFSv3 server, inside the ferry
//! process, that serves one flat directory of regular files to one peer.
//!
//! `nfs3_server` does the protocol (portmap, MOUNT and NFS on one port);
//! [`DirFs`] maps its file system trait onto the real directory. The server
//! accepts TCP connections itself so that a connection from any address but
//! the allowed peer is reset before a byte of it is read, and so that each
//! one passes its [`ShareGuard`] (TLS with the migration channel's client
//! certificate, then the one-time secret) before a byte reaches the NFS
//! code. MOUNT's EXPORT call would tell anyone who gets that far the export
//! path, so the guard, not the path, is what keeps others out.
//!
//! Only the export itself can be mounted, not a file or path below it.
//! With an open guard ([`ShareGuard::open`], tests only) other NFSv3
//! clients work too; with libnfs-utils (Debian's 4.0), for an export
//! "/ferry-ab12" on port P:
//!
//! ```text
//! nfs-ls  'nfs://HOST/ferry-ab12?version=3&nfsport=P&mountport=P'
//! nfs-cat 'nfs://HOST/ferry-ab12/disk.img?version=3&nfsport=P&mountport=P'
//! nfs-cp  local.img 'nfs://HOST/ferry-ab12/new.img?version=3&nfsport=P&mountport=P'
//! ```
//!
//! (A trailing slash on the listing URL and a double slash before the file
//! name work as well. A leading double slash, "nfs://HOST//ferry-ab12/...",
//! does not: libnfs then asks to mount "//ferry-ab12". With the root export
//! "/" the double slash, "nfs://HOST//disk.img", is needed. nfs-cp will not
//! overwrite: libnfs creates exclusively and gets NFS3ERR_EXIST.)

use crate::security::ThreadFilter;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, FileTimes, Metadata, OpenOptions, Permissions};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, post_op_attr, sattr3,
    set_atime, set_gid3, set_mode3, set_mtime, set_size3, set_uid3, specdata3, stable_how,
    FSINFO3resok, FSF3_CANSETTIME, FSF3_HOMOGENEOUS,
};
use nfs3_server::test_reexports::{process_socket, RPCContext, TransactionTracker};
use nfs3_server::vfs::{
    DirEntryPlus, FileHandleU64, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
};
use tokio::sync::oneshot;

use super::{ShareError, ShareGuard, MAX_NAME_LEN, SECRET_LEN};

/// Largest READ and WRITE the server offers (FSINFO rtmax / wtmax).
pub const MAX_IO: u32 = 1 << 20;

/// Largest RPC record a client may send: a WRITE of `MAX_IO` with room to
/// spare for its header. nfs3_server 0.11.1 allocates what a record marker
/// claims (`IncompleteRpcMessage::recv` resizes its buffer to each
/// fragment's length, up to 2 GiB, and appends fragment after fragment),
/// so [`RecordLimit`] refuses a larger claim before the crate reads it.
pub const MAX_RECORD: u64 = 4 << 20;

const ROOT_ID: u64 = 1;

/// The share server's runtime threads.
const SERVER_WORKERS: usize = 2;

/// WRITEs from this size on are bulk copy: their writeback starts at once
/// and they run off the worker. Smaller ones (mirrored guest writes) do
/// neither.
const EARLY_WRITEBACK_MIN: usize = 64 << 10;

/// How long dropping the server waits for file operations still running.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The crate's own settings for its retransmission tracker.
const TRANSACTION_RETENTION: Duration = Duration::from_secs(60);
const MAX_ACTIVE_TRANSACTIONS: u16 = 256;
const TRANSACTION_TRIM: usize = 2048;

/// Keeps the share's large, short-lived buffers in the heap. The NFS code
/// allocates a fresh buffer or two of about 1 MiB per WRITE (the record,
/// its decoded payload); glibc maps each such block anew (its mmap
/// threshold is 128 KiB at first) and the kernel faults in 256 zeroed pages
/// per buffer, over half the share thread's time. With the threshold above
/// a record's size and trimming rare, freed buffers are reused warm.
/// Process-wide; `ferry receive` calls it once at start.
pub fn keep_large_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before the
    // receiver's threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// A running share server. Dropping it stops the server: the port and every
/// open connection are closed.
pub struct NfsShareServer {
    port: u16,
    export_path: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NfsShareServer {
    /// Serves `dir` (must exist) on `ip:0`, exported as `export_path`
    /// (e.g. "/ferry-<random hex>"), accepting TCP connections only from
    /// `allowed_peer` (None = any, for tests). Returns once listening.
    pub fn start(
        dir: &Path,
        ip: IpAddr,
        export_path: &str,
        allowed_peer: Option<IpAddr>,
        guard: ShareGuard,
    ) -> Result<Self, ShareError> {
        Self::start_inner(dir, ip, export_path, allowed_peer, guard, None)
    }

    /// As [`NfsShareServer::start`], for a migration's share: only the
    /// files in `files` can be created, written or removed, each up to its
    /// size in bytes, and no other name is visible.
    pub fn start_for(
        dir: &Path,
        ip: IpAddr,
        export_path: &str,
        allowed_peer: Option<IpAddr>,
        guard: ShareGuard,
        files: Vec<(String, u64)>,
    ) -> Result<Self, ShareError> {
        let files = files
            .into_iter()
            .map(|(n, size)| (OsString::from(n), size))
            .collect();
        Self::start_inner(dir, ip, export_path, allowed_peer, guard, Some(files))
    }

    fn start_inner(
        dir: &Path,
        ip: IpAddr,
        export_path: &str,
        allowed_peer: Option<IpAddr>,
        guard: ShareGuard,
        files: Option<HashMap<OsString, u64>>,
    ) -> Result<Self, ShareError> {
        check_export_path(export_path)?;
        let dir_what = || format!("share directory {}", dir.display());
        let meta = std::fs::metadata(dir).map_err(|e| ShareError::io(dir_what(), e))?;
        if !meta.is_dir() {
            return Err(ShareError::io(
                dir_what(),
                io::Error::from_raw_os_error(libc::ENOTDIR),
            ));
        }

        let bind_what = || format!("starting the share server on {ip}");
        let std_listener = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| ShareError::io(bind_what(), e))?;
        let port = std_listener
            .local_addr()
            .map_err(|e| ShareError::io(bind_what(), e))?
            .port();

        // Two workers: TLS and RPC decoding of several connections run in
        // parallel, and a WRITE's pwrite runs in place (`block_in_place`).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SERVER_WORKERS)
            .enable_all()
            .thread_name("ferry-share-fs")
            // Issue 10: each worker and blocking-pool thread narrows itself
            // before it runs a task. A thread that cannot stops the
            // process: the share takes no connection unconfined.
            .on_thread_start(|| {
                if !crate::security::narrow_thread("share", ThreadFilter::Share) {
                    std::process::abort();
                }
            })
            .max_blocking_threads(16)
            .build()
            .map_err(|e| ShareError::io(bind_what(), e))?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| ShareError::io(bind_what(), e))?
        };

        let fs = Arc::new(DirFs {
            inner: Arc::new(FsInner {
                root: dir.to_path_buf(),
                fsid: meta.dev(),
                files,
                state: Mutex::new(State {
                    next_id: ROOT_ID + 1,
                    by_name: HashMap::new(),
                    by_id: HashMap::new(),
                    dir_dirty: false,
                }),
            }),
        });
        // The crate's only way to make a connection context outside its own
        // listener (doc-hidden, hence the exact version pin in Cargo.toml).
        // Its generation number, in every file handle, is taken here once.
        let mut context = RPCContext::test_ctx(export_path, fs);
        context.local_port = port;

        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("ferry-share".into())
            .spawn(move || {
                if !crate::security::narrow_thread("share", ThreadFilter::Share) {
                    // Dropping the listener unserved: the source cannot mount.
                    return;
                }
                runtime.block_on(serve(listener, context, allowed_peer, guard, stopped));
                // Drops every connection; file operations already handed to
                // the blocking pool get a moment to finish.
                runtime.shutdown_timeout(SHUTDOWN_WAIT);
            })
            .map_err(|e| ShareError::io(bind_what(), e))?;

        Ok(NfsShareServer {
            port,
            export_path: export_path.to_string(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn export_path(&self) -> &str {
        &self.export_path
    }
}

impl Drop for NfsShareServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An export path is what a client mounts: "/" or slash-separated
/// components of `[A-Za-z0-9._-]`.
fn check_export_path(path: &str) -> Result<(), ShareError> {
    let bad = |why| {
        Err(ShareError::InvalidName {
            name: path.to_string(),
            why,
        })
    };
    if !path.starts_with('/') {
        return bad("an export path starts with a slash");
    }
    if path.len() > 1024 {
        return bad("an export path is at most 1024 bytes");
    }
    if path == "/" {
        return Ok(());
    }
    for component in path[1..].split('/') {
        if component.is_empty() || component == "." || component == ".." {
            return bad("empty, '.' or '..' component in the export path");
        }
        if !component
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return bad("an export path holds only letters, digits, '.', '_' and '-'");
        }
    }
    Ok(())
}

async fn serve(
    listener: tokio::net::TcpListener,
    context: RPCContext<DirFs>,
    allowed_peer: Option<IpAddr>,
    guard: ShareGuard,
    mut stop: oneshot::Receiver<()>,
) {
    let mut refused: u64 = 0;
    let unauthenticated = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let guard = Arc::new(guard);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(_) => {
                // Out of file descriptors, or a connection that died in the
                // backlog: nothing to do for it, and no reason to spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !peer_allowed(allowed_peer, peer) {
            refused += 1;
            if refused <= 3 {
                eprintln!(
                    "ferry: share refused a connection from {peer} (only {} may connect)",
                    allowed_peer.map_or_else(String::new, |a| a.to_string())
                );
            }
            // Reset rather than close: the peer learns at once.
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            drop(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        // Reap connections of a source that vanished.
        let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(10))
                .with_interval(Duration::from_secs(5))
                .with_retries(3),
        );
        let mut context = context.clone();
        context.client_addr = peer.to_string();
        // One tracker per connection: it is freed with the connection (the
        // crate keys it by peer address and port anyway).
        context.transaction_tracker = Arc::new(TransactionTracker::new(
            TRANSACTION_RETENTION,
            MAX_ACTIVE_TRANSACTIONS,
            TRANSACTION_TRIM,
        ));
        let (guard, unauthenticated) = (guard.clone(), unauthenticated.clone());
        tokio::spawn(async move {
            let why = match tokio::time::timeout(ADMIT_TIMEOUT, admit(socket, &guard)).await {
                // Records are bounded in what the NFS code reads: after the
                // TLS layer and the secret.
                Ok(Ok(Admitted::Tls(s))) => {
                    let s = RecordLimit::new(WriteThrough::new(s), MAX_RECORD, MAX_IN_FLIGHT);
                    let _ = process_socket(s, context).await;
                    return;
                }
                Ok(Ok(Admitted::Plain(s))) => {
                    let s = RecordLimit::new(s, MAX_RECORD, MAX_IN_FLIGHT);
                    let _ = process_socket(s, context).await;
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no authentication within {} s", ADMIT_TIMEOUT.as_secs()),
            };
            let n = unauthenticated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n < 3 {
                eprintln!("ferry: share refused a connection from {peer}: {why}");
            }
        });
    }
}

/// Follows RPC record marking (RFC 5531 §11: a 4-byte header per fragment,
/// length in the low 31 bits, "last fragment" in the top bit) through a
/// byte stream, in whatever pieces it comes.
#[derive(Default)]
struct RecordMarks {
    /// Bytes of the current fragment header seen so far.
    header: [u8; 4],
    header_have: usize,
    /// Payload bytes of the current fragment still to pass.
    fragment_left: u64,
    /// The fragment being passed is the record's last.
    last: bool,
    /// Bytes the current record's fragments have announced so far.
    record: u64,
}

impl RecordMarks {
    /// Feeds `bytes`; returns how many records they completed, or an error
    /// as soon as a record announces more than `max` bytes.
    fn feed(&mut self, mut bytes: &[u8], max: u64) -> io::Result<u32> {
        let mut done = 0;
        while !bytes.is_empty() {
            if self.fragment_left > 0 {
                let n = (bytes.len() as u64).min(self.fragment_left);
                self.fragment_left -= n;
                bytes = &bytes[n as usize..];
                if self.fragment_left == 0 && self.last {
                    self.record = 0;
                    done += 1;
                }
                continue;
            }
            let n = (4 - self.header_have).min(bytes.len());
            self.header[self.header_have..self.header_have + n].copy_from_slice(&bytes[..n]);
            self.header_have += n;
            bytes = &bytes[n..];
            if self.header_have < 4 {
                continue;
            }
            self.header_have = 0;
            let h = u32::from_be_bytes(self.header);
            self.last = h & 0x8000_0000 != 0;
            self.fragment_left = u64::from(h & 0x7fff_ffff);
            self.record += self.fragment_left;
            if self.record > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "RPC record of more than {} bytes (at most {max} allowed)",
                        self.record
                    ),
                ));
            }
            if self.fragment_left == 0 && self.last {
                self.record = 0;
                done += 1;
            }
        }
        Ok(done)
    }
}

/// Most requests one share connection may have read and not yet answered:
/// `nfs3_server` 0.11.1 spawns a task per request as soon as it is read,
/// each holding its record, so without this a client that pipelines WRITEs
/// faster than the disk takes them makes the server hold all of them. Our
/// client has one call per connection in flight; libnfs pipelines a few.
pub(crate) const MAX_IN_FLIGHT: u32 = 16;

/// A share connection's stream with its requests bounded: a record that
/// announces more than `max` bytes fails the read before the server
/// allocates for it, and once `max_in_flight` requests are read and not
/// answered, reading waits for a reply to go out (the client's writes then
/// back up in TCP). Replies are counted as they are written.
pub(crate) struct RecordLimit<S> {
    inner: S,
    max: u64,
    max_in_flight: u32,
    incoming: RecordMarks,
    outgoing: RecordMarks,
    in_flight: u32,
    /// The reader waiting for a reply to free a slot.
    waiting: Option<std::task::Waker>,
}

impl<S> RecordLimit<S> {
    pub(crate) fn new(inner: S, max: u64, max_in_flight: u32) -> Self {
        RecordLimit {
            inner,
            max,
            max_in_flight,
            incoming: RecordMarks::default(),
            outgoing: RecordMarks::default(),
            in_flight: 0,
            waiting: None,
        }
    }

    /// Follows bytes read; an error if a record grows past the limit.
    pub(crate) fn track(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.in_flight += self.incoming.feed(bytes, self.max)?;
        Ok(())
    }

    /// Follows bytes written: every reply completed frees a slot.
    fn track_reply(&mut self, bytes: &[u8]) {
        // Our own replies: no limit applies (READ answers are ≤ MAX_IO).
        if let Ok(n) = self.outgoing.feed(bytes, u64::MAX) {
            if n > 0 {
                self.in_flight = self.in_flight.saturating_sub(n);
                if let Some(w) = self.waiting.take() {
                    w.wake();
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for RecordLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        if this.in_flight >= this.max_in_flight {
            this.waiting = Some(cx.waker().clone());
            return std::task::Poll::Pending;
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                std::task::Poll::Ready(this.track(&buf.filled()[before..]))
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for RecordLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                this.track_reply(&buf[..n]);
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How long a connection has for its TLS handshake and secret.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(10);

enum Admitted {
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    Plain(tokio::net::TcpStream),
}

/// TLS (a client certificate from the CA, the channel's own when known),
/// then the migration's secret; nothing of the connection reaches the NFS
/// code before both.
async fn admit(mut socket: tokio::net::TcpStream, guard: &ShareGuard) -> io::Result<Admitted> {
    let Some(tls) = &guard.tls else {
        if let Some(secret) = &guard.secret {
            check_secret(&mut socket, secret).await?;
        }
        return Ok(Admitted::Plain(socket));
    };
    let mut stream = tokio_rustls::TlsAcceptor::from(tls.clone())
        .accept(socket)
        .await
        .map_err(|e| {
            io::Error::other(format!(
                "TLS handshake failed: {}",
                crate::migration::transport::explain_handshake_error(&e)
            ))
        })?;
    if let Some(want) = &guard.peer_cert {
        let got = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first());
        if got != Some(want) {
            return Err(io::Error::other(
                "its client certificate is not the one of the migration channel",
            ));
        }
    }
    if let Some(secret) = &guard.secret {
        check_secret(&mut stream, secret).await?;
    }
    Ok(Admitted::Tls(Box::new(stream)))
}

async fn check_secret(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    secret: &[u8; SECRET_LEN],
) -> io::Result<()> {
    let mut got = [0u8; SECRET_LEN];
    tokio::io::AsyncReadExt::read_exact(stream, &mut got)
        .await
        .map_err(|e| io::Error::other(format!("no share secret: {e}")))?;
    // Constant time: how far a guess matched must not show.
    let diff = got.iter().zip(secret).fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff != 0 {
        return Err(io::Error::other("wrong share secret"));
    }
    Ok(())
}

/// The NFS code writes a reply and then waits for the next call, never
/// flushing: over TLS, a reply's tail could then sit in the session until
/// the client gave up. Each write here completes only once it is on the
/// socket. A write that returns Pending after the TLS layer took the bytes
/// remembers how many, and the caller's retry (with the same buffer, as
/// the contract says) only finishes the flush.
struct WriteThrough<S> {
    inner: S,
    taken: Option<usize>,
}

impl<S> WriteThrough<S> {
    fn new(inner: S) -> Self {
        WriteThrough { inner, taken: None }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteThrough<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteThrough<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.taken.is_none() {
            match std::pin::Pin::new(&mut this.inner).poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => this.taken = Some(n),
                other => return other,
            }
        }
        match std::pin::Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(this.taken.take().unwrap_or(0))),
            Poll::Ready(Err(e)) => {
                this.taken = None;
                Poll::Ready(Err(e))
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

fn peer_allowed(allowed: Option<IpAddr>, peer: SocketAddr) -> bool {
    allowed.is_none_or(|a| a.to_canonical() == peer.ip().to_canonical())
}

/// The flat directory as `nfs3_server` sees it. File ids are handed out by
/// the server (root = 1), never reused within its lifetime; a handle to a
/// file that was removed is stale.
struct DirFs {
    inner: Arc<FsInner>,
}

struct FsInner {
    root: PathBuf,
    fsid: u64,
    /// The names the share may hold and their largest size; `None` serves
    /// the directory as it is (tests).
    files: Option<HashMap<OsString, u64>>,
    state: Mutex<State>,
}

struct State {
    next_id: u64,
    by_name: HashMap<OsString, u64>,
    by_id: HashMap<u64, Entry>,
    /// A file was created, removed or renamed since the last COMMIT.
    dir_dirty: bool,
}

struct Entry {
    name: OsString,
    /// (st_dev, st_ino) when the id was given: if the name now holds another
    /// file, that file gets a new id.
    ino: (u64, u64),
    /// Opened on first use, kept for the server's lifetime.
    file: Option<Arc<File>>,
    /// Set by an EXCLUSIVE create, so that its retransmission succeeds.
    verf: Option<createverf3>,
}

impl State {
    fn register(&mut self, name: &OsStr, ino: (u64, u64), file: Option<Arc<File>>) -> u64 {
        if let Some(&id) = self.by_name.get(name) {
            if let Some(entry) = self.by_id.get_mut(&id) {
                if entry.ino == ino {
                    if entry.file.is_none() {
                        entry.file = file;
                    }
                    return id;
                }
            }
            self.by_id.remove(&id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.by_name.insert(name.to_os_string(), id);
        self.by_id.insert(
            id,
            Entry {
                name: name.to_os_string(),
                ino,
                file,
                verf: None,
            },
        );
        id
    }

    fn forget(&mut self, name: &OsStr) {
        if let Some(id) = self.by_name.remove(name) {
            self.by_id.remove(&id);
        }
    }
}

pub(crate) fn io_status(e: &io::Error) -> nfsstat3 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => nfsstat3::NFS3ERR_NOSPC,
        Some(libc::EDQUOT) => nfsstat3::NFS3ERR_DQUOT,
        Some(libc::EFBIG) => nfsstat3::NFS3ERR_FBIG,
        Some(libc::EROFS) => nfsstat3::NFS3ERR_ROFS,
        Some(libc::EACCES) | Some(libc::EBADF) => nfsstat3::NFS3ERR_ACCES,
        Some(libc::EPERM) => nfsstat3::NFS3ERR_PERM,
        // ELOOP: O_NOFOLLOW met a symlink, which the share does not serve.
        Some(libc::ENOENT) | Some(libc::ELOOP) => nfsstat3::NFS3ERR_NOENT,
        Some(libc::EEXIST) => nfsstat3::NFS3ERR_EXIST,
        Some(libc::EISDIR) => nfsstat3::NFS3ERR_ISDIR,
        Some(libc::ENOTDIR) => nfsstat3::NFS3ERR_NOTDIR,
        Some(libc::ENAMETOOLONG) => nfsstat3::NFS3ERR_NAMETOOLONG,
        Some(libc::EINVAL) => nfsstat3::NFS3ERR_INVAL,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

fn nfs_time(secs: i64, nsecs: i64) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(secs.max(0)).unwrap_or(u32::MAX),
        nseconds: u32::try_from(nsecs).unwrap_or(0),
    }
}

fn system_time(t: nfstime3) -> SystemTime {
    UNIX_EPOCH + Duration::new(u64::from(t.seconds), t.nseconds.min(999_999_999))
}

fn file_name<'a>(name: &'a filename3<'_>) -> Result<&'a OsStr, nfsstat3> {
    let bytes = name.as_ref();
    if bytes.is_empty() || bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if bytes.len() > MAX_NAME_LEN {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    Ok(OsStr::from_bytes(bytes))
}

impl FsInner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the maps half-updated in a way
        // that matters more than refusing service would.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, id: u64, meta: &Metadata) -> fattr3 {
        fattr3 {
            type_: if meta.is_dir() {
                ftype3::NF3DIR
            } else {
                ftype3::NF3REG
            },
            mode: meta.mode() & 0o7777,
            nlink: u32::try_from(meta.nlink()).unwrap_or(u32::MAX),
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.len(),
            used: meta.blocks().saturating_mul(512),
            rdev: specdata3::default(),
            fsid: self.fsid,
            fileid: id,
            atime: nfs_time(meta.atime(), meta.atime_nsec()),
            mtime: nfs_time(meta.mtime(), meta.mtime_nsec()),
            ctime: nfs_time(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// Whether `name` may be created, written or removed here.
    fn allowed(&self, name: &OsStr) -> Result<(), nfsstat3> {
        match &self.files {
            Some(files) if !files.contains_key(name) => Err(nfsstat3::NFS3ERR_ACCES),
            _ => Ok(()),
        }
    }

    /// Whether `name` is shown at all: an unannounced name is not there.
    fn visible(&self, name: &OsStr) -> bool {
        self.files.as_ref().is_none_or(|f| f.contains_key(name))
    }

    /// The largest size the file `id` may reach.
    fn limit(&self, id: u64) -> u64 {
        let Some(files) = &self.files else {
            return u64::MAX;
        };
        let state = self.lock();
        state
            .by_id
            .get(&id)
            .and_then(|e| files.get(&e.name))
            .copied()
            .unwrap_or(0)
    }

    fn check_dir(&self, dir: u64) -> Result<(), nfsstat3> {
        if dir == ROOT_ID {
            Ok(())
        } else if self.lock().by_id.contains_key(&dir) {
            Err(nfsstat3::NFS3ERR_NOTDIR)
        } else {
            Err(nfsstat3::NFS3ERR_STALE)
        }
    }

    fn open(path: &Path, create: Option<u32>, exclusive: bool) -> io::Result<File> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW);
        if let Some(mode) = create {
            options.mode(mode);
            if exclusive {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        match options.open(path) {
            // A file the server may not write is still worth reading.
            Err(e) if create.is_none() && e.raw_os_error() == Some(libc::EACCES) => {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
            }
            r => r,
        }
    }

    fn file(&self, id: u64) -> Result<Arc<File>, nfsstat3> {
        let path = {
            let state = self.lock();
            let entry = state.by_id.get(&id).ok_or(if id == ROOT_ID {
                nfsstat3::NFS3ERR_ISDIR
            } else {
                nfsstat3::NFS3ERR_STALE
            })?;
            if let Some(file) = &entry.file {
                return Ok(file.clone());
            }
            self.root.join(&entry.name)
        };
        let file = Self::open(&path, None, false).map_err(|e| io_status(&e))?;
        let meta = file.metadata().map_err(|e| io_status(&e))?;
        let mut state = self.lock();
        let entry = state.by_id.get_mut(&id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if entry.ino != (meta.dev(), meta.ino()) {
            // The name was given to another file since the id was handed out.
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(entry.file.get_or_insert_with(|| Arc::new(file)).clone())
    }

    fn getattr(&self, id: u64) -> Result<fattr3, nfsstat3> {
        if id == ROOT_ID {
            let meta = std::fs::metadata(&self.root).map_err(|e| io_status(&e))?;
            return Ok(self.attr(ROOT_ID, &meta));
        }
        let meta = self.file(id)?.metadata().map_err(|e| io_status(&e))?;
        Ok(self.attr(id, &meta))
    }

    fn lookup(&self, dir: u64, name: &filename3<'_>) -> Result<u64, nfsstat3> {
        self.check_dir(dir)?;
        if name.as_ref() == b"." || name.as_ref() == b".." {
            return Ok(ROOT_ID);
        }
        let name = file_name(name)?;
        if !self.visible(name) {
            return Err(nfsstat3::NFS3ERR_NOENT);
        }
        match std::fs::symlink_metadata(self.root.join(name)) {
            Ok(meta) if meta.is_file() => {
                Ok(self.lock().register(name, (meta.dev(), meta.ino()), None))
            }
            Ok(_) => Err(nfsstat3::NFS3ERR_NOENT),
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    self.lock().forget(name);
                }
                Err(io_status(&e))
            }
        }
    }

    fn read(&self, id: u64, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        let file = self.file(id)?;
        let size = file.metadata().map_err(|e| io_status(&e))?.len();
        if offset >= size {
            return Ok((Vec::new(), true));
        }
        let want = u64::from(count.min(MAX_IO)).min(size - offset);
        // `want` is at most MAX_IO.
        let mut buf = vec![0u8; want as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_status(&e)),
            }
        }
        buf.truncate(done);
        Ok((buf, offset + done as u64 >= size))
    }

    fn write(
        &self,
        id: u64,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.limit(id))
        {
            return Err(nfsstat3::NFS3ERR_FBIG);
        }
        let file = self.file(id)?;
        file.write_all_at(data, offset).map_err(|e| io_status(&e))?;
        // UNSTABLE data is not waited for until COMMIT, but a bulk write's
        // writeback starts now: the final COMMIT then finds little left to
        // flush. A small one (a mirrored guest write) is left to COMMIT:
        // starting writeback does the file system's block allocation on
        // the spot, in the guest's write latency.
        match stable {
            stable_how::UNSTABLE => {
                if data.len() >= EARLY_WRITEBACK_MIN {
                    start_writeback(&file, offset, data.len());
                }
                Ok(())
            }
            stable_how::DATA_SYNC => file.sync_data(),
            stable_how::FILE_SYNC => file.sync_all(),
        }
        .map_err(|e| io_status(&e))?;
        let meta = file.metadata().map_err(|e| io_status(&e))?;
        Ok((self.attr(id, &meta), stable))
    }

    fn commit(&self, id: u64) -> Result<(), nfsstat3> {
        if id != ROOT_ID {
            self.file(id)?.sync_all().map_err(|e| io_status(&e))?;
        }
        let dir_dirty = std::mem::replace(&mut self.lock().dir_dirty, false);
        if dir_dirty {
            if let Err(e) = File::open(&self.root).and_then(|d| d.sync_all()) {
                self.lock().dir_dirty = true;
                return Err(io_status(&e));
            }
        }
        Ok(())
    }

    fn setattr(&self, id: u64, attr: &sattr3) -> Result<fattr3, nfsstat3> {
        if id == ROOT_ID {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        let file = self.file(id)?;
        let meta = file.metadata().map_err(|e| io_status(&e))?;
        // Ownership stays with the ferry process.
        if matches!(attr.uid, set_uid3::Some(uid) if uid != meta.uid())
            || matches!(attr.gid, set_gid3::Some(gid) if gid != meta.gid())
        {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        if let set_size3::Some(size) = attr.size {
            if size > self.limit(id) {
                return Err(nfsstat3::NFS3ERR_FBIG);
            }
            file.set_len(size).map_err(|e| io_status(&e))?;
        }
        if let set_mode3::Some(mode) = attr.mode {
            file.set_permissions(Permissions::from_mode(mode & self.mode_mask()))
                .map_err(|e| io_status(&e))?;
        }
        let mut times = FileTimes::new();
        let mut set_times = false;
        match attr.atime {
            set_atime::DONT_CHANGE => {}
            set_atime::SET_TO_SERVER_TIME => {
                times = times.set_accessed(SystemTime::now());
                set_times = true;
            }
            set_atime::SET_TO_CLIENT_TIME(t) => {
                times = times.set_accessed(system_time(t));
                set_times = true;
            }
        }
        match attr.mtime {
            set_mtime::DONT_CHANGE => {}
            set_mtime::SET_TO_SERVER_TIME => {
                times = times.set_modified(SystemTime::now());
                set_times = true;
            }
            set_mtime::SET_TO_CLIENT_TIME(t) => {
                times = times.set_modified(system_time(t));
                set_times = true;
            }
        }
        if set_times {
            file.set_times(times).map_err(|e| io_status(&e))?;
        }
        let meta = file.metadata().map_err(|e| io_status(&e))?;
        Ok(self.attr(id, &meta))
    }

    /// Guest data in a migration's share is for this host's owner only.
    fn mode_mask(&self) -> u32 {
        if self.files.is_some() {
            0o600
        } else {
            0o777
        }
    }

    fn create(&self, dir: u64, name: &filename3<'_>, attr: &sattr3) -> Result<u64, nfsstat3> {
        self.check_dir(dir)?;
        let name = file_name(name)?;
        self.allowed(name)?;
        let mode = match attr.mode {
            set_mode3::Some(mode) => mode & self.mode_mask(),
            set_mode3::None => 0o644 & self.mode_mask(),
        };
        let file = Self::open(&self.root.join(name), Some(mode), false).map_err(|e| {
            match e.raw_os_error() {
                // A symlink holds the name: the share cannot use it.
                Some(libc::ELOOP) => nfsstat3::NFS3ERR_EXIST,
                _ => io_status(&e),
            }
        })?;
        let meta = file.metadata().map_err(|e| io_status(&e))?;
        if !meta.is_file() {
            return Err(nfsstat3::NFS3ERR_EXIST);
        }
        let id = {
            let mut state = self.lock();
            state.dir_dirty = true;
            state.register(name, (meta.dev(), meta.ino()), Some(Arc::new(file)))
        };
        // UNCHECKED on an existing file: its attributes (size 0 = truncate)
        // are applied as given.
        self.setattr(id, attr)?;
        Ok(id)
    }

    fn create_exclusive(
        &self,
        dir: u64,
        name: &filename3<'_>,
        verf: createverf3,
    ) -> Result<u64, nfsstat3> {
        self.check_dir(dir)?;
        let name = file_name(name)?;
        self.allowed(name)?;
        match Self::open(&self.root.join(name), Some(0o644 & self.mode_mask()), true) {
            Ok(file) => {
                let meta = file.metadata().map_err(|e| io_status(&e))?;
                let mut state = self.lock();
                state.dir_dirty = true;
                let id = state.register(name, (meta.dev(), meta.ino()), Some(Arc::new(file)));
                if let Some(entry) = state.by_id.get_mut(&id) {
                    entry.verf = Some(verf);
                }
                Ok(id)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A retransmission of our own create succeeds; anything
                // else is a clash.
                let state = self.lock();
                match state.by_name.get(name) {
                    Some(id) if state.by_id.get(id).and_then(|e| e.verf) == Some(verf) => Ok(*id),
                    _ => Err(nfsstat3::NFS3ERR_EXIST),
                }
            }
            Err(e) => Err(io_status(&e)),
        }
    }

    fn remove(&self, dir: u64, name: &filename3<'_>) -> Result<(), nfsstat3> {
        self.check_dir(dir)?;
        let name = file_name(name)?;
        self.allowed(name)?;
        let path = self.root.join(name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_status(&e))?;
        if !meta.is_file() {
            return Err(nfsstat3::NFS3ERR_NOENT);
        }
        std::fs::remove_file(&path).map_err(|e| io_status(&e))?;
        let mut state = self.lock();
        state.forget(name);
        state.dir_dirty = true;
        Ok(())
    }

    fn rename(
        &self,
        from_dir: u64,
        from: &filename3<'_>,
        to_dir: u64,
        to: &filename3<'_>,
    ) -> Result<(), nfsstat3> {
        self.check_dir(from_dir)?;
        self.check_dir(to_dir)?;
        let (from, to) = (file_name(from)?, file_name(to)?);
        // Each announced file has its own size: a rename would dodge it.
        if self.files.is_some() {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        let (from_path, to_path) = (self.root.join(from), self.root.join(to));
        let meta = std::fs::symlink_metadata(&from_path).map_err(|e| io_status(&e))?;
        if !meta.is_file() {
            return Err(nfsstat3::NFS3ERR_NOENT);
        }
        match std::fs::symlink_metadata(&to_path) {
            Ok(target) if !target.is_file() => return Err(nfsstat3::NFS3ERR_EXIST),
            _ => {}
        }
        if from == to {
            return Ok(());
        }
        std::fs::rename(&from_path, &to_path).map_err(|e| io_status(&e))?;
        let mut state = self.lock();
        state.forget(to);
        if let Some(id) = state.by_name.remove(from) {
            if let Some(entry) = state.by_id.get_mut(&id) {
                entry.name = to.to_os_string();
            }
            state.by_name.insert(to.to_os_string(), id);
        }
        state.dir_dirty = true;
        Ok(())
    }

    fn list(&self, dir: u64, cookie: u64) -> Result<Vec<DirEntryPlus<FileHandleU64>>, nfsstat3> {
        self.check_dir(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(|e| io_status(&e))? {
            let entry = entry.map_err(|e| io_status(&e))?;
            match entry.metadata() {
                Ok(meta) if meta.is_file() && self.visible(&entry.file_name()) => {
                    found.push((entry.file_name(), meta))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_status(&e)),
            }
        }
        let mut entries: Vec<_> = {
            let mut state = self.lock();
            found
                .into_iter()
                .map(|(name, meta)| {
                    let id = state.register(&name, (meta.dev(), meta.ino()), None);
                    (id, name, meta)
                })
                .filter(|(id, _, _)| *id > cookie)
                .collect()
        };
        // Ids only grow: sorting by id lets the cookie (the last id sent)
        // resume a listing even after files came and went.
        entries.sort_by_key(|(id, _, _)| *id);
        Ok(entries
            .into_iter()
            .map(|(id, name, meta)| DirEntryPlus {
                fileid: id,
                name: filename3::from(name.into_vec()),
                cookie: id,
                name_attributes: Some(self.attr(id, &meta)),
                name_handle: Some(FileHandleU64::new(id)),
            })
            .collect())
    }
}

/// Starts (does not wait for) writeback of a range just written. Advisory:
/// a file system without it, or an error, leaves the data to COMMIT.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on an open fd; it reads no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Runs a file operation on the blocking pool, off the thread that serves
/// the network.
async fn blocking<T, F>(inner: &Arc<FsInner>, op: F) -> Result<T, nfsstat3>
where
    T: Send + 'static,
    F: FnOnce(&FsInner) -> Result<T, nfsstat3> + Send + 'static,
{
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || op(&inner))
        .await
        .unwrap_or(Err(nfsstat3::NFS3ERR_SERVERFAULT))
}

struct ListIter(std::vec::IntoIter<DirEntryPlus<FileHandleU64>>);

impl ReadDirPlusIterator<FileHandleU64> for ListIter {
    async fn next(&mut self) -> NextResult<DirEntryPlus<FileHandleU64>> {
        match self.0.next() {
            Some(entry) => NextResult::Ok(entry),
            None => NextResult::Eof,
        }
    }
}

impl NfsReadFileSystem for DirFs {
    type Handle = FileHandleU64;

    fn root_dir(&self) -> FileHandleU64 {
        FileHandleU64::new(ROOT_ID)
    }

    /// MOUNT: only the export itself, never a path below it. (The crate
    /// strips the export prefix without checking for a separator, so
    /// "/exportfile" would otherwise mount "file".)
    async fn lookup_by_path(&self, path: &str) -> Result<FileHandleU64, nfsstat3> {
        if path.is_empty() {
            Ok(self.root_dir())
        } else {
            Err(nfsstat3::NFS3ERR_NOENT)
        }
    }

    async fn lookup(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
    ) -> Result<FileHandleU64, nfsstat3> {
        // One stat of a path: cheap enough to run inline.
        self.inner
            .lookup(dirid.as_u64(), filename)
            .map(FileHandleU64::new)
    }

    async fn getattr(&self, id: &FileHandleU64) -> Result<fattr3, nfsstat3> {
        // An fstat of an open file, asked before and after every write.
        self.inner.getattr(id.as_u64())
    }

    async fn read(
        &self,
        id: &FileHandleU64,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let id = id.as_u64();
        blocking(&self.inner, move |fs| fs.read(id, offset, count)).await
    }

    async fn readdirplus(
        &self,
        dirid: &FileHandleU64,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<FileHandleU64>, nfsstat3> {
        let dir = dirid.as_u64();
        let entries = blocking(&self.inner, move |fs| fs.list(dir, cookie)).await?;
        Ok(ListIter(entries.into_iter()))
    }

    async fn readlink(&self, _id: &FileHandleU64) -> Result<nfspath3<'_>, nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn fsinfo(&self, root: &FileHandleU64) -> Result<FSINFO3resok, nfsstat3> {
        let obj_attributes = match self.inner.getattr(root.as_u64()) {
            Ok(attr) => post_op_attr::Some(attr),
            Err(_) => post_op_attr::None,
        };
        Ok(FSINFO3resok {
            obj_attributes,
            rtmax: MAX_IO,
            rtpref: MAX_IO,
            rtmult: 4096,
            wtmax: MAX_IO,
            wtpref: MAX_IO,
            wtmult: 4096,
            dtpref: 64 * 1024,
            maxfilesize: i64::MAX as u64,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        })
    }
}

impl NfsFileSystem for DirFs {
    async fn setattr(&self, id: &FileHandleU64, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let id = id.as_u64();
        blocking(&self.inner, move |fs| fs.setattr(id, &setattr)).await
    }

    async fn write(
        &self,
        id: &FileHandleU64,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        // On this worker, without copying the payload for the blocking
        // pool: for a bulk write the runtime moves the worker's other tasks
        // elsewhere meanwhile. A small write (a mirrored guest write: a
        // pwrite into the page cache and an fstat, microseconds) runs in
        // place, as getattr does: handing the worker over costs more than
        // the write, and the guest waits for it.
        let id = id.as_u64();
        let write = || self.inner.write(id, offset, data, stable);
        if data.len() < EARLY_WRITEBACK_MIN && stable == stable_how::UNSTABLE {
            return write();
        }
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write),
            // block_in_place would panic on any other runtime (the server's
            // own is multi-threaded; this is only a guard).
            _ => write(),
        }
    }

    async fn create(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let dir = dirid.as_u64();
        let name = filename.clone_to_owned();
        blocking(&self.inner, move |fs| {
            let id = fs.create(dir, &name, &attr)?;
            Ok((FileHandleU64::new(id), fs.getattr(id)?))
        })
        .await
    }

    async fn create_exclusive(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
        createverf: createverf3,
    ) -> Result<FileHandleU64, nfsstat3> {
        let dir = dirid.as_u64();
        let name = filename.clone_to_owned();
        blocking(&self.inner, move |fs| {
            fs.create_exclusive(dir, &name, createverf)
                .map(FileHandleU64::new)
        })
        .await
    }

    async fn mkdir(
        &self,
        _dirid: &FileHandleU64,
        _dirname: &filename3<'_>,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn remove(
        &self,
        dirid: &FileHandleU64,
        filename: &filename3<'_>,
    ) -> Result<(), nfsstat3> {
        let dir = dirid.as_u64();
        let name = filename.clone_to_owned();
        blocking(&self.inner, move |fs| fs.remove(dir, &name)).await
    }

    async fn rename<'a>(
        &self,
        from_dirid: &FileHandleU64,
        from_filename: &filename3<'a>,
        to_dirid: &FileHandleU64,
        to_filename: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let (from_dir, to_dir) = (from_dirid.as_u64(), to_dirid.as_u64());
        let (from, to) = (from_filename.clone_to_owned(), to_filename.clone_to_owned());
        blocking(&self.inner, move |fs| {
            fs.rename(from_dir, &from, to_dir, &to)
        })
        .await
    }

    async fn symlink<'a>(
        &self,
        _dirid: &FileHandleU64,
        _linkname: &filename3<'a>,
        _symlink: &nfspath3<'a>,
        _attr: &sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn commit(&self, id: &FileHandleU64, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        // fsync covers any range asked for.
        let id = id.as_u64();
        blocking(&self.inner, move |fs| fs.commit(id)).await
    }
}
