//! The migration channel alone, plaintext against TLS, over loopback: what
//! the TLS layer costs per byte with the migration's own buffering (a
//! 256 KiB `BufWriter` of vectored 4 MiB frames on the sending side, a 1 MiB
//! `BufReader` on the receiving side). `cargo run --release --example
//! tls_throughput`; figures in docs/benchmarks.md.

use ferry::migration::transport::*;
use std::io::{BufReader, BufWriter, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let tmp = std::env::temp_dir().join(format!("tlsbench-{}", std::process::id()));
    let dirs = tls_init(&tmp, &["127.0.0.1".into()]).unwrap();
    let id = Arc::new(TlsIdentity::load(&dirs[0]).unwrap());
    const TOTAL: usize = 2 << 30;
    for tls in [false, true, false, true] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sid = id.clone();
        let srv = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let ch = if tls {
                let mut c =
                    Channel::accept(tcp, &sid, Instant::now() + Duration::from_secs(10)).unwrap();
                c.clear_deadline(None);
                c
            } else {
                Channel::plain(tcp)
            };
            let mut r = BufReader::with_capacity(1 << 20, ch);
            let mut buf = vec![0u8; 4 << 20];
            let mut got = 0;
            while got < TOTAL {
                r.read_exact(&mut buf).unwrap();
                got += buf.len();
            }
        });
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let ch = if tls {
            Channel::connect(
                tcp,
                &id,
                peer_name("127.0.0.1").unwrap(),
                Instant::now() + Duration::from_secs(10),
            )
            .unwrap()
        } else {
            Channel::plain(tcp)
        };
        let mut w = BufWriter::with_capacity(256 << 10, ch);
        let data = vec![7u8; (4 << 20) - 32];
        let hdr = [1u8; 32];
        let t = Instant::now();
        let mut sent = 0;
        while sent < TOTAL {
            let mut done = 0;
            let n = hdr.len() + data.len();
            while done < n {
                let k = if done < hdr.len() {
                    w.write_vectored(&[IoSlice::new(&hdr[done..]), IoSlice::new(&data)])
                        .unwrap()
                } else {
                    w.write(&data[done - hdr.len()..]).unwrap()
                };
                done += k;
            }
            sent += n;
        }
        w.flush().unwrap();
        srv.join().unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "tls={tls}: {:.0} MiB/s",
            TOTAL as f64 / s / (1 << 20) as f64
        );
    }
    let _ = std::fs::remove_dir_all(tmp);
}
