//! The sending side: a thread that connects, pre-copies memory while the
//! guest runs, converges (throttling the vCPUs if it must), then pauses the
//! guest for the last pages and the state, and stops only once the
//! destination runs the guest. Any failure before that leaves the guest
//! running here.

mod converge;
mod lanes;
mod session;
mod throttle;

pub use lanes::default_connections;

pub use converge::{
    decide, Decision, GiveUp, PassMetrics, PassSample, Policy, Tracker, FIXED_DOWNTIME_MS,
    MAX_PASSES,
};

use crate::util::lock;
use std::fs::File;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::ProtocolError;
use super::storage::{CopyItem, StorageError};
use super::{MigrationStatus, Phase, SendRequest};
use crate::devices::virtio::block::{BlockError, WriteMirror};
use crate::snapshot::VmState;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::VcpuControl;
use crate::vstate::vm::Vm;

/// How long a cancel lets the migration thread tell the destination why it
/// stops before it shuts the socket under it.
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// What migration needs from the VM besides memory and vCPUs: the VMM
/// implements it, devices stay unaware of migration.
pub trait MigratableVm: Send + Sync {
    /// Finish all device work in flight (vCPUs are paused).
    fn quiesce(&self) -> Result<(), MachineError>;
    /// Undoes what `quiesce` stopped: the guest goes on here.
    fn resume_devices(&self);
    /// Everything but memory (vCPUs are paused).
    fn save_state(&self) -> Result<VmState, MachineError>;
    /// The CPUID the guest sees, for the destination's compatibility check.
    fn guest_cpuid(&self) -> Vec<kvm_bindings::kvm_cpuid_entry2>;
    /// The migration succeeded: the guest runs elsewhere now.
    fn migrated(&self, destination: &str, downtime: Duration);
    /// The config the VM runs with.
    fn config(&self) -> crate::config::VmConfig;
    /// Starts (one per drive, in config order) or stops (None) mirroring
    /// guest writes.
    fn set_mirrors(&self, mirrors: Option<Vec<Arc<dyn WriteMirror>>>);
    /// Lets go of the disk image locks (the guest is paused), so that a
    /// destination on the same storage can take them when it starts.
    fn release_images(&self);
    /// Takes the image locks back before the guest resumes here.
    fn retake_images(&self) -> Result<(), MachineError>;
    /// The VM's own open descriptors of the files a storage copy sends
    /// (duplicates): a VMM that dropped its privileges after set-up may no
    /// longer be allowed to open them by path.
    fn source_files(&self) -> SourceFiles;
}

/// Open descriptors of the files a storage copy sends, where the VM holds
/// them; `None` falls back to opening the configured path.
#[derive(Debug, Default)]
pub struct SourceFiles {
    pub kernel: Option<std::fs::File>,
    pub initrd: Option<std::fs::File>,
    /// One per drive, in config order.
    pub drives: Vec<Option<std::fs::File>>,
}

/// What the VM side of a migration can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("drive {drive}: {source}")]
    Quiesce { drive: String, source: BlockError },
    #[error("net device {net}: {source}")]
    QuiesceNet {
        net: String,
        source: crate::devices::virtio::net::NetError,
    },
    #[error("drive {drive}: {source}")]
    Lock { drive: String, source: BlockError },
    /// The VMM's own error, boxed: migration does not reach up into it.
    #[error("{0}")]
    SaveState(Box<dyn std::error::Error + Send + Sync>),
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

pub fn share_plan(config: &crate::config::VmConfig, files: SourceFiles) -> SharePlan {
    let held = |f: Option<std::fs::File>| f.map(Arc::new);
    let mut drive_files = files.drives.into_iter();
    let mut items = Vec::new();
    let mut out = config.clone();
    // Small files first: the disks take the time.
    items.push(CopyItem {
        name: "kernel".into(),
        source: config.kernel.clone(),
        file: held(files.kernel),
        mirrored: false,
    });
    out.kernel = "kernel".into();
    if let Some(initrd) = &config.initrd {
        items.push(CopyItem {
            name: "initrd".into(),
            source: initrd.clone(),
            file: held(files.initrd),
            mirrored: false,
        });
        out.initrd = Some("initrd".into());
    }
    for (i, d) in config.drives.iter().enumerate() {
        let name = format!("drive{i}-{}.img", plain(&d.id));
        items.push(CopyItem {
            name: name.clone(),
            source: d.path.clone(),
            file: held(drive_files.next().flatten()),
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
    #[error("confining the migration thread: {0}")]
    Confine(crate::security::SecurityError),
    #[error("cannot start the vCPU throttle: {0}")]
    Throttle(std::io::Error),
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("cannot connect to {dest}: {source}")]
    Connect {
        dest: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Tls(#[from] crate::migration::transport::TlsError),
    #[error("TLS handshake with {dest} failed: {why}")]
    TlsHandshake { dest: String, why: String },
    #[error("the destination answered for a different VM: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error(transparent)]
    DirtyLog(#[from] crate::vstate::vm::VmError),
    #[error("cannot list guest memory: {0}")]
    Memory(std::io::Error),
    #[error("cannot write the config for the destination: {0}")]
    Config(#[from] serde_json::Error),
    #[error("pre-copy did not converge: after {passes} passes {remaining_mib:.1} MiB were still dirty, expected downtime {expected_ms:.0} ms > {max_ms} ms ({why})")]
    NoConvergence {
        passes: u32,
        remaining_mib: f64,
        expected_ms: f64,
        max_ms: u64,
        why: String,
    },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Lane(#[from] lanes::LaneError),
    #[error("cancelled")]
    Cancelled,
    #[error("the destination was told to run the guest but did not confirm ({0}); the guest stays paused here so that it never runs twice")]
    NotConfirmed(ProtocolError),
}

/// A migration in progress (or finished).
pub struct Migration {
    pub status: Arc<Mutex<MigrationStatus>>,
    cancel: Arc<AtomicBool>,
    /// The migration socket while it is open, for cancel to unblock it.
    stream: Arc<Mutex<Option<TcpStream>>>,
    done: Arc<AtomicBool>,
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
            connections: req.connections(),
            memory_bytes: vm_memory::GuestMemoryBackend::iter(&ctx.mem)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum(),
            ..Default::default()
        }));
        let cancel = Arc::new(AtomicBool::new(false));
        let stream = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (s, c, st, d) = (status.clone(), cancel.clone(), stream.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let started = Instant::now();
                let result = session::run(&ctx, &req, &s, &c, &st, started);
                // The socket is shut by now; the clone must not keep it.
                *lock(&st) = None;
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
                d.store(true, Ordering::SeqCst);
            })?;
        Ok(Migration {
            status,
            cancel,
            stream,
            done,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Stops a migration in progress; the guest goes on here.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        // Ends any wait for the destination's answer, but leaves the
        // sending side open: the migration thread tells the destination
        // why it stops.
        self.shutdown(std::net::Shutdown::Read);
        let deadline = Instant::now() + CANCEL_GRACE;
        while !self.done.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        // A write stuck on a destination that stopped reading ends only
        // with the socket.
        if !self.done.load(Ordering::SeqCst) {
            self.shutdown(std::net::Shutdown::Both);
        }
    }

    fn shutdown(&self, how: std::net::Shutdown) {
        if let Some(s) = lock(&self.stream).as_ref() {
            let _ = s.shutdown(how);
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
