//! The migration wire format: checksummed frames over one TCP connection.
//! See `docs/migration-protocol.md`.
//!
//! Frame: a 24-byte header — magic `FMIG`, kind (u32), payload length (u64),
//! CRC-32 of the payload (u32), CRC-32 of the preceding 20 header bytes
//! (u32) — then the payload. The header CRC is checked before the length is
//! believed, so garbage never makes the receiver allocate or wait for
//! gigabytes.

use std::io::{IoSlice, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on any incompatible change to frames or messages.
/// 2: storage migration (`Hello.storage`, `HelloAck.share`, `Heartbeat`).
/// 3: a destination that trusts nothing it is sent (`StorageOffer.sizes`,
/// `HelloAck.nonce`, the `Seal` frame, every page declared in pass 1).
/// 4: memory over several connections (`Hello.connections`,
/// `HelloAck.lanes`, the `Join`/`Joined` frames, a `Seal` per connection);
/// the `Paused` and `Announced` frames (the destination announces the
/// guest's network addresses the moment the source pauses).
pub const PROTOCOL_VERSION: u32 = 4;
pub const MAGIC: [u8; 4] = *b"FMIG";
pub const HEADER_LEN: usize = 24;
/// Most guest memory one MemoryPages frame carries.
pub const MAX_MEMORY_CHUNK: usize = 4 << 20;
/// Largest payload of any frame (the state is the largest).
pub const MAX_PAYLOAD: u64 = 64 << 20;
pub const PAGE_SIZE: u64 = 4096;
/// Most connections one migration's memory may use (the migration channel
/// and up to seven extra ones).
pub const MAX_CONNECTIONS: u32 = 8;
/// With several connections, guest memory is dealt out in stripes of this
/// size, aligned: stripe `k` travels only on connection `k % connections`.
/// A page thus always takes the same connection, so a later pass's copy of
/// it can never be overtaken by an earlier one on another connection, and
/// no two connections write the same memory on the destination.
pub const STRIPE: u64 = MAX_MEMORY_CHUNK as u64;
/// A `Join` is a few hundred bytes.
pub const MAX_JOIN: u64 = 4 << 10;

/// The connection (0: the migration channel) that carries the stripe of
/// `gpa`.
pub fn stripe_owner(gpa: u64, connections: u32) -> u32 {
    ((gpa / STRIPE) % u64::from(connections.max(1))) as u32
}

/// Whether `[gpa, gpa + len)` lies within one stripe.
pub fn within_stripe(gpa: u64, len: u64) -> bool {
    len > 0
        && gpa
            .checked_add(len - 1)
            .is_some_and(|last| last / STRIPE == gpa / STRIPE)
}

/// What seeds connection `index`'s stream digest: the destination's nonce,
/// and for an extra connection its index too, so that a frame moved to
/// another connection does not pass.
pub fn lane_nonce(nonce: &str, index: u32) -> String {
    if index == 0 {
        nonce.to_string()
    } else {
        format!("{nonce}/{index}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Source -> destination: who we are and what we bring (JSON `Hello`).
    Hello = 1,
    /// Destination -> source: accepted (JSON `HelloAck`).
    HelloAck = 2,
    /// Destination -> source: refused or failed, with the reason (JSON
    /// `Reason`). The source simply closes the connection.
    Error = 3,
    /// Source -> destination: guest-physical address (u64) then page data.
    MemoryPages = 4,
    /// Source -> destination: address (u64) and page count (u64) of pages
    /// that are all zero.
    ZeroPages = 5,
    /// Source -> destination: a pre-copy pass ended (JSON `PassEnd`).
    PassEnd = 6,
    /// Source -> destination: the VM state (JSON `VmState`); memory is
    /// complete.
    State = 7,
    /// Destination -> source: restored, ready to run, not running.
    Ready = 8,
    /// Source -> destination: the source has stopped for good; run.
    Go = 9,
    /// Destination -> source: the guest runs here now.
    Resumed = 10,
    /// Source -> destination: still here (sent while memory waits for the
    /// storage copy, so the destination's idle timeout means a dead link).
    Heartbeat = 11,
    /// Source -> destination, right before `State`: how many frames it sent
    /// since `HelloAck` and their digest (JSON `Seal`), so that a stream
    /// with a frame lost, repeated or recorded elsewhere is refused.
    Seal = 12,
    /// Source -> destination, first on an extra memory connection: which
    /// migration and which connection it is, and the one-time secret
    /// (JSON `Join`).
    Join = 13,
    /// Destination -> source: the extra connection is taken (JSON `{}`).
    Joined = 14,
    /// Source -> destination, the moment the guest pauses for the last
    /// phase (JSON `Paused`): the destination announces the guest's MAC
    /// addresses on its taps at once, so that frames for the guest queue
    /// there (to be delivered when it runs) instead of reaching the paused
    /// source.
    Paused = 15,
    /// Destination -> source, in answer to `Paused`: the guest is announced
    /// here. The source saves the device state only then, so that what
    /// reached its taps before the switch learned the new port is in it.
    Announced = 16,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Error,
            4 => MemoryPages,
            5 => ZeroPages,
            6 => PassEnd,
            7 => State,
            8 => Ready,
            9 => Go,
            10 => Resumed,
            11 => Heartbeat,
            12 => Seal,
            13 => Join,
            14 => Joined,
            15 => Paused,
            16 => Announced,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Ferry migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("corrupted frame header (checksum mismatch)")]
    HeaderChecksum,
    #[error("corrupted {0:?} frame (checksum mismatch)")]
    PayloadChecksum(Kind),
    #[error("unknown frame kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} frame of {len} bytes is larger than allowed ({max})")]
    TooLarge { kind: Kind, len: u64, max: u64 },
    #[error("expected a {expected} frame, got {got:?}")]
    Unexpected { expected: &'static str, got: Kind },
    #[error("malformed {kind:?} frame: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("the peer reported: {0}")]
    Peer(String),
}

/// Source's opening message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    pub migration_id: String,
    pub vcpus: u8,
    pub memory_size: u64,
    /// The CPUID the guest sees (vCPU 0), for the compatibility check.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Present when the VM's files come along (storage migration).
    #[serde(default)]
    pub storage: Option<StorageOffer>,
    /// The ids of the guest's net devices, in config order: the destination
    /// refuses at once a device it has no tap for. Left out when there are
    /// none, so that a VM without a network migrates to older receivers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_ids: Vec<String>,
    /// How many connections memory travels over: this one and
    /// `connections - 1` extra ones (1 ..= [`MAX_CONNECTIONS`]).
    #[serde(default = "one")]
    pub connections: u32,
}

fn one() -> u32 {
    1
}

/// The files a storage migration will write into the share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageOffer {
    /// File names (no directories) in the share.
    pub files: Vec<String>,
    /// The size in bytes of each file in `files`, in the same order: the
    /// destination lets none grow past it, and checks its free space
    /// against their sum before the copy starts.
    #[serde(default)]
    pub sizes: Vec<u64>,
    /// The bytes the copy will take on the destination's disk (holes stay
    /// holes): what its free space is checked against. Absent: the sum of
    /// `sizes`. Only the source's own copy fails if it is too low; the
    /// per-file sizes are what the destination enforces.
    #[serde(default)]
    pub data_bytes: Option<u64>,
    /// The source writes through a directory it has mounted itself (the
    /// destination's `--dir`), instead of the destination's NFS share.
    pub mounted_share: bool,
}

/// Where the source writes the files: `<dir>/<dir_name>/` on the
/// destination, through the NFS export (when `nfs_port` is set) or through
/// the source's own mount of `<dir>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareOffer {
    pub dir_name: String,
    pub nfs_port: Option<u16>,
    pub export: Option<String>,
    /// 64 hex digits that every share connection must open with (see
    /// `share::SECRET_LEN`); `null` for a mounted share.
    #[serde(default)]
    pub secret: Option<String>,
}

