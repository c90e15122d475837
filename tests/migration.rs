//! Live migration between two ferry processes on this machine (loopback),
//! with the disks on shared storage (the same paths), over mutual TLS with
//! certificates from `ferry tls-init` (and one test of `--insecure`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ferry::migration::protocol::{self, HelloAck, Kind};
use ferry::migration::transport::{peer_name, Channel, TlsIdentity};

const WAIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_migration(src: &Ferry, dest: &str, bandwidth: Option<u64>) -> (u16, serde_json::Value) {
    send(
        src,
        serde_json::json!({
            "destination": dest,
            "max_downtime_ms": 50,
            "bandwidth_mib_s": bandwidth,
        }),
    )
}

/// `PUT /migration/send` with `body`, over TLS with the certificates of
/// the test's directory unless the body says otherwise.
fn send(src: &Ferry, mut body: serde_json::Value) -> (u16, serde_json::Value) {
    if body.get("tls_dir").is_none() && body.get("insecure").is_none() {
        let dir = src.api_sock.as_ref().unwrap().parent().unwrap();
        body["tls_dir"] = serde_json::json!(tls_dir(dir));
    }
    ferry::api::client::request(
        src.api_sock.as_ref().unwrap(),
        "PUT",
        "/migration/send",
        Some(&body),
    )
    .unwrap()
}

/// Polls GET /migration until `pred` holds; returns that status.
fn wait_status(src: &Ferry, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = src.api("GET", "/migration");
        assert_eq!(status, 200, "{body}");
        if pred(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "migration status never matched: {body}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pass_of(line: &str) -> Option<u64> {
    line.strip_prefix("testkernel: dirty pass=")?
        .strip_suffix(" ok")?
        .parse()
        .ok()
}

fn last_pass(f: &Ferry) -> u64 {
    f.lines().iter().rev().find_map(|l| pass_of(l)).unwrap_or(0)
}

fn no_fail(f: &Ferry) {
    let lines = f.lines();
    assert!(
        !lines.iter().any(|l| l.contains("FAIL")),
        "FAIL in {lines:#?}"
    );
}

/// The source let go of its guest and exited cleanly, and the guest goes
/// on at the destination: two passes past the source's last, no FAIL.
fn continues_at(src: &mut Ferry, dst: &Ferry) {
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let before = last_pass(src);
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(dst);
}

#[test]
fn dirty_guest_migrates_and_keeps_verifying() {
    if !kvm_available("dirty_guest_migrates_and_keeps_verifying") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let mut src = Ferry::run(
        dir.path(),
        &config(2, 512, "testkernel.workload=dirty testkernel.dirty_mib=128"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = start_migration(&src, &format!("127.0.0.1:{port}"), None);
    assert_eq!(status, 200, "{body}");
    // The source exits 0 once the destination runs the guest.
    let exit = src.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?} {}", src.stderr());
    assert!(
        src.stderr().contains("the guest now runs at"),
        "{}",
        src.stderr()
    );
    let before = last_pass(&src);
    no_fail(&src);

    // On the destination the guest carries on: the next passes, verified.
    let (_, first) = dst.wait_line_from(0, WAIT, |l| pass_of(l).is_some());
    let first = pass_of(&first).unwrap();
    assert!(
        first == before + 1 || first == before,
        "destination started at pass {first}, source ended at {before}"
    );
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= first + 3));
    no_fail(&dst);
    assert!(!dst
        .lines()
        .iter()
        .any(|l| l.starts_with("testkernel: booted")));
    dst.wait_api(WAIT);
    let (_, vm) = dst.api("GET", "/vm");
    assert_eq!(vm["state"], "Running");
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["memory_mib"], 512);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}

#[test]
fn idle_guest_heartbeat_continues_on_the_destination() {
    if !kvm_available("idle_guest_heartbeat_continues_on_the_destination") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let mut src = Ferry::run(dir.path(), &config(1, 256, "testkernel.workload=idle"));
    src.wait_line(WAIT, |l| l == "testkernel: tick 1");
    // ferry ctl migrate, as a user would run it.
    let out = std::process::Command::new(FERRY)
        .args([
            "ctl",
            "--sock",
            src.api_sock.as_ref().unwrap().to_str().unwrap(),
            "migrate",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--tls-dir",
            tls_dir(dir.path()).to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("migrated to") || err.contains("runs at"),
        "{err}"
    );
    assert!(src.wait_exit(WAIT).success());
    let last: u64 = src
        .lines()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("testkernel: tick ")?.parse().ok())
        .unwrap();
    let (_, line) = dst.wait_line_from(0, WAIT, |l| l.starts_with("testkernel: tick "));
    let next: u64 = line["testkernel: tick ".len()..].parse().unwrap();
    assert_eq!(next, last + 1, "{:?}", dst.lines());
}

/// A migration slowed down to last many seconds.
fn slow_migration(dir: &Path, port: u16) -> Ferry {
    let src = Ferry::run(
        dir,
        &config(1, 256, "testkernel.workload=dirty testkernel.dirty_mib=96"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=1 ok");
    let (status, body) = start_migration(&src, &format!("127.0.0.1:{port}"), Some(8));
    assert_eq!(status, 200, "{body}");
    wait_status(&src, |s| {
        s["phase"] == "precopy" && s["bytes_sent"].as_u64() > Some(1 << 20)
    });
    src
}

fn assert_source_runs_on(src: &Ferry) {
    let (_, vm) = src.api("GET", "/vm");
    assert_eq!(vm["state"], "Running", "{vm}");
    let before = last_pass(src);
    src.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(src);
}

#[test]
fn cancel_keeps_the_guest_on_the_source() {
    if !kvm_available("cancel_keeps_the_guest_on_the_source") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let src = slow_migration(dir.path(), port);
    let (status, body) = src.api("PUT", "/migration/cancel");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "cancelled", "{body}");
    // The destination drops what it received and goes away.
    let exit = dst.wait_exit(WAIT);
    assert!(!exit.success());
    assert!(
        dst.lines().is_empty(),
        "the destination ran the guest: {:?}",
        dst.lines()
    );
    assert_source_runs_on(&src);
    // Cancelling again: nothing to cancel.
    let (status, _) = src.api("PUT", "/migration/cancel");
    assert_eq!(status, 409);
}

#[test]
fn killed_destination_leaves_the_guest_running() {
    if !kvm_available("killed_destination_leaves_the_guest_running") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let src = slow_migration(dir.path(), port);
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(dst.pid() as i32, libc::SIGKILL) };
    let status = wait_status(&src, |s| s["phase"] == "failed");
    assert!(
        status["error"].as_str().unwrap().contains("connection"),
        "{status}"
    );
    assert_eq!(status["handed_over"], false);
    assert_source_runs_on(&src);
}

