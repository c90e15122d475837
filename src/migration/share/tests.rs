use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const EXPORT: &str = "/ferry-0123abcd";
const MIB: usize = 1 << 20;

fn serve(dir: &Path) -> (NfsShareServer, NfsShare) {
    let server =
        NfsShareServer::start(dir, LOCALHOST, EXPORT, Some(LOCALHOST), ShareGuard::open()).unwrap();
    let share = NfsShare::connect(
        SocketAddr::new(LOCALHOST, server.port()),
        EXPORT,
        ShareAccess::open(),
    )
    .unwrap();
    (server, share)
}

/// Bytes that differ at every offset, so a misplaced write shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    let n = std::fs::File::open(path)
        .unwrap()
        .read_at(&mut buf, offset)
        .unwrap();
    buf.truncate(n);
    buf
}

/// Writes, reads back and checks `share` the same way for both kinds.
fn exercise(share: &dyn Share, dir: &Path) {
    const SIZE: u64 = 256 * MIB as u64;
    let file = share.create("disk.img", SIZE).unwrap();
    // Odd offsets and lengths; one write spans several server chunks.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (1, pattern(1, 4094)),
        (4095, pattern(2, 3)),
        (MIB as u64 + 3, pattern(3, 3 * MIB + 7)),
        (100 * MIB as u64 - 1, pattern(4, 513)),
        (SIZE - 5, pattern(5, 5)),
    ];
    for (offset, data) in &writes {
        file.write_at(*offset, data).unwrap();
    }
    file.sync().unwrap();

    let path = dir.join("disk.img");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), SIZE);
    // 3 MiB and a few pages written: the holes stay holes.
    assert!(
        meta.blocks() * 512 < 8 * MIB as u64,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    for (offset, data) in &writes {
        assert_eq!(
            &read_file_at(&path, *offset, data.len()),
            data,
            "at {offset}"
        );
        let mut back = vec![0u8; data.len()];
        assert_eq!(file.read_at(*offset, &mut back).unwrap(), data.len());
        assert_eq!(&back, data, "read back at {offset}");
    }
    // Never written: zeros.
    assert_eq!(read_file_at(&path, 0, 1), [0]);
    assert!(read_file_at(&path, 200 * MIB as u64, 4096)
        .iter()
        .all(|&b| b == 0));
    let mut hole = vec![0xffu8; 3 * MIB];
    assert_eq!(
        file.read_at(150 * MIB as u64, &mut hole).unwrap(),
        hole.len()
    );
    assert!(hole.iter().all(|&b| b == 0));
    // Short read at the end of the file.
    let mut tail = [0u8; 16];
    assert_eq!(file.read_at(SIZE - 5, &mut tail).unwrap(), 5);
    assert_eq!(&tail[..5], &writes[4].1[..]);
    assert_eq!(file.read_at(SIZE + 10, &mut tail).unwrap(), 0);

    share
        .create("kernel", 0)
        .unwrap()
        .write_at(0, b"k")
        .unwrap();
    assert_eq!(
        share.list().unwrap(),
        vec![("disk.img".to_string(), SIZE), ("kernel".to_string(), 1)]
    );

    // Create again truncates: old contents gone.
    let again = share.create("disk.img", 4096).unwrap();
    let mut page = vec![0xffu8; 4096];
    assert_eq!(again.read_at(0, &mut page).unwrap(), 4096);
    assert!(page.iter().all(|&b| b == 0));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);

    share.remove("disk.img").unwrap();
    share.remove("disk.img").unwrap(); // already gone: fine
    assert!(!path.exists());
    assert_eq!(share.list().unwrap(), vec![("kernel".to_string(), 1)]);

    let file = share.create("kernel", 1).unwrap();
    assert!(file.write_at(u64::MAX - 1, &[1, 2, 3]).is_err());
    assert!(file.read_at(u64::MAX - 1, &mut [0; 3]).is_err());
    file.write_at(0, b"k").unwrap();

    for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(256)] {
        assert!(
            matches!(share.create(bad, 1), Err(ShareError::InvalidName { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn nfs_share_writes_reads_lists_removes() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, share) = serve(dir.path());
    assert!(share.describe().starts_with("nfs://127.0.0.1:"));
    assert!(share.describe().ends_with(EXPORT));
    assert_eq!(share.write_size(), server::MAX_IO);
    exercise(&share, dir.path());
}

#[test]
fn removed_file_handles_go_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, share) = serve(dir.path());
    let file = share.create("disk.img", 4096).unwrap();
    share.remove("disk.img").unwrap();
    let err = file.write_at(0, b"late").unwrap_err();
    assert!(err.to_string().contains("NFS3ERR_STALE"), "{err}");
    // A new file of the same name is another file.
    let again = share.create("disk.img", 4096).unwrap();
    assert!(file.write_at(0, b"late").is_err());
    again.write_at(0, b"new").unwrap();
}

/// Only regular files directly in the directory are served: symlinks and
/// subdirectories are invisible, and no name leads out of the directory.
#[test]
fn nothing_outside_the_directory_is_reachable() {
    use nfs3_client::nfs3_types::nfs3::{
        createhow3, diropargs3, filename3, sattr3, CREATE3args, LOOKUP3args, Nfs3Result,
    };
    use nfs3_client::tokio::TokioConnector;
    use nfs3_client::Nfs3ConnectionBuilder;

    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("share");
    std::fs::create_dir(&dir).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("link")).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub").join("inner"), b"inner").unwrap();

    let (server, share) = serve(&dir);
    assert_eq!(share.list().unwrap(), vec![]);
    assert!(share.create("link", 10).is_err());
    assert!(share.create("sub", 10).is_err());
    share.remove("link").unwrap(); // not served, so "not there"
    assert!(dir.join("link").exists());
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");

    // A client that does not check names.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", EXPORT)
            .mount_port(server.port())
            .nfs3_port(server.port())
            .connect_from_privileged_port(false)
            .mount()
            .await
            .unwrap();
        let root = conn.root_nfs_fh3();
        for name in [
            &b"../share"[..],
            b"sub/inner",
            b"link",
            b"sub",
            b"a\0b",
            b"",
        ] {
            let lookup = LOOKUP3args {
                what: diropargs3 {
                    dir: root.clone(),
                    name: filename3::from(name),
                },
            };
            assert!(
                matches!(conn.lookup(&lookup).await.unwrap(), Nfs3Result::Err(_)),
                "{name:?}"
            );
        }
        // ".." of the root is the root.
        let up = LOOKUP3args {
            what: diropargs3 {
                dir: root.clone(),
                name: filename3::from(&b".."[..]),
            },
        };
        match conn.lookup(&up).await.unwrap() {
            Nfs3Result::Ok(ok) => assert_eq!(ok.object, root),
            Nfs3Result::Err((e, _)) => panic!("{e}"),
        }
        for name in [&b"../escape"[..], b"sub/escape"] {
            let create = CREATE3args {
                where_: diropargs3 {
                    dir: root.clone(),
                    name: filename3::from(name),
                },
                how: createhow3::UNCHECKED(sattr3::default()),
            };
            assert!(
                matches!(conn.create(&create).await.unwrap(), Nfs3Result::Err(_)),
                "{name:?}"
            );
        }
    });
    assert!(!base.path().join("escape").exists());
    assert!(!dir.join("sub").join("escape").exists());
}

