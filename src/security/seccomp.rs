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

/// The narrower per-thread lists. A thread inherits the filters of the
/// thread that started it and may add its own on top (both must allow), so
/// a list that starts threads holds everything those threads do; the
/// unit tests check each such pair (`CHILDREN`).
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
    /// The event loop (the main thread once the guest runs): device
    /// queues, the console, API actions (snapshots, pause, starting a
    /// migration). No listening sockets, no new guest memory, no taps.
    EventLoop,
    /// A drive's request thread (`blk-<id>`): guest requests on the open
    /// image, and while mirroring, on the copy through the share's client
    /// (TCP only). No opens, no KVM ioctls.
    Block,
    /// The source's migration thread: the channel, the dirty log and state
    /// ioctls, the storage plan; it starts the lanes, copy and throttle.
    Migration,
    /// A source memory connection (`migration-lane<i>`): sends only.
    LaneOut,
    /// The storage copy (`storage-copy`, and the workers it starts): reads
    /// the VM's own descriptors, writes the share (its client, or a
    /// mounted path's files).
    StorageCopy,
    /// The source's vCPU throttle: sleeps and kicks this process's vCPUs.
    Throttle,
    /// The destination's accept threads (`ferry-accept`, `ferry-lanes`):
    /// accept and start one thread per connection, which narrows itself.
    Acceptor,
    /// A destination's connection before it is a migration
    /// (`ferry-handshake`): TLS handshake and Hello checks, read-only opens
    /// of host facts, `KVM_GET_SUPPORTED_CPUID`. No sockets of its own.
    Handshake,
    /// A destination's extra memory connection (`ferry-lane`): its TLS
    /// handshake, then frames into guest memory.
    LaneIn,
    /// The destination's memory prefaulting helper (`prefault`).
    Prefault,
    /// The share server's threads (`ferry-share`, `ferry-share-fs`): TLS
    /// connections and the files of its own directory.
    Share,
}

/// Every per-thread filter, in `ThreadPrograms` order.
const THREAD_FILTERS: [ThreadFilter; 14] = [
    ThreadFilter::Vcpu,
    ThreadFilter::ApiAccept,
    ThreadFilter::ApiConnection,
    ThreadFilter::EventLoop,
    ThreadFilter::Block,
    ThreadFilter::Migration,
    ThreadFilter::LaneOut,
    ThreadFilter::StorageCopy,
    ThreadFilter::Throttle,
    ThreadFilter::Acceptor,
    ThreadFilter::Handshake,
    ThreadFilter::LaneIn,
    ThreadFilter::Prefault,
    ThreadFilter::Share,
];

