//! Guest memory as it arrives over the migration channel and, with
//! `connections` > 1, over this migration's extra connections ("lanes").
//!
//! The lanes come to a listener of their own, opened for this migration
//! only and offered in `HelloAck`: each must come from the channel's peer
//! address, pass the same TLS checks with the very client certificate of
//! the channel, and open with a `Join` carrying the migration id, its lane
//! number and the one-time secret of the offer. Anything else is refused
//! and logged without touching the migration. The listener closes once
//! every lane has joined, or after [`HANDSHAKE_DEADLINE`], which fails the
//! migration.
//!
//! Lane `i` may only carry the memory stripes [`stripe_owner`] gives it, so
//! no two connections ever write the same page, and ends with a `Seal` of
//! its own frames; the channel's `Seal` is taken only once every lane has
//! sealed, and then every page must have been covered.

use crate::security::ThreadFilter;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;

use super::{tell_source, DestinationError, PageMap, HANDSHAKE_DEADLINE};
use crate::migration::memory::{read_zero_range, receive_pages_checked, zero_range, Prefaulter};
use crate::migration::protocol::{
    expect_small, lane_nonce, parse_json, read_header, read_payload, send_json, stripe_owner,
    within_stripe, FrameHeader, Hello, Join, Kind, LaneOffer, ProtocolError, Seal, StreamDigest,
    MAX_JOIN, PAGE_SIZE,
};
use crate::migration::share::{parse_secret, secret_hex, SECRET_LEN};
use crate::migration::transport::{Channel, Security};
use crate::util::lock;
use crate::vstate::memory::GuestMemoryMmap;

/// Extra connections being vetted at once; more are closed unread.
const MAX_PENDING_JOINS: usize = 8;

/// Where received pages go, and which pages the stream has covered; shared
/// by the channel's loop and the lanes.
pub(super) struct MemorySink {
    pub mem: GuestMemoryMmap,
    connections: u32,
    pub pages: Mutex<PageMap>,
    /// Faults memory in ahead of pass 1 (dropped at its end).
    pub prefault: Mutex<Option<Prefaulter>>,
}

impl MemorySink {
    pub fn new(mem: &GuestMemoryMmap, connections: u32) -> MemorySink {
        MemorySink {
            pages: Mutex::new(PageMap::new(mem)),
            // Without the helper, pages are faulted in as they arrive.
            prefault: Mutex::new(Prefaulter::start(mem).ok()),
            mem: mem.clone(),
            connections,
        }
    }

    /// With several connections, `[gpa, gpa + len)` must lie in one stripe
    /// that belongs to `lane`.
    fn check_stripe(&self, lane: u32, kind: Kind, gpa: u64, len: u64) -> Result<(), ProtocolError> {
        if self.connections <= 1
            || (within_stripe(gpa, len) && stripe_owner(gpa, self.connections) == lane)
        {
            return Ok(());
        }
        Err(ProtocolError::Malformed {
            kind,
            why: format!(
                "range {gpa:#x}+{len:#x} is not within one stripe of memory connection {lane} \
                 (of {})",
                self.connections
            ),
        })
    }

    /// A MemoryPages or ZeroPages frame that arrived on `lane`.
    pub fn frame(
        &self,
        lane: u32,
        reader: &mut impl Read,
        h: &FrameHeader,
    ) -> Result<(), DestinationError> {
        match h.kind {
            Kind::MemoryPages => {
                let allowed = |gpa, len| self.check_stripe(lane, Kind::MemoryPages, gpa, len);
                let (gpa, pages) = receive_pages_checked(reader, h, &self.mem, &allowed)?;
                lock(&self.pages).got_data(gpa, pages * PAGE_SIZE);
                if let Some(p) = lock(&self.prefault).as_mut() {
                    p.received_up_to(gpa + pages * PAGE_SIZE);
                }
            }
            _ => {
                let (gpa, count) = read_zero_range(reader, h, &self.mem)?;
                self.check_stripe(lane, Kind::ZeroPages, gpa, count * PAGE_SIZE)?;
                let runs = lock(&self.pages).got_zero(gpa, count * PAGE_SIZE);
                for (at, len) in runs {
                    zero_range(&self.mem, Kind::ZeroPages, at, len)?;
                }
            }
        }
        Ok(())
    }
}

