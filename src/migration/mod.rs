//! Live migration: the guest keeps running while its memory is copied to
//! another ferry over TCP and re-copied as it changes (pre-copy), then a
//! short pause hands over the last pages and the `VmState`. See
//! `docs/migration-protocol.md`.

pub mod destination;
pub mod memory;
pub mod protocol;
pub mod share;
pub mod source;

use serde::{Deserialize, Serialize};

/// What `PUT /migration/send` asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// `host:port` of a `ferry receive`.
    pub destination: String,
    /// The longest pause the guest may see at cutover.
    #[serde(default = "default_max_downtime_ms")]
    pub max_downtime_ms: u64,
    /// Cap on the migration stream, MiB/s; unlimited when absent or null.
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
}

pub fn default_max_downtime_ms() -> u64 {
    50
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No migration has run.
    #[default]
    None,
    /// Connecting and handshaking.
    Setup,
    /// Copying memory while the guest runs.
    Precopy,
    /// Guest paused: last pages and state.
    StopAndCopy,
    Completed,
    Failed,
    Cancelled,
}

/// Progress and outcome, as `GET /migration` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub phase: Phase,
    pub migration_id: String,
    pub destination: String,
    pub max_downtime_ms: u64,
    /// Memory pre-copy pass in progress (1 = the full copy).
    pub pass: u32,
    pub memory_bytes: u64,
    /// Bytes put on the wire so far (frames included).
    pub bytes_sent: u64,
    /// Dirty memory still to send, as of the last dirty-log sync.
    pub remaining_bytes: u64,
    pub dirty_rate_mib_s: f64,
    pub bandwidth_mib_s: f64,
    pub expected_downtime_ms: f64,
    /// Share of time the vCPUs are held back to make pre-copy converge.
    pub throttle_percent: u32,
    pub elapsed_ms: f64,
    /// Source pause to destination resume, once completed.
    pub downtime_ms: Option<f64>,
    pub error: Option<String>,
    /// The destination was told to run the guest: it must never run here
    /// again.
    pub handed_over: bool,
}

impl MigrationStatus {
    pub fn is_active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Setup | Phase::Precopy | Phase::StopAndCopy
        )
    }
}
