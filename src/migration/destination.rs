//! The receiving side, as one state machine (after Cloud Hypervisor's
//! `ReceiveMigrationState`): a `Receiver` listens and vets what connects; the
//! `IncomingMigration` it accepts receives memory straight into a fresh guest
//! memory, then the state, and owns the hand-over: the VMM builds the guest
//! when asked, and starts it only once the source has said go.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

use super::memory::{receive_pages, receive_zero};
use super::protocol::{
    expect, parse_json, read_header, read_payload, send_json, Hello, HelloAck, Kind, PassEnd,
    ProtocolError, Reason, ShareOffer, PROTOCOL_VERSION,
};
use super::share::{NfsShareServer, ShareGuard};
use super::transport::{cert_names_any, explain_handshake_error, Channel, Security};
use crate::snapshot::VmState;
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::vm::Vm;

/// How long the destination waits for the next frame before giving up (the
/// source sends heartbeats while it has nothing else to send).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_MEMORY: u64 = 16 << 20;
/// Everything before a migration is accepted — TLS handshake and Hello —
/// must be done within this, however the peer paces its bytes.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Connections being vetted at once; more are closed unread, so that a
/// flood costs a thread each for at most this many.
const MAX_PENDING: usize = 32;

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
}

/// `DIR/<migration id>/`: deleted on drop unless `keep` was called, so a
/// failed migration leaves nothing behind.
pub struct ShareDir {
    pub path: PathBuf,
    keep: bool,
}

impl ShareDir {
    /// The marker, next to the directory (not in the share), that says a
    /// copy is incomplete: a later `ferry receive --dir` removes what a
    /// killed one left behind.
    fn marker(base: &Path, id: &str) -> PathBuf {
        base.join(format!(".{id}.partial"))
    }

    fn create(base: &Path, id: &str) -> Result<ShareDir, DestinationError> {
        let path = base.join(id);
        let err = |source| DestinationError::ShareDir {
            path: path.clone(),
            source,
        };
        std::fs::write(Self::marker(base, id), b"").map_err(err)?;
        std::fs::create_dir(&path).map_err(err)?;
        Ok(ShareDir { path, keep: false })
    }

    /// The guest runs on these files now.
    pub fn keep(&mut self) {
        self.keep = true;
        if let (Some(base), Some(id)) = (self.path.parent(), self.path.file_name()) {
            let _ = std::fs::remove_file(Self::marker(base, &id.to_string_lossy()));
        }
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

/// Removes incomplete copies that a killed `ferry receive` left in `base`.
pub fn remove_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        {
            if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) {
                eprintln!(
                    "ferry: removing the incomplete copy {} left by an earlier migration",
                    base.join(id).display()
                );
                let _ = std::fs::remove_dir_all(base.join(id));
                let _ = std::fs::remove_file(e.path());
            }
        }
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
struct Vetting {
    dir: Option<PathBuf>,
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
                security,
                allow_clients,
            }),
        })
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
            &self.vetting.security,
        )
    }
}

