//! `--uid N --gid N`: a process started as root becomes that user once it
//! has opened what needs root (/dev/kvm, images, sockets, the share
//! directory, TLS files), keeping no supplementary groups and no
//! capabilities. With `--chroot DIR` (`ferry run`) it also changes its root
//! to DIR first, so that after set-up every path it is given (a snapshot
//! directory, a TLS directory) names a file inside DIR.

use std::path::{Path, PathBuf};

use super::SecurityError;

/// The unprivileged user and group to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// The new root (`--chroot`), canonical, never `/`.
    pub root: Option<&'static Path>,
}

impl Jail {
    /// Checks, before anything is opened, that the drop can happen and
    /// means something: ferry runs as root, and neither id is root's.
    pub fn check(uid: u32, gid: u32) -> Result<Jail, SecurityError> {
        if uid == 0 || gid == 0 {
            return Err(SecurityError::Jail(format!(
                "{} 0 is root's: give an unprivileged id to run as (e.g. 65534)",
                if uid == 0 { "--uid" } else { "--gid" }
            )));
        }
        // SAFETY: geteuid only reads the process's credentials.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(SecurityError::Jail(format!(
                "dropping to uid {uid} needs ferry started as root (it runs as uid {euid})"
            )));
        }
        Ok(Jail {
            uid,
            gid,
            root: None,
        })
    }

    /// Adds `--chroot DIR`: an existing directory other than `/`, taken
    /// canonical (symlinks resolved now, as root, not later).
    pub fn with_root(mut self, dir: &Path) -> Result<Jail, SecurityError> {
        let bad = |why: String| SecurityError::Jail(format!("--chroot {}: {why}", dir.display()));
        let root = std::fs::canonicalize(dir).map_err(|e| bad(crate::util::io_msg(&e)))?;
        if !root.is_dir() {
            return Err(bad("not a directory".into()));
        }
        if root == Path::new("/") {
            return Err(bad("is the host's root: that confines nothing".into()));
        }
        self.root = Some(Box::leak(root.into_boxed_path()));
        Ok(self)
    }

    /// The path inside the jail of a host path under its root (None when
    /// `path` lies outside it).
    pub fn inside(&self, path: &Path) -> Option<PathBuf> {
        let root = self.root?;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().ok()?.join(path)
        };
        // The parent canonical (the file itself may not exist yet).
        let parent = std::fs::canonicalize(abs.parent()?).ok()?;
        let rel = parent.strip_prefix(root).ok()?;
        Some(Path::new("/").join(rel).join(abs.file_name()?))
    }

    /// Becomes `uid`/`gid` on every thread (glibc's set*id apply to all
    /// threads), with no supplementary groups, then checks that no
    /// capability is left. `owned` (ferry's own sockets) are given to the
    /// user first, so that it can remove them at exit.
    pub fn enter(&self, owned: &[std::path::PathBuf]) -> Result<(), SecurityError> {
        for path in owned {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).map_err(|e| {
                SecurityError::Jail(format!("chown {} to {}: {e}", path.display(), self.uid))
            })?;
        }
        let fail = |what: &str| {
            SecurityError::Jail(format!("{what}: {}", std::io::Error::last_os_error()))
        };
        if let Some(root) = self.root {
            let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).map_err(|_| {
                SecurityError::Jail(format!("--chroot {}: NUL in path", root.display()))
            })?;
            // SAFETY: chroot and chdir with NUL-terminated paths. The chdir
            // follows at once: a cwd left outside the new root would be a
            // way out of it.
            unsafe {
                if libc::chroot(c.as_ptr()) != 0 {
                    return Err(fail(&format!("chroot({})", root.display())));
                }
                if libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(fail("chdir(/) in the new root"));
                }
            }
        }
        // SAFETY: plain credential syscalls on this process.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(fail("setgroups([])"));
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err(fail(&format!("setgid({})", self.gid)));
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err(fail(&format!("setuid({})", self.uid)));
            }
        }
        let left = capabilities_left()?;
        if left != 0 {
            return Err(SecurityError::Jail(format!(
                "capabilities {left:#x} still held after becoming uid {}",
                self.uid
            )));
        }
        Ok(())
    }
}

/// The permitted and effective capability sets, or'ed, by `capget` (no
/// /proc inside a chroot).
fn capabilities_left() -> Result<u64, SecurityError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget fills the two 32-bit halves of version 3's sets; both
    // structs live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(SecurityError::Jail(format!(
            "capget: {}",
            std::io::Error::last_os_error()
        )));
    }
    let set = |f: fn(&Data) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok(set(|d| d.effective) | set(|d| d.permitted))
}

/// Refuses, once the process is that user, a directory it will have to
/// create files in later but cannot (`flag` names the option).
pub fn check_writable(flag: &str, dir: &Path) -> Result<(), SecurityError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| SecurityError::Jail(format!("{flag} {}: has a NUL byte", dir.display())))?;
    // SAFETY: `path` is a valid C string; access only checks permissions
    // (with the real ids, which the drop has set).
    if unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        // SAFETY: getuid only reads the process's credentials.
        let uid = unsafe { libc::getuid() };
        return Err(SecurityError::Jail(format!(
            "{flag} {}: not writable by uid {uid}, which ferry runs as after the drop ({}); \
             chown it to that user or pick another directory",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}
