//! Builds a VM from its config, one step per device, in the style of
//! Firecracker's builder: memory, legacy devices, block devices, boot state,
//! vCPUs. The same steps build a fresh guest, a restored snapshot and a
//! received migration; the difference is whether a step starts a device anew
//! or rebuilds it from saved state (`Persist::restore`).

use std::fs::File;
use std::io::{LineWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use linux_loader::loader::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::VmmError;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::{boot, cpuid, mptable, regs};
use crate::config::{DriveConfig, NetConfig, SerialConfig, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::persist::Persist;
use crate::devices::serial::{SerialArgs, SerialDevice};
use crate::devices::virtio::mmio::NOTIFY_REG_OFFSET;
use crate::devices::virtio::net::parse_mac;
use crate::devices::virtio::{
    Block, BlockArgs, MmioArgs, MmioTransport, Net, NetArgs, Tap, VirtioDevice,
};
use crate::snapshot::{self, SnapshotError, VmState};
use crate::startup;
use crate::util::lock;
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::state;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::Vm;

pub type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// A virtio-blk drive: its transport on the MMIO bus and the device behind it.
pub type Drive = (Arc<Mutex<MmioTransport>>, Arc<Mutex<Block>>);
/// A virtio-net device: its transport on the MMIO bus and the device behind it.
pub type NetDev = (Arc<Mutex<MmioTransport>>, Arc<Mutex<Net>>);

/// How the VM comes to life.
pub enum Boot {
    /// Booted from its kernel.
    Fresh,
    /// From a snapshot: state, and the memory file mapped copy-on-write.
    Restore { state: Box<VmState>, memory: File },
    /// From a migration source: the VM and its memory were created (slots
    /// registered) before the memory arrived.
    Incoming {
        state: Box<VmState>,
        vm: Vm,
        memfd: File,
        mem: GuestMemoryMmap,
        /// The net devices' taps by id, opened at the handshake.
        taps: Vec<(String, Tap)>,
    },
}

/// A VM with all its devices, vCPUs created and set, nothing running yet.
pub struct BuiltVm {
    /// To be opened once nothing else can fail.
    pub serial_log: Option<SerialLog>,
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    /// The memfd behind guest RAM (None when RAM maps a snapshot file).
    pub memfd: Option<File>,
    pub pio: Bus,
    pub mmio: Bus,
    pub event_loop: EventLoop,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest resets the machine through the i8042.
    pub reset_evt: EventFd,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetDev>,
    pub vcpus: Vec<Vcpu>,
    /// The CPUID each vCPU was given (vCPU 0's is what a migration
    /// destination checks).
    pub vcpu_cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
}

/// Builds the VM `config` describes, from its kernel or from saved state.
pub fn build(config: &VmConfig, boot: Boot) -> Result<BuiltVm, VmmError> {
    let fresh = matches!(boot, Boot::Fresh);
    let lock_images = !matches!(boot, Boot::Incoming { .. });
    let mut boot = boot;
    let taps = match &mut boot {
        Boot::Incoming { taps, .. } => std::mem::take(taps),
        _ => Vec::new(),
    };
    let (vm, memfd, mem, saved, cpuid) = std::thread::scope(|scope| {
        // A fresh guest's CPUID starts from what the host supports; ask
        // for it while the VM and its memory are set up.
        let cpuid = fresh.then(|| scope.spawn(crate::vstate::vm::host_cpuid));
        let memory = guest_memory(config, boot);
        let cpuid = match cpuid.map(|t| t.join()) {
            None => None,
            Some(Ok(c)) => Some(c?),
            Some(Err(_)) => {
                return Err(VmmError::EventLoop(
                    "the thread asking KVM for CPUID panicked".into(),
                ))
            }
        };
        let (vm, memfd, mem, saved) = memory?;
        Ok((vm, memfd, mem, saved, cpuid))
    })?;
    startup::mark("vm-and-memory");
    let devices = build_devices(
        &vm,
        &mem,
        config,
        saved.as_deref(),
        cpuid,
        lock_images,
        taps,
    )?;
    Ok(BuiltVm {
        serial_log: devices.serial_log,
        vm,
        mem,
        memfd,
        pio: devices.pio,
        mmio: devices.mmio,
        event_loop: devices.event_loop,
        serial: devices.serial,
        reset_evt: devices.reset_evt,
        drives: devices.drives,
        nets: devices.nets,
        vcpus: devices.vcpus,
        vcpu_cpuids: devices.vcpu_cpuids,
    })
}

type Memory = (Vm, Option<File>, GuestMemoryMmap, Option<Box<VmState>>);

/// The VM and its RAM: a fresh memfd, the snapshot's memory file, or what a
/// migration brought (whose VM was made with its memory).
fn guest_memory(config: &VmConfig, boot: Boot) -> Result<Memory, VmmError> {
    let size = config.memory_mib << 20;
    Ok(match boot {
        Boot::Fresh => {
            let (fd, mem) = create_guest_memory(size)?;
            (Vm::new(&mem)?, Some(fd), mem, None)
        }
        Boot::Restore { state, memory } => {
            let mem = snapshot::memory::map_private(&memory, size).map_err(|source| {
                SnapshotError::Io {
                    path: PathBuf::from(snapshot::MEMORY_FILE),
                    source,
                }
            })?;
            (Vm::new(&mem)?, None, mem, Some(state))
        }
        Boot::Incoming {
            state,
            vm,
            memfd,
            mem,
            taps: _,
        } => (vm, Some(memfd), mem, Some(state)),
    })
}

/// Everything the VM has besides its memory.
struct Devices {
    serial_log: Option<SerialLog>,
    pio: Bus,
    mmio: Bus,
    event_loop: EventLoop,
    serial: Arc<Mutex<SerialDevice>>,
    reset_evt: EventFd,
    drives: Vec<Drive>,
    nets: Vec<NetDev>,
    vcpus: Vec<Vcpu>,
    vcpu_cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
}

fn build_devices(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    saved: Option<&VmState>,
    supported_cpuid: Option<kvm_bindings::CpuId>,
    lock_images: bool,
    taps: Vec<(String, Tap)>,
) -> Result<Devices, VmmError> {
    let mut b = Builder {
        supported_cpuid,
        vm,
        mem,
        config,
        saved,
        pio: Bus::new(),
        mmio: Bus::new(),
        event_loop: EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?,
        cmdline: Cmdline::try_from(&config.cmdline, CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?,
        lock_images,
        serial_log: None,
        taps,
    };
    startup::mark("event-loop");
    let serial = b.attach_serial()?;
    startup::mark("serial");
    let reset_evt = b.attach_i8042()?;
    let drives = b.attach_block_devices()?;
    startup::mark("drives");
    let nets = b.attach_net_devices()?;
    let entry = b.boot_state()?;
    startup::mark("boot-state");
    let (vcpus, vcpu_cpuids) = b.create_vcpus(entry)?;
    startup::mark("vcpus");
    Ok(Devices {
        serial_log: b.serial_log,
        pio: b.pio,
        mmio: b.mmio,
        event_loop: b.event_loop,
        serial,
        reset_evt,
        drives,
        nets,
        vcpus,
        vcpu_cpuids,
    })
}

/// What the steps share while the VM is put together.
struct Builder<'a> {
    vm: &'a Vm,
    mem: &'a GuestMemoryMmap,
    config: &'a VmConfig,
    /// The state to rebuild from (snapshot or migration), if any.
    saved: Option<&'a VmState>,
    /// Taps opened before the build (a migration's destination), by id.
    taps: Vec<(String, Tap)>,
    /// What the host supports, for a fresh guest's CPUID.
    supported_cpuid: Option<kvm_bindings::CpuId>,
    pio: Bus,
    mmio: Bus,
    event_loop: EventLoop,
    /// The guest's command line, to which each virtio device is added.
    cmdline: Cmdline,
    /// Whether drive images are locked as they are opened. A received guest
    /// locks them when it starts: on shared storage the source holds the
    /// locks until the hand-over.
    lock_images: bool,
    serial_log: Option<SerialLog>,
}

fn eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)
}

