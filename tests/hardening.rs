//! Issue 10, as an attacker or a careless operator would drive ferry: images
//! used twice, bad inputs of every kind. Each is refused with exit code 2
//! and a line naming what is wrong, and leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const BOOT: Duration = Duration::from_secs(20);

/// `ferry run --config` in `dir` (config file `name`, own socket); waits for
/// it to exit and returns its exit code and stderr.
fn run_expecting_exit(dir: &Path, name: &str, cfg: &serde_json::Value) -> (Option<i32>, String) {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(cfg).unwrap()).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let mut f = Ferry::spawn(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let status = f.wait_exit(BOOT);
    (status.code(), f.stderr())
}

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn idle_with_drives(drives: serde_json::Value) -> serde_json::Value {
    let mut cfg = config(1, 64, "testkernel.workload=idle");
    cfg["drives"] = drives;
    cfg
}

/// A first VM running on `image` (writable), booted and serving.
fn first_vm(dir: &Path, image: &Path) -> Ferry {
    let sub = dir.join("first");
    std::fs::create_dir_all(&sub).unwrap();
    let f = Ferry::run(
        &sub,
        &idle_with_drives(serde_json::json!([{ "id": "d0", "path": image }])),
    );
    f.wait_line(BOOT, |l| l.starts_with("testkernel: booted"));
    f.wait_api(BOOT);
    f
}

fn assert_refused_as_locked(code: Option<i32>, err: &str, named: &Path) {
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.contains("in use by"), "stderr: {err}");
    assert!(
        err.contains(named.to_str().unwrap()),
        "stderr does not name {}: {err}",
        named.display()
    );
}

#[test]
fn second_vm_on_a_locked_image_is_refused() {
    if !kvm_available("second_vm_on_a_locked_image_is_refused") {
        return;
    }
    let dir = tempdir();
    let img = image(dir.path(), "disk.img", 4);
    let mut first = first_vm(dir.path(), &img);
    let (code, err) = run_expecting_exit(
        dir.path(),
        "second.json",
        &idle_with_drives(serde_json::json!([{ "id": "d0", "path": img }])),
    );
    assert_refused_as_locked(code, &err, &img);
    assert!(err.contains("another process"), "stderr: {err}");
    // A read-only attach of an image another VM writes is refused too.
    let (code, err) = run_expecting_exit(
        dir.path(),
        "ro.json",
        &idle_with_drives(serde_json::json!([{ "id": "d0", "path": img, "read_only": true }])),
    );
    assert_refused_as_locked(code, &err, &img);
    // The first VM is unharmed.
    assert!(first.running());
    let (status, st) = first.api("GET", "/vm");
    assert_eq!(status, 200);
    assert_eq!(st["state"], "Running");
}

#[test]
fn locked_image_through_a_hard_link_or_symlink_is_refused() {
    if !kvm_available("locked_image_through_a_hard_link_or_symlink_is_refused") {
        return;
    }
    let dir = tempdir();
    let img = image(dir.path(), "disk.img", 4);
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    let soft = dir.path().join("soft.img");
    std::os::unix::fs::symlink(&img, &soft).unwrap();
    let mut first = first_vm(dir.path(), &img);
    for (name, path) in [("hard.json", &hard), ("soft.json", &soft)] {
        let (code, err) = run_expecting_exit(
            dir.path(),
            name,
            &idle_with_drives(serde_json::json!([{ "id": "d0", "path": path }])),
        );
        assert_refused_as_locked(code, &err, path);
    }
    assert!(first.running());
}