/// Destination's acceptance: what it agreed to receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloAck {
    pub protocol: u32,
    pub migration_id: String,
    pub vcpus: u8,
    pub memory_size: u64,
    /// The share for a storage migration.
    #[serde(default)]
    pub share: Option<ShareOffer>,
    /// Fresh random hex the destination drew for this connection. It seeds
    /// the stream digest in `Seal`, so that a stream recorded for an
    /// earlier migration does not pass at a later one.
    #[serde(default)]
    pub nonce: String,
    /// Where the extra connections go, when `Hello.connections` > 1.
    #[serde(default)]
    pub lanes: Option<LaneOffer>,
}

/// The destination's listener for this migration's extra connections.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaneOffer {
    /// On the address the migration channel reached.
    pub port: u16,
    /// 64 hex digits every extra connection must present in its `Join`.
    pub secret: String,
}

/// The first frame on an extra connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Join {
    pub migration_id: String,
    /// 1 ..= connections - 1: which stripes it carries.
    pub index: u32,
    pub secret: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassEnd {
    pub pass: u32,
}

/// The guest paused on the source (JSON payload of `Paused`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Paused {
    /// Each net device's address, in the order of `Hello.net_ids`
    /// (`xx:xx:xx:xx:xx:xx`).
    pub macs: Vec<String>,
}

