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
        &["receive", "--listen", "notanaddress"],
        &["receive", "--listen", "127.0.0.1:99999"],
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

#[test]
fn a_bad_shared_storage_root_or_serial_is_named() {
    let dir = tempdir();
    let missing = dir.path().join("nope");
    let m = missing.to_str().unwrap();
    let (code, err) = ferry_output(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--shared-storage-root",
        m,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("--shared-storage-root {m}: No such file")),
        "{err}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let f = file.to_str().unwrap();
    let (code, err) = ferry_output(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--shared-storage-root",
        f,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not a directory"), "{err}");
    let (code, err) = ferry_output(&["receive", "--listen", "127.0.0.1:0", "--serial", ""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--serial"), "{err}");
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

/// A guest on loopback being migrated by `ferry ctl migrate`, run through
/// `program args` (so that a test can give it a terminal); returns what the
/// command printed on stderr (or on the terminal) and its exit status.
fn ctl_migrate_output(
    test: &str,
    wrap: impl FnOnce(Vec<String>) -> Command,
) -> Option<(String, std::process::ExitStatus)> {
    if !kvm_available(test) {
        return None;
    }
    let dir = tempdir();
    let (dst, port) = receiver(dir.path());
    let mut src = Ferry::run(
        dir.path(),
        &config(1, 128, "testkernel.workload=dirty testkernel.dirty_mib=8"),
    );
    src.wait_api(BOOT);
    // Into its workload, so that pass 1 has pages to copy.
    src.wait_line(BOOT, |l| l == "testkernel: dirty pass=1 ok");
    let args = vec![
        FERRY.to_string(),
        "ctl".into(),
        "--sock".into(),
        src.api_sock.as_ref().unwrap().to_str().unwrap().into(),
        "migrate".into(),
        "--to".into(),
        format!("127.0.0.1:{port}"),
        "--bandwidth-mib-s".into(),
        "64".into(),
    ];
    let out = wrap(args).stdin(Stdio::null()).output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text += &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ctl migrate: {text}");
    assert!(src.wait_exit(BOOT).success(), "{}", src.stderr());
    drop(dst);
    Some((text, out.status))
}

/// The closing line: "N pass" / "N passes" agrees with N. Returns false
/// when the source went away before `ctl` read the final status (it lingers
/// 1 s for that; a loaded host can miss it), which `ctl` reports as success.
fn assert_summary(text: &str) -> bool {
    let Some(summary) = text.lines().find(|l| l.contains("ferry: migrated to")) else {
        assert!(
            text.contains("has stopped after handing the guest over"),
            "no summary: {text}"
        );
        return false;
    };
    let tail = summary.rsplit(" sent in ").next().unwrap().trim();
    let (n, word) = tail.split_once(' ').unwrap();
    let n: u32 = n.parse().unwrap();
    assert_eq!(word, if n == 1 { "pass" } else { "passes" }, "{summary}");
    true
}

#[test]
fn ctl_migrate_prints_plain_lines_when_not_a_terminal() {
    let Some((text, status)) = ctl_migrate_output(
        "ctl_migrate_prints_plain_lines_when_not_a_terminal",
        |args| {
            let mut c = Command::new(&args[0]);
            c.args(&args[1..]);
            c
        },
    ) else {
        return;
    };
    assert!(status.success(), "{text}");
    assert!(!text.contains('\r') && !text.contains('\x1b'), "{text:?}");
    let progress: Vec<&str> = text.lines().filter(|l| l.contains(": memory ")).collect();
    // In order: phases forward, passes never back.
    let order = ["setup", "precopy", "stop-and-copy", "completed"];
    let keys: Vec<(usize, u32)> = progress
        .iter()
        .map(|l| {
            let (phase, rest) = l.split_once(" pass ").unwrap();
            let pass = rest.split(':').next().unwrap().parse().unwrap();
            (order.iter().position(|p| *p == phase).unwrap(), pass)
        })
        .collect();
    assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{text}");
    for line in &progress {
        let pct: f64 = line
            .split(" MiB (")
            .nth(1)
            .and_then(|r| r.split("%)").next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no percentage in {line}"));
        assert!((0.0..=100.0).contains(&pct), "{line}");
    }
    // One per phase or pass change (and a line every 10 s at most), not
    // one per poll.
    let mut seen: Vec<&str> = progress
        .iter()
        .map(|l| l.split(": memory").next().unwrap())
        .collect();
    seen.dedup();
    assert!(progress.len() <= seen.len() + 2, "{text}");
    if assert_summary(&text) {
        assert!(
            progress.last().unwrap().starts_with("completed pass "),
            "{text}"
        );
    }
}

#[test]
fn ctl_migrate_on_a_terminal_redraws_within_its_width() {
    const COLS: usize = 60;
    let Some((text, status)) = ctl_migrate_output(
        "ctl_migrate_on_a_terminal_redraws_within_its_width",
        |args| {
            let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
            let mut c = Command::new("script");
            c.args([
                "-qec",
                &format!("stty cols {COLS} rows 24; exec {}", quoted.join(" ")),
                "/dev/null",
            ]);
            c
        },
    ) else {
        return;
    };
    assert!(status.success(), "{text}");
    // Redrawn in place: the cursor goes back up over the bars.
    assert!(text.contains("\x1b["), "no terminal control: {text:?}");
    assert!(text.contains("memory pass "), "{text:?}");
    // indicatif pads each bar to the full width and lets the terminal wrap
    // to the next row, so a redraw is one run of COLS-wide rows: each row
    // must start a bar. A line wider than the terminal would shift the rest.
    let starts = [
        "memory pass ",
        "disks ",
        "setup: ",
        "precopy: ",
        "stop-and-copy: ",
        "completed: ",
    ];
    let mut rows = 0;
    for segment in text.split(['\n', '\r']) {
        let visible: Vec<char> = strip_ansi(segment).chars().collect();
        if visible.starts_with(&['f', 'e', 'r', 'r', 'y', ':']) {
            continue; // a closing sentence may wrap like any message
        }
        for row in visible.chunks(COLS) {
            let row: String = row.iter().collect();
            if row.starts_with("ferry: ") {
                break; // the summary, after the bars' last rows
            }
            if row.trim().is_empty() {
                continue;
            }
            assert!(
                starts.iter().any(|s| row.starts_with(s)),
                "row {row:?} does not start a bar: a line overflowed {COLS} columns in {text:?}"
            );
            rows += 1;
        }
    }
    assert!(rows >= 2, "{text:?}");
    assert_summary(&strip_ansi(&text));
}

/// `s` without ANSI escape sequences (CSI ... final byte).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
