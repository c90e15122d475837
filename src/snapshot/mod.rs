//! Snapshots: everything a guest is (`VmState`) plus its memory, written to a
//! directory and read back. The format is documented in
//! `docs/snapshot-format.md`; live migration sends the very same `VmState`.

pub mod memory;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

use crate::util::{read_bounded, BoundedReadError};
use memory::ChunkSum;

use crate::config::VmConfig;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::devices::virtio::net::NetState;
use crate::vstate::state::{VcpuState, VmArchState};

/// Bumped whenever `VmState` or the layout below changes incompatibly.
/// Version 2: the memory file's chunk checksums follow the payload.
pub const FORMAT_VERSION: u32 = 2;
pub const MAGIC: &[u8; 8] = b"FERRYSNP";
pub const HEADER_LEN: usize = 40;
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
/// A state larger than this is not a state we wrote.
const MAX_PAYLOAD: u64 = 256 << 20;
/// Bytes per memory chunk checksum: chunk index, CRC-32, both u32 LE.
const SUM_LEN: u64 = 8;
/// At most one checksum per chunk of the largest guest memory.
const MAX_SUMS: u64 = (crate::config::MAX_MEMORY_MIB << 20) / memory::CHUNK;
/// The largest state file we could have written: what is larger is refused
/// by its size, unread.
pub const MAX_STATE_FILE: u64 = HEADER_LEN as u64 + MAX_PAYLOAD + MAX_SUMS * SUM_LEN;

/// One virtio-blk drive: its transport and the device behind it.
#[derive(Clone, Serialize, Deserialize)]
pub struct DriveState {
    pub transport: MmioTransportState,
    pub block: BlockState,
}

/// One virtio-net device: its transport and the device behind it.
#[derive(Clone, Serialize, Deserialize)]
pub struct NetDeviceState {
    pub transport: MmioTransportState,
    pub net: NetState,
}

/// Everything about a VM except its memory and disk contents.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub config: VmConfig,
    pub memory_size: u64,
    pub vm: VmArchState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialDeviceState,
    /// Absent from snapshots written before the i8042 took part.
    #[serde(default)]
    pub i8042: I8042State,
    pub drives: Vec<DriveState>,
    /// Absent from snapshots written before net devices existed.
    #[serde(default)]
    pub nets: Vec<NetDeviceState>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a Ferry snapshot (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "{path}: snapshot format version {found}, but this ferry reads version {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated ({have} bytes, the header announces {want})")]
    Truncated { path: PathBuf, have: u64, want: u64 },
    #[error("{0}: corrupted (checksum mismatch)")]
    Checksum(PathBuf),
    #[error("{path}: corrupted state: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: memory file is {have} bytes, the snapshot needs {want}")]
    MemorySize { path: PathBuf, have: u64, want: u64 },
    #[error("{path}: corrupted memory: {source}; the snapshot cannot be restored")]
    MemoryCorrupt {
        path: PathBuf,
        source: memory::VerifyError,
    },
    #[error("{path} is {kind}, not a regular file")]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{path} is {len} bytes or more, larger than any state file ferry writes ({MAX_STATE_FILE} bytes)")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("cannot encode the VM state: {0}")]
    Encode(String),
}

impl SnapshotError {
    /// Errors about the snapshot's contents (exit code 2), as opposed to I/O.
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, SnapshotError::Encode(_))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn checksum(header_fields: &[u8], rest: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_fields);
    for r in rest {
        h.update(r);
    }
    h.finalize()
}

