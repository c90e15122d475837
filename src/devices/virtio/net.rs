//! virtio-net on a tap device.
//!
//! The VMM opens the tap itself (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a
//! 12-byte virtio-net header in front of each frame, no offloads). Frames
//! go through a bounded host buffer in both directions, so that nothing a
//! guest or the network sends can make the device allocate or copy more
//! than one maximal frame, and so that the header the guest receives is
//! always well formed (`num_buffers` = 1).
//!
//! Everything runs on the event-loop thread: the rx queue event (the guest
//! gave buffers), the tx queue event (the guest sent frames), the tap fd
//! (frames arrived) and the announcement timer. When the guest has no rx
//! buffer, the one frame already read waits in the host buffer and the tap
//! is left unwatched until the guest gives buffers again; the tap's own
//! queue holds (and beyond its length drops) what comes meanwhile.
//!
//! Pausing ([`Net::pause`], for the last phase of a migration) stops every
//! access to guest memory: no frame is delivered to a ring whose state has
//! been sent. What waits then (the frame in the host buffer, what the tap
//! still queues when the state is saved, see [`Net::hold_queued`]) is
//! carried in the device state, bounded, and delivered first wherever the
//! guest runs next: once, never to a stale ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::{
    ActivateError, GuestErrorLog, GuestMemoryMmap, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_INT_CONFIG, VIRTIO_INT_VRING,
};
use crate::devices::persist::Persist;

/// Device type of virtio-net.
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
const F_MAC: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
const F_STATUS: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_STATUS;
const S_LINK_UP: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
const F_CTRL_VQ: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
const F_GUEST_ANNOUNCE: u32 = virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;
/// Config status bit: the device asks the driver to announce itself.
const S_ANNOUNCE: u16 = virtio_bindings::virtio_net::VIRTIO_NET_S_ANNOUNCE as u16;
/// Control queue command classes and answers (virtio 1.2, 5.1.6.5).
pub const CTRL_ANNOUNCE: u8 = virtio_bindings::virtio_net::VIRTIO_NET_CTRL_ANNOUNCE as u8;
pub const CTRL_ANNOUNCE_ACK: u8 = virtio_bindings::virtio_net::VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8;
pub const CTRL_OK: u8 = virtio_bindings::virtio_net::VIRTIO_NET_OK as u8;
pub const CTRL_ERR: u8 = virtio_bindings::virtio_net::VIRTIO_NET_ERR as u8;

/// Entries per rx and tx queue.
pub const QUEUE_SIZE: u16 = 256;
/// Entries of the control queue: a driver has a command or two in flight.
pub const CTRL_QUEUE_SIZE: u16 = 64;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// The device-readable part of a control command at most (its class and
/// command header and the data after it). Only ANNOUNCE_ACK, which has no
/// data, is served; longer commands are hostile, not merely unknown.
pub const MAX_CTRL_COMMAND: usize = 4096;
/// Control commands served per event before the loop serves others.
const CTRL_BURST: usize = 64;
/// `virtio_net_hdr_v1`: what VERSION_1 puts in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame with its header: a 64 KiB packet, its Ethernet and
/// VLAN header. Without offloads real frames are at most 1518 bytes; more
/// from either side is refused, never allocated.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65535 + 18;
/// Frames moved per event before the loop serves others.
const BURST: usize = 256;
/// When the announcement frames go out after a restore or a migration's
/// hand-over (the first at once): switches learn the guest's new port from
/// the first, the others cover a lost one.
const ANNOUNCE_AT_MS: [u64; 5] = [0, 10, 30, 60, 100];
/// Frames the device state carries at most (waiting when the device paused
/// for a migration), and their bytes: what came in the milliseconds between
/// the pause and the switch learning the destination's port. Beyond either
/// bound frames are dropped, as a full queue drops them.
pub const MAX_CARRIED_FRAMES: usize = 256;
pub const MAX_CARRIED_BYTES: usize = 512 << 10;
/// Tap ioctls (linux/if_tun.h).
pub(crate) const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
pub(crate) const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
pub(crate) const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// IFNAMSIZ minus the NUL.
pub const MAX_TAP_NAME: usize = 15;

// Event-loop data values.
const EV_RX_QUEUE: u32 = 0;
const EV_TX_QUEUE: u32 = 1;
const EV_TAP: u32 = 2;
const EV_ANNOUNCE: u32 = 3;
const EV_CTRL_QUEUE: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open tap {tap}: {source}{}", hint(.source))]
    Tap {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)"
    )]
    TapName(String),
    #[error("cannot create an event fd for net device {id}: {source}")]
    EventFd {
        id: String,
        #[source]
        source: io::Error,
    },
    #[error("saved acked features {acked:#x} are not offered by this device ({avail:#x})")]
    Features { acked: u64, avail: u64 },
    #[error("saved state of net device {id:?} {why} (acked features {acked:#x})")]
    StateAnnounce {
        id: String,
        acked: u64,
        why: &'static str,
    },
    #[error("saved state gives net device {id:?} the address {mac}, not a unicast one")]
    StateMac { id: String, mac: String },
    #[error("saved state of net device {id:?} carries {frames} frames of {bytes} bytes ({why})")]
    StateFrames {
        id: String,
        frames: usize,
        bytes: usize,
        why: &'static str,
    },
    #[error("saved state is of net device {saved:?}, restored as {id:?}")]
    StateMismatch { id: String, saved: String },
    #[error("cannot complete a buffer in the used ring: {0}")]
    UsedRing(#[source] virtio_queue::Error),
    #[error("cannot raise the interrupt: {0}")]
    Interrupt(#[source] io::Error),
    #[error("tap write: {0}")]
    TapWrite(#[source] io::Error),
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EPERM) => {
            " (creating a tap needs CAP_NET_ADMIN: create it first, e.g. `ip tuntap add NAME mode tap`)"
        }
        Some(libc::EBUSY) => " (another process has it open)",
        Some(libc::EINVAL) => " (an interface of that name exists and is not a tap)",
        _ => "",
    }
}

/// `xx:xx:xx:xx:xx:xx` to bytes; a unicast, non-zero address only.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "{s:?} is not a MAC address (six hex bytes, e.g. 02:00:00:00:00:01)"
        ));
    }
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("{s:?}: {p:?} is not a hex byte"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: {p:?} is not a hex byte"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s:?} is a multicast address; a NIC needs a unicast one"
        ));
    }
    if mac == [0; 6] {
        return Err(format!("{s:?} is the all-zero address"));
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A random locally administered unicast address (02:xx:...).
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = crate::util::random_bytes::<6>()?;
    mac[0] = (mac[0] & 0xfc) | 0x02;
    Ok(mac)
}

pub fn check_tap_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_graphic() && c != b'/' && c != b':');
    if ok {
        Ok(())
    } else {
        Err(NetError::TapName(name.to_string()))
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap: non-blocking, with the 12-byte virtio-net header.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist (which
    /// needs CAP_NET_ADMIN; such a tap goes away with this process).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        check_tap_name(name)?;
        let err = |source| NetError::Tap {
            tap: name.to_string(),
            source,
        };
        let path = c"/dev/net/tun";
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: fd was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (40
        // bytes), owned by this frame.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len as *const _) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // No checksum or segmentation offloads: none were offered to the
        // guest, so the tap must hand it only whole, checksummed frames.
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Throws away every frame the tap queues now; returns how many.
    pub fn discard_queued(&self) -> usize {
        let mut buf = vec![0u8; MAX_FRAME];
        let mut n = 0;
        loop {
            match (&self.file).read(&mut buf) {
                Ok(_) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return n,
            }
        }
    }

    /// Sends one announcement (RARP) for `mac`: a switch learns from it
    /// that frames for `mac` go to this tap's port.
    pub fn announce(&self, mac: &[u8; 6]) -> io::Result<()> {
        let frame = rarp_frame(mac);
        match (&self.file).write(&frame) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!("announcement cut to {n} bytes"))),
            Err(e) => Err(e),
        }
    }
}

