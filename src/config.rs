//! The JSON VM config: serde types, path resolution and validation.
//!
//! Validation checks everything it can before the VMM touches anything and
//! reports every problem at once, one line each, so that a user fixes a config
//! in one round. Nothing is created on disk while validating: the VMM calls
//! [`VmConfig::create_missing_drives`] once the whole config passed.
//!
//! ```json
//! { "vcpus": 1, "memory_mib": 128, "kernel": "vmlinux", "cmdline": "console=ttyS0",
//!   "initrd": "initrd.img",
//!   "drives": [ { "id": "root", "path": "disk.img", "read_only": false, "create_size_mib": 64 } ],
//!   "serial": "stdout", "api_socket": "ferry.sock" }
//! ```

use crate::util::{host_memory_mib, io_msg, read_bounded, BoundedReadError};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// Guests smaller than this do not get far enough to be useful.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Hard cap whatever the host has: 1 TiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// The x86 APIC ID space with 255 reserved for broadcast, as other VMMs do.
pub const MAX_VCPUS: u8 = 254;
/// More vCPU threads than this per host CPU only adds scheduling overhead.
pub const MAX_VCPUS_PER_HOST_CPU: usize = 4;
/// The kernel's x86 limit is 2048 bytes including the NUL; the VMM appends its
/// own parameters (the virtio-mmio devices), which need the rest.
pub const MAX_CMDLINE_LEN: usize = 1536;
/// virtio-blk `VIRTIO_BLK_T_GET_ID` answers with at most 20 bytes.
pub const MAX_DRIVE_ID_LEN: usize = 20;
/// Drives get one IOAPIC line each, GSI 5 to 23.
pub const MAX_DRIVES: usize = 19;
/// Largest image `create_size_mib` creates: 16 TiB.
pub const MAX_CREATE_SIZE_MIB: u64 = 1 << 24;
/// `sockaddr_un.sun_path` holds 108 bytes including the NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

const MIB: u64 = 1 << 20;
/// A VM config is a few hundred bytes; this leaves room for any real one.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Everything needed to start a VM. Paths are stored resolved (absolute when
/// loaded through [`VmConfig::from_file`]), so a config saved in a snapshot
/// means the same files wherever it is read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "default_vcpus", deserialize_with = "deserialize_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// virtio-net devices, each on a tap; after the drives on the MMIO
    /// windows and interrupt lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
}

/// One virtio-blk disk backed by a raw image file (or a block device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// If `path` does not exist, create a sparse raw image of this size.
    /// An existing file is used as is, never truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_size_mib: Option<u64>,
}

/// One virtio-net device on a tap. `mac` is generated when absent, and
/// kept from then on (snapshots and migrations carry it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub id: String,
    /// The host's tap interface: opened, or created when missing (which
    /// needs CAP_NET_ADMIN).
    pub tap: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Where the guest's serial console goes. In JSON: `"stdout"` or a file path
/// (write `"./stdout"` for a file of that name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    #[default]
    Stdout,
    File(PathBuf),
}

impl Serialize for SerialConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            SerialConfig::Stdout => serializer.serialize_str("stdout"),
            // Keep a file literally named "stdout" a file when read back.
            SerialConfig::File(path) if path.as_os_str() == "stdout" => {
                serializer.serialize_str("./stdout")
            }
            SerialConfig::File(path) => path.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        match value.as_str() {
            "stdout" => Ok(SerialConfig::Stdout),
            "" => Err(de::Error::custom(
                "serial: expected \"stdout\" or a file path, found an empty string",
            )),
            _ => Ok(SerialConfig::File(PathBuf::from(value))),
        }
    }
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

/// Deserializes through u64 so that e.g. 300 gets a message naming the limit
/// rather than serde's "expected u8". Host-dependent limits are left to
/// `validate`, so that a snapshot taken elsewhere still deserializes.
fn deserialize_vcpus<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
    let n = u64::deserialize(deserializer)?;
    match u8::try_from(n) {
        Ok(n) if n <= MAX_VCPUS => Ok(n),
        _ => Err(de::Error::custom(format!(
            "vcpus: {n} is too many (maximum {MAX_VCPUS})"
        ))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {}", path.display(), io_msg(source))]
    Read { path: PathBuf, source: io::Error },
    #[error("config {} is {kind}, not a regular file; give the path of a JSON file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error(
        "config {} is {len} bytes or more, larger than the {MAX_CONFIG_BYTES}-byte limit for a VM config",
        path.display()
    )]
    TooLarge { path: PathBuf, len: u64 },
    /// Malformed JSON, a wrong type, a missing or unknown field.
    #[error("{origin}: line {line}, column {column}: {message}")]
    Parse {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// Every problem validation found, one line each.
    #[error("{}", problems.join("\n"))]
    Invalid { problems: Vec<String> },
    #[error("drives[{index}].path: cannot create {}: {}", path.display(), io_msg(source))]
    CreateDrive {
        index: usize,
        path: PathBuf,
        source: io::Error,
    },
}

