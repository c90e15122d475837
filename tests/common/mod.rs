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

/// `ferry receive` on an ephemeral port of loopback; returns it and the port
/// it listens on (from its "waiting for a migration on ..." line). Source
/// and destination are this one host, so shared storage may use any file.
pub fn receiver(dir: &Path) -> (Ferry, u16) {
    receiver_with(dir, &["--shared-storage-root", "/"])
}

/// `receiver` with other options than the shared-storage root.
pub fn receiver_with(dir: &Path, extra: &[&str]) -> (Ferry, u16) {
    let sock = dir.join("dst.sock");
    let mut args = vec![
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
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
/// test fails.
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
        let out = Command::new(script).args(["up", &name, &subnet]).output();
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
