//! virtio-net end to end (issue 12): a test guest answering ARP, ping and
//! UDP echo on a tap, behind a switch (network namespaces: a bridge in the
//! switch, each host bridging its tap to it, a client on the switch);
//! through snapshot/restore and through live and storage migrations, with
//! a client stream running across the hand-over.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const WAIT: Duration = Duration::from_secs(60);
const PORT: u16 = 7777;

fn net_config(sw: &Switch, workload: &str) -> serde_json::Value {
    let mut cfg = config(
        1,
        128,
        &format!(
            "testkernel.workload={workload} testkernel.net={}/24",
            sw.guest_ip()
        ),
    );
    cfg["net"] = serde_json::json!([{ "id": "n0", "tap": "tap0" }]);
    cfg
}

/// The guest on host `a` with its API socket; waits for its net line.
fn run_on_a(sw: &Switch, dir: &Path, cfg: &serde_json::Value) -> Ferry {
    let path = write_config(dir, cfg);
    let sock = dir.join("src.sock");
    let mut f = sw.ferry(
        'a',
        &[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    f.api_sock = Some(sock);
    let up = f.wait_line(WAIT, |l| {
        l.starts_with("testkernel: net up") || l.contains("net FAIL")
    });
    assert!(up.starts_with("testkernel: net up"), "{up}");
    f
}

fn answers(sw: &Switch, what: &str) {
    let rtts = ping(&sw.ns('c'), &sw.guest_ip(), 3, Duration::from_secs(2));
    assert_eq!(rtts.len(), 3, "{what}: pings answered: {rtts:?}");
    let stream = EchoStream::start(&sw.ns('c'), &sw.guest_ip(), Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(200));
    let r = stream.finish();
    assert!(r.replies() > 0, "{what}: no UDP echo: {r:?}");
    assert_eq!((r.duplicates, r.garbled), (0, 0), "{what}");
}

#[test]
fn guest_answers_arp_ping_and_udp_echo_on_its_tap() {
    let test = "guest_answers_arp_ping_and_udp_echo_on_its_tap";
    if !kvm_available(test) {
        return;
    }
    let Some(sw) = Switch::create(test) else {
        return;
    };
    let dir = tempdir();
    let mut cfg = net_config(&sw, "idle");
    cfg["net"][0]["mac"] = serde_json::json!("02:fe:00:00:00:01");
    let f = run_on_a(&sw, dir.path(), &cfg);
    assert!(
        f.lines()
            .iter()
            .any(|l| l.ends_with("mac=02:fe:00:00:00:01")),
        "{:?}",
        f.lines()
    );
    let rtts = ping(&sw.ns('c'), &sw.guest_ip(), 5, Duration::from_secs(2));
    assert_eq!(rtts.len(), 5, "{rtts:?}");
    eprintln!("ping RTTs to the idle guest: {rtts:?}");
    let stream = EchoStream::start(&sw.ns('c'), &sw.guest_ip(), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(500));
    let r = stream.finish();
    eprintln!(
        "UDP echo every 1 ms: sent {}, answered {}, longest gap {:?}",
        r.sent,
        r.replies(),
        r.longest_gap().0
    );
    assert_eq!((r.duplicates, r.garbled), (0, 0));
    assert!(r.replies() > r.sent / 2, "{} of {}", r.replies(), r.sent);
    // The guest's frames went out through its tap, nowhere else.
    assert!(sw.tap_stat('a', "rx_packets") >= r.replies());
}

#[test]
fn bad_net_config_is_refused_before_the_guest_runs() {
    let test = "bad_net_config_is_refused_before_the_guest_runs";
    if !kvm_available(test) {
        return;
    }
    let Some(sw) = Switch::create(test) else {
        return;
    };
    let dir = tempdir();
    let cases: [(&str, serde_json::Value, &str); 3] = [
        (
            "not a tap",
            serde_json::json!([{ "id": "n0", "tap": "br0" }]),
            "cannot open tap br0",
        ),
        (
            "bad mac",
            serde_json::json!([{ "id": "n0", "tap": "tap0", "mac": "ff:ff:ff:ff:ff:ff" }]),
            "net[0].mac: \"ff:ff:ff:ff:ff:ff\" is a multicast address",
        ),
        (
            "duplicate id",
            serde_json::json!([{ "id": "n0", "tap": "tap0" }, { "id": "n0", "tap": "tap1" }]),
            "net[1].id \"n0\" is a duplicate of net[0].id",
        ),
    ];
    for (what, net, want) in cases {
        let mut cfg = net_config(&sw, "idle");
        cfg["net"] = net;
        let path = write_config(dir.path(), &cfg);
        let mut f = sw.ferry('a', &["run", "--config", path.to_str().unwrap()]);
        let status = f.wait_exit(WAIT);
        assert_eq!(status.code(), Some(2), "{what}: {}", f.stderr());
        assert!(f.stderr().contains(want), "{what}: {}", f.stderr());
        assert!(
            f.lines().is_empty(),
            "{what}: the guest ran: {:?}",
            f.lines()
        );
    }
}

#[test]
fn snapshot_and_restore_keep_answering() {
    let test = "snapshot_and_restore_keep_answering";
    if !kvm_available(test) {
        return;
    }
    let Some(sw) = Switch::create(test) else {
        return;
    };
    let dir = tempdir();
    let f = run_on_a(&sw, dir.path(), &net_config(&sw, "idle"));
    answers(&sw, "before the snapshot");
    let snap = dir.path().join("snap");
    let (status, body) = ferry::api::client::request(
        f.api_sock.as_ref().unwrap(),
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({ "dir": snap })),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let mac = f
        .lines()
        .iter()
        .find_map(|l| Some(l.split("mac=").nth(1)?.to_string()))
        .unwrap();
    drop(f);
    let sock = dir.path().join("restored.sock");
    let mut r = sw.ferry(
        'a',
        &[
            "run",
            "--restore",
            snap.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    r.api_sock = Some(sock);
    r.wait_api(WAIT);
    let (code, _) = r.api("PUT", "/vm/resume");
    assert_eq!(code, 200);
    answers(&sw, "after the restore");
    // The generated address came back with the guest.
    let neigh = std::process::Command::new("ip")
        .args(["-n", &sw.ns('c'), "neigh", "show", &sw.guest_ip()])
        .output()
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_string();
    assert!(neigh.contains(&mac), "{neigh} vs {mac}");
    assert!(r.running(), "{}", r.stderr());
}

struct Hosts {
    sw: Switch,
    dir: tempfile::TempDir,
    tls_a: PathBuf,
    tls_b: PathBuf,
}

impl Hosts {
    fn new(test: &str) -> Option<Hosts> {
        if !kvm_available(test) {
            return None;
        }
        let sw = Switch::create(test)?;
        let dir = tempdir();
        let tls = tls_init(&dir.path().join("tls"), &[&sw.ip('a'), &sw.ip('b')]);
        Some(Hosts {
            sw,
            tls_a: tls[0].clone(),
            tls_b: tls[1].clone(),
            dir,
        })
    }

    fn receiver(&self, extra: &[&str]) -> Ferry {
        let sock = self.dir.path().join("dst.sock");
        let dst_dir = self.dir.path().join("dst");
        std::fs::create_dir_all(&dst_dir).unwrap();
        let listen = format!("{}:{PORT}", self.sw.ip('b'));
        let mut args = vec![
            "receive",
            "--listen",
            listen.as_str(),
            "--dir",
            dst_dir.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
            "--tls-dir",
            self.tls_b.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut f = self.sw.ferry('b', &args);
        f.api_sock = Some(sock);
        let deadline = Instant::now() + WAIT;
        while !f.stderr().contains("waiting for a migration") {
            assert!(Instant::now() < deadline && f.running(), "{}", f.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
        f
    }

    fn migrate(&self, src: &Ferry) {
        let (status, body) = ferry::api::client::request(
            src.api_sock.as_ref().unwrap(),
            "PUT",
            "/migration/send",
            Some(&serde_json::json!({
                "destination": format!("{}:{PORT}", self.sw.ip('b')),
                "tls_dir": self.tls_a,
            })),
        )
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
}

/// Runs the client stream across a migration of `cfg`'s guest from a to b
/// and checks what came back.
fn migrate_with_stream(test: &str, cfg: impl Fn(&Hosts) -> serde_json::Value, ready: &str) {
    let Some(h) = Hosts::new(test) else {
        return;
    };
    let src_dir = h.dir.path().join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    let mut dst = h.receiver(&["--tap", "n0=tap0"]);
    let mut src = run_on_a(&h.sw, &src_dir, &cfg(&h));
    src.wait_line(WAIT, |l| l.contains(ready));
    let rtt_before = ping(&h.sw.ns('c'), &h.sw.guest_ip(), 3, Duration::from_secs(2));
    assert_eq!(rtt_before.len(), 3);
    let stream = EchoStream::start(&h.sw.ns('c'), &h.sw.guest_ip(), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(300));
    let b_before = h.sw.tap_stat('b', "rx_packets");
    h.migrate(&src);
    // The source lingers a while after the hand-over: its status says when.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, s) = src.api("GET", "/migration");
        if s["phase"] == "completed" {
            break;
        }
        assert!(s["phase"] != "failed", "{s}");
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Counted first: every frame after the instant is after the count.
    let b_at_handover = h.sw.tap_stat('b', "rx_packets");
    let handed_over = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let r = stream.finish();
    let b_after = h.sw.tap_stat('b', "rx_packets");
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    let rtt_after = ping(&h.sw.ns('c'), &h.sw.guest_ip(), 3, Duration::from_secs(2));

    let err = src.stderr();
    let downtime = err
        .split("(downtime ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or("?");
    let (gap, gap_start) = r.longest_gap();
    let gap_at = gap_start.map_or(0.0, |g| {
        if g >= handed_over {
            (g - handed_over).as_secs_f64() * 1000.0
        } else {
            -(handed_over - g).as_secs_f64() * 1000.0
        }
    });
    eprintln!(
        "{test}: sent {}, answered {}, lost {} ({} outside the gap), duplicates {}, \
         longest gap {gap:?} from {gap_at:+.1} ms, Ferry's downtime {downtime} ms, ping before {rtt_before:?} \
         after {rtt_after:?}",
        r.sent,
        r.replies(),
        r.sent - r.replies(),
        r.lost_outside_gap(),
        r.duplicates,
    );
    eprintln!(
        "{test}: {} (send errors {})",
        r.describe_losses(handed_over),
        r.send_errors
    );
    let carried = err
        .lines()
        .filter(|l| l.contains("carried in the state"))
        .collect::<Vec<_>>();
    eprintln!("{test}: source: {carried:?}");
    assert_eq!((r.duplicates, r.garbled), (0, 0), "an echo answered twice");
    // The destination announced the guest the moment the source paused
    // (before the state came), not only once it had built it.
    assert!(
        dst.stderr()
            .contains("the source paused: net n0 announced on tap0"),
        "{}",
        dst.stderr()
    );
    assert_eq!(
        b_before, 0,
        "the destination's tap carried guest frames early"
    );
    let after = r.replies_after(handed_over);
    assert!(after > 0, "no echo after the hand-over");
    // Every echo after the hand-over left through the destination's tap
    // (the source's process, and with it its end of tap0 on a, is gone).
    assert!(
        b_after - b_at_handover >= after,
        "{after} echoes after the hand-over, {} frames from the destination",
        b_after - b_at_handover
    );
    assert_eq!(rtt_after.len(), 3, "no ping after the migration");
    assert!(dst.running(), "{}", dst.stderr());
    let lines = dst.lines();
    assert!(!lines.iter().any(|l| l.contains("FAIL")), "{lines:?}");
}

#[test]
fn live_migration_of_a_dirty_guest_keeps_its_network() {
    migrate_with_stream(
        "live_migration_of_a_dirty_guest_keeps_its_network",
        |h| {
            let mut cfg = net_config(&h.sw, "dirty");
            let cmdline = format!(
                "{} testkernel.dirty_mib=8",
                cfg["cmdline"].as_str().unwrap()
            );
            cfg["cmdline"] = serde_json::json!(cmdline);
            cfg
        },
        "dirty pass=2 ok",
    );
}

#[test]
fn storage_migration_of_a_blkwrite_guest_keeps_its_network() {
    migrate_with_stream(
        "storage_migration_of_a_blkwrite_guest_keeps_its_network",
        |h| {
            let image = h.dir.path().join("src").join("disk.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(4 << 20)
                .unwrap();
            let mut cfg = net_config(&h.sw, "blkwrite");
            let cmdline = format!(
                "{} testkernel.blk_blocks=64 testkernel.blk_seed=3",
                cfg["cmdline"].as_str().unwrap()
            );
            cfg["cmdline"] = serde_json::json!(cmdline);
            cfg["drives"] = serde_json::json!([{ "id": "d0", "path": image }]);
            cfg
        },
        "blkwrite round=2",
    );
}

/// Live-migrates an idle guest (its command line plus `extra`) from a to b
/// while capturing ARP and RARP at the client; returns the destination,
/// the guest's MAC, its "net up" line and what was captured from the
/// moment the migration began.
type Migrated = (Hosts, Ferry, [u8; 6], String, bool, Vec<Vec<u8>>);

fn migrate_idle_capturing(test: &str, extra: &str) -> Option<Migrated> {
    let h = Hosts::new(test)?;
    let src_dir = h.dir.path().join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    let mut dst = h.receiver(&["--tap", "n0=tap0"]);
    let mut cfg = net_config(&h.sw, "idle");
    let cmdline = format!("{} {extra}", cfg["cmdline"].as_str().unwrap());
    cfg["cmdline"] = serde_json::json!(cmdline);
    let mut src = run_on_a(&h.sw, &src_dir, &cfg);
    let up = src
        .lines()
        .into_iter()
        .find(|l| l.starts_with("testkernel: net up"))
        .unwrap();
    let mac_s = up.split("mac=").nth(1).unwrap().split(' ').next().unwrap();
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(mac_s.split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap();
    }
    // The device's RARPs at the guest's start are over (100 ms).
    src.wait_line(WAIT, |l| l.starts_with("testkernel: tick 1"));
    let guest_announce = src
        .lines()
        .iter()
        .any(|l| l == "testkernel: net announce=guest");
    let capture = Capture::start(&h.sw.ns('c'));
    h.migrate(&src);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, s) = src.api("GET", "/migration");
        if s["phase"] == "completed" {
            break;
        }
        assert!(s["phase"] != "failed", "{s}");
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(src.wait_exit(WAIT).success(), "{}", src.stderr());
    // Long enough for the device's series (100 ms) or the guest's polls.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until
        && !dst
            .lines()
            .iter()
            .any(|l| l.starts_with("testkernel: net announce"))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let frames = capture.finish().into_iter().map(|(_, f)| f).collect();
    let rtts = ping(&h.sw.ns('c'), &h.sw.guest_ip(), 3, Duration::from_secs(2));
    assert_eq!(rtts.len(), 3, "no ping after the migration");
    assert!(dst.running(), "{}", dst.stderr());
    dst.wait_line(WAIT, |l| l.starts_with("testkernel: tick"));
    Some((h, dst, mac, up, guest_announce, frames))
}

/// A gratuitous ARP: a broadcast ARP request from `mac` for `ip` by `ip`.
fn is_garp(f: &[u8], mac: &[u8; 6], ip: &[u8; 4]) -> bool {
    f.len() >= 42
        && f[0..6] == [0xff; 6]
        && f[6..12] == *mac
        && f[12..14] == [0x08, 0x06]
        && f[20..22] == [0, 1]
        && f[22..28] == *mac
        && f[28..32] == *ip
        && f[38..42] == *ip
}

fn is_rarp(f: &[u8], mac: &[u8; 6]) -> bool {
    f.len() >= 42 && f[6..12] == *mac && f[12..14] == [0x80, 0x35] && f[22..28] == *mac
}

#[test]
fn a_guest_with_guest_announce_announces_itself_after_a_live_migration() {
    let test = "a_guest_with_guest_announce_announces_itself_after_a_live_migration";
    let Some((_h, dst, mac, up, guest_announce, frames)) = migrate_idle_capturing(test, "") else {
        return;
    };
    assert!(guest_announce, "the guest did not negotiate GUEST_ANNOUNCE");
    let ip = guest_ip_from(&up);
    let lines = dst.lines();
    assert!(
        lines
            .iter()
            .any(|l| l == "testkernel: net announced garps=3"),
        "{lines:?}\n{}",
        dst.stderr()
    );
    assert!(
        dst.stderr()
            .contains("net n0: asked the guest to announce itself"),
        "{}",
        dst.stderr()
    );
    let garps = frames.iter().filter(|f| is_garp(f, &mac, &ip)).count();
    let rarps = frames.iter().filter(|f| is_rarp(f, &mac)).count();
    eprintln!("{test}: at the client: {garps} gratuitous ARPs from the guest, {rarps} RARPs");
    assert!(
        garps >= 1,
        "no gratuitous ARP from the guest reached the client"
    );
    // The destination's RARP at the pause (before the guest runs), and not
    // the device's series: the guest spoke for itself.
    assert!((1..6).contains(&rarps), "{rarps} RARPs");
    assert!(!lines.iter().any(|l| l.contains("FAIL")), "{lines:?}");
}

#[test]
fn a_guest_without_guest_announce_still_gets_the_devices_rarps() {
    let test = "a_guest_without_guest_announce_still_gets_the_devices_rarps";
    let Some((_h, dst, mac, up, guest_announce, frames)) =
        migrate_idle_capturing(test, "testkernel.net_announce=off")
    else {
        return;
    };
    assert!(!guest_announce, "the guest negotiated GUEST_ANNOUNCE");
    let ip = guest_ip_from(&up);
    let garps = frames.iter().filter(|f| is_garp(f, &mac, &ip)).count();
    let rarps = frames.iter().filter(|f| is_rarp(f, &mac)).count();
    eprintln!("{test}: at the client: {garps} gratuitous ARPs from the guest, {rarps} RARPs");
    assert_eq!(garps, 0);
    // One at the pause, then the device's five over 100 ms.
    assert!(rarps >= 6, "{rarps} RARPs");
    assert!(
        !dst.stderr().contains("asked the guest"),
        "{}",
        dst.stderr()
    );
    assert!(!dst
        .lines()
        .iter()
        .any(|l| l.starts_with("testkernel: net announce")));
}

fn guest_ip_from(up: &str) -> [u8; 4] {
    let s = up.split("ip=").nth(1).unwrap().split(' ').next().unwrap();
    let ip: std::net::Ipv4Addr = s.parse().unwrap();
    ip.octets()
}

#[test]
fn a_net_device_without_a_destination_tap_is_refused_and_the_guest_stays() {
    let test = "a_net_device_without_a_destination_tap_is_refused_and_the_guest_stays";
    let Some(h) = Hosts::new(test) else {
        return;
    };
    let src_dir = h.dir.path().join("src");
    std::fs::create_dir_all(&src_dir).unwrap();
    let mut dst = h.receiver(&["--tap", "other=tap0"]);
    let src = run_on_a(&h.sw, &src_dir, &net_config(&h.sw, "idle"));
    h.migrate(&src);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let (_, s) = src.api("GET", "/migration");
        if s["phase"] == "failed" || s["phase"] == "completed" {
            break s;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["phase"], "failed", "{status}");
    assert!(
        status.to_string().contains("has no tap on the destination"),
        "{status}"
    );
    assert_eq!(status["bytes_sent"], 0, "memory moved before the refusal");
    // Refused at the handshake, before any memory moved; the receiver
    // waits on for a migration it can take. (It may say so a moment after
    // the source has seen the refusal.)
    let said = |dst: &Ferry| {
        dst.stderr()
            .contains("refused: net[0] (id \"n0\") has no tap on the destination")
    };
    let until = Instant::now() + WAIT;
    while !said(&dst) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(said(&dst), "{}", dst.stderr());
    assert!(dst.running());
    // The guest goes on answering where it was.
    answers(&h.sw, "after the refused migration");
    assert_eq!(h.sw.tap_stat('b', "rx_packets"), 0);
}

/// Namespaces whose owner died without cleaning up (a test killed by
/// SIGKILL runs no drop) are removed by the next `up`; a live owner's stay.
#[test]
fn namespaces_of_a_dead_owner_go_with_the_next_run() {
    let Some(probe) = TwoHosts::create("namespaces_of_a_dead_owner_go_with_the_next_run") else {
        return;
    };
    drop(probe);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/two-hosts");
    // The owner lives while its namespaces are made, then dies outright.
    let mut owner = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let name = format!("fz{}", std::process::id() % 100_000);
    let up = std::process::Command::new(script)
        .args(["up", &name, "10.97.3"])
        .env("TWO_HOSTS_OWNER", owner.id().to_string())
        .output()
        .unwrap();
    owner.kill().unwrap();
    owner.wait().unwrap();
    assert!(up.status.success(), "{up:?}");
    let listed = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&format!("{name}-a")))
    };
    assert!(listed(), "{name}-a was not made");
    // Any later run sweeps: this one, which itself lives on.
    let live = TwoHosts::create("namespaces_of_a_dead_owner_go_with_the_next_run").unwrap();
    let still_there = listed();
    let _ = std::process::Command::new(script)
        .args(["down", &name])
        .output();
    assert!(
        !still_there,
        "{name}, owned by a dead process, survived a sweep"
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&live.ns('a')),
        "a live owner's namespaces were swept"
    );
}
