//! Boots the test kernel under KVM with the real `ferry` binary.

mod common;

use std::time::Duration;

use common::*;

const BOOT: Duration = Duration::from_secs(20);

fn booted_line(f: &Ferry) -> String {
    f.wait_line(BOOT, |l| l.starts_with("testkernel: booted"))
}

#[test]
fn boot_line_reports_cpus_memory_and_cmdline() {
    if !kvm_available("boot_line_reports_cpus_memory_and_cmdline") {
        return;
    }
    let dir = tempdir();
    let mut f = Ferry::run(
        dir.path(),
        &config(1, 64, "testkernel.workload=idle hello=world"),
    );
    let line = booted_line(&f);
    assert_eq!(
        line,
        "testkernel: booted cpus=1 mem=64 cmdline=\"testkernel.workload=idle hello=world\""
    );
    f.wait_api(BOOT);
    let (status, _) = f.api("PUT", "/vm/shutdown");
    assert_eq!(status, 200);
    assert!(f.wait_exit(BOOT).success());
}

#[test]
fn two_vcpus_and_memory_above_the_mmio_hole() {
    if !kvm_available("two_vcpus_and_memory_above_the_mmio_hole") {
        return;
    }
    let dir = tempdir();
    // 3584 MiB: 3 GiB below the hole, 512 MiB above 4 GiB.
    let f = Ferry::run(dir.path(), &config(2, 3584, "testkernel.workload=idle"));
    let line = booted_line(&f);
    assert!(
        line.starts_with("testkernel: booted cpus=2 mem=3584 "),
        "{line}"
    );
    f.wait_api(BOOT);
    let (status, body) = f.api("GET", "/vm");
    assert_eq!(status, 200);
    assert_eq!(body["vcpus"], 2);
    assert_eq!(body["memory_mib"], 3584);
}

#[test]
fn blk_roundtrip_writes_the_documented_blocks() {
    if !kvm_available("blk_roundtrip_writes_the_documented_blocks") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    let mut cfg = config(1, 64, "testkernel.workload=blk testkernel.blk_seed=7");
    cfg["drives"] = serde_json::json!([
        { "id": "scratch", "path": image, "create_size_mib": 4 }
    ]);
    let mut f = Ferry::run(dir.path(), &cfg);
    let line = booted_line(&f);
    assert!(
        line.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{line}"
    );
    f.wait_line(BOOT, |l| l == "testkernel: blk id=scratch");
    f.wait_line(BOOT, |l| l == "testkernel: blk ok blocks=256");
    f.wait_line(BOOT, |l| l == "testkernel: done");
    let status = f.wait_exit(BOOT);
    assert!(status.success(), "{status:?} {}", f.stderr());
    // The image was created sparse at the requested size, and holds exactly
    // what the guest wrote.
    let meta = std::fs::metadata(&image).unwrap();
    assert_eq!(meta.len(), 4 << 20);
    verify_blk_image(&image, 256, 7).unwrap();
    let data = std::fs::read(&image).unwrap();
    assert!(data[256 * 4096..].iter().all(|&b| b == 0));
}

#[test]
fn blkwrite_rounds_leave_a_consistent_image() {
    if !kvm_available("blkwrite_rounds_leave_a_consistent_image") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    let mut cfg = config(
        1,
        64,
        "testkernel.workload=blkwrite testkernel.blk_blocks=64 testkernel.blk_seed=5",
    );
    cfg["drives"] = serde_json::json!([
        { "id": "d0", "path": image, "create_size_mib": 16 }
    ]);
    let mut f = Ferry::run(dir.path(), &cfg);
    f.wait_line(BOOT, |l| l == "testkernel: blkwrite round=3 writes=192 ok");
    f.wait_api(BOOT);
    let (status, body) = f.api("PUT", "/vm/shutdown");
    assert_eq!(status, 200, "{body}");
    let status = f.wait_exit(BOOT);
    assert!(status.success(), "{status:?} {}", f.stderr());
    let lines = f.lines();
    assert!(!lines.iter().any(|l| l.contains("FAIL")), "{lines:#?}");
    let last: u64 = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("testkernel: blkwrite round="))
        .and_then(|l| l.split(' ').next()?.parse().ok())
        .unwrap();
    let (r, k) = verify_blkwrite_image(&image, 64, 5).unwrap();
    assert!(r >= 3, "round {r}");
    // The guest stopped in round last + 1, or between two rounds (perhaps
    // before printing the line for round last + 1).
    assert!(
        r == last + 1 || (r == last && k == 64),
        "image at round {r} up to block {k}, last line for round {last}"
    );
    let data = std::fs::read(&image).unwrap();
    assert_eq!(data.len(), 16 << 20);
    assert!(data[64 * 4096..].iter().all(|&b| b == 0));
}

#[test]
fn read_only_drive_refuses_writes() {
    if !kvm_available("read_only_drive_refuses_writes") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("ro.img");
    let original: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &original).unwrap();
    let mut cfg = config(1, 64, "testkernel.workload=blk");
    cfg["drives"] = serde_json::json!([{ "id": "ro", "path": image, "read_only": true }]);
    let mut f = Ferry::run(dir.path(), &cfg);
    f.wait_line(BOOT, |l| l == "testkernel: blk FAIL write status=1 block=0");
    f.wait_line(BOOT, |l| l == "testkernel: done");
    assert!(f.wait_exit(BOOT).success());
    assert_eq!(std::fs::read(&image).unwrap(), original);
}