impl VmConfig {
    /// Reads, parses, resolves relative paths against the config file's
    /// directory, and validates.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let bytes = read_bounded(path, MAX_CONFIG_BYTES).map_err(|e| match e {
            BoundedReadError::NotAFile(kind) => ConfigError::NotAFile {
                path: path.to_path_buf(),
                kind,
            },
            BoundedReadError::TooLarge { len, .. } => ConfigError::TooLarge {
                path: path.to_path_buf(),
                len,
            },
            BoundedReadError::Io(source) => ConfigError::Read {
                path: path.to_path_buf(),
                source,
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Read {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
        })?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base_dir = match absolute.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let config = Self::parse(&text, &path.display().to_string(), &base_dir)?;
        config.validate()?;
        Ok(config)
    }

    /// Like [`VmConfig::from_file`] for a config held in memory; relative
    /// paths are resolved against `base_dir`.
    pub fn from_json_str(json: &str, base_dir: &Path) -> Result<VmConfig, ConfigError> {
        let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
        let config = Self::parse(json, "config", &base_dir)?;
        config.validate()?;
        Ok(config)
    }

    fn parse(json: &str, origin: &str, base_dir: &Path) -> Result<VmConfig, ConfigError> {
        let mut config: VmConfig = serde_json::from_str(json).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let message = full.strip_suffix(&suffix).unwrap_or(&full);
            ConfigError::Parse {
                origin: origin.to_string(),
                line: e.line(),
                column: e.column(),
                message: message.replace('`', "\""),
            }
        })?;
        config.resolve_paths(base_dir);
        Ok(config)
    }

    fn resolve_paths(&mut self, base_dir: &Path) {
        let resolve = |p: &mut PathBuf| *p = resolve_path(base_dir, p);
        resolve(&mut self.kernel);
        if let Some(initrd) = &mut self.initrd {
            resolve(initrd);
        }
        for drive in &mut self.drives {
            resolve(&mut drive.path);
        }
        if let SerialConfig::File(path) = &mut self.serial {
            resolve(path);
        }
        if let Some(socket) = &mut self.api_socket {
            resolve(socket);
        }
    }

    /// Checks the whole config against itself and this host. Reports all
    /// problems, one line each, in [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.check_vcpus(&mut problems);
        self.check_memory(&mut problems);
        check_input_file("kernel", &self.kernel, true, &mut problems);
        check_cmdline(&self.cmdline, &mut problems);
        if let Some(initrd) = &self.initrd {
            check_input_file("initrd", initrd, false, &mut problems);
        }
        self.check_drives(&mut problems);
        self.check_net(&mut problems);
        if let SerialConfig::File(path) = &self.serial {
            check_serial_file(path, &mut problems);
        }
        if let Some(socket) = &self.api_socket {
            check_api_socket(socket, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    /// The limits on what the config asks of this host (vCPUs, memory,
    /// drive count), without looking at any file: for configs that come
    /// with saved state.
    pub fn check_resources(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        self.check_vcpus(&mut problems);
        self.check_memory(&mut problems);
        if self.drives.len() > MAX_DRIVES {
            problems.push(format!(
                "drives: {} drives, at most {MAX_DRIVES} are supported",
                self.drives.len()
            ));
        }
        self.check_net(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems })
        }
    }

    fn check_vcpus(&self, problems: &mut Vec<String>) {
        problems.extend(vcpus_problem(self.vcpus));
    }

    fn check_memory(&self, problems: &mut Vec<String>) {
        problems.extend(memory_problem(self.memory_mib));
    }

    /// Ids and addresses unique, addresses well formed, tap names valid,
    /// and room for every device on the interrupt lines the drives leave.
    fn check_net(&self, problems: &mut Vec<String>) {
        use crate::devices::virtio::net::{check_tap_name, parse_mac};
        let room = MAX_DRIVES.saturating_sub(self.drives.len());
        if self.net.len() > room {
            problems.push(format!(
                "net: {} devices, but {} drives leave room for {room} (drives and net devices \
                 share {MAX_DRIVES} interrupt lines)",
                self.net.len(),
                self.drives.len()
            ));
            return;
        }
        for (i, net) in self.net.iter().enumerate() {
            let label = format!("net[{i}]");
            if net.id.is_empty() {
                problems.push(format!("{label}.id: must not be empty"));
            } else if net.id.len() > MAX_DRIVE_ID_LEN {
                problems.push(format!(
                    "{label}.id \"{}\" is {} bytes long (maximum {MAX_DRIVE_ID_LEN})",
                    net.id,
                    net.id.len()
                ));
            } else if let Some(first) = self.net[..i].iter().position(|n| n.id == net.id) {
                problems.push(format!(
                    "{label}.id \"{}\" is a duplicate of net[{first}].id",
                    net.id
                ));
            }
            if check_tap_name(&net.tap).is_err() {
                problems.push(format!(
                    "{label}.tap {:?} is not an interface name (1 to 15 bytes, no '/', ':' or \
                     whitespace)",
                    net.tap
                ));
            } else if let Some(first) = self.net[..i].iter().position(|n| n.tap == net.tap) {
                problems.push(format!(
                    "{label}.tap \"{}\" is already net[{first}].tap (a tap serves one device)",
                    net.tap
                ));
            }
            if let Some(mac) = &net.mac {
                match parse_mac(mac) {
                    Err(why) => problems.push(format!("{label}.mac: {why}")),
                    Ok(m) => {
                        let same = |n: &NetConfig| {
                            n.mac.as_deref().and_then(|x| parse_mac(x).ok()) == Some(m)
                        };
                        if let Some(first) = self.net[..i].iter().position(same) {
                            problems.push(format!("{label}.mac {mac} is already net[{first}].mac"));
                        }
                    }
                }
            }
        }
    }

    /// Gives every net device without an address a random one, so that the
    /// saved config (snapshots, migrations) keeps it.
    pub fn assign_macs(&mut self) -> std::io::Result<()> {
        use crate::devices::virtio::net::{format_mac, random_mac};
        for i in 0..self.net.len() {
            if self.net[i].mac.is_some() {
                continue;
            }
            let mac = loop {
                let m = format_mac(&random_mac()?);
                if !self
                    .net
                    .iter()
                    .any(|n| n.mac.as_deref() == Some(m.as_str()))
                {
                    break m;
                }
            };
            self.net[i].mac = Some(mac);
        }
        Ok(())
    }

    fn check_drives(&self, problems: &mut Vec<String>) {
        // For duplicate detection: the file each drive names, canonical when
        // it exists so that two spellings of one file are caught too.
        let mut seen_files: Vec<PathBuf> = Vec::new();
        let mut seen_inodes: Vec<Option<(u64, u64)>> = Vec::new();
        if self.drives.len() > MAX_DRIVES {
            problems.push(format!(
                "drives: {} drives, at most {MAX_DRIVES} are supported (one interrupt line each)",
                self.drives.len()
            ));
        }
        for (i, drive) in self.drives.iter().enumerate() {
            let label = format!("drives[{i}]");
            if drive.id.is_empty() {
                problems.push(format!("{label}.id: must not be empty"));
            } else if drive.id.len() > MAX_DRIVE_ID_LEN {
                problems.push(format!(
                    "{label}.id \"{}\" is {} bytes long (maximum {MAX_DRIVE_ID_LEN}, the \
                     virtio-blk device ID limit)",
                    drive.id,
                    drive.id.len()
                ));
            } else if let Some(first) = self.drives[..i].iter().position(|d| d.id == drive.id) {
                problems.push(format!(
                    "{label}.id \"{}\" is a duplicate of drives[{first}].id",
                    drive.id
                ));
            }

            if let Some(size) = drive.create_size_mib {
                if drive.read_only {
                    problems.push(format!(
                        "{label}: \"create_size_mib\" cannot be combined with \"read_only\": true \
                         (it would create an empty read-only disk)"
                    ));
                }
                if size == 0 {
                    problems.push(format!(
                        "{label}.create_size_mib: 0 is too small (minimum 1)"
                    ));
                } else if size > MAX_CREATE_SIZE_MIB {
                    problems.push(format!(
                        "{label}.create_size_mib: {size} is more than the maximum of \
                         {MAX_CREATE_SIZE_MIB} (16 TiB)"
                    ));
                }
            }

            if drive.path.as_os_str().is_empty() {
                problems.push(format!("{label}.path: must not be empty"));
                continue;
            }
            check_drive_path(&label, drive, problems);

            let file = fs::canonicalize(&drive.path).unwrap_or_else(|_| drive.path.clone());
            // A hard link is another name for the same inode.
            let inode = fs::metadata(&drive.path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            if let Some(first) = seen_files
                .iter()
                .position(|f| *f == file)
                .or_else(|| inode.and_then(|ino| seen_inodes.iter().position(|i| *i == Some(ino))))
            {
                problems.push(format!(
                    "{label}.path: {} is the same file as drives[{first}].path",
                    drive.path.display()
                ));
            }
            seen_files.push(file);
            seen_inodes.push(inode);
        }
    }

    /// Creates, as sparse raw images, the drives that have `create_size_mib`
    /// and whose file does not exist yet. Existing files are left untouched.
    /// Call it after [`VmConfig::validate`]. On failure, the images this call
    /// created are removed again.
    /// Returns the images it created.
    pub fn create_missing_drives(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut created: Vec<&Path> = Vec::new();
        let result = self.create_missing_drives_inner(&mut created);
        if result.is_err() {
            for path in created {
                let _ = fs::remove_file(path);
            }
            return result.map(|()| Vec::new());
        }
        Ok(created.into_iter().map(Path::to_path_buf).collect())
    }

    fn create_missing_drives_inner<'a>(
        &'a self,
        created: &mut Vec<&'a Path>,
    ) -> Result<(), ConfigError> {
        for (index, drive) in self.drives.iter().enumerate() {
            let Some(size_mib) = drive.create_size_mib else {
                continue;
            };
            let error = |source| ConfigError::CreateDrive {
                index,
                path: drive.path.clone(),
                source,
            };
            let size = size_mib.checked_mul(MIB).ok_or_else(|| {
                error(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{size_mib} MiB is too large"),
                ))
            })?;
            // create_new: never truncate a file that appeared since validation.
            let file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&drive.path)
            {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(error(e)),
            };
            created.push(&drive.path);
            file.set_len(size).map_err(error)?;
        }
        Ok(())
    }
}

