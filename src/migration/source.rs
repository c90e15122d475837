//! The sending side: a thread that connects, pre-copies memory while the
//! guest runs, converges (throttling the vCPUs if it must), then pauses the
//! guest for the last pages and the state, and stops only once the
//! destination runs the guest. Any failure before that leaves the guest
//! running here.

use crate::util::lock;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::memory::{
    collect_dirty, count_pages, dirty_ranges, merge_into, populated_ranges, start_dirty_tracking,
    stop_dirty_tracking, PageSender,
};
use super::protocol::{
    expect, parse_json, send_json, Hello, HelloAck, Kind, PassEnd, ProtocolError, PAGE_SIZE,
    PROTOCOL_VERSION,
};
use super::share::{MountedShare, NfsShare, Share};
use super::storage::{CopyItem, Pacer, StorageCopy};
use super::{MigrationStatus, Phase, SendRequest};
use super::{ShareSpec, StorageMode};
use crate::devices::virtio::block::WriteMirror;
use crate::snapshot::VmState;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::VcpuControl;
use crate::vstate::vm::Vm;

/// After this many passes without fitting the downtime, give up.
pub const MAX_PASSES: u32 = 40;
/// While pre-copy converges, aim for this share of the allowed downtime...
const AIM_FRACTION: f64 = 0.2;
/// ...but not for more passes than this.
const AIM_PASSES: u32 = 12;
/// Throttling starts at this share and grows by the same step per pass.
const THROTTLE_STEP: u32 = 20;
const THROTTLE_MAX: u32 = 95;
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
/// What the final phase costs besides memory: state, handshake.
const FIXED_DOWNTIME_MS: f64 = 2.0;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What migration needs from the VM besides memory and vCPUs: the VMM
/// implements it, devices stay unaware of migration.
pub trait MigratableVm: Send + Sync {
    /// Finish all device work in flight (vCPUs are paused).
    fn quiesce(&self) -> Result<(), String>;
    /// Everything but memory (vCPUs are paused).
    fn save_state(&self) -> Result<VmState, String>;
    /// The CPUID the guest sees, for the destination's compatibility check.
    fn guest_cpuid(&self) -> Vec<kvm_bindings::kvm_cpuid_entry2>;
    /// The migration succeeded: the guest runs elsewhere now.
    fn migrated(&self, destination: &str, downtime: Duration);
    /// The config the VM runs with.
    fn config(&self) -> crate::config::VmConfig;
    /// Starts (one per drive, in config order) or stops (None) mirroring
    /// guest writes.
    fn set_mirrors(&self, mirrors: Option<Vec<Arc<dyn WriteMirror>>>);
}

/// The name of each of the VM's files in the share.
pub struct SharePlan {
    pub items: Vec<CopyItem>,
    /// The config rewritten to the names in the share.
    pub config: crate::config::VmConfig,
}

