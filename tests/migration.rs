//! Live migration between two ferry processes on this machine (loopback),
//! with the disks on shared storage (the same paths).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry::migration::protocol::{self, HelloAck, Kind};

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

/// `PUT /migration/send` with `body`.
fn send(src: &Ferry, body: serde_json::Value) -> (u16, serde_json::Value) {
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

/// A fake destination: answers the source's Hello with `reply`.
fn fake_destination(reply: impl FnOnce(&mut TcpStream, protocol::Hello) + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let hello: protocol::Hello =
                protocol::parse_json(Kind::Hello, &protocol::expect(&mut s, Kind::Hello).unwrap())
                    .unwrap();
            reply(&mut s, hello);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    port
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
            fake_destination(|s, h| {
                let ack = HelloAck {
                    protocol: h.protocol,
                    migration_id: h.migration_id,
                    vcpus: h.vcpus,
                    memory_size: h.memory_size * 2,
                    share: None,
                    nonce: "0123abcd".into(),
                };
                protocol::send_json(s, Kind::HelloAck, &ack).unwrap();
            }),
        ),
        (
            "different VM",
            fake_destination(|s, h| {
                let ack = HelloAck {
                    protocol: h.protocol + 1,
                    migration_id: h.migration_id,
                    vcpus: h.vcpus,
                    memory_size: h.memory_size,
                    share: None,
                    nonce: "0123abcd".into(),
                };
                protocol::send_json(s, Kind::HelloAck, &ack).unwrap();
            }),
        ),
        (
            "not a Ferry migration stream",
            fake_destination(|s, _| {
                s.write_all(b"SSH-2.0-OpenSSH_9.2 definitely not ferry\r\n")
                    .unwrap();
            }),
        ),
        (
            "protocol version",
            fake_destination(|s, _| {
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

    // Random bytes.
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
        let mut s = TcpStream::connect(&addr).unwrap();
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
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let before = last_pass(&src);
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(&dst);
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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
    }
}

/// Sends `hello`, then `memory(nonce)` (up to the Seal), then `state`,
/// and, once the destination is ready, Go. Returns what was sent after the
/// Hello (a recording), or the destination's reason for refusing.
fn forge(
    port: u16,
    hello: &protocol::Hello,
    memory: impl FnOnce(&str) -> Vec<u8>,
    state: &serde_json::Value,
) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
    let reason = forge(port, &hello, |_| recording[..seal_end].to_vec(), &state).unwrap_err();
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
    };
    let refusal = |port: u16, h: &protocol::Hello| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
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