/// What is wrong with `n` vCPUs on this host, if anything: the limits of
/// `ferry run`, which a migration destination applies to what it is sent.
pub fn vcpus_problem(n: u8) -> Option<String> {
    if n == 0 {
        return Some("vcpus: 0 is too few (minimum 1)".to_string());
    }
    if n > MAX_VCPUS {
        return Some(format!("vcpus: {n} is too many (maximum {MAX_VCPUS})"));
    }
    let host = host_cpus()?;
    let limit = host.saturating_mul(MAX_VCPUS_PER_HOST_CPU);
    (usize::from(n) > limit).then(|| {
        format!(
            "vcpus: {n} is too many for this host (maximum {MAX_VCPUS}, and at most \
             {MAX_VCPUS_PER_HOST_CPU} per host CPU: {limit} with {host} host CPUs)"
        )
    })
}

/// What is wrong with `m` MiB of guest memory on this host, if anything.
pub fn memory_problem(m: u64) -> Option<String> {
    if m < MIN_MEMORY_MIB {
        return Some(format!(
            "memory_mib: {m} is too small (minimum {MIN_MEMORY_MIB})"
        ));
    }
    if m > MAX_MEMORY_MIB {
        return Some(format!(
            "memory_mib: {m} is more than the maximum of {MAX_MEMORY_MIB} (1 TiB)"
        ));
    }
    let host = host_memory_mib()?;
    (m > host).then(|| format!("memory_mib: {m} is more than this host's memory ({host} MiB)"))
}

/// Joins a relative path onto `base_dir` and drops `.` components. `..` is
/// kept: with symlinks it is not a lexical operation. Empty paths stay empty
/// so that validation can name them.
fn resolve_path(base_dir: &Path, path: &Path) -> PathBuf {
    if path.as_os_str().is_empty() {
        return PathBuf::new();
    }
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// The directory a path lives in; "." for a bare relative file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn check_parent_dir(label: &str, action: &str, path: &Path, problems: &mut Vec<String>) -> bool {
    let dir = parent_dir(path);
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => true,
        Ok(_) => {
            problems.push(format!(
                "{label}: cannot {action} {}: {} is not a directory",
                path.display(),
                dir.display()
            ));
            false
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            problems.push(format!(
                "{label}: cannot {action} {}: directory {} does not exist",
                path.display(),
                dir.display()
            ));
            false
        }
        Err(e) => {
            problems.push(format!(
                "{label}: cannot {action} {}: {}",
                path.display(),
                io_msg(&e)
            ));
            false
        }
    }
}

/// Kernel and initrd: an existing, readable regular file. Only the metadata is
/// looked at before opening, so that a FIFO cannot block validation.
fn check_input_file(label: &str, path: &Path, must_be_nonempty: bool, problems: &mut Vec<String>) {
    if path.as_os_str().is_empty() {
        problems.push(format!("{label}: must not be empty"));
        return;
    }
    let cannot_read =
        |e: &io::Error| format!("{label}: cannot read {}: {}", path.display(), io_msg(e));
    match fs::metadata(path) {
        Err(e) => problems.push(cannot_read(&e)),
        Ok(meta) if !meta.is_file() => {
            problems.push(format!("{label}: {} is not a regular file", path.display()))
        }
        Ok(meta) => {
            if let Err(e) = fs::File::open(path) {
                problems.push(cannot_read(&e));
            } else if must_be_nonempty && meta.len() == 0 {
                problems.push(format!("{label}: {} is empty", path.display()));
            }
        }
    }
}