/// A fake destination, with the certificates of `dir`: answers the
/// source's Hello with `reply`.
fn fake_destination(
    dir: &Path,
    reply: impl FnOnce(&mut Channel, protocol::Hello) + Send + 'static,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let id = TlsIdentity::load(&tls_dir(dir)).unwrap();
    std::thread::spawn(move || {
        if let Ok((tcp, _)) = listener.accept() {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut s = Channel::accept(tcp, &id, deadline).unwrap();
            s.clear_deadline(None);
            let hello: protocol::Hello =
                protocol::parse_json(Kind::Hello, &protocol::expect(&mut s, Kind::Hello).unwrap())
                    .unwrap();
            reply(&mut s, hello);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    port
}

/// A TLS client with the certificates of `dir`, as a source would connect.
fn tls_client(dir: &Path, port: u16) -> Channel {
    let id = TlsIdentity::load(&tls_dir(dir)).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = Channel::connect(tcp, &id, peer_name("127.0.0.1").unwrap(), deadline).unwrap();
    s.clear_deadline(Some(Duration::from_secs(30)));
    s
}

#[test]
fn incompatible_destinations_are_refused_and_the_source_is_unharmed() {
    if !kvm_available("incompatible_destinations_are_refused_and_the_source_is_unharmed") {
        return;
    }
    let dir = tempdir();
    let src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=1 ok");
    let cases: Vec<(&str, u16)> = vec![
        (
            "different VM",
            fake_destination(dir.path(), |s, h| {
                let ack = HelloAck {
                    protocol: h.protocol,
                    migration_id: h.migration_id,
                    vcpus: h.vcpus,
                    memory_size: h.memory_size * 2,
                    share: None,
                    nonce: "0123abcd".into(),
                    lanes: None,
                };
                protocol::send_json(s, Kind::HelloAck, &ack).unwrap();
            }),
        ),
        (
            "different VM",
            fake_destination(dir.path(), |s, h| {
                let ack = HelloAck {
                    protocol: h.protocol + 1,
                    migration_id: h.migration_id,
                    vcpus: h.vcpus,
                    memory_size: h.memory_size,
                    share: None,
                    nonce: "0123abcd".into(),
                    lanes: None,
                };
                protocol::send_json(s, Kind::HelloAck, &ack).unwrap();
            }),
        ),
        (
            "not a Ferry migration stream",
            fake_destination(dir.path(), |s, _| {
                s.write_all(b"SSH-2.0-OpenSSH_9.2 definitely not ferry\r\n")
                    .unwrap();
            }),
        ),
        (
            "protocol version",
            fake_destination(dir.path(), |s, _| {
                protocol::send_json(
                    s,
                    Kind::Error,
                    &protocol::Reason {
                        reason: "migration protocol version 1, this ferry speaks version 2".into(),
                    },
                )
                .unwrap();
            }),
        ),
        ("cannot connect", free_port()),
    ];
    for (want, port) in cases {
        let (status, body) = start_migration(&src, &format!("127.0.0.1:{port}"), None);
        assert_eq!(status, 200, "{body}");
        let st = wait_status(&src, |s| s["phase"] == "failed");
        let err = st["error"].as_str().unwrap();
        assert!(err.contains(want), "wanted {want:?}: {err}");
        let (_, vm) = src.api("GET", "/vm");
        assert_eq!(vm["state"], "Running");
    }
    assert_source_runs_on(&src);
}

#[test]
fn receiver_rejects_garbage_and_bad_handshakes_then_accepts_a_real_migration() {
    if !kvm_available("receiver_rejects_garbage_and_bad_handshakes_then_accepts_a_real_migration") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let addr = format!("127.0.0.1:{port}");

    // Random bytes (not even TLS).
    let mut s = TcpStream::connect(&addr).unwrap();
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&junk);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);

    // A Hello of another protocol version, and one with absurd memory.
    for (protocol_version, memory_size, want) in [
        (99, 128 << 20, "protocol version 99"),
        (
            protocol::PROTOCOL_VERSION,
            1 << 50,
            "does not fit this host",
        ),
    ] {
        let mut s = tls_client(dir.path(), port);
        protocol::send_json(
            &mut s,
            Kind::Hello,
            &protocol::Hello {
                protocol: protocol_version,
                migration_id: "f0f0f0".into(),
                vcpus: 1,
                memory_size,
                cpuid: vec![],
                storage: None,
                net_ids: vec![],
                connections: 1,
            },
        )
        .unwrap();
        match protocol::expect(&mut s, Kind::HelloAck) {
            Err(protocol::ProtocolError::Peer(reason)) => {
                assert!(reason.contains(want), "{reason}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
    let deadline = Instant::now() + WAIT;
    while !dst.stderr().contains("refused a connection") {
        assert!(Instant::now() < deadline, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }

    // Still waiting, and a real migration goes through.
    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = start_migration(&src, &addr, None);
    assert_eq!(status, 200, "{body}");
    continues_at(&mut src, &dst);
}

/// A source that completes the handshake and then skips to the hand-over
/// (a `Go` with no memory and no state) is told the frame is out of place,
/// and the receiver ends at once without building or running anything.
#[test]
fn receiver_refuses_frames_out_of_order() {
    if !kvm_available("receiver_refuses_frames_out_of_order") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let mut s = tls_client(dir.path(), port);
    protocol::send_json(
        &mut s,
        Kind::Hello,
        &protocol::Hello {
            protocol: protocol::PROTOCOL_VERSION,
            migration_id: "abc123".into(),
            vcpus: 1,
            memory_size: 128 << 20,
            cpuid: vec![],
            storage: None,
            net_ids: vec![],
            connections: 1,
        },
    )
    .unwrap();
    let ack: HelloAck = protocol::parse_json(
        Kind::HelloAck,
        &protocol::expect(&mut s, Kind::HelloAck).unwrap(),
    )
    .unwrap();
    assert_eq!(ack.migration_id, "abc123");
    protocol::send_json(&mut s, Kind::Go, &serde_json::json!({})).unwrap();
    match protocol::expect(&mut s, Kind::Ready) {
        Err(protocol::ProtocolError::Peer(reason)) => {
            assert!(reason.contains("Go"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let status = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", dst.stderr());
    assert!(dst.stderr().contains("Go"), "{}", dst.stderr());
    assert!(
        !dst.stderr().contains("the guest runs here"),
        "{}",
        dst.stderr()
    );
}

#[test]
fn migration_api_rejects_bad_requests() {
    if !kvm_available("migration_api_rejects_bad_requests") {
        return;
    }
    let dir = tempdir();
    let src = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    src.wait_api(WAIT);
    let sock = src.api_sock.clone().unwrap();
    let req = |v: serde_json::Value| {
        ferry::api::client::request(&sock, "PUT", "/migration/send", Some(&v)).unwrap()
    };
    assert_eq!(req(serde_json::json!({})).0, 400);
    assert_eq!(req(serde_json::json!({"destination": "nowhere"})).0, 400);
    assert_eq!(
        req(serde_json::json!({"destination": "127.0.0.1:1", "max_downtime_ms": 0})).0,
        400
    );
    assert_eq!(
        req(serde_json::json!({"destination": "127.0.0.1:1", "bogus": 1})).0,
        400
    );
    let (status, body) = src.api("GET", "/migration");
    assert_eq!(status, 200);
    assert_eq!(body["phase"], "none");
    let (_, vm) = src.api("GET", "/vm");
    assert_eq!(vm["state"], "Running");
}

#[test]
fn storage_copy_needs_a_destination_dir() {
    if !kvm_available("storage_copy_needs_a_destination_dir") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let src = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    src.wait_api(WAIT);
    let (status, body) = send(
        &src,
        serde_json::json!({
            "destination": format!("127.0.0.1:{port}"),
            "storage": "copy",
        }),
    );
    assert_eq!(status, 200, "{body}");
    let st = wait_status(&src, |s| s["phase"] == "failed");
    assert!(st["error"].as_str().unwrap().contains("--dir"), "{st}");
    let (_, vm) = src.api("GET", "/vm");
    assert_eq!(vm["state"], "Running");
    drop(dst);
}

#[test]
fn a_migration_that_cannot_converge_throttles_then_fails_clearly() {
    if !kvm_available("a_migration_that_cannot_converge_throttles_then_fails_clearly") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=32"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    // 1 ms cannot be met: the hand-over alone is estimated at more.
    let (status, body) = send(
        &src,
        serde_json::json!({
            "destination": format!("127.0.0.1:{port}"),
            "max_downtime_ms": 1,
        }),
    );
    assert_eq!(status, 200, "{body}");
    let st = wait_status(&src, |s| s["phase"] == "failed");
    let err = st["error"].as_str().unwrap();
    assert!(err.contains("did not converge"), "{st}");
    assert!(st["throttle_percent"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["pass"], ferry::migration::source::MAX_PASSES, "{st}");
    // The guest runs on at full speed, unharmed; the destination gave up.
    assert_source_runs_on(&src);
    assert!(!dst.wait_exit(WAIT).success());
}

/// How long `ferry receive` may take to notice that the source gave up:
/// far below its 30 s idle timeout, which is what it waited for when the
/// source went quiet without a word.
const GIVE_UP_NOTICE: Duration = Duration::from_secs(5);

/// Waits for the receiver to exit after the source gave up; returns its
/// stderr.
fn receiver_gives_up_promptly(dst: &mut Ferry) -> String {
    let t = Instant::now();
    let exit = dst.wait_exit(WAIT);
    let took = t.elapsed();
    let err = dst.stderr();
    assert!(!exit.success(), "{exit:?} {err}");
    assert!(
        took < GIVE_UP_NOTICE,
        "the destination took {took:?} to notice: {err}"
    );
    assert!(
        !err.contains("Resource temporarily unavailable"),
        "the destination timed out instead of hearing why: {err}"
    );
    assert!(
        dst.lines().is_empty(),
        "the destination ran the guest: {:?}",
        dst.lines()
    );
    err
}

#[test]
fn a_cancel_on_the_source_ends_the_destination_at_once_with_the_reason() {
    if !kvm_available("a_cancel_on_the_source_ends_the_destination_at_once_with_the_reason") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let src = slow_migration(dir.path(), port);
    let (status, body) = src.api("PUT", "/migration/cancel");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["phase"], "cancelled", "{body}");
    let err = receiver_gives_up_promptly(&mut dst);
    assert!(
        err.contains("the peer reported: the migration was cancelled on the source"),
        "{err}"
    );
    assert_source_runs_on(&src);
}

#[test]
fn a_source_that_cannot_converge_ends_the_destination_at_once_with_the_reason() {
    if !kvm_available("a_source_that_cannot_converge_ends_the_destination_at_once_with_the_reason")
    {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=32"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=1 ok");
    let (status, body) = send(
        &src,
        serde_json::json!({
            "destination": format!("127.0.0.1:{port}"),
            "max_downtime_ms": 1,
        }),
    );
    assert_eq!(status, 200, "{body}");
    let st = wait_status(&src, |s| s["phase"] == "failed");
    let why = st["error"].as_str().unwrap();
    assert!(why.contains("did not converge"), "{st}");
    // The source's own words, on the destination's stderr.
    let err = receiver_gives_up_promptly(&mut dst);
    assert!(
        err.contains(&format!("the peer reported: {why}")),
        "{why} / {err}"
    );
    assert_source_runs_on(&src);
}

// A forged source: a real guest's snapshot sent with the protocol structs,
// so that the state and the stream can say what a hostile peer would.

/// A snapshot of a running guest whose one drive is `drive`: its state (as
/// JSON, to be altered at will) and its memory file.
fn forgery(dir: &Path, drive: &Path) -> (serde_json::Value, std::fs::File) {
    let mut cfg = config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8");
    cfg["drives"] = serde_json::json!([{ "id": "d0", "path": drive, "create_size_mib": 8 }]);
    let src = Ferry::run(dir, &cfg);
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let snap = dir.join("snap");
    let (status, body) = ferry::api::client::request(
        src.api_sock.as_ref().unwrap(),
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({ "dir": snap })),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    drop(src);
    let (state, memory) = ferry::snapshot::read_snapshot(&snap).unwrap();
    (serde_json::to_value(&state).unwrap(), memory)
}

/// The frames after `HelloAck`, up to and including `Seal`, as a source
/// would send them for `nonce`: every page once (data or declared zero),
/// except the `skip`th data frame if asked.
fn forged_memory(memory: &std::fs::File, size: u64, nonce: &str, skip: Option<usize>) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 4 << 20;
    let zero = [0u8; 4096];
    let mut w = protocol::DigestWriter::new(Vec::new());
    w.start_digest(nonce);
    let mut buf = vec![0u8; CHUNK];
    let mut data_frames = 0;
    for off in (0..size).step_by(CHUNK) {
        memory.read_exact_at(&mut buf, off).unwrap();
        let is_zero = |p: usize| buf[p * 4096..(p + 1) * 4096] == zero[..];
        let pages = CHUNK / 4096;
        let mut i = 0;
        while i < pages {
            let z = is_zero(i);
            let mut j = i + 1;
            while j < pages && is_zero(j) == z {
                j += 1;
            }
            let gpa = off + (i * 4096) as u64;
            if z {
                let count = (j - i) as u64;
                protocol::send_frame(
                    &mut w,
                    Kind::ZeroPages,
                    &[&gpa.to_le_bytes(), &count.to_le_bytes()],
                )
                .unwrap();
            } else {
                if skip != Some(data_frames) {
                    protocol::send_frame(
                        &mut w,
                        Kind::MemoryPages,
                        &[&gpa.to_le_bytes(), &buf[i * 4096..j * 4096]],
                    )
                    .unwrap();
                }
                data_frames += 1;
            }
            i = j;
        }
    }
    protocol::send_json(&mut w, Kind::PassEnd, &protocol::PassEnd { pass: 1 }).unwrap();
    let seal = w.seal().unwrap();
    protocol::send_json(&mut w, Kind::Seal, &seal).unwrap();
    std::mem::take(w.get_mut())
}

fn forged_hello(state: &serde_json::Value) -> protocol::Hello {
    protocol::Hello {
        protocol: protocol::PROTOCOL_VERSION,
        migration_id: "f0f0aa".into(),
        vcpus: state["vcpus"].as_array().unwrap().len() as u8,
        memory_size: state["memory_size"].as_u64().unwrap(),
        // The saved vCPU CPUID is what KVM reports back, not what a source
        // offers; an empty list skips the feature check, as in the tests
        // above.
        cpuid: vec![],
        storage: None,
        net_ids: vec![],
        connections: 1,
    }
}

/// Sends `hello`, then `memory(nonce)` (up to the Seal), then `state`,
/// and, once the destination is ready, Go. Returns what was sent after the
/// Hello (a recording), or the destination's reason for refusing.
fn forge(
    dir: &Path,
    port: u16,
    hello: &protocol::Hello,
    memory: impl FnOnce(&str) -> Vec<u8>,
    state: &serde_json::Value,
) -> Result<Vec<u8>, String> {
    let mut s = tls_client(dir, port);
    s.set_read_timeout(Some(WAIT)).unwrap();
    protocol::send_json(&mut s, Kind::Hello, hello).unwrap();
    let ack: HelloAck = protocol::expect(&mut s, Kind::HelloAck)
        .and_then(|p| protocol::parse_json(Kind::HelloAck, &p))
        .map_err(|e| e.to_string())?;
    let mut sent = memory(&ack.nonce);
    s.write_all(&sent).unwrap();
    // A stream refused at its Seal hears so before the state goes out.
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    match protocol::expect(&mut s, Kind::Ready) {
        Err(protocol::ProtocolError::Peer(reason)) => return Err(reason),
        Err(protocol::ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("unexpected answer to the Seal: {:?}", other.map(|_| ())),
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    protocol::send_json(&mut rest, Kind::State, state).unwrap();
    s.write_all(&rest).unwrap();
    sent.extend_from_slice(&rest);
    match protocol::expect(&mut s, Kind::Ready) {
        Ok(_) => {}
        Err(protocol::ProtocolError::Peer(reason)) => return Err(reason),
        Err(e) => panic!("no Ready: {e}"),
    }
    let mut go = Vec::new();
    protocol::send_json(&mut go, Kind::Go, &serde_json::json!({})).unwrap();
    s.write_all(&go).unwrap();
    sent.extend_from_slice(&go);
    protocol::expect(&mut s, Kind::Resumed).map_err(|e| e.to_string())?;
    Ok(sent)
}

/// The receiver refused the migration after the handshake: it says why,
/// exits 1, and never ran the guest.
fn assert_refused(dst: &mut Ferry, reason: &str, want: &str) {
    assert!(reason.contains(want), "wanted {want:?}: {reason}");
    let status = dst.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", dst.stderr());
    assert!(dst.stderr().contains(want), "{}", dst.stderr());
    assert!(
        !dst.stderr().contains("the guest runs here"),
        "{}",
        dst.stderr()
    );
}

fn fingerprint(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

/// The sent config names host paths for the console, the control socket,
/// the drive and the kernel: the destination uses its own choices and
/// touches none of them; shared files outside `--shared-storage-root`
/// (directly, through `..` or a symlink) are refused.
#[test]
fn a_state_naming_host_paths_does_not_touch_them() {
    if !kvm_available("a_state_naming_host_paths_does_not_touch_them") {
        return;
    }
    let dir = tempdir();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let (state, memory) = forgery(dir.path(), &root.join("disk.img"));
    std::fs::copy(TESTKERNEL, root.join("kernel")).unwrap();
    let victim = outside.join("victim.img");
    std::fs::write(&victim, vec![0x5au8; 8 << 20]).unwrap();
    std::os::unix::fs::symlink(&victim, root.join("link.img")).unwrap();
    let before = fingerprint(&victim);
    let host_serial = outside.join("serial.log");
    let host_sock = outside.join("api.sock");
    let root_arg = root.to_str().unwrap().to_string();
    let size = state["memory_size"].as_u64().unwrap();

    // Drives outside the root, however they are spelled, are refused.
    for (what, path) in [
        ("a path outside", victim.clone()),
        ("a path through ..", root.join("../outside/victim.img")),
        ("a symlink", root.join("link.img")),
    ] {
        let mut st = state.clone();
        st["config"]["kernel"] = serde_json::json!(root.join("kernel"));
        st["config"]["drives"][0]["path"] = serde_json::json!(path);
        let (mut dst, port) = receiver_with(dir.path(), &["--shared-storage-root", &root_arg]);
        let reason = forge(
            dir.path(),
            port,
            &forged_hello(&st),
            |n| forged_memory(&memory, size, n, None),
            &st,
        )
        .expect_err(what);
        assert_refused(&mut dst, &reason, "outside --shared-storage-root");
        assert_eq!(fingerprint(&victim), before, "{what}");
    }
    // So is a kernel outside it.
    let mut st = state.clone();
    st["config"]["kernel"] = serde_json::json!(TESTKERNEL);
    let (mut dst, port) = receiver_with(dir.path(), &["--shared-storage-root", &root_arg]);
    let reason = forge(
        dir.path(),
        port,
        &forged_hello(&st),
        |n| forged_memory(&memory, size, n, None),
        &st,
    )
    .unwrap_err();
    assert_refused(&mut dst, &reason, "outside --shared-storage-root");

    // Inside the root the guest runs on, its console on the receiver's
    // stdout, not in the file the state names; no socket appears there.
    let mut st = state.clone();
    st["config"]["kernel"] = serde_json::json!(root.join("kernel"));
    st["config"]["serial"] = serde_json::json!(host_serial);
    st["config"]["api_socket"] = serde_json::json!(host_sock);
    let (mut dst, port) = receiver_with(dir.path(), &["--shared-storage-root", &root_arg]);
    forge(
        dir.path(),
        port,
        &forged_hello(&st),
        |n| forged_memory(&memory, size, n, None),
        &st,
    )
    .unwrap();
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= 4));
    no_fail(&dst);
    assert!(!host_serial.exists(), "the sent serial path was created");
    assert!(!host_sock.exists(), "the sent api_socket was created");
    assert_eq!(fingerprint(&victim), before);
    dst.wait_api(WAIT);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success(), "{}", dst.stderr());
}

/// `--serial FILE` on the destination puts the console there, owner-only.
#[test]
fn the_destination_chooses_where_the_console_goes() {
    if !kvm_available("the_destination_chooses_where_the_console_goes") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let (state, memory) = forgery(dir.path(), &dir.path().join("disk.img"));
    let log = dir.path().join("console.log");
    let size = state["memory_size"].as_u64().unwrap();
    let (mut dst, port) = receiver_with(
        dir.path(),
        &[
            "--shared-storage-root",
            "/",
            "--serial",
            log.to_str().unwrap(),
        ],
    );
    forge(
        dir.path(),
        port,
        &forged_hello(&state),
        |n| forged_memory(&memory, size, n, None),
        &state,
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| pass_of(l).is_some_and(|p| p >= 4))
    {
        assert!(Instant::now() < deadline, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::metadata(&log).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    dst.wait_api(WAIT);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success(), "{}", dst.stderr());
}

#[test]
fn a_stream_missing_a_memory_frame_is_refused() {
    if !kvm_available("a_stream_missing_a_memory_frame_is_refused") {
        return;
    }
    let dir = tempdir();
    let (state, memory) = forgery(dir.path(), &dir.path().join("disk.img"));
    let size = state["memory_size"].as_u64().unwrap();
    let (mut dst, port) = receiver(dir.path());
    // The seal is honest about what was sent: only the count of pages
    // tells that one frame never was.
    let reason = forge(
        dir.path(),
        port,
        &forged_hello(&state),
        |n| forged_memory(&memory, size, n, Some(1)),
        &state,
    )
    .unwrap_err();
    assert_refused(&mut dst, &reason, "never sent nor declared zero");

    // Complete memory but no Seal: the state is not taken.
    let (mut dst, port) = receiver(dir.path());
    let reason = forge(
        dir.path(),
        port,
        &forged_hello(&state),
        |n| {
            let mut stream = forged_memory(&memory, size, n, None);
            let mut r = &stream[..];
            let mut at = 0;
            loop {
                let h = protocol::read_header(&mut r).unwrap();
                protocol::read_payload(&mut r, &h).unwrap();
                if h.kind == Kind::Seal {
                    break;
                }
                at = stream.len() - r.len();
            }
            stream.truncate(at);
            stream
        },
        &state,
    )
    .unwrap_err();
    assert_refused(&mut dst, &reason, "without a Seal");

    // A Hello that claims more than a Hello is ever is refused on its
    // header, and the receiver listens on.
    let (mut dst, port) = receiver(dir.path());
    let mut s = tls_client(dir.path(), port);
    let hdr = protocol::header_bytes(Kind::Hello, 32 << 20, 0);
    s.write_all(&hdr).unwrap();
    match protocol::expect(&mut s, Kind::HelloAck) {
        Err(protocol::ProtocolError::Peer(reason)) => {
            assert!(reason.contains("larger than allowed"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let deadline = Instant::now() + WAIT;
    while !dst.stderr().contains("refused a connection") {
        assert!(Instant::now() < deadline, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dst.running(), "{}", dst.stderr());
}

/// A stream recorded at one migration and played again at a receiver is
/// refused at its seal: the digest was for another nonce.
#[test]
fn a_recorded_stream_replayed_is_refused() {
    if !kvm_available("a_recorded_stream_replayed_is_refused") {
        return;
    }
    let dir = tempdir();
    let (state, memory) = forgery(dir.path(), &dir.path().join("disk.img"));
    let size = state["memory_size"].as_u64().unwrap();
    let hello = forged_hello(&state);
    let (mut first, port) = receiver(dir.path());
    let recording = forge(
        dir.path(),
        port,
        &hello,
        |n| forged_memory(&memory, size, n, None),
        &state,
    )
    .unwrap();
    first.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= 3));
    first.wait_api(WAIT);
    first.api("PUT", "/vm/shutdown");
    assert!(first.wait_exit(WAIT).success(), "{}", first.stderr());

    let (mut dst, port) = receiver(dir.path());
    let seal_end = {
        // Replay up to and including the Seal, blind to the new nonce.
        let mut r = &recording[..];
        loop {
            let h = protocol::read_header(&mut r).unwrap();
            protocol::read_payload(&mut r, &h).unwrap();
            if h.kind == Kind::Seal {
                break recording.len() - r.len();
            }
        }
    };
    let reason = forge(
        dir.path(),
        port,
        &hello,
        |_| recording[..seal_end].to_vec(),
        &state,
    )
    .unwrap_err();
    assert_refused(&mut dst, &reason, "recorded for another migration");
}

/// Limits are this host's, checked at the Hello, before anything is
/// allocated; and shared storage needs a root the destination allows.
#[test]
fn guests_beyond_this_hosts_limits_are_refused_before_anything_is_built() {
    if !kvm_available("guests_beyond_this_hosts_limits_are_refused_before_anything_is_built") {
        return;
    }
    let dir = tempdir();
    let hello = |vcpus: u8, memory_size: u64| protocol::Hello {
        protocol: protocol::PROTOCOL_VERSION,
        migration_id: "f0f0f0".into(),
        vcpus,
        memory_size,
        cpuid: vec![],
        storage: None,
        net_ids: vec![],
        connections: 1,
    };
    let refusal = |port: u16, h: &protocol::Hello| {
        let mut s = tls_client(dir.path(), port);
        protocol::send_json(&mut s, Kind::Hello, h).unwrap();
        match protocol::expect(&mut s, Kind::HelloAck) {
            Err(protocol::ProtocolError::Peer(reason)) => reason,
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    };
    let (dst, port) = receiver(dir.path());
    let reason = refusal(port, &hello(254, 128 << 20));
    assert!(reason.contains("per host CPU"), "{reason}");
    let reason = refusal(port, &hello(1, 1 << 40));
    assert!(reason.contains("does not fit this host"), "{reason}");
    assert!(reason.contains("memory"), "{reason}");
    // Still listening: nothing was set up for those.
    let reason = refusal(port, &hello(1, (128 << 20) + 4096));
    assert!(reason.contains("whole number of MiB"), "{reason}");
    drop(dst);

    let (mut dst, port) = receiver_with(dir.path(), &[]);
    let reason = refusal(port, &hello(1, 128 << 20));
    assert!(reason.contains("--shared-storage-root"), "{reason}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(dst.running(), "{}", dst.stderr());
}

/// A Hello whose id names a directory in use under `--dir` is refused,
/// and neither that refusal nor the next receiver's cleanup deletes it;
/// nor is an offer that does not fit the destination's disk accepted.
#[test]
fn an_id_collision_deletes_nothing() {
    if !kvm_available("an_id_collision_deletes_nothing") {
        return;
    }
    let dir = tempdir();
    let base = dir.path().join("incoming");
    let running = base.join("abcd0123");
    std::fs::create_dir_all(&running).unwrap();
    std::fs::write(running.join("drive0-d0.img"), b"a running guest's disk").unwrap();
    let offer = |sizes: Vec<u64>| protocol::StorageOffer {
        files: vec!["kernel".into(), "drive0-d0.img".into(), "vm.json".into()],
        sizes,
        data_bytes: None,
        mounted_share: false,
    };
    let base_arg = base.to_str().unwrap().to_string();
    let (mut dst, port) = receiver_with(dir.path(), &["--dir", &base_arg]);
    for (id, sizes, want) in [
        ("abcd0123", vec![1, 2, 3], "already in use"),
        ("abcd4567", vec![1, 2], "2 sizes for 3 files"),
    ] {
        let mut s = tls_client(dir.path(), port);
        protocol::send_json(
            &mut s,
            Kind::Hello,
            &protocol::Hello {
                protocol: protocol::PROTOCOL_VERSION,
                migration_id: id.into(),
                vcpus: 1,
                memory_size: 128 << 20,
                cpuid: vec![],
                storage: Some(offer(sizes)),
                net_ids: vec![],
                connections: 1,
            },
        )
        .unwrap();
        match protocol::expect(&mut s, Kind::HelloAck) {
            Err(protocol::ProtocolError::Peer(reason)) => {
                assert!(reason.contains(want), "{reason}")
            }
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
    }
    assert!(dst.running(), "{}", dst.stderr());
    let names: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("abcd0123")]);
    drop(dst);
    // The next receiver's cleanup leaves it alone too. An offer too big for
    // the disk is refused before anything is created (and, as any failed
    // set-up after a handshake, ends the receiver).
    let (mut again, port) = receiver_with(dir.path(), &["--dir", &base_arg]);
    assert_eq!(
        std::fs::read(running.join("drive0-d0.img")).unwrap(),
        b"a running guest's disk"
    );
    let mut s = tls_client(dir.path(), port);
    protocol::send_json(
        &mut s,
        Kind::Hello,
        &protocol::Hello {
            protocol: protocol::PROTOCOL_VERSION,
            migration_id: "abcd89ab".into(),
            vcpus: 1,
            memory_size: 128 << 20,
            cpuid: vec![],
            storage: Some(offer(vec![1 << 62, 1 << 62, 1])),
            net_ids: vec![],
            connections: 1,
        },
    )
    .unwrap();
    match protocol::expect(&mut s, Kind::HelloAck) {
        Err(protocol::ProtocolError::Peer(reason)) => {
            assert!(reason.contains("destination disk full"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert_eq!(again.wait_exit(Duration::from_secs(10)).code(), Some(1));
    let names: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("abcd0123")]);
}

/// `--insecure` on both ends: plaintext, and still a whole migration.
#[test]
fn insecure_mode_migrates_in_plaintext() {
    if !kvm_available("insecure_mode_migrates_in_plaintext") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver_insecure(dir.path());
    assert!(
        dst.stderr().contains("plaintext and unauthenticated"),
        "{}",
        dst.stderr()
    );
    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let dest = format!("127.0.0.1:{port}");
    // Without saying so, the source refuses too.
    let (status, body) = ferry::api::client::request(
        src.api_sock.as_ref().unwrap(),
        "PUT",
        "/migration/send",
        Some(&serde_json::json!({"destination": dest})),
    )
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("tls_dir")
            && body["error"].as_str().unwrap().contains("insecure"),
        "{body}"
    );
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": dest, "insecure": true}),
    );
    assert_eq!(status, 200, "{body}");
    continues_at(&mut src, &dst);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}

/// Certificates from another CA, for another name, or expired; a client the
/// receiver does not allow; a plaintext source at a TLS receiver: each is
/// refused with a reason on both sides, the source's guest runs on, and a
/// receiver that was merely picky still takes the next real migration.
#[test]
fn tls_refusals_are_clear_on_both_sides_and_the_source_runs_on() {
    if !kvm_available("tls_refusals_are_clear_on_both_sides_and_the_source_runs_on") {
        return;
    }
    let dir = tempdir();
    let good = tls_dir(dir.path());
    let ca = ferry::migration::transport::CertAuthority::load(&dir.path().join("tls")).unwrap();
    // Same CA, wrong name: the source dials 127.0.0.1.
    let wrong_name = dir.path().join("wrong-name");
    ca.write_host_dir(&wrong_name, &ca.issue("elsewhere.example").unwrap())
        .unwrap();
    // Same CA, right name, expired yesterday.
    let expired = dir.path().join("expired");
    let now = time::OffsetDateTime::now_utc();
    ca.write_host_dir(
        &expired,
        &ca.issue_valid(
            "127.0.0.1",
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap(),
    )
    .unwrap();
    // Another CA altogether.
    let other_ca = tls_init(&dir.path().join("other"), &["127.0.0.1"]).remove(0);
    // Trusts the right CA, but its own certificate is from the other one.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(good.join("ca.pem"), mixed.join("ca.pem")).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(other_ca.join(f), mixed.join(f)).unwrap();
    }

    let src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=1 ok");
    let attempt = |port: u16, body: serde_json::Value| -> String {
        let mut body = body;
        body["destination"] = format!("127.0.0.1:{port}").into();
        let (status, reply) = send(&src, body);
        assert_eq!(status, 200, "{reply}");
        let st = wait_status(&src, |s| s["phase"] == "failed");
        eprintln!("source: {}", st["error"]);
        let (_, vm) = src.api("GET", "/vm");
        assert_eq!(vm["state"], "Running");
        st["error"].as_str().unwrap().to_string()
    };
    let wait_refusal = |dst: &Ferry, want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let err = dst.stderr();
            // Whole lines only: stderr may be read halfway through one.
            let whole = err.split_inclusive('\n').filter(|l| l.ends_with('\n'));
            if let Some(line) = whole
                .map(str::trim_end)
                .find(|l| l.contains("refused a connection"))
            {
                eprintln!("destination: {line}");
                assert!(line.contains(want), "wanted {want:?}: {err}");
                return;
            }
            assert!(Instant::now() < deadline, "no refusal logged: {err}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };

    // The destination's certificate is the problem: the source says which.
    for (dst_tls, src_tls, src_says, dst_says) in [
        (
            &other_ca,
            &good,
            "not signed by the CA in our ca.pem",
            "does not accept our certificate",
        ),
        (
            &wrong_name,
            &good,
            "does not name the host or IP we dialled",
            "does not accept our certificate",
        ),
        (
            &expired,
            &good,
            "its certificate has expired",
            "our certificate has expired",
        ),
        // The source's certificate is from another CA: the receiver says so.
        (
            &good,
            &mixed,
            "does not accept our certificate",
            "not signed by the CA in our ca.pem",
        ),
    ] {
        let sub = tempdir();
        let (mut dst, port) = receiver_with(sub.path(), &["--tls-dir", dst_tls.to_str().unwrap()]);
        let err = attempt(port, serde_json::json!({"tls_dir": src_tls}));
        assert!(
            err.contains("TLS handshake") && err.contains(src_says),
            "{src_says}: {err}"
        );
        wait_refusal(&dst, dst_says);
        assert!(dst.running(), "the receiver gave up: {}", dst.stderr());
        drop(dst);
    }

    // A receiver that allows another client, and then a plaintext source.
    let (mut dst, port) = receiver_with(
        dir.path(),
        &[
            "--tls-dir",
            good.to_str().unwrap(),
            "--allow-client",
            "10.9.9.9",
            "--allow-client",
            "source.example",
        ],
    );
    let err = attempt(port, serde_json::json!({"tls_dir": good}));
    assert!(
        err.contains("names none of the clients") && err.contains("--allow-client 10.9.9.9"),
        "{err}"
    );
    wait_refusal(&dst, "names none of the clients");
    let err = attempt(port, serde_json::json!({"insecure": true}));
    assert!(err.contains("takes only TLS migrations"), "{err}");
    let deadline = Instant::now() + WAIT;
    while !dst.stderr().contains("takes only TLS") {
        assert!(Instant::now() < deadline, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dst.running(), "{}", dst.stderr());
    assert_source_runs_on(&src);
    drop(dst);

    // An allowed client name gets through the same kind of receiver.
    let sub = tempdir();
    let (dst, port) = receiver_with(
        sub.path(),
        &[
            "--tls-dir",
            good.to_str().unwrap(),
            "--allow-client",
            "127.0.0.1",
            "--shared-storage-root",
            "/",
        ],
    );
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": format!("127.0.0.1:{port}"), "tls_dir": good}),
    );
    assert_eq!(status, 200, "{body}");
    let mut src = src;
    continues_at(&mut src, &dst);
}

/// Peers that connect and say nothing, hang up, or trickle a byte a second
/// never hold up a real migration started meanwhile, and each is dropped
/// within the handshake deadline.
#[test]
fn a_trickling_peer_does_not_block_a_real_migration() {
    if !kvm_available("a_trickling_peer_does_not_block_a_real_migration") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let addr = format!("127.0.0.1:{port}");
    // Hangs up at once.
    drop(TcpStream::connect(&addr).unwrap());
    // Trickles the start of a TLS ClientHello, one byte a second.
    let trickler = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            let started = Instant::now();
            let hello = [
                0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            for b in hello.iter().cycle().take(30) {
                if s.write_all(&[*b]).is_err() {
                    return Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            None
        })
    };
    // Silent, holding its connection open.
    let _silent = TcpStream::connect(&addr).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let t0 = Instant::now();
    let (status, body) = start_migration(&src, &addr, None);
    assert_eq!(status, 200, "{body}");
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    eprintln!("migrated in {:?} past the trickler", t0.elapsed());
    let before = last_pass(&src);
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(&dst);
    // The trickler was cut off by the deadline, not by the byte count.
    let cut = trickler.join().unwrap();
    let cut = cut.expect("the trickling peer was never dropped");
    assert!(
        cut < Duration::from_secs(20),
        "dropped only after {cut:?}: {}",
        dst.stderr()
    );
    assert!(
        dst.stderr()
            .contains("did not complete the TLS handshake in time"),
        "{}",
        dst.stderr()
    );
}

/// Plain NFSv3 to a migration's share, through a proxy that speaks for
/// `access` (TLS with the channel's certificate, then the secret): what an
/// independent NFS client could do with this migration's own credentials.
/// Returns the proxy's port.
fn share_proxy(share: std::net::SocketAddr, access: ferry::migration::share::ShareAccess) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let (config, name) = access.tls.unwrap();
            let secret = access.secret.unwrap();
            loop {
                let Ok((mut plain, _)) = listener.accept().await else {
                    return;
                };
                let (config, name) = (config.clone(), name.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let Ok(tcp) = tokio::net::TcpStream::connect(share).await else {
                        return;
                    };
                    let Ok(mut tls) = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                    else {
                        return;
                    };
                    if tls.write_all(&secret).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut plain, &mut tls).await;
                });
            }
        });
    });
    port
}

/// `the_share_refuses_files_that_were_not_announced` (tests/storage_migration.rs)
/// asks this of a plain client on the source's address, which a TLS share
/// no longer lets in at all: here an independent client (libnfs-utils)
/// holds the migration's own certificate and secret, as a hostile but
/// authenticated source would, and may still create only the announced
/// files, each up to its size, owner-only; a cancel removes them.
#[test]
fn an_authenticated_peer_writes_only_the_announced_files_into_the_share() {
    let test = "an_authenticated_peer_writes_only_the_announced_files_into_the_share";
    if !kvm_available(test) {
        return;
    }
    if Command::new("nfs-cp").arg("--help").output().is_err() {
        skip_unless_required(test, in_ci(), "nfs-cp (libnfs-utils) is not installed");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let base = dir.path().join("incoming");
    std::fs::create_dir_all(&base).unwrap();
    let base_arg = base.to_str().unwrap().to_string();
    let (mut dst, port) = receiver_with(dir.path(), &["--dir", &base_arg]);
    let kernel_size = std::fs::metadata(TESTKERNEL).unwrap().len();
    let mut s = tls_client(dir.path(), port);
    protocol::send_json(
        &mut s,
        Kind::Hello,
        &protocol::Hello {
            protocol: protocol::PROTOCOL_VERSION,
            migration_id: "abcdef01".into(),
            vcpus: 1,
            memory_size: 128 << 20,
            cpuid: vec![],
            storage: Some(protocol::StorageOffer {
                files: vec!["kernel".into(), "drive0-d0.img".into(), "vm.json".into()],
                sizes: vec![kernel_size, 1 << 20, 512],
                data_bytes: None,
                mounted_share: false,
            }),
            net_ids: vec![],
            connections: 1,
        },
    )
    .unwrap();
    let ack: HelloAck = protocol::parse_json(
        Kind::HelloAck,
        &protocol::expect(&mut s, Kind::HelloAck).unwrap(),
    )
    .unwrap();
    let offer = ack.share.expect("no share offered");
    let export = offer.export.clone().unwrap();
    let share = std::net::SocketAddr::from(([127, 0, 0, 1], offer.nfs_port.unwrap()));
    let id = TlsIdentity::load(&tls_dir(dir.path())).unwrap();
    let access = ferry::migration::share::ShareAccess::for_offer(
        &offer,
        &ferry::migration::transport::Security::Tls(std::sync::Arc::new(id)),
        &format!("127.0.0.1:{port}"),
    )
    .unwrap();
    let proxy = share_proxy(share, access);
    let q = format!("?version=3&nfsport={proxy}&mountport={proxy}");
    let nfs_cp = |local: &Path, name: &str| {
        Command::new("timeout")
            .args([
                "20",
                "nfs-cp",
                local.to_str().unwrap(),
                &format!("nfs://127.0.0.1{export}/{name}{q}"),
            ])
            .output()
            .unwrap()
    };
    let copy_dir = base.join(&offer.dir_name);

    // The announced files go in, owner-only.
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0x11u8; 1 << 20]).unwrap();
    for (local, name) in [(Path::new(TESTKERNEL), "kernel"), (&disk, "drive0-d0.img")] {
        let cp = nfs_cp(local, name);
        assert!(cp.status.success(), "{name}: {cp:?}");
    }
    // Another name cannot be created.
    let local = dir.path().join("evil.img");
    std::fs::write(&local, vec![0xeeu8; 64 << 10]).unwrap();
    let cp = nfs_cp(&local, "evil.img");
    assert!(!cp.status.success(), "{cp:?}");
    assert!(!copy_dir.join("evil.img").exists());
    // An announced name takes no more than its announced size.
    let cp = nfs_cp(&local, "vm.json");
    assert!(!cp.status.success(), "{cp:?}");
    // Created, then refused on the write (not on the name).
    assert!(
        String::from_utf8_lossy(&cp.stderr).contains("write"),
        "{cp:?}"
    );
    if let Ok(meta) = std::fs::metadata(copy_dir.join("vm.json")) {
        assert!(meta.len() < 64 << 10, "vm.json grew to {}", meta.len());
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&copy_dir), 0o700);
    assert_eq!(mode(&copy_dir.join("drive0-d0.img")), 0o600);
    assert_eq!(mode(&copy_dir.join("kernel")), 0o600);

    // The source gives up: the destination removes the copy.
    protocol::send_json(
        &mut s,
        Kind::Error,
        &protocol::Reason {
            reason: "the migration was cancelled on the source".into(),
        },
    )
    .unwrap();
    assert!(!dst.wait_exit(WAIT).success());
    let names: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

/// Issue 10, image locks: on shared storage both ferries open the same
/// image. The destination builds without the lock, the source lets go once
/// the guest is paused and the destination is ready, and the destination
/// holds it from its start on, so a third VM is kept out throughout.
#[test]
fn shared_image_lock_moves_with_the_guest() {
    if !kvm_available("shared_image_lock_moves_with_the_guest") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("shared.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let mut cfg = config(1, 128, "testkernel.workload=idle");
    cfg["drives"] = serde_json::json!([{ "id": "d0", "path": image }]);
    let (mut dst, port) = receiver(dir.path());
    let mut src = Ferry::run(dir.path(), &cfg);
    src.wait_line(WAIT, |l| l == "testkernel: tick 1");

    let intruder = |name: &str| {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let mut f = Ferry::run(&sub, &cfg);
        let status = f.wait_exit(WAIT);
        (status.code(), f.stderr())
    };
    let (code, err) = intruder("before");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("in use by"), "{err}");

    let (status, body) = start_migration(&src, &format!("127.0.0.1:{port}"), None);
    assert_eq!(status, 200, "{body}");
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let last: u64 = src
        .lines()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("testkernel: tick ")?.parse().ok())
        .unwrap();
    let (_, line) = dst.wait_line_from(0, WAIT, |l| l.starts_with("testkernel: tick "));
    let next: u64 = line["testkernel: tick ".len()..].parse().unwrap();
    assert_eq!(next, last + 1, "{:?} {}", dst.lines(), dst.stderr());
    dst.wait_api(WAIT);
    let (_, vm) = dst.api("GET", "/vm");
    assert_eq!(vm["state"], "Running");

    // The source is gone; the destination holds the image now.
    let (code, err) = intruder("after");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("in use by"), "{err}");
    assert!(err.contains(image.to_str().unwrap()), "{err}");
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}

// ---- memory over several connections (issue 11: connections=N) ----

/// A real source with `connections: 4` over TLS: three extra connections
/// join the destination's listener for this migration, and the guest
/// carries on verifying its memory there.
#[test]
fn a_dirty_guest_migrates_over_four_connections_over_tls() {
    if !kvm_available("a_dirty_guest_migrates_over_four_connections_over_tls") {
        return;
    }
    let dir = tempdir();
    let (mut dst, port) = receiver(dir.path());
    let mut src = Ferry::run(
        dir.path(),
        &config(2, 512, "testkernel.workload=dirty testkernel.dirty_mib=128"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = send(
        &src,
        serde_json::json!({
            "destination": format!("127.0.0.1:{port}"),
            "connections": 4,
        }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connections"], 4, "{body}");
    let exit = src.wait_exit(WAIT);
    assert!(exit.success(), "{exit:?} {}", src.stderr());
    let before = last_pass(&src);
    no_fail(&src);
    assert!(
        dst.stderr().contains("taking 3 extra memory connections"),
        "{}",
        dst.stderr()
    );
    assert!(
        !dst.stderr().contains("refused a memory connection"),
        "{}",
        dst.stderr()
    );
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 3));
    no_fail(&dst);
    assert!(!dst
        .lines()
        .iter()
        .any(|l| l.starts_with("testkernel: booted")));
    dst.wait_api(WAIT);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success(), "{}", dst.stderr());
}

/// `connections` out of range is refused by the API, and by a receiver
/// that is sent such a Hello.
#[test]
fn connections_out_of_range_are_refused() {
    if !kvm_available("connections_out_of_range_are_refused") {
        return;
    }
    let dir = tempdir();
    let src = Ferry::run(dir.path(), &config(1, 128, "testkernel.workload=idle"));
    src.wait_api(WAIT);
    for n in [0, 9, 1000] {
        let (status, body) = send(
            &src,
            serde_json::json!({"destination": "127.0.0.1:1", "connections": n}),
        );
        assert_eq!(status, 400, "{n}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("\"connections\""),
            "{body}"
        );
    }
    let (mut dst, port) = receiver(dir.path());
    let mut hello = forged_hello(&serde_json::json!({"vcpus": [0], "memory_size": 128u64 << 20}));
    hello.connections = 9;
    let mut s = tls_client(dir.path(), port);
    protocol::send_json(&mut s, Kind::Hello, &hello).unwrap();
    match protocol::expect(&mut s, Kind::HelloAck) {
        Err(protocol::ProtocolError::Peer(reason)) => {
            assert!(reason.contains("memory connections"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    assert!(dst.running(), "{}", dst.stderr());
}

/// What a forged source does wrong on its memory connection 1.
#[derive(Clone, Copy, PartialEq)]
enum LaneFault {
    None,
    /// Leaves out its `k`th data frame, and seals honestly what it sent.
    Skip(usize),
    /// Its `k`th data frame is lost on the way: the seal counts it.
    Lose(usize),
    /// Its first data frame goes over the channel instead.
    Misplace,
}

/// The memory of a forged source with `n` connections: one stream per
/// connection, the stripes of each on its own, lane 0 (the channel) ending
/// with PassEnd and its Seal, the others with their Seal.
fn forged_lanes(
    memory: &std::fs::File,
    size: u64,
    nonce: &str,
    n: u32,
    fault: LaneFault,
) -> Vec<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = protocol::STRIPE as usize;
    let zero = [0u8; 4096];
    let mut w: Vec<_> = (0..n)
        .map(|i| {
            let mut w = protocol::DigestWriter::new(Vec::new());
            w.start_digest(&protocol::lane_nonce(nonce, i));
            w
        })
        .collect();
    let mut buf = vec![0u8; CHUNK];
    let mut lane1_data = 0;
    let mut lost = None;
    let mut misplaced = None;
    for off in (0..size).step_by(CHUNK) {
        memory.read_exact_at(&mut buf, off).unwrap();
        let lane = protocol::stripe_owner(off, n) as usize;
        let is_zero = |p: usize| buf[p * 4096..(p + 1) * 4096] == zero[..];
        let pages = CHUNK / 4096;
        let mut i = 0;
        while i < pages {
            let z = is_zero(i);
            let mut j = i + 1;
            while j < pages && is_zero(j) == z {
                j += 1;
            }
            let gpa = off + (i * 4096) as u64;
            if z {
                let count = (j - i) as u64;
                protocol::send_frame(
                    &mut w[lane],
                    Kind::ZeroPages,
                    &[&gpa.to_le_bytes(), &count.to_le_bytes()],
                )
                .unwrap();
            } else {
                let mut frame = Vec::new();
                protocol::send_frame(
                    &mut frame,
                    Kind::MemoryPages,
                    &[&gpa.to_le_bytes(), &buf[i * 4096..j * 4096]],
                )
                .unwrap();
                let k = if lane == 1 { Some(lane1_data) } else { None };
                match (fault, k) {
                    (LaneFault::Skip(s), Some(k)) if s == k => {}
                    (LaneFault::Lose(s), Some(k)) if s == k => {
                        let at = w[1].get_ref().len();
                        w[1].write_all(&frame).unwrap();
                        lost = Some(at..at + frame.len());
                    }
                    (LaneFault::Misplace, Some(0)) => misplaced = Some(frame),
                    _ => w[lane].write_all(&frame).unwrap(),
                }
                if lane == 1 {
                    lane1_data += 1;
                }
            }
            i = j;
        }
    }
    assert!(lane1_data > 0, "the guest has no data in lane 1's stripes");
    if let Some(frame) = misplaced {
        w[0].write_all(&frame).unwrap();
    }
    protocol::send_json(&mut w[0], Kind::PassEnd, &protocol::PassEnd { pass: 1 }).unwrap();
    let mut out: Vec<Vec<u8>> = Vec::new();
    for mut lane in w {
        let seal = lane.seal().unwrap();
        protocol::send_json(&mut lane, Kind::Seal, &seal).unwrap();
        out.push(std::mem::take(lane.get_mut()));
    }
    if let Some(r) = lost {
        out[1].drain(r);
    }
    out
}

/// Joins the destination's memory listener as connection `index` with
/// `secret`; returns the connection, or the destination's reason.
fn join_lane(
    dir: &Path,
    offer: &protocol::LaneOffer,
    id: &str,
    index: u32,
    secret: &str,
) -> Result<Channel, String> {
    let mut s = tls_client(dir, offer.port);
    protocol::send_json(
        &mut s,
        Kind::Join,
        &protocol::Join {
            migration_id: id.into(),
            index,
            secret: secret.into(),
        },
    )
    .unwrap();
    match protocol::expect(&mut s, Kind::Joined) {
        Ok(_) => Ok(s),
        Err(protocol::ProtocolError::Peer(reason)) => Err(reason),
        Err(e) => Err(e.to_string()),
    }
}

/// A forged source with two connections: Hello, then `strangers` (given
/// the lane offer) before the real join, the memory of `fault`, the state,
/// Go. Returns the destination's reason if it refused.
fn forge_two_lanes(
    dir: &Path,
    port: u16,
    memory: &std::fs::File,
    state: &serde_json::Value,
    fault: LaneFault,
    strangers: impl FnOnce(&protocol::LaneOffer, &str),
) -> Result<(), String> {
    let mut hello = forged_hello(state);
    hello.connections = 2;
    let mut s = tls_client(dir, port);
    s.set_read_timeout(Some(WAIT)).unwrap();
    protocol::send_json(&mut s, Kind::Hello, &hello).unwrap();
    let ack: HelloAck = protocol::expect(&mut s, Kind::HelloAck)
        .and_then(|p| protocol::parse_json(Kind::HelloAck, &p))
        .map_err(|e| e.to_string())?;
    let offer = ack.lanes.clone().expect("a lane offer for two connections");
    strangers(&offer, &ack.migration_id);
    let mut lane = join_lane(dir, &offer, &ack.migration_id, 1, &offer.secret)?;
    let size = state["memory_size"].as_u64().unwrap();
    let streams = forged_lanes(memory, size, &ack.nonce, 2, fault);
    // The channel first: its Seal then waits for the lane's, so that a
    // refusal comes after the channel's bytes are all written and the
    // reason can be read.
    s.write_all(&streams[0]).unwrap();
    s.flush().unwrap();
    let _ = lane.write_all(&streams[1]);
    let _ = lane.flush();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    match protocol::expect(&mut s, Kind::Ready) {
        Err(protocol::ProtocolError::Peer(reason)) => return Err(reason),
        Err(protocol::ProtocolError::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        Err(e) => return Err(e.to_string()),
        Ok(_) => panic!("Ready before the state"),
    }
    s.set_read_timeout(Some(WAIT)).unwrap();
    protocol::send_json(&mut s, Kind::State, state).unwrap();
    match protocol::expect(&mut s, Kind::Ready) {
        Ok(_) => {}
        Err(protocol::ProtocolError::Peer(reason)) => return Err(reason),
        Err(e) => panic!("no Ready: {e}"),
    }
    protocol::send_json(&mut s, Kind::Go, &serde_json::json!({})).unwrap();
    protocol::expect(&mut s, Kind::Resumed).map_err(|e| e.to_string())?;
    Ok(())
}

/// Strangers at the memory listener: a wrong secret, a lane number that
/// does not exist, a connection that opens and says nothing, another CA's
/// certificate. Each is refused (the talking ones are told why) and the
/// migration completes over its real two connections.
#[test]
fn a_bogus_extra_connection_is_refused_and_the_migration_completes() {
    if !kvm_available("a_bogus_extra_connection_is_refused_and_the_migration_completes") {
        return;
    }
    let dir = tempdir();
    let (state, memory) = forgery(dir.path(), &dir.path().join("disk.img"));
    let (mut dst, port) = receiver(dir.path());
    let other_ca = dir.path().join("other-ca");
    ferry::migration::transport::tls_init(&other_ca, &["127.0.0.1".into()]).unwrap();
    let mut silent = None;
    forge_two_lanes(
        dir.path(),
        port,
        &memory,
        &state,
        LaneFault::None,
        |offer, id| {
            silent = Some(TcpStream::connect(("127.0.0.1", offer.port)).unwrap());
            let wrong = "ab".repeat(32);
            let why = join_lane(dir.path(), offer, id, 1, &wrong)
                .err()
                .expect("refused");
            assert!(why.contains("wrong secret"), "{why}");
            let why = join_lane(dir.path(), offer, id, 5, &offer.secret)
                .err()
                .expect("refused");
            assert!(why.contains("does not exist"), "{why}");
            let why = join_lane(dir.path(), offer, "f0f0ab", 1, &offer.secret)
                .err()
                .expect("refused");
            assert!(why.contains("joins migration"), "{why}");
            let id2 = TlsIdentity::load(&other_ca.join("127.0.0.1")).unwrap();
            let tcp = TcpStream::connect(("127.0.0.1", offer.port)).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let refused = Channel::connect(tcp, &id2, peer_name("127.0.0.1").unwrap(), deadline)
                .and_then(|mut c| {
                    protocol::send_json(
                        &mut c,
                        Kind::Join,
                        &protocol::Join {
                            migration_id: id.into(),
                            index: 1,
                            secret: offer.secret.clone(),
                        },
                    )
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                    c.flush()?;
                    protocol::expect(&mut c, Kind::Joined)
                        .map_err(|e| std::io::Error::other(e.to_string()))
                });
            assert!(refused.is_err(), "another CA's client joined");
        },
    )
    .unwrap();
    let stderr = dst.stderr();
    assert!(stderr.contains("wrong secret"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= 4));
    no_fail(&dst);
    drop(silent);
    dst.wait_api(WAIT);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success(), "{}", dst.stderr());
}

/// One connection of two misses a frame (sealed honestly, or lost on the
/// way so that its seal does not match), or carries a stripe that is not
/// its own: each stream is refused before the state is taken.
#[test]
fn a_stream_missing_a_frame_on_one_connection_is_refused() {
    if !kvm_available("a_stream_missing_a_frame_on_one_connection_is_refused") {
        return;
    }
    let dir = tempdir();
    let (state, memory) = forgery(dir.path(), &dir.path().join("disk.img"));
    for (fault, want) in [
        (LaneFault::Skip(0), "never sent nor declared zero"),
        (LaneFault::Lose(0), "memory connection 1"),
        (
            LaneFault::Misplace,
            "not within one stripe of memory connection 0",
        ),
    ] {
        let (mut dst, port) = receiver(dir.path());
        let reason =
            forge_two_lanes(dir.path(), port, &memory, &state, fault, |_, _| {}).expect_err(want);
        assert!(reason.contains(want), "wanted {want:?}: {reason}");
        let status = dst.wait_exit(Duration::from_secs(10));
        assert_eq!(status.code(), Some(1), "{}", dst.stderr());
        assert!(dst.stderr().contains(want), "{}", dst.stderr());
        assert!(
            !dst.stderr().contains("the guest runs here"),
            "{}",
            dst.stderr()
        );
    }
}

/// The source resolves the destination's name itself, on its migration
/// thread before that thread narrows to its seccomp list: glibc's resolver
/// asks nscd over a Unix socket, reads /etc/hosts, and sends DNS queries
/// over UDP with `sendmmsg` (which killed the whole source, guest and all,
/// before it was allowed). A name that does not resolve fails the
/// migration clearly and the guest runs on; a name from /etc/hosts
/// migrates.
#[test]
fn destinations_by_name_resolve_under_the_filters() {
    if !kvm_available("destinations_by_name_resolve_under_the_filters") {
        return;
    }
    let dir = tempdir();
    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": "no-such-host.invalid:7777", "insecure": true}),
    );
    assert_eq!(status, 200, "{body}");
    let failed = wait_status(&src, |s| s["phase"] == "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("cannot resolve no-such-host.invalid:7777"),
        "{failed}"
    );
    assert!(src.running(), "{}", src.stderr());
    assert_source_runs_on(&src);

    // The receiver listens where "localhost" resolves first, as the
    // source will connect.
    let sock = dir.path().join("dst.sock");
    let mut dst = Ferry::spawn(&[
        "receive",
        "--listen",
        "localhost:0",
        "--insecure",
        "--shared-storage-root",
        "/",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    dst.api_sock = Some(sock);
    let deadline = Instant::now() + WAIT;
    let port = loop {
        let err = dst.stderr();
        if let Some(rest) = err.split("waiting for a migration on ").nth(1) {
            let addr = rest.lines().next().unwrap();
            break addr.rsplit(':').next().unwrap().trim().to_string();
        }
        assert!(Instant::now() < deadline && dst.running(), "{err}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": format!("localhost:{port}"), "insecure": true}),
    );
    assert_eq!(status, 200, "{body}");
    continues_at(&mut src, &dst);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}

/// Removes a namespace's own /etc files (`ip netns exec` mounts
/// /etc/netns/NS/* over /etc) when dropped, also when the test fails.
struct NetnsEtc(std::path::PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A name with several addresses: glibc sorts them (RFC 3484), which opens
/// a netlink socket and binds it, and connects a UDP socket to each; the
/// migration thread resolves before it narrows, under the event loop's
/// list, which allows that (a name with an IPv6 and an IPv4 address was
/// killed there before). The source then tries each address in turn: the
/// source host's own ::1 refuses, the destination answers.
#[test]
fn a_destination_name_with_several_addresses_migrates_to_the_one_that_answers() {
    if !kvm_available("a_destination_name_with_several_addresses") {
        return;
    }
    let Some(hosts) = TwoHosts::create("a_destination_name_with_several_addresses") else {
        return;
    };
    let etc = NetnsEtc(std::path::PathBuf::from(format!(
        "/etc/netns/{}",
        hosts.ns('a')
    )));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(
        etc.0.join("hosts"),
        format!(
            "127.0.0.1 localhost\n::1 ferry-dst\n{} ferry-dst\n",
            hosts.ip_b
        ),
    )
    .unwrap();
    let dir = tempdir();
    let dst_sock = dir.path().join("dst.sock");
    let listen = format!("{}:7777", hosts.ip_b);
    let mut dst = hosts.ferry(
        'b',
        &[
            "receive",
            "--listen",
            &listen,
            "--insecure",
            "--shared-storage-root",
            "/",
            "--api-sock",
            dst_sock.to_str().unwrap(),
        ],
    );
    dst.api_sock = Some(dst_sock);
    let deadline = Instant::now() + WAIT;
    while !dst.stderr().contains("waiting for a migration") {
        assert!(
            Instant::now() < deadline && dst.running(),
            "{}",
            dst.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let cfg = write_config(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    let src_sock = dir.path().join("src.sock");
    let mut src = hosts.ferry(
        'a',
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--api-sock",
            src_sock.to_str().unwrap(),
        ],
    );
    src.api_sock = Some(src_sock);
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": "ferry-dst:7777", "insecure": true, "storage": "shared"}),
    );
    assert_eq!(status, 200, "{body}");
    continues_at(&mut src, &dst);
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}

/// A guest restored from a snapshot migrates, and a guest that arrived by
/// migration migrates onward (a second hop): the state they carry holds
/// the CPUID Ferry set, not what this host's KVM reads back (its PVM
/// reports features, AVX among them, that it does not offer as supported,
/// and the destination's CPU check refused them).
#[test]
fn a_restored_guest_and_a_received_guest_migrate_onward() {
    if !kvm_available("a_restored_guest_and_a_received_guest_migrate_onward") {
        return;
    }
    let dir = tempdir();
    let tls = tls_dir(dir.path());
    let sub = |name: &str| {
        let p = dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let mut first = Ferry::run(
        &sub("first"),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    first.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let snap = dir.path().join("snap");
    let (code, body) = ferry::api::client::request(
        first.api_sock.as_ref().unwrap(),
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({ "dir": snap })),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    first.api("PUT", "/vm/shutdown");
    assert!(first.wait_exit(WAIT).success(), "{}", first.stderr());

    let sock = sub("restored").join("api.sock");
    let mut restored = Ferry::spawn(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    restored.api_sock = Some(sock);
    restored.wait_api(WAIT);
    restored.api("PUT", "/vm/resume");
    restored.wait_line(WAIT, |l| pass_of(l).is_some());

    let mut hop = restored;
    for name in ["hop1", "hop2"] {
        let args = [
            "--tls-dir",
            tls.to_str().unwrap(),
            "--shared-storage-root",
            "/",
        ];
        let (dst, port) = receiver_with(&sub(name), &args);
        let (status, body) = send(
            &hop,
            serde_json::json!({
                "destination": format!("127.0.0.1:{port}"),
                "tls_dir": tls,
            }),
        );
        assert_eq!(status, 200, "{name}: {body}");
        eprintln!("hop {name}");
        continues_at(&mut hop, &dst);
        hop = dst;
    }
    hop.api("PUT", "/vm/shutdown");
    assert!(hop.wait_exit(WAIT).success(), "{}", hop.stderr());
}

/// A peer that opens many connections and stays silent fills only its own
/// share of the pending handshakes: a real source from another address
/// migrates while they are held open (32 of them from one address used to
/// fill every slot).
#[test]
fn silent_connections_from_one_address_do_not_block_a_real_migration() {
    if !kvm_available("silent_connections_from_one_address_do_not_block") {
        return;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // From 127.0.0.2 (loopback takes any 127/8 source address).
    let mut held = Vec::new();
    for _ in 0..40 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let from: std::net::SocketAddr = "127.0.0.2:0".parse().unwrap();
        s.bind(&from.into()).unwrap();
        s.connect(&addr.into()).unwrap();
        held.push(s);
    }
    let deadline = Instant::now() + WAIT;
    while !dst
        .stderr()
        .contains("handshakes from 127.0.0.2 already pending")
    {
        assert!(Instant::now() < deadline, "{}", dst.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, body) = start_migration(&src, &addr.to_string(), None);
    assert_eq!(status, 200, "{body}");
    continues_at(&mut src, &dst);
    drop(held);
    let mut dst = dst;
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success());
}
