//! `--uid N --gid N`: a process started as root becomes that user once it
//! has opened what needs root (/dev/kvm, images, sockets, the share
//! directory, TLS files), keeping no supplementary groups and no
//! capabilities.

use std::path::Path;

use super::SecurityError;

/// The unprivileged user and group to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
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
        Ok(Jail { uid, gid })
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

/// The permitted and effective capability sets, or'ed.
fn capabilities_left() -> Result<u64, SecurityError> {
    let status = std::fs::read_to_string("/proc/thread-self/status")
        .map_err(|e| SecurityError::Jail(format!("reading /proc/thread-self/status: {e}")))?;
    let mut left = 0;
    for line in status.lines() {
        if let Some(hex) = line
            .strip_prefix("CapEff:")
            .or_else(|| line.strip_prefix("CapPrm:"))
        {
            left |= u64::from_str_radix(hex.trim(), 16)
                .map_err(|e| SecurityError::Jail(format!("{line:?}: {e}")))?;
        }
    }
    Ok(left)
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