/// What the guest saw of a net device. The tap is the restoring host's
/// choice (`NetArgs`), never a name in the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub id: String,
    pub mac: [u8; 6],
    pub acked_features: u64,
    /// Frames (with their virtio-net header) that came for the guest while
    /// the device was paused, oldest first: delivered before anything else
    /// where the guest runs next.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<Vec<u8>>,
    /// VIRTIO_NET_S_ANNOUNCE: the guest was asked to announce itself and
    /// has not acknowledged yet. Absent from states written before the
    /// control queue existed (false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce: bool,
}

/// The device a net device is rebuilt as: from this host's config.
#[derive(Debug, Clone)]
pub struct NetArgs {
    pub id: String,
    pub tap: String,
}

/// Counters for tests and the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Frames dropped: too large for the guest's buffer, malformed from the
    /// guest, the tap full, or waiting when the device paused.
    pub dropped: u64,
    /// RARP frames the device sent for the guest.
    pub announcements: u64,
    /// Times the guest was asked to announce itself (VIRTIO_NET_S_ANNOUNCE
    /// and a config interrupt), for a guest that negotiated GUEST_ANNOUNCE.
    pub guest_announce_requests: u64,
    /// Control commands answered VIRTIO_NET_OK, answered VIRTIO_NET_ERR
    /// (well formed, unknown or not applicable), and dropped as malformed
    /// (completed unanswered).
    pub ctrl_ok: u64,
    pub ctrl_err: u64,
    pub ctrl_dropped: u64,
}

/// A virtio-net device with one rx, one tx and a control queue.
pub struct Net {
    id: String,
    mac: [u8; 6],
    tap: Tap,
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: [u16; 3],
    queue_evts: [EventFd; 3],
    /// VIRTIO_NET_S_ANNOUNCE in the config status: set when the guest is
    /// asked to announce itself, cleared by its ANNOUNCE_ACK.
    announce_status: bool,
    /// This process asked the guest and has had no ack since: a second
    /// request (the destination asks when it builds the guest and again
    /// when it starts it) would only make the guest announce twice.
    announce_asked: bool,
    /// Config changes the device made itself, added to the transport's
    /// ConfigGeneration so that a driver sees the status change.
    config_epoch: u32,
    irq: Arc<IrqTrigger>,
    mem: Option<GuestMemoryMmap>,
    queues: Vec<Queue>,
    /// Frames held while paused (or brought by the state), oldest first;
    /// delivered before the tap is read. Bounded by MAX_CARRIED_*.
    pending: VecDeque<Vec<u8>>,
    /// One frame (with its header) read from the tap, waiting for a buffer.
    rx_buf: Vec<u8>,
    rx_len: usize,
    tx_buf: Vec<u8>,
    /// Whether the tap fd is in the event loop's interest list.
    tap_watched: bool,
    paused: bool,
    announce_timer: TimerFd,
    /// Rebuilt from saved state: its first activation is the transport's
    /// restore, not the guest's driver, and announces nothing (the VMM
    /// announces when the guest runs here, see [`Net::announce`]).
    restored: bool,
    /// Announcements still to send (index into ANNOUNCE_AT_MS).
    announce_next: usize,
    counters: NetCounters,
    log: GuestErrorLog,
}

impl Net {
    /// A net device on tap `tap` with address `mac`.
    pub fn new(id: String, tap: &str, mac: [u8; 6]) -> Result<Net, NetError> {
        Net::on_tap(id, Tap::open(tap)?, mac)
    }