/// Closes the memory stream (JSON payload of `Seal`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seal {
    /// Frames sent after `HelloAck`, not counting this one.
    pub frames: u64,
    /// [`StreamDigest`] over those frames' headers.
    pub digest: u32,
}

/// A running digest over frame headers, seeded with the destination's
/// nonce. A header carries the payload's CRC, so the digest covers every
/// payload byte without hashing it twice. It detects frames lost, repeated,
/// reordered or recorded for another migration; it is no MAC (a peer who
/// forges a stream computes it as easily: authenticating the peer is the
/// transport's job).
#[derive(Clone)]
pub struct StreamDigest {
    hasher: crc32fast::Hasher,
    frames: u64,
}

impl StreamDigest {
    pub fn new(nonce: &str) -> StreamDigest {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(nonce.as_bytes());
        StreamDigest { hasher, frames: 0 }
    }

    pub fn add_header(&mut self, header: &[u8; HEADER_LEN]) {
        self.hasher.update(header);
        self.frames += 1;
    }

    /// Adds a header as it was read.
    pub fn add(&mut self, h: &FrameHeader) {
        self.add_header(&header_bytes(h.kind, h.len, h.crc));
    }

    pub fn seal(&self) -> Seal {
        Seal {
            frames: self.frames,
            digest: self.hasher.clone().finalize(),
        }
    }
}

/// A writer that feeds the header of every frame written through it to a
/// [`StreamDigest`] once one is started. Writes must be whole frames, in
/// order (as `send_frame` makes them); a partial write is tracked, so the
/// digest follows what the inner writer actually took.
pub struct DigestWriter<W: Write> {
    inner: W,
    digest: Option<StreamDigest>,
    /// Header bytes of the frame being written, until all 24 are in.
    header: [u8; HEADER_LEN],
    header_have: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl<W: Write> DigestWriter<W> {
    pub fn new(inner: W) -> DigestWriter<W> {
        DigestWriter {
            inner,
            digest: None,
            header: [0; HEADER_LEN],
            header_have: 0,
            payload_left: 0,
        }
    }

    /// Digests every frame written from now on.
    pub fn start_digest(&mut self, nonce: &str) {
        self.digest = Some(StreamDigest::new(nonce));
    }

    /// What `Seal` carries for the frames written so far.
    pub fn seal(&self) -> Option<Seal> {
        self.digest.as_ref().map(StreamDigest::seal)
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            let n = (HEADER_LEN - self.header_have).min(bytes.len());
            self.header[self.header_have..self.header_have + n].copy_from_slice(&bytes[..n]);
            self.header_have += n;
            bytes = &bytes[n..];
            if self.header_have == HEADER_LEN {
                self.header_have = 0;
                self.payload_left = u64::from_le_bytes(self.header[8..16].try_into().unwrap());
                if let Some(d) = &mut self.digest {
                    d.add_header(&self.header);
                }
            }
        }
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.track(&buf[..n]);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        let mut left = n;
        for b in bufs {
            if left == 0 {
                break;
            }
            let take = left.min(b.len());
            self.track(&b[..take]);
            left -= take;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub struct FrameHeader {
    pub kind: Kind,
    pub len: u64,
    pub crc: u32,
}

pub fn header_bytes(kind: Kind, len: u64, crc: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32fast::hash(&h[0..20]);
    h[20..24].copy_from_slice(&hcrc.to_le_bytes());
    h
}

/// Sends one frame whose payload is the concatenation of `parts`, written
/// with vectored I/O straight from where the parts live. Returns the bytes
/// put on the wire.
pub fn send_frame<W: Write>(w: &mut W, kind: Kind, parts: &[&[u8]]) -> Result<u64, ProtocolError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut crc = crc32fast::Hasher::new();
    for p in parts {
        crc.update(p);
    }
    let header = header_bytes(kind, len as u64, crc.finalize());
    let mut slices: Vec<IoSlice> = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(&header));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    let mut bufs: &mut [IoSlice] = &mut slices;
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((HEADER_LEN + len) as u64)
}

pub fn send_json<W: Write, T: Serialize>(
    w: &mut W,
    kind: Kind,
    value: &T,
) -> Result<u64, ProtocolError> {
    let payload = serde_json::to_vec(value).map_err(|e| ProtocolError::Malformed {
        kind,
        why: e.to_string(),
    })?;
    send_frame(w, kind, &[&payload])
}

/// Reads and checks a frame header.
pub fn read_header<R: Read>(r: &mut R) -> Result<FrameHeader, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h)?;
    if h[0..4] != MAGIC {
        return Err(ProtocolError::BadMagic(h[0..4].try_into().unwrap()));
    }
    let hcrc = u32::from_le_bytes(h[20..24].try_into().unwrap());
    if crc32fast::hash(&h[0..20]) != hcrc {
        return Err(ProtocolError::HeaderChecksum);
    }
    let raw_kind = u32::from_le_bytes(h[4..8].try_into().unwrap());
    let kind = Kind::from_u32(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
    let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge {
            kind,
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok(FrameHeader {
        kind,
        len,
        crc: u32::from_le_bytes(h[16..20].try_into().unwrap()),
    })
}

/// Reads a whole (small) payload and checks it.
pub fn read_payload<R: Read>(r: &mut R, h: &FrameHeader) -> Result<Vec<u8>, ProtocolError> {
    let mut buf = vec![0u8; h.len as usize];
    r.read_exact(&mut buf)?;
    if crc32fast::hash(&buf) != h.crc {
        return Err(ProtocolError::PayloadChecksum(h.kind));
    }
    Ok(buf)
}

pub fn parse_json<T: DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed {
        kind,
        why: e.to_string(),
    })
}

