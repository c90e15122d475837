//! Live migration: the guest keeps running while its memory is copied to
//! another ferry over TCP and re-copied as it changes (pre-copy), then a
//! short pause hands over the last pages and the `VmState`. See
//! `docs/migration-protocol.md`.

pub mod destination;
pub mod memory;
pub mod protocol;
pub mod share;
pub mod source;
pub mod storage;
pub mod transport;

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
    /// `copy`: the VM's files move too (the default when the destination is
    /// another host); `shared`: both hosts see the same files.
    #[serde(default)]
    pub storage: Option<StorageMode>,
    /// Copy through this already mounted directory (the destination's
    /// `--dir`, mounted here) instead of the destination's NFS share.
    #[serde(default)]
    pub share: Option<ShareSpec>,
    /// This host's `--tls-dir` (`ca.pem`, `cert.pem`, `key.pem`): the
    /// channel and the share are mutual TLS, the destination's certificate
    /// must name the host or IP of `destination`.
    #[serde(default)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plaintext, unauthenticated: only when asked for by name.
    #[serde(default)]
    pub insecure: bool,
    /// How many TCP connections guest memory travels over (the migration
    /// channel and `connections - 1` extra ones), 1 ..=
    /// `protocol::MAX_CONNECTIONS`. Absent or null: chosen from this host
    /// (`source::default_connections`).
    #[serde(default)]
    pub connections: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageMode {
    Copy,
    Shared,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareSpec {
    pub path: std::path::PathBuf,
}

/// Why a `SendRequest` is refused before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("\"destination\" must be <host>:<port> of a `ferry receive`")]
    Destination,
    #[error("\"max_downtime_ms\" must be between {MIN_MAX_DOWNTIME_MS} and {MAX_MAX_DOWNTIME_MS}")]
    MaxDowntime,
    #[error(
        "\"share\" is for copying the VM's files: it does not go with \"storage\": \"shared\""
    )]
    ShareWithoutCopy,
    #[error(
        "\"bandwidth_mib_s\" must be between 1 and {MAX_BANDWIDTH_MIB_S}, or null for unlimited"
    )]
    Bandwidth,
    #[error("give \"tls_dir\" (this host's certificates, see `ferry tls-init`), or \"insecure\": true for an unauthenticated plaintext migration")]
    NoSecurity,
    #[error("\"tls_dir\" and \"insecure\": true exclude each other")]
    BothSecurity,
    #[error("\"tls_dir\": {0}")]
    Tls(String),
    #[error(
        "\"connections\" must be between 1 and {}, or null for this host's default",
        protocol::MAX_CONNECTIONS
    )]
    Connections,
}

/// No hand-over is shorter: it pauses every vCPU, sends the device state
/// and waits for two answers from the destination. What a hand-over is
/// estimated to cost beyond that (`source::FIXED_DOWNTIME_MS`) is explained
/// by the migration when it gives up, since it depends on the host.
pub const MIN_MAX_DOWNTIME_MS: u64 = 1;
/// A pause longer than a minute is an outage, not a live migration.
pub const MAX_MAX_DOWNTIME_MS: u64 = 60_000;
pub const MAX_BANDWIDTH_MIB_S: u64 = 1 << 20;

impl SendRequest {
    /// Checks what can be checked without the network, so that a bad
    /// request is refused up front rather than failing in the background.
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.destination.is_empty() || !self.destination.contains(':') {
            return Err(RequestError::Destination);
        }
        if !(MIN_MAX_DOWNTIME_MS..=MAX_MAX_DOWNTIME_MS).contains(&self.max_downtime_ms) {
            return Err(RequestError::MaxDowntime);
        }
        if self.share.is_some() && self.storage == Some(StorageMode::Shared) {
            return Err(RequestError::ShareWithoutCopy);
        }
        if self
            .bandwidth_mib_s
            .is_some_and(|b| b == 0 || b > MAX_BANDWIDTH_MIB_S)
        {
            return Err(RequestError::Bandwidth);
        }
        if self
            .connections
            .is_some_and(|n| n == 0 || n > protocol::MAX_CONNECTIONS)
        {
            return Err(RequestError::Connections);
        }
        match (&self.tls_dir, self.insecure) {
            (None, false) => return Err(RequestError::NoSecurity),
            (Some(_), true) => return Err(RequestError::BothSecurity),
            _ => {}
        }
        if let Some(dir) = &self.tls_dir {
            transport::server_name(&self.destination)
                .map_err(|e| RequestError::Tls(e.to_string()))?;
            transport::TlsIdentity::load(dir).map_err(|e| RequestError::Tls(e.to_string()))?;
        }
        Ok(())
    }

    /// How to talk to the destination: the credentials in `tls_dir`, or
    /// plaintext when `insecure` was asked for.
    pub fn security(&self) -> Result<transport::Security, transport::TlsError> {
        match &self.tls_dir {
            Some(dir) => Ok(transport::Security::Tls(std::sync::Arc::new(
                transport::TlsIdentity::load(dir)?,
            ))),
            None => Ok(transport::Security::Insecure),
        }
    }

    /// The connections in effect: as asked, else this host's default.
    pub fn connections(&self) -> u32 {
        self.connections
            .unwrap_or_else(source::default_connections)
            .clamp(1, protocol::MAX_CONNECTIONS)
    }

    /// The bandwidth limit in bytes/s, if any.
    pub fn bandwidth_bytes_s(&self) -> Option<f64> {
        self.bandwidth_mib_s.map(|m| m as f64 * (1u64 << 20) as f64)
    }

    /// The storage mode in effect: as asked, else `shared` when the
    /// destination is this very host (a loopback address, or `localhost`),
    /// `copy` otherwise. No name lookup: this runs on the VMM's event loop.
    pub fn storage_mode(&self) -> StorageMode {
        if let Some(m) = self.storage {
            return m;
        }
        let local = match self.destination.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().is_loopback(),
            Err(_) => self
                .destination
                .rsplit_once(':')
                .is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost")),
        };
        if local {
            StorageMode::Shared
        } else {
            StorageMode::Copy
        }
    }
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
    /// Guest memory the pass in progress copies: every populated page in
    /// pass 1, what got dirty in later ones.
    #[serde(default)]
    pub pass_bytes: u64,
    /// How much of `pass_bytes` the pass has covered so far (zero pages,
    /// sent as markers, count in full).
    #[serde(default)]
    pub pass_done_bytes: u64,
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
    /// `copy` or `shared`.
    pub storage: Option<StorageMode>,
    /// Storage copy: bytes of the VM's files copied (holes count as copied).
    pub storage_copied_bytes: u64,
    pub storage_total_bytes: u64,
    /// Guest writes mirrored to the copy so far.
    pub mirrored_writes: u64,
    /// Where the files go (the share's address), for storage copy.
    pub share: Option<String>,
    /// TCP connections guest memory travels over (0 until it starts).
    #[serde(default)]
    pub connections: u32,
}

