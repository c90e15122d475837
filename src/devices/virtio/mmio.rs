//! The virtio-mmio transport, modern interface (version 2) only.
//!
//! Register map: virtio 1.2 spec, section 4.2.2. All registers below 0x100
//! are 32 bits wide and must be accessed with aligned 4-byte accesses; the
//! device configuration space starts at 0x100.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;

use super::{
    ActivateError, GuestErrorLog, GuestMemoryMmap, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_INT_CONFIG, VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;
use crate::devices::persist::Persist;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
pub const MMIO_VERSION: u32 = 2;
/// "FRRY" in little endian.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FRRY");
/// Size of the MMIO window each transport needs on the bus.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify: register each queue event as an ioeventfd at
/// `base + NOTIFY_REG_OFFSET`, 4 bytes, datamatch = queue index.
pub const NOTIFY_REG_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

const STATUS_DRIVER_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("saved state is for device type {saved}, this transport carries type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("saved state has {saved} queue(s), the device has {actual}")]
    QueueCount { saved: usize, actual: usize },
    #[error("saved queue {index} has maximum size {saved}, the device offers {actual}")]
    QueueMaxSize {
        index: usize,
        saved: u16,
        actual: u16,
    },
    #[error("saved queue {index} is invalid: {source}")]
    InvalidQueue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("saved driver features {acked:#x} are not a subset of the device's {avail:#x}")]
    Features { acked: u64, avail: u64 },
    #[error("cannot re-activate the device: {0}")]
    Activate(#[source] ActivateError),
}

/// The ring configuration and position of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Everything the guest can observe of a transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub device_status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// The features the driver wrote (final once FEATURES_OK is set).
    pub acked_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueSnapshot>,
    pub interrupt_status: u32,
    pub config_generation: u32,
}

/// A virtio-mmio transport in front of one device; insert it on the MMIO bus
/// with length `MMIO_LEN`.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    irq: Arc<IrqTrigger>,
    device_type: u32,
    avail_features: u64,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The queues as the driver configured them. Once the device is
    /// activated it owns copies of these and the ring positions move there.
    queues: Vec<Queue>,
    config_generation: u32,
    shm_sel: u32,
    log: GuestErrorLog,
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    // A panic elsewhere while holding the device must not take the vCPU
    // thread down with it; the device state is still usable for a reset.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

