//! Snapshots: everything a guest is (`VmState`) plus its memory, written to a
//! directory and read back. The format is documented in
//! `docs/snapshot-format.md`; live migration sends the very same `VmState`.

pub mod memory;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::block::BlockState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::vstate::state::{VcpuState, VmArchState};

/// Bumped whenever `VmState` or the layout below changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
pub const MAGIC: &[u8; 8] = b"FERRYSNP";
pub const HEADER_LEN: usize = 40;
pub const STATE_FILE: &str = "vmstate";
pub const MEMORY_FILE: &str = "memory";
/// A state larger than this is not a state we wrote.
const MAX_PAYLOAD: u64 = 256 << 20;

/// One virtio-blk drive: its transport and the device behind it.
#[derive(Clone, Serialize, Deserialize)]
pub struct DriveState {
    pub transport: MmioTransportState,
    pub block: BlockState,
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

fn checksum(header_fields: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header_fields);
    h.update(payload);
    h.finalize()
}

/// The state file's bytes: header, then the JSON payload.
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&state.memory_size.to_le_bytes());
    let crc = checksum(&out[..32], &payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Parses and checks state-file bytes read from `path`.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<VmState, SnapshotError> {
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
    let len = u64_at(16);
    let want = HEADER_LEN as u64 + len;
    if len > MAX_PAYLOAD || (bytes.len() as u64) < want {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            have: bytes.len() as u64,
            want,
        });
    }
    let payload = &bytes[HEADER_LEN..want as usize];
    if checksum(&bytes[..32], payload) != u32_at(32) || bytes.len() as u64 != want {
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    let state: VmState = serde_json::from_slice(payload).map_err(|e| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let corrupt = |why: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if state.memory_size != u64_at(24) || state.memory_size != state.config.memory_mib << 20 {
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
    Ok(state)
}

/// Writes `bytes` to `path` through a temporary file, synced, then renamed,
/// so a crash never leaves a half-written file under the final name.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("partial");
    let result = (|| {
        let f = File::create(&tmp)?;
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
    let encoded = encode_state(state)?;
    let mem_path = dir.join(MEMORY_FILE);
    let mut written = 0;
    write_atomic(&mem_path, |f| {
        written = memory::write_sparse(mem, memfd, f, state.memory_size)?;
        Ok(())
    })?;
    let state_path = dir.join(STATE_FILE);
    write_atomic(&state_path, |mut f| f.write_all(&encoded))?;
    Ok(SnapshotStats {
        state_bytes: encoded.len() as u64,
        memory_bytes_written: written,
    })
}

/// Reads and checks a snapshot directory: the state, and the memory file
/// opened (not read) after checking its size.
pub fn read_snapshot(dir: &Path) -> Result<(VmState, File), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let mut bytes = Vec::new();
    File::open(&state_path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_err(&state_path))?;
    let state = decode_state(&state_path, &bytes)?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem = File::open(&mem_path).map_err(io_err(&mem_path))?;
    let have = mem.metadata().map_err(io_err(&mem_path))?.len();
    if have != state.memory_size {
        return Err(SnapshotError::MemorySize {
            path: mem_path,
            have,
            want: state.memory_size,
        });
    }
    Ok((state, mem))
}
