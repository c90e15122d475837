//! The Vmm: builds the VM from a config (`builder`), keeps what state is
//! saved from (`machine`), and runs the event loop (`controller`: device
//! queues, console input, the control socket) until the guest or a request
//! ends it. A VM is booted, restored from a snapshot, or received from a
//! migration; all three are the same three steps: build, start, run.

mod builder;
mod controller;
mod machine;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiServer;
use crate::arch::x86_64::{boot, cpuid, mptable, regs};
use crate::config::VmConfig;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::BlockError;
use crate::migration::destination::{self, DirLock, ReceivePolicy, Received, Receiver};
use crate::snapshot::{self, SnapshotError};
use crate::util::lock;
pub use crate::vstate::vcpu::VmExit;
use crate::vstate::vcpu::{install_kick_handler, ExitSignal, Vcpu, VcpuContext, VcpuControl};
use builder::{Boot, EventLoop};
use controller::Controller;
pub use controller::RunState;
use machine::Machine;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("confining the process: {0}")]
    Security(#[from] crate::security::SecurityError),
    #[error("migration: {0}")]
    Receive(#[from] destination::DestinationError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("VM state: {0}")]
    State(#[from] crate::vstate::state::StateError),
    #[error("device {id}: cannot restore its virtio transport: {source}")]
    Transport {
        id: String,
        source: crate::devices::virtio::mmio::MmioError,
    },
    #[error("serial: {0}")]
    Serial(#[from] crate::devices::serial::SerialError),
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
    #[error("net device {id}: {source}")]
    Net {
        id: String,
        source: crate::devices::virtio::net::NetError,
    },
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
            VmmError::Security(crate::security::SecurityError::Jail(_)) => true,
            VmmError::Snapshot(e) => e.is_bad_input(),
            VmmError::Receive(
                destination::DestinationError::NotADirectory(_)
                | destination::DestinationError::SharedRoot { .. },
            ) => true,
            VmmError::Boot(e) => !matches!(e, boot::BootError::BootParams(_)),
            VmmError::Net { source, .. } => matches!(
                source,
                crate::devices::virtio::net::NetError::Tap { .. }
                    | crate::devices::virtio::net::NetError::TapName(_)
            ),
            VmmError::Drive { source, .. } => matches!(
                source,
                BlockError::Open { .. }
                    | BlockError::Locked { .. }
                    | BlockError::NotRegularFile(_)
                    | BlockError::UnalignedSize { .. }
            ),
            _ => false,
        }
    }
}

/// Builds the VM described by `config`, boots it, runs it, and returns how
/// it ended.
pub fn run(config: VmConfig, api_socket: Option<PathBuf>) -> Result<VmExit, VmmError> {
    // A start that fails leaves no image behind it created: they are new
    // (never a user's file), so removing them loses nothing.
    let created = config.create_missing_drives()?;
    let built = Vmm::build(config, Boot::Fresh, api_socket.as_deref(), false);
    let mut vmm = built.inspect_err(|_| {
        for path in &created {
            let _ = std::fs::remove_file(path);
        }
    })?;
    vmm.start()?;
    vmm.run()
}

/// Restores the snapshot in `dir` and runs the guest from where it was.
pub fn restore(dir: &Path, api_socket: Option<PathBuf>) -> Result<VmExit, VmmError> {
    let (state, memory) = snapshot::read_snapshot(dir)?;
    crate::startup::mark("snapshot-read");
    let config = state.config.clone();
    let boot = Boot::Restore {
        state: Box::new(state),
        memory,
    };
    let mut vmm = Vmm::build(config, boot, api_socket.as_deref(), false)?;
    vmm.start()?;
    vmm.run()
}

/// Waits on `listen` for a migration, then runs the guest it brings.
/// With `start_paused`, the guest is taken over but kept paused until a
/// `PUT /vm/resume` (as QEMU's -S), e.g. to inspect its disks first.
/// `policy` is what this host decides whatever the source sends: where the
/// console goes, which shared files the guest may use.
pub fn receive(
    listen: &str,
    dir: Option<&Path>,
    api_socket: Option<PathBuf>,
    start_paused: bool,
    policy: ReceivePolicy,
    security: crate::migration::transport::Security,
    allow_clients: Vec<rustls::pki_types::ServerName<'static>>,
) -> Result<VmExit, VmmError> {
    // A received guest's VM is created after the privilege drop.
    crate::security::preopen_kvm()?;
    let receiver = Receiver::bind(listen, dir, security, allow_clients)?.with_policy(policy)?;
    crate::security::confine_process()?;
    // What a receive creates later, as the user it may have become.
    if let Some(dir) = dir {
        crate::security::privileges::check_writable("--dir", dir)?;
    }
    if let Some(parent) = api_socket.as_deref().and_then(Path::parent) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        crate::security::privileges::check_writable("--api-sock's directory", parent)?;
    }
    eprintln!(
        "ferry: waiting for a migration on {}",
        receiver
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| listen.to_string())
    );
    let mut incoming = receiver.accept()?;
    drop(receiver);
    incoming.receive()?;
    let build = |r: Received| {
        let config = r.state.config.clone();
        let boot = Boot::Incoming {
            state: Box::new(r.state),
            vm: r.vm,
            memfd: r.memfd,
            mem: r.mem,
            taps: r.taps,
        };
        let mut vmm = Vmm::build(config, boot, api_socket.as_deref(), start_paused)?;
        vmm._dir_lock = r.dir_lock;
        // The source is paused and has sent everything: from now on frames
        // for the guest had better queue on this host's taps, to be
        // delivered when it runs here, than reach the paused source and be
        // lost. Should the source resume after all, it announces itself
        // back.
        {
            let c = lock(&vmm.controller);
            lock(&c.machine).announce();
        }
        // Issue 10: the main thread is the guest's event loop from here on;
        // it narrows itself before the source is told to let go, so that a
        // list that cannot go in refuses the migration (the guest runs on
        // at the source) rather than stop the guest once it is here.
        crate::security::seccomp::narrow_when_confined(crate::security::ThreadFilter::EventLoop)?;
        Ok::<_, VmmError>(vmm)
    };
    let vmm = incoming.hand_over(build, Vmm::start)?;
    vmm.run()
}

