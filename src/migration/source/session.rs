//! One migration, from connect to hand-over, as a sequence of phases over
//! one [`MigrationContext`]: handshake, storage set-up, pre-copy,
//! stop-and-copy, hand-over; and, on any failure, putting the guest back as
//! it was and telling the destination why.

use std::cell::Cell;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::converge::{decide, Decision, GiveUp, PassSample, Policy, Tracker};
use super::lanes::{LaneError, LaneJob, LaneSetup, Lanes};
use super::throttle::Throttle;
use super::{ms, share_plan, SharePlan, SourceContext, SourceError, CONFIG_NAME};
use crate::devices::virtio::block::WriteMirror;
use crate::migration::memory::{
    collect_dirty, count_pages, dirty_ranges, merge_into, populated_ranges, split_by_stripe,
    start_dirty_tracking, stop_dirty_tracking, unpopulated_ranges, DirtyBitmaps, PageSender,
};
use crate::migration::protocol::{
    expect, parse_json, send_json, DigestWriter, Hello, HelloAck, Kind, PassEnd, Paused,
    ProtocolError, Reason, ShareOffer, StorageOffer, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::migration::share::{MountedShare, NfsShare, Share, ShareAccess};
use crate::migration::storage::{Pacer, StorageCopy, StorageError};
use crate::migration::transport::{self, Channel, Security};
use crate::migration::{MigrationStatus, Phase, SendRequest, ShareSpec, StorageMode};
use crate::util::lock;

/// Guest-physical (start, length) ranges.
type Ranges = Vec<(u64, u64)>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The destination gives a handshake and Hello this long in all; ours must
/// be done well within that.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The last word to a destination that may have stopped reading.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Dirty-log syncs at least this far apart: a sync every millisecond costs
/// CPU, and what it finds is too little to tell a rate by.
const MIN_PASS: Duration = Duration::from_millis(20);

/// Connects and runs the whole migration; on any error before the
/// destination was told to run, the guest is left running here and the
/// destination learns why.
pub(super) fn run(
    src: &SourceContext,
    req: &SendRequest,
    status: &Mutex<MigrationStatus>,
    cancel: &Arc<AtomicBool>,
    slot: &Mutex<Option<TcpStream>>,
    started: Instant,
) -> Result<Duration, SourceError> {
    let security = req.security()?;
    let connections = req.connections();
    let addrs = resolve(&req.destination)?;
    // Issue 10: the thread narrows itself once the name is resolved (glibc's
    // resolver reads /etc/hosts, asks nscd over a Unix socket and DNS over
    // UDP, which the migration list does not allow) and before it connects;
    // its lanes, copy and throttle inherit the list.
    crate::security::seccomp::narrow_when_confined(crate::security::ThreadFilter::Migration)
        .map_err(SourceError::Confine)?;
    let (stream, addr) = connect(&req.destination, &addrs, &security)?;
    *lock(slot) = stream.tcp().try_clone().ok();
    let reader = stream.try_clone().map_err(ProtocolError::from)?;
    let pacer = Arc::new(Pacer::new(req.bandwidth_bytes_s()));
    let mut mc = MigrationContext {
        src,
        req,
        status,
        cancel,
        started,
        dest_ip: addr.ip(),
        security,
        w: DigestWriter::new(BufWriter::with_capacity(256 << 10, stream)),
        reader,
        pacer,
        connections,
        lanes: Lanes::none(),
        storage: None,
        plan: None,
        throttle: None,
        wire_total: 0,
        tracking: false,
        paused_here: false,
        committed: false,
        images_released: false,
        stream_intact: true,
    };
    let result = mc.drive();
    mc.finish(result.as_ref().err());
    result
}

/// The addresses `dest` (HOST:PORT) names, in the resolver's order.
fn resolve(dest: &str) -> Result<Vec<SocketAddr>, SourceError> {
    let addrs: Vec<SocketAddr> = dest
        .to_socket_addrs()
        .map_err(|_| SourceError::Resolve(dest.to_string()))?
        .take(MAX_ADDRESSES)
        .collect();
    if addrs.is_empty() {
        return Err(SourceError::Resolve(dest.to_string()));
    }
    Ok(addrs)
}

/// At most this many of a name's addresses are tried, each within
/// `CONNECT_TIMEOUT`.
const MAX_ADDRESSES: usize = 4;

/// Connects to the first of `addrs` that answers (a name may have an IPv6
/// address first that this host cannot reach), then sets up the channel.
fn connect(
    dest: &str,
    addrs: &[SocketAddr],
    security: &Security,
) -> Result<(Channel, SocketAddr), SourceError> {
    // Checked before connecting: a name no certificate can carry is the
    // request's fault, not the destination's.
    let name = match security {
        Security::Tls(_) => Some(transport::server_name(dest)?),
        Security::Insecure => None,
    };
    let mut failed = None;
    let mut connected = None;
    for addr in addrs {
        match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                connected = Some((s, *addr));
                break;
            }
            Err(e) => failed = Some(e),
        }
    }
    let Some((stream, addr)) = connected else {
        return Err(SourceError::Connect {
            dest: dest.to_string(),
            source: failed.unwrap_or_else(|| std::io::Error::other("no address")),
        });
    };
    stream.set_nodelay(true).ok();
    let channel = match (security, name) {
        (Security::Tls(id), Some(name)) => {
            Channel::connect(stream, id, name, Instant::now() + TLS_HANDSHAKE_TIMEOUT).map_err(
                |e| SourceError::TlsHandshake {
                    dest: dest.to_string(),
                    why: transport::explain_handshake_error(&e),
                },
            )?
        }
        _ => Channel::plain(stream),
    };
    // After the handshake, which bounds each of its reads and writes by its
    // own deadline.
    channel.set_read_timeout(Some(REPLY_TIMEOUT)).ok();
    // A link that stops taking data is a failure, not a wait.
    channel.set_write_timeout(Some(WRITE_TIMEOUT)).ok();
    Ok((channel, addr))
}