/// The guest's console log file, opened only once the VM is known good, so
/// that a start that fails leaves an earlier log as it was. A restored
/// guest appends: its earlier output is part of the same story.
pub struct SerialLog {
    path: PathBuf,
    append: bool,
    slot: Arc<Mutex<Option<LineWriter<File>>>>,
}

impl SerialLog {
    /// Creates or truncates (appends to, for a saved guest) the log; from
    /// here on the UART writes to it.
    pub fn open(self) -> Result<(), VmmError> {
        // The console carries guest data: for this host's owner only.
        let f = std::fs::OpenOptions::new()
            .create(true)
            .mode(0o600)
            .write(true)
            .append(self.append)
            .truncate(!self.append)
            .open(&self.path)
            .map_err(|source| VmmError::SerialFile {
                path: self.path.display().to_string(),
                source,
            })?;
        *lock(&self.slot) = Some(LineWriter::new(f));
        Ok(())
    }
}

/// What the UART writes into until its log is open: no vCPU runs before.
struct LogSlot(Arc<Mutex<Option<LineWriter<File>>>>);

impl Write for LogSlot {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match lock(&self.0).as_mut() {
            Some(f) => f.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match lock(&self.0).as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Where the guest's console goes; a log file is opened later
/// ([`SerialLog::open`]).
fn serial_output(cfg: &SerialConfig, append: bool) -> (Box<dyn Write + Send>, Option<SerialLog>) {
    match cfg {
        SerialConfig::Stdout => (Box::new(std::io::stdout()), None),
        SerialConfig::File(path) => {
            let slot = Arc::new(Mutex::new(None));
            let log = SerialLog {
                path: path.clone(),
                append,
                slot: slot.clone(),
            };
            (Box::new(LogSlot(slot)), Some(log))
        }
    }
}

impl Builder<'_> {
    /// The 16550 at COM1, its interrupt on an irqfd.
    fn attach_serial(&mut self) -> Result<Arc<Mutex<SerialDevice>>, VmmError> {
        let irq = eventfd()?;
        self.vm.register_irqfd(&irq, SERIAL_IRQ)?;
        let (out, log) = serial_output(&self.config.serial, self.saved.is_some());
        self.serial_log = log;
        let serial = match self.saved {
            None => SerialDevice::new(irq, out)?,
            Some(st) => SerialDevice::restore(SerialArgs { irq, out }, &st.serial)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.pio.insert(serial.clone(), SERIAL_PORT, 8)?;
        // Its timer writes out a line the guest has not finished.
        self.event_loop.add_subscriber(serial.clone());
        Ok(serial)
    }

    /// The i8042, only for the guest's reset; returns the reset event.
    fn attach_i8042(&mut self) -> Result<EventFd, VmmError> {
        let reset_evt = eventfd()?;
        let evt = reset_evt.try_clone().map_err(VmmError::EventFd)?;
        let i8042 = match self.saved {
            None => I8042::new(evt),
            Some(st) => {
                let Ok(dev) = I8042::restore(evt, &st.i8042);
                dev
            }
        };
        self.pio
            .insert(Arc::new(Mutex::new(i8042)), I8042_PORT, 5)?;
        Ok(reset_evt)
    }

    fn attach_block_devices(&mut self) -> Result<Vec<Drive>, VmmError> {
        let config = self.config;
        config
            .drives
            .iter()
            .enumerate()
            .map(|(i, drive)| self.attach_block_device(i, drive))
            .collect()
    }

    /// A virtio-blk drive in the `index`th virtio-mmio window: ioeventfd on
    /// its queue, irqfd on its line, announced on the command line. The image
    /// is always the config's path: saved state never names one.
    fn attach_block_device(
        &mut self,
        index: usize,
        drive: &DriveConfig,
    ) -> Result<Drive, VmmError> {
        let drive_err = |source| VmmError::Drive {
            id: drive.id.clone(),
            source,
        };
        let args = BlockArgs {
            id: drive.id.clone(),
            path: drive.path.clone(),
            read_only: drive.read_only,
        };
        let saved = self.saved.map(|st| &st.drives[index]);
        let mut block = match saved {
            None => Block::open_unlocked(args.id, &args.path, args.read_only),
            Some(st) => Block::restore(args, &st.block),
        }
        .map_err(drive_err)?;
        if self.lock_images {
            block.lock_image().map_err(drive_err)?;
        }
        let base = MMIO_DEVICES_START + index as u64 * MMIO_DEVICE_SIZE;
        let irq = FIRST_VIRTIO_IRQ + index as u32;
        for (q, evt) in block.queue_events().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + NOTIFY_REG_OFFSET, q as u32)?;
        }
        self.vm.register_irqfd(block.interrupt().evt(), irq)?;
        let block = Arc::new(Mutex::new(block));
        let args = MmioArgs {
            mem: self.mem.clone(),
            device: block.clone(),
        };
        let transport = match saved {
            None => MmioTransport::new(args.mem, args.device),
            Some(st) => MmioTransport::restore(args, &st.transport).map_err(|source| {
                VmmError::Transport {
                    id: drive.id.clone(),
                    source,
                }
            })?,
        };
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_DEVICE_SIZE)?;
        // Its requests are served on its own thread once the guest starts
        // (`Machine::start_block_workers`), not on the event loop.
        self.cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
            .map_err(VmmError::Cmdline)?;
        Ok((transport, block))
    }

    fn attach_net_devices(&mut self) -> Result<Vec<NetDev>, VmmError> {
        let config = self.config;
        if let Some(st) = self.saved {
            if st.nets.len() != config.net.len() {
                return Err(VmmError::EventLoop(format!(
                    "the saved state has {} net devices, its config {}",
                    st.nets.len(),
                    config.net.len()
                )));
            }
        }
        config
            .net
            .iter()
            .enumerate()
            .map(|(i, net)| self.attach_net_device(config.drives.len() + i, i, net))
            .collect()
    }

    /// A virtio-net device in the `slot`th virtio-mmio window, after the
    /// drives: ioeventfds on its two queues, irqfd on its line, announced on
    /// the command line. The tap is always the config's: saved state never
    /// names one.
    fn attach_net_device(
        &mut self,
        slot: usize,
        index: usize,
        cfg: &NetConfig,
    ) -> Result<NetDev, VmmError> {
        let net_err = |source| VmmError::Net {
            id: cfg.id.clone(),
            source,
        };
        let args = NetArgs {
            id: cfg.id.clone(),
            tap: cfg.tap.clone(),
        };
        let saved = self.saved.map(|st| &st.nets[index]);
        let net = match saved {
            None => {
                let mac = cfg.mac.as_deref().map(parse_mac).transpose();
                let mac = mac.map_err(|why| {
                    VmmError::EventLoop(format!("net device {}: mac: {why}", cfg.id))
                })?;
                let mac = match mac {
                    Some(m) => m,
                    None => crate::devices::virtio::net::random_mac().map_err(VmmError::EventFd)?,
                };
                Net::new(args.id, &args.tap, mac)
            }
            Some(st) => match self.taps.iter().position(|(id, _)| *id == args.id) {
                Some(i) => Net::restore_on(self.taps.remove(i).1, args.id, &st.net),
                None => Net::restore(args, &st.net),
            },
        }
        .map_err(net_err)?;
        let base = MMIO_DEVICES_START + slot as u64 * MMIO_DEVICE_SIZE;
        let irq = FIRST_VIRTIO_IRQ + slot as u32;
        for (q, evt) in net.queue_events().iter().enumerate() {
            self.vm
                .register_mmio_ioevent(evt, base + NOTIFY_REG_OFFSET, q as u32)?;
        }
        self.vm.register_irqfd(net.interrupt().evt(), irq)?;
        let net = Arc::new(Mutex::new(net));
        let args = MmioArgs {
            mem: self.mem.clone(),
            device: net.clone(),
        };
        let transport = match saved {
            None => MmioTransport::new(args.mem, args.device),
            Some(st) => {
                let state = crate::devices::virtio::net::upgrade_transport_state(&st.transport);
                MmioTransport::restore(args, &state).map_err(|source| VmmError::Transport {
                    id: cfg.id.clone(),
                    source,
                })?
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_DEVICE_SIZE)?;
        self.event_loop.add_subscriber(net.clone());
        self.cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(base), irq, None)
            .map_err(VmmError::Cmdline)?;
        Ok((transport, net))
    }

    /// A fresh guest gets its boot tables and kernel in memory and returns
    /// the kernel's entry; a saved one gets its interrupt controllers, PIT
    /// and clock back (its memory already holds the rest).
    fn boot_state(&mut self) -> Result<Option<u64>, VmmError> {
        match self.saved {
            None => {
                regs::write_boot_tables(self.mem)?;
                mptable::setup_mptable(self.mem, self.config.vcpus)?;
                Ok(Some(boot::configure_linux_boot(
                    self.mem,
                    self.config.memory_mib << 20,
                    &self.config.kernel,
                    self.config.initrd.as_deref(),
                    &self.cmdline,
                )?))
            }
            Some(st) => {
                state::restore_vm(self.vm.fd(), &st.vm)?;
                Ok(None)
            }
        }
    }

    /// Creates every vCPU, set for boot at `entry` or restored from state.
    /// Returns them with the CPUID each was set.
    fn create_vcpus(
        &mut self,
        entry: Option<u64>,
    ) -> Result<(Vec<Vcpu>, Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>), VmmError> {
        let supported = match self.supported_cpuid.take() {
            Some(c) => c,
            None => self.vm.supported_cpuid()?,
        };
        let count = self.config.vcpus;
        let mut vcpus = Vec::with_capacity(count as usize);
        let mut cpuids = Vec::with_capacity(count as usize);
        for index in 0..count {
            let fd = self
                .vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(|source| VcpuError::Create { index, source })?;
            let cpuid = match (self.saved, entry) {
                (Some(st), _) => restore_vcpu(&fd, index, st)?,
                (None, Some(entry)) => configure_vcpu(&fd, index, count, &supported, entry)?,
                (None, None) => {
                    return Err(VmmError::EventLoop(
                        "neither a kernel entry point nor a saved state to start from".into(),
                    ))
                }
            };
            cpuids.push(cpuid);
            vcpus.push(Vcpu::new(index, fd));
        }
        Ok((vcpus, cpuids))
    }
}

