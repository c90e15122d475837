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

#[cfg(test)]
mod tests {
    use super::*;

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
