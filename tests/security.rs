//! The confined process (issue 10, items 1 and 2): seccomp filters on every
//! thread, a forbidden syscall really kills with its name, `--uid/--gid`
//! runs unprivileged (a VM, and a receiver taking a live migration), bad
//! values are refused, `--seccomp none` says what it does.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(60);
const NOBODY: &str = "65534";

/// (thread name, its /proc status) for every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        v.push((comm.trim().to_string(), status));
    }
    v
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn assert_all_filtered(pid: u32) {
    // The control socket answers as soon as the event loop turns, which can
    // be before a just-spawned vCPU thread has run far enough to take its
    // name: wait (bounded) for it to be named.
    let deadline = std::time::Instant::now() + WAIT;
    let threads = loop {
        let threads = threads(pid);
        if threads.iter().any(|(n, _)| n == "vcpu0") || std::time::Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(threads.iter().any(|(n, _)| n == "vcpu0"), "{threads:?}");
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp"), "2", "thread {name}");
        assert_eq!(field(status, "NoNewPrivs"), "1", "thread {name}");
    }
}

#[test]
fn every_thread_of_a_running_vm_is_filtered_and_it_still_snapshots_and_restores() {
    if !kvm_available("every_thread_of_a_running_vm_is_filtered") {
        return;
    }
    let dir = tempdir();
    let mut vm = Ferry::run(dir.path(), &config(2, 64, "testkernel.workload=idle"));
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    vm.wait_api(WAIT);
    assert_all_filtered(vm.pid());
    // The control socket, a snapshot and a restore all work filtered.
    let snap = dir.path().join("snap");
    let (code, body) = ferry::api::client::request(
        vm.api_sock.as_ref().unwrap(),
        "PUT",
        "/snapshot/create",
        Some(&serde_json::json!({ "dir": snap })),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    vm.api("PUT", "/vm/shutdown");
    assert!(vm.wait_exit(WAIT).success(), "{}", vm.stderr());
    let sock = dir.path().join("restored.sock");
    let mut restored = Ferry::spawn(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    restored.api_sock = Some(sock);
    restored.wait_api(WAIT);
    assert_all_filtered(restored.pid());
    restored.api("PUT", "/vm/resume");
    restored.wait_line(WAIT, |l| l.starts_with("testkernel: tick "));
    restored.api("PUT", "/vm/shutdown");
    assert!(restored.wait_exit(WAIT).success(), "{}", restored.stderr());
}

/// Forks a child that installs Ferry's real filter `filter` (and the
/// SIGSYS handler), then runs `forbidden`; returns its exit code and
/// stderr. The BPF is compiled before the fork: the child only makes
/// syscalls.
fn run_filtered(filter: &str, forbidden: fn()) -> (i32, String) {
    use ferry::security::seccomp::{self, SeccompMode};
    let program = seccomp::program(SeccompMode::Kill, filter).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child makes only async-signal-safe calls, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child: descriptor juggling, the filter, _exit.
        unsafe {
            libc::dup2(fds[1], 2);
            seccomp::install_sigsys_handler().unwrap();
            if seccompiler::apply_filter(&program).is_err() {
                libc::_exit(3);
            }
            forbidden();
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(fds[1]) };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut err = String::new();
    // SAFETY: the read end is ours alone.
    unsafe { std::fs::File::from_raw_fd(fds[0]) }
        .read_to_string(&mut err)
        .unwrap();
    assert!(libc::WIFEXITED(status), "status {status:#x}: {err}");
    (libc::WEXITSTATUS(status), err)
}

fn getppid() {
    // SAFETY: getppid takes nothing.
    unsafe { libc::getppid() };
}

fn fork() {
    // SAFETY: the child (if the filter let it be) exits at once.
    if unsafe { libc::fork() } == 0 {
        unsafe { libc::_exit(0) };
    }
}

fn execve() {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: valid NUL-terminated path and argv; envp empty.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), [std::ptr::null()].as_ptr()) };
}