impl ThreadFilter {
    pub fn name(self) -> &'static str {
        match self {
            ThreadFilter::Vcpu => "vcpu",
            ThreadFilter::ApiAccept => "api",
            ThreadFilter::ApiConnection => "api-conn",
            ThreadFilter::EventLoop => "event-loop",
            ThreadFilter::Block => "blk",
            ThreadFilter::Migration => "migration",
            ThreadFilter::LaneOut => "lane-out",
            ThreadFilter::StorageCopy => "storage-copy",
            ThreadFilter::Throttle => "throttle",
            ThreadFilter::Acceptor => "acceptor",
            ThreadFilter::Handshake => "handshake",
            ThreadFilter::LaneIn => "lane-in",
            ThreadFilter::Prefault => "prefault",
            ThreadFilter::Share => "share",
        }
    }

    fn index(self) -> usize {
        THREAD_FILTERS
            .iter()
            .position(|f| *f == self)
            .unwrap_or_default()
    }

    fn rules(self) -> Result<Rules, SecurityError> {
        match self {
            ThreadFilter::Vcpu => vcpu_rules(),
            ThreadFilter::ApiAccept => api_accept_rules(),
            ThreadFilter::ApiConnection => api_conn_rules(),
            ThreadFilter::EventLoop => event_loop_rules(),
            ThreadFilter::Block => block_rules(),
            ThreadFilter::Migration => migration_rules(),
            ThreadFilter::LaneOut => lane_out_rules(),
            ThreadFilter::StorageCopy => storage_copy_rules(),
            ThreadFilter::Throttle => throttle_rules(),
            ThreadFilter::Acceptor => acceptor_rules(),
            ThreadFilter::Handshake => handshake_rules(),
            ThreadFilter::LaneIn => lane_in_rules(),
            ThreadFilter::Prefault => prefault_rules(),
            ThreadFilter::Share => share_rules(),
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
    // glibc's resolver sends its A and AAAA queries in one sendmmsg (a
    // migration to a name that needs DNS was killed here before).
    libc::SYS_sendmmsg,
    // ... and reads the host's name first (res_init).
    libc::SYS_uname,
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
    // The share's SETATTR with times (`File::set_times`).
    libc::SYS_utimensat,
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
    // A SIGTERM or SIGINT may be delivered to a vCPU thread: the shutdown
    // signals' handler wakes the event loop with a `sendto` on its socket
    // pair (a trace showed a `ferry run` killed by its own filter there).
    libc::SYS_sendto,
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
            // glibc's resolver: how much a DNS answer holds.
            libc::FIONREAD,
            libc::TCGETS,
            libc::TIOCGWINSZ,
            // A receive builds its VM (and opens its taps) under the filter.
            TUNSETIFF,
            TUNSETVNETHDRSZ,
            TUNSETOFFLOAD,
        ],
    )?);
    rules.insert(libc::SYS_ioctl, ioctl);
    resolver_sockets(&mut rules)?;
    spawns_threads(&mut rules)?;
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
    rules.extend(plain(HANDLERS));
    tgkill_own(&mut rules)?;
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
    spawns_threads(&mut rules)?;
    Ok(rules)
}

fn vcpu_rules() -> Result<Rules, SecurityError> {
    let mut rules = plain(VCPU_SYSCALLS);
    rules.extend(plain(HANDLERS));
    // An abort (a panic in release) raises SIGABRT on itself.
    tgkill_own(&mut rules)?;
    rules.insert(libc::SYS_ioctl, any_of(1, &[KVM_RUN])?);
    rules.insert(libc::SYS_prctl, any_of(0, &[libc::PR_GET_NAME as u64])?);
    Ok(rules)
}

/// What a narrowed thread may meet besides its own work: signal handlers
/// run on whichever thread the kernel picks (the shutdown signals' wake is
/// a `sendto`/`write` to their socket pair; the SIGSYS handler names the
/// thread with `prctl(PR_GET_NAME)`, added by each list, and `write`s its
/// line), and error lines on stderr.
const HANDLERS: &[i64] = &[
    libc::SYS_write,
    libc::SYS_sendto,
    libc::SYS_getpid,
    // A second shutdown signal ends the process by the signal: its handler
    // restores the default action and raises it again.
    libc::SYS_rt_sigaction,
];

/// A connected socket's I/O, TLS included (`getrandom`), with its
/// timeouts (`setsockopt`, `poll`) and std's `try_clone` (`fcntl`).
const SOCKET_IO: &[i64] = &[
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_getpeername,
    libc::SYS_getrandom,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_nanosleep,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_shutdown,
    libc::SYS_write,
    libc::SYS_writev,
];

/// tokio's reactor (the share's server and client): epoll and its waker;
/// timers are epoll timeouts.
const REACTOR: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd2,
];

/// Reading and writing files that are already open, and looking at them.
const FILE_IO: &[i64] = &[
    libc::SYS_fdatasync,
    libc::SYS_fstat,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_statx,
];

/// What the event loop may no longer do once the guest runs, of all the
/// process list allows: listen for or accept connections (the control
/// socket was bound during set-up, its own thread accepts; `bind` stays,
/// for the resolver's netlink socket), make guest
/// memory (`memfd_create`), hard links, socket pairs or timers (made when
/// the devices were built).
const NOT_ON_THE_EVENT_LOOP: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_memfd_create,
    libc::SYS_socketpair,
    libc::SYS_timerfd_create,
];