/// Keeps file names plain: letters, digits, `.`, `-`, `_`.
fn plain(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn share_plan(config: &crate::config::VmConfig) -> SharePlan {
    let mut items = Vec::new();
    let mut out = config.clone();
    // Small files first: the disks take the time.
    items.push(CopyItem {
        name: "kernel".into(),
        source: config.kernel.clone(),
        mirrored: false,
    });
    out.kernel = "kernel".into();
    if let Some(initrd) = &config.initrd {
        items.push(CopyItem {
            name: "initrd".into(),
            source: initrd.clone(),
            mirrored: false,
        });
        out.initrd = Some("initrd".into());
    }
    for (i, d) in config.drives.iter().enumerate() {
        let name = format!("drive{i}-{}.img", plain(&d.id));
        items.push(CopyItem {
            name: name.clone(),
            source: d.path.clone(),
            mirrored: true,
        });
        out.drives[i].path = name.into();
        out.drives[i].create_size_mib = None;
    }
    out.api_socket = None;
    SharePlan { items, config: out }
}

/// The config file written next to the copied files.
pub const CONFIG_NAME: &str = "vm.json";

pub struct SourceContext {
    pub vm: Arc<Vm>,
    pub mem: GuestMemoryMmap,
    pub memfd: Option<Arc<File>>,
    pub control: Arc<VcpuControl>,
    pub vcpus: u8,
    pub machine: Arc<dyn MigratableVm>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {dest}: {source}")]
    Connect {
        dest: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the destination answered for a different VM: {0}")]
    Mismatch(String),
    #[error("{0}")]
    Vm(String),
    #[error("pre-copy did not converge: after {passes} passes {remaining_mib:.1} MiB were still dirty, expected downtime {expected_ms:.0} ms > {max_ms} ms")]
    NoConvergence {
        passes: u32,
        remaining_mib: f64,
        expected_ms: f64,
        max_ms: u64,
    },
    #[error("storage: {0}")]
    Storage(String),
    #[error("cancelled")]
    Cancelled,
}

/// A migration in progress (or finished).
pub struct Migration {
    pub status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Migration {
    /// Starts migrating in a thread of its own.
    pub fn start(ctx: SourceContext, req: SendRequest) -> std::io::Result<Migration> {
        let id = crate::util::random_hex::<8>()?;
        let status = Arc::new(Mutex::new(MigrationStatus {
            phase: Phase::Setup,
            migration_id: id,
            destination: req.destination.clone(),
            max_downtime_ms: req.max_downtime_ms,
            storage: Some(req.storage_mode()),
            memory_bytes: vm_memory::GuestMemoryBackend::iter(&ctx.mem)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum(),
            ..Default::default()
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        let (s, c, st) = (status.clone(), cancel.clone(), stream.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let started = Instant::now();
                let mut run = Run {
                    ctx: &ctx,
                    req: &req,
                    status: &s,
                    cancel: &c,
                    started,
                };
                let result = run.migrate(&st);
                let mut status = lock(&s);
                status.elapsed_ms = ms(started.elapsed());
                match result {
                    Ok(downtime) => {
                        status.phase = Phase::Completed;
                        status.downtime_ms = Some(ms(downtime));
                        drop(status);
                        ctx.machine.migrated(&req.destination, downtime);
                    }
                    // However the cancel surfaced (often as a connection
                    // error, since cancel shuts the socket down) — unless the
                    // guest was already handed over: then what matters is
                    // that the hand-over was not confirmed.
                    Err(_) if c.load(Ordering::SeqCst) && !status.handed_over => {
                        status.phase = Phase::Cancelled;
                        status.error = Some("cancelled by request".into());
                    }
                    Err(e) => {
                        status.phase = Phase::Failed;
                        status.error = Some(e.to_string());
                    }
                }
            })?;
        Ok(Migration {
            status,
            cancel,
            stream,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Stops a migration in progress; the guest goes on here.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&self.stream).as_ref() {
            // Unblocks any read or write in progress.
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        self.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Holds the vCPUs back for `percent` of every period while set.
struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    control: Arc<VcpuControl>,
}

impl Throttle {
    fn start(control: Arc<VcpuControl>) -> Throttle {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, c) = (percent.clone(), stop.clone(), control.clone());
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    let pct = p.load(Ordering::SeqCst);
                    if pct == 0 {
                        std::thread::sleep(THROTTLE_PERIOD);
                        continue;
                    }
                    c.set_throttled(true);
                    std::thread::sleep(THROTTLE_PERIOD * pct / 100);
                    c.set_throttled(false);
                    std::thread::sleep(THROTTLE_PERIOD * (100 - pct) / 100);
                }
                c.set_throttled(false);
            })
            .ok();
        Throttle {
            percent,
            stop,
            thread,
            control,
        }
    }

    fn set(&self, pct: u32) {
        self.percent.store(pct, Ordering::SeqCst);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.control.set_throttled(false);
    }
}

struct Run<'a> {
    ctx: &'a SourceContext,
    req: &'a SendRequest,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a AtomicBool,
    started: Instant,
}

impl Run<'_> {
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

    /// The whole migration; on any error before the destination was told to
    /// run, the guest is left running here.
    fn migrate(&mut self, slot: &Mutex<Option<TcpStream>>) -> Result<Duration, SourceError> {
        let dest = &self.req.destination;
        let addr = dest
            .to_socket_addrs()
            .map_err(|_| SourceError::Resolve(dest.clone()))?
            .next()
            .ok_or_else(|| SourceError::Resolve(dest.clone()))?;
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
            SourceError::Connect {
                dest: dest.clone(),
                source,
            }
        })?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).ok();
        // A link that stops taking data is a failure, not a wait.
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).ok();
        *lock(slot) = stream.try_clone().ok();
        self.check_cancel()?;
        let mut reader = stream.try_clone().map_err(ProtocolError::from)?;
        let mut w = BufWriter::with_capacity(256 << 10, stream);

        let (id, memory_size) = {
            let s = lock(self.status);
            (s.migration_id.clone(), s.memory_bytes)
        };
        let mode = self.req.storage_mode();
        let plan = (mode == StorageMode::Copy).then(|| share_plan(&self.ctx.machine.config()));
        self.update(|s| s.storage = Some(mode));
        send_json(
            &mut w,
            Kind::Hello,
            &Hello {
                protocol: PROTOCOL_VERSION,
                migration_id: id.clone(),
                vcpus: self.ctx.vcpus,
                memory_size,
                cpuid: self.ctx.machine.guest_cpuid(),
                storage: plan.as_ref().map(|p| super::protocol::StorageOffer {
                    files: p
                        .items
                        .iter()
                        .map(|i| i.name.clone())
                        .chain([CONFIG_NAME.to_string()])
                        .collect(),
                    mounted_share: self.req.share.is_some(),
                }),
            },
        )?;
        w.flush().map_err(ProtocolError::from)?;
        let ack: HelloAck = parse_json(Kind::HelloAck, &expect(&mut reader, Kind::HelloAck)?)?;
        if ack.protocol != PROTOCOL_VERSION
            || ack.migration_id != id
            || ack.vcpus != self.ctx.vcpus
            || ack.memory_size != memory_size
        {
            return Err(SourceError::Mismatch(format!(
                "it accepted protocol {} / id {} / {} vCPUs / {} bytes, we offered protocol {} / id {} / {} vCPUs / {} bytes",
                ack.protocol, ack.migration_id, ack.vcpus, ack.memory_size,
                PROTOCOL_VERSION, id, self.ctx.vcpus, memory_size
            )));
        }

        let pacer = Arc::new(Pacer::new(
            self.req
                .bandwidth_mib_s
                .map(|m| m as f64 * (1u64 << 20) as f64),
        ));
        // Storage: reach the share, create the files, mirror, copy.
        let mut storage = match &plan {
            None => None,
            Some(plan) => {
                let offer = ack.share.clone().ok_or_else(|| {
                    SourceError::Storage("the destination offered no share for the copy".into())
                })?;
                let share = self.open_share(addr.ip(), &offer, self.req.share.as_ref())?;
                let config = serde_json::to_vec_pretty(&plan.config)
                    .map_err(|e| SourceError::Vm(e.to_string()))?;
                let (mut copy, mirrors) = StorageCopy::prepare(
                    share,
                    plan.items.clone(),
                    vec![(CONFIG_NAME.to_string(), config)],
                )
                .map_err(|e| SourceError::Storage(e.to_string()))?;
                self.update(|s| s.storage_total_bytes = copy.progress.total_bytes);
                self.ctx.machine.set_mirrors(Some(
                    mirrors
                        .into_iter()
                        .map(|m| m as Arc<dyn WriteMirror>)
                        .collect(),
                ));
                if let Err(e) = copy.start_copy(pacer.clone()) {
                    self.ctx.machine.set_mirrors(None);
                    return Err(SourceError::Storage(format!("cannot start the copy: {e}")));
                }
                Some(copy)
            }
        };

        let vm = &self.ctx.vm;
        let mem = &self.ctx.mem;
        let result = start_dirty_tracking(vm, mem)
            .map_err(|e| SourceError::Vm(e.to_string()))
            .and_then(|()| {
                let throttle = Throttle::start(self.ctx.control.clone());
                let mut paused_here = false;
                let mut committed = false;
                let result = self.copy_and_cut_over(
                    &mut w,
                    &mut reader,
                    &throttle,
                    &pacer,
                    storage.as_mut(),
                    plan.as_ref(),
                    &mut paused_here,
                    &mut committed,
                );
                drop(throttle);
                if result.is_err() && !committed {
                    // The guest stays here: it runs on, as before the
                    // migration, on its local images.
                    self.ctx.machine.set_mirrors(None);
                    let _ = stop_dirty_tracking(vm, mem);
                    if paused_here {
                        self.ctx.control.resume();
                    }
                }
                result
            });
        if result.is_err() {
            self.ctx.machine.set_mirrors(None);
        }
        if let Some(mut copy) = storage {
            copy.abort();
        }
        result
    }

    /// The share the destination offered, or the directory mounted here.
    fn open_share(
        &self,
        dest_ip: std::net::IpAddr,
        offer: &super::protocol::ShareOffer,
        mounted: Option<&ShareSpec>,
    ) -> Result<Arc<dyn Share>, SourceError> {
        if offer.dir_name.is_empty()
            || offer.dir_name.contains('/')
            || offer.dir_name.contains("..")
        {
            return Err(SourceError::Storage(format!(
                "the destination offered a bad share directory {:?}",
                offer.dir_name
            )));
        }
        let share: Arc<dyn Share> = match (mounted, offer.nfs_port, &offer.export) {
            (Some(spec), _, _) => {
                let dir = spec.path.join(&offer.dir_name);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| SourceError::Storage(format!("{}: {e}", dir.display())))?;
                Arc::new(MountedShare::new(&dir).map_err(|e| SourceError::Storage(e.to_string()))?)
            }
            (None, Some(port), Some(export)) => Arc::new(
                NfsShare::connect(std::net::SocketAddr::new(dest_ip, port), export)
                    .map_err(|e| SourceError::Storage(format!("cannot reach the share: {e}")))?,
            ),
            _ => {
                return Err(SourceError::Storage(
                    "the destination offered neither an NFS share nor a mounted directory".into(),
                ))
            }
        };
        self.update(|s| s.share = Some(share.describe()));
        Ok(share)
    }

    fn update_storage(&self, copy: Option<&mut StorageCopy>) -> Result<(), SourceError> {
        if let Some(copy) = copy {
            let p = &copy.progress;
            let (copied, writes) = (
                p.copied_bytes.load(Ordering::Relaxed),
                p.mirrored_writes.load(Ordering::Relaxed),
            );
            self.update(|s| {
                s.storage_copied_bytes = copied;
                s.mirrored_writes = writes;
            });
            if let Some(why) = p.failure() {
                return Err(SourceError::Storage(why));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn copy_and_cut_over(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        reader: &mut TcpStream,
        throttle: &Throttle,
        pacer: &Pacer,
        mut storage: Option<&mut StorageCopy>,
        plan: Option<&SharePlan>,
        paused_here: &mut bool,
        committed: &mut bool,
    ) -> Result<Duration, SourceError> {
        let vm = &self.ctx.vm;
        let mem = &self.ctx.mem;
        let limit = self
            .req
            .bandwidth_mib_s
            .map(|m| m as f64 * (1u64 << 20) as f64);
        let max_downtime = self.req.max_downtime_ms as f64;
        let mut wire_total = 0u64;
        let mut bandwidth = 0f64; // bytes/s, measured
        let mut throttle_pct = 0u32;
        let mut last_sync = Instant::now();
        let mut sent_last_pass = u64::MAX;
        let mut last_dirty = u64::MAX;
        let mut over_half_in_a_row = 0;

        // Pass 1 copies every populated page; later passes what got dirty.
        let mut ranges = populated_ranges(mem, self.ctx.memfd.as_deref())
            .map_err(|e| SourceError::Vm(format!("cannot list guest memory: {e}")))?;
        let mut pass = 1u32;
        // What the last sync found dirty and no pass has sent yet.
        let pending = loop {
            self.update(|s| {
                s.phase = Phase::Precopy;
                s.pass = pass;
                // Issue 8, progress: what this pass covers.
                s.pass_bytes = ranges.iter().map(|r| r.1).sum();
                s.pass_done_bytes = 0;
            });
            let pass_start = Instant::now();
            let wire_before = wire_total;
            {
                let status = self.status;
                let cancel = self.cancel;
                let stream_start = self.started;
                let mut sender = PageSender::new(w, mem);
                let base = wire_total;
                let disk = storage.as_deref().map(|c| c.progress.clone());
                let mut last = 0u64;
                let last_wire = &mut last;
                // Issue 8, progress: (bytes of the ranges done, wire bytes
                // at the current range's start, its length).
                let range_progress = std::cell::Cell::new((0u64, 0u64, 0u64));
                let mut between = |wire: u64| -> Result<(), ProtocolError> {
                    if cancel.load(Ordering::SeqCst) {
                        return Err(ProtocolError::Io(std::io::Error::other("cancelled")));
                    }
                    let total = base + wire;
                    pacer.consume(wire - *last_wire);
                    *last_wire = wire;
                    let mut s = lock(status);
                    s.bytes_sent = total;
                    // Issue 8, progress: ranges done, plus this one's wire
                    // bytes (fewer than its guest bytes where pages are zero).
                    let (done, range_wire, range_len) = range_progress.get();
                    s.pass_done_bytes = done + (wire - range_wire).min(range_len);
                    if let Some(p) = &disk {
                        s.storage_copied_bytes = p.copied_bytes.load(Ordering::Relaxed);
                        s.mirrored_writes = p.mirrored_writes.load(Ordering::Relaxed);
                    }
                    s.elapsed_ms = ms(stream_start.elapsed());
                    Ok(())
                };
                for (gpa, len) in &ranges {
                    // Issue 8, progress.
                    let (done, _, _) = range_progress.get();
                    range_progress.set((done, sender.wire_bytes, *len));
                    sender
                        .send_range(*gpa, *len, false, &mut between)
                        .map_err(|e| self.cancelled_or(e))?;
                    range_progress.set((done + len, sender.wire_bytes, 0));
                }
                wire_total = base + sender.wire_bytes;
                wire_total += send_json(sender.w, Kind::PassEnd, &PassEnd { pass })?;
            }
            w.flush().map_err(ProtocolError::from)?;
            // The pass's own pace, before any wait for the disks.
            let pass_time = pass_start.elapsed().as_secs_f64();
            // Memory converges only once the disks are copied: until then,
            // wait for the copy (its mirrors keep it current meanwhile).
            let mut beat = Instant::now();
            loop {
                self.update_storage(storage.as_deref_mut())?;
                self.check_cancel()?;
                match storage.as_deref() {
                    Some(c) if !c.progress.copy_done.load(Ordering::SeqCst) => {
                        std::thread::sleep(Duration::from_millis(10));
                        if beat.elapsed() >= HEARTBEAT {
                            beat = Instant::now();
                            send_json(w, Kind::Heartbeat, &serde_json::json!({}))
                                .and_then(|_| w.flush().map_err(ProtocolError::from))
                                .map_err(|e| self.cancelled_or(e))?;
                        }
                    }
                    _ => break,
                }
            }
            let pass_wire = wire_total - wire_before;
            if pass_wire >= 1 << 20 && pass_time > 0.0 {
                bandwidth = pass_wire as f64 / pass_time;
            } else if bandwidth == 0.0 {
                bandwidth = limit.unwrap_or(1e9);
            }

            let dirty = collect_dirty(vm, mem).map_err(|e| SourceError::Vm(e.to_string()))?;
            let since = last_sync.elapsed().as_secs_f64();
            last_sync = Instant::now();
            let dirty_bytes = count_pages(&dirty) * PAGE_SIZE;
            let expected = dirty_bytes as f64 / bandwidth * 1000.0 + FIXED_DOWNTIME_MS;
            self.update(|s| {
                s.remaining_bytes = dirty_bytes;
                s.bandwidth_mib_s = bandwidth / (1 << 20) as f64;
                s.dirty_rate_mib_s = if since > 0.0 {
                    dirty_bytes as f64 / since / (1 << 20) as f64
                } else {
                    0.0
                };
                s.expected_downtime_ms = expected;
            });
            self.check_cancel()?;
            // Once the rest fits the allowed downtime, go on while passes
            // still shrink it well: each such pass makes the pause shorter
            // for little cost. Stop when it is a fraction of the allowance,
            // or stalls.
            let shrinking = dirty_bytes * 3 < last_dirty.saturating_mul(2);
            last_dirty = dirty_bytes;
            if expected <= max_downtime
                && (expected <= max_downtime * AIM_FRACTION || !shrinking || pass >= AIM_PASSES)
            {
                break dirty;
            }
            if pass >= MAX_PASSES {
                return Err(SourceError::NoConvergence {
                    passes: pass,
                    remaining_mib: dirty_bytes as f64 / (1 << 20) as f64,
                    expected_ms: expected,
                    max_ms: self.req.max_downtime_ms,
                });
            }
            // Auto-converge: when the guest dirties more than half of what a
            // pass manages to send, twice in a row, hold it back harder.
            if pass > 1 && dirty_bytes * 2 > sent_last_pass.min(pass_wire) {
                over_half_in_a_row += 1;
            } else {
                over_half_in_a_row = 0;
            }
            if over_half_in_a_row >= 2 || (pass >= 8 && throttle_pct > 0) {
                throttle_pct = (throttle_pct + THROTTLE_STEP).min(THROTTLE_MAX);
                throttle.set(throttle_pct);
                self.update(|s| s.throttle_percent = throttle_pct);
            }
            sent_last_pass = pass_wire;
            ranges = dirty_ranges(mem, &dirty);
            pass += 1;
        };

        // Stop and copy.
        self.update(|s| s.phase = Phase::StopAndCopy);
        let paused_at = Instant::now();
        let was_paused = self.ctx.control.is_paused();
        self.ctx
            .control
            .pause()
            .map_err(|e| SourceError::Vm(e.to_string()))?;
        *paused_here = !was_paused;
        throttle.set(0);
        self.ctx.machine.quiesce().map_err(SourceError::Vm)?;
        if let Some(copy) = storage {
            copy.finish()
                .map_err(|e| SourceError::Storage(e.to_string()))?;
            self.update_storage(Some(copy))?;
        }
        let mut dirty = collect_dirty(vm, mem).map_err(|e| SourceError::Vm(e.to_string()))?;
        merge_into(&mut dirty, &pending);
        {
            let mut sender = PageSender::new(w, mem);
            for (gpa, len) in dirty_ranges(mem, &dirty) {
                sender
                    .send_range(gpa, len, true, &mut |_| Ok(()))
                    .map_err(|e| self.cancelled_or(e))?;
            }
            wire_total += sender.wire_bytes;
        }
        let mut state = self.ctx.machine.save_state().map_err(SourceError::Vm)?;
        if let Some(plan) = plan {
            // The destination runs the guest on the copies.
            state.config = plan.config.clone();
        }
        wire_total += send_json(w, Kind::State, &state)?;
        w.flush().map_err(ProtocolError::from)?;
        self.update(|s| {
            s.bytes_sent = wire_total;
            s.remaining_bytes = 0;
        });
        expect(reader, Kind::Ready).map_err(|e| self.cancelled_or(e))?;
        self.check_cancel()?;
        // From here on the destination may run the guest: never resume it
        // here again, whatever happens.
        *committed = true;
        self.update(|s| s.handed_over = true);
        send_json(w, Kind::Go, &serde_json::json!({}))?;
        w.flush().map_err(ProtocolError::from)?;
        expect(reader, Kind::Resumed).map_err(|e| {
            SourceError::Vm(format!(
                "the destination was told to run the guest but did not confirm ({e}); \
                 the guest stays paused here so that it never runs twice"
            ))
        })?;
        Ok(paused_at.elapsed())
    }

    fn cancelled_or(&self, e: ProtocolError) -> SourceError {
        if self.cancel.load(Ordering::SeqCst) {
            SourceError::Cancelled
        } else {
            SourceError::Protocol(e)
        }
    }
}