/// Everything one migration works with, and where it stands.
struct MigrationContext<'a> {
    src: &'a SourceContext,
    req: &'a SendRequest,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a Arc<AtomicBool>,
    started: Instant,
    dest_ip: IpAddr,
    security: Security,
    /// Every frame after `HelloAck` goes into the digest that `Seal` sends.
    w: DigestWriter<BufWriter<Channel>>,
    reader: Channel,
    pacer: Arc<Pacer>,
    /// Memory goes over the channel and `connections - 1` lanes.
    connections: u32,
    lanes: Lanes,
    storage: Option<StorageCopy>,
    plan: Option<SharePlan>,
    throttle: Option<Throttle>,
    /// Bytes put on the wire so far.
    wire_total: u64,
    /// Dirty logging is on.
    tracking: bool,
    /// The migration paused the guest (a user's pause is left alone).
    paused_here: bool,
    /// `Go` was sent: the guest may run at the destination, never here.
    committed: bool,
    /// The image locks were given up for the destination (issue 10).
    images_released: bool,
    /// No write failed halfway through a frame: the destination can still
    /// read an `Error` frame.
    stream_intact: bool,
}

impl MigrationContext<'_> {
    fn drive(&mut self) -> Result<Duration, SourceError> {
        let ack = self.handshake()?;
        self.open_lanes(&ack)?;
        self.start_storage(&ack)?;
        start_dirty_tracking(&self.src.vm, &self.src.mem)?;
        self.tracking = true;
        self.throttle =
            Some(Throttle::start(self.src.control.clone()).map_err(SourceError::Throttle)?);
        let pending = self.precopy()?;
        let paused_at = self.stop_and_copy(&pending)?;
        self.hand_over(paused_at)
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = lock(self.status);
        f(&mut s);
        s.elapsed_ms = ms(self.started.elapsed());
    }

    fn check_cancel(&self) -> Result<(), SourceError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(SourceError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A failed write or flush: the stream may end mid-frame.
    fn write_failed(&mut self, e: ProtocolError) -> SourceError {
        self.stream_intact = false;
        self.read_failed(e)
    }

    /// A failed read; cancel shuts the reading side, so that shows here.
    fn read_failed(&self, e: ProtocolError) -> SourceError {
        if self.cancel.load(Ordering::SeqCst) {
            SourceError::Cancelled
        } else {
            SourceError::Protocol(e)
        }
    }

    /// Sends one JSON frame and flushes.
    fn send<T: serde::Serialize>(&mut self, kind: Kind, value: &T) -> Result<(), SourceError> {
        match send_json(&mut self.w, kind, value)
            .and_then(|n| self.w.flush().map(|()| n).map_err(ProtocolError::from))
        {
            Ok(n) => {
                self.wire_total += n;
                Ok(())
            }
            Err(e) => Err(self.write_failed(e)),
        }
    }

    fn handshake(&mut self) -> Result<HelloAck, SourceError> {
        let (id, memory_size) = {
            let s = lock(self.status);
            (s.migration_id.clone(), s.memory_bytes)
        };
        let mode = self.req.storage_mode();
        self.plan = (mode == StorageMode::Copy)
            .then(|| share_plan(&self.src.machine.config(), self.src.machine.source_files()));
        self.update(|s| s.storage = Some(mode));
        let storage = match &self.plan {
            Some(p) => Some(storage_offer(p, self.req.share.is_some())?),
            None => None,
        };
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            migration_id: id.clone(),
            vcpus: self.src.vcpus,
            memory_size,
            cpuid: self.src.machine.guest_cpuid(),
            storage,
            net_ids: self
                .src
                .machine
                .config()
                .net
                .iter()
                .map(|n| n.id.clone())
                .collect(),
            connections: self.connections,
        };
        self.send(Kind::Hello, &hello)?;
        let ack: HelloAck = expect(&mut self.reader, Kind::HelloAck)
            .and_then(|p| parse_json(Kind::HelloAck, &p))
            .map_err(|e| match e {
                // TLS 1.3 clients finish their handshake before the server
                // has checked their certificate: its verdict arrives here.
                ProtocolError::Io(io) if transport::is_tls_error(&io) => {
                    SourceError::TlsHandshake {
                        dest: self.req.destination.clone(),
                        why: transport::explain_handshake_error(&io),
                    }
                }
                e => self.read_failed(e),
            })?;
        if ack.protocol != PROTOCOL_VERSION
            || ack.migration_id != id
            || ack.vcpus != self.src.vcpus
            || ack.memory_size != memory_size
        {
            return Err(SourceError::Mismatch(format!(
                "it accepted protocol {} / id {} / {} vCPUs / {} bytes, we offered protocol {} / id {} / {} vCPUs / {} bytes",
                ack.protocol, ack.migration_id, ack.vcpus, ack.memory_size,
                PROTOCOL_VERSION, id, self.src.vcpus, memory_size
            )));
        }
        if ack.nonce.is_empty()
            || ack.nonce.len() > 64
            || !ack.nonce.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(SourceError::Mismatch(format!(
                "its stream nonce {:?} is not 1 to 64 hex digits",
                ack.nonce
            )));
        }
        if self.connections > 1 && ack.lanes.is_none() {
            return Err(SourceError::Mismatch(format!(
                "we asked for {} connections and it offered no place for the extra ones",
                self.connections
            )));
        }
        self.w.start_digest(&ack.nonce);
        Ok(ack)
    }

    /// The extra memory connections, each authenticated like the channel
    /// and joined with the destination's one-time secret.
    fn open_lanes(&mut self, ack: &HelloAck) -> Result<(), SourceError> {
        let Some(offer) = ack.lanes.as_ref().filter(|_| self.connections > 1) else {
            return Ok(());
        };
        let setup = LaneSetup {
            security: &self.security,
            destination: &self.req.destination,
            addr: SocketAddr::new(self.dest_ip, 0),
            migration_id: &ack.migration_id,
            nonce: &ack.nonce,
            connections: self.connections,
            connect_timeout: CONNECT_TIMEOUT,
            handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            reply_timeout: REPLY_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
        };
        self.lanes = Lanes::open(&setup, offer, &self.src.mem, &self.pacer, self.cancel)
            .map_err(|e| self.lane_failed(e))?;
        Ok(())
    }

    /// A lane failed; a cancel shows there too.
    fn lane_failed(&self, e: LaneError) -> SourceError {
        if self.cancel.load(Ordering::SeqCst) {
            SourceError::Cancelled
        } else {
            SourceError::Lane(e)
        }
    }

    /// Hands each lane its stripes of `ranges` and `holes` (lane 0's come
    /// back, for the channel to send).
    fn deal(
        &self,
        ranges: &[(u64, u64)],
        holes: &[(u64, u64)],
        paused: bool,
        seal: bool,
    ) -> Result<(Ranges, Ranges), SourceError> {
        let n = self.lanes.count() as u32 + 1;
        if n == 1 {
            return Ok((ranges.to_vec(), holes.to_vec()));
        }
        let mut r = split_by_stripe(ranges, n).into_iter();
        let mut h = split_by_stripe(holes, n).into_iter();
        let own = (r.next().unwrap_or_default(), h.next().unwrap_or_default());
        let jobs = r
            .zip(h)
            .map(|(ranges, holes)| LaneJob {
                ranges,
                holes,
                paused,
                seal,
            })
            .collect();
        self.lanes.send(jobs).map_err(|e| self.lane_failed(e))?;
        Ok(own)
    }

    /// Storage copy: reach the share, create the files, mirror, copy.
    fn start_storage(&mut self, ack: &HelloAck) -> Result<(), SourceError> {
        let Some(plan) = &self.plan else {
            return Ok(());
        };
        let offer = ack.share.as_ref().ok_or(StorageError::NoOffer)?;
        let share = self.open_share(offer, self.req.share.as_ref())?;
        let config = serde_json::to_vec_pretty(&plan.config)?;
        let (mut copy, mirrors) = StorageCopy::prepare(
            share,
            plan.items.clone(),
            vec![(CONFIG_NAME.to_string(), config)],
        )?;
        self.update(|s| s.storage_total_bytes = copy.progress.total_bytes);
        self.src.machine.set_mirrors(Some(
            mirrors
                .into_iter()
                .map(|m| m as Arc<dyn WriteMirror>)
                .collect(),
        ));
        // Held here from now on, so that a failure detaches the mirrors.
        let started = copy.start_copy(self.pacer.clone());
        self.storage = Some(copy);
        started.map_err(StorageError::Start)?;
        Ok(())
    }

    /// The share the destination offered, or the directory mounted here.
    fn open_share(
        &self,
        offer: &ShareOffer,
        mounted: Option<&ShareSpec>,
    ) -> Result<Arc<dyn Share>, StorageError> {
        if offer.dir_name.is_empty()
            || offer.dir_name.contains('/')
            || offer.dir_name.contains("..")
        {
            return Err(StorageError::BadShareDir(offer.dir_name.clone()));
        }
        let share: Arc<dyn Share> = match (mounted, offer.nfs_port, &offer.export) {
            (Some(spec), _, _) => {
                let dir = spec.path.join(&offer.dir_name);
                std::fs::create_dir_all(&dir).map_err(|source| StorageError::Local {
                    path: dir.clone(),
                    source,
                })?;
                Arc::new(MountedShare::new(&dir)?)
            }
            (None, Some(port), Some(export)) => {
                let access = ShareAccess::for_offer(offer, &self.security, &self.req.destination)?;
                Arc::new(
                    NfsShare::connect(SocketAddr::new(self.dest_ip, port), export, access)
                        .map_err(StorageError::Unreachable)?,
                )
            }
            _ => return Err(StorageError::NoShare),
        };
        self.update(|s| s.share = Some(share.describe()));
        Ok(share)
    }

    fn update_storage(&self) -> Result<(), SourceError> {
        if let Some(copy) = &self.storage {
            let p = &copy.progress;
            let (copied, writes) = (
                p.copied_bytes.load(Ordering::Relaxed),
                p.mirrored_writes.load(Ordering::Relaxed),
            );
            self.update(|s| {
                s.storage_copied_bytes = copied;
                s.mirrored_writes = writes;
            });
            if let Some(e) = p.failure() {
                return Err(StorageError::Reported(e).into());
            }
        }
        Ok(())
    }

    /// Copies memory while the guest runs until [`decide`] says stop (or
    /// give up); returns what the last sync found dirty and no pass sent.
    fn precopy(&mut self) -> Result<DirtyBitmaps, SourceError> {
        let policy = Policy::new(self.req.max_downtime_ms);
        let mut tracker = Tracker::new(policy, self.req.bandwidth_bytes_s().unwrap_or(1e9));
        // Pass 1 copies every populated page; later passes what got dirty.
        let mut ranges = populated_ranges(&self.src.mem, self.src.memfd.as_deref())
            .map_err(SourceError::Memory)?;
        // Declared zero in pass 1, so that every page was covered once.
        let mut holes = unpopulated_ranges(&self.src.mem, &ranges);
        let mut last_sync = Instant::now();
        let mut pass = 0u32;
        loop {
            pass += 1;
            self.update(|s| {
                s.phase = Phase::Precopy;
                s.pass = pass;
                // What this pass covers, for progress.
                s.pass_bytes = ranges.iter().map(|r| r.1).sum();
                s.pass_done_bytes = 0;
            });
            let (wire_bytes, send_secs) =
                self.send_pass(pass, &ranges, &std::mem::take(&mut holes))?;
            self.wait_for_storage()?;
            if let Some(rest) = MIN_PASS.checked_sub(last_sync.elapsed()) {
                std::thread::sleep(rest);
            }
            let dirty = collect_dirty(&self.src.vm, &self.src.mem)?;
            let interval_secs = last_sync.elapsed().as_secs_f64();
            last_sync = Instant::now();
            let m = tracker.record(PassSample {
                pass,
                interval_secs,
                send_secs,
                wire_bytes,
                dirty_bytes: count_pages(&dirty) * PAGE_SIZE,
            });
            self.update(|s| {
                s.remaining_bytes = m.remaining_bytes;
                s.bandwidth_mib_s = m.bandwidth / (1 << 20) as f64;
                s.dirty_rate_mib_s = m.dirty_rate / (1 << 20) as f64;
                s.expected_downtime_ms = m.expected_downtime_ms;
            });
            self.check_cancel()?;
            match decide(&m, &policy) {
                Decision::StopAndCopy => return Ok(dirty),
                Decision::GiveUp { reason } => {
                    return Err(SourceError::NoConvergence {
                        passes: pass,
                        remaining_mib: m.remaining_bytes as f64 / (1 << 20) as f64,
                        expected_ms: m.expected_downtime_ms,
                        max_ms: self.req.max_downtime_ms,
                        why: explain(&reason, &policy),
                    })
                }
                Decision::Continue { throttle_percent } => {
                    if throttle_percent != m.throttle_percent {
                        tracker.set_throttle(throttle_percent);
                        if let Some(t) = &self.throttle {
                            t.set(throttle_percent);
                        }
                        self.update(|s| s.throttle_percent = throttle_percent);
                    }
                }
            }
            ranges = dirty_ranges(&self.src.mem, &dirty);
        }
    }

    /// Sends `ranges` and `PassEnd`; returns the wire bytes and the time it
    /// took (bandwidth-limit sleeps included).
    fn send_pass(
        &mut self,
        pass: u32,
        ranges: &[(u64, u64)],
        holes: &[(u64, u64)],
    ) -> Result<(u64, f64), SourceError> {
        let start = Instant::now();
        let (ranges, holes) = &self.deal(ranges, holes, false, false)?;
        let (status, cancel, started, pacer) =
            (self.status, &**self.cancel, self.started, &self.pacer);
        let lane_wire = self.lanes.wire.clone();
        let lane_base = lane_wire.load(Ordering::Relaxed);
        let disk = self.storage.as_ref().map(|c| c.progress.clone());
        let base = self.wire_total;
        let cancelled = Cell::new(false);
        let mut sender = PageSender::new(&mut self.w, &self.src.mem);
        let mut charged = 0u64;
        // For progress: (guest bytes of the ranges done, wire bytes at the
        // current range's start, its length).
        let range_progress = Cell::new((0u64, 0u64, 0u64));
        let mut between = |wire: u64| -> Result<(), ProtocolError> {
            pacer.consume(wire - charged, cancel);
            charged = wire;
            if cancel.load(Ordering::SeqCst) {
                cancelled.set(true);
                return Err(ProtocolError::Io(std::io::Error::other("cancelled")));
            }
            let mut s = lock(status);
            s.bytes_sent = base + wire + lane_wire.load(Ordering::Relaxed) - lane_base;
            // Ranges done, plus this one's wire bytes (fewer than its guest
            // bytes where pages are zero).
            let (done, range_wire, range_len) = range_progress.get();
            s.pass_done_bytes = done + (wire - range_wire).min(range_len);
            if let Some(p) = &disk {
                s.storage_copied_bytes = p.copied_bytes.load(Ordering::Relaxed);
                s.mirrored_writes = p.mirrored_writes.load(Ordering::Relaxed);
            }
            s.elapsed_ms = ms(started.elapsed());
            Ok(())
        };
        let sent = ranges
            .iter()
            .try_for_each(|&(gpa, len)| {
                let (done, _, _) = range_progress.get();
                range_progress.set((done, sender.wire_bytes, len));
                sender.send_range(gpa, len, false, &mut between)?;
                range_progress.set((done + len, sender.wire_bytes, 0));
                Ok(())
            })
            .and_then(|()| {
                holes
                    .iter()
                    .try_for_each(|&(gpa, len)| sender.send_zero(gpa, len))
            })
            .map(|()| sender.wire_bytes);
        let own = match sent {
            Ok(n) => n,
            // Stopped between two chunks: the stream is whole.
            Err(_) if cancelled.get() => return Err(SourceError::Cancelled),
            Err(e) => return Err(self.write_failed(e)),
        };
        // The pass ends once every lane has sent its part.
        let lanes = self.lanes.wait(&mut || {
            let mut s = lock(status);
            s.bytes_sent = base + own + lane_wire.load(Ordering::Relaxed) - lane_base;
            s.elapsed_ms = ms(started.elapsed());
        });
        let lanes = lanes.map_err(|e| self.lane_failed(e))?;
        let end = match send_json(&mut self.w, Kind::PassEnd, &PassEnd { pass }) {
            Ok(n) => n,
            Err(e) => return Err(self.write_failed(e)),
        };
        let wire = own + lanes + end;
        self.wire_total += wire;
        if let Err(e) = self.w.flush() {
            return Err(self.write_failed(e.into()));
        }
        Ok((wire, start.elapsed().as_secs_f64()))
    }

    /// Memory converges only once the disks are copied: until then, wait
    /// for the copy (its mirrors keep it current meanwhile).
    fn wait_for_storage(&mut self) -> Result<(), SourceError> {
        let mut beat = Instant::now();
        loop {
            self.update_storage()?;
            self.check_cancel()?;
            match &self.storage {
                Some(c) if !c.progress.copy_done.load(Ordering::SeqCst) => {
                    std::thread::sleep(Duration::from_millis(10));
                    if beat.elapsed() >= HEARTBEAT {
                        beat = Instant::now();
                        self.send(Kind::Heartbeat, &serde_json::json!({}))?;
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Pauses the guest, completes the storage copy and sends the last
    /// pages and the state; returns when the pause began.
    fn stop_and_copy(&mut self, pending: &DirtyBitmaps) -> Result<Instant, SourceError> {
        self.update(|s| s.phase = Phase::StopAndCopy);
        let paused_at = Instant::now();
        let control = &self.src.control;
        let was_paused = control.is_paused();
        let macs = self.net_macs();
        control.pause()?;
        self.paused_here = !was_paused;
        // First of all, before the drain and the last pages: the destination
        // announces the guest at once, and the switch sends its frames
        // there, to queue, instead of here (the device carries those that
        // came meanwhile in its state).
        let announcing = !macs.is_empty();
        if announcing {
            self.send(Kind::Paused, &Paused { macs })?;
        }
        if let Some(t) = &self.throttle {
            t.set(0);
        }
        self.src.machine.quiesce()?;
        if let Some(copy) = &mut self.storage {
            copy.finish()?;
        }
        self.update_storage()?;
        let mut dirty = collect_dirty(&self.src.vm, &self.src.mem)?;
        merge_into(&mut dirty, pending);
        // Each lane sends its stripes of the rest and seals itself.
        let (own, _) = self.deal(&dirty_ranges(&self.src.mem, &dirty), &[], true, true)?;
        let mut sender = PageSender::new(&mut self.w, &self.src.mem);
        let sent = own
            .into_iter()
            .try_for_each(|(gpa, len)| sender.send_range(gpa, len, true, &mut |_| Ok(())))
            .map(|()| sender.wire_bytes);
        match sent {
            Ok(n) => self.wire_total += n,
            Err(e) => return Err(self.write_failed(e)),
        }
        if announcing {
            // Frames for the guest go to the destination from here on: what
            // came here meanwhile is on the taps, and goes with the state.
            expect(&mut self.reader, Kind::Announced).map_err(|e| self.read_failed(e))?;
        }
        let lanes = self.lanes.wait(&mut || {});
        self.wire_total += lanes.map_err(|e| self.lane_failed(e))?;
        let mut state = self.src.machine.save_state()?;
        if let Some(plan) = &self.plan {
            // The destination runs the guest on the copies.
            state.config = plan.config.clone();
        }
        // The seal covers every frame up to here; the state comes next.
        let seal = self.w.seal().unwrap_or(crate::migration::protocol::Seal {
            frames: 0,
            digest: 0,
        });
        self.send(Kind::Seal, &seal)?;
        self.send(Kind::State, &state)?;
        let wire_total = self.wire_total;
        self.update(|s| {
            s.bytes_sent = wire_total;
            s.remaining_bytes = 0;
        });
        Ok(paused_at)
    }

    /// Each net device's address, in config order (the order of
    /// `Hello.net_ids`).
    fn net_macs(&self) -> Vec<String> {
        self.src
            .machine
            .config()
            .net
            .iter()
            .map(|n| n.mac.clone().unwrap_or_default())
            .collect()
    }

    /// Waits for the destination to be ready, commits, and waits for it to
    /// run the guest; returns the downtime.
    fn hand_over(&mut self, paused_at: Instant) -> Result<Duration, SourceError> {
        expect(&mut self.reader, Kind::Ready).map_err(|e| self.read_failed(e))?;
        // Issue 10, image locks: the guest is paused and quiesced; a
        // destination on the same storage takes the locks when it starts,
        // which it does only after Go.
        self.src.machine.release_images();
        self.images_released = true;
        self.check_cancel()?;
        // From here on the destination may run the guest: never resume it
        // here again, whatever happens.
        self.committed = true;
        self.update(|s| s.handed_over = true);
        self.send(Kind::Go, &serde_json::json!({}))?;
        expect(&mut self.reader, Kind::Resumed).map_err(SourceError::NotConfirmed)?;
        Ok(paused_at.elapsed())
    }

    /// Puts the guest back as it was if the migration failed before `Go`,
    /// tells the destination why, and closes the connection.
    fn finish(&mut self, error: Option<&SourceError>) {
        self.throttle = None;
        if error.is_some() {
            self.src.machine.set_mirrors(None);
            if !self.committed {
                // The guest stays here: it runs on, as before the
                // migration, on its local images.
                self.src.machine.resume_devices();
                if self.tracking {
                    let _ = stop_dirty_tracking(&self.src.vm, &self.src.mem);
                }
                // Issue 10, image locks: never run the guest on images
                // someone else may have locked meanwhile.
                let relocked = !self.images_released
                    || self.src.machine.retake_images().map_or_else(
                        |e| {
                            eprintln!(
                                "ferry: cannot lock the disk images again ({e}); the guest stays \
                                 paused: resume it (PUT /vm/resume) once nothing else uses them"
                            );
                            false
                        },
                        |()| true,
                    );
                if self.paused_here && relocked {
                    self.src.control.resume();
                }
            }
        }
        if let Some(mut copy) = self.storage.take() {
            copy.abort();
        }
        if let Some(e) = error.filter(|_| !self.committed && self.stream_intact) {
            let reason = match e {
                SourceError::Cancelled => "the migration was cancelled on the source".to_string(),
                e => e.to_string(),
            };
            self.w
                .get_ref()
                .get_ref()
                .set_write_timeout(Some(ERROR_WRITE_TIMEOUT))
                .ok();
            let _ = send_json(&mut self.w, Kind::Error, &Reason { reason });
            let _ = self.w.flush();
        }
        // After the reason went out on the channel: the destination may
        // notice the lanes closing first, and should hear why.
        self.lanes.shutdown();
        // Other handles on this socket (cancel's) must not keep it open.
        let _ = self
            .w
            .get_ref()
            .get_ref()
            .shutdown(std::net::Shutdown::Both);
    }
}

/// The files the copy writes, with the size each will have: the images
/// and kernel as they are here, and the rewritten config as it will be
/// written.
fn storage_offer(plan: &SharePlan, mounted_share: bool) -> Result<StorageOffer, SourceError> {
    let mut files = Vec::new();
    let mut sizes = Vec::new();
    let mut data_bytes = 0u64;
    for item in &plan.items {
        let local = |source| StorageError::Local {
            path: item.source.clone(),
            source,
        };
        let file = item.open().map_err(local)?;
        let size = file.metadata().map_err(local)?.len();
        let data: u64 = crate::sparse::data_extents(&file, 0, size)
            .map_err(local)?
            .iter()
            .map(|(from, to)| to - from)
            .sum();
        files.push(item.name.clone());
        sizes.push(size);
        data_bytes = data_bytes.saturating_add(data);
    }
    let config = serde_json::to_vec_pretty(&plan.config)?.len() as u64;
    files.push(CONFIG_NAME.to_string());
    sizes.push(config);
    Ok(StorageOffer {
        files,
        sizes,
        data_bytes: Some(data_bytes.saturating_add(config)),
        mounted_share,
    })
}

/// The give-up reason, and what to do when the allowance is below what the
/// hand-over alone costs.
fn explain(reason: &GiveUp, policy: &Policy) -> String {
    if policy.max_downtime_ms < policy.fixed_downtime_ms {
        format!(
            "{reason}; the hand-over alone is estimated at {} ms, allow at least that",
            policy.fixed_downtime_ms
        )
    } else {
        reason.to_string()
    }
}