#[test]
fn mounted_share_writes_reads_lists_removes() {
    let dir = tempfile::tempdir().unwrap();
    let share = MountedShare::new(dir.path()).unwrap();
    assert_eq!(share.describe(), dir.path().display().to_string());
    exercise(&share, dir.path());
    assert!(MountedShare::new(&dir.path().join("kernel")).is_err());
    assert!(MountedShare::new(&dir.path().join("missing")).is_err());
}

#[test]
fn concurrent_writers_on_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, share) = serve(dir.path());
    const BLOCK: usize = 64 * 1024 + 512;
    const BLOCKS: usize = 256;
    let file = share.create("disk.img", (BLOCK * BLOCKS) as u64).unwrap();
    // One thread takes the even blocks (like the bulk copy), the other the
    // odd ones at sector granularity (like mirrored guest writes).
    let writers: Vec<_> = (0..2)
        .map(|parity| {
            let file = Arc::clone(&file);
            std::thread::spawn(move || {
                for block in (parity..BLOCKS).step_by(2) {
                    let data = pattern(block as u64, BLOCK);
                    let base = (block * BLOCK) as u64;
                    if parity == 0 {
                        file.write_at(base, &data).unwrap();
                    } else {
                        for (i, sector) in data.chunks(512).enumerate() {
                            file.write_at(base + (i * 512) as u64, sector).unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    file.sync().unwrap();
    let on_disk = std::fs::read(dir.path().join("disk.img")).unwrap();
    assert_eq!(on_disk.len(), BLOCK * BLOCKS);
    for (block, data) in on_disk.chunks(BLOCK).enumerate() {
        assert_eq!(data, pattern(block as u64, BLOCK), "block {block}");
    }
}

#[test]
fn other_peers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere: IpAddr = "10.255.255.1".parse().unwrap();
    let server = NfsShareServer::start(
        dir.path(),
        LOCALHOST,
        EXPORT,
        Some(elsewhere),
        ShareGuard::open(),
    )
    .unwrap();
    let started = Instant::now();
    let err = NfsShare::connect(
        SocketAddr::new(LOCALHOST, server.port()),
        EXPORT,
        ShareAccess::open(),
    )
    .err()
    .expect("a connection from 127.0.0.1 must be refused");
    assert!(matches!(err, ShareError::Connect { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[test]
fn unknown_export_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        NfsShareServer::start(dir.path(), LOCALHOST, EXPORT, None, ShareGuard::open()).unwrap();
    let addr = SocketAddr::new(LOCALHOST, server.port());
    for wrong in [
        "/",
        "/ferry-0123abc",
        "/ferry-0123abcd-x",
        "/ferry-0123abcd/disk.img",
    ] {
        let err = NfsShare::connect(addr, wrong, ShareAccess::open())
            .err()
            .expect(wrong);
        assert!(
            err.to_string().contains("does not export"),
            "{wrong}: {err}"
        );
    }
}

#[test]
fn bad_export_paths_and_dirs_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["", "ferry", "/a/", "/a//b", "/a/../b", "/a b", "/a\0"] {
        assert!(
            NfsShareServer::start(dir.path(), LOCALHOST, bad, None, ShareGuard::open()).is_err(),
            "{bad:?}"
        );
    }
    let missing = dir.path().join("missing");
    assert!(NfsShareServer::start(&missing, LOCALHOST, EXPORT, None, ShareGuard::open()).is_err());
}

#[test]
fn stopping_the_server_fails_the_client_quickly() {
    let dir = tempfile::tempdir().unwrap();
    let (server, share) = serve(dir.path());
    let port = server.port();
    let file = share.create("disk.img", MIB as u64).unwrap();
    file.write_at(0, &[1; 4096]).unwrap();
    drop(server);

    let started = Instant::now();
    let err = file.write_at(0, &[2; 4096]).unwrap_err();
    assert!(matches!(err, ShareError::Connect { .. }), "{err}");
    assert!(file.sync().is_err());
    assert!(share.list().is_err());
    assert!(NfsShare::connect(
        SocketAddr::new(LOCALHOST, port),
        EXPORT,
        ShareAccess::open()
    )
    .is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn silent_server_times_out() {
    // Connections are accepted by the kernel (backlog) but nobody answers.
    let silent = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
    let addr = silent.local_addr().unwrap();
    let started = Instant::now();
    let err = NfsShare::connect(addr, EXPORT, ShareAccess::open())
        .err()
        .expect("nobody answers");
    assert!(matches!(err, ShareError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < client::CONNECT_TIMEOUT + Duration::from_secs(5));
}

#[test]
fn unreachable_server_fails() {
    // 192.0.2.0/24 is TEST-NET-1: nothing answers there. Where the host has
    // no route at all, connect fails at once, which is just as good.
    let started = Instant::now();
    let addr: SocketAddr = "192.0.2.1:2049".parse().unwrap();
    assert!(NfsShare::connect(addr, EXPORT, ShareAccess::open()).is_err());
    assert!(started.elapsed() < client::CONNECT_TIMEOUT + Duration::from_secs(5));
}

#[test]
fn disk_full_is_its_own_error() {
    let err = ShareError::io("writing", std::io::Error::from_raw_os_error(libc::ENOSPC));
    assert!(err.is_no_space());
    assert_eq!(err.to_string(), "destination disk full while writing");
    let err = ShareError::io("writing", std::io::Error::from_raw_os_error(libc::EIO));
    assert!(!err.is_no_space());
    // The server reports ENOSPC as NFS3ERR_NOSPC, which the client turns
    // back into NoSpace.
    assert_eq!(
        server::io_status(&std::io::Error::from_raw_os_error(libc::ENOSPC)),
        nfs3_server::nfs3_types::nfs3::nfsstat3::NFS3ERR_NOSPC
    );
    assert!(client::status_error(
        "nfs://x",
        "writing".into(),
        nfs3_client::nfs3_types::nfs3::nfsstat3::NFS3ERR_NOSPC
    )
    .is_no_space());
}

/// Debian's libnfs-utils as an independent client: list, read, and write.
#[test]
fn libnfs_utils_can_list_read_and_write() {
    if Command::new("nfs-ls").arg("--help").output().is_err() {
        // CI installs it (.ci/run): there, a missing client is a failure.
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI is set but nfs-ls is not installed (apt-get install libnfs-utils)"
        );
        println!("skipped: nfs-ls not installed (apt-get install libnfs-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, share) = serve(dir.path());
    let content = pattern(7, 3 * MIB + 11);
    share
        .create("disk.img", content.len() as u64)
        .unwrap()
        .write_at(0, &content)
        .unwrap();
    let port = server.port();
    let url = |path: &str| {
        format!("nfs://127.0.0.1{EXPORT}{path}?version=3&nfsport={port}&mountport={port}")
    };
    let run = |tool: &str, args: &[&str]| {
        let out = Command::new(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };

    for listing in [url(""), url("/")] {
        let listed = String::from_utf8(run("nfs-ls", &[&listing])).unwrap();
        assert!(listed.contains("disk.img"), "{listing}: {listed}");
        assert!(listed.contains(&content.len().to_string()), "{listed}");
    }
    assert_eq!(run("nfs-cat", &[&url("/disk.img")]), content);
    assert_eq!(run("nfs-cat", &[&url("//disk.img")]), content);

    let local = dir.path().join("..").join(format!(
        "{}-upload",
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    let upload = pattern(8, 2 * MIB + 1);
    std::fs::write(&local, &upload).unwrap();
    run("nfs-cp", &[local.to_str().unwrap(), &url("/up.img")]);
    std::fs::remove_file(&local).unwrap();
    assert_eq!(std::fs::read(dir.path().join("up.img")).unwrap(), upload);
    assert!(share
        .list()
        .unwrap()
        .contains(&("up.img".to_string(), upload.len() as u64)));
}

/// A migration's share: only the announced names, each up to its size,
/// owner-only; nothing else is visible.
#[test]
fn a_migration_share_takes_only_the_announced_files_up_to_their_sizes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), b"not for the peer").unwrap();
    let server = NfsShareServer::start_for(
        dir.path(),
        LOCALHOST,
        EXPORT,
        Some(LOCALHOST),
        ShareGuard::open(),
        vec![("disk.img".into(), 2 * MIB as u64), ("vm.json".into(), 100)],
    )
    .unwrap();
    let share = NfsShare::connect(
        SocketAddr::new(LOCALHOST, server.port()),
        EXPORT,
        ShareAccess::open(),
    )
    .unwrap();

    // An unannounced name can be neither created nor seen.
    let err = share
        .create("evil.img", 4096)
        .err()
        .expect("created evil.img");
    assert!(err.to_string().contains("NFS3ERR_ACCES"), "{err}");
    assert!(!dir.path().join("evil.img").exists());
    assert!(share.remove("secret").is_err());
    assert!(dir.path().join("secret").exists());
    assert!(!share.list().unwrap().iter().any(|(n, _)| n == "secret"));

    // An announced one up to its size, not past it.
    let err = share
        .create("disk.img", 2 * MIB as u64 + 1)
        .err()
        .expect("sized past the announcement");
    assert!(err.to_string().contains("NFS3ERR_FBIG"), "{err}");
    let file = share.create("disk.img", 2 * MIB as u64).unwrap();
    file.write_at(2 * MIB as u64 - 4096, &pattern(9, 4096))
        .unwrap();
    let err = file
        .write_at(2 * MIB as u64 - 10, &pattern(10, 11))
        .expect_err("wrote past the announced size");
    assert!(err.to_string().contains("NFS3ERR_FBIG"), "{err}");
    file.sync().unwrap();
    let meta = std::fs::metadata(dir.path().join("disk.img")).unwrap();
    assert_eq!(meta.len(), 2 * MIB as u64);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        share.list().unwrap(),
        vec![("disk.img".to_string(), 2 * MIB as u64)]
    );
}

/// A share server open to any peer (no TLS, no secret), for raw RPC.
fn open_server(dir: &Path) -> NfsShareServer {
    NfsShareServer::start_for(dir, LOCALHOST, EXPORT, None, ShareGuard::open(), vec![]).unwrap()
}

/// A plain TCP connection to `server`, reads timing out after 10 s.
fn raw_connection(server: &NfsShareServer) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect((LOCALHOST, server.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One RPC record: a call to NFS 3 procedure `proc` with AUTH_NULL
/// credentials and `args`.
fn nfs_call(xid: u32, proc: u32, args: &[u8]) -> Vec<u8> {
    let mut body: Vec<u8> = [xid, 0, 2, 100_003, 3, proc, 0, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .collect();
    body.extend_from_slice(args);
    let mut record = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    record.extend(body);
    record
}

/// Reads one single-fragment RPC record; returns its body.
fn read_record(s: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    let mut mark = [0u8; 4];
    s.read_exact(&mut mark).expect("a reply never came");
    let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
    s.read_exact(&mut body).unwrap();
    body
}

/// A record marker that claims more than the limit ends the connection
/// before the server reads (or allocates for) the record.
#[test]
fn oversized_rpc_records_end_the_connection() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = open_server(dir.path());
    for claim in [
        // One fragment of 1 GiB, last.
        vec![0xc0u8, 0, 0, 0],
        // A 3 MiB fragment that is not the last, then the header of
        // another: the record grows past the limit.
        [
            &[0x00u8, 0x30, 0, 0][..],
            &vec![0u8; 3 << 20],
            &[0x00, 0x30, 0, 0],
        ]
        .concat(),
    ] {
        let mut s = std::net::TcpStream::connect((LOCALHOST, server.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&claim);
        let mut buf = [0u8; 64];
        let started = Instant::now();
        // Closed (EOF or reset), and well before the read timeout: without
        // the limit the server would sit waiting for the rest.
        match s.read(&mut buf) {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("the server answered {n} bytes to an oversized record"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Normal traffic still works on a new connection.
    let share = NfsShare::connect(
        SocketAddr::new(LOCALHOST, server.port()),
        EXPORT,
        ShareAccess::open(),
    )
    .unwrap();
    assert!(share.list().unwrap().is_empty());
}

/// WRITE's arguments are read in place from the received record (the
/// vendored nfs3_server's copy-free path): a length that overruns the
/// record, bytes after the data, or a count that disagrees with the data
/// are refused, nothing is written, and the connection goes on serving.
#[test]
fn malformed_write_arguments_are_refused_in_place() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = open_server(dir.path());
    let mut s = raw_connection(&server);
    let be32 = |v: u32| v.to_be_bytes().to_vec();
    // The reply's accept_stat and, when SUCCESS, the NFS status after it.
    let mut r = s.try_clone().unwrap();
    let mut reply = |xid: u32| -> (u32, Option<u32>) {
        let body = read_record(&mut r);
        let len = body.len();
        let word = |i: usize| u32::from_be_bytes(body[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(word(0), xid, "a reply to another call");
        assert_eq!((word(1), word(2)), (1, 0), "not an accepted reply");
        (word(5), (len > 24).then(|| word(6)))
    };
    // WRITE3args: a 16-byte handle, offset, count, stable, then the data.
    let write_args = |count: u32, claimed: u32, data: &[u8]| {
        [
            be32(16),
            vec![7; 16],
            0u64.to_be_bytes().to_vec(),
            be32(count),
            be32(0),
            be32(claimed),
            data.to_vec(),
        ]
        .concat()
    };
    const GARBAGE_ARGS: u32 = 4;
    // The data's length claims more than the record holds.
    s.write_all(&nfs_call(1, 7, &write_args(4096, 4096, &[1; 8])))
        .unwrap();
    assert_eq!(reply(1).0, GARBAGE_ARGS);
    // A length near 2^32: no overflow, no allocation, refused.
    s.write_all(&nfs_call(2, 7, &write_args(8, u32::MAX, &[1; 8])))
        .unwrap();
    assert_eq!(reply(2).0, GARBAGE_ARGS);
    // Bytes after the (padded) data.
    s.write_all(&nfs_call(3, 7, &write_args(5, 5, &[1; 12])))
        .unwrap();
    assert_eq!(reply(3).0, GARBAGE_ARGS);
    // Cut off inside the handle.
    s.write_all(&nfs_call(4, 7, &[0, 0, 0, 16, 1, 2])).unwrap();
    assert_eq!(reply(4).0, GARBAGE_ARGS);
    // Well formed, but the count disagrees with the data: NFS3ERR_INVAL.
    s.write_all(&nfs_call(5, 7, &write_args(9, 8, &[1; 8])))
        .unwrap();
    assert_eq!(reply(5), (0, Some(22)));
    // Well formed, a handle the server never gave: refused, not written.
    s.write_all(&nfs_call(6, 7, &write_args(8, 8, &[1; 8])))
        .unwrap();
    let (accepted, status) = reply(6);
    assert_eq!(accepted, 0);
    assert_ne!(
        status,
        Some(0),
        "a write through a made-up handle succeeded"
    );
    // The same connection still answers: NULL.
    s.write_all(&nfs_call(7, 0, &[])).unwrap();
    assert_eq!(reply(7), (0, None));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A client that pipelines far more calls than the server reads ahead
/// (`MAX_IN_FLIGHT`) gets every answer: the reading half waits for replies
/// that the writing half sends, and the two never wait for each other.
#[test]
fn pipelined_calls_past_the_in_flight_limit_are_all_answered() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = open_server(dir.path());
    let mut s = raw_connection(&server);
    let calls = 4 * server::MAX_IN_FLIGHT;
    let mut all = Vec::new();
    for xid in 0..calls {
        // NULL.
        all.extend(nfs_call(xid, 0, &[]));
    }
    s.write_all(&all).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..calls {
        let body = read_record(&mut s);
        let xid = u32::from_be_bytes(body[0..4].try_into().unwrap());
        assert!(seen.insert(xid), "call {xid} answered twice");
    }
    assert_eq!(seen.len() as u32, calls);
}

#[test]
fn record_limit_follows_fragments_across_reads() {
    let mut r = server::RecordLimit::new((), 100, u32::MAX);
    // A record of two fragments (60 + 40), split at awkward places.
    let mut bytes = vec![0, 0, 0, 60];
    bytes.extend([1u8; 60]);
    bytes.extend([0x80, 0, 0, 40]);
    bytes.extend([2u8; 40]);
    for part in bytes.chunks(7) {
        r.track(part).unwrap();
    }
    // The next record starts afresh: 100 bytes are allowed again.
    let mut next = vec![0x80, 0, 0, 100];
    next.extend([3u8; 100]);
    r.track(&next).unwrap();
    // One byte too many.
    assert!(r.track(&[0x80, 0, 0, 101]).is_err());
}

/// Requests read and not answered are bounded: reading stops until a reply
/// goes out.
#[test]
fn unanswered_requests_stop_the_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut client, server_end) = tokio::io::duplex(1 << 16);
        let mut limited = server::RecordLimit::new(server_end, 1024, 2);
        let record = |b: u8| [&[0x80u8, 0, 0, 4][..], &[b; 4]].concat();
        for b in 1..=3 {
            client.write_all(&record(b)).await.unwrap();
        }
        let mut got = vec![0u8; 16];
        limited.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[4..8], &[1; 4]);
        assert_eq!(&got[12..16], &[2; 4]);
        // Two in flight: the third waits.
        let mut third = vec![0u8; 8];
        let waited =
            tokio::time::timeout(Duration::from_millis(100), limited.read_exact(&mut third)).await;
        assert!(waited.is_err(), "read a third request with two unanswered");
        // A reply, written in two pieces as the server does, frees a slot.
        limited.write_all(&[0x80, 0, 0, 2]).await.unwrap();
        limited.write_all(&[9, 9]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), limited.read_exact(&mut third))
            .await
            .expect("still waiting after a reply")
            .unwrap();
        assert_eq!(&third[4..8], &[3; 4]);
    });
}

/// Credentials from `tls-init` for the server ("127.0.0.1") and a client
/// ("client-a"), plus one of another CA.
struct TlsSetup {
    _tmp: tempfile::TempDir,
    server: crate::migration::transport::TlsIdentity,
    client: crate::migration::transport::TlsIdentity,
    client_cert: rustls::pki_types::CertificateDer<'static>,
    second_client: crate::migration::transport::TlsIdentity,
    stranger: crate::migration::transport::TlsIdentity,
}

fn tls_setup() -> TlsSetup {
    use crate::migration::transport::{tls_init, TlsIdentity};
    use rustls::pki_types::pem::PemObject;
    let tmp = tempfile::tempdir().unwrap();
    let dirs = tls_init(
        &tmp.path().join("ca"),
        &["127.0.0.1".into(), "client-a".into(), "client-b".into()],
    )
    .unwrap();
    let other = tls_init(&tmp.path().join("other"), &["client-a".into()]).unwrap();
    let pem = std::fs::read(dirs[1].join("cert.pem")).unwrap();
    TlsSetup {
        server: TlsIdentity::load(&dirs[0]).unwrap(),
        client: TlsIdentity::load(&dirs[1]).unwrap(),
        client_cert: rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap(),
        second_client: TlsIdentity::load(&dirs[2]).unwrap(),
        stranger: TlsIdentity::load(&other[0]).unwrap(),
        _tmp: tmp,
    }
}

const SECRET: [u8; SECRET_LEN] = [0x5a; SECRET_LEN];

fn tls_access(
    id: &crate::migration::transport::TlsIdentity,
    secret: [u8; SECRET_LEN],
) -> ShareAccess {
    ShareAccess {
        tls: Some((
            id.client_config(),
            crate::migration::transport::peer_name("127.0.0.1").unwrap(),
        )),
        secret: Some(secret),
    }
}

fn tls_server(dir: &Path, t: &TlsSetup) -> NfsShareServer {
    NfsShareServer::start(
        dir,
        LOCALHOST,
        EXPORT,
        Some(LOCALHOST),
        ShareGuard {
            tls: Some(t.server.server_config()),
            peer_cert: Some(t.client_cert.clone()),
            secret: Some(SECRET),
        },
    )
    .unwrap()
}

#[test]
fn the_share_works_over_tls_with_the_secret() {
    let t = tls_setup();
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), &t);
    let addr = SocketAddr::new(LOCALHOST, server.port());
    let share = NfsShare::connect(addr, EXPORT, tls_access(&t.client, SECRET)).unwrap();
    // Big enough for parallel pieces on several TLS connections.
    let content = pattern(3, 5 * MIB + 7);
    let file = share.create("disk.img", content.len() as u64).unwrap();
    file.write_at(0, &content).unwrap();
    file.sync().unwrap();
    let mut back = vec![0u8; content.len()];
    let mut done = 0;
    while done < back.len() {
        done += file.read_at(done as u64, &mut back[done..]).unwrap();
    }
    assert_eq!(back, content);
    assert_eq!(std::fs::read(dir.path().join("disk.img")).unwrap(), content);
}

#[test]
fn the_share_refuses_connections_without_secret_or_the_channels_certificate() {
    let t = tls_setup();
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), &t);
    let addr = SocketAddr::new(LOCALHOST, server.port());
    let cases: [(&str, ShareAccess); 4] = [
        ("wrong secret", tls_access(&t.client, [0x5b; SECRET_LEN])),
        ("plaintext", ShareAccess::open()),
        ("another CA", tls_access(&t.stranger, SECRET)),
        (
            "same CA, not the channel's certificate",
            tls_access(&t.second_client, SECRET),
        ),
    ];
    for (what, access) in cases {
        let started = Instant::now();
        let err = NfsShare::connect(addr, EXPORT, access)
            .err()
            .unwrap_or_else(|| panic!("{what}: the share let it in"));
        assert!(
            matches!(err, ShareError::Connect { .. } | ShareError::Timeout { .. }),
            "{what}: {err}"
        );
        assert!(started.elapsed() < client::CONNECT_TIMEOUT + Duration::from_secs(2));
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    // And it still serves the right client afterwards.
    NfsShare::connect(addr, EXPORT, tls_access(&t.client, SECRET)).unwrap();
}

#[test]
fn a_plain_nfs_client_cannot_list_a_tls_share() {
    if Command::new("nfs-ls").arg("--help").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI is set but nfs-ls is not installed (apt-get install libnfs-utils)"
        );
        println!("skipped: nfs-ls not installed (apt-get install libnfs-utils)");
        return;
    }
    let t = tls_setup();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("disk.img"), b"guest data").unwrap();
    let server = tls_server(dir.path(), &t);
    let port = server.port();
    let q = format!("?version=3&nfsport={port}&mountport={port}");
    for (tool, url) in [
        ("nfs-ls", format!("nfs://127.0.0.1{EXPORT}{q}")),
        ("nfs-cat", format!("nfs://127.0.0.1{EXPORT}/disk.img{q}")),
    ] {
        let out = Command::new("timeout")
            .args(["20", tool, &url])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{tool} got in: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("disk.img")
                && !out.stdout.starts_with(b"guest data"),
            "{tool}: {out:?}"
        );
    }
}

/// Both guards at once, as a migration's share runs them: TLS with the
/// channel's certificate and the secret first, then only the announced
/// names up to their sizes, and records bounded behind the TLS layer.
#[test]
fn a_tls_migration_share_takes_only_the_announced_files_and_bounds_records() {
    use std::io::{Read, Write};
    let t = tls_setup();
    let dir = tempfile::tempdir().unwrap();
    let server = NfsShareServer::start_for(
        dir.path(),
        LOCALHOST,
        EXPORT,
        Some(LOCALHOST),
        ShareGuard {
            tls: Some(t.server.server_config()),
            peer_cert: Some(t.client_cert.clone()),
            secret: Some(SECRET),
        },
        vec![("disk.img".into(), 2 * MIB as u64)],
    )
    .unwrap();
    let addr = SocketAddr::new(LOCALHOST, server.port());
    let share = NfsShare::connect(addr, EXPORT, tls_access(&t.client, SECRET)).unwrap();
    let err = share
        .create("evil.img", 4096)
        .err()
        .expect("created evil.img");
    assert!(err.to_string().contains("NFS3ERR_ACCES"), "{err}");
    assert!(!dir.path().join("evil.img").exists());
    let file = share.create("disk.img", 2 * MIB as u64).unwrap();
    let err = file
        .write_at(2 * MIB as u64 - 10, &pattern(10, 11))
        .expect_err("wrote past the announced size");
    assert!(err.to_string().contains("NFS3ERR_FBIG"), "{err}");

    // An authenticated peer's oversized record ends its connection too.
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = crate::migration::transport::Channel::connect(
        tcp,
        &t.client,
        crate::migration::transport::peer_name("127.0.0.1").unwrap(),
        deadline,
    )
    .unwrap();
    s.clear_deadline(Some(Duration::from_secs(10)));
    s.write_all(&SECRET).unwrap();
    let _ = s.write_all(&[0xc0u8, 0, 0, 0]);
    let _ = s.flush();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("the server answered {n} bytes to an oversized record"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // And the share goes on serving.
    assert_eq!(
        share.list().unwrap(),
        vec![("disk.img".to_string(), 2 * MIB as u64)]
    );
}