#[test]
fn same_file_twice_in_one_config_is_refused() {
    if !kvm_available("same_file_twice_in_one_config_is_refused") {
        return;
    }
    let dir = tempdir();
    let img = image(dir.path(), "disk.img", 4);
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&img, &hard).unwrap();
    let soft = dir.path().join("soft.img");
    std::os::unix::fs::symlink(&img, &soft).unwrap();
    for other in [&img, &hard, &soft] {
        let (code, err) = run_expecting_exit(
            dir.path(),
            "twice.json",
            &idle_with_drives(serde_json::json!([
                { "id": "a", "path": img },
                { "id": "b", "path": other },
            ])),
        );
        assert_eq!(code, Some(2), "{}: {err}", other.display());
        assert!(
            err.contains("is the same file as drives[0]"),
            "{}: {err}",
            other.display()
        );
        assert!(err.contains(other.to_str().unwrap()), "{err}");
    }
}

#[test]
fn read_only_image_is_shared_by_two_vms() {
    if !kvm_available("read_only_image_is_shared_by_two_vms") {
        return;
    }
    let dir = tempdir();
    let img = image(dir.path(), "base.img", 4);
    let drives = serde_json::json!([{ "id": "base", "path": img, "read_only": true }]);
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let f = Ferry::run(&sub, &idle_with_drives(drives.clone()));
        f.wait_line(BOOT, |l| l.starts_with("testkernel: booted"));
        f.wait_api(BOOT);
        vms.push(f);
    }
    for f in &mut vms {
        assert!(f.running(), "stderr: {}", f.stderr());
    }
    // Shared readers keep a writer out.
    let (code, err) = run_expecting_exit(
        dir.path(),
        "writer.json",
        &idle_with_drives(serde_json::json!([{ "id": "base", "path": img }])),
    );
    assert_refused_as_locked(code, &err, &img);
    assert!(err.contains("read lock"), "stderr: {err}");
}

#[test]
fn image_lock_goes_with_the_vm() {
    if !kvm_available("image_lock_goes_with_the_vm") {
        return;
    }
    let dir = tempdir();
    let img = image(dir.path(), "disk.img", 4);
    let mut first = first_vm(dir.path(), &img);
    let (status, _) = first.api("PUT", "/vm/shutdown");
    assert_eq!(status, 200);
    assert!(first.wait_exit(BOOT).success(), "{}", first.stderr());
    // The next VM on the same image starts.
    let second = first_vm(&dir.path().join("again"), &img);
    let (status, st) = second.api("GET", "/vm");
    assert_eq!((status, st["state"].as_str()), (200, Some("Running")));
}

#[test]
fn failed_start_leaves_the_log_and_images_untouched() {
    if !kvm_available("failed_start_leaves_the_log_and_images_untouched") {
        return;
    }
    let dir = tempdir();
    let locked = image(dir.path(), "locked.img", 4);
    let _first = first_vm(dir.path(), &locked);
    let log = dir.path().join("serial.log");
    let new_image = dir.path().join("new.img");
    let garbage = dir.path().join("garbage-kernel");
    std::fs::write(&garbage, vec![0x5a; 64 << 10]).unwrap();

    // Fails at the image lock, then at the kernel: both after the log and
    // the new image would have been made.
    let locked_cfg = {
        let mut c = idle_with_drives(serde_json::json!([
            { "id": "new", "path": new_image, "create_size_mib": 8 },
            { "id": "locked", "path": locked },
        ]));
        c["serial"] = serde_json::json!(log);
        c
    };
    let garbage_cfg = {
        let mut c = idle_with_drives(serde_json::json!([
            { "id": "new", "path": new_image, "create_size_mib": 8 },
        ]));
        c["serial"] = serde_json::json!(log);
        c["kernel"] = serde_json::json!(garbage);
        c
    };
    for (name, cfg) in [("locked.json", locked_cfg), ("garbage.json", garbage_cfg)] {
        std::fs::write(&log, b"the previous run's log\n").unwrap();
        let (code, err) = run_expecting_exit(dir.path(), name, &cfg);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"the previous run's log\n",
            "{name}: the log was touched"
        );
        assert!(
            !new_image.exists(),
            "{name}: {} was left",
            new_image.display()
        );
    }
    // Without a log yet, none is made.
    std::fs::remove_file(&log).unwrap();
    let (code, err) = run_expecting_exit(dir.path(), "garbage2.json", &{
        let mut c = idle_with_drives(serde_json::json!([]));
        c["serial"] = serde_json::json!(log);
        c["kernel"] = serde_json::json!(garbage);
        c
    });
    assert_eq!(code, Some(2), "{err}");
    assert!(!log.exists());
}

