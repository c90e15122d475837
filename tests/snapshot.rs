//! Snapshot a running guest, kill its process, restore it in a new one.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(30);

fn snapshot(f: &Ferry, dir: &Path) -> serde_json::Value {
    let (status, body) = ferry::api::client::request(
        f.api_sock.as_ref().unwrap(),
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({ "dir": dir })),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn restore(dir: &Path, sock: &Path) -> Ferry {
    let mut f = Ferry::spawn(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    f.api_sock = Some(sock.to_path_buf());
    f
}

fn pass_of(line: &str) -> u64 {
    line.strip_prefix("testkernel: dirty pass=")
        .and_then(|r| r.strip_suffix(" ok"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a pass line: {line}"))
}

fn assert_no_fail(f: &Ferry) {
    let lines = f.lines();
    assert!(
        !lines.iter().any(|l| l.contains("FAIL")),
        "FAIL in {lines:#?}"
    );
}

#[test]
fn dirty_guest_survives_snapshot_kill_restore() {
    if !kvm_available("dirty_guest_survives_snapshot_kill_restore") {
        return;
    }
    let dir = tempdir();
    let snap = dir.path().join("snap");
    let f = Ferry::run(
        dir.path(),
        &config(2, 256, "testkernel.workload=dirty testkernel.dirty_mib=32"),
    );
    f.wait_line(WAIT, |l| l.starts_with("testkernel: booted cpus=2"));
    let (i, _) = f.wait_line_from(0, WAIT, |l| l == "testkernel: dirty pass=3 ok");
    let body = snapshot(&f, &snap);
    assert_eq!(body["state"], "Paused");
    let last_before = f
        .lines()
        .iter()
        .rev()
        .find(|l| l.starts_with("testkernel: dirty pass="))
        .map(|l| pass_of(l))
        .unwrap();
    assert!(last_before >= 3 && i > 0);
    assert_no_fail(&f);
    drop(f); // kills the process

    let g = restore(&snap, &dir.path().join("restored.sock"));
    let (_, first) = g.wait_line_from(0, WAIT, |l| l.starts_with("testkernel: dirty pass="));
    // The guest carries on with the very next pass: its memory, registers
    // and its own count came back.
    assert_eq!(pass_of(&first), last_before + 1, "{:?}", g.lines());
    let want = last_before + 3;
    g.wait_line(WAIT, |l| {
        l.starts_with("testkernel: dirty pass=") && pass_of(l) >= want
    });
    assert!(
        !g.lines()
            .iter()
            .any(|l| l.starts_with("testkernel: booted")),
        "the restored guest rebooted"
    );
    assert_no_fail(&g);
    g.wait_api(WAIT);
    let (_, st) = g.api("GET", "/vm");
    assert_eq!(st["state"], "Running");
    assert_eq!(st["vcpus"], 2);
}

#[test]
fn paused_guest_snapshot_then_resume_continues() {
    if !kvm_available("paused_guest_snapshot_then_resume_continues") {
        return;
    }
    let dir = tempdir();
    let f = Ferry::run(
        dir.path(),
        &config(1, 64, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    f.wait_line(WAIT, |l| l == "testkernel: dirty pass=2 ok");
    let (status, _) = f.api("PUT", "/vm/pause");
    assert_eq!(status, 200);
    let body = snapshot(&f, &dir.path().join("snap"));
    assert_eq!(body["state"], "Paused");
    let n = f.lines().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.lines().len(), n, "the guest ran while paused");
    let (status, _) = f.api("PUT", "/vm/resume");
    assert_eq!(status, 200);
    let last = pass_of(f.lines().last().unwrap());
    f.wait_line_from(n, WAIT, |l| {
        l.starts_with("testkernel: dirty pass=") && pass_of(l) == last + 2
    });
    assert_no_fail(&f);
}

#[test]
fn disk_guest_restored_mid_workload_completes_and_verifies() {
    if !kvm_available("disk_guest_restored_mid_workload_completes_and_verifies") {
        return;
    }
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    let snap = dir.path().join("snap");
    let mut cfg = config(
        1,
        64,
        "testkernel.workload=blk testkernel.blk_blocks=4096 testkernel.blk_seed=9",
    );
    cfg["drives"] = serde_json::json!([{ "id": "d0", "path": image, "create_size_mib": 32 }]);
    let f = Ferry::run(dir.path(), &cfg);
    f.wait_line(WAIT, |l| l == "testkernel: blk id=d0");
    // Let some writes land, then snapshot in the middle of the workload.
    std::thread::sleep(Duration::from_millis(300));
    snapshot(&f, &snap);
    let done_before = f
        .lines()
        .iter()
        .any(|l| l.starts_with("testkernel: blk ok"));
    drop(f);
    assert!(
        !done_before,
        "the workload finished before the snapshot; make it longer"
    );
    let mut g = restore(&snap, &dir.path().join("r.sock"));
    g.wait_line(WAIT, |l| l == "testkernel: blk ok blocks=4096");
    g.wait_line(WAIT, |l| l == "testkernel: done");
    assert!(g.wait_exit(WAIT).success(), "{}", g.stderr());
    assert_no_fail(&g);
    verify_blk_image(&image, 4096, 9).unwrap();
}

#[test]
fn bad_snapshots_are_refused_clearly() {
    if !kvm_available("bad_snapshots_are_refused_clearly") {
        return;
    }
    let dir = tempdir();
    let snap = dir.path().join("snap");
    let f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_line(WAIT, |l| l.starts_with("testkernel: booted"));
    f.wait_api(WAIT);
    snapshot(&f, &snap);
    drop(f);
    let good_state = std::fs::read(snap.join("vmstate")).unwrap();
    let good_mem_len = std::fs::metadata(snap.join("memory")).unwrap().len();

    let try_restore = |name: &str, state: &[u8], mem_len: u64| -> String {
        let bad = dir.path().join(name);
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("vmstate"), state).unwrap();
        std::fs::copy(snap.join("memory"), bad.join("memory")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(bad.join("memory"))
            .unwrap()
            .set_len(mem_len)
            .unwrap();
        let out = std::process::Command::new(FERRY)
            .args(["run", "--restore", bad.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}: {out:?}");
        assert!(out.stdout.is_empty(), "{name}: the guest ran");
        // Nothing was changed by the failed restore.
        assert_eq!(std::fs::read(bad.join("vmstate")).unwrap(), state);
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let mut wrong_version = good_state.clone();
    wrong_version[8] = 99;
    assert!(try_restore("version", &wrong_version, good_mem_len).contains("version 99"));

    let truncated = &good_state[..good_state.len() / 2];
    assert!(try_restore("truncated", truncated, good_mem_len).contains("truncated"));

    let mut corrupted = good_state.clone();
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 0x55;
    assert!(try_restore("corrupted", &corrupted, good_mem_len).contains("corrupted"));

    assert!(try_restore("not-a-snapshot", b"hello world", good_mem_len)
        .contains("not a Ferry snapshot"));

    let err = try_restore("short-memory", &good_state, good_mem_len - 4096);
    assert!(err.contains("memory file"), "{err}");

    let out = std::process::Command::new(FERRY)
        .args([
            "run",
            "--restore",
            dir.path().join("missing").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmstate"));
}

#[test]
fn snapshot_request_errors_keep_the_guest_running() {
    if !kvm_available("snapshot_request_errors_keep_the_guest_running") {
        return;
    }
    let dir = tempdir();
    let f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_line(WAIT, |l| l == "testkernel: tick 1");
    let sock = f.api_sock.clone().unwrap();
    let req = |body: serde_json::Value| {
        ferry::api::client::request(&sock, "PUT", "/snapshot/create", Some(&body)).unwrap()
    };
    let (status, body) = req(serde_json::json!({ "path": "/tmp/x" }));
    assert_eq!(status, 400, "{body}");
    // A file where the directory should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let (status, body) = req(serde_json::json!({ "dir": file.join("sub") }));
    assert!(status >= 400, "{body}");
    let (_, st) = f.api("GET", "/vm");
    assert_eq!(st["state"], "Running");
    let n = f.lines().len();
    f.wait_line_from(n, WAIT, |l| l.starts_with("testkernel: tick"));
}

/// Issue 10, verified snapshots: what an attacker who can write the
/// snapshot directory tries is refused before the guest runs (exit 2),
/// and the files ferry writes are private to their owner.
#[test]
fn tampered_snapshots_are_refused_and_files_are_private() {
    if !kvm_available("tampered_snapshots_are_refused_and_files_are_private") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    let snap = dir.path().join("snap");
    let f = Ferry::run(
        dir.path(),
        &config(1, 64, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    f.wait_line(WAIT, |l| l == "testkernel: dirty pass=1 ok");
    snapshot(&f, &snap);
    drop(f);
    for name in ["vmstate", "memory"] {
        let mode = std::fs::metadata(snap.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name} has mode {mode:o}");
    }
    let state_path = snap.join("vmstate");
    let good_state = std::fs::read(&state_path).unwrap();
    let good_mem = std::fs::read(snap.join("memory")).unwrap();

    // A copy of the snapshot with `state` (or a link in its place) and
    // `mem`; restored, it must fail with exit 2 and run nothing.
    let try_restore = |name: &str, state: Option<&[u8]>, mem: &[u8]| -> String {
        let bad = dir.path().join(name);
        std::fs::create_dir_all(&bad).unwrap();
        if let Some(state) = state {
            std::fs::write(bad.join("vmstate"), state).unwrap();
        }
        std::fs::write(bad.join("memory"), mem).unwrap();
        let mut g = Ferry::spawn(&["run", "--restore", bad.to_str().unwrap()]);
        let status = g.wait_exit(WAIT);
        assert_eq!(status.code(), Some(2), "{name}: {}", g.stderr());
        assert!(g.lines().is_empty(), "{name}: the guest ran");
        g.stderr()
    };
    let (state, sums) = ferry::snapshot::decode_state(&state_path, &good_state).unwrap();
    assert!(!sums.is_empty());

    // One flipped byte in guest memory.
    let at = good_mem.iter().position(|&b| b != 0).unwrap() + 1;
    let mut flipped = good_mem.clone();
    flipped[at] ^= 0x01;
    let err = try_restore("flipped", Some(&good_state), &flipped);
    assert!(err.contains("corrupted memory"), "{err}");
    assert!(err.contains("do not match their checksum"), "{err}");
    // One byte where the snapshot has a hole.
    let mut in_hole = good_mem.clone();
    let hole = (0..good_mem.len())
        .step_by(4096)
        .rev()
        .find(|&o| good_mem[o..o + 4096].iter().all(|&b| b == 0))
        .unwrap();
    in_hole[hole + 9] = 0x42;
    let err = try_restore("in-hole", Some(&good_state), &in_hole);
    assert!(err.contains("should be all zero"), "{err}");

    // State consistent in its checksum but not with itself: memory size
    // arithmetic that wraps to the real size, and more vCPUs than `ferry
    // run` allows here.
    let reencode = |edit: &dyn Fn(&mut ferry::snapshot::VmState)| {
        let (mut st, sums) = ferry::snapshot::decode_state(&state_path, &good_state).unwrap();
        edit(&mut st);
        ferry::snapshot::encode_state(&st, &sums).unwrap()
    };
    let wraps = reencode(&|st| st.config.memory_mib = (1 << 44) + 64);
    let err = try_restore("wraps", Some(&wraps), &good_mem);
    assert!(err.contains("memory_mib"), "{err}");
    let many = reencode(&|st| {
        st.config.vcpus = 254;
        let one = serde_json::to_value(&st.vcpus[0]).unwrap();
        st.vcpus = (0..254)
            .map(|_| serde_json::from_value(one.clone()).unwrap())
            .collect();
    });
    let err = try_restore("vcpus", Some(&many), &good_mem);
    assert!(err.contains("vcpus: 254 is too many"), "{err}");
    let extra_drive = reencode(&|st| {
        st.config
            .drives
            .push(st.config.drives.first().cloned().unwrap_or_else(|| {
                serde_json::from_value(serde_json::json!({"id": "x", "path": "/nonexistent"}))
                    .unwrap()
            }))
    });
    let err = try_restore("drives", Some(&extra_drive), &good_mem);
    assert!(err.contains("drive states for"), "{err}");
    assert_eq!(state.memory_size, good_mem.len() as u64);

    // A huge or endless state file is refused by its size or type, unread.
    let huge = dir.path().join("huge");
    std::fs::create_dir_all(&huge).unwrap();
    std::fs::File::create(huge.join("vmstate"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let err = try_restore("huge", None, &good_mem);
    assert!(err.contains("larger than any state file"), "{err}");
    let zero = dir.path().join("zero");
    std::fs::create_dir_all(&zero).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("vmstate")).unwrap();
    let err = try_restore("zero", None, &good_mem);
    assert!(
        err.contains("is a character device, not a regular file"),
        "{err}"
    );
    let fifo = dir.path().join("fifo");
    std::fs::create_dir_all(&fifo).unwrap();
    let c = std::ffi::CString::new(fifo.join("vmstate").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = try_restore("fifo", None, &good_mem);
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");

    // The untouched snapshot still restores.
    let g = restore(&snap, &dir.path().join("ok.sock"));
    g.wait_line(WAIT, |l| l.starts_with("testkernel: dirty pass="));
}