    fn on_tap(id: String, tap: Tap, mac: [u8; 6]) -> Result<Net, NetError> {
        let evt_err = |source| NetError::EventFd {
            id: id.clone(),
            source,
        };
        let queue_evts = [
            EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
            EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
            EventFd::new(EFD_NONBLOCK).map_err(evt_err)?,
        ];
        let irq = Arc::new(IrqTrigger::new().map_err(evt_err)?);
        let announce_timer = TimerFd::new().map_err(|e| evt_err(e.into()))?;
        Ok(Net {
            id,
            mac,
            tap,
            avail_features: (1u64 << VIRTIO_F_VERSION_1)
                | (1u64 << F_MAC)
                | (1u64 << F_STATUS)
                | (1u64 << F_CTRL_VQ)
                | (1u64 << F_GUEST_ANNOUNCE),
            acked_features: 0,
            queue_max_sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            queue_evts,
            announce_status: false,
            announce_asked: false,
            config_epoch: 0,
            irq,
            mem: None,
            queues: Vec::new(),
            pending: VecDeque::new(),
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            tx_buf: vec![0; MAX_FRAME],
            tap_watched: false,
            paused: false,
            announce_timer,
            restored: false,
            announce_next: ANNOUNCE_AT_MS.len(),
            counters: NetCounters::default(),
            log: GuestErrorLog::new("virtio-net"),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Stops all guest memory access (the vCPUs are paused, the state is
    /// about to be saved, memory not yet sent for the last time). Frames the
    /// guest queued for sending go out first, and what waits on the tap
    /// goes into the guest's free rx buffers, to be answered wherever the
    /// guest runs next; a frame beyond those is held for the state.
    pub fn pause(&mut self) -> Result<(), NetError> {
        let sent = self.process_tx();
        let received = self.process_rx();
        self.paused = true;
        if self.rx_len != 0 {
            // Older than anything held: it was taken first.
            let frame = self.rx_buf[..self.rx_len].to_vec();
            self.rx_len = 0;
            self.pending.push_front(frame);
        }
        let c = self.counters;
        eprintln!(
            "ferry: net {}: paused after {} frames in, {} out, {} dropped",
            self.id, c.rx_frames, c.tx_frames, c.dropped
        );
        sent.and(received).map(|_| ())
    }

    /// While paused, takes what the tap queues into the frames the state
    /// carries (up to MAX_CARRIED_*; beyond, they are dropped). Called when
    /// the state is saved: frames that reached this host before the switch
    /// learned the guest's new port are then answered there, not lost with
    /// this process. Returns how many were taken.
    pub fn hold_queued(&mut self) -> usize {
        if !self.paused {
            return 0;
        }
        let mut bytes: usize = self.pending.iter().map(Vec::len).sum();
        let mut held = 0;
        loop {
            let n = match (&self.tap.file).read(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if n < VNET_HDR_LEN + 14 {
                continue;
            }
            if self.pending.len() >= MAX_CARRIED_FRAMES || bytes + n > MAX_CARRIED_BYTES {
                self.counters.dropped += 1;
                continue;
            }
            bytes += n;
            self.pending.push_back(self.rx_buf[..n].to_vec());
            held += 1;
        }
        held
    }

    /// Frames held for the state (see [`Net::hold_queued`]).
    pub fn held_frames(&self) -> usize {
        self.pending.len()
    }

    /// Undoes [`Net::pause`]: the guest goes on running here.
    pub fn unpause(&mut self) {
        self.paused = false;
        // The event loop looks at the rings and the tap again.
        let _ = self.queue_evts[RX].write(1);
    }

    /// Makes the guest's address known on the network again (after a
    /// migration or a restore): a guest that negotiated GUEST_ANNOUNCE is
    /// asked to announce itself (VIRTIO_NET_S_ANNOUNCE and a config
    /// interrupt; Linux then sends gratuitous ARPs for every address it
    /// has, which a RARP from the device cannot know); for any other guest
    /// the device sends RARPs for its MAC now and a few times over the next
    /// 100 ms ([`Net::announce_by_device`]).
    pub fn announce(&mut self) {
        if self.guest_announces() {
            self.ask_guest_to_announce();
        } else {
            self.announce_by_device();
        }
    }

    /// Whether the running driver negotiated GUEST_ANNOUNCE (which needs
    /// the control queue for its acknowledgement).
    pub fn guest_announces(&self) -> bool {
        let want = (1u64 << F_GUEST_ANNOUNCE) | (1u64 << F_CTRL_VQ);
        self.mem.is_some() && self.acked_features & want == want
    }

    /// Whether VIRTIO_NET_S_ANNOUNCE is set (asked, not yet acknowledged).
    pub fn announce_pending(&self) -> bool {
        self.announce_status
    }

    fn ask_guest_to_announce(&mut self) {
        if self.announce_asked && self.announce_status {
            return;
        }
        self.announce_asked = true;
        // Any RARP series still running is for a guest that has since
        // negotiated the feature: the guest speaks for itself now.
        self.announce_next = ANNOUNCE_AT_MS.len();
        self.announce_status = true;
        self.config_epoch = self.config_epoch.wrapping_add(1);
        self.counters.guest_announce_requests += 1;
        match self.irq.trigger(VIRTIO_INT_CONFIG) {
            Ok(()) => eprintln!(
                "ferry: net {}: asked the guest to announce itself (VIRTIO_NET_S_ANNOUNCE)",
                self.id
            ),
            Err(e) => eprintln!("ferry: net {}: config interrupt: {e}", self.id),
        }
    }

    /// RARPs for the guest's MAC from the device: now and a few times over
    /// the next 100 ms.
    pub fn announce_by_device(&mut self) {
        self.announce_next = 0;
        self.send_due_announcements();
    }

    fn send_due_announcements(&mut self) {
        let Some(&at) = ANNOUNCE_AT_MS.get(self.announce_next) else {
            return;
        };
        match self.tap.announce(&self.mac) {
            Ok(()) => self.counters.announcements += 1,
            Err(e) => eprintln!(
                "ferry: net {}: announcement on {}: {e}",
                self.id, self.tap.name
            ),
        }
        self.announce_next += 1;
        if let Some(&next) = ANNOUNCE_AT_MS.get(self.announce_next) {
            let wait = Duration::from_millis(next.saturating_sub(at).max(1));
            if let Err(e) = self.announce_timer.reset(wait, None) {
                eprintln!("ferry: net {}: announcement timer: {e}", self.id);
                self.announce_next = ANNOUNCE_AT_MS.len();
            }
        }
    }

    fn raise(&mut self, queue: usize) -> Result<(), NetError> {
        let (Some(mem), Some(q)) = (self.mem.as_ref(), self.queues.get_mut(queue)) else {
            return Ok(());
        };
        if super::needs_interrupt(q, mem).map_err(NetError::UsedRing)? {
            self.irq
                .trigger(VIRTIO_INT_VRING)
                .map_err(NetError::Interrupt)?;
        }
        Ok(())
    }

    /// Sends every frame the guest queued. Returns how many went.
    pub fn process_tx(&mut self) -> Result<usize, NetError> {
        if self.paused {
            return Ok(0);
        }
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(TX)) else {
            return Ok(0);
        };
        let mut done = 0;
        // At most a ring's worth per call: a guest that re-posts buffers as
        // fast as they complete must not keep the event loop (and with it
        // the control socket and the other devices) to itself.
        while done < BURST {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut len = 0usize;
            let mut bad = None;
            for d in chain {
                if d.is_write_only() {
                    bad = Some("a device-writable descriptor in a tx chain");
                    break;
                }
                let n = d.len() as usize;
                if len + n > MAX_FRAME {
                    bad = Some("a frame larger than 64 KiB");
                    break;
                }
                if let Err(e) = mem.read_slice(&mut self.tx_buf[len..len + n], d.addr()) {
                    self.log
                        .log(format_args!("{}: tx buffer {head}: {e}", self.id));
                    bad = Some("a buffer outside guest memory");
                    break;
                }
                len += n;
            }
            if bad.is_none() && len < VNET_HDR_LEN + 14 {
                bad = Some("a frame shorter than its header and an Ethernet header");
            }
            match bad {
                Some(why) => {
                    self.counters.dropped += 1;
                    self.log
                        .log(format_args!("{}: tx chain {head} dropped: {why}", self.id));
                }
                None => {
                    // No offloads were offered: whatever the guest put in
                    // the header means nothing, and the tap must not act on it.
                    self.tx_buf[..VNET_HDR_LEN].fill(0);
                    match (&self.tap.file).write(&self.tx_buf[..len]) {
                        // A tap takes a frame whole or not at all.
                        Ok(n) if n == len => self.counters.tx_frames += 1,
                        // A full tap drops, as a wire would.
                        r => {
                            self.counters.dropped += 1;
                            self.log.log(format_args!("{}: tap write: {r:?}", self.id));
                        }
                    }
                }
            }
            queue.add_used(mem, head, 0).map_err(NetError::UsedRing)?;
            done += 1;
        }
        if done == BURST {
            // There may be more: come back after the other events.
            let _ = self.queue_evts[TX].write(1);
        }
        if done > 0 {
            self.raise(TX)?;
        }
        Ok(done)
    }

    /// Moves frames from the tap into the guest's rx buffers, up to BURST.
    /// Returns whether the tap should stay watched (false: the guest has no
    /// buffer for the frame that waits).
    pub fn process_rx(&mut self) -> Result<bool, NetError> {
        if self.paused || self.mem.is_none() {
            return Ok(false);
        }
        let mut delivered = 0;
        let mut result = Ok(true);
        for _ in 0..BURST {
            if self.rx_len == 0 {
                if let Some(frame) = self.pending.pop_front() {
                    // Bounded by MAX_FRAME when it was held or restored.
                    self.rx_buf[..frame.len()].copy_from_slice(&frame);
                    self.rx_len = frame.len();
                } else {
                    match (&self.tap.file).read(&mut self.rx_buf) {
                        Ok(n) if n >= VNET_HDR_LEN => self.rx_len = n,
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // Say so, and stop watching: a tap in error stays
                            // readable to epoll, and the loop must not spin on it.
                            self.log
                                .log(format_args!("{}: tap read: {e}; tap unwatched", self.id));
                            result = Ok(false);
                            break;
                        }
                    }
                }
            }
            match self.deliver() {
                Ok(true) => delivered += 1,
                Ok(false) => {
                    result = Ok(false);
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if delivered > 0 {
            self.raise(RX)?;
        }
        result
    }

    /// Puts the waiting frame into the next rx buffer. False: no buffer.
    fn deliver(&mut self) -> Result<bool, NetError> {
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(RX)) else {
            return Ok(false);
        };
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        // Header as the guest must see it: no flags, no GSO, one buffer.
        self.rx_buf[..VNET_HDR_LEN].fill(0);
        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
        let frame = &self.rx_buf[..self.rx_len];
        let mut written = 0usize;
        let mut why = None;
        for d in chain {
            if written == frame.len() {
                break;
            }
            if !d.is_write_only() {
                why = Some("a device-readable descriptor in an rx chain");
                break;
            }
            let n = (d.len() as usize).min(frame.len() - written);
            if let Err(e) = mem.write_slice(&frame[written..written + n], d.addr()) {
                self.log
                    .log(format_args!("{}: rx buffer {head}: {e}", self.id));
                why = Some("a buffer outside guest memory");
                break;
            }
            written += n;
        }
        if why.is_none() && written < frame.len() {
            why = Some("buffers too small for the frame");
        }
        self.rx_len = 0;
        let used = match why {
            None => {
                self.counters.rx_frames += 1;
                written as u32
            }
            Some(why) => {
                self.counters.dropped += 1;
                self.log
                    .log(format_args!("{}: rx frame dropped: {why}", self.id));
                0
            }
        };
        queue
            .add_used(mem, head, used)
            .map_err(NetError::UsedRing)?;
        Ok(true)
    }

    /// Serves the control queue: every well-formed command gets its ack
    /// byte (VIRTIO_NET_OK for ANNOUNCE_ACK, which clears
    /// VIRTIO_NET_S_ANNOUNCE; VIRTIO_NET_ERR for anything else), a
    /// malformed chain is completed unanswered and counted. Returns how
    /// many chains were completed.
    pub fn process_ctrl(&mut self) -> Result<usize, NetError> {
        if self.paused || self.acked_features & (1u64 << F_CTRL_VQ) == 0 {
            return Ok(0);
        }
        let guest_announce = self.acked_features & (1u64 << F_GUEST_ANNOUNCE) != 0;
        let (Some(mem), Some(queue)) = (self.mem.as_ref(), self.queues.get_mut(CTRL)) else {
            return Ok(0);
        };
        if !queue.ready() {
            return Ok(0);
        }
        let mut done = 0;
        while done < CTRL_BURST {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs = chain.map(|d| (GuestAddress(d.addr().0), d.len(), d.is_write_only()));
            let used = match parse_ctrl(mem, descs) {
                Ok(cmd) => {
                    let ack = match (cmd.class, cmd.cmd, cmd.data_len) {
                        (CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, 0) if guest_announce => {
                            self.announce_status = false;
                            self.announce_asked = false;
                            CTRL_OK
                        }
                        (class, c, len) => {
                            self.log.log(format_args!(
                                "{}: control command class {class} command {c} ({len} data \
                                 bytes) not supported: answered VIRTIO_NET_ERR",
                                self.id
                            ));
                            CTRL_ERR
                        }
                    };
                    match mem.write_obj(ack, cmd.ack) {
                        Ok(()) => {
                            if ack == CTRL_OK {
                                self.counters.ctrl_ok += 1;
                            } else {
                                self.counters.ctrl_err += 1;
                            }
                            1
                        }
                        Err(e) => {
                            self.counters.ctrl_dropped += 1;
                            self.log
                                .log(format_args!("{}: control ack {head}: {e}", self.id));
                            0
                        }
                    }
                }
                Err(why) => {
                    self.counters.ctrl_dropped += 1;
                    self.log.log(format_args!(
                        "{}: control chain {head} dropped: {why}",
                        self.id
                    ));
                    0
                }
            };
            queue
                .add_used(mem, head, used)
                .map_err(NetError::UsedRing)?;
            done += 1;
        }
        if done == CTRL_BURST {
            let _ = self.queue_evts[CTRL].write(1);
        }
        if done > 0 {
            self.raise(CTRL)?;
        }
        Ok(done)
    }

    /// Watches or unwatches the tap as the rx side needs.
    fn watch_tap(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.tap_watched {
            return;
        }
        let ev = Events::with_data(&self.tap.file, EV_TAP, EventSet::IN);
        let r = if want { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.tap_watched = want,
            Err(e) => eprintln!("ferry: net {}: cannot (un)watch the tap: {e:?}", self.id),
        }
    }
}

/// A control command as the driver laid it out: its class and command,
/// how many data bytes followed them, and where its ack byte goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtrlCommand {
    pub class: u8,
    pub cmd: u8,
    pub data_len: usize,
    pub ack: GuestAddress,
}

/// Parses one control chain, given as (address, length, device-writable)
/// descriptors in order: device-readable parts first (the 2-byte class and
/// command header, then the data, at most MAX_CTRL_COMMAND bytes in all),
/// then device-writable ones, the first writable byte being the ack. Reads
/// only the two header bytes; nothing is allocated. The chain's length is
/// bounded by the queue (virtio-queue stops a chain at the queue size).
pub fn parse_ctrl<M: Bytes<GuestAddress>>(
    mem: &M,
    descs: impl Iterator<Item = (GuestAddress, u32, bool)>,
) -> Result<CtrlCommand, &'static str> {
    let mut hdr = [0u8; 2];
    let mut readable = 0usize;
    let mut ack = None;
    let mut seen_writable = false;
    for (i, (addr, len, writable)) in descs.enumerate() {
        let len = len as usize;
        if writable {
            if i == 0 {
                return Err("a device-writable class and command header");
            }
            seen_writable = true;
            if ack.is_none() && len > 0 {
                ack = Some(addr);
            }
            continue;
        }
        if seen_writable {
            return Err("a device-readable descriptor after the device-writable ack");
        }
        if readable + len > MAX_CTRL_COMMAND {
            return Err("a command longer than 4 KiB");
        }
        // The header may be split across descriptors.
        let want = hdr.len().saturating_sub(readable).min(len);
        if want > 0 {
            mem.read_slice(&mut hdr[readable..readable + want], addr)
                .map_err(|_| "a header outside guest memory")?;
        }
        readable += len;
    }
    if readable < 2 {
        return Err("a command shorter than its class and command header");
    }
    let Some(ack) = ack else {
        return Err("no device-writable byte for the ack");
    };
    Ok(CtrlCommand {
        class: hdr[0],
        cmd: hdr[1],
        data_len: readable - 2,
        ack,
    })
}

/// A RARP request for `mac` from `mac`, to everyone, behind an empty
/// virtio-net header: what QEMU's announce-self sends. Any frame teaches a
/// switch the source port; this one needs no IP address.
pub fn rarp_frame(mac: &[u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + 60];
    let e = &mut f[VNET_HDR_LEN..];
    e[0..6].fill(0xff);
    e[6..12].copy_from_slice(mac);
    e[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
    e[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    e[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    e[18] = 6;
    e[19] = 4;
    e[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    e[22..28].copy_from_slice(mac);
    e[32..38].copy_from_slice(mac);
    f
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            id: self.id.clone(),
            mac: self.mac,
            acked_features: self.acked_features,
            pending: self.pending.iter().cloned().collect(),
            announce: self.announce_status,
        }
    }

    /// Opens this host's tap; the address is the one the guest knows.
    fn restore(args: NetArgs, state: &NetState) -> Result<Net, NetError> {
        check_state(&args.id, state)?;
        let tap = Tap::open(&args.tap)?;
        Net::restore_on(tap, args.id, state)
    }
}

/// What a saved state must be before anything is built from it: it may come
/// from another host.
fn check_state(id: &str, state: &NetState) -> Result<(), NetError> {
    if id != state.id {
        return Err(NetError::StateMismatch {
            id: id.to_string(),
            saved: state.id.clone(),
        });
    }
    // Its address must be one a NIC may have before anything is sent from it.
    if state.mac[0] & 1 != 0 || state.mac == [0; 6] {
        return Err(NetError::StateMac {
            id: id.to_string(),
            mac: format_mac(&state.mac),
        });
    }
    let frames = state.pending.len();
    let bytes: usize = state.pending.iter().map(Vec::len).sum();
    let why = if frames > MAX_CARRIED_FRAMES {
        Some("more frames than a device holds")
    } else if bytes > MAX_CARRIED_BYTES {
        Some("more bytes than a device holds")
    } else if state
        .pending
        .iter()
        .any(|f| f.len() < VNET_HDR_LEN + 14 || f.len() > MAX_FRAME)
    {
        Some("a frame shorter than its headers or longer than 64 KiB")
    } else {
        None
    };
    match why {
        Some(why) => Err(NetError::StateFrames {
            id: id.to_string(),
            frames,
            bytes,
            why,
        }),
        None => Ok(()),
    }
}

/// A transport state saved before the control queue existed has two
/// queues; the device has three now. Such a driver cannot have negotiated
/// CTRL_VQ, so the third is one it never configured. Any other mismatch is
/// left for the transport's restore to refuse.
pub fn upgrade_transport_state(
    state: &super::MmioTransportState,
) -> std::borrow::Cow<'_, super::MmioTransportState> {
    let old_layout = state.device_type == TYPE_NET
        && state.queues.len() == CTRL
        && state.acked_features & (1u64 << F_CTRL_VQ) == 0;
    if !old_layout {
        return std::borrow::Cow::Borrowed(state);
    }
    let mut state = state.clone();
    let unconfigured = Queue::new(CTRL_QUEUE_SIZE).map(|q| q.state().into());
    if let Ok(q) = unconfigured {
        state.queues.push(q);
    }
    std::borrow::Cow::Owned(state)
}

impl Net {
    /// [`Persist::restore`] on a tap this host opened already (a migration's
    /// destination opens it at the handshake, to announce the guest there
    /// the moment the source pauses).
    pub fn restore_on(tap: Tap, id: String, state: &NetState) -> Result<Net, NetError> {
        check_state(&id, state)?;
        let mut net = Net::on_tap(id, tap, state.mac)?;
        net.pending = state.pending.iter().cloned().collect();
        if state.acked_features & !net.avail_features != 0 {
            return Err(NetError::Features {
                acked: state.acked_features,
                avail: net.avail_features,
            });
        }
        let guest_announce = 1u64 << F_GUEST_ANNOUNCE;
        if state.acked_features & guest_announce != 0
            && state.acked_features & (1u64 << F_CTRL_VQ) == 0
        {
            return Err(NetError::StateAnnounce {
                id: net.id.clone(),
                acked: state.acked_features,
                why: "has GUEST_ANNOUNCE without the control queue it needs",
            });
        }
        if state.announce && state.acked_features & guest_announce == 0 {
            return Err(NetError::StateAnnounce {
                id: net.id.clone(),
                acked: state.acked_features,
                why: "asks a guest that did not negotiate GUEST_ANNOUNCE to announce itself",
            });
        }
        net.acked_features = state.acked_features;
        net.announce_status = state.announce;
        net.restored = true;
        Ok(net)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn set_acked_features(&mut self, features: u64) {
        let mut features = features & self.avail_features;
        if features & (1u64 << F_GUEST_ANNOUNCE) != 0 && features & (1u64 << F_CTRL_VQ) == 0 {
            // Its acknowledgement is a control command (virtio 1.2, 5.1.3.1).
            self.log.log(format_args!(
                "{}: driver accepted GUEST_ANNOUNCE without CTRL_VQ; GUEST_ANNOUNCE dropped",
                self.id
            ));
            features &= !(1u64 << F_GUEST_ANNOUNCE);
        }
        self.acked_features = features;
    }

    /// `virtio_net_config`: mac, status (link up; announce when asked).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        let mut status = S_LINK_UP;
        if self.announce_status {
            status |= S_ANNOUNCE;
        }
        config[6..8].copy_from_slice(&status.to_le_bytes());
        super::read_config_space(&config, offset, data);
    }

    fn config_epoch(&self) -> u32 {
        self.config_epoch
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR the address is read-only.
        self.log.log(format_args!(
            "{}: {}-byte write to read-only config space at {offset:#x}; ignored",
            self.id,
            data.len()
        ));
    }

    fn activate(&mut self, mem: GuestMemoryMmap, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if self.mem.is_some() {
            return Err(ActivateError::AlreadyActivated);
        }
        if queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: queues.len(),
            });
        }
        // The control queue is the driver's to use only with CTRL_VQ; a
        // driver without it leaves the queue unconfigured.
        let ctrl = self.acked_features & (1u64 << F_CTRL_VQ) != 0;
        if let Some(i) = queues
            .iter()
            .enumerate()
            .position(|(i, q)| (i != CTRL || ctrl) && !q.is_valid(&mem))
        {
            return Err(ActivateError::InvalidQueue(i));
        }
        self.mem = Some(mem);
        self.queues = queues;
        // Buffers and frames made available before a snapshot may never
        // have been announced to this instance: look at both rings once.
        for evt in &self.queue_evts {
            evt.write(1).map_err(ActivateError::QueueEvent)?;
        }
        // The guest's driver brought the link up: tell the switches where
        // this address is now (a switch may remember it on another port,
        // from an earlier life of the guest elsewhere).
        if !std::mem::take(&mut self.restored) {
            self.announce_by_device();
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn reset(&mut self) {
        self.restored = false;
        self.mem = None;
        self.queues.clear();
        self.acked_features = 0;
        self.announce_status = false;
        self.announce_asked = false;
        self.rx_len = 0;
        // Held frames stay: a transport's restore resets its device before
        // activating it, and they are for whichever driver runs next.
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<IrqTrigger> {
        &self.irq
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let data = [EV_RX_QUEUE, EV_TX_QUEUE, EV_CTRL_QUEUE];
        for (i, (evt, data)) in self.queue_evts.iter().zip(data).enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                eprintln!(
                    "ferry: virtio-net: {}: cannot watch queue {i}: {e:?}",
                    self.id
                );
            }
        }
        let timer = Events::with_data(&self.announce_timer, EV_ANNOUNCE, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            eprintln!(
                "ferry: virtio-net: {}: cannot watch its timer: {e:?}",
                self.id
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            EV_RX_QUEUE | EV_TX_QUEUE => {
                let _ = self.queue_evts[events.data() as usize].read();
                if events.data() == EV_TX_QUEUE {
                    if let Err(e) = self.process_tx() {
                        self.log.log(format_args!("{}: {e}", self.id));
                    }
                }
            }
            EV_CTRL_QUEUE => {
                let _ = self.queue_evts[CTRL].read();
                if let Err(e) = self.process_ctrl() {
                    self.log.log(format_args!("{}: {e}", self.id));
                }
                return;
            }
            EV_ANNOUNCE => {
                let _ = self.announce_timer.wait();
                self.send_due_announcements();
                return;
            }
            _ => {}
        }
        // Every event may have changed what rx can do: the guest gave
        // buffers, frames came, the device was unpaused.
        let watch = match self.process_rx() {
            Ok(w) => w,
            Err(e) => {
                self.log.log(format_args!("{}: {e}", self.id));
                false
            }
        };
        let watch = watch && !self.paused && self.mem.is_some();
        self.watch_tap(ops, watch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_are_checked() {
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01").unwrap(),
            [2, 0, 0x0a, 0xff, 0x10, 1]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:0g",
            "002:00:00:00:00:01",
            "01:00:00:00:00:01",
            "00:00:00:00:00:00",
            "+2:00:00:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
        for _ in 0..32 {
            let m = random_mac().unwrap();
            assert_eq!(m[0] & 3, 2, "locally administered unicast");
            assert_eq!(parse_mac(&format_mac(&m)).unwrap(), m);
        }
    }

    #[test]
    fn tap_names_are_checked() {
        for good in ["tap0", "ferry-n0.1", "a23456789012345"] {
            check_tap_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a234567890123456",
            "t\n",
        ] {
            assert!(check_tap_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn ctrl_mem() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10_000)]).unwrap();
        mem.write_slice(&[CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK], GuestAddress(0x100))
            .unwrap();
        mem
    }

    fn g(a: u64) -> GuestAddress {
        GuestAddress(a)
    }

    #[test]
    fn control_commands_are_parsed_within_bounds() {
        let mem = ctrl_mem();
        let parse =
            |d: &[(u64, u32, bool)]| parse_ctrl(&mem, d.iter().map(|&(a, l, w)| (g(a), l, w)));
        // The well-formed ack, and one split across descriptors.
        let ok = parse(&[(0x100, 2, false), (0x200, 1, true)]).unwrap();
        assert_eq!(
            ok,
            CtrlCommand {
                class: CTRL_ANNOUNCE,
                cmd: CTRL_ANNOUNCE_ACK,
                data_len: 0,
                ack: g(0x200)
            }
        );
        let split = parse(&[(0x100, 1, false), (0x101, 1, false), (0x200, 4, true)]).unwrap();
        assert_eq!(split, ok);
        // Data after the header is counted, not read.
        let data = parse(&[(0x100, 2, false), (0x8000, 100, false), (0x200, 1, true)]).unwrap();
        assert_eq!(data.data_len, 100);
        // An unknown class parses (and is answered ERR by the device).
        mem.write_slice(&[0x7f, 9], g(0x300)).unwrap();
        let unknown = parse(&[(0x300, 2, false), (0x200, 1, true)]).unwrap();
        assert_eq!((unknown.class, unknown.cmd), (0x7f, 9));
        type Chain = Vec<(u64, u32, bool)>;
        let hostile: [(&str, Chain); 8] = [
            ("short", vec![(0x100, 1, false), (0x200, 1, true)]),
            ("empty", vec![]),
            ("no ack", vec![(0x100, 2, false)]),
            ("zero-length ack", vec![(0x100, 2, false), (0x200, 0, true)]),
            ("writable header", vec![(0x100, 2, true), (0x200, 1, true)]),
            (
                "readable after the ack",
                vec![(0x100, 2, false), (0x200, 1, true), (0x300, 2, false)],
            ),
            (
                "oversized",
                vec![(0x100, 2, false), (0x1000, 4095, false), (0x200, 1, true)],
            ),
            (
                "header outside memory",
                vec![(0xffff, 2, false), (0x200, 1, true)],
            ),
        ];
        for (what, d) in hostile {
            assert!(parse(&d).is_err(), "{what} accepted");
        }
        // A length near u32::MAX is refused by size, not added up past it.
        assert!(parse(&[(0x100, u32::MAX, false), (0x200, 1, true)]).is_err());
    }

    #[test]
    fn old_transport_states_get_an_unconfigured_control_queue() {
        let q = crate::devices::virtio::QueueSnapshot {
            max_size: QUEUE_SIZE,
            size: QUEUE_SIZE,
            ..Default::default()
        };
        let old = crate::devices::virtio::MmioTransportState {
            device_type: TYPE_NET,
            device_status: 0xf,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 1 << 32 | 1 << F_MAC,
            queue_sel: 0,
            queues: vec![q, q],
            interrupt_status: 0,
            config_generation: 0,
        };
        let up = upgrade_transport_state(&old);
        assert_eq!(up.queues.len(), 3);
        assert_eq!(up.queues[2].max_size, CTRL_QUEUE_SIZE);
        assert!(!up.queues[2].ready);
        // A driver that negotiated CTRL_VQ had three queues: left alone.
        let mut bad = old.clone();
        bad.acked_features |= 1 << F_CTRL_VQ;
        assert_eq!(upgrade_transport_state(&bad).queues.len(), 2);
        // And an old NetState reads without the announce bit.
        let st: NetState =
            serde_json::from_str(r#"{"id":"n0","mac":[2,0,0,0,0,1],"acked_features":0}"#).unwrap();
        assert!(!st.announce);
    }

    #[test]
    fn rarp_announces_the_address() {
        let mac = [2, 1, 2, 3, 4, 5];
        let f = rarp_frame(&mac);
        assert_eq!(f.len(), VNET_HDR_LEN + 60);
        assert!(f[..VNET_HDR_LEN].iter().all(|&b| b == 0));
        let e = &f[VNET_HDR_LEN..];
        assert_eq!(&e[0..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &mac);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &mac);
        assert_eq!(&e[32..38], &mac);
    }

    #[test]
    fn config_space_holds_mac_and_link_up() {
        if !crate::util::tests_can_create_taps() {
            return;
        }
        let net = Net::new("n0".into(), "ferryut-cfg0", [2, 9, 8, 7, 6, 5]).unwrap();
        let mut b = [0u8; 8];
        net.read_config(0, &mut b);
        assert_eq!(b, [2, 9, 8, 7, 6, 5, 1, 0]);
        let mut b = [0xffu8; 4];
        net.read_config(6, &mut b);
        assert_eq!(b, [1, 0, 0, 0]);
        net.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(net.device_type(), TYPE_NET);
        assert_eq!(
            net.queue_max_sizes(),
            &[QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
        );
        let st = net.save();
        assert_eq!(st.mac, [2, 9, 8, 7, 6, 5]);
        drop(net);
        let bad = Net::restore(
            NetArgs {
                id: "other".into(),
                tap: "ferryut-cfg0".into(),
            },
            &st,
        );
        assert!(matches!(bad, Err(NetError::StateMismatch { .. })));
        let mut wrong = st.clone();
        wrong.acked_features = 1 << 40;
        let bad = Net::restore(
            NetArgs {
                id: "n0".into(),
                tap: "ferryut-cfg0".into(),
            },
            &wrong,
        );
        assert!(matches!(bad, Err(NetError::Features { .. })));
        for mac in [[0xff; 6], [0; 6], [1, 0, 0, 0, 0, 1]] {
            let mut wrong = st.clone();
            wrong.mac = mac;
            let bad = Net::restore(
                NetArgs {
                    id: "n0".into(),
                    tap: "ferryut-cfg0".into(),
                },
                &wrong,
            );
            assert!(matches!(bad, Err(NetError::StateMac { .. })), "{mac:?}");
        }
    }

    mod rings {
        use super::*;
        use std::sync::atomic::{AtomicU32, Ordering};
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        const W: u16 = VRING_DESC_F_WRITE as u16;
        const MEM: usize = 0x40_0000;

        fn unique_tap() -> String {
            static N: AtomicU32 = AtomicU32::new(0);
            format!(
                "fut{}-{}",
                std::process::id() % 100_000,
                N.fetch_add(1, Ordering::SeqCst)
            )
        }

        fn chain(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, parts: &[(u64, u32, u16)]) {
            let descs: Vec<RawDescriptor> = parts
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, flags))| {
                    let last = i == parts.len() - 1;
                    let next = if last { 0 } else { first + i as u16 + 1 };
                    let flags = if last {
                        flags
                    } else {
                        flags | VRING_DESC_F_NEXT as u16
                    };
                    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
                })
                .collect();
            vq.add_desc_chains(&descs, first).unwrap();
        }

        /// A device on a fresh tap whose two queues are `rx` and `tx`.
        fn device(
            mem: &GuestMemoryMmap,
            rx: &MockSplitQueue<GuestMemoryMmap>,
            tx: &MockSplitQueue<GuestMemoryMmap>,
        ) -> Net {
            let mut net = Net::new("n0".into(), &unique_tap(), [2, 0, 0, 0, 0, 1]).unwrap();
            // A driver without the control queue leaves it unconfigured.
            let basic = net.avail_features() & !(1 << F_CTRL_VQ | 1 << F_GUEST_ANNOUNCE);
            net.set_acked_features(basic);
            let queues = vec![
                rx.create_queue::<Queue>().unwrap(),
                tx.create_queue().unwrap(),
                Queue::new(CTRL_QUEUE_SIZE).unwrap(),
            ];
            net.activate(mem.clone(), queues).unwrap();
            net
        }

        /// A device whose driver negotiated CTRL_VQ and GUEST_ANNOUNCE.
        fn announcing_device(
            mem: &GuestMemoryMmap,
            rx: &MockSplitQueue<GuestMemoryMmap>,
            tx: &MockSplitQueue<GuestMemoryMmap>,
            ctrl: &MockSplitQueue<GuestMemoryMmap>,
        ) -> Net {
            let mut net = Net::new("n0".into(), &unique_tap(), [2, 0, 0, 0, 0, 1]).unwrap();
            net.set_acked_features(net.avail_features());
            let queues = vec![
                rx.create_queue::<Queue>().unwrap(),
                tx.create_queue().unwrap(),
                ctrl.create_queue().unwrap(),
            ];
            net.activate(mem.clone(), queues).unwrap();
            net
        }

        fn status(net: &Net) -> u16 {
            let mut b = [0u8; 2];
            net.read_config(6, &mut b);
            u16::from_le_bytes(b)
        }

        #[test]
        fn a_guest_with_guest_announce_is_asked_and_its_ack_clears_the_bit() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
            let ctrl = MockSplitQueue::create(&mem, GuestAddress(0x30_0000), 16);
            let mut net = announcing_device(&mem, &rx, &tx, &ctrl);
            // Activation by the driver announces by RARP, as before.
            let rarps = net.counters().announcements;
            net.irq.set_status(0);
            let epoch = net.config_epoch();
            net.announce();
            assert_eq!(status(&net), S_LINK_UP | S_ANNOUNCE);
            assert_eq!(net.irq.status() & VIRTIO_INT_CONFIG, VIRTIO_INT_CONFIG);
            assert_ne!(net.config_epoch(), epoch, "ConfigGeneration moves");
            assert_eq!(net.counters().guest_announce_requests, 1);
            assert_eq!(
                net.counters().announcements,
                rarps,
                "no RARP: the guest speaks"
            );
            assert_eq!(net.announce_next, ANNOUNCE_AT_MS.len(), "no RARP series");
            // Asked again before the ack (build, then start): not twice.
            let epoch = net.config_epoch();
            net.announce();
            assert_eq!(net.counters().guest_announce_requests, 1);
            assert_eq!(net.config_epoch(), epoch);
            // The bit travels with the state.
            assert!(net.save().announce);
            // An unknown class is answered ERR and leaves the bit.
            mem.write_slice(&[1, 0], GuestAddress(0x1000)).unwrap();
            mem.write_obj(0x55u8, GuestAddress(0x1100)).unwrap();
            chain(&ctrl, 0, &[(0x1000, 2, 0), (0x1100, 1, W)]);
            assert_eq!(net.process_ctrl().unwrap(), 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1100)).unwrap(), CTRL_ERR);
            assert_eq!(ctrl.used().ring().ref_at(0).unwrap().load().len(), 1);
            assert_eq!(status(&net), S_LINK_UP | S_ANNOUNCE);
            // ANNOUNCE_ACK with data is not the command: ERR too.
            mem.write_slice(&[CTRL_ANNOUNCE, CTRL_ANNOUNCE_ACK, 9], GuestAddress(0x1200))
                .unwrap();
            chain(&ctrl, 2, &[(0x1200, 3, 0), (0x1300, 1, W)]);
            assert_eq!(net.process_ctrl().unwrap(), 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1300)).unwrap(), CTRL_ERR);
            // A hostile chain is completed unanswered and counted.
            mem.write_obj(0x55u8, GuestAddress(0x1500)).unwrap();
            chain(&ctrl, 4, &[(0x1400, 2, W), (0x1500, 1, W)]);
            assert_eq!(net.process_ctrl().unwrap(), 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1500)).unwrap(), 0x55);
            assert_eq!(ctrl.used().ring().ref_at(2).unwrap().load().len(), 0);
            // The ack, split over two descriptors, clears the bit.
            mem.write_slice(&[CTRL_ANNOUNCE], GuestAddress(0x1600))
                .unwrap();
            mem.write_slice(&[CTRL_ANNOUNCE_ACK], GuestAddress(0x1700))
                .unwrap();
            chain(&ctrl, 6, &[(0x1600, 1, 0), (0x1700, 1, 0), (0x1800, 1, W)]);
            assert_eq!(net.process_ctrl().unwrap(), 1);
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1800)).unwrap(), CTRL_OK);
            assert_eq!(status(&net), S_LINK_UP);
            assert!(!net.save().announce);
            let c = net.counters();
            assert_eq!((c.ctrl_ok, c.ctrl_err, c.ctrl_dropped), (1, 2, 1));
            assert_eq!(ctrl.used().idx().load(), 4);
            // Once acked, a later move asks again.
            net.announce();
            assert_eq!(net.counters().guest_announce_requests, 2);
            assert_eq!(status(&net), S_LINK_UP | S_ANNOUNCE);
        }

        #[test]
        fn a_guest_without_guest_announce_gets_the_devices_rarps() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
            let mut net = device(&mem, &rx, &tx);
            net.irq.set_status(0);
            net.announce();
            // The first RARP went (or was tried: the tap is down here) at
            // once, the others wait for the timer.
            assert_eq!(net.announce_next, 1, "a RARP series runs");
            assert_eq!(net.counters().guest_announce_requests, 0);
            assert_eq!(status(&net), S_LINK_UP);
            assert_eq!(net.irq.status(), 0, "no config interrupt");
            // Its control queue is not there to serve.
            assert_eq!(net.process_ctrl().unwrap(), 0);
        }

        #[test]
        fn hostile_tx_chains_are_dropped_and_completed() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
            let mut net = device(&mem, &rx, &tx);
            // A device-writable buffer, a frame of 128 KiB in 64 KiB parts,
            // a buffer past the end of memory, a frame shorter than its
            // headers, and one good frame.
            chain(&tx, 0, &[(0x1000, 64, W)]);
            chain(&tx, 1, &[(0x1_0000, 0x1_0000, 0), (0x2_0000, 0x1_0000, 0)]);
            chain(&tx, 3, &[(MEM as u64 - 16, 64, 0)]);
            chain(&tx, 4, &[(0x1000, 20, 0)]);
            chain(&tx, 5, &[(0x1000, 12, 0), (0x2000, 60, 0)]);
            assert_eq!(net.process_tx().unwrap(), 5);
            assert_eq!(tx.used().idx().load(), 5);
            let c = net.counters();
            // The good frame goes out only if the tap is up; either way it is
            // accounted for, and the four bad ones are dropped.
            assert_eq!(c.tx_frames + c.dropped, 5);
            assert!(c.dropped >= 4, "{c:?}");
            // Nothing more is taken than was offered.
            assert_eq!(net.process_tx().unwrap(), 0);
        }

        #[test]
        fn a_guest_flooding_tx_gets_a_burst_per_event_and_a_second_turn() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 512);
            let mut net = device(&mem, &rx, &tx);
            let _ = net.queue_evts[TX].read();
            for i in 0..300u16 {
                chain(&tx, i, &[(0x1000, 60, 0)]);
            }
            // One event takes a burst and asks for another turn on the loop.
            assert_eq!(net.process_tx().unwrap(), BURST);
            assert_eq!(net.queue_evts[TX].read().unwrap(), 1);
            // The rest on the next turn, with no further turn asked for.
            assert_eq!(net.process_tx().unwrap(), 300 - BURST);
            assert!(net.queue_evts[TX].read().is_err());
            assert_eq!(tx.used().idx().load(), 300);
        }

        /// Sends Ethernet frames out of interface `name` (brought up
        /// first): the tap's reader gets them, behind a virtio-net header.
        fn inject(name: &str, frames: &[Vec<u8>]) {
            // Nothing but these frames: no IPv6 solicitations once it is up.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
            let up = std::process::Command::new("ip")
                .args(["link", "set", name, "up"])
                .status()
                .unwrap();
            assert!(up.success());
            let cname = std::ffi::CString::new(name).unwrap();
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            assert!(ifindex > 0, "{name}: {}", io::Error::last_os_error());
            // SAFETY: plain socket(2); the fd is checked and owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            assert!(fd >= 0, "{}", io::Error::last_os_error());
            // SAFETY: fd is ours.
            let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            for f in frames {
                // SAFETY: `f` and `addr` outlive the call, lengths are theirs.
                let n = unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        f.as_ptr().cast(),
                        f.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(n, f.len() as isize, "{}", io::Error::last_os_error());
            }
        }

        fn eth_frame(tag: u8) -> Vec<u8> {
            let mut f = vec![0u8; 60];
            f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
            f[14..].fill(tag);
            f
        }

        /// A migration's cutover: frames the paused guest could not take,
        /// and those that reached the tap after the pause, go with the
        /// state and come first, in order and once, on the next host.
        #[test]
        fn frames_waiting_at_the_pause_go_with_the_state_and_come_first() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
            let mut net = device(&mem, &rx, &tx);
            let name = net.tap_name().to_string();
            // One rx buffer for three frames: one delivered, one waiting in
            // the device, one on the tap.
            chain(&rx, 0, &[(0x3000, 2048, W)]);
            inject(&name, &[eth_frame(1), eth_frame(2), eth_frame(3)]);
            assert!(!net.process_rx().unwrap());
            assert_eq!(rx.used().idx().load(), 1);
            net.pause().unwrap();
            // After the pause, before the state is saved.
            inject(&name, &[eth_frame(4)]);
            assert_eq!(net.hold_queued(), 2);
            let st = net.save();
            assert_eq!(st.pending.len(), 3);
            assert_eq!(net.counters().dropped, 0);
            drop(net);

            let mem2 = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx2 = MockSplitQueue::new(&mem2, 16);
            let tx2 = MockSplitQueue::create(&mem2, GuestAddress(0x20_0000), 16);
            let tap = Tap::open(&unique_tap()).unwrap();
            let mut there = Net::restore_on(tap, "n0".into(), &st).unwrap();
            for i in 0..4u16 {
                chain(&rx2, i, &[(0x4000 + u64::from(i) * 0x1000, 2048, W)]);
            }
            let queues = vec![
                rx2.create_queue::<Queue>().unwrap(),
                tx2.create_queue().unwrap(),
                Queue::new(CTRL_QUEUE_SIZE).unwrap(),
            ];
            there.activate(mem2.clone(), queues).unwrap();
            there.process_rx().unwrap();
            assert_eq!(rx2.used().idx().load(), 3);
            for (i, tag) in [2u8, 3, 4].into_iter().enumerate() {
                let at = GuestAddress(0x4000 + i as u64 * 0x1000 + (VNET_HDR_LEN + 14) as u64);
                assert_eq!(mem2.read_obj::<u8>(at).unwrap(), tag, "buffer {i}");
                let used = rx2.used().ring().ref_at(i).unwrap().load();
                assert_eq!(used.len() as usize, VNET_HDR_LEN + 60);
            }
            assert_eq!(there.save().pending.len(), 0, "delivered once");

            // What a state may carry is bounded and checked.
            let restore =
                |st: &NetState| Net::restore_on(Tap::open(&unique_tap()).unwrap(), "n0".into(), st);
            let mut bad = st.clone();
            bad.pending = vec![vec![0u8; 80]; MAX_CARRIED_FRAMES + 1];
            assert!(matches!(restore(&bad), Err(NetError::StateFrames { .. })));
            let mut bad = st.clone();
            bad.pending = vec![vec![0u8; 10]];
            assert!(matches!(restore(&bad), Err(NetError::StateFrames { .. })));
            let mut bad = st.clone();
            bad.pending = vec![vec![0u8; MAX_FRAME + 1]];
            assert!(matches!(restore(&bad), Err(NetError::StateFrames { .. })));
            let mut bad = st;
            bad.pending = vec![vec![0u8; 60_000]; 10];
            assert!(matches!(restore(&bad), Err(NetError::StateFrames { .. })));
        }

        #[test]
        fn rx_frames_never_overrun_the_guest_buffers() {
            if !crate::util::tests_can_create_taps() {
                return;
            }
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let rx = MockSplitQueue::new(&mem, 16);
            let tx = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
            let mut net = device(&mem, &rx, &tx);
            let frame = |net: &mut Net, len: usize| {
                for (i, b) in net.rx_buf[..len].iter_mut().enumerate() {
                    *b = (i % 251) as u8 | 1;
                }
                net.rx_len = len;
            };
            mem.write_slice(&[0u8; 256], GuestAddress(0x3000)).unwrap();
            // Too small: dropped, nothing written past the 100 bytes.
            chain(&rx, 0, &[(0x3000, 100, W)]);
            frame(&mut net, 150);
            assert!(net.deliver().unwrap());
            let mut after = [0u8; 8];
            mem.read_slice(&mut after, GuestAddress(0x3000 + 100))
                .unwrap();
            assert_eq!(after, [0; 8]);
            // A device-readable buffer is not written to.
            chain(&rx, 1, &[(0x4000, 2048, 0)]);
            frame(&mut net, 80);
            assert!(net.deliver().unwrap());
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x4000)).unwrap(), 0);
            // A good chain in two parts gets the frame with a clean header.
            chain(&rx, 2, &[(0x5000, 40, W), (0x6000, 2048, W)]);
            frame(&mut net, 90);
            assert!(net.deliver().unwrap());
            let mut hdr = [0xffu8; 12];
            mem.read_slice(&mut hdr, GuestAddress(0x5000)).unwrap();
            assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            let mut rest = [0u8; 50];
            mem.read_slice(&mut rest, GuestAddress(0x6000)).unwrap();
            assert!(rest
                .iter()
                .enumerate()
                .all(|(i, &b)| b == ((i + 40) % 251) as u8 | 1));
            let used = |i: usize| rx.used().ring().ref_at(i).unwrap().load();
            assert_eq!((used(0).len(), used(1).len(), used(2).len()), (0, 0, 90));
            assert_eq!(net.counters().dropped, 2);
            assert_eq!(net.counters().rx_frames, 1);
            // No buffer: the frame waits, and pausing holds it for the
            // state, once (nothing is dropped).
            frame(&mut net, 60);
            assert!(!net.deliver().unwrap());
            assert_eq!(net.rx_len, 60);
            net.pause().unwrap();
            assert_eq!(net.rx_len, 0);
            assert_eq!(net.counters().dropped, 2);
            assert_eq!(net.save().pending.len(), 1);
            assert_eq!(net.save().pending[0].len(), 60);
            // Paused, nothing touches the rings.
            chain(&rx, 4, &[(0x7000, 2048, W)]);
            assert!(!net.process_rx().unwrap());
            assert_eq!(rx.used().idx().load(), 3);
        }
    }
}
