//! Live migration between two ferry processes on this machine (loopback),
//! with the disks on shared storage (the same paths), over mutual TLS with
//! certificates from `ferry tls-init` (and one test of `--insecure`).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
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
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let before = last_pass(&src);
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(&dst);
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
        ],
    );
    let (status, body) = send(
        &src,
        serde_json::json!({"destination": format!("127.0.0.1:{port}"), "tls_dir": good}),
    );
    assert_eq!(status, 200, "{body}");
    let mut src = src;
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let before = last_pass(&src);
    dst.wait_line(WAIT, |l| pass_of(l).is_some_and(|p| p >= before + 2));
    no_fail(&dst);
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
