//! The VMM confines itself after set-up (issue 10): seccomp filters per
//! thread (`seccomp`), and, started as root with `--uid`/`--gid`, an
//! unprivileged uid with no capabilities (`privileges`). docs/security.md
//! says what each filter allows and how the lists were derived.

pub mod names;
pub mod privileges;
pub mod seccomp;

use std::fs::File;
use std::sync::{Mutex, OnceLock};

pub use privileges::Jail;
pub use seccomp::{SeccompMode, ThreadFilter};

/// Errors while confining the process.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("seccomp filter {filter}: {why}")]
    Filter { filter: &'static str, why: String },
    #[error("--uid/--gid: {0}")]
    Jail(String),
    #[error("cannot open /dev/kvm before dropping privileges: {0}")]
    Kvm(String),
}

/// How this process confines itself, chosen once on the command line.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub seccomp: SeccompMode,
    pub jail: Option<Jail>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
/// Set once the process is confined (a receive confines itself before it
/// accepts, and its Vmm::start must not try again).
static CONFINED: Mutex<bool> = Mutex::new(false);
/// Files ferry made that the dropped user must be able to remove.
static HAND_OVER: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
/// /dev/kvm opened before the privilege drop (it is root's, 0600).
static KVM: OnceLock<File> = OnceLock::new();

/// Records the command line's choice; the first call wins. Without it
/// (library use, unit tests) nothing is confined.
pub fn configure(settings: Settings) {
    invoking_uid();
    if settings.seccomp != SeccompMode::None {
        cap_malloc_arenas();
        panic_without_backtrace();
    }
    if SETTINGS.set(settings).is_ok() {
        seccomp::precompile(settings.seccomp, settings.jail.is_none());
    }
}

/// Fixes glibc's limit on malloc arenas now. Left unset, glibc computes it
/// when a thread creates the 9th arena, by reading
/// /sys/devices/system/cpu/online: an `openat` that a narrowed thread's
/// list (a control connection's) does not allow. The value is glibc's own
/// default (8 per CPU).
fn cap_malloc_arenas() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a malloc parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// A panic on a narrowed thread must still say what it was: std's hook,
/// asked for a backtrace (`RUST_BACKTRACE`), resolves paths (`getcwd`) and
/// reads the binary, which the lists do not allow, so the filter would
/// kill the process naming `getcwd` instead. This hook only writes the
/// thread's name and the panic's place and message to stderr.
fn panic_without_backtrace() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        eprintln!(
            "thread '{name}' {info}\nnote: no backtrace under the seccomp filters (--seccomp none gives one)"
        );
    }));
}

/// The uid that started ferry, as it was before any `--uid` drop (recorded
/// by [`configure`], or at the first call).
pub fn invoking_uid() -> u32 {
    static INVOKER: OnceLock<u32> = OnceLock::new();
    // SAFETY: getuid cannot fail.
    *INVOKER.get_or_init(|| unsafe { libc::getuid() })
}

/// The configured `--uid`/`--gid` (and `--chroot`), if any.
pub fn jail() -> Option<Jail> {
    SETTINGS.get().and_then(|s| s.jail)
}

/// The configured seccomp mode (`None` when nothing was configured).
pub fn mode() -> SeccompMode {
    SETTINGS.get().map_or(SeccompMode::None, |s| s.seccomp)
}

/// Records a file or directory ferry created (as root) that it removes
/// itself at exit: a privilege drop makes it the dropped user's first.
pub fn own_after_drop(path: &std::path::Path) {
    if SETTINGS.get().is_some_and(|s| s.jail.is_some()) {
        crate::util::lock(&HAND_OVER).push(path.to_path_buf());
    }
}

/// Opens /dev/kvm now, while the process may still, for a VM created after
/// the privilege drop (a received guest).
pub fn preopen_kvm() -> Result<(), SecurityError> {
    if KVM.get().is_none() {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| SecurityError::Kvm(crate::util::io_msg(&e)))?;
        let _ = KVM.set(file);
    }
    Ok(())
}

/// A handle on KVM: the pre-opened /dev/kvm if there is one, else a fresh
/// open.
pub fn kvm() -> Result<kvm_ioctls::Kvm, kvm_ioctls::Error> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    match KVM.get() {
        Some(file) => {
            let dup = file
                .try_clone()
                .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)))?;
            // SAFETY: `dup` is a fresh descriptor of /dev/kvm that nothing
            // else owns; Kvm takes ownership of it.
            Ok(unsafe { kvm_ioctls::Kvm::from_raw_fd(dup.into_raw_fd()) })
        }
        None => kvm_ioctls::Kvm::new(),
    }
}

/// Drops privileges (if configured) and installs the process-wide filter on
/// every thread that exists; threads started afterwards inherit it. Called
/// once set-up is done: before the vCPUs start (`ferry run`), before the
/// first connection is accepted (`ferry receive`). Later calls do nothing.
pub fn confine_process() -> Result<(), SecurityError> {
    let Some(settings) = SETTINGS.get() else {
        return Ok(());
    };
    let mut confined = crate::util::lock(&CONFINED);
    if *confined {
        return Ok(());
    }
    if let Some(jail) = settings.jail {
        jail.enter(&crate::util::lock(&HAND_OVER))?;
        crate::startup::mark("privileges-dropped");
    }
    seccomp::install_process_filter(settings.seccomp)?;
    crate::startup::mark("seccomp-installed");
    *confined = true;
    Ok(())
}

/// Where a host path that ferry holds from set-up (its control socket) is
/// now: under a `--chroot` root once the process is confined, the same
/// path relative to the new root; otherwise unchanged. `path` must be
/// absolute with a canonical parent (as the command line makes it).
pub fn jailed_path(path: &std::path::Path) -> std::path::PathBuf {
    let root = SETTINGS.get().and_then(|s| s.jail).and_then(|j| j.root);
    match root {
        Some(root) if *crate::util::lock(&CONFINED) => match path.strip_prefix(root) {
            Ok(rel) => std::path::Path::new("/").join(rel),
            Err(_) => path.to_path_buf(),
        },
        _ => path.to_path_buf(),
    }
}

/// Narrows the calling thread's filter to `filter`'s list (on top of the
/// process-wide one). Called by Ferry's own threads once set up.
pub fn confine_thread(filter: ThreadFilter) -> Result<(), SecurityError> {
    seccomp::install_thread_filter(mode(), filter)
}

/// Narrows the calling thread to `filter`'s list once the process is
/// confined (`seccomp::narrow_when_confined`: nothing before that, nothing
/// more once narrowed). On failure it says so on stderr, naming `thread`,
/// and returns false: the caller then stops rather than go on unconfined.
pub fn narrow_thread(thread: &str, filter: ThreadFilter) -> bool {
    match seccomp::narrow_when_confined(filter) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("ferry: {thread}: {e}; stopping this thread");
            false
        }
    }
}

/// Starts a thread named `name` that narrows itself to `filter` before it
/// runs `body`, and waits until it has: a filter that cannot go in is the
/// caller's error (the thread is not left running unconfined, nor ended
/// quietly with nothing serving its work).
pub fn spawn_narrowed<T: Send + 'static>(
    name: String,
    filter: ThreadFilter,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<Option<T>>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle =
        std::thread::Builder::new().name(name).spawn(
            move || match seccomp::narrow_when_confined(filter) {
                Ok(_) => {
                    let _ = tx.send(Ok(()));
                    Some(body())
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    None
                }
            },
        )?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(std::io::Error::other(e.to_string()))
        }
        Err(_) => Err(std::io::Error::other("the thread ended before it started")),
    }
}