/// The source's migration thread, beyond what its children do (below):
/// the channel's `connect`; the dirty log, memory slots and the state of
/// the vCPUs, VM and devices (KVM ioctls, added by the rules); pausing
/// (`tgkill` of its own vCPUs); a mounted-path share's directory
/// (`mkdir`, `openat`, listing and removing its files); a resumed net
/// device's announcement timer; `sync_file_range` for the copy's files.
const MIGRATION_SYSCALLS: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_fstatfs,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_openat,
    libc::SYS_statfs,
    libc::SYS_sync_file_range,
    libc::SYS_timerfd_settime,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// The storage copy: reads the VM's own descriptors, writes the share
/// through its client (a new TCP connection when all are busy) or a
/// mounted path's files (`openat`, created at their size).
const STORAGE_COPY_SYSCALLS: &[i64] = &[libc::SYS_connect, libc::SYS_openat];

/// A drive's request thread: the image (already open) and, while a storage
/// migration mirrors it, the share client's connections (`connect`, one
/// more when all are busy); the queue's eventfd (`poll`, `read`) and the
/// interrupt's (`write`).
const BLOCK_SYSCALLS: &[i64] = &[libc::SYS_connect];

/// The throttle sleeps between kicks of this process's vCPUs.
const THROTTLE_SYSCALLS: &[i64] = &[libc::SYS_clock_nanosleep, libc::SYS_nanosleep];

/// A destination's connection before it is a migration: reading the
/// host's facts for the Hello's checks (`/proc/meminfo`, cgroup limits:
/// read-only opens, checked by the rules) besides its socket.
const HANDSHAKE_SYSCALLS: &[i64] = &[libc::SYS_openat];

/// The share server: accepting, and the files of its own directory
/// (created, written, synced, written back early, listed, removed).
const SHARE_SYSCALLS: &[i64] = &[
    libc::SYS_accept4,
    // SETATTR with times (`File::set_times`).
    libc::SYS_utimensat,
    libc::SYS_fchmod,
    libc::SYS_getdents64,
    libc::SYS_openat,
    libc::SYS_sched_yield,
    libc::SYS_sync_file_range,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// `_IOWR(KVMIO, 0x05, struct kvm_cpuid2)`: the Hello's CPU check.
const KVM_GET_SUPPORTED_CPUID: u64 = 0xc008_ae05;

/// `prctl` to name a thread and read the name (the SIGSYS handler);
/// `PR_SET_NO_NEW_PRIVS` too where threads narrow themselves.
fn prctl_rules(rules: &mut Rules, narrows: bool) -> Result<(), SecurityError> {
    let mut prctls = vec![libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64];
    if narrows {
        prctls.push(libc::PR_SET_NO_NEW_PRIVS as u64);
    }
    rules.insert(libc::SYS_prctl, any_of(0, &prctls)?);
    Ok(())
}

/// Starting threads: `clone` only with `CLONE_THREAD`; `clone3` allowed
/// here so that the process filter's `ENOSYS` answer stands (a trap here
/// would win over it); `seccomp` for the new thread to narrow itself.
fn spawns_threads(rules: &mut Rules) -> Result<(), SecurityError> {
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::MaskedEq(thread),
            thread,
        )?])?],
    );
    rules.insert(libc::SYS_clone3, Vec::new());
    rules.insert(libc::SYS_seccomp, Vec::new());
    prctl_rules(rules, true)
}

/// `socket` for Unix and IP sockets, and the one netlink socket glibc's
/// resolver opens (`NETLINK_ROUTE`, to learn this host's addresses when it
/// sorts a name's several addresses, and `bind`s): what set-up and name
/// resolution need.
fn resolver_sockets(rules: &mut Rules) -> Result<(), SecurityError> {
    let domains = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|d| d as u64);
    let mut socket = any_of(0, &domains)?;
    socket.push(rule(vec![
        cond(0, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)?,
        cond(2, SeccompCmpOp::Eq, libc::NETLINK_ROUTE as u64)?,
    ])?);
    rules.insert(libc::SYS_socket, socket);
    Ok(())
}

