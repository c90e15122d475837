//! The Vmm: builds the VM from a config (memory, devices, boot state, vCPU
//! threads), then runs the event loop (device queues, console input, the
//! control socket) until the guest or a request ends it.

use crate::util::lock;
use std::fs::File;
use std::io::{LineWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiAction, ApiError, ApiReply, ApiRequest, ApiServer};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{boot, cpuid, mptable, regs};
use crate::config::{SerialConfig, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::{Block, BlockError, WriteMirror};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::migration::destination::{self, Incoming};
use crate::migration::source::{MachineError, MigratableVm, Migration, SourceContext};
use crate::migration::{Phase, SendRequest};
use crate::snapshot::{self, DriveState, SnapshotError, VmState};
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::state;
pub use crate::vstate::vcpu::VmExit;
use crate::vstate::vcpu::{
    install_kick_handler, ExitSignal, Vcpu, VcpuContext, VcpuControl, VcpuError, VcpuHandle,
};
use crate::vstate::vm::Vm;

/// Offset of QueueNotify in a virtio-mmio window.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("migration: {0}")]
    Receive(destination::DestinationError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("VM state: {0}")]
    State(#[from] crate::vstate::state::StateError),
    #[error("drive {id}: cannot restore its virtio transport: {source}")]
    Transport {
        id: String,
        source: crate::devices::virtio::mmio::MmioError,
    },
    #[error("serial: {0}")]
    Serial(String),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error("guest memory: {0}")]
    Memory(#[from] crate::vstate::memory::MemoryError),
    #[error("kernel: {0}")]
    Boot(#[from] boot::BootError),
    #[error("boot state: {0}")]
    Regs(#[from] regs::RegsError),
    #[error("CPUID: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("drive {id}: {source}")]
    Drive { id: String, source: BlockError },
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("serial output {path}: {source}")]
    SerialFile {
        path: String,
        source: std::io::Error,
    },
    #[error("device bus: {0}")]
    Bus(#[from] crate::devices::bus::BusError),
    #[error("control socket: {0}")]
    Api(#[from] crate::api::ApiServerError),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

impl VmmError {
    /// Errors caused by what the user gave us (exit code 2), as opposed to
    /// failures of the host or the VMM (exit code 1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            VmmError::Config(_) | VmmError::Cmdline(_) => true,
            VmmError::Snapshot(e) => e.is_bad_input(),
            VmmError::Boot(e) => !matches!(e, boot::BootError::BootParams(_)),
            VmmError::Drive { source, .. } => matches!(
                source,
                BlockError::Open { .. }
                    | BlockError::NotRegularFile(_)
                    | BlockError::UnalignedSize { .. }
            ),
            _ => false,
        }
    }
}

fn eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)
}

/// Where the guest's console goes. A restored guest appends to its log file:
/// its earlier output is part of the same story.
fn serial_output(cfg: &SerialConfig, append: bool) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match cfg {
        SerialConfig::Stdout => Box::new(std::io::stdout()),
        SerialConfig::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(append)
                .truncate(!append)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.display().to_string(),
                    source,
                })?;
            Box::new(LineWriter::new(f))
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RunState {
    Running,
    Paused,
}

/// The event-loop side of the VM: exits, resets, API requests, console input.
struct Controller {
    exit: Arc<ExitSignal>,
    reset_evt: EventFd,
    api_evt: EventFd,
    api_rx: Receiver<ApiRequest>,
    control: Arc<VcpuControl>,
    handles: Vec<VcpuHandle>,
    machine: Arc<Mutex<Machine>>,
    /// The migration in progress or the last one, if any.
    migration: Option<Migration>,
    stdin_open: bool,
    started: Instant,
    /// From process start to the vCPUs running (booted or restored).
    startup: Duration,
    restored: bool,
    done: bool,
    /// After a migration, when to stop at the latest.
    linger_until: Option<Instant>,
}

/// How long a migrated-away source keeps its control socket up.
const MIGRATED_LINGER: Duration = Duration::from_secs(1);

const TOKEN_EXIT: u32 = 1;
const TOKEN_RESET: u32 = 2;
const TOKEN_API: u32 = 3;
const TOKEN_STDIN: u32 = 4;