/// An x86_64 ELF executable with one PT_LOAD of `filesz` file bytes and
/// `memsz` memory bytes at `paddr`, entered at `entry`.
fn lying_elf(entry: u64, paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..];
    ph[..4].copy_from_slice(&1u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&filesz.to_le_bytes());
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    f.extend(std::iter::repeat_n(0xf4u8, filesz as usize));
    f
}

/// A bzImage whose setup header claims a protected-mode kernel of
/// `syssize` × 16 bytes, followed by 4 KiB.
fn lying_bzimage(syssize: u32) -> Vec<u8> {
    let mut f = vec![0u8; 5 * 512 + 4096];
    f[0x1f1] = 4;
    f[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    f[0x202..0x206].copy_from_slice(b"HdrS");
    f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    f[0x211] = 1;
    f[0x214..0x218].copy_from_slice(&(1u32 << 20).to_le_bytes());
    f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
    f
}

#[test]
fn lying_kernels_are_refused_saying_what_is_wrong() {
    if !kvm_available("lying_kernels_are_refused_saying_what_is_wrong") {
        return;
    }
    let dir = tempdir();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        // 64 file bytes, 1 GiB in memory: a 64 MiB guest has no room.
        (
            "memsz",
            lying_elf(1 << 20, 1 << 20, 64, 1 << 30),
            "does not fit in guest RAM",
        ),
        (
            "entry",
            lying_elf(0x30_0000, 1 << 20, 64, 64),
            "entry point 0x300000 is not inside a loaded segment",
        ),
        ("below", lying_elf(0x8000, 0x8000, 64, 64), "below 1 MiB"),
        (
            "bzimage",
            lying_bzimage(1 << 16),
            "says the kernel is 1048576 bytes",
        ),
    ];
    for (name, bytes, want) in cases {
        let kernel = dir.path().join(format!("{name}.kernel"));
        std::fs::write(&kernel, bytes).unwrap();
        let mut cfg = config(1, 64, "");
        cfg["kernel"] = serde_json::json!(kernel);
        let (code, err) = run_expecting_exit(dir.path(), &format!("{name}.json"), &cfg);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.contains(want), "{name}: wanted {want:?}: {err}");
        assert!(err.contains(kernel.to_str().unwrap()), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn six_hundred_oversized_requests_leave_the_socket_serving() {
    if !kvm_available("six_hundred_oversized_requests_leave_the_socket_serving") {
        return;
    }
    use std::io::{Read, Write};
    let dir = tempdir();
    let f = Ferry::run(dir.path(), &config(1, 64, "testkernel.workload=idle"));
    f.wait_line(BOOT, |l| l.starts_with("testkernel: booted"));
    f.wait_api(BOOT);
    let sock = f.api_sock.clone().unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", f.pid()))
            .unwrap()
            .count()
    };
    let before = fds();
    for i in 0..600 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(BOOT)).unwrap();
        s.write_all(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n{")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 413 "), "request {i}: {answer}");
        assert!(answer.contains("request body too large"), "{answer}");
    }
    // A header far over the bound gets 431, the server reading no more of
    // it than the bound.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(BOOT)).unwrap();
    let mut big = b"GET /vm HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 80 << 10));
    let _ = s.write_all(&big);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:.200}");
    drop(s);

    let (status, st) = f.api("GET", "/vm");
    assert_eq!((status, st["state"].as_str()), (200, Some("Running")));
    std::thread::sleep(Duration::from_millis(200));
    let after = fds();
    assert!(
        after <= before + 2,
        "{before} descriptors before the requests, {after} after"
    );
}