/// Sets a vCPU up for the 64-bit Linux boot protocol; returns its CPUID.
fn configure_vcpu(
    fd: &kvm_ioctls::VcpuFd,
    index: u8,
    count: u8,
    supported: &kvm_bindings::CpuId,
    entry: u64,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VmmError> {
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = cpuid::vcpu_cpuid(supported, index, count, tsc_khz)?;
    fd.set_cpuid2(&cpuid)
        .map_err(|source| regs::RegsError::Kvm {
            op: "set",
            what: "CPUID",
            source,
        })?;
    regs::setup_msrs(fd)?;
    regs::setup_fpu(fd)?;
    regs::setup_regs(fd, entry)?;
    regs::setup_sregs(fd)?;
    regs::setup_lint(fd)?;
    Ok(cpuid.as_slice().to_vec())
}

/// Puts a vCPU back into its saved state; returns the CPUID it had.
fn restore_vcpu(
    fd: &kvm_ioctls::VcpuFd,
    index: u8,
    saved: &VmState,
) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>, VmmError> {
    let st = &saved.vcpus[index as usize];
    let refused = state::restore_vcpu(fd, st)?;
    if !refused.is_empty() {
        eprintln!(
            "ferry: vCPU {index}: KVM refused to restore MSRs {refused:x?}; they keep this host's values"
        );
    }
    Ok(st.cpuid.clone())
}
