//! vCPUs: one thread each running `KVM_RUN`, exits dispatched to the buses,
//! and a pause/resume/stop protocol. Pausing kicks a vCPU out of `KVM_RUN`
//! with a signal whose handler sets `immediate_exit`, so a kick that lands
//! just before `KVM_RUN` is not lost.

use crate::util::lock;
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::security::ThreadFilter;

/// How the VM ended, as seen by whoever noticed first.
#[derive(Debug, Clone, PartialEq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 or a KVM reset event).
    Reset,
    /// The guest powered off.
    GuestShutdown,
    /// Shut down on request (control socket).
    Requested,
    /// Migrated: the guest runs at `destination` now.
    Migrated {
        destination: String,
        downtime_ms: f64,
    },
    /// Something went wrong; the text says what.
    Error(String),
}

/// The first exit reason wins; `evt` wakes the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn exit(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn evt(&self) -> &EventFd {
        &self.evt
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct ControlState {
    want: Want,
    /// Auto-converge: vCPUs park while this is set, whatever `want` says.
    throttled: bool,
    paused: usize,
    stopped: usize,
    /// The vCPU threads, for kicking them out of KVM_RUN.
    threads: Vec<libc::pthread_t>,
}

/// Shared by the vCPU threads and the VMM.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cond: Condvar,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u8,
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("vCPUs did not {what} within {secs} s ({done} of {total} did)")]
    Timeout {
        what: &'static str,
        secs: u64,
        done: usize,
        total: usize,
    },
}