/// Exits 42 when clone3 is refused with ENOSYS (glibc then uses clone).
fn clone3_enosys() {
    // SAFETY: a NULL clone_args with size 0 creates nothing either way.
    let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    // SAFETY: reading errno.
    if r == -1 && unsafe { *libc::__errno_location() } == libc::ENOSYS {
        unsafe { libc::_exit(42) };
    }
}

fn open_file() {
    // SAFETY: a valid path; the result does not matter.
    unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
}

/// An open for writing (the control threads may only open to read).
fn create_file() {
    // SAFETY: a valid path; the filter traps before anything is created.
    unsafe {
        libc::open(
            c"/tmp/ferry-seccomp-must-not-exist".as_ptr(),
            libc::O_WRONLY | libc::O_CREAT,
            0o600,
        )
    };
}

fn open_socket() {
    // SAFETY: creating a socket; the result does not matter.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
}

fn open_udp_socket() {
    // SAFETY: creating a socket; the result does not matter.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
}

/// A TCP socket (allowed where TCP is), then `listen` on it.
fn listen_socket() {
    // SAFETY: creating a socket and listening on it; nothing is bound.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        libc::listen(s, 1);
    }
}

fn make_memfd() {
    // SAFETY: a valid name; the result does not matter.
    unsafe { libc::memfd_create(c"x".as_ptr(), 0) };
}

/// `KVM_CREATE_VM` (`_IO(0xAE, 0x01)`) on stdin: the filter traps it on
/// its request number before any descriptor is looked at.
fn kvm_create_vm() {
    // SAFETY: an ioctl on fd 0; trapped, or failing with ENOTTY.
    unsafe { libc::ioctl(0, 0xae01) };
}

/// A thread's clone (flags as glibc gives them); the filter traps it before
/// the kernel sees it, which would refuse the NULL stack anyway.
fn spawn_thread() {
    let flags = libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND;
    let flags = flags | libc::CLONE_THREAD | libc::CLONE_SYSVSEM;
    // SAFETY: see above: the call never creates a thread here.
    unsafe { libc::syscall(libc::SYS_clone, flags, std::ptr::null::<u8>()) };
}