fn check_cmdline(cmdline: &str, problems: &mut Vec<String>) {
    if cmdline.len() > MAX_CMDLINE_LEN {
        problems.push(format!(
            "cmdline: {} bytes is too long (maximum {MAX_CMDLINE_LEN}: the rest of the \
             kernel's 2048 bytes is kept for what the VMM appends)",
            cmdline.len()
        ));
    }
    if let Some((i, c)) = cmdline
        .char_indices()
        .find(|(_, c)| !matches!(c, ' '..='~'))
    {
        problems.push(format!(
            "cmdline: character {c:?} at byte {i} is not printable ASCII"
        ));
    }
}

fn check_drive_path(label: &str, drive: &DriveConfig, problems: &mut Vec<String>) {
    let path = &drive.path;
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if drive.create_size_mib.is_some() {
                check_parent_dir(&format!("{label}.path"), "create", path, problems);
            } else {
                problems.push(format!(
                    "{label}.path: {} does not exist (add \"create_size_mib\" to create a new \
                     sparse image)",
                    path.display()
                ));
            }
        }
        Err(e) => problems.push(format!(
            "{label}.path: cannot read {}: {}",
            path.display(),
            io_msg(&e)
        )),
        Ok(meta) if !(meta.is_file() || meta.file_type().is_block_device()) => {
            problems.push(format!(
                "{label}.path: {} is not a regular file or block device",
                path.display()
            ))
        }
        Ok(_) => {
            let result = OpenOptions::new()
                .read(true)
                .write(!drive.read_only)
                .open(path);
            if let Err(e) = result {
                if drive.read_only {
                    problems.push(format!(
                        "{label}.path: cannot read {}: {}",
                        path.display(),
                        io_msg(&e)
                    ));
                } else {
                    problems.push(format!(
                        "{label}.path: cannot open {} for reading and writing: {} (set \
                         \"read_only\": true to use it read-only)",
                        path.display(),
                        io_msg(&e)
                    ));
                }
            }
        }
    }
}

fn check_serial_file(path: &Path, problems: &mut Vec<String>) {
    match fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            check_parent_dir("serial", "write", path, problems);
        }
        Err(e) => problems.push(format!(
            "serial: cannot write {}: {}",
            path.display(),
            io_msg(&e)
        )),
        Ok(meta) if meta.is_dir() => {
            problems.push(format!("serial: {} is a directory", path.display()))
        }
        Ok(meta) if meta.is_file() => {
            // Opening for writing without truncating or creating changes nothing.
            if let Err(e) = OpenOptions::new().write(true).open(path) {
                problems.push(format!(
                    "serial: cannot write {}: {}",
                    path.display(),
                    io_msg(&e)
                ));
            }
        }
        // A terminal, FIFO or /dev/null: opening could block; leave it to the VMM.
        Ok(_) => {}
    }
}

fn check_api_socket(path: &Path, problems: &mut Vec<String>) {
    let len = path.as_os_str().len();
    if len == 0 {
        problems.push("api_socket: must not be empty".to_string());
        return;
    }
    if len > MAX_SOCKET_PATH_LEN {
        problems.push(format!(
            "api_socket: {} is {len} bytes long, too long for a Unix socket (maximum \
             {MAX_SOCKET_PATH_LEN})",
            path.display()
        ));
    }
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            check_parent_dir("api_socket", "create", path, problems);
        }
        Err(e) => problems.push(format!(
            "api_socket: cannot use {}: {}",
            path.display(),
            io_msg(&e)
        )),
        Ok(meta) if !meta.file_type().is_socket() => problems.push(format!(
            "api_socket: {} exists and is not a socket",
            path.display()
        )),
        // A stale or live socket: the API server decides when it starts.
        Ok(_) => {}
    }
}

/// Online host CPUs, from sysfs ("0-3,6"); falls back to what std reports.
fn host_cpus() -> Option<usize> {
    if let Ok(text) = fs::read_to_string("/sys/devices/system/cpu/online") {
        if let Some(n) = parse_cpu_list(text.trim()) {
            return Some(n);
        }
    }
    std::thread::available_parallelism().ok().map(|n| n.get())
}

