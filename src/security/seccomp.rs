//! Seccomp filters (seccompiler): one process-wide allow-list installed on
//! every thread with TSYNC once set-up is done, and narrower lists that
//! Ferry's own threads (the vCPUs) add on top of it for themselves.
//!
//! A syscall outside a list traps (`SECCOMP_RET_TRAP`): the SIGSYS handler
//! below writes one line naming the syscall and the thread to stderr, with
//! async-signal-safe writes only, and ends the process with exit code 159
//! (128 + SIGSYS). `--seccomp log` allows and logs instead
//! (`SECCOMP_RET_LOG`, seen in the kernel's audit log); `--seccomp none`
//! installs nothing. The lists were derived by tracing the test suite's
//! real runs (docs/security.md).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::devices::virtio::net::{TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::SecurityError;

/// What a syscall outside the lists does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process with a log line naming the syscall (the default).
    Kill,
    /// Allow it, logged by the kernel (SECCOMP_RET_LOG): for finding what
    /// a list misses.
    Log,
    /// No filters at all: debugging only.
    None,
}

/// The narrower per-thread lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadFilter {
    /// A vCPU thread: `KVM_RUN`, device emulation's writes, pausing.
    Vcpu,
    /// The control socket's accept thread (`ferry-api`): accepts, checks
    /// the peer's uid, starts one thread per connection.
    ApiAccept,
    /// One control connection (`ferry-api-conn`): reads the request, hands
    /// it to the event loop over a channel, writes the answer. No files, no
    /// new sockets, no threads, no ioctls.
    ApiConnection,
}

impl ThreadFilter {
    fn name(self) -> &'static str {
        match self {
            ThreadFilter::Vcpu => "vcpu",
            ThreadFilter::ApiAccept => "api",
            ThreadFilter::ApiConnection => "api-conn",
        }
    }
}

/// The exit code of a process killed by a filter (128 + SIGSYS).
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

const KVMIO: u64 = 0xAE;
/// `_IO(KVMIO, 0x80)`
pub const KVM_RUN: u64 = (KVMIO << 8) | 0x80;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Syscalls allowed with any arguments on every thread.
const PROCESS_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_connect,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat2,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    // The share server starts writeback of each UNSTABLE WRITE.
    libc::SYS_sync_file_range,
    // virtio-net's announcement timer.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_flock,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_getdents64,
    // std::path::absolute of a relative path the user gave (a config
    // error names the file that way, perhaps after the filter is in).
    libc::SYS_getcwd,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getuid,
    libc::SYS_getpeername,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_lseek,
    libc::SYS_madvise,
    libc::SYS_memfd_create,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_prlimit64,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_read,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_robust_list,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_socketpair,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_write,
    libc::SYS_writev,
    // Threads: clone3 is answered ENOSYS ahead of the list (glibc then uses
    // clone, whose flags a filter can see); see `with_clone3_refused`.
    libc::SYS_clone3,
];

/// Syscalls a vCPU thread makes once it runs: `KVM_RUN` (arguments
/// checked below), the serial console's writes, the eventfds it signals,
/// pausing on a futex, the kick signal's return, and its own exit.
const VCPU_SYSCALLS: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
    // A guest driver setting DRIVER_OK on a net device arms its
    // announcement timer from the vCPU's MMIO exit.
    libc::SYS_timerfd_settime,
];

/// What every thread of Rust's std does to start, name itself and end:
/// the stack guard and its signal stack, the malloc arena of a new thread
/// (mmap/munmap/mprotect/madvise), the exit's mask and unmapping.
const THREAD_LIFE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
];