impl Controller {
    fn state(&self) -> RunState {
        if self.control.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn handle_api(&mut self, action: ApiAction) -> ApiReply {
        match action {
            ApiAction::GetVm => {
                let m = lock(&self.machine);
                Ok(serde_json::json!({
                    "state": self.state(),
                    "vcpus": m.config.vcpus,
                    "memory_mib": m.config.memory_mib,
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                    "startup_ms": self.startup.as_secs_f64() * 1000.0,
                    "restored": self.restored,
                    "drives": m.config.drives.iter().map(|d| &d.id).collect::<Vec<_>>(),
                }))
            }
            ApiAction::Pause => {
                self.control
                    .pause()
                    .map_err(|e| ApiError::new(500, e.to_string()))?;
                Ok(serde_json::json!({ "state": self.state() }))
            }
            ApiAction::Resume => {
                let migration = self.migration.as_ref().map(|m| m.status());
                if let Some(m) = migration {
                    if m.handed_over {
                        return Err(ApiError::conflict(
                            "the guest was handed over to the migration destination; it must not run here too",
                        ));
                    }
                    if m.phase == Phase::StopAndCopy {
                        return Err(ApiError::conflict(
                            "the guest is paused for the last phase of a migration",
                        ));
                    }
                }
                self.control.resume();
                Ok(serde_json::json!({ "state": self.state() }))
            }
            ApiAction::Shutdown => {
                self.exit.exit(VmExit::Requested);
                Ok(serde_json::json!({ "state": "ShuttingDown" }))
            }
            ApiAction::SnapshotCreate { dir } => {
                if self.migration_active() {
                    return Err(ApiError::conflict("a migration is in progress"));
                }
                self.snapshot(&dir)
            }
            ApiAction::MigrationSend(req) => self.migrate(req),
            ApiAction::MigrationStatus => {
                if let Some(until) = self.linger_until.as_mut() {
                    // The final status has been read: leave right after.
                    *until = (*until).min(Instant::now() + Duration::from_millis(100));
                }
                Ok(self.migration_status())
            }
            ApiAction::MigrationCancel => {
                let Some(m) = self.migration.as_ref().filter(|m| m.status().is_active()) else {
                    return Err(ApiError::conflict("no migration is in progress"));
                };
                m.cancel();
                // The migration thread notices at once; wait for it to have
                // put the guest back as it was.
                let deadline = Instant::now() + Duration::from_secs(10);
                while m.status().is_active() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(self.migration_status())
            }
        }
    }

    fn migration_active(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.status().is_active())
    }

    fn migration_status(&self) -> serde_json::Value {
        let status = self
            .migration
            .as_ref()
            .map(|m| m.status())
            .unwrap_or_default();
        serde_json::to_value(status).unwrap_or(serde_json::Value::Null)
    }

    fn migrate(&mut self, req: SendRequest) -> ApiReply {
        if self.migration_active() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        let ctx = {
            let m = lock(&self.machine);
            SourceContext {
                vm: m.vm.clone(),
                mem: m.mem.clone(),
                memfd: m.memfd.clone(),
                control: self.control.clone(),
                vcpus: m.config.vcpus,
                machine: Arc::new(MachineHandle {
                    machine: self.machine.clone(),
                    exit: self.exit.clone(),
                    cpuid: m.guest_cpuid.clone(),
                }),
            }
        };
        // Drop (and join) a finished earlier migration first.
        self.migration = None;
        let m = Migration::start(ctx, req)
            .map_err(|e| ApiError::new(500, format!("cannot start the migration thread: {e}")))?;
        let status = m.status();
        self.migration = Some(m);
        Ok(serde_json::to_value(status).unwrap_or(serde_json::Value::Null))
    }