fn copy_queue(q: &Queue) -> Queue {
    // A queue is rebuilt from its own state, which it validated when it was
    // set, so this cannot fail; `Queue` is not `Clone`.
    Queue::try_from(q.state()).unwrap_or_default()
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let (device_type, avail_features, max_sizes, irq) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
                d.interrupt().clone(),
            )
        };
        let mut log = GuestErrorLog::new("virtio-mmio");
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(i, &max)| {
                Queue::new(max).unwrap_or_else(|e| {
                    // QueueNumMax reads 0 for this queue: the driver sees it
                    // as unavailable.
                    log.log(format_args!(
                        "device type {device_type} queue {i} max size {max}: {e}"
                    ));
                    Queue::default()
                })
            })
            .collect();
        MmioTransport {
            mem,
            device,
            irq,
            device_type,
            avail_features,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            shm_sel: 0,
            log,
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Current Status register.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    /// Raises the interrupt again if InterruptStatus says one is pending;
    /// returns whether it did. For a restored guest, once its interrupt
    /// controller state is in place: an interrupt raised while the guest
    /// paused (irqfd injects asynchronously) may be in the saved status but
    /// not in the saved irqchip, and a driver that waits for it would wait
    /// for the next event. A second interrupt for the same status is
    /// harmless: the driver reads the status and finds it handled.
    pub fn reraise_pending(&self) -> std::io::Result<bool> {
        if self.irq.status() == 0 || self.device_status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return Ok(false);
        }
        self.irq.evt().write(1)?;
        Ok(true)
    }

    /// Announces a device-initiated configuration change to the driver.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.device_status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if let Err(e) = self.irq.trigger(VIRTIO_INT_CONFIG) {
                self.log
                    .log(format_args!("cannot raise config interrupt: {e}"));
            }
        }
    }

    fn has(&self, bits: u32) -> bool {
        self.device_status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only be written between FEATURES_OK and
    /// DRIVER_OK, and only while the queue is not live.
    fn queue_writable(&self) -> bool {
        self.has(VIRTIO_CONFIG_S_FEATURES_OK)
            && self.device_status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn reset(&mut self) {
        {
            let mut d = lock(&self.device);
            d.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.irq.set_status(0);
    }

    fn features_acceptable(&mut self) -> bool {
        if self.driver_features & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            self.log.log(format_args!(
                "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported); refusing FEATURES_OK"
            ));
            return false;
        }
        let unknown = self.driver_features & !self.avail_features;
        if unknown != 0 {
            self.log.log(format_args!(
                "driver accepted features {unknown:#x} the device did not offer; refusing FEATURES_OK"
            ));
            return false;
        }
        true
    }

    /// Every queue the driver made ready fits in guest memory. A driver
    /// may leave queues it does not use unconfigured (virtio-net's control
    /// queue without CTRL_VQ); the device says which ones it needs.
    fn queues_valid(&self) -> bool {
        self.queues
            .iter()
            .all(|q| q.max_size() == 0 || !q.ready() || q.is_valid(&self.mem))
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter_mut()
            .map(|q| {
                q.set_event_idx(event_idx);
                copy_queue(q)
            })
            .collect();
        lock(&self.device).activate(self.mem.clone(), queues)
    }

    fn fail_activation(&mut self, why: std::fmt::Arguments<'_>) {
        self.log.log(why);
        // The driver learns through DEVICE_NEEDS_RESET plus a config
        // interrupt (virtio 1.2, 2.1.2) instead of waiting forever.
        self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.irq.trigger(VIRTIO_INT_CONFIG) {
            self.log
                .log(format_args!("cannot raise config interrupt: {e}"));
        }
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.device_status;
        if new & old != old {
            self.log.log(format_args!(
                "status {old:#x} -> {new:#x} clears bits without a reset; ignored"
            ));
            return;
        }
        let added = new & !old;
        if added & !STATUS_DRIVER_BITS != 0 {
            self.log.log(format_args!(
                "driver set device-only status bits {:#x}; ignored",
                added & !STATUS_DRIVER_BITS
            ));
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.device_status |= VIRTIO_CONFIG_S_FAILED;
        }
        if old & (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) != 0
            || added & VIRTIO_CONFIG_S_FAILED != 0
        {
            // After FAILED or NEEDS_RESET only a reset moves things forward.
            return;
        }

        // Walk the initialisation steps in order; one write may take several.
        if added & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.device_status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
        if added & VIRTIO_CONFIG_S_DRIVER != 0 {
            if !self.has(VIRTIO_CONFIG_S_ACKNOWLEDGE) {
                self.log
                    .log(format_args!("DRIVER set before ACKNOWLEDGE; ignored"));
                return;
            }
            self.device_status |= VIRTIO_CONFIG_S_DRIVER;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if !self.has(VIRTIO_CONFIG_S_DRIVER) {
                self.log
                    .log(format_args!("FEATURES_OK set before DRIVER; ignored"));
                return;
            }
            if !self.features_acceptable() {
                return;
            }
            lock(&self.device).set_acked_features(self.driver_features);
            self.device_status |= VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if !self.has(VIRTIO_CONFIG_S_FEATURES_OK) {
                self.log
                    .log(format_args!("DRIVER_OK set before FEATURES_OK; ignored"));
                return;
            }
            if !self.queues_valid() {
                self.fail_activation(format_args!(
                    "DRIVER_OK with a queue that is not ready or not inside guest memory"
                ));
                return;
            }
            match self.activate() {
                Ok(()) => self.device_status |= VIRTIO_CONFIG_S_DRIVER_OK,
                Err(e) => self.fail_activation(format_args!("device activation failed: {e}")),
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> Option<u32> {
        let Ok(off) = u32::try_from(offset) else {
            return None;
        };
        let v = match off {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.irq.status(),
            reg::VIRTIO_MMIO_STATUS => self.device_status,
            // No shared memory regions: length -1 means "does not exist".
            reg::VIRTIO_MMIO_SHM_LEN_LOW
            | reg::VIRTIO_MMIO_SHM_LEN_HIGH
            | reg::VIRTIO_MMIO_SHM_BASE_LOW
            | reg::VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            reg::VIRTIO_MMIO_CONFIG_GENERATION => self
                .config_generation
                .wrapping_add(lock(&self.device).config_epoch()),
            _ => return None,
        };
        Some(v)
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let Ok(off) = u32::try_from(offset) else {
            self.log
                .log(format_args!("write to unknown register {offset:#x}"));
            return;
        };
        match off {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if !self.has(VIRTIO_CONFIG_S_DRIVER)
                    || self.device_status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED)
                        != 0
                {
                    self.log.log(format_args!(
                        "DriverFeatures written in status {:#x}; ignored",
                        self.device_status
                    ));
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    sel => {
                        // DeviceFeatures reads 0 in these pages, so nothing
                        // here can be granted.
                        if v != 0 {
                            self.log.log(format_args!(
                                "driver accepted features {v:#x} in page {sel}, which offers none; ignored"
                            ));
                        }
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(off, v),
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.irq.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.set_status(v),
            reg::VIRTIO_MMIO_SHM_SEL => self.shm_sel = v,
            _ => self.log.log(format_args!(
                "write to unknown or read-only register {offset:#x}"
            )),
        }
    }

    fn write_queue_reg(&mut self, off: u32, v: u32) {
        if !self.queue_writable() {
            self.log.log(format_args!(
                "queue register {off:#x} written in status {:#x}; ignored",
                self.device_status
            ));
            return;
        }
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            self.log.log(format_args!(
                "queue register {off:#x} written for absent queue {sel}"
            ));
            return;
        };
        if q.max_size() == 0 {
            return;
        }
        if q.ready() && off != reg::VIRTIO_MMIO_QUEUE_READY {
            self.log.log(format_args!(
                "queue {sel} register {off:#x} written while the queue is ready; ignored"
            ));
            return;
        }
        let lo = |addr: u64| (addr & !0xffff_ffff) | u64::from(v);
        let hi = |addr: u64| (addr & 0xffff_ffff) | (u64::from(v) << 32);
        let result = match off {
            reg::VIRTIO_MMIO_QUEUE_NUM => u16::try_from(v)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|n| q.try_set_size(n)),
            reg::VIRTIO_MMIO_QUEUE_READY => {
                q.set_ready(v == 1);
                Ok(())
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW => {
                q.try_set_desc_table_address(GuestAddress(lo(q.desc_table())))
            }
            reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                q.try_set_desc_table_address(GuestAddress(hi(q.desc_table())))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(lo(q.avail_ring())))
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                q.try_set_avail_ring_address(GuestAddress(hi(q.avail_ring())))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_LOW => {
                q.try_set_used_ring_address(GuestAddress(lo(q.used_ring())))
            }
            reg::VIRTIO_MMIO_QUEUE_USED_HIGH => {
                q.try_set_used_ring_address(GuestAddress(hi(q.used_ring())))
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.log.log(format_args!(
                "queue {sel} register {off:#x} value {v:#x} rejected: {e}"
            ));
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.has(VIRTIO_CONFIG_S_DRIVER_OK) {
            self.log.log(format_args!(
                "QueueNotify({index}) before DRIVER_OK; ignored"
            ));
            return;
        }
        let result = {
            let d = lock(&self.device);
            d.queue_events().get(index as usize).map(|evt| evt.write(1))
        };
        match result {
            Some(Ok(())) => {}
            Some(Err(e)) => self
                .log
                .log(format_args!("cannot signal queue {index}: {e}")),
            None => self
                .log
                .log(format_args!("QueueNotify for absent queue {index}")),
        }
    }

    /// The transport's state, with the ring positions taken from the device
    /// when it is running.
    fn state(&self) -> MmioTransportState {
        let d = lock(&self.device);
        let live = d.is_activated() && d.queues().len() == self.queues.len();
        let queues = if live {
            d.queues().iter().map(|q| q.state().into()).collect()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        MmioTransportState {
            device_type: self.device_type,
            device_status: self.device_status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues,
            interrupt_status: self.irq.status(),
            config_generation: self.config_generation,
        }
    }

    /// Puts a fresh transport into a saved state. When the saved driver had
    /// reached DRIVER_OK the device is activated again and picks up the rings
    /// where they were.
    fn apply(&mut self, state: &MmioTransportState) -> Result<(), MmioError> {
        if state.device_type != self.device_type {
            return Err(MmioError::DeviceType {
                saved: state.device_type,
                actual: self.device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                actual: self.queues.len(),
            });
        }
        if state.acked_features & !self.avail_features != 0 {
            return Err(MmioError::Features {
                acked: state.acked_features,
                avail: self.avail_features,
            });
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != current.max_size() {
                return Err(MmioError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    actual: current.max_size(),
                });
            }
            let q = if saved.max_size == 0 {
                Queue::default()
            } else {
                Queue::try_from(QueueState::from(*saved))
                    .map_err(|source| MmioError::InvalidQueue { index, source })?
            };
            queues.push(q);
        }

        self.reset();
        self.queues = queues;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        if state.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            lock(&self.device).set_acked_features(state.acked_features);
        }
        let running = VIRTIO_CONFIG_S_DRIVER_OK;
        let broken = VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED;
        if state.device_status & running != 0 && state.device_status & broken == 0 {
            let queues = self.queues.iter().map(copy_queue).collect();
            lock(&self.device)
                .activate(self.mem.clone(), queues)
                .map_err(MmioError::Activate)?;
        }
        self.device_status = state.device_status;
        self.irq.set_status(state.interrupt_status);
        Ok(())
    }
}

/// A transport is rebuilt in front of its (already restored) device, on this
/// host's guest memory.
pub struct MmioArgs {
    pub mem: GuestMemoryMmap,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioArgs;
    type Error = MmioError;

    fn save(&self) -> MmioTransportState {
        self.state()
    }

    fn restore(args: MmioArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(args.mem, args.device);
        t.apply(state)?;
        Ok(t)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.log.log(format_args!(
                "{}-byte read at {offset:#x}: registers take aligned 4-byte accesses",
                data.len()
            ));
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset).unwrap_or_else(|| {
            self.log.log(format_args!(
                "read of unknown or write-only register {offset:#x}"
            ));
            0
        });
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !self.has(VIRTIO_CONFIG_S_DRIVER) {
                self.log
                    .log(format_args!("config space written before DRIVER; ignored"));
                return;
            }
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log.log(format_args!(
                "{}-byte write at {offset:#x}: registers take aligned 4-byte accesses",
                data.len()
            ));
            return;
        };
        if !offset.is_multiple_of(4) {
            self.log
                .log(format_args!("misaligned write at {offset:#x}; ignored"));
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::devices::virtio::block::BlockArgs;
    use crate::devices::virtio::{Block, BlockState, VIRTIO_INT_VRING};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRV: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEAT: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const DUMMY_FEATURES: u64 = VERSION_1 | 1 | (1 << 5);

    struct Dummy {
        acked: u64,
        activations: usize,
        resets: usize,
        fail_activate: bool,
        max_sizes: Vec<u16>,
        queues: Vec<Queue>,
        active: bool,
        evts: Vec<EventFd>,
        irq: Arc<IrqTrigger>,
        config: [u8; 8],
    }

    impl Dummy {
        fn new() -> Self {
            Dummy {
                acked: 0,
                activations: 0,
                resets: 0,
                fail_activate: false,
                max_sizes: vec![16, 8],
                queues: Vec::new(),
                active: false,
                evts: (0..2)
                    .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                    .collect(),
                irq: Arc::new(IrqTrigger::new().unwrap()),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn acked_features(&self) -> u64 {
            self.acked
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(0);
            for (i, b) in data.iter_mut().enumerate() {
                if let Some(v) = self.config.get(offset as usize + i) {
                    *b = *v;
                }
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.config[o..o + data.len()].copy_from_slice(data);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::InvalidQueue(0));
            }
            self.activations += 1;
            self.queues = queues;
            self.active = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn queues(&self) -> &[Queue] {
            &self.queues
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.active = false;
            self.queues.clear();
            self.acked = 0;
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn interrupt(&self) -> &Arc<IrqTrigger> {
            &self.irq
        }
    }

    fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn dummy_transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let dev = Arc::new(Mutex::new(Dummy::new()));
        (MmioTransport::new(test_mem(), dev.clone()), dev)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(0x1000_0000, u64::from(off), &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(0x1000_0000, u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn set_features(t: &mut MmioTransport, f: u64) {
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
    }

    fn negotiate(t: &mut MmioTransport, f: u64) {
        w(t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
        set_features(t, f);
        w(t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT);
    }

    fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32, desc: u64, avail: u64, used: u64) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, sel);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, size);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, desc as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, (used >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    fn setup_dummy_queues(t: &mut MmioTransport) {
        setup_queue(t, 0, 16, 0x1000, 0x2000, 0x3000);
        setup_queue(t, 1, 8, 0x4000, 0x5000, 0x6000);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = dummy_transport();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let (mut t, dev) = dummy_transport();
        let mut b = [0xffu8; 2];
        t.read(0, 0, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(0, 2, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 8];
        t.read(0, 0, &mut b);
        assert_eq!(b, [0; 8]);
        // Unknown and write-only registers read 0.
        for off in [
            0x0f8u64,
            reg::VIRTIO_MMIO_QUEUE_NUM.into(),
            reg::VIRTIO_MMIO_GUEST_PAGE_SIZE.into(),
            u64::MAX - 3,
        ] {
            let mut b = [0xffu8; 4];
            t.read(0, off, &mut b);
            assert_eq!(b, [0; 4], "offset {off:#x}");
        }
        // Writes of the wrong size, misaligned, unknown or read-only.
        t.write(0, u64::from(reg::VIRTIO_MMIO_STATUS), &[ACK as u8]);
        t.write(0, u64::from(reg::VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
        t.write(0, u64::from(reg::VIRTIO_MMIO_STATUS), &[]);
        w(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE, 0);
        w(&mut t, 0x0f0, 1);
        t.write(0, u64::MAX, &[1; 4]);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        // Config writes before DRIVER are ignored.
        t.write(0, CONFIG_SPACE_OFFSET, &[9]);
        assert_eq!(dev.lock().unwrap().config[0], 1);
        // Notifying before DRIVER_OK does nothing.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(dev.lock().unwrap().evts[0].read().is_err());
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, dev) = dummy_transport();
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            DUMMY_FEATURES as u32
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES),
            (DUMMY_FEATURES >> 32) as u32
        );
        w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);

        // Features written before DRIVER are dropped.
        set_features(&mut t, DUMMY_FEATURES);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);

        set_features(&mut t, VERSION_1 | 1);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FEAT);
        assert_eq!(dev.lock().unwrap().acked, VERSION_1 | 1);

        // Frozen after FEATURES_OK.
        set_features(&mut t, DUMMY_FEATURES);
        assert_eq!(t.state().acked_features, VERSION_1 | 1);
    }

    #[test]
    fn features_ok_refused_without_version_1() {
        let (mut t, dev) = dummy_transport();
        negotiate(&mut t, 1 | (1 << 5));
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        assert_eq!(dev.lock().unwrap().acked, 0);
        // DRIVER_OK cannot follow.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS) & (FEAT | OK), 0);
        assert_eq!(dev.lock().unwrap().activations, 0);

        // Nor with features the device never offered.
        let (mut t, _) = dummy_transport();
        negotiate(&mut t, VERSION_1 | (1 << 3));
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
    }

    #[test]
    fn status_transitions_out_of_order_are_ignored() {
        let (mut t, _) = dummy_transport();
        w(&mut t, reg::VIRTIO_MMIO_STATUS, DRV);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        // Clearing a bit without a reset.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        // Device-only bits are not the driver's to set.
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRV | VIRTIO_CONFIG_S_NEEDS_RESET,
        );
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
        // FAILED sticks and blocks progress until reset.
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRV | VIRTIO_CONFIG_S_FAILED,
        );
        set_features(&mut t, VERSION_1);
        w(
            &mut t,
            reg::VIRTIO_MMIO_STATUS,
            ACK | DRV | VIRTIO_CONFIG_S_FAILED | FEAT,
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            ACK | DRV | VIRTIO_CONFIG_S_FAILED
        );
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), 0);
        // Several steps in one write are taken in order.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV);
    }

    #[test]
    fn queue_setup_and_activation() {
        let (mut t, dev) = dummy_transport();
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 8);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);

        // Queue registers before FEATURES_OK are ignored.
        setup_queue(&mut t, 0, 8, 0x1000, 0x2000, 0x3000);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(t.state().queues[0].size, 16);

        negotiate(&mut t, VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1000, 0x2000, 0x3000);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        // Invalid sizes and misaligned rings are rejected; a ready queue is
        // frozen.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 6);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0004);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x4008);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 4);
        // Writes for an absent queue go nowhere.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 4);
        let s = t.state();
        assert_eq!(s.queues[0].size, 8);
        assert_eq!(
            (
                s.queues[0].desc_table,
                s.queues[0].avail_ring,
                s.queues[0].used_ring
            ),
            (0x1000, 0x2000, 0x3000)
        );
        assert_eq!(s.queues[1].size, 8);
        assert_eq!(s.queues[1].desc_table, 0);

        setup_queue(&mut t, 1, 4, 0x1_0000_4000, 0x5000, 0x6000);
        assert_eq!(t.state().queues[1].desc_table, 0x1_0000_4000);
        // Queue 1 lies outside guest memory: activation is refused.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS),
            ACK | DRV | FEAT | OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_INT_CONFIG
        );
        assert_eq!(dev.lock().unwrap().activations, 0);
        // Notifications go nowhere in that state.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);

        // Reset, then do it right.
        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        negotiate(&mut t, VERSION_1);
        setup_dummy_queues(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FEAT | OK);
        {
            let d = dev.lock().unwrap();
            assert_eq!(d.activations, 1);
            assert_eq!(d.queues.len(), 2);
            assert_eq!(d.queues[0].size(), 16);
            assert_eq!(d.queues[1].desc_table(), 0x4000);
            assert!(d.queues.iter().all(|q| q.ready()));
        }
        // Frozen after DRIVER_OK.
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_READY), 1);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(dev.lock().unwrap().activations, 1);
    }

    #[test]
    fn activation_failure_sets_needs_reset() {
        let (mut t, dev) = dummy_transport();
        dev.lock().unwrap().fail_activate = true;
        negotiate(&mut t, VERSION_1);
        setup_dummy_queues(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_ne!(
            r(&mut t, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
            0
        );
        assert_eq!(dev.lock().unwrap().irq.evt().read().unwrap(), 1);
    }

    #[test]
    fn notify_interrupts_and_config() {
        let (mut t, dev) = dummy_transport();
        negotiate(&mut t, VERSION_1);
        setup_dummy_queues(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);

        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 5);
        {
            let d = dev.lock().unwrap();
            assert!(d.evts[0].read().is_err());
            assert_eq!(d.evts[1].read().unwrap(), 1);
        }

        let irq = dev.lock().unwrap().irq.clone();
        irq.trigger(VIRTIO_INT_VRING).unwrap();
        t.notify_config_change();
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_INT_VRING);
        assert_eq!(
            r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_INT_CONFIG
        );
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_INT_CONFIG);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Config space: any width, offsets relative to 0x100.
        let mut b = [0u8; 2];
        t.read(0, CONFIG_SPACE_OFFSET + 3, &mut b);
        assert_eq!(b, [4, 5]);
        t.write(0, CONFIG_SPACE_OFFSET + 1, &[0xee]);
        let mut b = [0u8; 4];
        t.read(0, CONFIG_SPACE_OFFSET, &mut b);
        assert_eq!(b, [1, 0xee, 3, 4]);
        t.read(0, CONFIG_SPACE_OFFSET + 6, &mut b);
        assert_eq!(b, [7, 8, 0, 0]);
    }

    #[test]
    fn reset_returns_everything_to_initial_state() {
        let (mut t, dev) = dummy_transport();
        let fresh = t.state();
        negotiate(&mut t, VERSION_1 | 1);
        setup_dummy_queues(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        dev.lock().unwrap().irq.trigger(VIRTIO_INT_VRING).unwrap();
        assert_ne!(t.state(), fresh);

        w(&mut t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.state(), fresh);
        let d = dev.lock().unwrap();
        assert_eq!(d.resets, 1);
        assert!(!d.active);
        assert_eq!(d.acked, 0);
    }

    /// An interrupt pending in the saved status is raised again after a
    /// restore (it may be missing from the saved irqchip); none is raised
    /// for a device with nothing pending or a driver not running.
    #[test]
    fn a_restored_pending_interrupt_is_raised_again() {
        let (mut t, _dev) = dummy_transport();
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        setup_dummy_queues(&mut t);
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(t.device_status() & OK, OK);
        let restored = |status: u32, device_status: u32| {
            let mut st = t.state();
            st.interrupt_status = status;
            st.device_status = device_status;
            let (_, dev) = dummy_transport();
            let tr = MmioTransport::restore(
                MmioArgs {
                    mem: test_mem(),
                    device: dev.clone(),
                },
                &st,
            )
            .unwrap();
            // Restoring raises nothing by itself.
            assert!(dev.lock().unwrap().irq.evt().read().is_err());
            (tr, dev)
        };
        let running = ACK | DRV | FEAT | OK;
        let (mut tr, dev) = restored(VIRTIO_INT_VRING, running);
        assert!(tr.reraise_pending().unwrap());
        assert_eq!(dev.lock().unwrap().irq.evt().read().unwrap(), 1);
        assert_eq!(
            r(&mut tr, reg::VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_INT_VRING
        );
        let (tr, dev) = restored(0, running);
        assert!(!tr.reraise_pending().unwrap());
        assert!(dev.lock().unwrap().irq.evt().read().is_err());
        let (tr, dev) = restored(VIRTIO_INT_VRING, ACK | DRV | FEAT);
        assert!(!tr.reraise_pending().unwrap());
        assert!(dev.lock().unwrap().irq.evt().read().is_err());
    }

    #[test]
    fn restore_rejects_mismatched_state() {
        let (t, _) = dummy_transport();
        let state = t.state();
        let restore = |bad: &MmioTransportState| {
            let (_, dev) = dummy_transport();
            MmioTransport::restore(
                MmioArgs {
                    mem: test_mem(),
                    device: dev,
                },
                bad,
            )
        };
        let mut bad = state.clone();
        bad.device_type = 2;
        assert!(matches!(restore(&bad), Err(MmioError::DeviceType { .. })));
        let mut bad = state.clone();
        bad.queues.pop();
        assert!(matches!(restore(&bad), Err(MmioError::QueueCount { .. })));
        let mut bad = state.clone();
        bad.queues[0].size = 3;
        assert!(matches!(
            restore(&bad),
            Err(MmioError::InvalidQueue { index: 0, .. })
        ));
        let mut bad = state.clone();
        bad.queues[1].max_size = 16;
        assert!(matches!(
            restore(&bad),
            Err(MmioError::QueueMaxSize { index: 1, .. })
        ));
        let mut bad = state;
        bad.acked_features = 1 << 7;
        assert!(matches!(restore(&bad), Err(MmioError::Features { .. })));
    }

    fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, parts: &[(u64, u32, bool)]) {
        let descs: Vec<RawDescriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let last = i == parts.len() - 1;
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        vq.add_desc_chains(&descs, first).unwrap();
    }

    #[test]
    fn block_state_roundtrip_continues_processing() {
        const HDR: u64 = 0x1_0000;
        const DATA: u64 = 0x2_0000;
        const STATUS: u64 = 0x3_0000;

        let mut img = tempfile::NamedTempFile::new().unwrap();
        img.write_all(&[0u8; 64 * 512]).unwrap();
        let mem = test_mem();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0x8000), 32);

        let block = Arc::new(Mutex::new(
            Block::new("vda".into(), img.path(), false).unwrap(),
        ));
        let mut t = MmioTransport::new(mem.clone(), block.clone());
        let avail = u64::from(r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES))
            | (u64::from({
                w(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
                r(&mut t, reg::VIRTIO_MMIO_DEVICE_FEATURES)
            }) << 32);
        negotiate(&mut t, avail);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        setup_queue(
            &mut t,
            0,
            32,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
        );
        w(&mut t, reg::VIRTIO_MMIO_STATUS, ACK | DRV | FEAT | OK);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FEAT | OK);

        // One write through the original pair.
        mem.write_obj(VIRTIO_BLK_T_OUT, GuestAddress(HDR)).unwrap();
        mem.write_obj(5u64, GuestAddress(HDR + 8)).unwrap();
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        add_chain(
            &vq,
            0,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        w(&mut t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(block.lock().unwrap().process_queue().unwrap());
        assert_eq!(vq.used().idx().load(), 1);

        let state = t.state();
        let block_state = block.lock().unwrap().save();
        assert_eq!(state.queues[0].next_avail, 1);
        assert_eq!(state.queues[0].next_used, 1);
        assert_eq!(state.interrupt_status, VIRTIO_INT_VRING);
        assert_eq!(block_state.acked_features, avail);

        // Through serde, as a snapshot would.
        let state: MmioTransportState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let block_state: BlockState =
            serde_json::from_str(&serde_json::to_string(&block_state).unwrap()).unwrap();

        let block2 = Arc::new(Mutex::new(
            Block::restore(
                BlockArgs {
                    id: "vda".into(),
                    path: img.path().to_path_buf(),
                    read_only: false,
                },
                &block_state,
            )
            .unwrap(),
        ));
        let mut t2 = MmioTransport::restore(
            MmioArgs {
                mem: mem.clone(),
                device: block2.clone(),
            },
            &state,
        )
        .unwrap();
        assert_eq!(t2.state(), state);
        assert_eq!(block2.lock().unwrap().save(), block_state);
        assert_eq!(r(&mut t2, reg::VIRTIO_MMIO_STATUS), ACK | DRV | FEAT | OK);

        // The next request lands in the next ring slots.
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(HDR)).unwrap();
        mem.write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        add_chain(
            &vq,
            3,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert!(block2.lock().unwrap().process_queue().unwrap());
        assert_eq!(vq.used().idx().load(), 2);
        let e = vq.used().ring().ref_at(1).unwrap().load();
        assert_eq!((e.id(), e.len()), (3, 513));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        let mut back = [0u8; 512];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0x5a; 512]);
        let s = t2.state();
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (2, 2));
    }
}