#[test]
fn pause_stops_the_heartbeat_and_resume_restarts_it() {
    if !kvm_available("pause_stops_the_heartbeat_and_resume_restarts_it") {
        return;
    }
    let dir = tempdir();
    let f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_line(BOOT, |l| l == "testkernel: tick 1");
    let (status, body) = f.api("PUT", "/vm/pause");
    assert_eq!(status, 200, "{body}");
    let (_, state) = f.api("GET", "/vm");
    assert_eq!(state["state"], "Paused");
    let before = f.lines().len();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        f.lines().len(),
        before,
        "ticks while paused: {:?}",
        f.lines()
    );
    let (status, _) = f.api("PUT", "/vm/resume");
    assert_eq!(status, 200);
    let (_, state) = f.api("GET", "/vm");
    assert_eq!(state["state"], "Running");
    let (_, line) = f.wait_line_from(before, Duration::from_secs(10), |l| {
        l.starts_with("testkernel: tick ")
    });
    let n: u64 = line["testkernel: tick ".len()..].parse().unwrap();
    assert!(n >= 2, "{line}");
}

#[test]
fn api_errors_leave_the_vm_running() {
    if !kvm_available("api_errors_leave_the_vm_running") {
        return;
    }
    let dir = tempdir();
    let mut f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_api(BOOT);
    let sock = f.api_sock.clone().unwrap();
    let (status, body) = f.api("GET", "/nope");
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, _) = f.api("POST", "/vm/pause");
    assert_eq!(status, 405);
    // Malformed JSON body, sent raw.
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{nope")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    let (_, state) = f.api("GET", "/vm");
    assert_eq!(state["state"], "Running");
    let ticks = f.lines().len();
    f.wait_line_from(ticks, Duration::from_secs(10), |l| {
        l.starts_with("testkernel: tick")
    });
    // Socket is private to the owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    f.api("PUT", "/vm/shutdown");
    assert!(f.wait_exit(BOOT).success());
}

#[test]
fn ctl_cli_drives_the_vm() {
    if !kvm_available("ctl_cli_drives_the_vm") {
        return;
    }
    let dir = tempdir();
    let mut f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_api(BOOT);
    let sock = f.api_sock.clone().unwrap();
    let ctl = |action: &str| {
        std::process::Command::new(FERRY)
            .args(["ctl", "--sock", sock.to_str().unwrap(), action])
            .output()
            .unwrap()
    };
    let out = ctl("pause");
    assert!(out.status.success());
    let out = ctl("state");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "Paused");
    assert!(ctl("resume").status.success());
    assert!(ctl("shutdown").status.success());
    assert!(f.wait_exit(BOOT).success());
    // The socket is gone with the VM, and ctl says so clearly.
    let out = ctl("state");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn serial_to_file() {
    if !kvm_available("serial_to_file") {
        return;
    }
    let dir = tempdir();
    let log = dir.path().join("serial.log");
    let mut cfg = config(1, 64, "testkernel.workload=nonesuch");
    cfg["serial"] = serde_json::json!(log);
    let mut f = Ferry::run(dir.path(), &cfg);
    assert!(f.wait_exit(BOOT).success(), "{}", f.stderr());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("testkernel: FAIL unknown workload nonesuch"),
        "{text}"
    );
    assert!(text.ends_with("testkernel: done\n"), "{text}");
}

#[test]
fn block_device_as_a_drive() {
    if !kvm_available("block_device_as_a_drive") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("backing.img");
    std::fs::write(&image, vec![0u8; 2 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show", image.to_str().unwrap()])
        .output();
    let loopdev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            skip_unless_required(
                "block_device_as_a_drive",
                running_as_root(),
                &format!("cannot set up a loop device: {other:?}"),
            );
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let mut cfg = config(1, 64, "testkernel.workload=blk testkernel.blk_blocks=100");
    cfg["drives"] = serde_json::json!([{ "id": "loop", "path": loopdev }]);
    let mut f = Ferry::run(dir.path(), &cfg);
    f.wait_line(BOOT, |l| l == "testkernel: blk ok blocks=100");
    assert!(f.wait_exit(BOOT).success(), "{}", f.stderr());
    drop(_detach);
    verify_blk_image(&image, 100, 1).unwrap();
}

#[test]
fn an_empty_initrd_boots_as_no_initrd() {
    if !kvm_available("an_empty_initrd_boots_as_no_initrd") {
        return;
    }
    let dir = tempdir();
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&initrd, b"").unwrap();
    let mut cfg = config(1, 64, "testkernel.workload=idle");
    cfg["initrd"] = serde_json::json!(initrd);
    let mut f = Ferry::run(dir.path(), &cfg);
    let line = booted_line(&f);
    assert!(
        line.starts_with("testkernel: booted cpus=1 mem=64 "),
        "{line}"
    );
    f.wait_api(BOOT);
    assert_eq!(f.api("PUT", "/vm/shutdown").0, 200);
    let status = f.wait_exit(BOOT);
    assert!(status.success(), "{status:?} {}", f.stderr());
}

/// The answer to `PUT /vm/shutdown` races the process's own exit: it must
/// reach the client every time, not only when the request thread wins.
#[test]
fn shutdown_is_answered_before_the_process_exits() {
    if !kvm_available("shutdown_is_answered_before_the_process_exits") {
        return;
    }
    let dir = tempdir();
    for round in 0..15 {
        let mut f = Ferry::run(dir.path(), &config(1, 32, "testkernel.workload=idle"));
        f.wait_api(BOOT);
        let (status, body) = f.api("PUT", "/vm/shutdown");
        assert_eq!(status, 200, "round {round}: {body}");
        assert!(f.wait_exit(BOOT).success(), "round {round}");
    }
}