fn parse_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in list.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    (count > 0).then_some(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use tempfile::TempDir;

    /// A temp dir holding a small "vmlinux", and a helper to load a config
    /// written into it.
    struct Fixture {
        dir: TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            fs::write(dir.path().join("vmlinux"), b"\x7fELF-not-really").expect("write kernel");
            Fixture { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn load(&self, json: &str) -> Result<VmConfig, ConfigError> {
            let file = self.path("config.json");
            fs::write(&file, json).expect("write config");
            VmConfig::from_file(&file)
        }

        fn problems(&self, json: &str) -> Vec<String> {
            match self.load(json) {
                Err(ConfigError::Invalid { problems }) => problems,
                other => panic!("expected validation problems, got {other:?}"),
            }
        }
    }

    #[test]
    fn too_many_drives() {
        let f = Fixture::new();
        let drives: Vec<String> = (0..=MAX_DRIVES)
            .map(|i| {
                fs::write(f.path(&format!("d{i}.img")), [0u8; 512]).unwrap();
                format!(r#"{{"id": "d{i}", "path": "d{i}.img"}}"#)
            })
            .collect();
        let problems = f.problems(&format!(
            r#"{{"kernel": "vmlinux", "drives": [{}]}}"#,
            drives.join(",")
        ));
        assert_eq!(
            only_problem(&problems),
            "drives: 20 drives, at most 19 are supported (one interrupt line each)"
        );
    }

    fn only_problem(problems: &[String]) -> &str {
        assert_eq!(problems.len(), 1, "problems: {problems:#?}");
        &problems[0]
    }

    /// Whether file modes stop this thread from opening a file.
    fn permissions_enforced(dir: &Path) -> bool {
        let probe = dir.join("probe");
        fs::write(&probe, b"x").expect("write probe");
        fs::set_permissions(&probe, fs::Permissions::from_mode(0o000)).expect("chmod");
        let enforced = fs::File::open(&probe).is_err();
        let _ = fs::remove_file(&probe);
        enforced
    }

    /// Runs `check` where file modes apply even to root (CI runs as root):
    /// on a thread of its own without CAP_DAC_OVERRIDE and
    /// CAP_DAC_READ_SEARCH. Linux keeps capabilities per thread, so the rest
    /// of the test process keeps them.
    fn with_file_modes_enforced<T: Send>(dir: &Path, check: impl FnOnce() -> T + Send) -> T {
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct CapData {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        const CAP_DAC_OVERRIDE: u32 = 1;
        const CAP_DAC_READ_SEARCH: u32 = 2;
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut header = CapHeader {
                        version: LINUX_CAPABILITY_VERSION_3,
                        pid: 0,
                    };
                    let mut data = [CapData::default(); 2];
                    // SAFETY: capget/capset with a v3 header and the two data
                    // words v3 expects, both live for the calls; pid 0 is
                    // this thread only.
                    unsafe {
                        assert_eq!(
                            libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                            0,
                            "capget: {}",
                            io::Error::last_os_error()
                        );
                        data[0].effective &= !(1 << CAP_DAC_OVERRIDE | 1 << CAP_DAC_READ_SEARCH);
                        assert_eq!(
                            libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                            0,
                            "capset: {}",
                            io::Error::last_os_error()
                        );
                    }
                    assert!(
                        permissions_enforced(dir),
                        "file modes still not enforced without CAP_DAC_OVERRIDE"
                    );
                    check()
                })
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    #[test]
    fn minimal_config_gets_defaults_and_absolute_paths() {
        let f = Fixture::new();
        let config = f.load(r#"{ "kernel": "vmlinux" }"#).expect("valid");
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.memory_mib, 128);
        assert_eq!(config.cmdline, "");
        assert_eq!(config.initrd, None);
        assert!(config.drives.is_empty());
        assert_eq!(config.serial, SerialConfig::Stdout);
        assert_eq!(config.api_socket, None);
        assert_eq!(config.kernel, f.path("vmlinux"));
        assert!(config.kernel.is_absolute());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let f = Fixture::new();
        fs::create_dir(f.path("sub")).expect("mkdir");
        fs::write(f.path("sub/initrd"), b"x").expect("write");
        fs::write(f.path("disk.img"), b"").expect("write");
        let config = f
            .load(
                r#"{ "kernel": "./vmlinux", "initrd": "sub/initrd",
                     "drives": [ { "id": "root", "path": "disk.img" },
                                 { "id": "abs", "path": "/dev/null", "read_only": true } ],
                     "serial": "sub/serial.log", "api_socket": "ferry.sock" }"#,
            )
            .expect_err("/dev/null is a char device");
        assert!(
            config
                .to_string()
                .contains("drives[1].path: /dev/null is not a regular file"),
            "{config}"
        );

        fs::write(f.path("other.img"), b"").expect("write");
        let other = f.path("other.img");
        let json = format!(
            r#"{{ "kernel": "./vmlinux", "initrd": "sub/initrd",
                 "drives": [ {{ "id": "root", "path": "disk.img" }},
                             {{ "id": "abs", "path": "{}" }} ],
                 "serial": "sub/serial.log", "api_socket": "ferry.sock" }}"#,
            other.display()
        );
        let config = f.load(&json).expect("valid");
        assert_eq!(config.kernel, f.path("vmlinux"));
        assert_eq!(config.initrd, Some(f.path("sub/initrd")));
        assert_eq!(config.drives[0].path, f.path("disk.img"));
        assert_eq!(config.drives[1].path, other);
        assert_eq!(config.serial, SerialConfig::File(f.path("sub/serial.log")));
        assert_eq!(config.api_socket, Some(f.path("ferry.sock")));
    }

    #[test]
    fn from_json_str_resolves_against_base_dir() {
        let f = Fixture::new();
        let config =
            VmConfig::from_json_str(r#"{"kernel": "vmlinux"}"#, f.dir.path()).expect("valid");
        assert_eq!(config.kernel, f.path("vmlinux"));
    }

    #[test]
    fn unknown_field_reports_line_and_column() {
        let f = Fixture::new();
        let err = f
            .load("{\n  \"kernel\": \"vmlinux\",\n    \"memroy\": 64\n}")
            .expect_err("unknown field");
        let text = err.to_string();
        assert!(text.contains("config.json: line 3, column 12: "), "{text}");
        assert!(
            text.contains("unknown field \"memroy\", expected one of"),
            "{text}"
        );
        assert!(text.contains("\"memory_mib\""), "{text}");
        assert!(matches!(err, ConfigError::Parse { line: 3, .. }));
    }

    #[test]
    fn unknown_field_in_a_drive_is_rejected() {
        let f = Fixture::new();
        let err = f
            .load(
                r#"{"kernel": "vmlinux", "drives": [{"id": "a", "path": "x", "readonly": true}]}"#,
            )
            .expect_err("unknown field");
        assert!(
            err.to_string().contains("unknown field \"readonly\""),
            "{err}"
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let f = Fixture::new();
        let err = f
            .load("{\n  \"kernel\": \"vmlinux\"\n  \"vcpus\": 1\n}")
            .expect_err("missing comma");
        assert!(
            matches!(
                err,
                ConfigError::Parse {
                    line: 3,
                    column: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with(&format!(
            "{}: line 3, column 3: expected",
            f.path("config.json").display()
        )));
    }

    #[test]
    fn missing_required_field_and_wrong_type_are_parse_errors() {
        let f = Fixture::new();
        let err = f.load(r#"{"vcpus": 2}"#).expect_err("no kernel");
        assert!(
            err.to_string().contains("missing field \"kernel\""),
            "{err}"
        );
        let err = f
            .load(r#"{"kernel": "vmlinux", "memory_mib": "lots"}"#)
            .expect_err("wrong type");
        assert!(
            err.to_string().contains("invalid type: string \"lots\""),
            "{err}"
        );
        let err = f
            .load(r#"{"kernel": "vmlinux", "serial": ""}"#)
            .expect_err("empty");
        assert!(
            err.to_string().contains("serial: expected \"stdout\""),
            "{err}"
        );
    }

    #[test]
    fn missing_config_file_names_it() {
        let f = Fixture::new();
        let err = VmConfig::from_file(&f.path("nope.json")).expect_err("missing");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read config {}: No such file or directory",
                f.path("nope.json").display()
            )
        );
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "bzImage"}"#);
        assert_eq!(
            only_problem(&problems),
            format!(
                "kernel: cannot read {}: No such file or directory",
                f.path("bzImage").display()
            )
        );
    }

    #[test]
    fn kernel_must_be_a_nonempty_regular_file() {
        let f = Fixture::new();
        fs::create_dir(f.path("dir")).expect("mkdir");
        let problems = f.problems(r#"{"kernel": "dir"}"#);
        assert_eq!(
            only_problem(&problems),
            format!("kernel: {} is not a regular file", f.path("dir").display())
        );
        fs::write(f.path("empty"), b"").expect("write");
        let problems = f.problems(r#"{"kernel": "empty"}"#);
        assert_eq!(
            only_problem(&problems),
            format!("kernel: {} is empty", f.path("empty").display())
        );
        let problems = f.problems(r#"{"kernel": ""}"#);
        assert_eq!(only_problem(&problems), "kernel: must not be empty");
    }

    #[test]
    fn unreadable_kernel_and_initrd_name_the_path() {
        let f = Fixture::new();
        with_file_modes_enforced(f.dir.path(), || {
            fs::set_permissions(f.path("vmlinux"), fs::Permissions::from_mode(0o200))
                .expect("chmod");
            fs::write(f.path("initrd"), b"x").expect("write");
            fs::set_permissions(f.path("initrd"), fs::Permissions::from_mode(0o000))
                .expect("chmod");
            let problems = f.problems(r#"{"kernel": "vmlinux", "initrd": "initrd"}"#);
            assert_eq!(
                problems,
                vec![
                    format!(
                        "kernel: cannot read {}: Permission denied",
                        f.path("vmlinux").display()
                    ),
                    format!(
                        "initrd: cannot read {}: Permission denied",
                        f.path("initrd").display()
                    ),
                ]
            );
        });
    }

    #[test]
    fn missing_initrd_names_the_path() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "vmlinux", "initrd": "/nonexistent/initrd"}"#);
        assert_eq!(
            only_problem(&problems),
            "initrd: cannot read /nonexistent/initrd: No such file or directory"
        );
    }

    #[test]
    fn memory_limits() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "vmlinux", "memory_mib": 0}"#);
        assert_eq!(
            only_problem(&problems),
            "memory_mib: 0 is too small (minimum 16)"
        );
        let problems = f.problems(r#"{"kernel": "vmlinux", "memory_mib": 15}"#);
        assert_eq!(
            only_problem(&problems),
            "memory_mib: 15 is too small (minimum 16)"
        );
        f.load(r#"{"kernel": "vmlinux", "memory_mib": 16}"#)
            .expect("minimum is allowed");

        let host = host_memory_mib().expect("/proc/meminfo");
        let problems = f.problems(r#"{"kernel": "vmlinux", "memory_mib": 999999}"#);
        if host < 999_999 {
            assert_eq!(
                only_problem(&problems),
                format!("memory_mib: 999999 is more than this host's memory ({host} MiB)")
            );
        }
        let problems = f.problems(r#"{"kernel": "vmlinux", "memory_mib": 9999999}"#);
        assert_eq!(
            only_problem(&problems),
            "memory_mib: 9999999 is more than the maximum of 1048576 (1 TiB)"
        );
    }

    #[test]
    fn vcpu_limits() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "vmlinux", "vcpus": 0}"#);
        assert_eq!(only_problem(&problems), "vcpus: 0 is too few (minimum 1)");

        let err = f
            .load(r#"{"kernel": "vmlinux", "vcpus": 300}"#)
            .expect_err("too many");
        assert!(matches!(err, ConfigError::Parse { line: 1, .. }), "{err:?}");
        assert!(
            err.to_string()
                .ends_with(": vcpus: 300 is too many (maximum 254)"),
            "{err}"
        );
        let err = f
            .load(r#"{"kernel": "vmlinux", "vcpus": 255}"#)
            .expect_err("too many");
        assert!(err
            .to_string()
            .contains("vcpus: 255 is too many (maximum 254)"));

        let host = host_cpus().expect("host cpus");
        let limit = host * MAX_VCPUS_PER_HOST_CPU;
        if limit < 254 {
            let problems = f.problems(&format!(
                r#"{{"kernel": "vmlinux", "vcpus": {}}}"#,
                limit + 1
            ));
            assert_eq!(
                only_problem(&problems),
                format!(
                    "vcpus: {} is too many for this host (maximum 254, and at most 4 per host \
                     CPU: {limit} with {host} host CPUs)",
                    limit + 1
                )
            );
        }
        let ok = limit.min(254);
        f.load(&format!(r#"{{"kernel": "vmlinux", "vcpus": {ok}}}"#))
            .expect("limit is allowed");
    }

    #[test]
    fn cmdline_limits() {
        let f = Fixture::new();
        let fits = "a".repeat(MAX_CMDLINE_LEN);
        f.load(&format!(r#"{{"kernel": "vmlinux", "cmdline": "{fits}"}}"#))
            .expect("1536 bytes fit");
        let problems = f.problems(&format!(r#"{{"kernel": "vmlinux", "cmdline": "{fits}b"}}"#));
        assert!(
            only_problem(&problems).starts_with("cmdline: 1537 bytes is too long (maximum 1536"),
            "{problems:?}"
        );
        let problems = f.problems(r#"{"kernel": "vmlinux", "cmdline": "console=ttyS0\nquiet"}"#);
        assert_eq!(
            only_problem(&problems),
            "cmdline: character '\\n' at byte 13 is not printable ASCII"
        );
    }

    #[test]
    fn drive_ids_must_be_unique_nonempty_and_short() {
        let f = Fixture::new();
        for name in ["a.img", "b.img", "c.img", "d.img"] {
            fs::write(f.path(name), b"").expect("write");
        }
        let problems = f.problems(
            r#"{"kernel": "vmlinux", "drives": [
                {"id": "root", "path": "a.img"},
                {"id": "root", "path": "b.img"},
                {"id": "", "path": "c.img"},
                {"id": "abcdefghijklmnopqrstu", "path": "d.img"}]}"#,
        );
        assert_eq!(
            problems,
            vec![
                "drives[1].id \"root\" is a duplicate of drives[0].id".to_string(),
                "drives[2].id: must not be empty".to_string(),
                "drives[3].id \"abcdefghijklmnopqrstu\" is 21 bytes long (maximum 20, the \
                 virtio-blk device ID limit)"
                    .to_string(),
            ]
        );
        f.load(
            r#"{"kernel": "vmlinux", "drives": [{"id": "abcdefghijklmnopqrst", "path": "a.img"}]}"#,
        )
        .expect("20 bytes fit");
    }

    #[test]
    fn net_devices_need_unique_ids_taps_and_good_macs() {
        let f = Fixture::new();
        let problems = f.problems(
            r#"{"kernel": "vmlinux", "net": [
                {"id": "n0", "tap": "tap0", "mac": "02:00:00:00:00:01"},
                {"id": "n0", "tap": "tap1"},
                {"id": "", "tap": "tap0"},
                {"id": "n3", "tap": "a/b", "mac": "03:00:00:00:00:01"},
                {"id": "n4", "tap": "tap4", "mac": "02:00:00:00:00:01"},
                {"id": "n5", "tap": "tap5", "mac": "02:00:00:00:01"}]}"#,
        );
        assert_eq!(
            problems,
            vec![
                "net[1].id \"n0\" is a duplicate of net[0].id".to_string(),
                "net[2].id: must not be empty".to_string(),
                "net[2].tap \"tap0\" is already net[0].tap (a tap serves one device)".to_string(),
                "net[3].tap \"a/b\" is not an interface name (1 to 15 bytes, no '/', ':' or \
                 whitespace)"
                    .to_string(),
                "net[3].mac: \"03:00:00:00:00:01\" is a multicast address; a NIC needs a \
                 unicast one"
                    .to_string(),
                "net[4].mac 02:00:00:00:00:01 is already net[0].mac".to_string(),
                "net[5].mac: \"02:00:00:00:01\" is not a MAC address (six hex bytes, e.g. \
                 02:00:00:00:00:01)"
                    .to_string(),
            ]
        );
        let err = f
            .load(r#"{"kernel": "vmlinux", "net": [{"id": "n0", "tap": "t", "ip": "x"}]}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field \"ip\""), "{err}");

        let mut config = f
            .load(r#"{"kernel": "vmlinux", "net": [{"id": "a", "tap": "t0"}, {"id": "b", "tap": "t1", "mac": "02:00:00:00:00:07"}]}"#)
            .expect("valid");
        config.assign_macs().expect("random");
        let a = config.net[0].mac.clone().expect("assigned");
        assert_ne!(a, "02:00:00:00:00:07");
        assert_eq!(config.net[1].mac.as_deref(), Some("02:00:00:00:00:07"));
        config.validate().expect("assigned addresses are valid");
        config.assign_macs().expect("no-op");
        assert_eq!(config.net[0].mac, Some(a), "kept once chosen");
    }

    #[test]
    fn net_devices_share_the_interrupt_lines_with_drives() {
        let f = Fixture::new();
        let nets: Vec<String> = (0..=MAX_DRIVES)
            .map(|i| format!(r#"{{"id": "n{i}", "tap": "t{i}"}}"#))
            .collect();
        let problems = f.problems(&format!(
            r#"{{"kernel": "vmlinux", "net": [{}]}}"#,
            nets.join(",")
        ));
        assert_eq!(
            problems,
            vec![
                "net: 20 devices, but 0 drives leave room for 19 (drives and net devices share \
                 19 interrupt lines)"
                    .to_string()
            ]
        );
    }

    #[test]
    fn two_drives_on_one_file_are_rejected() {
        let f = Fixture::new();
        fs::write(f.path("a.img"), b"").expect("write");
        fs::create_dir(f.path("sub")).expect("mkdir");
        let problems = f.problems(
            r#"{"kernel": "vmlinux", "drives": [
                {"id": "one", "path": "a.img"}, {"id": "two", "path": "sub/../a.img"}]}"#,
        );
        assert_eq!(
            only_problem(&problems),
            format!(
                "drives[1].path: {} is the same file as drives[0].path",
                f.path("sub/../a.img").display()
            )
        );
    }

    #[test]
    fn missing_drive_without_create_size_explains_the_fix() {
        let f = Fixture::new();
        let problems =
            f.problems(r#"{"kernel": "vmlinux", "drives": [{"id": "root", "path": "disk.img"}]}"#);
        assert_eq!(
            only_problem(&problems),
            format!(
                "drives[0].path: {} does not exist (add \"create_size_mib\" to create a new \
                 sparse image)",
                f.path("disk.img").display()
            )
        );
    }

    #[test]
    fn create_size_mib_creates_a_sparse_image_only_when_asked() {
        let f = Fixture::new();
        let config = f
            .load(
                r#"{"kernel": "vmlinux", "drives": [
                    {"id": "root", "path": "disk.img", "create_size_mib": 64}]}"#,
            )
            .expect("valid");
        assert!(!f.path("disk.img").exists(), "validation must not create");
        config.create_missing_drives().expect("create");
        let meta = fs::metadata(f.path("disk.img")).expect("created");
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            meta.blocks()
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        // Second call: the file exists and stays as it is.
        fs::write(f.path("disk.img"), b"data").expect("write");
        config.create_missing_drives().expect("no-op");
        assert_eq!(fs::read(f.path("disk.img")).expect("read"), b"data");
    }

    #[test]
    fn existing_drive_with_create_size_mib_is_not_truncated() {
        let f = Fixture::new();
        fs::write(f.path("disk.img"), b"precious").expect("write");
        let config = f
            .load(
                r#"{"kernel": "vmlinux", "drives": [
                    {"id": "root", "path": "disk.img", "create_size_mib": 64}]}"#,
            )
            .expect("valid");
        config.create_missing_drives().expect("create");
        assert_eq!(fs::read(f.path("disk.img")).expect("read"), b"precious");
    }

    #[test]
    fn nothing_is_created_when_validation_fails() {
        let f = Fixture::new();
        let problems = f.problems(
            r#"{"kernel": "vmlinux", "memory_mib": 1, "drives": [
                {"id": "root", "path": "disk.img", "create_size_mib": 64}]}"#,
        );
        assert_eq!(
            only_problem(&problems),
            "memory_mib: 1 is too small (minimum 16)"
        );
        assert!(!f.path("disk.img").exists());
    }

    #[test]
    fn create_size_mib_checks() {
        let f = Fixture::new();
        let problems = f.problems(
            r#"{"kernel": "vmlinux", "drives": [
                {"id": "a", "path": "a.img", "read_only": true, "create_size_mib": 8},
                {"id": "b", "path": "b.img", "create_size_mib": 0},
                {"id": "c", "path": "c.img", "create_size_mib": 99999999999},
                {"id": "d", "path": "nodir/d.img", "create_size_mib": 8}]}"#,
        );
        assert_eq!(
            problems,
            vec![
                "drives[0]: \"create_size_mib\" cannot be combined with \"read_only\": true (it \
                 would create an empty read-only disk)"
                    .to_string(),
                "drives[1].create_size_mib: 0 is too small (minimum 1)".to_string(),
                "drives[2].create_size_mib: 99999999999 is more than the maximum of 16777216 \
                 (16 TiB)"
                    .to_string(),
                format!(
                    "drives[3].path: cannot create {}: directory {} does not exist",
                    f.path("nodir/d.img").display(),
                    f.path("nodir").display()
                ),
            ]
        );
        assert!(!f.path("a.img").exists() && !f.path("b.img").exists());
    }

    #[test]
    fn create_missing_drives_rolls_back_on_failure() {
        let f = Fixture::new();
        fs::create_dir(f.path("sub")).expect("mkdir");
        let config = f
            .load(
                r#"{"kernel": "vmlinux", "drives": [
                    {"id": "a", "path": "a.img", "create_size_mib": 1},
                    {"id": "b", "path": "sub/b.img", "create_size_mib": 1}]}"#,
            )
            .expect("valid");
        fs::remove_dir(f.path("sub")).expect("rmdir");
        let err = config.create_missing_drives().expect_err("sub/ is gone");
        assert_eq!(
            err.to_string(),
            format!(
                "drives[1].path: cannot create {}: No such file or directory",
                f.path("sub/b.img").display()
            )
        );
        assert!(!f.path("a.img").exists(), "a.img must be removed again");
    }

    #[test]
    fn read_write_drive_must_be_writable() {
        let f = Fixture::new();
        with_file_modes_enforced(f.dir.path(), || {
            fs::write(f.path("ro.img"), b"").expect("write");
            fs::set_permissions(f.path("ro.img"), fs::Permissions::from_mode(0o400))
                .expect("chmod");
            let problems =
                f.problems(r#"{"kernel": "vmlinux", "drives": [{"id": "a", "path": "ro.img"}]}"#);
            assert_eq!(
                only_problem(&problems),
                format!(
                "drives[0].path: cannot open {} for reading and writing: Permission denied (set \
                 \"read_only\": true to use it read-only)",
                f.path("ro.img").display()
            )
            );
            f.load(r#"{"kernel": "vmlinux", "drives": [{"id": "a", "path": "ro.img", "read_only": true}]}"#)
            .expect("read-only is fine");
        });
    }

    #[test]
    fn serial_file_needs_an_existing_directory() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "vmlinux", "serial": "logs/serial.log"}"#);
        assert_eq!(
            only_problem(&problems),
            format!(
                "serial: cannot write {}: directory {} does not exist",
                f.path("logs/serial.log").display(),
                f.path("logs").display()
            )
        );
        fs::create_dir(f.path("logs")).expect("mkdir");
        let problems = f.problems(r#"{"kernel": "vmlinux", "serial": "logs"}"#);
        assert_eq!(
            only_problem(&problems),
            format!("serial: {} is a directory", f.path("logs").display())
        );
        let config = f
            .load(r#"{"kernel": "vmlinux", "serial": "logs/serial.log"}"#)
            .expect("valid");
        assert!(!f.path("logs/serial.log").exists());
        assert_eq!(config.serial, SerialConfig::File(f.path("logs/serial.log")));
    }

    #[test]
    fn api_socket_checks() {
        let f = Fixture::new();
        let problems = f.problems(r#"{"kernel": "vmlinux", "api_socket": "run/ferry.sock"}"#);
        assert_eq!(
            only_problem(&problems),
            format!(
                "api_socket: cannot create {}: directory {} does not exist",
                f.path("run/ferry.sock").display(),
                f.path("run").display()
            )
        );
        let long = format!("/tmp/{}", "s".repeat(120));
        let problems = f.problems(&format!(
            r#"{{"kernel": "vmlinux", "api_socket": "{long}"}}"#
        ));
        assert_eq!(
            only_problem(&problems),
            format!(
                "api_socket: {long} is 125 bytes long, too long for a Unix socket (maximum 107)"
            )
        );
        fs::write(f.path("plain"), b"").expect("write");
        let problems = f.problems(r#"{"kernel": "vmlinux", "api_socket": "plain"}"#);
        assert_eq!(
            only_problem(&problems),
            format!(
                "api_socket: {} exists and is not a socket",
                f.path("plain").display()
            )
        );
    }

    #[test]
    fn all_problems_are_reported_one_line_each() {
        let f = Fixture::new();
        let err = f
            .load(
                r#"{"kernel": "missing", "vcpus": 0, "memory_mib": 0,
                    "drives": [{"id": "", "path": "nope.img"}]}"#,
            )
            .expect_err("invalid");
        let text = err.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("vcpus: "));
        assert!(lines[1].starts_with("memory_mib: "));
        assert!(lines[2].starts_with("kernel: "));
        assert!(lines[3].starts_with("drives[0].id: "));
        assert!(lines[4].starts_with("drives[0].path: "));
    }

    #[test]
    fn serde_roundtrip_and_serial_as_plain_string() {
        let f = Fixture::new();
        fs::write(f.path("disk.img"), b"").expect("write");
        let config = f
            .load(
                r#"{"kernel": "vmlinux", "vcpus": 1, "cmdline": "console=ttyS0",
                    "drives": [{"id": "root", "path": "disk.img", "create_size_mib": 8}],
                    "serial": "serial.log"}"#,
            )
            .expect("valid");
        let json = serde_json::to_value(&config).expect("serialize");
        assert_eq!(
            json["serial"],
            serde_json::Value::String(f.path("serial.log").display().to_string())
        );
        let back: VmConfig = serde_json::from_value(json).expect("deserialize");
        assert_eq!(back, config);

        let stdout = VmConfig {
            serial: SerialConfig::Stdout,
            ..config.clone()
        };
        let json = serde_json::to_value(&stdout).expect("serialize");
        assert_eq!(json["serial"], "stdout");
        let named = SerialConfig::File(PathBuf::from("stdout"));
        let text = serde_json::to_string(&named).expect("serialize");
        assert_eq!(text, "\"./stdout\"");
        let back: SerialConfig = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, SerialConfig::File(PathBuf::from("./stdout")));
    }

    #[test]
    fn host_info_parsers() {
        assert_eq!(parse_cpu_list("0"), Some(1));
        assert_eq!(parse_cpu_list("0-3"), Some(4));
        assert_eq!(parse_cpu_list("0-3,6,8-9"), Some(7));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(
            crate::util::parse_mem_total_mib("MemTotal:       16303808 kB\nMemFree: 1 kB\n"),
            Some(15921)
        );
        assert_eq!(crate::util::parse_mem_total_mib("MemFree: 1 kB\n"), None);
        assert!(host_cpus().is_some());
        assert!(host_memory_mib().is_some());
    }
}
