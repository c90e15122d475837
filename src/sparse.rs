//! Sparse data: where a file holds data (`SEEK_DATA`/`SEEK_HOLE`), and
//! whether a buffer is all zero. Snapshots, memory migration and the
//! storage copy all skip what is not there.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The data extents `(start, end)` of `f` within `[start, end)`. A file
/// system without `SEEK_DATA` reports the whole range as data.
pub fn data_extents(f: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data past `pos`.
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) if out.is_empty() => {
                    Ok(vec![(start, end)])
                }
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data, hole));
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    // SAFETY: any initialized bytes are valid u64s; align_to keeps the
    // unaligned ends as bytes.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn extents_and_zeros() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 12 << 20).unwrap();
        let ext = data_extents(&f, 0, 16 << 20).unwrap();
        let covered = |x: u64| ext.iter().any(|&(a, b)| a <= x && x < b);
        assert!(covered(4 << 20) && covered(12 << 20), "{ext:x?}");
        assert!(!covered(8 << 20), "{ext:x?}");
        let ext = data_extents(&f, 5 << 20, 16 << 20).unwrap();
        assert!(!ext.iter().any(|&(a, _)| a < 5 << 20));
        assert!(is_zero(&[0u8; 4097]));
        let mut b = [0u8; 4097];
        b[4096] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