/// Reads the next frame, which must be `want` (an `Error` frame from the
/// peer becomes `ProtocolError::Peer`), and returns its payload.
pub fn expect<R: Read>(r: &mut R, want: Kind) -> Result<Vec<u8>, ProtocolError> {
    expect_within(r, want, None)
}

/// [`expect`] for a frame that is never large: a longer claim is refused
/// on the header, before the payload is allocated or read.
pub fn expect_small<R: Read>(r: &mut R, want: Kind, max: u64) -> Result<Vec<u8>, ProtocolError> {
    expect_within(r, want, Some(max))
}

fn expect_within<R: Read>(
    r: &mut R,
    want: Kind,
    max: Option<u64>,
) -> Result<Vec<u8>, ProtocolError> {
    let h = read_header(r)?;
    if let Some(max) = max.filter(|&m| h.len > m) {
        return Err(ProtocolError::TooLarge {
            kind: h.kind,
            len: h.len,
            max,
        });
    }
    if h.kind == Kind::Error {
        let p = read_payload(r, &h)?;
        let reason: Reason = parse_json(Kind::Error, &p)?;
        return Err(ProtocolError::Peer(reason.reason));
    }
    if h.kind != want {
        return Err(ProtocolError::Unexpected {
            expected: kind_name(want),
            got: h.kind,
        });
    }
    read_payload(r, &h)
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Hello => "Hello",
        Kind::HelloAck => "HelloAck",
        Kind::Error => "Error",
        Kind::MemoryPages => "MemoryPages",
        Kind::ZeroPages => "ZeroPages",
        Kind::PassEnd => "PassEnd",
        Kind::State => "State",
        Kind::Ready => "Ready",
        Kind::Go => "Go",
        Kind::Resumed => "Resumed",
        Kind::Heartbeat => "Heartbeat",
        Kind::Seal => "Seal",
        Kind::Join => "Join",
        Kind::Joined => "Joined",
        Kind::Paused => "Paused",
        Kind::Announced => "Announced",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut wire = Vec::new();
        send_frame(
            &mut wire,
            Kind::MemoryPages,
            &[&7u64.to_le_bytes(), &[1u8; 4096]],
        )
        .unwrap();
        send_json(&mut wire, Kind::PassEnd, &PassEnd { pass: 3 }).unwrap();
        let mut r = &wire[..];
        let h = read_header(&mut r).unwrap();
        assert_eq!((h.kind, h.len), (Kind::MemoryPages, 4104));
        let p = read_payload(&mut r, &h).unwrap();
        assert_eq!(&p[..8], &7u64.to_le_bytes());
        let pe: PassEnd =
            parse_json(Kind::PassEnd, &expect(&mut r, Kind::PassEnd).unwrap()).unwrap();
        assert_eq!(pe.pass, 3);

        // A flipped payload bit, a flipped length bit, garbage, an unknown kind.
        let mut bad = wire.clone();
        bad[HEADER_LEN + 100] ^= 1;
        let mut r = &bad[..];
        let h = read_header(&mut r).unwrap();
        assert!(matches!(
            read_payload(&mut r, &h),
            Err(ProtocolError::PayloadChecksum(_))
        ));
        let mut bad = wire.clone();
        bad[12] ^= 0x40;
        assert!(matches!(
            read_header(&mut &bad[..]),
            Err(ProtocolError::HeaderChecksum)
        ));
        assert!(matches!(
            read_header(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut h = header_bytes(Kind::Go, 0, 0);
        h[4] = 99;
        let hcrc = crc32fast::hash(&h[0..20]);
        h[20..24].copy_from_slice(&hcrc.to_le_bytes());
        assert!(matches!(
            read_header(&mut &h[..]),
            Err(ProtocolError::UnknownKind(99))
        ));
        // Oversized claims are refused before anything is read.
        let h = header_bytes(Kind::State, u64::MAX, 0);
        assert!(matches!(
            read_header(&mut &h[..]),
            Err(ProtocolError::TooLarge { .. })
        ));
        // A peer's error is reported as such.
        let mut wire = Vec::new();
        send_json(
            &mut wire,
            Kind::Error,
            &Reason {
                reason: "no".into(),
            },
        )
        .unwrap();
        assert!(
            matches!(expect(&mut &wire[..], Kind::HelloAck), Err(ProtocolError::Peer(r)) if r == "no")
        );
        // Truncated stream.
        assert!(matches!(
            read_header(&mut &[0u8; 3][..]),
            Err(ProtocolError::Io(_))
        ));
    }

    #[test]
    fn the_digest_written_is_the_digest_read() {
        let mut w = DigestWriter::new(Vec::new());
        send_json(&mut w, Kind::Hello, &PassEnd { pass: 0 }).unwrap();
        w.start_digest("00ff");
        send_frame(
            &mut w,
            Kind::MemoryPages,
            &[&0u64.to_le_bytes(), &[7u8; 4096]],
        )
        .unwrap();
        send_json(&mut w, Kind::PassEnd, &PassEnd { pass: 1 }).unwrap();
        send_frame(&mut w, Kind::ZeroPages, &[&[0u8; 16]]).unwrap();
        let seal = w.seal().unwrap();
        assert_eq!(seal.frames, 3);
        let wire = w.get_ref().clone();

        let read = |wire: &[u8], nonce: &str| {
            let mut r = wire;
            let hello = read_header(&mut r).unwrap();
            read_payload(&mut r, &hello).unwrap();
            let mut d = StreamDigest::new(nonce);
            while !r.is_empty() {
                let h = read_header(&mut r).unwrap();
                read_payload(&mut r, &h).unwrap();
                d.add(&h);
            }
            d.seal()
        };
        let got = read(&wire, "00ff");
        assert_eq!((got.frames, got.digest), (seal.frames, seal.digest));
        // Another nonce (a recorded stream at a later migration) differs.
        assert_ne!(read(&wire, "00fe").digest, seal.digest);
        // So does a stream with a frame missing.
        let first = HEADER_LEN + read_header(&mut &wire[..]).unwrap().len as usize;
        let second = HEADER_LEN + 8 + 4096;
        let mut cut = wire[..first].to_vec();
        cut.extend_from_slice(&wire[first + second..]);
        assert_ne!(read(&cut, "00ff").digest, seal.digest);

        // Written a byte at a time, the digest is the same.
        let mut w = DigestWriter::new(Vec::new());
        w.start_digest("00ff");
        let mut one = Vec::new();
        send_json(&mut one, Kind::PassEnd, &PassEnd { pass: 1 }).unwrap();
        for b in &one {
            w.write_all(std::slice::from_ref(b)).unwrap();
        }
        let mut d = StreamDigest::new("00ff");
        d.add(&read_header(&mut &one[..]).unwrap());
        assert_eq!(w.seal().unwrap().digest, d.seal().digest);
    }
}
