//! The `ferry` command line as a user meets it: signals, usage errors,
//! closed pipes, the control socket's file.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BOOT: Duration = Duration::from_secs(20);

fn kill(f: &Ferry, signal: i32) {
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(f.pid() as i32, signal) }, 0);
}

fn wait_for_socket(f: &mut Ferry, sock: &Path) {
    let deadline = Instant::now() + BOOT;
    while !sock.exists() {
        assert!(
            f.running() && Instant::now() < deadline,
            "no socket at {}; stderr: {}",
            sock.display(),
            f.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `ferry run` stopped by `signal`: a clean stop (exit 0), the socket gone.
fn signal_stops_the_vm_and_removes_the_socket(test: &str, signal: i32, name: &str) {
    if !kvm_available(test) {
        return;
    }
    let dir = tempdir();
    let mut f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let sock = f.api_sock.clone().unwrap();
    f.wait_line(BOOT, |l| l.starts_with("testkernel: booted"));
    f.wait_api(BOOT);
    kill(&f, signal);
    let status = f.wait_exit(BOOT);
    assert_eq!(status.code(), Some(0), "{status:?}; stderr: {}", f.stderr());
    assert!(!sock.exists(), "{} is still there", sock.display());
    assert!(
        f.stderr()
            .contains(&format!("ferry: {name}: stopping the VM")),
        "{}",
        f.stderr()
    );
}

#[test]
fn sigterm_stops_the_vm_and_removes_the_socket() {
    signal_stops_the_vm_and_removes_the_socket(
        "sigterm_stops_the_vm_and_removes_the_socket",
        libc::SIGTERM,
        "SIGTERM",
    );
}

#[test]
fn sigint_stops_the_vm_and_removes_the_socket() {
    signal_stops_the_vm_and_removes_the_socket(
        "sigint_stops_the_vm_and_removes_the_socket",
        libc::SIGINT,
        "SIGINT",
    );
}

#[test]
fn receive_waiting_for_a_migration_dies_on_sigterm() {
    let dir = tempdir();
    let sock = dir.path().join("dst.sock");
    let mut f = Ferry::spawn(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + BOOT;
    while !f.stderr().contains("waiting for a migration") {
        assert!(
            f.running() && Instant::now() < deadline,
            "stderr: {}",
            f.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(&f, libc::SIGTERM);
    let status = f.wait_exit(Duration::from_secs(2));
    assert!(!status.success(), "{status:?}");
    assert!(!sock.exists());
}

/// The socket is 0600 from the moment it exists, whatever the umask.
#[test]
fn control_socket_is_owner_only_under_an_open_umask() {
    if !kvm_available("control_socket_is_owner_only_under_an_open_umask") {
        return;
    }
    let dir = tempdir();
    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let sock = dir.path().join("api.sock");
    let script = format!(
        "umask 000; exec {FERRY} run --config {} --api-sock {}",
        cfg.display(),
        sock.display()
    );
    let mut f = Ferry::spawn_program("sh", &["-c", &script]);
    f.api_sock = Some(sock.clone());
    wait_for_socket(&mut f, &sock);
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    f.wait_api(BOOT);
    assert_eq!(f.api("PUT", "/vm/shutdown").0, 200);
    assert!(f.wait_exit(BOOT).success());
    assert!(!sock.exists());
}

fn ferry_output(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(FERRY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_2_for_every_subcommand() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["--frobnicate"],
        &["run"],
        &["run", "--config", "a.json", "--restore", "snap"],
        &["run", "--config"],
        &["receive"],
        &["receive", "--dir", "/tmp"],
        &["receive", "--listen", "127.0.0.1:0", "--bogus"],
        &["ctl"],
        &["ctl", "--sock", "x.sock"],
        &["ctl", "--sock", "x.sock", "frobnicate"],
        &["ctl", "--sock", "x.sock", "migrate"],
        &["ctl", "--sock", "x.sock", "snapshot"],
    ] {
        let (code, err) = ferry_output(args);
        assert_eq!(code, Some(2), "ferry {args:?}: {err}");
        assert!(!err.is_empty(), "ferry {args:?} said nothing");
    }
}

#[test]
fn run_without_arguments_names_config_and_restore() {
    let (code, err) = ferry_output(&["run"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--config"), "{err}");
    assert!(err.contains("--restore"), "{err}");
}

#[test]
fn a_directory_as_the_control_socket_is_named_as_such() {
    let dir = tempdir();
    let d = dir.path().to_str().unwrap();
    let (code, err) = ferry_output(&["ctl", "--sock", d, "state"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{d} is a directory")), "{err}");

    let (code, err) = ferry_output(&["receive", "--listen", "127.0.0.1:0", "--api-sock", d]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{d} is a directory")), "{err}");

    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let (code, err) = ferry_output(&["run", "--config", cfg.to_str().unwrap(), "--api-sock", d]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("{d} is a directory")), "{err}");
}

#[test]
fn a_missing_receive_dir_is_named() {
    let dir = tempdir();
    let missing = dir.path().join("nope");
    let m = missing.to_str().unwrap();
    let (code, err) = ferry_output(&["receive", "--listen", "127.0.0.1:0", "--dir", m]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--dir {m}: no such directory")),
        "{err}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = ferry_output(&["receive", "--listen", "127.0.0.1:0", "--dir", f]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--dir {f}: not a directory")),
        "{err}"
    );
}

/// `ferry ctl ... | head -1`: the reader goes away; ferry must not panic.
#[test]
fn a_closed_stdout_ends_ctl_quietly() {
    if !kvm_available("a_closed_stdout_ends_ctl_quietly") {
        return;
    }
    let dir = tempdir();
    let mut f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_api(BOOT);
    let sock = f.api_sock.clone().unwrap();
    // A pipe whose read end is closed before ferry writes: EPIPE at once.
    let (read, write) = std::io::pipe().unwrap();
    drop(read);
    let out = Command::new(FERRY)
        .args(["ctl", "--sock", sock.to_str().unwrap(), "state"])
        .stdin(Stdio::null())
        .stdout(write)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "not quiet: {err}");
    assert!(out.status.code().is_some(), "killed: {:?}", out.status);
    assert_eq!(f.api("PUT", "/vm/shutdown").0, 200);
    assert!(f.wait_exit(BOOT).success());
}