/// A control connection (traced, `strace -f` of `ferry ctl` requests):
/// its socket's timeouts (`setsockopt`), `recvfrom`/`sendto`, the wake of
/// the event loop (`write` to an eventfd), `shutdown`, std's `fcntl`
/// (F_GETFD) on close; a migration request reads its `tls_dir`'s PEM files
/// and draws the migration id (`openat` read-only, `statx`, `read`,
/// `getrandom`); `read`/`write`/`poll` for the same socket through
/// other std paths, and `write` to stderr for its error lines.
const API_CONN_SYSCALLS: &[i64] = &[
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_getrandom,
    libc::SYS_lseek,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_statx,
    libc::SYS_write,
    libc::SYS_writev,
];

/// The accept thread adds `accept4`, `getsockopt` (SO_PEERCRED) and what
/// starting a connection thread takes (`clone` with CLONE_THREAD, clone3
/// answered ENOSYS by the process filter, `prctl(PR_SET_NAME)` by the
/// child); a connection thread inherits this filter and narrows itself
/// further, so this list must hold the connection's too.
const API_ACCEPT_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_clone3,
    libc::SYS_getsockopt,
    libc::SYS_seccomp,
];

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SecurityError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| {
        SecurityError::Filter {
            filter: "condition",
            why: e.to_string(),
        }
    })
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SecurityError> {
    SeccompRule::new(conditions).map_err(|e| SecurityError::Filter {
        filter: "rule",
        why: e.to_string(),
    })
}

/// One rule per value of argument `arg` (any of them matches).
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, SecurityError> {
    values
        .iter()
        .map(|v| rule(vec![cond(arg, SeccompCmpOp::Eq, *v)?]))
        .collect()
}

fn plain(list: &[i64]) -> Rules {
    list.iter().map(|nr| (*nr, Vec::new())).collect()
}

/// The process-wide list, with argument checks: ioctls only of KVM's type
/// and the few socket/tty ones std needs; sockets only Unix and IP; clone
/// only for threads (no fork); prctl only to name threads and to set
/// no-new-privs (which a thread's own narrower filter needs).
fn process_rules() -> Result<Rules, SecurityError> {
    let mut rules = plain(PROCESS_SYSCALLS);
    let mut ioctl = vec![rule(vec![cond(
        1,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?];
    ioctl.extend(any_of(
        1,
        &[
            libc::FIONBIO,
            libc::FIOCLEX,
            libc::TCGETS,
            libc::TIOCGWINSZ,
            // A receive builds its VM (and opens its taps) under the filter.
            TUNSETIFF,
            TUNSETVNETHDRSZ,
            TUNSETOFFLOAD,
        ],
    )?);
    rules.insert(libc::SYS_ioctl, ioctl);
    let domains = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|d| d as u64);
    rules.insert(libc::SYS_socket, any_of(0, &domains)?);
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    let prctls = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ];
    rules.insert(libc::SYS_prctl, any_of(0, &prctls.map(|p| p as u64))?);
    Ok(rules)
}

fn with_thread_life(lists: &[&[i64]]) -> Rules {
    let mut rules = plain(THREAD_LIFE);
    for list in lists {
        rules.extend(plain(list));
    }
    rules
}

/// The refused-client answer puts the socket in non-blocking mode
/// (`FIONBIO`); `prctl` only to name itself and for the SIGSYS handler.
fn api_conn_rules() -> Result<Rules, SecurityError> {
    let mut rules = with_thread_life(&[API_CONN_SYSCALLS]);
    rules.insert(libc::SYS_ioctl, any_of(1, &[libc::FIONBIO])?);
    // Read-only opens only: no write access, no creating, no truncating.
    let writes = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    rules.insert(
        libc::SYS_openat,
        vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(writes), 0)?])?],
    );
    let prctls = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_SET_NO_NEW_PRIVS,
    ];
    rules.insert(libc::SYS_prctl, any_of(0, &prctls.map(|p| p as u64))?);
    Ok(rules)
}

fn api_accept_rules() -> Result<Rules, SecurityError> {
    let mut rules = api_conn_rules()?;
    rules.extend(plain(API_ACCEPT_SYSCALLS));
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    Ok(rules)
}