/// The state file's bytes: header, the JSON payload, then the memory
/// file's chunk checksums.
pub fn encode_state(state: &VmState, sums: &[ChunkSum]) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let count = u32::try_from(sums.len())
        .map_err(|_| SnapshotError::Encode("too many memory checksums".into()))?;
    let mut table = Vec::with_capacity(sums.len() * SUM_LEN as usize);
    for s in sums {
        table.extend_from_slice(&s.index.to_le_bytes());
        table.extend_from_slice(&s.crc.to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + table.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&state.memory_size.to_le_bytes());
    let crc = checksum(&out[..32], &[&payload, &table]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Parses and checks state-file bytes read from `path`: the state, and the
/// memory file's chunk checksums (sorted, each chunk inside the memory).
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<(VmState, Vec<ChunkSum>), SnapshotError> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.to_path_buf()));
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            have: bytes.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let count = u64::from(u32_at(12));
    let len = u64_at(16);
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if len > MAX_PAYLOAD || count > MAX_SUMS {
        return Err(corrupt(format!(
            "the header announces {len} bytes of state and {count} memory checksums, more than \
             ferry writes"
        )));
    }
    // Both bounded above: no overflow.
    let payload_end = HEADER_LEN as u64 + len;
    let want = payload_end + count * SUM_LEN;
    if (bytes.len() as u64) < want {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            have: bytes.len() as u64,
            want,
        });
    }
    let payload = &bytes[HEADER_LEN..payload_end as usize];
    let table = &bytes[payload_end as usize..want as usize];
    if checksum(&bytes[..32], &[payload, table]) != u32_at(32) || bytes.len() as u64 != want {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    let state: VmState = serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
    // The config's own limits, as `ferry run` applies them: the memory
    // arithmetic below cannot wrap, nor the vCPU count exceed this host's.
    state
        .config
        .check_resources()
        .map_err(|e| corrupt(format!("its config: {e}")))?;
    if state.memory_size != u64_at(24)
        || Some(state.memory_size) != state.config.memory_mib.checked_mul(1 << 20)
    {
        return Err(corrupt("memory size disagrees with the config".into()));
    }
    if state.vcpus.len() != state.config.vcpus as usize {
        return Err(corrupt(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    if state.drives.len() != state.config.drives.len() {
        return Err(corrupt(format!(
            "{} drive states for {} drives",
            state.drives.len(),
            state.config.drives.len()
        )));
    }
    let chunks = state.memory_size.div_ceil(memory::CHUNK);
    let sums: Vec<ChunkSum> = table
        .chunks_exact(SUM_LEN as usize)
        .map(|e| ChunkSum {
            index: u32::from_le_bytes(e[..4].try_into().unwrap()),
            crc: u32::from_le_bytes(e[4..].try_into().unwrap()),
        })
        .collect();
    let in_order = sums.windows(2).all(|w| w[0].index < w[1].index);
    if !in_order || sums.last().is_some_and(|s| u64::from(s.index) >= chunks) {
        return Err(corrupt(format!(
            "memory checksums out of order or beyond the {chunks} chunks of memory"
        )));
    }
    Ok((state, sums))
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed,
/// so a crash never leaves a half-written file under the final name.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("partial");
    let result = (|| {
        // 0600: a snapshot holds guest memory and state.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An existing file keeps its mode through create: set it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        write(&f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SnapshotStats {
    pub state_bytes: u64,
    pub memory_bytes_written: u64,
}

/// Writes the state and memory of a paused VM into `dir` (created if needed).
pub fn write_snapshot(
    dir: &Path,
    state: &VmState,
    mem: &crate::vstate::memory::GuestMemoryMmap,
    memfd: Option<&File>,
) -> Result<SnapshotStats, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mem_path = dir.join(MEMORY_FILE);
    let mut written = 0;
    let mut sums = Vec::new();
    write_atomic(&mem_path, |f| {
        (written, sums) = memory::write_sparse(mem, memfd, f, state.memory_size)?;
        Ok(())
    })?;
    let encoded = encode_state(state, &sums)?;
    let state_path = dir.join(STATE_FILE);
    write_atomic(&state_path, |mut f| f.write_all(&encoded))?;
    Ok(SnapshotStats {
        state_bytes: encoded.len() as u64,
        memory_bytes_written: written,
    })
}

/// Reads and checks a snapshot directory: the state (bounded: what is not
/// a regular file or is larger than any state we write is refused unread),
/// and the memory file, whose size and chunk checksums are checked before
/// anything runs.
pub fn read_snapshot(dir: &Path) -> Result<(VmState, File), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = read_bounded(&state_path, MAX_STATE_FILE).map_err(|e| match e {
        BoundedReadError::NotAFile(kind) => SnapshotError::NotAFile {
            path: state_path.clone(),
            kind,
        },
        BoundedReadError::TooLarge { len, .. } => SnapshotError::TooLarge {
            path: state_path.clone(),
            len,
        },
        BoundedReadError::Io(source) => SnapshotError::Io {
            path: state_path.clone(),
            source,
        },
    })?;
    let (state, sums) = decode_state(&state_path, &bytes)?;
    let mem_path = dir.join(MEMORY_FILE);
    // Checked before opening: opening a FIFO would block.
    let meta = std::fs::metadata(&mem_path).map_err(io_err(&mem_path))?;
    if !meta.is_file() {
        return Err(SnapshotError::NotAFile {
            path: mem_path,
            kind: "not a regular file",
        });
    }
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&mem_path)
        .map_err(io_err(&mem_path))?;
    let meta = mem.metadata().map_err(io_err(&mem_path))?;
    if !meta.is_file() || meta.len() != state.memory_size {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            have: meta.len(),
            want: state.memory_size,
        });
    }
    memory::verify(&mem, state.memory_size, &sums).map_err(|source| {
        SnapshotError::MemoryCorrupt {
            path: mem_path.clone(),
            source,
        }
    })?;
    Ok((state, mem))
}
