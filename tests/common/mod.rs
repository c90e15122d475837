//! Shared helpers for the integration tests: a per-test temp dir, configs,
//! a ferry child process whose serial lines are collected as they arrive,
//! and which is killed (SIGKILL as a last resort) on every exit path.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
pub const TESTKERNEL: &str = env!("FERRY_TESTKERNEL");

/// True when /dev/kvm is usable. A test may skip (false, with the reason
/// printed) only where there is no /dev/kvm at all and CI is not set: on a
/// host that has KVM, or in CI, a KVM test that cannot run fails, so that a
/// green run never hides tests that did not run.
pub fn kvm_available(test: &str) -> bool {
    let ci = in_ci();
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !ci => {
            eprintln!("SKIPPED {test}: there is no /dev/kvm here");
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{test}: CI is set but there is no /dev/kvm: KVM tests must run in CI")
        }
        Err(e) => panic!("{test}: /dev/kvm exists but cannot be opened: {e}"),
    }
}

/// Says why `test` cannot run and lets it return, unless it should have been
/// able to (`must_run`: e.g. root for a loop device, CI for an installed
/// tool): then it fails, so that a green run never hides a test that did not
/// run.
pub fn skip_unless_required(test: &str, must_run: bool, why: &str) {
    if must_run {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// True when CI is set (CI runs every test: nothing may skip there).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// True when this process runs as root (network namespaces, mounts).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid() takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir()
        .expect("create temp dir")
}

/// A VM config for the test kernel.
pub fn config(vcpus: u8, memory_mib: u64, cmdline: &str) -> serde_json::Value {
    serde_json::json!({
        "vcpus": vcpus,
        "memory_mib": memory_mib,
        "kernel": TESTKERNEL,
        "cmdline": cmdline,
    })
}

pub fn write_config(dir: &Path, value: &serde_json::Value) -> PathBuf {
    let path = dir.join("vm.json");
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path
}

#[derive(Default)]
struct Output {
    lines: Vec<String>,
    closed: bool,
}

/// A running `ferry` process with its stdout (the guest's serial) and stderr
/// collected line by line.
pub struct Ferry {
    child: Child,
    out: Arc<(Mutex<Output>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    pub api_sock: Option<PathBuf>,
}

impl Ferry {
    pub fn spawn(args: &[&str]) -> Ferry {
        Ferry::spawn_program(FERRY, args)
    }

    /// Like `spawn`, for a program that execs ferry (e.g. `ip netns exec`).
    pub fn spawn_program(program: &str, args: &[&str]) -> Ferry {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let stdout = child.stdout.take().unwrap();
        let o = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                o.0.lock().unwrap().lines.push(line);
                o.1.notify_all();
            }
            o.0.lock().unwrap().closed = true;
            o.1.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut child_err = child.stderr.take().unwrap();
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = child_err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Ferry {
            child,
            out,
            stderr,
            api_sock: None,
        }
    }

    /// `ferry run --config <config> --api-sock <dir>/api.sock`.
    pub fn run(dir: &Path, config: &serde_json::Value) -> Ferry {
        let cfg = write_config(dir, config);
        let sock = dir.join("api.sock");
        let mut f = Ferry::spawn(&[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ]);
        f.api_sock = Some(sock);
        f
    }

    /// False once the process has exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.out.0.lock().unwrap().lines.clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a line matching `pred` at index >= `from`; returns its index
    /// and text. Panics with everything seen on timeout.
    pub fn wait_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        let (lock, cond) = &*self.out;
        let mut out = lock.lock().unwrap();
        loop {
            if let Some((i, l)) = out
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(l))
            {
                return (i, l.clone());
            }
            let now = Instant::now();
            if out.closed || now >= deadline {
                let lines = out.lines.clone();
                drop(out);
                panic!(
                    "no matching serial line ({}); lines: {:#?}\nstderr: {}",
                    if now >= deadline {
                        "timeout"
                    } else {
                        "output closed"
                    },
                    lines,
                    self.stderr()
                );
            }
            out = cond.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_from(0, timeout, pred).1
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain what is left.
                let (lock, cond) = &*self.out;
                let out = lock.lock().unwrap();
                let _ = cond
                    .wait_timeout_while(out, Duration::from_secs(2), |o| !o.closed)
                    .unwrap();
                std::thread::sleep(Duration::from_millis(20));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "ferry did not exit within {timeout:?}; lines: {:#?}\nstderr: {}",
                    self.lines(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A control-socket request.
    pub fn api(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        ferry::api::client::request(self.api_sock.as_ref().unwrap(), method, path, None)
            .expect("api request")
    }

    /// Waits until the control socket answers.
    pub fn wait_api(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let sock = self.api_sock.as_ref().unwrap();
        while Instant::now() < deadline {
            if ferry::api::client::request(sock, "GET", "/vm", None).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("control socket never answered; stderr: {}", self.stderr());
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `ferry tls-init --out OUT --host H...`: the per-host directories.
pub fn tls_init(out: &Path, hosts: &[&str]) -> Vec<PathBuf> {
    let mut args = vec!["tls-init", "--out", out.to_str().unwrap()];
    for h in hosts {
        args.extend(["--host", h]);
    }
    let o = Command::new(FERRY).args(&args).output().unwrap();
    assert!(
        o.status.success(),
        "tls-init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    hosts.iter().map(|h| out.join(h)).collect()
}

/// The `--tls-dir` that loopback tests under `dir` share (source and
/// destination are both 127.0.0.1): made with `ferry tls-init` once.
pub fn tls_dir(dir: &Path) -> PathBuf {
    let host = dir.join("tls").join("127.0.0.1");
    if !host.join("key.pem").exists() {
        tls_init(&dir.join("tls"), &["127.0.0.1"]);
    }
    host
}

/// `ferry receive` over TLS on an ephemeral port of loopback, with the
/// certificates of [`tls_dir`]; returns it and the port it listens on.
/// Source and destination are this one host, so shared storage may use
/// any file.
pub fn receiver(dir: &Path) -> (Ferry, u16) {
    receiver_with(dir, &["--shared-storage-root", "/"])
}

/// `ferry receive --insecure` on an ephemeral port of loopback (shared
/// storage may use any file, as for [`receiver`]).
pub fn receiver_insecure(dir: &Path) -> (Ferry, u16) {
    receiver_with(dir, &["--insecure", "--shared-storage-root", "/"])
}

/// `ferry receive ... EXTRA` on an ephemeral port of loopback, over TLS
/// with the certificates of [`tls_dir`] unless EXTRA chooses (`--tls-dir`
/// or `--insecure`); no shared-storage root unless EXTRA gives one.
/// Returns it and the port it listens on (from its "waiting for a
/// migration on ..." line).
pub fn receiver_with(dir: &Path, extra: &[&str]) -> (Ferry, u16) {
    let tls;
    let sock = dir.join("dst.sock");
    let mut args = vec![
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    if !extra
        .iter()
        .any(|a| *a == "--tls-dir" || *a == "--insecure")
    {
        tls = tls_dir(dir);
        args.extend(["--tls-dir", tls.to_str().unwrap()]);
    }
    let mut f = Ferry::spawn(&args);
    f.api_sock = Some(sock);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let err = f.stderr();
        if let Some(rest) = err.split("waiting for a migration on 127.0.0.1:").nth(1) {
            let port: u16 = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap();
            return (f, port);
        }
        assert!(
            Instant::now() < deadline && f.running(),
            "receiver never listened: {err}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A testkernel block header (docs/testkernel.md) with word 2 = `w2`.
pub fn block_header(block: u64, w2: u64) -> [u64; 4] {
    let w0 = 0x4b4c_4259_5252_4546u64;
    let w3 = (w0 ^ block.rotate_left(17) ^ w2.rotate_left(31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    [w0, block, w2, w3]
}

/// The header `blk` writes: word 2 is the seed.
pub fn blk_header(block: u64, seed: u64) -> [u64; 4] {
    block_header(block, seed)
}

/// Block `b` of `data`: its four header words, after checking that the rest
/// of the block is zero.
fn image_block(data: &[u8], b: u64) -> Result<[u64; 4], String> {
    let off = (b * 4096) as usize;
    let block = data
        .get(off..off + 4096)
        .ok_or_else(|| format!("image too short for block {b}"))?;
    if block[32..].iter().any(|&x| x != 0) {
        return Err(format!("block {b}: bytes past the header are not zero"));
    }
    Ok(std::array::from_fn(|i| {
        u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap())
    }))
}

/// Checks the first `blocks` 4 KiB blocks of `image` against the block
/// format; returns the first bad block.
pub fn verify_blk_image(image: &Path, blocks: u64, seed: u64) -> Result<(), String> {
    let data = std::fs::read(image).map_err(|e| e.to_string())?;
    for b in 0..blocks {
        let got = image_block(&data, b)?;
        let want = blk_header(b, seed);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                return Err(format!("block {b} word {i}: {g:#x} != {w:#x}"));
            }
        }
    }
    Ok(())
}

/// Checks an image that `blkwrite` was writing (docs/testkernel.md): every
/// block b < `blocks` holds a header with `seed` and a generation >= 1, the
/// blocks before some k at one round R and the rest at R - 1. Returns (R, k),
/// k = `blocks` when all are at R.
pub fn verify_blkwrite_image(image: &Path, blocks: u64, seed: u64) -> Result<(u64, u64), String> {
    let data = std::fs::read(image).map_err(|e| e.to_string())?;
    let mut gens = Vec::new();
    for b in 0..blocks {
        let words = image_block(&data, b)?;
        let w2 = words[2];
        let generation = w2 & 0xffff_ffff;
        if w2 >> 32 != seed & 0xffff_ffff || generation == 0 || words != block_header(b, w2) {
            return Err(format!(
                "block {b}: no blkwrite header for seed {seed}: {words:x?}"
            ));
        }
        gens.push(generation);
    }
    let Some(&r) = gens.first() else {
        return Err("no blocks to check".into());
    };
    let k = gens.iter().position(|&g| g != r).unwrap_or(gens.len());
    if let Some(b) = (k..gens.len()).find(|&b| gens[b] != r - 1) {
        return Err(format!(
            "block {b} is at round {}, expected {} (blocks 0..{k} are at {r})",
            gens[b],
            r - 1
        ));
    }
    Ok((r, k as u64))
}

/// Two hosts on this machine: network namespaces `<name>-a` and `<name>-b`
/// joined by a veth pair (tools/two-hosts), removed on drop — also when the
/// test fails; a test process killed outright (SIGKILL) runs no drop, and
/// the next `up` of any test removes what it left (TWO_HOSTS_OWNER).
pub struct TwoHosts {
    pub name: String,
    pub ip_a: String,
    pub ip_b: String,
}

impl TwoHosts {
    /// None (with a printed reason) where namespaces cannot be made because
    /// this is not root; as root or in CI, a failure panics.
    pub fn create(test: &str) -> Option<TwoHosts> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("fy{}{}", pid % 100_000, n);
        let subnet = format!("10.{}.{}", 100 + (pid % 100), (n * 7 + pid / 100) % 250);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/two-hosts");
        let out = Command::new(script)
            .args(["up", &name, &subnet])
            .env("TWO_HOSTS_OWNER", pid.to_string())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(TwoHosts {
                name,
                ip_a: format!("{subnet}.1"),
                ip_b: format!("{subnet}.2"),
            }),
            other => {
                let _ = Command::new(script).args(["down", &name]).output();
                // As root (and CI runs as root) the namespaces can be made:
                // failing to is a broken host, not a reason to skip.
                skip_unless_required(
                    test,
                    running_as_root() || in_ci(),
                    &format!(
                        "cannot create network namespaces (root and iproute2 needed): {other:?}"
                    ),
                );
                None
            }
        }
    }

    pub fn ns(&self, host: char) -> String {
        format!("{}-{host}", self.name)
    }

    /// `ferry ARGS` in host `a` or `b`.
    pub fn ferry(&self, host: char, args: &[&str]) -> Ferry {
        let ns = self.ns(host);
        let mut all = vec!["netns", "exec", ns.as_str(), FERRY];
        all.extend_from_slice(args);
        Ferry::spawn_program("ip", &all)
    }

    /// Takes host b's end of the link down.
    pub fn link_down(&self) {
        let dev = format!("v{}b", &self.name[..self.name.len().min(12)]);
        let st = Command::new("ip")
            .args(["-n", &self.ns('b'), "link", "set", &dev, "down"])
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/two-hosts");
        let _ = Command::new(script).args(["down", &self.name]).output();
    }
}

/// A switched network on this machine (tools/two-hosts switch-up): hosts
/// `a` and `b` each bridge their tap `tap0` to the switch, and client `c`
/// hangs on it too; all of it removed on drop, also when the test fails.
pub struct Switch {
    pub name: String,
    pub subnet: String,
}

impl Switch {
    /// None (with a printed reason) where namespaces cannot be made because
    /// this is not root; as root or in CI, a failure panics.
    pub fn create(test: &str) -> Option<Switch> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let name = format!("fs{}{}", pid % 100_000, n);
        let subnet = format!("10.{}.{}", 200 + (pid % 50), (n * 7 + pid / 100) % 250);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/two-hosts");
        let out = Command::new(script)
            .args(["switch-up", &name, &subnet])
            .env("TWO_HOSTS_OWNER", pid.to_string())
            .output();
        let sw = Switch { name, subnet };
        match out {
            Ok(o) if o.status.success() => Some(sw),
            other => {
                drop(sw);
                skip_unless_required(
                    test,
                    running_as_root() || in_ci(),
                    &format!("cannot create the switched namespaces: {other:?}"),
                );
                None
            }
        }
    }

    pub fn ns(&self, host: char) -> String {
        format!("{}-{host}", self.name)
    }

    /// Host a is .1, host b .2, the client .100.
    pub fn ip(&self, host: char) -> String {
        let n = match host {
            'a' => 1,
            'b' => 2,
            'c' => 100,
            _ => panic!("no host {host}"),
        };
        format!("{}.{n}", self.subnet)
    }

    /// The address the test guest answers on.
    pub fn guest_ip(&self) -> String {
        format!("{}.50", self.subnet)
    }

    /// `ferry ARGS` in host `a` or `b`.
    pub fn ferry(&self, host: char, args: &[&str]) -> Ferry {
        let ns = self.ns(host);
        let mut all = vec!["netns", "exec", ns.as_str(), FERRY];
        all.extend_from_slice(args);
        Ferry::spawn_program("ip", &all)
    }

    /// A counter of host `host`'s tap0 (`rx_packets`: frames the VMM wrote,
    /// i.e. the guest sent; `tx_packets`: frames for the guest).
    pub fn tap_stat(&self, host: char, what: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(host), "cat"])
            .arg(format!("/sys/class/net/tap0/statistics/{what}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/two-hosts");
        let _ = Command::new(script).args(["down", &self.name]).output();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets
/// it makes live there (setns changes only the calling thread).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&path);
            f()
        })
        .join()
        .unwrap()
    })
}

fn enter_netns(path: &str) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    use std::os::fd::AsRawFd;
    // SAFETY: a valid namespace fd; setns changes only this thread.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// ICMP echo to `ip` from namespace `ns`, `count` times: the round trips
/// of the replies that came within `timeout` each.
pub fn ping(ns: &str, ip: &str, count: u16, timeout: Duration) -> Vec<Duration> {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    in_netns(ns, || {
        // SAFETY: plain socket(2); the fd is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        use std::os::fd::FromRawFd;
        // SAFETY: fd is ours.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut rtts = Vec::new();
        for seq in 0..count {
            let mut pkt = [0u8; 24];
            pkt[0] = 8;
            pkt[4..6].copy_from_slice(&0x4652u16.to_be_bytes());
            pkt[6..8].copy_from_slice(&seq.to_be_bytes());
            pkt[8..].copy_from_slice(b"ferry-ping-test!");
            let c = inet_checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            let t0 = Instant::now();
            if let Some(rtt) = ping_once(&sock, ip, &pkt, seq, t0, timeout) {
                rtts.push(rtt);
            }
        }
        rtts
    })
}

fn ping_once(
    sock: &std::os::fd::OwnedFd,
    ip: std::net::Ipv4Addr,
    pkt: &[u8],
    seq: u16,
    t0: Instant,
    timeout: Duration,
) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    // SAFETY: sockaddr_in is plain data.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    // SAFETY: buffer and address valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
    while t0.elapsed() < timeout {
        let mut buf = [0u8; 1500];
        // SAFETY: buffer valid for its length.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 28 {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        let icmp = &buf[20..n as usize];
        if icmp[0] == 0
            && icmp[6..8] == seq.to_be_bytes()
            && inet_checksum(icmp) == 0
            && icmp[8..] == pkt[8..]
        {
            return Some(t0.elapsed());
        }
    }
    None
}