thread_local! {
    // The current thread's kvm_run, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this very thread to its own kvm_run
        // mapping, which outlives the thread's run loop; a byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process is enough; repeating is harmless).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

/// A vCPU. The fd is locked by its thread only for the length of one
/// `KVM_RUN` and the exit handling, so while the vCPUs are paused the VMM can
/// lock it to read or write the vCPU's state.
pub struct Vcpu {
    pub index: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

impl VcpuControl {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(ControlState {
                want: Want::Run,
                throttled: false,
                paused: 0,
                stopped: 0,
                threads: Vec::new(),
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick_all(s: &ControlState) {
        for &t in &s.threads {
            // SAFETY: vCPU threads are only joined after they stopped, and
            // stopped threads are never kicked again (stop waits for them
            // before joining); the signal has a handler, so it cannot kill
            // the process.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Asks every vCPU to leave `KVM_RUN` and park; returns when all have.
    pub fn pause(&self) -> Result<(), VcpuError> {
        {
            let mut s = self.lock();
            if s.want == Want::Stop {
                return Ok(());
            }
            s.want = Want::Pause;
        }
        self.wait_for("pause", |s| s.paused + s.stopped)
    }

    /// Parks (`true`) or releases (`false`) the vCPUs for auto-converge,
    /// without waiting and without touching a user's pause.
    pub fn set_throttled(&self, throttled: bool) {
        let mut s = self.lock();
        s.throttled = throttled;
        if throttled {
            Self::kick_all(&s);
        } else {
            self.cond.notify_all();
        }
    }

    pub fn resume(&self) {
        let mut s = self.lock();
        if s.want == Want::Pause {
            s.want = Want::Run;
            self.cond.notify_all();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.lock().want == Want::Pause
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&self, handles: Vec<VcpuHandle>) -> Result<(), VcpuError> {
        self.lock().want = Want::Stop;
        self.cond.notify_all();
        let res = self.wait_for("stop", |s| s.stopped);
        if res.is_ok() {
            for h in handles {
                let _ = h.thread.join();
            }
        }
        res
    }

    fn wait_for(
        &self,
        what: &'static str,
        done: impl Fn(&ControlState) -> usize,
    ) -> Result<(), VcpuError> {
        const LIMIT: Duration = Duration::from_secs(10);
        let start = Instant::now();
        let mut s = self.lock();
        let total = s.threads.len();
        loop {
            let n = done(&s);
            if n >= total {
                return Ok(());
            }
            if start.elapsed() > LIMIT {
                return Err(VcpuError::Timeout {
                    what,
                    secs: LIMIT.as_secs(),
                    done: n,
                    total,
                });
            }
            // Kick again on every round: a vCPU busy in userspace when the
            // first kick came may have re-entered KVM_RUN since.
            Self::kick_all(&s);
            s = self
                .cond
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused;
    /// false when the thread must end.
    fn checkpoint(&self) -> bool {
        let mut s = self.lock();
        let mut parked = false;
        loop {
            match s.want {
                Want::Run if !s.throttled => {
                    if parked {
                        s.paused -= 1;
                    }
                    return true;
                }
                Want::Stop => {
                    if parked {
                        s.paused -= 1;
                    }
                    s.stopped += 1;
                    self.cond.notify_all();
                    return false;
                }
                Want::Run | Want::Pause => {
                    if !parked {
                        parked = true;
                        s.paused += 1;
                        self.cond.notify_all();
                    }
                    s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }
}

impl VcpuControl {
    /// vCPUs that park as soon as they start, until `resume`.
    pub fn new_paused() -> Self {
        let c = Self::new();
        c.lock().want = Want::Pause;
        c
    }
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Everything a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VcpuControl>,
    pub exit: Arc<ExitSignal>,
}

impl Vcpu {
    pub fn new(index: u8, fd: VcpuFd) -> Self {
        Self {
            index,
            fd: Arc::new(Mutex::new(fd)),
        }
    }

    pub fn start(self, ctx: VcpuContext) -> Result<VcpuHandle, VcpuError> {
        let index = self.index;
        let control = ctx.control.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let run: *mut kvm_run = lock(&self.fd).get_kvm_run();
                KVM_RUN.with(|p| p.set(run));
                if let Err(e) = crate::security::confine_thread(ThreadFilter::Vcpu) {
                    // Never run a guest unconfined when confinement was asked for.
                    ctx.exit.exit(VmExit::Error(format!("vcpu{index}: {e}")));
                    return;
                }
                self.run_loop(&ctx);
                KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        {
            use std::os::unix::thread::JoinHandleExt;
            control.lock().threads.push(thread.as_pthread_t());
        }
        Ok(VcpuHandle { thread })
    }

    fn run_loop(&self, ctx: &VcpuContext) {
        while ctx.control.checkpoint() {
            let reason = run_once(self.index, &mut lock(&self.fd), ctx);
            if let Some(reason) = reason {
                ctx.exit.exit(reason);
                // Park until the VMM stops us: the guest must not go on.
                ctx.control.lock().want = Want::Pause;
            }
        }
    }
}

/// One `KVM_RUN`; Some when the VM must end.
fn run_once(index: u8, fd: &mut VcpuFd, ctx: &VcpuContext) -> Option<VmExit> {
    match fd.run() {
        Ok(exit) => match exit {
            VcpuExit::IoIn(port, data) => {
                if !ctx.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                ctx.pio.write(port as u64, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                ctx.mmio.write(addr, data);
                None
            }
            VcpuExit::Hlt => None,
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestShutdown,
                other => VmExit::Error(format!("vCPU {index}: system event {other}")),
            }),
            VcpuExit::Shutdown => Some(VmExit::Error(format!(
                "vCPU {index}: the guest triple-faulted (KVM_EXIT_SHUTDOWN); {}",
                describe(fd)
            ))),
            VcpuExit::InternalError => {
                let suberror = fd.get_kvm_run().__bindgen_anon_1;
                // SAFETY: KVM filled the internal-error member of the union
                // for this exit reason.
                let sub = unsafe { suberror.internal.suberror };
                Some(VmExit::Error(format!(
                    "vCPU {index}: KVM internal error (suberror {sub}{}); {}",
                    if sub == 1 {
                        ": instruction emulation failed"
                    } else {
                        ""
                    },
                    describe(fd)
                )))
            }
            VcpuExit::FailEntry(reason, cpu) => Some(VmExit::Error(format!(
                "vCPU {index}: VM entry failed (hardware reason {reason:#x} on host CPU {cpu}); {}",
                describe(fd)
            ))),
            other => {
                let what = format!("{other:?}");
                Some(VmExit::Error(format!(
                    "vCPU {index}: unexpected exit {what}; {}",
                    describe(fd)
                )))
            }
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}"))),
    }
}

/// Registers worth seeing when the guest dies.
fn describe(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, s.cr0, s.cr2,
                s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            _ => "registers unavailable".to_string(),
        }
}