/// `socket` for TCP over IPv4 or IPv6 only (no Unix, UDP or raw sockets).
fn tcp_sockets(rules: &mut Rules) -> Result<(), SecurityError> {
    let mut socket = Vec::new();
    for domain in [libc::AF_INET, libc::AF_INET6] {
        socket.push(rule(vec![
            cond(0, SeccompCmpOp::Eq, domain as u64)?,
            cond(1, SeccompCmpOp::MaskedEq(0xf), libc::SOCK_STREAM as u64)?,
        ])?);
    }
    rules.insert(libc::SYS_socket, socket);
    Ok(())
}

/// `tgkill` of this process's own threads only (the vCPU kick).
fn tgkill_own(rules: &mut Rules) -> Result<(), SecurityError> {
    // SAFETY: getpid cannot fail. The filters are compiled in the process
    // that installs them.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, SeccompCmpOp::Eq, pid)?])?],
    );
    Ok(())
}

/// `ioctl` of KVM's type (`0xAE`), the socket/terminal ones std needs, and
/// `extra`.
fn kvm_ioctls(rules: &mut Rules, extra: &[u64]) -> Result<(), SecurityError> {
    let mut ioctl = vec![rule(vec![cond(
        1,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    )?])?];
    ioctl.extend(any_of(
        1,
        &[libc::FIONBIO, libc::FIOCLEX, libc::TCGETS, libc::TIOCGWINSZ],
    )?);
    ioctl.extend(any_of(1, extra)?);
    rules.insert(libc::SYS_ioctl, ioctl);
    Ok(())
}

/// `openat` without write access, creating or truncating.
fn read_only_opens(rules: &mut Rules) -> Result<(), SecurityError> {
    let writes = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    rules.insert(
        libc::SYS_openat,
        vec![rule(vec![cond(2, SeccompCmpOp::MaskedEq(writes), 0)?])?],
    );
    Ok(())
}

/// A list of `lists` plus a thread's life and the signal handlers', and
/// what an abort takes (`tgkill` of this process only).
fn narrowed(lists: &[&[i64]]) -> Result<Rules, SecurityError> {
    let mut rules = with_thread_life(lists);
    rules.extend(plain(HANDLERS));
    tgkill_own(&mut rules)?;
    Ok(rules)
}

fn event_loop_rules() -> Result<Rules, SecurityError> {
    let mut rules = plain(PROCESS_SYSCALLS);
    for nr in NOT_ON_THE_EVENT_LOOP {
        rules.remove(nr);
    }
    // It starts the migration thread, whose list this must hold; that
    // thread resolves the destination's name before it narrows itself:
    // glibc's resolver asks nscd over a Unix socket and DNS over UDP
    // (`socket` as the process list allows it, `sendmmsg`, `FIONREAD`).
    rules.extend(migration_rules()?);
    kvm_ioctls(&mut rules, &[libc::FIONREAD])?;
    resolver_sockets(&mut rules)?;
    spawns_threads(&mut rules)?;
    tgkill_own(&mut rules)?;
    Ok(rules)
}

fn block_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO, REACTOR, FILE_IO, BLOCK_SYSCALLS])?;
    rules.insert(libc::SYS_ioctl, any_of(1, &[libc::FIONBIO])?);
    tcp_sockets(&mut rules)?;
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn migration_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO, REACTOR, FILE_IO, MIGRATION_SYSCALLS])?;
    // Its children's lists: they inherit this filter.
    for child in [lane_out_rules()?, storage_copy_rules()?, throttle_rules()?] {
        rules.extend(child);
    }
    kvm_ioctls(&mut rules, &[])?;
    tcp_sockets(&mut rules)?;
    spawns_threads(&mut rules)?;
    tgkill_own(&mut rules)?;
    Ok(rules)
}

fn lane_out_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO])?;
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn storage_copy_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO, REACTOR, FILE_IO, STORAGE_COPY_SYSCALLS])?;
    rules.insert(libc::SYS_ioctl, any_of(1, &[libc::FIONBIO])?);
    tcp_sockets(&mut rules)?;
    // Its workers inherit this list and add nothing.
    spawns_threads(&mut rules)?;
    Ok(rules)
}