    /// Pauses the guest (if running), writes a snapshot of it into `dir`,
    /// and leaves it paused. On failure a running guest is resumed.
    fn snapshot(&mut self, dir: &Path) -> ApiReply {
        let t0 = Instant::now();
        let was_paused = self.control.is_paused();
        self.control
            .pause()
            .map_err(|e| ApiError::new(500, e.to_string()))?;
        let paused_at = t0.elapsed();
        let result = {
            let mut m = lock(&self.machine);
            m.save_state().and_then(|st| {
                snapshot::write_snapshot(dir, &st, &m.mem, m.memfd.as_deref())
                    .map_err(VmmError::from)
            })
        };
        match result {
            Ok(stats) => Ok(serde_json::json!({
                "dir": dir,
                "state": self.state(),
                "state_bytes": stats.state_bytes,
                "memory_bytes_written": stats.memory_bytes_written,
                "pause_ms": paused_at.as_secs_f64() * 1000.0,
                "total_ms": t0.elapsed().as_secs_f64() * 1000.0,
            })),
            Err(e) => {
                if !was_paused {
                    self.control.resume();
                }
                let status = match &e {
                    VmmError::Snapshot(SnapshotError::Io { source, .. })
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound
                                | std::io::ErrorKind::PermissionDenied
                                | std::io::ErrorKind::NotADirectory
                                | std::io::ErrorKind::AlreadyExists
                                | std::io::ErrorKind::ReadOnlyFilesystem
                        ) =>
                    {
                        400
                    }
                    _ => 500,
                };
                Err(ApiError::new(status, format!("snapshot not written: {e}")))
            }
        }
    }

    fn drain_api(&mut self) {
        let _ = self.api_evt.read();
        while let Ok(req) = self.api_rx.try_recv() {
            let reply = self.handle_api(req.action);
            let _ = req.reply.send(reply);
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
                self.stdin_open = false;
            }
            Ok(n) => {
                let serial = lock(&self.machine).serial.clone();
                let mut serial = lock(&serial);
                // The guest's FIFO may be full; drop what does not fit rather
                // than block the event loop.
                serial.enqueue_input(&buf[..n]);
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(self.exit.evt(), TOKEN_EXIT, EventSet::IN));
        let _ = ops.add(Events::with_data(
            &self.reset_evt,
            TOKEN_RESET,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data(&self.api_evt, TOKEN_API, EventSet::IN));
        if self.stdin_open {
            let _ = ops.add(Events::with_data_raw(
                libc::STDIN_FILENO,
                TOKEN_STDIN,
                EventSet::IN,
            ));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_EXIT => {
                let _ = self.exit.evt().read();
                if let Some(VmExit::Migrated { .. }) = self.exit.reason() {
                    // Keep answering GET /migration a moment, so that whoever
                    // drives the migration can read how it ended.
                    self.linger_until = Some(Instant::now() + MIGRATED_LINGER);
                } else {
                    self.done = true;
                }
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.exit.exit(VmExit::Reset);
                self.done = true;
            }
            TOKEN_API => self.drain_api(),
            TOKEN_STDIN => self.read_stdin(ops),
            _ => {}
        }
    }
}

/// A virtio-blk drive: its transport on the MMIO bus and the device behind it.
type Drive = (Arc<Mutex<MmioTransport>>, Arc<Mutex<Block>>);

/// Everything that makes up the running VM, as needed to save its state.
struct Machine {
    config: VmConfig,
    vm: Arc<Vm>,
    mem: GuestMemoryMmap,
    /// The memfd behind guest RAM (None when RAM maps a snapshot file).
    memfd: Option<Arc<File>>,
    /// The CPUID vCPU 0 was given, which a migration destination checks.
    guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    vcpus: Vec<Arc<Mutex<kvm_ioctls::VcpuFd>>>,
    serial: Arc<Mutex<SerialDevice>>,
    drives: Vec<Drive>,
    /// The MSRs this host lets us read, found on first use.
    msrs: Option<Vec<u32>>,
}

