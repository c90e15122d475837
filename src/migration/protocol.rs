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
pub const PROTOCOL_VERSION: u32 = 2;
pub const MAGIC: [u8; 4] = *b"FMIG";
pub const HEADER_LEN: usize = 24;
/// Most guest memory one MemoryPages frame carries.
pub const MAX_MEMORY_CHUNK: usize = 4 << 20;
/// Largest payload of any frame (the state is the largest).
pub const MAX_PAYLOAD: u64 = 64 << 20;
pub const PAGE_SIZE: u64 = 4096;

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
}

/// The files a storage migration will write into the share.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageOffer {
    /// File names (no directories) in the share.
    pub files: Vec<String>,
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

pub struct FrameHeader {
    pub kind: Kind,
    pub len: u64,
    pub crc: u32,
}

fn header_bytes(kind: Kind, len: u64, crc: u32) -> [u8; HEADER_LEN] {
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
    let h = read_header(r)?;
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
}