fn throttle_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[THROTTLE_SYSCALLS])?;
    tgkill_own(&mut rules)?;
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn handshake_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO, FILE_IO, HANDSHAKE_SYSCALLS])?;
    for nr in [libc::SYS_pwrite64, libc::SYS_pwritev, libc::SYS_ftruncate] {
        rules.remove(&nr);
    }
    read_only_opens(&mut rules)?;
    rules.insert(
        libc::SYS_ioctl,
        any_of(1, &[libc::FIONBIO, KVM_GET_SUPPORTED_CPUID])?,
    );
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn lane_in_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO])?;
    rules.insert(libc::SYS_ioctl, any_of(1, &[libc::FIONBIO])?);
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn acceptor_rules() -> Result<Rules, SecurityError> {
    // Its connection threads inherit this list and narrow themselves.
    let mut rules = handshake_rules()?;
    rules.extend(lane_in_rules()?);
    rules.insert(libc::SYS_accept4, Vec::new());
    spawns_threads(&mut rules)?;
    rules.insert(
        libc::SYS_ioctl,
        any_of(1, &[libc::FIONBIO, KVM_GET_SUPPORTED_CPUID])?,
    );
    read_only_opens(&mut rules)?;
    Ok(rules)
}

fn prefault_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[])?;
    prctl_rules(&mut rules, false)?;
    Ok(rules)
}

