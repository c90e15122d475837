//! The running VM as state is saved from it: config, KVM VM and vCPUs,
//! memory, devices. Snapshots and migration both read it through here.

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::builder::{Drive, NetDev};
use super::VmmError;
use crate::config::VmConfig;
use crate::devices::i8042::I8042State;
use crate::devices::persist::Persist;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::{BlockWorker, WriteMirror};
use crate::migration::source::{MachineError, MigratableVm, SourceFiles};
use crate::snapshot::{DriveState, NetDeviceState, VmState};
use crate::util::lock;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::state;
use crate::vstate::vcpu::{ExitSignal, VmExit};
use crate::vstate::vm::Vm;

/// Everything that makes up the running VM, as needed to save its state.
pub struct Machine {
    pub config: VmConfig,
    pub vm: Arc<Vm>,
    pub mem: GuestMemoryMmap,
    /// The memfd behind guest RAM (None when RAM maps a snapshot file).
    pub memfd: Option<Arc<File>>,
    /// The CPUID vCPU 0 was given, which a migration destination checks.
    pub guest_cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// The CPUID set on each vCPU (what a snapshot saves).
    pub vcpu_cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub vcpus: Vec<Arc<Mutex<kvm_ioctls::VcpuFd>>>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub drives: Vec<Drive>,
    pub nets: Vec<NetDev>,
    /// One request thread per drive, from `start_block_workers` on.
    pub block_workers: Vec<BlockWorker>,
    /// The MSRs this host lets us read, found on first use.
    pub msrs: Option<Vec<u32>>,
    /// The kernel and initrd, kept open from set-up (None where they could
    /// not be opened then): a storage migration copies them through these
    /// after a privilege drop has closed the paths to us.
    pub kernel_file: Option<File>,
    pub initrd_file: Option<File>,
}

impl Machine {
    /// Completes every device request in flight. The vCPUs must be paused,
    /// so that no new ones come.
    pub fn quiesce(&self) -> Result<(), MachineError> {
        for (i, (_, block)) in self.drives.iter().enumerate() {
            lock(block)
                .process_queue()
                .map_err(|source| MachineError::Quiesce {
                    drive: self.config.drives[i].id.clone(),
                    source,
                })?;
        }
        for (i, (_, net)) in self.nets.iter().enumerate() {
            lock(net)
                .pause()
                .map_err(|source| MachineError::QuiesceNet {
                    net: self.config.net[i].id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Lets the net devices touch guest memory again (after [`quiesce`]).
    pub fn unpause_devices(&self) {
        for (_, net) in &self.nets {
            let mut net = lock(net);
            net.unpause();
            // A destination that got as far as building the guest has
            // announced it: take the address back.
            net.announce();
        }
    }

    /// Every net device announces the guest's address on its tap (the
    /// guest starts here after a migration or restore).
    pub fn announce(&self) {
        for (_, net) in &self.nets {
            lock(net).announce();
        }
    }

    /// Raises again every interrupt a restored device has pending (see
    /// [`crate::devices::virtio::MmioTransport::reraise_pending`]); the
    /// interrupt controllers must
    /// hold their restored state already.
    pub fn reraise_pending_interrupts(&self) {
        let transports = self
            .drives
            .iter()
            .map(|(t, _)| t)
            .chain(self.nets.iter().map(|(t, _)| t));
        for t in transports {
            if let Err(e) = lock(t).reraise_pending() {
                eprintln!("ferry: cannot raise a restored device's pending interrupt: {e}");
            }
        }
    }

    /// Starts serving every drive's requests on a thread of its own (so
    /// that a slow disk, or a write mirrored over the network, never holds
    /// up the event loop and with it the network devices).
    pub fn start_block_workers(&mut self) -> Result<(), VmmError> {
        if !self.block_workers.is_empty() {
            return Ok(());
        }
        for (i, (_, block)) in self.drives.iter().enumerate() {
            let worker = BlockWorker::start(block).map_err(|source| VmmError::Drive {
                id: self.config.drives[i].id.clone(),
                source,
            })?;
            self.block_workers.push(worker);
        }
        Ok(())
    }

    /// Takes every drive's image lock not held yet.
    pub fn lock_images(&self) -> Result<(), VmmError> {
        for (i, (_, block)) in self.drives.iter().enumerate() {
            lock(block).lock_image().map_err(|source| VmmError::Drive {
                id: self.config.drives[i].id.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// The whole VM state. The vCPUs must be paused.
    pub fn save_state(&mut self) -> Result<VmState, VmmError> {
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
            .map(|(i, fd)| {
                let cpuid = self.vcpu_cpuids.get(i).map_or(&[][..], Vec::as_slice);
                state::save_vcpu(i as u8, &lock(fd), cpuid, &msrs)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut serial = lock(&self.serial);
        serial.flush();
        Ok(VmState {
            config: self.config.clone(),
            memory_size: self.config.memory_mib << 20,
            vm: state::save_vm(self.vm.fd())?,
            vcpus,
            serial: serial.save(),
            i8042: I8042State {},
            drives: self
                .drives
                .iter()
                .map(|(t, b)| DriveState {
                    transport: lock(t).save(),
                    block: lock(b).save(),
                })
                .collect(),
            nets: self
                .nets
                .iter()
                .map(|(t, n)| {
                    // Frames that reached this host after the pause go
                    // with the state instead of being lost here. (The
                    // transport's save locks the device itself.)
                    let net = {
                        let mut n = lock(n);
                        let held = n.hold_queued();
                        if n.held_frames() > 0 {
                            eprintln!(
                                "ferry: net {}: {} frames carried in the state ({held} from \
                                 the tap)",
                                n.id(),
                                n.held_frames()
                            );
                        }
                        n.save()
                    };
                    NetDeviceState {
                        transport: lock(t).save(),
                        net,
                    }
                })
                .collect(),
        })
    }
}

/// What a migration needs of the VMM, kept out of the migration module.
pub struct MachineHandle {
    pub machine: Arc<Mutex<Machine>>,
    pub exit: Arc<ExitSignal>,
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

impl MigratableVm for MachineHandle {
    fn quiesce(&self) -> Result<(), MachineError> {
        lock(&self.machine).quiesce()
    }

    fn resume_devices(&self) {
        lock(&self.machine).unpause_devices()
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

    fn source_files(&self) -> SourceFiles {
        let m = lock(&self.machine);
        let dup = |f: &Option<File>| f.as_ref().and_then(|f| f.try_clone().ok());
        SourceFiles {
            kernel: dup(&m.kernel_file),
            initrd: dup(&m.initrd_file),
            drives: m
                .drives
                .iter()
                .map(|(_, block)| lock(block).image_file().ok())
                .collect(),
        }
    }

    fn release_images(&self) {
        let m = lock(&self.machine);
        for (_, block) in &m.drives {
            let mut b = lock(block);
            if let Err(e) = b.unlock_image() {
                // The lock goes with the process at the latest; the
                // destination then waits for nothing worse than that.
                eprintln!("ferry: {e}");
            }
        }
    }

    fn retake_images(&self) -> Result<(), MachineError> {
        let m = lock(&self.machine);
        for (i, (_, block)) in m.drives.iter().enumerate() {
            lock(block)
                .lock_image()
                .map_err(|source| MachineError::Lock {
                    drive: m.config.drives[i].id.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    fn migrated(&self, destination: &str, downtime: Duration) {
        self.exit.exit(VmExit::Migrated {
            destination: destination.to_string(),
            downtime_ms: downtime.as_secs_f64() * 1000.0,
        });
    }
}