/// A built VM: devices, vCPUs, the control socket and the event loop.
struct Vmm {
    event_loop: EventLoop,
    controller: Arc<Mutex<Controller>>,
    /// Created and set, until `start` runs them.
    vcpus: Vec<Vcpu>,
    vcpu_ctx: VcpuContext,
    control: Arc<VcpuControl>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    /// Removes the socket file when dropped.
    _api_server: Option<ApiServer>,
    /// A received guest's hold on the directory of its copied files.
    _dir_lock: Option<DirLock>,
}

impl Vmm {
    /// Builds the VM and its control socket; nothing runs yet.
    fn build(
        config: VmConfig,
        boot: Boot,
        api_socket: Option<&Path>,
        start_paused: bool,
    ) -> Result<Vmm, VmmError> {
        let started = Instant::now();
        install_kick_handler()?;
        let restored = !matches!(boot, Boot::Fresh);
        let mut config = config;
        if !restored {
            // Chosen once: snapshots and migrations carry it in the config.
            config.assign_macs().map_err(VmmError::EventFd)?;
        }
        // Issue 8, signals: installed before the control socket exists, so
        // that from here on SIGTERM/SIGINT take the normal exit path, which
        // removes it.
        let shutdown_signals = crate::signals::ShutdownSignals::install()
            .map_err(|e| VmmError::EventLoop(e.to_string()))?;

        // Issue 13: the control socket is bound before the VM is built, so a
        // client polling for it (a restore's caller, say) connects at once
        // and its request waits in the channel for the event loop's first
        // turn, instead of retrying until the socket appears. Should the
        // build fail, dropping the server removes the socket again.
        let (api_tx, api_rx) = mpsc::channel();
        let api_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        let api_server = match api_socket {
            Some(path) => Some(crate::api::start_api_server(
                path,
                api_tx,
                api_evt.try_clone().map_err(VmmError::EventFd)?,
            )?),
            None => None,
        };
        crate::startup::mark("api-socket");

        let mut built = builder::build(&config, boot)?;
        // Opened now, while we may (before any privilege drop), for a later
        // storage migration to copy; a restore that cannot open them loses
        // nothing but falls back to the path then.
        let kernel_file = std::fs::File::open(&config.kernel).ok();
        let initrd_file = config
            .initrd
            .as_ref()
            .and_then(|p| std::fs::File::open(p).ok());
        // The last step that touches the host: nothing fails after it.
        if let Some(log) = built.serial_log.take() {
            log.open()?;
        }
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);
        let control = Arc::new(if start_paused {
            VcpuControl::new_paused()
        } else {
            VcpuControl::new()
        });
        let vcpu_ctx = VcpuContext {
            pio: Arc::new(std::mem::take(&mut built.pio)),
            mmio: Arc::new(std::mem::take(&mut built.mmio)),
            control: control.clone(),
            exit: exit.clone(),
        };
        let machine = Machine {
            config,
            vm: Arc::new(built.vm),
            mem: built.mem,
            memfd: built.memfd.map(Arc::new),
            guest_cpuid: built.vcpu_cpuids.first().cloned().unwrap_or_default(),
            vcpu_cpuids: built.vcpu_cpuids,
            vcpus: built.vcpus.iter().map(|v| v.fd.clone()).collect(),
            serial: built.serial.clone(),
            drives: built.drives,
            nets: built.nets,
            block_workers: Vec::new(),
            msrs: None,
            kernel_file,
            initrd_file,
        };
        // SAFETY: isatty only inspects the descriptor.
        let interactive = unsafe { libc::isatty(std::io::stdin().as_raw_fd()) } == 1;
        let controller = Arc::new(Mutex::new(Controller {
            exit: exit.clone(),
            reset_evt: built.reset_evt,
            api_evt,
            api_rx,
            control: control.clone(),
            handles: Vec::new(),
            machine: Arc::new(Mutex::new(machine)),
            migration: None,
            stdin_open: interactive,
            started,
            startup: Duration::ZERO,
            restored,
            done: false,
            linger_until: None,
        }));
        built.event_loop.add_subscriber(controller.clone());
        // Issue 8, signals: handled like ApiAction::Shutdown.
        built.event_loop.add_subscriber(Arc::new(Mutex::new(
            shutdown_signals.into_subscriber(exit.clone()),
        )));
        Ok(Vmm {
            event_loop: built.event_loop,
            controller,
            vcpus: built.vcpus,
            vcpu_ctx,
            control,
            exit,
            serial: built.serial,
            _api_server: api_server,
            _dir_lock: None,
        })
    }

    /// Starts the vCPU threads (paused ones wait for a resume). A received
    /// guest takes its image locks here, once its source has let go of them.
    fn start(&mut self) -> Result<(), VmmError> {
        {
            let c = lock(&self.controller);
            lock(&c.machine).lock_images()?;
        }
        // Set-up is done: drop privileges and filter every thread before
        // the guest runs (a receive has done so before accepting).
        crate::security::confine_process()?;
        {
            let c = lock(&self.controller);
            let mut machine = lock(&c.machine);
            machine.start_block_workers()?;
            if c.restored {
                machine.reraise_pending_interrupts();
            }
        }
        let mut handles = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus.drain(..) {
            handles.push(vcpu.start(self.vcpu_ctx.clone())?);
        }
        let mut c = lock(&self.controller);
        if c.restored {
            // The guest may be on another port of the network now.
            lock(&c.machine).announce();
        }
        c.handles = handles;
        c.startup = crate::process_start().elapsed();
        crate::startup::mark("vcpus-started");
        crate::startup::report();
        Ok(())
    }

    /// Runs the event loop until the guest or a request ends the VM, then
    /// stops the vCPUs and says how it ended.
    fn run(mut self) -> Result<VmExit, VmmError> {
        crate::startup::mark("event-loop-runs");
        crate::startup::report();
        // Issue 10: the event loop narrows itself once set-up is done (a
        // receive's already has, before its hand-over); it still starts the
        // migration thread, whose list it holds.
        let narrowed = crate::security::seccomp::narrow_when_confined(
            crate::security::ThreadFilter::EventLoop,
        );
        let loop_result = if let Err(e) = narrowed {
            Err(VmmError::Security(e))
        } else {
            self.turn_until_done()
        };
        let handles = std::mem::take(&mut lock(&self.controller).handles);
        let stop = self.control.stop(handles);
        lock(&self.serial).flush();
        loop_result?;
        stop?;
        Ok(self
            .exit
            .reason()
            .unwrap_or_else(|| VmExit::Error("the VM stopped for no known reason".into())))
    }

    /// Turns the event loop until the guest or a request ends the VM.
    fn turn_until_done(&mut self) -> Result<(), VmmError> {
        loop {
            let lingering = lock(&self.controller).linger_until.is_some();
            let timeout = if lingering { 20 } else { -1 };
            if let Err(e) = self.event_loop.run_with_timeout(timeout) {
                break Err(VmmError::EventLoop(format!("{e:?}")));
            }
            let c = lock(&self.controller);
            if c.done || c.linger_until.is_some_and(|t| Instant::now() >= t) {
                break Ok(());
            }
        }
    }
}