fn vcpu_rules() -> Result<Rules, SecurityError> {
    let mut rules = plain(VCPU_SYSCALLS);
    rules.insert(libc::SYS_ioctl, any_of(1, &[KVM_RUN])?);
    rules.insert(libc::SYS_prctl, any_of(0, &[libc::PR_GET_NAME as u64])?);
    Ok(rules)
}

fn compile(
    filter: &'static str,
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SecurityError> {
    let err = |e: &dyn std::fmt::Display| SecurityError::Filter {
        filter,
        why: e.to_string(),
    };
    let f =
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(|e| err(&e))?;
    BpfProgram::try_from(f).map_err(|e| err(&e))
}

fn mismatch_action(mode: SeccompMode) -> SeccompAction {
    match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    }
}

/// The compiled BPF of `filter` under `mode` (no SIGSYS handler, nothing
/// installed): for tests and for installing.
pub fn program(mode: SeccompMode, filter: &str) -> Result<BpfProgram, SecurityError> {
    let rules = match filter {
        "process" => return with_clone3_refused(mode),
        "vcpu" => vcpu_rules()?,
        "api" => api_accept_rules()?,
        "api-conn" => api_conn_rules()?,
        _ => {
            return Err(SecurityError::Filter {
                filter: "unknown",
                why: format!("no filter named {filter}"),
            })
        }
    };
    let name = [
        ThreadFilter::Vcpu,
        ThreadFilter::ApiAccept,
        ThreadFilter::ApiConnection,
    ]
    .into_iter()
    .map(ThreadFilter::name)
    .find(|n| *n == filter)
    .unwrap_or("thread");
    compile(name, rules, mismatch_action(mode), SeccompAction::Allow)
}

