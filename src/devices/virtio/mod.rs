//! Virtio devices: the device-side contract (`VirtioDevice`), the interrupt
//! line they share with their transport (`IrqTrigger`), the virtio-mmio
//! transport and the block device.
//!
//! Ownership of a device's queues: the transport builds and configures them
//! from the driver's register writes, then hands them to the device on
//! activation (DRIVER_OK). From then on the device owns the live ring indices,
//! which is why the trait exposes `queues()` for state saving.
//!
//! Wiring a device into the VMM (one `Arc<Mutex<Block>>` shared by all):
//! - MMIO bus: `MmioTransport::new(mem, block.clone())` at `base`, length
//!   `mmio::MMIO_LEN`;
//! - KVM ioeventfd per queue `i`: `queue_events()[i]` at
//!   `base + mmio::NOTIFY_REG_OFFSET`, 4 bytes, datamatch `i as u32`;
//! - KVM irqfd: `interrupt().evt()` on the device's GSI (edge);
//! - event loop: `event_manager.add_subscriber(block)`.
//!
//! Restore order (both through `devices::persist::Persist`):
//! `Block::restore(BlockArgs { .. }, &block_state)`, then
//! `MmioTransport::restore(MmioArgs { mem, device }, &transport_state)`,
//! which re-activates the device if the driver had reached DRIVER_OK.

pub mod block;
pub mod mmio;
pub mod net;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use block::{Block, BlockArgs, BlockError, BlockState};
pub use mmio::{MmioArgs, MmioError, MmioTransport, MmioTransportState, QueueSnapshot};
pub use net::{Net, NetArgs, NetError, NetState, Tap};

pub use crate::vstate::memory::GuestMemoryMmap;

/// Whether the driver wants an interrupt for what was just put in the used
/// ring of `queue`. virtio-queue 0.18 decides only with EVENT_IDX (it says
/// "VRING_AVAIL_F_NO_INTERRUPT isn't supported yet" and otherwise always
/// answers yes); without EVENT_IDX this honours the driver's NO_INTERRUPT
/// flag in the avail ring, which virtio 1.x (2.7.7.2) says the device
/// should: a polling driver (ours, or Linux's NAPI with the flag set) then
/// gets no interrupt, and the VMM makes no irqfd write, per request.
pub fn needs_interrupt(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // The used ring's index is written: read the flag after it (the driver
    // clears the flag before it looks at the used index again).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags: u16 = mem
        .read_obj(GuestAddress(queue.avail_ring()))
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
}

/// The avail ring's flag by which a driver asks for no interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Feature bit: the device complies with virtio 1.0+ (required here: the
/// transport only speaks the modern interface).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Feature bit: the driver may use indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 =
    virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Feature bit: used/avail event index notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// InterruptStatus bit: a used buffer was added to a queue.
pub const VIRTIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration space changed.
pub const VIRTIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Device type of virtio-blk.
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queue(s), the transport passed {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not ready or does not fit in guest memory")]
    InvalidQueue(usize),
    #[error("device is already activated; reset it first")]
    AlreadyActivated,
    #[error("cannot signal the device's queue event: {0}")]
    QueueEvent(#[source] io::Error),
}

/// What the transport needs from a virtio device.
///
/// Feature bits are the full 64-bit set; the transport splits them into the
/// 32-bit pages the register interface uses.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn acked_features(&self) -> u64;
    /// Called by the transport once the driver's feature set is final
    /// (FEATURES_OK accepted).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific configuration space. Bytes past its end read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Config changes the device made on its own (a status bit it set),
    /// which the transport adds to ConfigGeneration so that a driver
    /// reading the config space sees that it changed.
    fn config_epoch(&self) -> u32 {
        0
    }
    /// Starts the device with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<virtio_queue::Queue>,
    ) -> Result<(), ActivateError>;
    /// Whether `activate` succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// The live queues of an activated device (empty otherwise), so that the
    /// transport can save the ring positions the device has reached.
    fn queues(&self) -> &[virtio_queue::Queue];
    /// Returns the device to its pre-activation state: drops the queues and
    /// the memory handle and forgets the negotiated features. The queue
    /// events and the interrupt stay (they are registered with KVM).
    fn reset(&mut self);
    /// One event per queue, signalled by the driver's notifications.
    fn queue_events(&self) -> &[EventFd];
    /// The interrupt line shared with the transport.
    fn interrupt(&self) -> &Arc<IrqTrigger>;
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus bits and
/// the eventfd the VMM registers as a KVM irqfd for the device's GSI.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(IrqTrigger {
            status: AtomicU32::new(0),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears `bits` (a write to InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Replaces InterruptStatus without raising the interrupt (restore, reset).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

/// Limits stderr lines caused by guest behaviour, so that a misbehaving
/// driver cannot flood the log: at most `BURST` lines per `WINDOW`.
#[derive(Debug)]
pub(crate) struct GuestErrorLog {
    what: &'static str,
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl GuestErrorLog {
    const BURST: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);

    pub(crate) fn new(what: &'static str) -> Self {
        GuestErrorLog {
            what,
            window_start: None,
            emitted: 0,
            suppressed: 0,
        }
    }

    pub(crate) fn log(&mut self, msg: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now.duration_since(start) < Self::WINDOW => {}
            _ => {
                if self.suppressed > 0 {
                    eprintln!(
                        "ferry: {}: {} similar messages suppressed",
                        self.what, self.suppressed
                    );
                }
                self.window_start = Some(now);
                self.emitted = 0;
                self.suppressed = 0;
            }
        }
        if self.emitted < Self::BURST {
            self.emitted += 1;
            eprintln!("ferry: {}: {}", self.what, msg);
        } else {
            self.suppressed += 1;
        }
    }
}

/// A guest's read of `data.len()` bytes at `offset` of a device's config
/// space `config`: what lies inside it, zeros beyond (any offset and length
/// the guest gives, without panicking).
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_trigger_status_and_ack() {
        let irq = IrqTrigger::new().unwrap();
        assert_eq!(irq.status(), 0);
        irq.trigger(VIRTIO_INT_VRING).unwrap();
        irq.trigger(VIRTIO_INT_CONFIG).unwrap();
        assert_eq!(irq.status(), VIRTIO_INT_VRING | VIRTIO_INT_CONFIG);
        assert_eq!(irq.evt().read().unwrap(), 2);
        irq.ack(VIRTIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_INT_CONFIG);
        irq.set_status(0);
        assert_eq!(irq.status(), 0);
        // Nothing was raised by ack/set_status.
        assert!(irq.evt().read().is_err());
    }

    #[test]
    fn guest_error_log_caps_lines() {
        let mut log = GuestErrorLog::new("test");
        for i in 0..100 {
            log.log(format_args!("message {i}"));
        }
        assert_eq!(log.emitted, GuestErrorLog::BURST);
        assert_eq!(log.suppressed, 100 - u64::from(GuestErrorLog::BURST));
    }
}
