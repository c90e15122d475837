//! `ferry run` with bad configs: exit code 2, one clear line naming the
//! problem, and nothing created on disk. No KVM needed: validation happens
//! before anything starts.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run_config_text(dir: &Path, text: &str) -> (Option<i32>, String) {
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(FERRY)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_config(dir: &Path, value: &serde_json::Value) -> (Option<i32>, String) {
    run_config_text(dir, &serde_json::to_string_pretty(value).unwrap())
}

fn assert_bad(dir: &Path, value: &serde_json::Value, needles: &[&str]) {
    let (code, err) = run_config(dir, value);
    assert_eq!(code, Some(2), "stderr: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn malformed_json_names_line_and_column() {
    let dir = tempdir();
    let (code, err) = run_config_text(dir.path(), "{\n  \"vcpus\": 1,\n  \"memory_mib\": ,\n}");
    assert_eq!(code, Some(2));
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("column"), "{err}");
}

#[test]
fn unknown_field_is_named() {
    let dir = tempdir();
    let mut cfg = config(1, 64, "");
    cfg["memroy_mib"] = serde_json::json!(64);
    assert_bad(dir.path(), &cfg, &["memroy_mib"]);
    let mut cfg = config(1, 64, "");
    cfg["drives"] = serde_json::json!([{ "id": "a", "path": "x", "readonly": true }]);
    assert_bad(dir.path(), &cfg, &["readonly"]);
}

#[test]
fn missing_kernel_and_initrd_name_the_path() {
    let dir = tempdir();
    let mut cfg = config(1, 64, "");
    cfg["kernel"] = serde_json::json!("/nonexistent/vmlinux");
    assert_bad(dir.path(), &cfg, &["/nonexistent/vmlinux"]);
    let mut cfg = config(1, 64, "");
    cfg["initrd"] = serde_json::json!("/nonexistent/initrd.img");
    assert_bad(dir.path(), &cfg, &["/nonexistent/initrd.img"]);
}

#[test]
fn zero_and_absurd_sizes() {
    let dir = tempdir();
    assert_bad(dir.path(), &config(1, 0, ""), &["memory_mib"]);
    assert_bad(dir.path(), &config(1, 1 << 40, ""), &["memory_mib"]);
    assert_bad(dir.path(), &config(0, 64, ""), &["vcpus"]);
    let mut cfg = config(1, 64, "");
    cfg["vcpus"] = serde_json::json!(1000);
    assert_bad(dir.path(), &cfg, &["vcpus"]);
}

#[test]
fn duplicate_drive_ids() {
    let dir = tempdir();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    std::fs::write(&a, vec![0u8; 4096]).unwrap();
    std::fs::write(&b, vec![0u8; 4096]).unwrap();
    let mut cfg = config(1, 64, "");
    cfg["drives"] = serde_json::json!([
        { "id": "root", "path": a },
        { "id": "root", "path": b }
    ]);
    assert_bad(dir.path(), &cfg, &["root", "duplicate"]);
}

#[test]
fn missing_drive_is_an_error_and_nothing_is_created() {
    let dir = tempdir();
    let missing = dir.path().join("missing.img");
    let created = dir.path().join("would-be-created.img");
    let serial = dir.path().join("serial.log");
    let mut cfg = config(1, 64, "");
    cfg["drives"] = serde_json::json!([
        { "id": "new", "path": created, "create_size_mib": 8 },
        { "id": "gone", "path": missing }
    ]);
    cfg["serial"] = serde_json::json!(serial);
    assert_bad(dir.path(), &cfg, &[missing.to_str().unwrap()]);
    assert!(
        !created.exists(),
        "validation failure created a drive image"
    );
    assert!(!missing.exists());
    assert!(
        !serial.exists(),
        "validation failure created the serial log"
    );
}

#[test]
fn every_problem_gets_its_own_line() {
    let dir = tempdir();
    let mut cfg = config(0, 0, "");
    cfg["kernel"] = serde_json::json!("/nonexistent/k");
    let (code, err) = run_config(dir.path(), &cfg);
    assert_eq!(code, Some(2));
    let lines: Vec<&str> = err.lines().collect();
    for needle in ["vcpus", "memory_mib", "/nonexistent/k"] {
        assert_eq!(
            lines.iter().filter(|l| l.contains(needle)).count(),
            1,
            "{needle}: {err}"
        );
    }
}

#[test]
fn missing_config_file_and_usage_errors() {
    let out = Command::new(FERRY)
        .args(["run", "--config", "/nonexistent/vm.json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vm.json"));
    let out = Command::new(FERRY).args(["run"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(FERRY).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn kernel_that_is_not_a_kernel() {
    if !kvm_available("kernel_that_is_not_a_kernel") {
        return;
    }
    let dir = tempdir();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
    let mut cfg = config(1, 64, "");
    cfg["kernel"] = serde_json::json!(junk);
    let (code, err) = run_config(dir.path(), &cfg);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(junk.to_str().unwrap()), "{err}");
}

/// `ferry run --config P`, killed if it does not exit within 10 s (a
/// config read that blocks, on a FIFO say, fails the test instead of
/// hanging it).
fn run_config_path(path: &Path) -> (Option<i32>, String) {
    let mut f = Ferry::spawn(&["run", "--config", path.to_str().unwrap()]);
    let status = f.wait_exit(std::time::Duration::from_secs(10));
    (status.code(), f.stderr())
}

#[test]
fn config_that_is_not_a_regular_file_is_refused_without_reading_it() {
    let dir = tempdir();
    let zero = dir.path().join("zero.json");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = dir.path().join("fifo.json");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (path, kind) in [
        (Path::new("/dev/zero"), "a character device"),
        (zero.as_path(), "a character device"),
        (fifo.as_path(), "a FIFO"),
        (dir.path(), "a directory"),
    ] {
        let (code, err) = run_config_path(path);
        assert_eq!(code, Some(2), "{}: {err}", path.display());
        assert!(
            err.contains(&format!("{} is {kind}, not a regular file", path.display())),
            "{}: {err}",
            path.display()
        );
    }
}

#[test]
fn oversized_config_is_refused_by_its_size() {
    let dir = tempdir();
    let big = dir.path().join("big.json");
    // Sparse: 1 GiB that costs nothing, and must not be read.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let (code, err) = run_config_path(&big);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("larger than the 1048576-byte limit"), "{err}");
    assert!(err.contains(big.to_str().unwrap()), "{err}");
}