#[test]
fn the_control_socket_threads_narrow_themselves_below_the_process_filter() {
    if !kvm_available("the_control_socket_threads_narrow_themselves") {
        return;
    }
    let dir = tempdir();
    let mut vm = idle_vm_with_a_drive(dir.path());
    // A request has gone through: the accept thread has narrowed itself.
    vm.wait_api(WAIT);
    // A connection that sends nothing keeps its thread waiting for the
    // request, narrowed before it reads a byte.
    let mut held = std::os::unix::net::UnixStream::connect(vm.api_sock.as_ref().unwrap()).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let counts = loop {
        let counts = filter_counts(vm.pid());
        let conn = counts.iter().any(|(n, c)| n == "ferry-api-conn" && *c == 3);
        if conn || std::time::Instant::now() > deadline {
            break counts;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let count = |name: &str| {
        counts
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no thread {name}: {counts:?}"))
            .1
    };
    // The process-wide list is on every thread; each of Ferry's threads
    // stacks its own on top: the event loop (the main thread, "ferry"),
    // the drive's request thread, the vCPU, the control socket's threads.
    let process = 1;
    assert_eq!(count("ferry"), process + 1, "{counts:?}");
    assert_eq!(count("blk-d0"), process + 1, "{counts:?}");
    assert_eq!(count("ferry-api"), process + 1, "{counts:?}");
    assert_eq!(count("ferry-api-conn"), process + 2, "{counts:?}");
    assert_eq!(count("vcpu0"), process + 1, "{counts:?}");
    // Narrowed, they still serve: the held connection gets its answer.
    use std::io::{Read, Write};
    held.write_all(b"GET /vm HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    held.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    vm.api("PUT", "/vm/shutdown");
    assert!(vm.wait_exit(WAIT).success(), "{}", vm.stderr());
}

#[test]
fn a_syscall_outside_a_filter_kills_the_process_naming_it() {
    for (filter, forbidden, name) in [
        ("vcpu", getppid as fn(), "getppid (110)"),
        ("vcpu", open_file, "openat (257)"),
        ("process", getppid, "getppid (110)"),
        ("process", fork, "clone (56)"),
        ("process", execve, "execve (59)"),
        ("api", create_file, "openat (257)"),
        ("api", fork, "clone (56)"),
        ("api", execve, "execve (59)"),
        ("api", open_socket, "socket (41)"),
        ("api-conn", create_file, "openat (257)"),
        ("api-conn", open_socket, "socket (41)"),
        ("api-conn", spawn_thread, "clone (56)"),
        ("api-conn", getppid, "getppid (110)"),
        // The guest-facing drive thread opens nothing, makes no UDP or
        // Unix sockets, starts no threads, makes no KVM ioctl.
        ("blk", open_file, "openat (257)"),
        ("blk", open_udp_socket, "socket (41)"),
        ("blk", spawn_thread, "clone (56)"),
        ("blk", kvm_create_vm, "ioctl (16)"),
        // Before a peer is authenticated: no sockets, no writable opens,
        // no threads, no KVM ioctls but the CPUID query.
        ("handshake", open_socket, "socket (41)"),
        ("handshake", create_file, "openat (257)"),
        ("handshake", spawn_thread, "clone (56)"),
        ("handshake", kvm_create_vm, "ioctl (16)"),
        ("lane-in", open_file, "openat (257)"),
        ("lane-out", open_file, "openat (257)"),
        ("share", open_socket, "socket (41)"),
        ("share", kvm_create_vm, "ioctl (16)"),
        ("storage-copy", kvm_create_vm, "ioctl (16)"),
        ("throttle", open_file, "openat (257)"),
        ("prefault", open_file, "openat (257)"),
        ("acceptor", open_socket, "socket (41)"),
        // The event loop listens for nothing and makes no guest memory.
        ("event-loop", listen_socket, "listen (50)"),
        ("event-loop", make_memfd, "memfd_create (319)"),
        ("migration", listen_socket, "listen (50)"),
        ("migration", open_udp_socket, "socket (41)"),
    ] {
        let (code, err) = run_filtered(filter, forbidden);
        assert!(code != 42);
        assert_eq!(
            code,
            ferry::security::seccomp::EXIT_SECCOMP,
            "{filter}: {err}"
        );
        assert!(
            err.starts_with("ferry: seccomp: thread '")
                && err.contains(&format!(" made syscall {name}")),
            "{filter} / {name}: {err}"
        );
    }
}

#[test]
fn threads_are_made_with_clone_not_clone3() {
    let (code, err) = run_filtered("process", clone3_enosys);
    assert_eq!(code, 42, "{err}");
}

#[test]
fn seccomp_log_filters_every_thread_and_the_guest_runs() {
    if !kvm_available("seccomp_log_filters_every_thread_and_the_guest_runs") {
        return;
    }
    let dir = tempdir();
    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let vm = Ferry::spawn(&["run", "--config", cfg.to_str().unwrap(), "--seccomp", "log"]);
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    assert_all_filtered(vm.pid());
}

#[test]
fn seccomp_none_runs_unfiltered_and_says_so() {
    if !kvm_available("seccomp_none_runs_unfiltered_and_says_so") {
        return;
    }
    let dir = tempdir();
    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let vm = Ferry::spawn(&[
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--seccomp",
        "none",
    ]);
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    assert!(vm
        .stderr()
        .contains("--seccomp none: no syscall filters; for debugging only"));
    for (name, status) in threads(vm.pid()) {
        assert_eq!(field(&status, "Seccomp"), "0", "thread {name}");
    }
}

fn refused(args: &[&str]) -> String {
    let o = Command::new(FERRY).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    err
}

#[test]
fn bad_uid_gid_and_seccomp_values_are_refused_before_anything_starts() {
    let dir = tempdir();
    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let cfg = cfg.to_str().unwrap();
    let err = refused(&["run", "--config", cfg, "--uid", "0", "--gid", "65534"]);
    assert!(err.contains("--uid 0 is root's"), "{err}");
    let err = refused(&["run", "--config", cfg, "--uid", "65534", "--gid", "0"]);
    assert!(err.contains("--gid 0 is root's"), "{err}");
    let err = refused(&["run", "--config", cfg, "--uid", "65534"]);
    assert!(err.contains("--gid"), "{err}");
    let err = refused(&["run", "--config", cfg, "--uid=-1", "--gid", "1"]);
    assert!(err.contains("--uid"), "{err}");
    let err = refused(&["run", "--config", cfg, "--seccomp", "off"]);
    assert!(
        err.contains("kill") && err.contains("log") && err.contains("none"),
        "{err}"
    );
    let err = refused(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--uid",
        "nobody",
        "--gid",
        "1",
    ]);
    assert!(err.contains("--uid"), "{err}");
}

/// Root-only tests: true when they can run here (else skipped, or failed
/// in CI, which runs as root).
fn as_root(test: &str) -> bool {
    if !kvm_available(test) {
        return false;
    }
    if !running_as_root() {
        skip_unless_required(test, in_ci(), "--uid needs ferry started as root");
        return false;
    }
    true
}

/// A temp dir the unprivileged user can pass through (tempdir is 0700).
fn passable(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
}

#[test]
fn a_vm_started_with_uid_runs_unprivileged() {
    let test = "a_vm_started_with_uid_runs_unprivileged";
    if !as_root(test) {
        return;
    }
    let dir = tempdir();
    passable(dir.path());
    let cfg = write_config(dir.path(), &config(2, 64, "testkernel.workload=idle"));
    let sock = dir.path().join("api.sock");
    let args = [
        "run",
        "--config",
        cfg.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    let mut vm = Ferry::spawn(&[&args[..], &["--uid", NOBODY, "--gid", NOBODY]].concat());
    vm.api_sock = Some(sock);
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    vm.wait_api(WAIT);
    assert_all_filtered(vm.pid());
    for (name, status) in threads(vm.pid()) {
        assert!(
            field(&status, "Uid")
                .split_whitespace()
                .all(|u| u == NOBODY),
            "{name}"
        );
        assert!(
            field(&status, "Gid")
                .split_whitespace()
                .all(|g| g == NOBODY),
            "{name}"
        );
        assert_eq!(field(&status, "Groups"), "", "{name}");
        assert_eq!(field(&status, "CapEff"), "0000000000000000", "{name}");
        assert_eq!(field(&status, "CapPrm"), "0000000000000000", "{name}");
    }
    // The socket is the dropped user's now, but another process running as
    // that user is not served: only root and whoever started ferry are.
    let other = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            NOBODY,
            "--regid",
            NOBODY,
            "--clear-groups",
            "curl",
            "-sS",
        ])
        .args(["--max-time", "10", "--unix-socket"])
        .arg(vm.api_sock.as_ref().unwrap())
        .arg("http://localhost/vm")
        .output()
        .expect("setpriv and curl");
    assert!(
        !other.status.success() && other.stdout.is_empty(),
        "a uid {NOBODY} client was answered: {other:?}"
    );
    // ferry writes the line before it closes the connection, but the test
    // reads ferry's stderr on a thread of its own: wait (bounded) for it.
    let deadline = std::time::Instant::now() + WAIT;
    while !vm
        .stderr()
        .contains("refused a client running as uid 65534")
    {
        assert!(std::time::Instant::now() < deadline, "{}", vm.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    let (code, _) = vm.api("GET", "/vm");
    assert_eq!(code, 200);
    // A snapshot goes where the user may write, and is refused clearly
    // where it may not.
    let mine = dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    chown_nobody(&mine);
    let snapshot = |d: &Path| {
        ferry::api::client::request(
            vm.api_sock.as_ref().unwrap(),
            "PUT",
            "/snapshot/create",
            Some(&serde_json::json!({ "dir": d })),
        )
        .unwrap()
    };
    let roots = dir.path().join("roots");
    std::fs::create_dir(&roots).unwrap();
    let (code, body) = snapshot(&roots.join("snap"));
    assert!((400..600).contains(&code), "{body}");
    assert!(body.to_string().contains("ermission"), "{body}");
    let (code, body) = snapshot(&mine.join("snap"));
    assert_eq!(code, 200, "{body}");
    vm.api("PUT", "/vm/shutdown");
    assert!(vm.wait_exit(WAIT).success(), "{}", vm.stderr());
}

#[test]
fn a_receiver_started_with_uid_takes_a_live_migration() {
    let test = "a_receiver_started_with_uid_takes_a_live_migration";
    if !as_root(test) {
        return;
    }
    let dir = tempdir();
    // The receiver binds its control socket here once the guest arrives.
    chown_nobody(dir.path());
    let nobody = ["--uid", NOBODY, "--gid", NOBODY];
    let (mut dst, port) = receiver_with(
        dir.path(),
        &[&nobody[..], &["--shared-storage-root", "/"]].concat(),
    );
    let mut src = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    src.wait_line(WAIT, |l| l == "testkernel: tick 1");
    let (code, body) = ferry::api::client::request(
        src.api_sock.as_ref().unwrap(),
        "PUT",
        "/migration/send",
        Some(&serde_json::json!({
            "destination": format!("127.0.0.1:{port}"),
            "tls_dir": tls_dir(dir.path()),
        })),
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let deadline = std::time::Instant::now() + WAIT;
    while src.running() {
        assert!(
            std::time::Instant::now() < deadline && dst.running(),
            "source: {}\ndestination: {}",
            src.stderr(),
            dst.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.wait_line_from(0, WAIT, |l| l.starts_with("testkernel: tick "));
    for (name, status) in threads(dst.pid()) {
        assert!(
            field(&status, "Uid")
                .split_whitespace()
                .all(|u| u == NOBODY),
            "{name}"
        );
        assert_eq!(field(&status, "CapEff"), "0000000000000000", "{name}");
        assert_eq!(field(&status, "Seccomp"), "2", "{name}");
    }
    dst.api("PUT", "/vm/shutdown");
    assert!(dst.wait_exit(WAIT).success(), "{}", dst.stderr());
}

#[test]
fn a_receiver_whose_dir_the_user_cannot_write_is_refused_up_front() {
    let test = "a_receiver_whose_dir_the_user_cannot_write_is_refused_up_front";
    if !as_root(test) {
        return;
    }
    let dir = tempdir();
    passable(dir.path());
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let err = refused(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--dir",
        incoming.to_str().unwrap(),
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
    ]);
    assert!(
        err.contains("--dir") && err.contains("not writable by uid 65534"),
        "{err}"
    );
    chown_nobody(&incoming);
    let sock = dir.path().join("dst.sock");
    let err = refused(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--insecure",
        "--dir",
        incoming.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
    ]);
    assert!(
        err.contains("--api-sock's directory") && err.contains("not writable by uid 65534"),
        "{err}"
    );
}

/// A config named by a relative path whose net device is refused: the
/// error is the clear one, under the default filters (resolving the path
/// for the message once killed the process with `getcwd`).
#[test]
fn a_bad_config_by_a_relative_path_is_refused_clearly_under_the_filters() {
    let test = "a_bad_config_by_a_relative_path_is_refused_clearly_under_the_filters";
    if !kvm_available(test) {
        return;
    }
    let dir = tempdir();
    let mut cfg = config(1, 64, "testkernel.workload=idle");
    cfg["net"] = serde_json::json!([{ "id": "n0", "tap": "fyrel0", "mac": "ff:ff:ff:ff:ff:ff" }]);
    let path = write_config(dir.path(), &cfg);
    let name = path.file_name().unwrap();
    let out = Command::new(FERRY)
        .args(["run", "--config"])
        .arg(name)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is a multicast address"), "{err}");
    assert!(!err.contains("seccomp"), "{err}");
}

/// `--chroot DIR` with `--uid`: every thread's root is DIR once set up;
/// paths given later (a snapshot directory) resolve inside it, `..` never
/// leaves it; the control socket inside it is removed at exit; and the
/// snapshot taken in the jail restores.
#[test]
fn a_vm_started_with_chroot_is_confined_to_it() {
    let test = "a_vm_started_with_chroot_is_confined_to_it";
    if !as_root(test) {
        return;
    }
    let dir = tempdir();
    passable(dir.path());
    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    chown_nobody(&jail);
    let cfg = write_config(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    let cfg = cfg.to_str().unwrap();
    let jail_s = jail.to_str().unwrap();
    let confined = ["--uid", NOBODY, "--gid", NOBODY, "--chroot", jail_s];

    // Refused up front: a socket ferry could not remove from inside, the
    // host's root, a missing directory, without --uid, and a receive.
    let outside = dir.path().join("api.sock");
    let args = [
        "run",
        "--config",
        cfg,
        "--api-sock",
        outside.to_str().unwrap(),
    ];
    let err = refused(&[&args[..], &confined[..]].concat());
    assert!(err.contains("must lie inside --chroot"), "{err}");
    assert!(!outside.exists());
    let err = refused(&[
        "run", "--config", cfg, "--uid", NOBODY, "--gid", NOBODY, "--chroot", "/",
    ]);
    assert!(err.contains("host's root"), "{err}");
    let missing = dir.path().join("missing");
    let err = refused(&[
        "run",
        "--config",
        cfg,
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "--chroot",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("missing"), "{err}");
    let err = refused(&["run", "--config", cfg, "--chroot", jail_s]);
    assert!(err.contains("--uid"), "{err}");
    let err = refused(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--dir",
        jail_s,
        "--insecure",
        "--uid",
        NOBODY,
        "--gid",
        NOBODY,
        "--chroot",
        jail_s,
    ]);
    assert!(err.contains("only for ferry run"), "{err}");

    let sock = jail.join("api.sock");
    let args = ["run", "--config", cfg, "--api-sock", sock.to_str().unwrap()];
    let mut vm = Ferry::spawn(&[&args[..], &confined[..]].concat());
    vm.api_sock = Some(sock.clone());
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    vm.wait_api(WAIT);
    assert_all_filtered(vm.pid());
    let canonical = std::fs::canonicalize(&jail).unwrap();
    for entry in std::fs::read_dir(format!("/proc/{}/task", vm.pid())).unwrap() {
        let task = entry.unwrap().path();
        assert_eq!(
            std::fs::read_link(task.join("root")).unwrap(),
            canonical,
            "{task:?}"
        );
        assert_eq!(
            std::fs::read_link(task.join("cwd")).unwrap(),
            canonical,
            "{task:?}"
        );
    }
    let snapshot = |d: &str| {
        ferry::api::client::request(
            &sock,
            "PUT",
            "/snapshot/create",
            Some(&serde_json::json!({ "dir": d })),
        )
        .unwrap()
    };
    let (code, body) = snapshot("/snap");
    assert_eq!(code, 200, "{body}");
    assert!(jail.join("snap/vmstate").exists() && jail.join("snap/memory").exists());
    // `..` at the new root stays at it.
    let (code, body) = snapshot("/../../escaped");
    assert_eq!(code, 200, "{body}");
    assert!(jail.join("escaped/vmstate").exists());
    assert!(!dir.path().join("escaped").exists() && !Path::new("/escaped").exists());
    vm.api("PUT", "/vm/shutdown");
    assert!(vm.wait_exit(WAIT).success(), "{}", vm.stderr());
    assert!(!sock.exists(), "the control socket was left behind");

    // What the jailed VM wrote is a real snapshot.
    let sock2 = dir.path().join("restored.sock");
    let mut restored = Ferry::spawn(&[
        "run",
        "--restore",
        jail.join("snap").to_str().unwrap(),
        "--api-sock",
        sock2.to_str().unwrap(),
    ]);
    restored.api_sock = Some(sock2);
    restored.wait_api(WAIT);
    let (_, vm_state) = restored.api("GET", "/vm");
    assert_eq!(vm_state["restored"], true, "{vm_state}");
    let seen = restored.lines().len();
    restored.wait_line_from(seen, WAIT, |l| l.starts_with("testkernel: tick"));
    restored.api("PUT", "/vm/shutdown");
    assert!(restored.wait_exit(WAIT).success(), "{}", restored.stderr());
}

/// The tid of `pid`'s thread named `name`, waiting (bounded) for it.
fn tid_of(pid: u32, name: &str) -> i32 {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                return t.file_name().to_string_lossy().parse().unwrap();
            }
        }
        assert!(std::time::Instant::now() < deadline, "no thread {name}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A shutdown signal sent to the process may land on any of its threads,
/// and its handler then runs under that thread's own filter (a trace once
/// showed a SIGTERM on a vCPU thread kill the process from its list).
/// Sent to each narrowed thread in turn, it stops the VM cleanly.
#[test]
fn a_shutdown_signal_on_any_thread_stops_the_vm_cleanly() {
    if !kvm_available("a_shutdown_signal_on_any_thread_stops_the_vm_cleanly") {
        return;
    }
    for thread in ["vcpu0", "blk-d0", "ferry-api", "ferry"] {
        let dir = tempdir();
        let mut vm = idle_vm_with_a_drive(dir.path());
        let tid = tid_of(vm.pid(), thread);
        // SAFETY: signalling our own child's thread.
        let r = unsafe { libc::syscall(libc::SYS_tgkill, vm.pid() as i32, tid, libc::SIGTERM) };
        assert_eq!(r, 0, "{thread}");
        let status = vm.wait_exit(WAIT);
        assert_eq!(status.code(), Some(0), "{thread}: {}", vm.stderr());
        assert!(
            vm.stderr().contains("ferry: SIGTERM: stopping the VM"),
            "{thread}: {}",
            vm.stderr()
        );
    }
}

/// A second shutdown signal ends the process by the signal (its handler
/// restores the default action and raises it again: `rt_sigaction`, then
/// `tgkill`), also when both land on a narrowed thread: never a kill by
/// the filter.
#[test]
fn a_second_shutdown_signal_on_a_narrowed_thread_ends_the_process_by_the_signal() {
    if !kvm_available("a_second_shutdown_signal_on_a_narrowed_thread") {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    for thread in ["blk-d0", "vcpu0"] {
        let dir = tempdir();
        let mut vm = idle_vm_with_a_drive(dir.path());
        let tid = tid_of(vm.pid(), thread);
        for _ in 0..2 {
            // SAFETY: signalling our own child's thread.
            let r = unsafe { libc::syscall(libc::SYS_tgkill, vm.pid() as i32, tid, libc::SIGTERM) };
            assert_eq!(r, 0, "{thread}");
        }
        let status = vm.wait_exit(WAIT);
        // The first may have stopped the VM before the second came.
        assert!(
            status.signal() == Some(libc::SIGTERM) || status.code() == Some(0),
            "{thread}: {status:?}: {}",
            vm.stderr()
        );
        assert!(
            !vm.stderr().contains("seccomp"),
            "{thread}: {}",
            vm.stderr()
        );
    }
}

/// An idle guest with one drive (`d0`, 1 MiB), booted and serving.
fn idle_vm_with_a_drive(dir: &Path) -> Ferry {
    let image = dir.join("d0.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut cfg = config(1, 64, "testkernel.workload=idle");
    cfg["drives"] = serde_json::json!([{ "id": "d0", "path": image }]);
    let vm = Ferry::run(dir, &cfg);
    vm.wait_line(WAIT, |l| l == "testkernel: tick 1");
    vm.wait_api(WAIT);
    vm
}