fn accept_loop(
    listener: TcpListener,
    vetting: Arc<Vetting>,
    won: Arc<AtomicBool>,
    tx: mpsc::Sender<(Channel, SocketAddr, Hello)>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
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
        pending.fetch_add(1, Ordering::SeqCst);
        let (vetting, won, tx, pending2) =
            (vetting.clone(), won.clone(), tx.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-handshake".into())
            .spawn(move || {
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
                pending2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            pending.fetch_sub(1, Ordering::SeqCst);
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
                linger_close(&plain);
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
                    linger_close(stream.tcp());
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
    match handshake(&mut stream, v.dir.as_deref()) {
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

/// Closes after a refusal that the peer may still be sending into: closing
/// with its bytes unread would reset the connection, and the reset could
/// overtake our reason on its way to the peer.
fn linger_close(tcp: &TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 16 << 10];
    let mut left = 1usize << 20;
    while left > 0 {
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
}

impl IncomingMigration {
    /// Sets up what the handshake asked for and acknowledges it.
    fn establish(
        mut stream: Channel,
        peer: SocketAddr,
        hello: Hello,
        dir: Option<&Path>,
        security: &Security,
    ) -> Result<IncomingMigration, DestinationError> {
        let setup = (|| {
            let share = open_share(&stream, peer, &hello, dir, security)?;
            let (memfd, mem) = create_guest_memory(hello.memory_size)?;
            let vm = Vm::new(&mem)?;
            Ok::<_, DestinationError>((vm, memfd, mem, share))
        })();
        let (vm, memfd, mem, share) = match setup {
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
            },
        )?;
        stream.flush().map_err(ProtocolError::from)?;
        Ok(IncomingMigration {
            state: ReceiveState::Established,
            stream,
            peer,
            hello,
            guest: Some((vm, memfd)),
            mem,
            share_dir,
            share_server,
            vm_state: None,
        })
    }

    pub fn state(&self) -> ReceiveState {
        self.state
    }

    /// Ends the migration: the source learns why, nothing received is kept.
    fn abort(&mut self, e: DestinationError) -> DestinationError {
        if self.state != ReceiveState::Aborted {
            // A source that sent the reason itself needs no echo.
            if !matches!(e, DestinationError::Protocol(ProtocolError::Peer(_))) {
                tell_source(&mut self.stream, &e);
            }
            // Closing at once lets the source see the end even when our
            // reason could not be written.
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
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
        let mut reader = BufReader::with_capacity(1 << 20, stream);
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
        let h = read_header(reader)?;
        match frame_step(self.state, h.kind)? {
            Step::PeerError => {
                let r: Reason = parse_json(Kind::Error, &read_payload(reader, &h)?)?;
                return Err(ProtocolError::Peer(r.reason).into());
            }
            Step::Heartbeat => {
                read_payload(reader, &h)?;
            }
            Step::Pages => {
                receive_pages(reader, &h, &self.mem)?;
            }
            Step::ZeroPages => {
                receive_zero(reader, &h, &self.mem)?;
            }
            Step::PassEnd => {
                let _: PassEnd = parse_json(Kind::PassEnd, &read_payload(reader, &h)?)?;
            }
            Step::State => {
                let payload = read_payload(reader, &h)?;
                let mut state: VmState = parse_json(Kind::State, &payload)?;
                check_state(&self.hello, &state)?;
                if let Some(d) = &self.share_dir {
                    local_paths(&mut state.config, &d.path);
                }
                self.vm_state = Some(state);
            }
        }
        self.state = next_state(self.state, h.kind);
        Ok(())
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

/// Reads and vets the source's Hello.
fn handshake(stream: &mut impl Read, dir: Option<&Path>) -> Result<Hello, DestinationError> {
    let hello: Hello = parse_json(Kind::Hello, &expect(stream, Kind::Hello)?)?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(DestinationError::Refused(format!(
            "migration protocol version {}, this ferry speaks version {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    if hello.migration_id.is_empty()
        || hello.migration_id.len() > 64
        || !hello.migration_id.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(DestinationError::Refused("invalid migration id".into()));
    }
    if let Some(offer) = &hello.storage {
        if dir.is_none() {
            return Err(DestinationError::Refused(
                "the source wants to copy the VM's files, but this ferry receive has no --dir to put them in"
                    .into(),
            ));
        }
        let plain = |n: &String| {
            !n.is_empty()
                && n.len() <= 255
                && n != "."
                && n != ".."
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if offer.files.len() > 64 || !offer.files.iter().all(plain) {
            return Err(DestinationError::Refused(
                "invalid file names for the share".into(),
            ));
        }
    }
    if hello.vcpus == 0 || hello.vcpus > crate::config::MAX_VCPUS {
        return Err(DestinationError::Refused(format!(
            "{} vCPUs is not a VM this ferry can run",
            hello.vcpus
        )));
    }
    let host_mib = crate::util::host_memory_mib().unwrap_or(0);
    if hello.memory_size < MIN_MEMORY
        || !hello.memory_size.is_multiple_of(1 << 20)
        || hello.memory_size >> 20 > host_mib
    {
        return Err(DestinationError::Refused(format!(
            "guest memory of {} bytes does not fit this host ({host_mib} MiB)",
            hello.memory_size
        )));
    }
    check_cpuid(&hello.cpuid)?;
    Ok(hello)
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
    let kvm = kvm_ioctls::Kvm::new().map_err(DestinationError::Cpuid)?;
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
    let server = NfsShareServer::start(&share_dir.path, local, &export, Some(peer.ip()), guard)?;
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

/// The state must describe the VM the handshake announced.
fn check_state(hello: &Hello, state: &VmState) -> Result<(), DestinationError> {
    let bad = |why: String| {
        DestinationError::Protocol(ProtocolError::Malformed {
            kind: Kind::State,
            why,
        })
    };
    if state.memory_size != hello.memory_size || state.config.memory_mib << 20 != hello.memory_size
    {
        return Err(bad("memory size differs from the handshake".into()));
    }
    if state.vcpus.len() != hello.vcpus as usize || state.config.vcpus != hello.vcpus {
        return Err(bad("vCPU count differs from the handshake".into()));
    }
    if state.drives.len() != state.config.drives.len() {
        return Err(bad("drive states do not match the config".into()));
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
}
