//! The temporary file share a migration copies the VM's files into.
//!
//! The destination serves `DIR/<migration id>/` over NFSv3 from inside its
//! own process ([`server::NfsShareServer`]); the source writes into it from
//! inside its own process ([`client::NfsShare`]), with no root and no kernel
//! mount. A directory that is already mounted (kernel NFS, SMB, ...) works too
//! ([`MountedShare`]). Copy and mirror code sees only [`Share`] and
//! [`ShareFile`], so it is the same for both kinds.
//!
//! A share is flat: regular files directly in one directory, named without
//! slashes.

pub mod client;
pub mod server;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use client::NfsShare;
pub use server::NfsShareServer;

/// The one-time secret a share connection opens with: it is sent only over
/// the migration's authenticated channel (`HelloAck`), so it ties every
/// share connection to that channel's peer, whatever its IP address says.
pub const SECRET_LEN: usize = 32;

/// What the source needs to reach the share: TLS with its credentials
/// (checking the destination's name), or plaintext; then the secret.
#[derive(Clone)]
pub struct ShareAccess {
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// `None` only for plain NFS servers (see [`ShareGuard::open`]).
    pub secret: Option<[u8; SECRET_LEN]>,
}

impl ShareAccess {
    /// Plain NFSv3, as to any NFS server.
    pub fn open() -> ShareAccess {
        ShareAccess {
            tls: None,
            secret: None,
        }
    }

    /// The access a `ShareOffer` gives, over the same security as the
    /// migration channel to `destination`.
    pub fn for_offer(
        offer: &crate::migration::protocol::ShareOffer,
        security: &crate::migration::transport::Security,
        destination: &str,
    ) -> Result<ShareAccess, crate::migration::storage::StorageError> {
        use crate::migration::storage::StorageError;
        let secret = offer
            .secret
            .as_deref()
            .and_then(parse_secret)
            .ok_or(StorageError::NoShareSecret)?;
        let tls = match security {
            crate::migration::transport::Security::Tls(id) => Some((
                id.client_config(),
                crate::migration::transport::server_name(destination).map_err(|e| {
                    StorageError::Unreachable(ShareError::Connect {
                        share: destination.to_string(),
                        why: e.to_string(),
                    })
                })?,
            )),
            crate::migration::transport::Security::Insecure => None,
        };
        Ok(ShareAccess {
            tls,
            secret: Some(secret),
        })
    }
}

/// What the share server demands of each connection: TLS with a client
/// certificate from the CA (the very one of the migration channel, when
/// given), then the secret, before a byte reaches the NFS code.
#[derive(Clone)]
pub struct ShareGuard {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub peer_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    /// `None` serves plain NFS to any client (tests of NFS interoperability
    /// only: a migration always sets one).
    pub secret: Option<[u8; SECRET_LEN]>,
}

impl ShareGuard {
    /// No TLS, no secret: plain NFSv3, as any NFS client speaks it.
    pub fn open() -> ShareGuard {
        ShareGuard {
            tls: None,
            peer_cert: None,
            secret: None,
        }
    }
}

/// 64 lowercase hex digits.
pub fn secret_hex(secret: &[u8; SECRET_LEN]) -> String {
    secret.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_secret(hex: &str) -> Option<[u8; SECRET_LEN]> {
    if hex.len() != SECRET_LEN * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; SECRET_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Longest file name a share accepts (NAME_MAX on Linux).
pub const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// ENOSPC / EDQUOT locally, NFS3ERR_NOSPC / NFS3ERR_DQUOT over NFS.
    #[error("destination disk full while {what}")]
    NoSpace { what: String },
    #[error("invalid share file name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The server answered with an NFS error status.
    #[error("{what}: the NFS server answered {status}")]
    Nfs { what: String, status: String },
    /// Could not reach the server, or the connection to it broke.
    #[error("share {share}: {why}")]
    Connect { share: String, why: String },
    /// The server did not answer in time.
    #[error("share {share}: no answer to {op} within {secs} s")]
    Timeout {
        share: String,
        op: &'static str,
        secs: u64,
    },
    /// The server answered something that makes no sense for the request.
    #[error("share {share}: {why}")]
    Protocol { share: String, why: String },
}

impl ShareError {
    pub fn is_no_space(&self) -> bool {
        matches!(self, ShareError::NoSpace { .. })
    }

    /// Wraps an I/O error, turning "no space" / "quota" into
    /// [`ShareError::NoSpace`].
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ShareError::NoSpace { what },
            _ => ShareError::Io { what, source },
        }
    }
}

/// A place the VM's files are copied into.
pub trait Share: Send + Sync {
    /// Creates the regular file `name`, or truncates it if it exists, and
    /// sizes it `size` bytes without writing them (sparse).
    fn create(&self, name: &str, size: u64) -> Result<Arc<dyn ShareFile>, ShareError>;
    /// Removes the file `name`; a file that does not exist is not an error.
    fn remove(&self, name: &str) -> Result<(), ShareError>;
    /// Regular files in the share: (name, size in bytes), sorted by name.
    fn list(&self) -> Result<Vec<(String, u64)>, ShareError>;
    /// Where the share is, for messages.
    fn describe(&self) -> String;
}