impl Machine {
    /// Completes every device request in flight. The vCPUs must be paused,
    /// so that no new ones come.
    fn quiesce(&self) -> Result<(), MachineError> {
        for (i, (_, block)) in self.drives.iter().enumerate() {
            lock(block)
                .process_queue()
                .map_err(|source| MachineError::Quiesce {
                    drive: self.config.drives[i].id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The whole VM state. The vCPUs must be paused.
    fn save_state(&mut self) -> Result<VmState, VmmError> {
        let msrs = match &self.msrs {
            Some(m) => m.clone(),
            None => {
                let m = state::saveable_msrs(self.vm.kvm(), &lock(&self.vcpus[0]))?;
                self.msrs = Some(m.clone());
                m
            }
        };
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| state::save_vcpu(i as u8, &lock(fd), &msrs))
            .collect::<Result<Vec<_>, _>>()?;
        let mut serial = lock(&self.serial);
        serial.flush();
        Ok(VmState {
            config: self.config.clone(),
            memory_size: self.config.memory_mib << 20,
            vm: state::save_vm(self.vm.fd())?,
            vcpus,
            serial: serial.state(),
            drives: self
                .drives
                .iter()
                .map(|(t, b)| DriveState {
                    transport: lock(t).state(),
                    block: lock(b).state(),
                })
                .collect(),
        })
    }
}

/// What a migration needs of the VMM, kept out of the migration module.
struct MachineHandle {
    machine: Arc<Mutex<Machine>>,
    exit: Arc<ExitSignal>,
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl MigratableVm for MachineHandle {
    fn quiesce(&self) -> Result<(), MachineError> {
        lock(&self.machine).quiesce()
    }

    fn save_state(&self) -> Result<VmState, MachineError> {
        lock(&self.machine)
            .save_state()
            .map_err(|e| MachineError::SaveState(Box::new(e)))
    }

    fn guest_cpuid(&self) -> Vec<kvm_bindings::kvm_cpuid_entry2> {
        self.cpuid.clone()
    }

    fn config(&self) -> VmConfig {
        lock(&self.machine).config.clone()
    }

    fn set_mirrors(&self, mirrors: Option<Vec<Arc<dyn WriteMirror>>>) {
        let m = lock(&self.machine);
        for (i, (_, block)) in m.drives.iter().enumerate() {
            lock(block).set_mirror(mirrors.as_ref().and_then(|v| v.get(i).cloned()));
        }
    }

    fn migrated(&self, destination: &str, downtime: Duration) {
        self.exit.exit(VmExit::Migrated {
            destination: destination.to_string(),
            downtime_ms: downtime.as_secs_f64() * 1000.0,
        });
    }
}

/// How the VM comes to life: booted from its kernel, restored from a
/// snapshot, or received from a migration source.
enum Boot {
    Fresh,
    Restore(Box<VmState>, File),
    Incoming(Box<Incoming>),
}

/// Builds the VM described by `config`, boots it, runs it, and returns how
/// it ended.
pub fn run(config: VmConfig, api_socket: Option<PathBuf>) -> Result<VmExit, VmmError> {
    config.create_missing_drives()?;
    run_vm(config, Boot::Fresh, api_socket, false)
}

/// Waits on `listen` for a migration, then runs the guest it brings.
/// With `start_paused`, the guest is taken over but kept paused until a
/// `PUT /vm/resume` (as QEMU's -S), e.g. to inspect its disks first.
pub fn receive(
    listen: &str,
    dir: Option<&Path>,
    api_socket: Option<PathBuf>,
    start_paused: bool,
) -> Result<VmExit, VmmError> {
    if let Some(d) = dir {
        if !d.is_dir() {
            return Err(VmmError::Receive(destination::DestinationError::Vm(
                format!("--dir {}: not a directory", d.display()),
            )));
        }
        destination::remove_leftovers(d);
    }
    let listener = destination::bind(listen).map_err(VmmError::Receive)?;
    eprintln!(
        "ferry: waiting for a migration on {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| listen.to_string())
    );
    let incoming = destination::accept_migration(&listener, dir).map_err(VmmError::Receive)?;
    drop(listener);
    let config = incoming.state.config.clone();
    run_vm(
        config,
        Boot::Incoming(Box::new(incoming)),
        api_socket,
        start_paused,
    )
}

/// Restores the snapshot in `dir` and runs the guest from where it was.
pub fn restore(dir: &Path, api_socket: Option<PathBuf>) -> Result<VmExit, VmmError> {
    let (state, memory) = snapshot::read_snapshot(dir)?;
    let config = state.config.clone();
    run_vm(
        config,
        Boot::Restore(Box::new(state), memory),
        api_socket,
        false,
    )
}

fn run_vm(
    config: VmConfig,
    boot: Boot,
    api_socket: Option<PathBuf>,
    start_paused: bool,
) -> Result<VmExit, VmmError> {
    let started = Instant::now();
    install_kick_handler()?;

    let mem_size = config.memory_mib << 20;
    let mut incoming = None;
    let mut saved_state = None;
    let (vm, memfd, mem, slots_registered) = match boot {
        Boot::Fresh => {
            let (fd, mem) = create_guest_memory(mem_size)?;
            (Vm::new()?, Some(fd), mem, false)
        }
        Boot::Restore(state, file) => {
            saved_state = Some(state);
            let mem = snapshot::memory::map_private(&file, mem_size).map_err(|source| {
                SnapshotError::Io {
                    path: PathBuf::from(snapshot::MEMORY_FILE),
                    source,
                }
            })?;
            (Vm::new()?, None, mem, false)
        }
        Boot::Incoming(inc) => {
            let destination::Incoming {
                stream,
                peer,
                hello,
                vm,
                memfd,
                mem,
                state,
                share_dir,
            } = *inc;
            saved_state = Some(Box::new(state));
            incoming = Some((stream, peer, hello, share_dir));
            (vm, Some(memfd), mem, true)
        }
    };
    let saved = saved_state.as_deref();

    // Registering the first memory slot costs this host's KVM several
    // milliseconds whatever the size; do it while the rest is built.
    let built = std::thread::scope(|scope| -> Result<_, VmmError> {
        let slots = scope.spawn(|| {
            if slots_registered {
                Ok(())
            } else {
                vm.set_memory(&mem, false)
            }
        });
        let built = (|| -> Result<_, VmmError> {
            let mut pio = Bus::new();
            let mut mmio = Bus::new();
            let mut event_manager =
                EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                    .map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;

            // Legacy devices.
            let serial_irq = eventfd()?;
            vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
            let out = serial_output(&config.serial, saved.is_some())?;
            let serial = match saved {
                None => SerialDevice::new(serial_irq, out),
                Some(st) => SerialDevice::from_state(&st.serial, serial_irq, out)
                    .map_err(VmmError::Serial)?,
            };
            let serial = Arc::new(Mutex::new(serial));
            pio.insert(serial.clone(), SERIAL_PORT, 8)?;
            let reset_evt = eventfd()?;
            let i8042 = Arc::new(Mutex::new(I8042::new(
                reset_evt.try_clone().map_err(VmmError::EventFd)?,
            )));
            pio.insert(i8042, I8042_PORT, 5)?;

            // virtio-blk drives, announced on the command line.
            let mut cmdline =
                Cmdline::try_from(&config.cmdline, CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?;
            let mut drives = Vec::with_capacity(config.drives.len());
            for (i, drive) in config.drives.iter().enumerate() {
                let drive_err = |source| VmmError::Drive {
                    id: drive.id.clone(),
                    source,
                };
                let block = match saved {
                    None => Block::new(drive.id.clone(), &drive.path, drive.read_only)
                        .map_err(drive_err)?,
                    Some(st) => Block::restore(&st.drives[i].block).map_err(drive_err)?,
                };
                let base = MMIO_DEVICES_START + i as u64 * MMIO_DEVICE_SIZE;
                let irq = FIRST_VIRTIO_IRQ + i as u32;
                for (q, evt) in block.queue_events().iter().enumerate() {
                    vm.register_mmio_ioevent(evt, base + VIRTIO_MMIO_QUEUE_NOTIFY, q as u32)?;
                }
                vm.register_irqfd(block.interrupt().evt(), irq)?;
                let block = Arc::new(Mutex::new(block));
                let mut transport = MmioTransport::new(mem.clone(), block.clone());
                if let Some(st) = saved {
                    transport
                        .restore(&st.drives[i].transport)
                        .map_err(|source| VmmError::Transport {
                            id: drive.id.clone(),
                            source,
                        })?;
                }
                let transport = Arc::new(Mutex::new(transport));
                mmio.insert(transport.clone(), base, MMIO_DEVICE_SIZE)?;
                event_manager.add_subscriber(block.clone());
                drives.push((transport, block));
                cmdline
                    .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
                    .map_err(VmmError::Cmdline)?;
            }

            // Boot state in guest memory (a restored guest has its own).
            let entry = match saved {
                None => {
                    regs::write_boot_tables(&mem)?;
                    mptable::setup_mptable(&mem, config.vcpus)?;
                    Some(boot::configure_linux_boot(
                        &mem,
                        mem_size,
                        &config.kernel,
                        config.initrd.as_deref(),
                        &cmdline,
                    )?)
                }
                Some(st) => {
                    state::restore_vm(vm.fd(), &st.vm)?;
                    None
                }
            };

            // vCPUs.
            let supported = vm.supported_cpuid()?;
            let mut vcpus = Vec::with_capacity(config.vcpus as usize);
            let mut guest_cpuid = Vec::new();
            for index in 0..config.vcpus {
                let fd = vm
                    .fd()
                    .create_vcpu(index as u64)
                    .map_err(|source| VcpuError::Create { index, source })?;
                match (saved, entry) {
                    (Some(st), _) => {
                        if index == 0 {
                            guest_cpuid = st.vcpus[0].cpuid.clone();
                        }
                        let refused = state::restore_vcpu(&fd, &st.vcpus[index as usize])?;
                        if !refused.is_empty() {
                            eprintln!(
                                "ferry: vCPU {index}: KVM refused to restore MSRs {:x?}; they keep this host's values",
                                refused
                            );
                        }
                    }
                    (None, Some(entry)) => {
                        let tsc_khz = fd.get_tsc_khz().ok();
                        let cpuid = cpuid::vcpu_cpuid(&supported, index, config.vcpus, tsc_khz)?;
                        if index == 0 {
                            guest_cpuid = cpuid.as_slice().to_vec();
                        }
                        fd.set_cpuid2(&cpuid)
                            .map_err(|source| regs::RegsError::Kvm {
                                op: "set",
                                what: "CPUID",
                                source,
                            })?;
                        regs::setup_msrs(&fd)?;
                        regs::setup_fpu(&fd)?;
                        regs::setup_regs(&fd, entry)?;
                        regs::setup_sregs(&fd)?;
                        regs::setup_lint(&fd)?;
                    }
                    (None, None) => {
                        return Err(VmmError::EventLoop(
                            "neither a kernel entry point nor a saved state to start from".into(),
                        ))
                    }
                }
                vcpus.push(Vcpu::new(index, fd));
            }

            Ok((
                pio,
                mmio,
                event_manager,
                serial,
                reset_evt,
                drives,
                vcpus,
                guest_cpuid,
            ))
        })();
        slots
            .join()
            .map_err(|_| VmmError::EventLoop("the memory slot thread panicked".into()))??;
        built
    })?;
    let (pio, mmio, mut event_manager, serial, reset_evt, drives, vcpus, guest_cpuid) = built;

    // Control socket.
    let (api_tx, api_rx) = mpsc::channel();
    let api_evt = eventfd()?;
    let _api_server: Option<ApiServer> = match &api_socket {
        Some(path) => Some(crate::api::start_api_server(
            path,
            api_tx,
            api_evt.try_clone().map_err(VmmError::EventFd)?,
        )?),
        None => None,
    };

    let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);
    let control = Arc::new(if start_paused {
        VcpuControl::new_paused()
    } else {
        VcpuControl::new()
    });
    let ctx = VcpuContext {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        control: control.clone(),
        exit: exit.clone(),
    };
    // SAFETY: isatty only inspects the descriptor.
    let interactive = unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } == 1;
    let machine = Machine {
        config,
        vm: Arc::new(vm),
        mem,
        memfd: memfd.map(Arc::new),
        guest_cpuid,
        vcpus: vcpus.iter().map(|v| v.fd.clone()).collect(),
        serial: serial.clone(),
        drives,
        msrs: None,
    };
    let controller = Arc::new(Mutex::new(Controller {
        exit: exit.clone(),
        reset_evt,
        api_evt,
        api_rx,
        control: control.clone(),
        handles: Vec::new(),
        machine: Arc::new(Mutex::new(machine)),
        migration: None,
        stdin_open: interactive,
        started,
        startup: Duration::ZERO,
        restored: saved.is_some(),
        done: false,
        linger_until: None,
    }));
    event_manager.add_subscriber(controller.clone());

    // A migrated guest runs only once the source has let go of it.
    if let Some((stream, _, _, share_dir)) = incoming.as_mut() {
        destination::ready_and_wait_go(stream)
            .map_err(|e| VmmError::Receive(destination::DestinationError::Protocol(e)))?;
        // From now on the guest runs on the copied files here.
        if let Some(d) = share_dir.as_mut() {
            d.keep();
        }
    }
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        handles.push(vcpu.start(ctx.clone())?);
    }
    {
        let mut c = lock(&controller);
        c.handles = handles;
        c.startup = crate::process_start().elapsed();
    }
    if let Some((stream, peer, hello, _)) = incoming.as_mut() {
        // The source waits for this to stop for good; if it never hears it,
        // it stays paused rather than run the guest twice.
        if let Err(e) = destination::confirm_resumed(stream) {
            eprintln!("ferry: could not confirm the resume to {peer}: {e}");
        }
        eprintln!(
            "ferry: migration {} from {peer} complete; the guest runs here",
            hello.migration_id
        );
    }

    let loop_result = loop {
        let lingering = lock(&controller).linger_until.is_some();
        if let Err(e) = event_manager.run_with_timeout(if lingering { 20 } else { -1 }) {
            break Err(VmmError::EventLoop(format!("{e:?}")));
        }
        let c = lock(&controller);
        if c.done || c.linger_until.is_some_and(|t| Instant::now() >= t) {
            break Ok(());
        }
    };

    let handles = std::mem::take(&mut lock(&controller).handles);
    let stop = control.stop(handles);
    lock(&serial).flush();
    loop_result?;
    stop?;
    Ok(exit
        .reason()
        .unwrap_or_else(|| VmExit::Error("the VM stopped for no known reason".into())))
}