/// The lanes of one migration: who joined, who sealed, the first failure.
pub(super) struct LaneHub {
    connections: u32,
    state: Mutex<HubState>,
    changed: Condvar,
    /// Set by a lane that broke the protocol, for the channel's loop to
    /// check cheaply before each frame. A lane that merely lost its
    /// connection does not set it: the source then says why on the channel
    /// (or the channel fails too), and the seal wait reports it otherwise.
    failed: AtomicBool,
    stop: AtomicBool,
}

struct HubState {
    /// Per lane 1..connections (index 0 unused).
    joined: Vec<bool>,
    sealed: Vec<bool>,
    failure: Option<String>,
    /// For shutting them all at once.
    sockets: Vec<TcpStream>,
    pending: usize,
}

/// What a joining connection is checked against.
struct JoinCheck {
    security: Security,
    peer_ip: IpAddr,
    peer_cert: Option<CertificateDer<'static>>,
    secret: [u8; SECRET_LEN],
    migration_id: String,
    nonce: String,
}

impl LaneHub {
    /// Opens this migration's listener for `connections - 1` lanes on
    /// the address the channel reached, beside the channel `channel` (whose peer and certificate
    /// every lane must share); returns the offer for `HelloAck`.
    pub fn start(
        channel: &Channel,
        peer: SocketAddr,
        hello: &Hello,
        security: &Security,
        nonce: &str,
        sink: &Arc<MemorySink>,
    ) -> Result<(Arc<LaneHub>, LaneOffer), DestinationError> {
        let (connections, migration_id) = (hello.connections, &hello.migration_id);
        let local = channel
            .local_addr()
            .map_err(DestinationError::ShareSetup)?
            .ip();
        let listener =
            TcpListener::bind(SocketAddr::new(local, 0)).map_err(DestinationError::ShareSetup)?;
        listener
            .set_nonblocking(true)
            .map_err(DestinationError::ShareSetup)?;
        let port = listener
            .local_addr()
            .map_err(DestinationError::ShareSetup)?
            .port();
        let secret =
            crate::util::random_bytes::<SECRET_LEN>().map_err(DestinationError::ShareSetup)?;
        let n = connections as usize;
        let hub = Arc::new(LaneHub {
            connections,
            state: Mutex::new(HubState {
                joined: vec![false; n],
                sealed: vec![false; n],
                failure: None,
                sockets: Vec::new(),
                pending: 0,
            }),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let check = Arc::new(JoinCheck {
            security: security.clone(),
            peer_ip: peer.ip(),
            peer_cert: channel.peer_certificate(),
            secret,
            migration_id: migration_id.to_string(),
            nonce: nonce.to_string(),
        });
        let (h, s) = (hub.clone(), sink.clone());
        let deadline = Instant::now() + HANDSHAKE_DEADLINE;
        std::thread::Builder::new()
            .name("ferry-lanes".into())
            .spawn(move || accept_lanes(listener, h, s, check, deadline))
            .map_err(DestinationError::ShareSetup)?;
        eprintln!(
            "ferry: taking {} extra memory connections at {local}:{port} (only from {})",
            connections - 1,
            peer.ip()
        );
        Ok((
            hub,
            LaneOffer {
                port,
                secret: secret_hex(&secret),
            },
        ))
    }

    fn fail(&self, why: String, broke_protocol: bool) {
        let mut st = lock(&self.state);
        if st.failure.is_none() {
            st.failure = Some(why);
        }
        if broke_protocol {
            self.failed.store(true, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    /// The first lane failure, if a lane broke the protocol.
    pub fn failure(&self) -> Option<DestinationError> {
        if !self.failed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.state)
            .failure
            .clone()
            .map(DestinationError::Stream)
    }

    /// Waits until every lane has sealed its frames (or one failed, or
    /// `timeout` passed).
    pub fn wait_sealed(&self, timeout: Duration) -> Result<(), DestinationError> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            if let Some(f) = &st.failure {
                return Err(DestinationError::Stream(f.clone()));
            }
            if st.sealed.iter().skip(1).all(|&s| s) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<String> = (1..self.connections as usize)
                    .filter(|&i| !st.sealed[i])
                    .map(|i| i.to_string())
                    .collect();
                return Err(DestinationError::Stream(format!(
                    "memory connection(s) {} did not seal their frames within {} s of the \
                     channel's Seal",
                    missing.join(", "),
                    timeout.as_secs()
                )));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Ends every lane and the listener (the migration is over, one way
    /// or the other).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let st = lock(&self.state);
        for s in &st.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Takes lane `index` for a connection that passed every check; false
    /// if it is out of range or joined already.
    fn claim(&self, index: u32, socket: &TcpStream) -> Result<(), String> {
        let mut st = lock(&self.state);
        if index == 0 || index >= self.connections {
            return Err(format!(
                "memory connection {index} does not exist (this migration has {})",
                self.connections
            ));
        }
        if st.joined[index as usize] {
            return Err(format!("memory connection {index} joined already"));
        }
        if self.stop.load(Ordering::SeqCst) {
            return Err("the migration is over".into());
        }
        st.joined[index as usize] = true;
        if let Ok(s) = socket.try_clone() {
            st.sockets.push(s);
        }
        Ok(())
    }

    fn all_joined(&self) -> bool {
        lock(&self.state).joined.iter().skip(1).all(|&j| j)
    }
}

fn accept_lanes(
    listener: TcpListener,
    hub: Arc<LaneHub>,
    sink: Arc<MemorySink>,
    check: Arc<JoinCheck>,
    deadline: Instant,
) {
    // Without its filter it takes no connection: the lanes never join and
    // the migration is refused at its Seal.
    if !crate::security::narrow_thread("memory connections", ThreadFilter::Acceptor) {
        return;
    }
    loop {
        if hub.stop.load(Ordering::SeqCst) || hub.all_joined() {
            return;
        }
        if Instant::now() >= deadline {
            let joined = lock(&hub.state).joined.iter().filter(|&&j| j).count();
            hub.fail(
                format!(
                    "{joined} of the {} extra memory connections joined within {} s",
                    hub.connections - 1,
                    HANDSHAKE_DEADLINE.as_secs()
                ),
                true,
            );
            return;
        }
        let (tcp, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => {
                eprintln!("ferry: accepting a memory connection failed: {e}");
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if from.ip() != check.peer_ip {
            eprintln!(
                "ferry: refused a memory connection from {from}: this migration's peer is {}",
                check.peer_ip
            );
            continue;
        }
        {
            let mut st = lock(&hub.state);
            if st.pending >= MAX_PENDING_JOINS {
                eprintln!(
                    "ferry: refused a memory connection from {from}: {MAX_PENDING_JOINS} already \
                     pending"
                );
                continue;
            }
            st.pending += 1;
        }
        let (h, s, c) = (hub.clone(), sink.clone(), check.clone());
        let spawned = std::thread::Builder::new()
            .name("ferry-lane".into())
            .spawn(move || {
                if !crate::security::narrow_thread("memory connection", ThreadFilter::LaneIn) {
                    lock(&h.state).pending -= 1;
                    return;
                }
                let vetted = vet_lane(tcp, &h, &c);
                lock(&h.state).pending -= 1;
                match vetted {
                    Ok((channel, index)) => run_lane(&h, &s, channel, index, &c.nonce),
                    Err(why) => {
                        eprintln!("ferry: refused a memory connection from {from}: {why}")
                    }
                }
            });
        if spawned.is_err() {
            lock(&hub.state).pending -= 1;
            eprintln!("ferry: refused a memory connection from {from}: cannot start a thread");
        }
    }
}

/// TLS with the channel's own client certificate, then a `Join` with this
/// migration's id and secret and a free lane number, all within
/// [`HANDSHAKE_DEADLINE`]. The peer is told why it is refused.
fn vet_lane(tcp: TcpStream, hub: &LaneHub, c: &JoinCheck) -> Result<(Channel, u32), String> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).ok();
    let mut ch = match &c.security {
        Security::Tls(id) => {
            let ch = Channel::accept(tcp, id, deadline).map_err(|e| {
                format!(
                    "TLS handshake failed: {}",
                    crate::migration::transport::explain_handshake_error(&e)
                )
            })?;
            if ch.peer_certificate() != c.peer_cert {
                let why = "its client certificate is not the migration channel's".to_string();
                refuse(ch, &why);
                return Err(why);
            }
            ch
        }
        Security::Insecure => {
            let mut ch = Channel::plain(tcp);
            ch.set_deadline(deadline);
            ch
        }
    };
    let join = expect_small(&mut ch, Kind::Join, MAX_JOIN)
        .and_then(|p| parse_json::<Join>(Kind::Join, &p))
        .map_err(|e| e.to_string());
    let join = match join {
        Ok(j) => j,
        Err(why) => {
            refuse(ch, &why);
            return Err(why);
        }
    };
    let secret_ok = parse_secret(&join.secret)
        .is_some_and(|got| got.iter().zip(&c.secret).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0);
    let verdict = if !secret_ok {
        Err("wrong secret for this migration's memory connections".to_string())
    } else if join.migration_id != c.migration_id {
        Err(format!(
            "it joins migration {:?}, this one is {}",
            join.migration_id, c.migration_id
        ))
    } else {
        hub.claim(join.index, ch.tcp())
    };
    if let Err(why) = verdict {
        refuse(ch, &why);
        return Err(why);
    }
    let joined = send_json(&mut ch, Kind::Joined, &serde_json::json!({}))
        .and_then(|_| ch.flush().map_err(ProtocolError::from));
    ch.clear_deadline(None);
    if let Err(e) = joined {
        // Lane taken, then lost: the migration cannot complete.
        hub.fail(format!("memory connection {}: {e}", join.index), false);
        return Err(e.to_string());
    }
    Ok((ch, join.index))
}

fn refuse(mut ch: Channel, why: &str) {
    tell_source(&mut ch, &why);
    let _ = ch.flush();
    let _ = ch.shutdown(std::net::Shutdown::Both);
}

/// Receives lane `index`'s frames until its `Seal`; a failure fails the
/// migration (the channel's loop notices) and closes the lane.
fn run_lane(hub: &LaneHub, sink: &MemorySink, ch: Channel, index: u32, nonce: &str) {
    let result = (|| {
        let mut reader = BufReader::with_capacity(
            super::RECEIVE_BUFFER,
            ch.try_clone().map_err(ProtocolError::from)?,
        );
        let mut digest = StreamDigest::new(&lane_nonce(nonce, index));
        loop {
            if hub.stop.load(Ordering::SeqCst) {
                return Err(DestinationError::Stream("stopped".into()));
            }
            let h = read_header(&mut reader)?;
            match h.kind {
                Kind::MemoryPages | Kind::ZeroPages => {
                    digest.add(&h);
                    sink.frame(index, &mut reader, &h)?;
                }
                Kind::Seal => {
                    let got: Seal = parse_json(Kind::Seal, &read_payload(&mut reader, &h)?)?;
                    return super::check_seal(&got, &digest, "moved from another connection");
                }
                other => {
                    return Err(ProtocolError::Unexpected {
                        expected: "memory or a Seal on a memory connection",
                        got: other,
                    }
                    .into())
                }
            }
        }
    })();
    match result {
        Ok(()) => {
            let mut st = lock(&hub.state);
            st.sealed[index as usize] = true;
            hub.changed.notify_all();
        }
        Err(e) => {
            if !hub.stop.load(Ordering::SeqCst) {
                let lost = matches!(e, DestinationError::Protocol(ProtocolError::Io(_)));
                hub.fail(format!("memory connection {index}: {e}"), !lost);
            }
            let _ = ch.shutdown(std::net::Shutdown::Both);
        }
    }
}