fn share_rules() -> Result<Rules, SecurityError> {
    let mut rules = narrowed(&[SOCKET_IO, REACTOR, FILE_IO, SHARE_SYSCALLS])?;
    rules.insert(libc::SYS_ioctl, any_of(1, &[libc::FIONBIO, libc::FIOCLEX])?);
    // The blocking pool's threads start from the workers.
    spawns_threads(&mut rules)?;
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
/// installed): for tests and for installing. `filter` is "process" or a
/// [`ThreadFilter`]'s name.
pub fn program(mode: SeccompMode, filter: &str) -> Result<BpfProgram, SecurityError> {
    if filter == "process" {
        return with_clone3_refused(mode);
    }
    match THREAD_FILTERS.into_iter().find(|f| f.name() == filter) {
        Some(f) => compile(
            f.name(),
            f.rules()?,
            mismatch_action(mode),
            SeccompAction::Allow,
        ),
        None => Err(SecurityError::Filter {
            filter: "unknown",
            why: format!("no filter named {filter}"),
        }),
    }
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

/// The per-thread programs, compiled with the process one, in
/// `THREAD_FILTERS` order.
struct ThreadPrograms(Vec<BpfProgram>);

impl ThreadPrograms {
    fn get(&self, filter: ThreadFilter) -> &BpfProgram {
        &self.0[filter.index()]
    }
}

fn compile_all(mode: SeccompMode) -> Result<Compiled, SecurityError> {
    let threads = THREAD_FILTERS
        .into_iter()
        .map(|f| program(mode, f.name()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Compiled {
        threads: ThreadPrograms(threads),
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
    use crate::security::names;

    #[test]
    fn every_filter_compiles_in_every_mode() {
        for mode in [SeccompMode::Kill, SeccompMode::Log] {
            assert!(!program(mode, "process").unwrap().is_empty());
            for f in THREAD_FILTERS {
                assert!(!program(mode, f.name()).unwrap().is_empty(), "{f:?}");
                assert_eq!(THREAD_FILTERS[f.index()], f);
            }
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
        for f in THREAD_FILTERS {
            let rules = f.rules().unwrap();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_fork,
                libc::SYS_vfork,
                libc::SYS_ptrace,
                libc::SYS_process_vm_writev,
                libc::SYS_setuid,
                libc::SYS_mount,
            ] {
                assert!(!rules.contains_key(&nr), "{f:?}: {}", names::name(nr));
            }
        }
    }

    /// A thread inherits the filter of the thread that starts it: the
    /// parent's list must allow all that the child's does (or the child
    /// would be killed by the parent's filter), and every list lies within
    /// the process list it is stacked on.
    const CHILDREN: &[(ThreadFilter, ThreadFilter)] = &[
        (ThreadFilter::ApiAccept, ThreadFilter::ApiConnection),
        (ThreadFilter::EventLoop, ThreadFilter::Migration),
        // A receive's main thread narrows before it starts the guest.
        (ThreadFilter::EventLoop, ThreadFilter::Vcpu),
        (ThreadFilter::EventLoop, ThreadFilter::Block),
        (ThreadFilter::Migration, ThreadFilter::LaneOut),
        (ThreadFilter::Migration, ThreadFilter::StorageCopy),
        (ThreadFilter::Migration, ThreadFilter::Throttle),
        (ThreadFilter::Acceptor, ThreadFilter::Handshake),
        (ThreadFilter::Acceptor, ThreadFilter::LaneIn),
    ];

    /// The conditions of a rule (all must hold), as their Debug text:
    /// seccompiler keeps them private.
    fn conditions(r: &SeccompRule) -> Vec<String> {
        format!("{r:?}")
            .split("SeccompCondition {")
            .skip(1)
            .map(|c| c.split('}').next().unwrap_or_default().trim().to_string())
            .collect()
    }

    /// (argument, mask, value) of a condition `arg & mask == value` (an
    /// `Eq` has the full mask), from its Debug text.
    fn parsed(c: &str) -> (u64, u64, u64) {
        let field = |name: &str| {
            c.split(&format!("{name}: "))
                .nth(1)
                .and_then(|v| v.split([',', ' ']).next())
                .unwrap_or_default()
                .to_string()
        };
        let arg = field("arg_index").parse().unwrap();
        let value = field("value").parse().unwrap();
        let op = field("operator");
        let mask = match op.strip_prefix("MaskedEq(") {
            Some(m) => m.trim_end_matches(')').parse().unwrap(),
            None if op == "Eq" => u64::MAX,
            None => panic!("no implication rule for {op}"),
        };
        (arg, mask, value)
    }

    /// Whether rule `a` matching means rule `b` matches too: each of `b`'s
    /// conditions follows from one of `a`'s on the same argument (the same
    /// condition, or an `Eq` whose value passes `b`'s mask).
    fn implies(a: &SeccompRule, b: &SeccompRule) -> bool {
        let a: Vec<_> = conditions(a).iter().map(|c| parsed(c)).collect();
        conditions(b).iter().all(|c| {
            let (arg, mask, value) = parsed(c);
            a.iter().any(|&(a_arg, a_mask, a_value)| {
                a_arg == arg
                    && ((a_mask, a_value) == (mask, value)
                        || (a_mask == u64::MAX && a_value & mask == value))
            })
        })
    }

    #[test]
    fn rule_implication_reads_the_conditions() {
        let c = |arg, v| cond(arg, SeccompCmpOp::Eq, v).unwrap();
        let inet_stream = rule(vec![c(0, 2), c(1, 1)]).unwrap();
        let inet = rule(vec![c(0, 2)]).unwrap();
        assert_eq!(conditions(&inet_stream).len(), 2);
        assert!(implies(&inet_stream, &inet));
        assert!(!implies(&inet, &inet_stream));
        assert!(!implies(&inet, &rule(vec![c(0, 10)]).unwrap()));
        let kvm_type = rule(vec![
            cond(1, SeccompCmpOp::MaskedEq(0xff00), 0xae00).unwrap()
        ])
        .unwrap();
        assert!(implies(&rule(vec![c(1, KVM_RUN)]).unwrap(), &kvm_type));
        assert!(!implies(&rule(vec![c(1, 0x5421)]).unwrap(), &kvm_type));
    }

    #[test]
    fn a_childs_list_is_within_its_parents_and_the_process_list() {
        let process = process_rules().unwrap();
        for f in THREAD_FILTERS {
            for (nr, rules) in f.rules().unwrap() {
                let Some(theirs) = process.get(&nr) else {
                    panic!("{f:?}: {} is not in the process list", names::name(nr));
                };
                assert!(
                    theirs.is_empty()
                        || (!rules.is_empty()
                            && rules.iter().all(|r| theirs.iter().any(|p| implies(r, p)))),
                    "{f:?} allows {} with arguments the process list does not",
                    names::name(nr)
                );
            }
        }
        for (parent, child) in CHILDREN {
            let parent_rules = parent.rules().unwrap();
            for (nr, rules) in child.rules().unwrap() {
                let Some(theirs) = parent_rules.get(&nr) else {
                    panic!(
                        "{child:?} makes {} but {parent:?} does not allow it",
                        names::name(nr)
                    );
                };
                // An unconditional allow in the child needs one in the parent;
                // each of the child's argument rules must be one of the
                // parent's (or the parent allows any arguments).
                assert!(
                    !rules.is_empty() || theirs.is_empty(),
                    "{child:?} may make {} with any arguments, {parent:?} only some",
                    names::name(nr)
                );
                for r in &rules {
                    assert!(
                        theirs.is_empty() || theirs.iter().any(|p| implies(r, p)),
                        "{child:?} may make {} with {r:?}, which {parent:?} does not allow",
                        names::name(nr)
                    );
                }
            }
        }
        // Threads that start threads can: clone with CLONE_THREAD, clone3
        // left to the process filter's ENOSYS, seccomp for the child.
        for f in [
            ThreadFilter::ApiAccept,
            ThreadFilter::EventLoop,
            ThreadFilter::Migration,
            ThreadFilter::StorageCopy,
            ThreadFilter::Acceptor,
            ThreadFilter::Share,
        ] {
            let rules = f.rules().unwrap();
            for nr in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_seccomp] {
                assert!(rules.contains_key(&nr), "{f:?}: {}", names::name(nr));
            }
        }
    }

    #[test]
    fn every_list_lets_the_signal_handlers_run() {
        // Process-directed signals land on any thread: the SIGSYS handler
        // names the thread (prctl) and writes its line; the shutdown
        // signals' handler sends a byte on its socket pair; a handler's
        // end is rt_sigreturn, and the process may end from any thread.
        for f in THREAD_FILTERS {
            let rules = f.rules().unwrap();
            for nr in [
                libc::SYS_prctl,
                libc::SYS_write,
                libc::SYS_sendto,
                libc::SYS_rt_sigreturn,
                libc::SYS_rt_sigaction,
                libc::SYS_exit_group,
                // A panic's abort raises SIGABRT on the thread itself.
                libc::SYS_tgkill,
                libc::SYS_gettid,
                libc::SYS_getpid,
                libc::SYS_rt_sigprocmask,
            ] {
                assert!(rules.contains_key(&nr), "{f:?}: {}", names::name(nr));
            }
        }
    }

    #[test]
    fn the_narrow_lists_keep_their_promises() {
        let has = |f: ThreadFilter, nr: i64| f.rules().unwrap().contains_key(&nr);
        // No narrowed thread listens; only the event loop binds (the
        // resolver's netlink socket); only the accept threads accept.
        for f in THREAD_FILTERS {
            assert!(!has(f, libc::SYS_listen), "{f:?}");
            assert!(!has(f, libc::SYS_memfd_create), "{f:?}");
            let binds = f == ThreadFilter::EventLoop;
            assert_eq!(has(f, libc::SYS_bind), binds, "{f:?}");
        }
        // What faces the guest or an unauthenticated peer opens no file for
        // writing, makes no socket and starts no thread.
        for f in [ThreadFilter::Handshake, ThreadFilter::LaneIn] {
            assert!(
                !has(f, libc::SYS_socket) && !has(f, libc::SYS_connect),
                "{f:?}"
            );
            assert!(
                !has(f, libc::SYS_clone) && !has(f, libc::SYS_pwrite64),
                "{f:?}"
            );
        }
        for f in [
            ThreadFilter::Block,
            ThreadFilter::LaneIn,
            ThreadFilter::LaneOut,
        ] {
            assert!(
                !has(f, libc::SYS_openat) && !has(f, libc::SYS_clone),
                "{f:?}"
            );
        }
        assert!(!has(ThreadFilter::Block, libc::SYS_unlink));
        assert!(!has(ThreadFilter::Share, libc::SYS_connect));
        assert!(!has(ThreadFilter::Share, libc::SYS_socket));
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
