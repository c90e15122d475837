//! Builds the guest test kernel (`resources/guest`, a separate no_std cargo
//! package) and hands its path to the crate as `FERRY_TESTKERNEL`.
//!
//! The guest is built by a nested `cargo build --release` run inside its own
//! directory, so that its `.cargo/config.toml` (bare-metal rustflags, linker
//! script) applies, into its own target directory under ours. The ELF is then
//! copied to `<target>/ferry-testkernel` for tests, demos and benchmarks.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST: &str = "resources/guest";

fn main() {
    for input in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "linker.ld",
    ] {
        println!("cargo:rerun-if-changed={GUEST}/{input}");
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = target_dir(&out_dir);
    let guest_target = target_dir.join("ferry-testkernel-build");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(manifest_dir.join(GUEST))
        .args(["build", "--release", "--target-dir"])
        .arg(&guest_target);
    // Cargo hands build scripts settings meant for *this* build (flags,
    // target, profile, wrappers, jobserver); the guest must not inherit them.
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(leaks_into_guest) {
            cmd.env_remove(&key);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the test kernel: {e}"));
    if !output.status.success() {
        panic!(
            "building the test kernel ({GUEST}) failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Copy next to the other artifacts, atomically: a concurrent debug and
    // release build may both be doing this.
    let built = guest_target.join("release").join("ferry-testkernel");
    let dest = target_dir.join("ferry-testkernel");
    let tmp = target_dir.join(format!("ferry-testkernel.tmp.{}", std::process::id()));
    fs::copy(&built, &tmp)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), tmp.display()));
    fs::rename(&tmp, &dest)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), dest.display()));
    println!("cargo:rustc-env=FERRY_TESTKERNEL={}", dest.display());
}

/// The target directory, from OUT_DIR = <target>[/<triple>]/<profile>/build/ferry-<hash>/out:
/// the nearest ancestor that cargo marked with CACHEDIR.TAG, else four levels
/// up (which is the triple directory under `--target`, still a fine place).
fn target_dir(out_dir: &Path) -> PathBuf {
    let out_dir = out_dir
        .canonicalize()
        .unwrap_or_else(|_| out_dir.to_path_buf());
    out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .or_else(|| out_dir.ancestors().nth(4))
        .unwrap_or(&out_dir)
        .to_path_buf()
}

fn leaks_into_guest(key: &str) -> bool {
    const EXACT: &[&str] = &[
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "OUT_DIR",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_BUILD_",   // target, target-dir, rustflags, jobs
        "CARGO_TARGET_",  // per-target linker and rustflags
        "CARGO_PROFILE_", // opt-level, panic strategy, ...
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "DEP_",
    ];
    EXACT.contains(&key) || PREFIXES.iter().any(|p| key.starts_with(p))
}