pub fn inet_checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP echo stream from namespace `ns` to port 7 of a guest: one
/// datagram with a sequence number every `interval`, replies counted by
/// sequence number as they come.
pub struct EchoStream {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<EchoReport>>,
}

/// What came back of an echo stream.
#[derive(Debug, Default)]
pub struct EchoReport {
    pub sent: u64,
    /// When each datagram was sent, by sequence number.
    pub sent_at: Vec<Instant>,
    /// When its (first) reply came, by sequence number.
    pub replied_at: Vec<Option<Instant>>,
    /// Replies to a sequence number already answered.
    pub duplicates: u64,
    /// Replies that do not carry what was sent.
    pub garbled: u64,
    /// Datagrams the client's own host refused to send.
    pub send_errors: u64,
}

impl EchoStream {
    pub fn start(ns: &str, ip: &str, interval: Duration) -> EchoStream {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = format!("/run/netns/{ns}");
        let target: std::net::SocketAddr = format!("{ip}:7").parse().unwrap();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            enter_netns(&path);
            echo_loop(target, interval, &flag)
        });
        EchoStream {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sending, waits a little for late replies, and reports.
    pub fn finish(mut self) -> EchoReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn echo_loop(
    target: std::net::SocketAddr,
    interval: Duration,
    stop: &std::sync::atomic::AtomicBool,
) -> EchoReport {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    sock.set_nonblocking(true).unwrap();
    let mut r = EchoReport::default();
    let start = Instant::now();
    let mut stopped_at = None;
    loop {
        let now = Instant::now();
        if stopped_at.is_none() && stop.load(std::sync::atomic::Ordering::SeqCst) {
            stopped_at = Some(now);
        }
        if stopped_at.is_some_and(|t| now.duration_since(t) > Duration::from_millis(300)) {
            return r;
        }
        if stopped_at.is_none() && now >= start + interval * r.sent as u32 {
            let mut msg = [0u8; 32];
            msg[..8].copy_from_slice(&r.sent.to_be_bytes());
            msg[8..].copy_from_slice(b"ferry-echo-stream-test!!");
            // A send the host refuses (no neighbour yet) is a lost datagram.
            if sock.send_to(&msg, target).is_err() {
                r.send_errors += 1;
            }
            r.sent_at.push(now);
            r.replied_at.push(None);
            r.sent += 1;
        }
        let mut buf = [0u8; 64];
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
            if n != 32 || &buf[8..32] != b"ferry-echo-stream-test!!" || seq >= r.sent {
                r.garbled += 1;
                continue;
            }
            match &mut r.replied_at[seq as usize] {
                Some(_) => r.duplicates += 1,
                slot => *slot = Some(Instant::now()),
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

impl EchoReport {
    pub fn replies(&self) -> u64 {
        self.replied_at.iter().filter(|r| r.is_some()).count() as u64
    }

    /// The longest time without a reply between the first and the last
    /// reply, and when it began.
    pub fn longest_gap(&self) -> (Duration, Option<Instant>) {
        let mut times: Vec<Instant> = self.replied_at.iter().flatten().copied().collect();
        times.sort();
        let mut best = (Duration::ZERO, None);
        for w in times.windows(2) {
            let d = w[1] - w[0];
            if d > best.0 {
                best = (d, Some(w[0]));
            }
        }
        best
    }

    /// Datagrams without a reply that were sent outside the longest gap
    /// (and not in the last 100 ms, whose replies may still be on the way).
    pub fn lost_outside_gap(&self) -> u64 {
        let (gap, start) = self.longest_gap();
        let last = self.sent_at.last().copied();
        self.sent_at
            .iter()
            .zip(&self.replied_at)
            .filter(|(sent, reply)| {
                let in_gap = start
                    .is_some_and(|s| **sent + Duration::from_millis(5) >= s && **sent <= s + gap);
                let late =
                    last.is_some_and(|l| l.duration_since(**sent) < Duration::from_millis(100));
                reply.is_none() && !in_gap && !late
            })
            .count() as u64
    }

    /// Runs of unanswered datagrams, as "N at T ms" relative to `t`.
    pub fn describe_losses(&self, t: Instant) -> String {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, r) in self.replied_at.iter().enumerate() {
            if r.is_some() {
                continue;
            }
            match runs.last_mut() {
                Some((_, end)) if *end + 1 == i => *end = i,
                _ => runs.push((i, i)),
            }
        }
        let ms = |i: usize| {
            let s = self.sent_at[i];
            if s >= t {
                (s - t).as_secs_f64() * 1000.0
            } else {
                -((t - s).as_secs_f64() * 1000.0)
            }
        };
        let runs: Vec<String> = runs
            .iter()
            .map(|&(a, b)| format!("{} sent at {:+.1} ms", b - a + 1, ms(a)))
            .collect();
        format!(
            "unanswered (relative to the hand-over): [{}]",
            runs.join(", ")
        )
    }

    /// Replies that arrived after `t`.
    pub fn replies_after(&self, t: Instant) -> u64 {
        self.replied_at.iter().flatten().filter(|r| **r > t).count() as u64
    }
}

/// Frames seen on the client's interface in namespace `ns` (a raw
/// AF_PACKET socket): ARP and RARP only, with when they came.
pub struct Capture {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<Vec<Captured>>>,
}

/// A captured frame and when it came.
pub type Captured = (Instant, Vec<u8>);

impl Capture {
    pub fn start(ns: &str) -> Capture {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let path = format!("/run/netns/{ns}");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            enter_netns(&path);
            let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket(2); the fd is checked and owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            use std::os::fd::{AsRawFd, FromRawFd};
            // SAFETY: fd is ours.
            let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            ready_tx.send(()).unwrap();
            let mut frames = Vec::new();
            let mut buf = [0u8; 2048];
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                // SAFETY: buffer valid for its length.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 14 {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let f = &buf[..n as usize];
                if matches!(u16::from_be_bytes([f[12], f[13]]), 0x0806 | 0x8035) {
                    frames.push((Instant::now(), f.to_vec()));
                }
            }
            frames
        });
        ready_rx.recv().unwrap();
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<Captured> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// (thread name, Seccomp_filters) of every thread of `pid`: how many
/// filters each has stacked (issue 10: the process list, then its own).
#[allow(dead_code)]
pub fn filter_counts(pid: u32) -> Vec<(String, u32)> {
    let mut v = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return v;
    };
    for t in tasks.flatten() {
        let t = t.path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(t.join("comm")),
            std::fs::read_to_string(t.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let count = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Seccomp_filters in {status}"));
        v.push((comm.trim().to_string(), count));
    }
    v
}