impl MigrationStatus {
    pub fn is_active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Setup | Phase::Precopy | Phase::StopAndCopy
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(mut v: serde_json::Value) -> SendRequest {
        if v.get("tls_dir").is_none() {
            v["insecure"] = true.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_plain_request_is_valid_with_defaults() {
        let r = req(serde_json::json!({"destination": "10.0.0.2:7777"}));
        assert_eq!(r.validate(), Ok(()));
        assert_eq!(r.max_downtime_ms, default_max_downtime_ms());
        assert_eq!(r.bandwidth_bytes_s(), None);
    }

    #[test]
    fn each_bad_field_is_refused_with_its_reason() {
        let cases = [
            (
                serde_json::json!({"destination": ""}),
                RequestError::Destination,
            ),
            (
                serde_json::json!({"destination": "nowhere"}),
                RequestError::Destination,
            ),
            (
                serde_json::json!({"destination": "h:1", "max_downtime_ms": 0}),
                RequestError::MaxDowntime,
            ),
            (
                serde_json::json!({"destination": "h:1", "max_downtime_ms": 60_001}),
                RequestError::MaxDowntime,
            ),
            (
                serde_json::json!({"destination": "h:1", "bandwidth_mib_s": 0}),
                RequestError::Bandwidth,
            ),
            (
                serde_json::json!({"destination": "h:1", "bandwidth_mib_s": (1u64 << 20) + 1}),
                RequestError::Bandwidth,
            ),
            (
                serde_json::json!({"destination": "h:1", "storage": "shared", "share": {"path": "/mnt"}}),
                RequestError::ShareWithoutCopy,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(req(body.clone()).validate(), Err(want), "{body}");
        }
    }

    #[test]
    fn the_bounds_themselves_are_valid() {
        for body in [
            serde_json::json!({"destination": "h:1", "max_downtime_ms": MIN_MAX_DOWNTIME_MS}),
            serde_json::json!({"destination": "h:1", "max_downtime_ms": MAX_MAX_DOWNTIME_MS}),
            serde_json::json!({"destination": "h:1", "bandwidth_mib_s": 1}),
            serde_json::json!({"destination": "h:1", "bandwidth_mib_s": MAX_BANDWIDTH_MIB_S}),
            serde_json::json!({"destination": "h:1", "storage": "copy", "share": {"path": "/mnt"}}),
        ] {
            assert_eq!(req(body.clone()).validate(), Ok(()), "{body}");
        }
        let r = req(serde_json::json!({"destination": "h:1", "bandwidth_mib_s": 2}));
        assert_eq!(r.bandwidth_bytes_s(), Some(2.0 * 1048576.0));
    }

    #[test]
    fn a_request_says_how_it_is_secured() {
        let plain: SendRequest =
            serde_json::from_value(serde_json::json!({"destination": "h:1"})).unwrap();
        assert_eq!(plain.validate(), Err(RequestError::NoSecurity));
        let both = req(
            serde_json::json!({"destination": "h:1", "tls_dir": "/nonexistent", "insecure": true}),
        );
        assert_eq!(both.validate(), Err(RequestError::BothSecurity));
        let missing = req(serde_json::json!({"destination": "h:1", "tls_dir": "/nonexistent"}));
        match missing.validate() {
            Err(RequestError::Tls(why)) => assert!(why.contains("/nonexistent/ca.pem"), "{why}"),
            other => panic!("{other:?}"),
        }
        let tmp = tempfile::tempdir().unwrap();
        let dirs = transport::tls_init(tmp.path(), &["h".into()]).unwrap();
        let good = req(serde_json::json!({"destination": "h:1", "tls_dir": dirs[0]}));
        assert_eq!(good.validate(), Ok(()));
    }

    #[test]
    fn messages_name_the_field_and_the_range() {
        assert_eq!(
            RequestError::MaxDowntime.to_string(),
            "\"max_downtime_ms\" must be between 1 and 60000"
        );
        assert_eq!(
            RequestError::Bandwidth.to_string(),
            "\"bandwidth_mib_s\" must be between 1 and 1048576, or null for unlimited"
        );
    }
}
