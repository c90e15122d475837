//! Small helpers every module uses: one of each, not a copy per file.

use std::io;
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, going on with the data when a thread panicked while holding
/// it: every structure guarded here stays consistent between statements, and
/// a VMM that stops serving its guest because one thread panicked would lose
/// more than it protects.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An io::Error's text without the "(os error N)" suffix std adds.
pub fn io_msg(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_string(),
        _ => text,
    }
}

/// Why a bounded read of a file was refused.
#[derive(Debug)]
pub enum BoundedReadError {
    /// Not a regular file: what it is instead ("a FIFO", "a character
    /// device", ...).
    NotAFile(&'static str),
    /// Larger than the bound (`len` is at least `max + 1`).
    TooLarge {
        len: u64,
        max: u64,
    },
    Io(io::Error),
}

fn file_kind(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Reads a regular file of at most `max` bytes. What is not a regular file
/// (a FIFO, /dev/zero, through a symlink or not) or is larger is refused by
/// its metadata, before a byte is read; a file that grows meanwhile is cut
/// off at `max + 1` bytes and refused too.
pub fn read_bounded(path: &std::path::Path, max: u64) -> Result<Vec<u8>, BoundedReadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let check = |m: &std::fs::Metadata| {
        if !m.is_file() {
            Err(BoundedReadError::NotAFile(file_kind(m.file_type())))
        } else if m.len() > max {
            Err(BoundedReadError::TooLarge { len: m.len(), max })
        } else {
            Ok(())
        }
    };
    check(&std::fs::metadata(path).map_err(BoundedReadError::Io)?)?;
    // O_NONBLOCK: a FIFO swapped in after the check must not hang the open.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(BoundedReadError::Io)?;
    let meta = file.metadata().map_err(BoundedReadError::Io)?;
    check(&meta)?;
    let mut out = Vec::with_capacity(meta.len() as usize);
    file.take(max + 1)
        .read_to_end(&mut out)
        .map_err(BoundedReadError::Io)?;
    if out.len() as u64 > max {
        return Err(BoundedReadError::TooLarge {
            len: out.len() as u64,
            max,
        });
    }
    Ok(out)
}

/// MemTotal from /proc/meminfo, in MiB.
pub fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_total_mib(&text)
}

pub(crate) fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(kib / 1024),
        Some(_) => None,
    }
}

/// `N` random bytes from the kernel's generator (getrandom(2)).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| io::Error::other(format!("no random bytes: {e}")))?;
    Ok(b)
}

/// A random id of `N` bytes as lower-case hex (2N characters).
pub fn random_hex<const N: usize>() -> io::Result<String> {
    Ok(random_bytes::<N>()?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

/// Whether unit tests may create tap devices here (root with /dev/net/tun);
/// says so when they may not, and fails in CI, where they must.
#[cfg(test)]
pub(crate) fn tests_can_create_taps() -> bool {
    // SAFETY: geteuid() takes nothing and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let ok = root && std::path::Path::new("/dev/net/tun").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the tap tests (root and /dev/net/tun)"
        );
        eprintln!("SKIPPED: creating taps needs root and /dev/net/tun");
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_reads_refuse_devices_fifos_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, b"12345").unwrap();
        assert_eq!(read_bounded(&small, 5).unwrap(), b"12345");
        assert!(matches!(
            read_bounded(&small, 4),
            Err(BoundedReadError::TooLarge { len: 5, max: 4 })
        ));
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(matches!(
            read_bounded(&zero, 1 << 20),
            Err(BoundedReadError::NotAFile("a character device"))
        ));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_bounded(&fifo, 1 << 20),
            Err(BoundedReadError::NotAFile("a FIFO"))
        ));
        assert!(matches!(
            read_bounded(dir.path(), 1 << 20),
            Err(BoundedReadError::NotAFile("a directory"))
        ));
    }

    #[test]
    fn io_msg_drops_the_os_error_suffix() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(io_msg(&e), "No such file or directory");
        assert_eq!(io_msg(&io::Error::other("plain")), "plain");
    }

    #[test]
    fn random_ids_differ_and_are_hex() {
        let a = random_hex::<16>().unwrap();
        let b = random_hex::<16>().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn a_poisoned_lock_still_yields_its_data() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert_eq!(*lock(&m), 7);
    }

    #[test]
    fn mem_total_parses() {
        assert_eq!(parse_mem_total_mib("MemTotal:  2048000 kB\n"), Some(2000));
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
    }
}