/// The process program with `clone3` answered `ENOSYS` in front of its
/// list, so that glibc creates threads with `clone`, whose flags the list
/// checks. seccompiler gives one action to all of a filter's rules, so the
/// three instructions go in by hand, right after its architecture check
/// (whose length an empty filter shows); the list's own jumps are relative
/// and stay within it. One filter, not two: the kernel JITs each one.
fn with_clone3_refused(mode: SeccompMode) -> Result<BpfProgram, SecurityError> {
    use seccompiler::sock_filter;
    let list = compile(
        "process",
        process_rules()?,
        mismatch_action(mode),
        SeccompAction::Allow,
    )?;
    let empty = compile(
        "arch check",
        Rules::new(),
        SeccompAction::Allow,
        SeccompAction::Trap,
    )?;
    let arch_check = empty.len() - 1;
    let op = |code: u16, jt: u8, jf: u8, k: u32| sock_filter { code, jt, jf, k };
    let refuse = [
        // A = seccomp_data.nr
        op((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0, 0, 0),
        op(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            0,
            1,
            libc::SYS_clone3 as u32,
        ),
        op(
            (libc::BPF_RET | libc::BPF_K) as u16,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        ),
    ];
    let mut merged = Vec::with_capacity(list.len() + refuse.len());
    merged.extend_from_slice(&list[..arch_check]);
    merged.extend_from_slice(&refuse);
    merged.extend_from_slice(&list[arch_check..]);
    Ok(merged)
}

/// The programs of one mode.
struct Compiled {
    threads: ThreadPrograms,
    process: BpfProgram,
}

/// The per-thread programs, compiled with the process one.
struct ThreadPrograms {
    vcpu: BpfProgram,
    api: BpfProgram,
    api_conn: BpfProgram,
}

impl ThreadPrograms {
    fn get(&self, filter: ThreadFilter) -> &BpfProgram {
        match filter {
            ThreadFilter::Vcpu => &self.vcpu,
            ThreadFilter::ApiAccept => &self.api,
            ThreadFilter::ApiConnection => &self.api_conn,
        }
    }
}

fn compile_all(mode: SeccompMode) -> Result<Compiled, SecurityError> {
    Ok(Compiled {
        threads: ThreadPrograms {
            vcpu: program(mode, "vcpu")?,
            api: program(mode, "api")?,
            api_conn: program(mode, "api-conn")?,
        },
        process: with_clone3_refused(mode)?,
    })
}

/// What the helper thread did.
enum Done {
    Compiled(Compiled),
    Installed,
}

type Compiling = std::thread::JoinHandle<Result<Done, SecurityError>>;

/// Compiling the BPF (~0.5 ms) overlaps with building the VM.
static PRECOMPILED: std::sync::Mutex<Option<Compiling>> = std::sync::Mutex::new(None);

/// Starts compiling `mode`'s programs on a helper thread, for
/// `install_process_filter` to pick up; with `install_now` the helper also
/// installs the process-wide filters (TSYNC) while the VM is being built:
/// the kernel's JIT of each filter costs ~0.25 ms here, and the process
/// list already allows everything set-up does. Without it (a privilege
/// drop must come first: set*id are not in the list), they go in later.
pub fn precompile(mode: SeccompMode, install_now: bool) {
    if mode == SeccompMode::None {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("ferry-seccomp".into())
        .spawn(move || {
            let compiled = compile_all(mode)?;
            if install_now {
                install(compiled)?;
                return Ok(Done::Installed);
            }
            Ok(Done::Compiled(compiled))
        });
    if let Ok(handle) = spawned {
        *crate::util::lock(&PRECOMPILED) = Some(handle);
    }
}

/// Compiled once, set when the process filter is in on every thread (TSYNC
/// fails once any thread has a filter the installer lacks, so no thread
/// narrows itself before that): a thread only installs its program.
static THREAD_PROGRAMS: OnceLock<ThreadPrograms> = OnceLock::new();

/// Installs the SIGSYS handler and the process-wide filters on every
/// thread (TSYNC); sets no-new-privs.
pub fn install_process_filter(mode: SeccompMode) -> Result<(), SecurityError> {
    if mode == SeccompMode::None {
        return Ok(());
    }
    let precompiled = crate::util::lock(&PRECOMPILED).take();
    match precompiled.map(|h| h.join()) {
        Some(Ok(Ok(Done::Installed))) => Ok(()),
        Some(Ok(Ok(Done::Compiled(c)))) => install(c),
        Some(Ok(Err(e))) => Err(e),
        // Not started (library use), or it panicked: do it here.
        _ => install(compile_all(mode)?),
    }
}

fn install(compiled: Compiled) -> Result<(), SecurityError> {
    let Compiled { threads, process } = compiled;
    crate::startup::mark("seccomp-compiled");
    install_sigsys_handler()?;
    seccompiler::apply_filter_all_threads(&process).map_err(|e| SecurityError::Filter {
        filter: "process",
        why: e.to_string(),
    })?;
    let _ = THREAD_PROGRAMS.set(threads);
    Ok(())
}

/// Adds `filter` to the calling thread.
pub fn install_thread_filter(mode: SeccompMode, filter: ThreadFilter) -> Result<(), SecurityError> {
    if mode == SeccompMode::None {
        return Ok(());
    }
    let program = match THREAD_PROGRAMS.get() {
        Some(p) => p.get(filter),
        None => {
            return Err(SecurityError::Filter {
                filter: filter.name(),
                why: "installed before the process filter".into(),
            })
        }
    };
    seccompiler::apply_filter(program).map_err(|e| SecurityError::Filter {
        filter: filter.name(),
        why: e.to_string(),
    })
}

std::thread_local! {
    /// The filter this thread has narrowed itself to, if any.
    static NARROWED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For a thread that may start before the process filter is in (the
/// control socket's threads, started during set-up of a `--uid` run or
/// before a received guest's restore): narrows the calling thread to
/// `filter` once the process filter is on every thread, and does nothing
/// before that or after it has narrowed. Called before each piece of
/// untrusted input is handled, so none is handled unnarrowed once the
/// process is confined. `Ok(true)` once this thread is narrowed (or no
/// filters are wanted).
pub fn narrow_when_confined(filter: ThreadFilter) -> Result<bool, SecurityError> {
    let mode = super::mode();
    if mode == SeccompMode::None || NARROWED.get() {
        return Ok(true);
    }
    if THREAD_PROGRAMS.get().is_none() {
        return Ok(false);
    }
    install_thread_filter(mode, filter)?;
    NARROWED.set(true);
    Ok(true)
}

/// Installs the SIGSYS handler that names a trapped syscall and ends the
/// process.
pub fn install_sigsys_handler() -> Result<(), SecurityError> {
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls (prctl, write, _exit).
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(SecurityError::Filter {
                filter: "SIGSYS handler",
                why: std::io::Error::last_os_error().to_string(),
            });
        }
    }
    Ok(())
}

/// A fixed buffer a line is put together in, without allocating.
struct Line {
    buf: [u8; 192],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = *b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The syscall number of a SIGSYS from seccomp (`si_syscall`: after
/// si_signo, si_errno, si_code, padding and `si_call_addr` on x86_64).
///
/// # Safety
/// `info` points to the kernel's siginfo for this signal.
unsafe fn trapped_syscall(info: *const libc::siginfo_t) -> i64 {
    // SAFETY: the caller's siginfo is at least 128 bytes; offset 24 holds
    // the int si_syscall for SIGSYS.
    unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) as i64 }
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let nr = unsafe { trapped_syscall(info) };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes and a NUL into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|b| *b == 0).unwrap_or(16);
    let mut line = Line {
        buf: [0; 192],
        len: 0,
    };
    line.push(b"ferry: seccomp: thread '");
    line.push(&name[..name_len]);
    line.push(b"' made syscall ");
    line.push(super::names::name(nr).as_bytes());
    line.push(b" (");
    line.push_number(nr as u64);
    line.push(b"), which its filter does not allow; stopping the process\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_every_mode() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            assert!(!program(mode, "process").unwrap().is_empty());
            assert!(!program(mode, "vcpu").unwrap().is_empty());
            assert!(!program(mode, "api").unwrap().is_empty());
            assert!(!program(mode, "api-conn").unwrap().is_empty());
        }
        let merged = with_clone3_refused(SeccompMode::Kill).unwrap();
        assert_eq!(merged, program(SeccompMode::Kill, "process").unwrap());
        assert!(program(SeccompMode::Kill, "other").is_err());
    }

    #[test]
    fn no_list_allows_exec_or_fork() {
        for list in [
            PROCESS_SYSCALLS,
            VCPU_SYSCALLS,
            THREAD_LIFE,
            API_CONN_SYSCALLS,
            API_ACCEPT_SYSCALLS,
        ] {
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
            ] {
                assert!(!list.contains(&nr), "{}", crate::security::names::name(nr));
            }
        }
        assert!(!vcpu_rules().unwrap().contains_key(&libc::SYS_clone));
        assert!(!api_conn_rules().unwrap().contains_key(&libc::SYS_clone));
    }

    #[test]
    fn a_connection_list_is_within_the_accept_list_it_inherits() {
        // A connection thread is started by the narrowed accept thread and
        // stacks its filter on top: whatever it may do, the accept list
        // must allow too.
        let accept = api_accept_rules().unwrap();
        for nr in api_conn_rules().unwrap().keys() {
            assert!(
                accept.contains_key(nr),
                "{}",
                crate::security::names::name(*nr)
            );
        }
        for nr in [
            libc::SYS_unlink,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
        ] {
            assert!(!accept.contains_key(&nr));
        }
    }

    #[test]
    fn the_log_line_numbers_are_decimal() {
        let mut line = Line {
            buf: [0; 192],
            len: 0,
        };
        line.push_number(0);
        line.push(b" ");
        line.push_number(1234567);
        assert_eq!(&line.buf[..line.len], b"0 1234567");
        assert_eq!(crate::security::names::name(59), "execve");
    }
}
