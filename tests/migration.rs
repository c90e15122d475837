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