/// A file in a [`Share`]. Every method may be called from several threads
/// at once.
pub trait ShareFile: Send + Sync {
    /// Writes all of `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ShareError>;
    /// As `write_at`, for a write the guest waits for (a mirrored guest
    /// write): kept apart from the bulk copy's traffic where the share can.
    fn write_mirrored(&self, offset: u64, data: &[u8]) -> Result<(), ShareError> {
        self.write_at(offset, data)
    }
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at end of file.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ShareError>;
    /// Makes everything written so far durable on the destination.
    fn sync(&self) -> Result<(), ShareError>;
}

/// Checks a share file name: one path component, no NUL.
pub fn check_name(name: &str) -> Result<(), ShareError> {
    let why = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "not a file name"
    } else if name.contains('/') {
        "contains a slash"
    } else if name.contains('\0') {
        "contains a NUL byte"
    } else if name.len() > MAX_NAME_LEN {
        "longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(ShareError::InvalidName {
        name: name.to_string(),
        why,
    })
}

/// Refuses ranges that end past the largest file offset.
pub(crate) fn check_range(
    what: impl FnOnce() -> String,
    offset: u64,
    len: usize,
) -> Result<(), ShareError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(ShareError::Io {
            what: what(),
            source: io::Error::from_raw_os_error(libc::EFBIG),
        }),
    }
}

/// A directory that is already mounted (kernel NFS, SMB, a local disk):
/// plain files with pwrite / pread / fsync.
#[derive(Debug)]
pub struct MountedShare {
    dir: PathBuf,
}

impl MountedShare {
    pub fn new(dir: &Path) -> Result<Self, ShareError> {
        let meta = std::fs::metadata(dir)
            .map_err(|e| ShareError::io(format!("share directory {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(ShareError::Io {
                what: format!("share directory {}", dir.display()),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(MountedShare {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, name: &str) -> Result<PathBuf, ShareError> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }
}

impl Share for MountedShare {
    fn create(&self, name: &str, size: u64) -> Result<Arc<dyn ShareFile>, ShareError> {
        let path = self.path(name)?;
        let what = || format!("creating {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            // Guest data: the owner's only, as the NFS share's copies are.
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ShareError::io(what(), e))?;
        file.set_len(size).map_err(|e| ShareError::io(what(), e))?;
        // Opened now, on the thread that creates the file: the first sync
        // may come from a drive's request thread (a mirrored flush), whose
        // seccomp list opens nothing.
        let dir = File::open(&self.dir)
            .map_err(|e| ShareError::io(format!("opening {}", self.dir.display()), e))?;
        Ok(Arc::new(MountedFile {
            file,
            path,
            dir: self.dir.clone(),
            dir_file: dir,
            dir_synced: AtomicBool::new(false),
        }))
    }

    fn remove(&self, name: &str) -> Result<(), ShareError> {
        let path = self.path(name)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(|e| ShareError::io(format!("removing {}", path.display()), e)),
        }
    }

    fn list(&self) -> Result<Vec<(String, u64)>, ShareError> {
        let what = || format!("listing {}", self.dir.display());
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| ShareError::io(what(), e))? {
            let entry = entry.map_err(|e| ShareError::io(what(), e))?;
            // Not following symlinks: a share holds regular files only.
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Removed while we listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ShareError::io(what(), e)),
            };
            if meta.is_file() {
                files.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
            }
        }
        files.sort();
        Ok(files)
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

struct MountedFile {
    file: File,
    path: PathBuf,
    dir: PathBuf,
    dir_file: File,
    /// The directory entry is made durable once, on the first sync.
    dir_synced: AtomicBool,
}

impl ShareFile for MountedFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ShareError> {
        let what = || {
            format!(
                "writing {} bytes at {offset} to {}",
                data.len(),
                self.path.display()
            )
        };
        check_range(what, offset, data.len())?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| ShareError::io(what(), e))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ShareError> {
        let what = || format!("reading at {offset} from {}", self.path.display());
        check_range(what, offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ShareError::io(what(), e)),
            }
        }
        Ok(done)
    }

    fn sync(&self) -> Result<(), ShareError> {
        self.file
            .sync_all()
            .map_err(|e| ShareError::io(format!("syncing {}", self.path.display()), e))?;
        if !self.dir_synced.load(Ordering::Acquire) {
            match self.dir_file.sync_all() {
                // Some network and FUSE file systems cannot fsync a
                // directory; their entries are durable on their own terms.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {}
                r => r.map_err(|e| ShareError::io(format!("syncing {}", self.dir.display()), e))?,
            }
            self.dir_synced.store(true, Ordering::Release);
        }
        Ok(())
    }
}
