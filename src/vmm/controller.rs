//! The event-loop side of the VM: vCPU exits, the guest's reset, requests
//! from the control socket, console input. It owns the migration thread of a
//! source, and nothing else runs the guest's lifecycle.

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::machine::{Machine, MachineHandle};
use super::VmmError;
use crate::api::{ApiAction, ApiError, ApiReply, ApiRequest};
use crate::migration::source::{Migration, SourceContext};
use crate::migration::{Phase, SendRequest};
use crate::snapshot::{self, SnapshotError};
use crate::util::lock;
use crate::vstate::vcpu::{ExitSignal, VcpuControl, VcpuHandle, VmExit};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum RunState {
    Running,
    Paused,
}

/// The event-loop side of the VM: exits, resets, API requests, console input.
pub struct Controller {
    pub exit: Arc<ExitSignal>,
    pub reset_evt: EventFd,
    pub api_evt: EventFd,
    pub api_rx: Receiver<ApiRequest>,
    pub control: Arc<VcpuControl>,
    pub handles: Vec<VcpuHandle>,
    pub machine: Arc<Mutex<Machine>>,
    /// The migration in progress or the last one, if any.
    pub migration: Option<Migration>,
    pub stdin_open: bool,
    pub started: Instant,
    /// From process start to the vCPUs running (booted or restored).
    pub startup: Duration,
    pub restored: bool,
    pub done: bool,
    /// After a migration, when to stop at the latest.
    pub linger_until: Option<Instant>,
}

/// How long a migrated-away source keeps its control socket up.
const MIGRATED_LINGER: Duration = Duration::from_secs(1);

const TOKEN_EXIT: u32 = 1;
const TOKEN_RESET: u32 = 2;
const TOKEN_API: u32 = 3;
const TOKEN_STDIN: u32 = 4;

impl Controller {
    fn state(&self) -> RunState {
        if self.control.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn handle_api(&mut self, action: ApiAction) -> ApiReply {
        match action {
            ApiAction::GetVm => {
                let m = lock(&self.machine);
                Ok(serde_json::json!({
                    "state": self.state(),
                    "vcpus": m.config.vcpus,
                    "memory_mib": m.config.memory_mib,
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                    "startup_ms": self.startup.as_secs_f64() * 1000.0,
                    "restored": self.restored,
                    "drives": m.config.drives.iter().map(|d| &d.id).collect::<Vec<_>>(),
                }))
            }
            ApiAction::Pause => {
                self.control
                    .pause()
                    .map_err(|e| ApiError::new(500, e.to_string()))?;
                Ok(serde_json::json!({ "state": self.state() }))
            }
            ApiAction::Resume => {
                let migration = self.migration.as_ref().map(|m| m.status());
                if let Some(m) = migration {
                    if m.handed_over {
                        return Err(ApiError::conflict(
                            "the guest was handed over to the migration destination; it must not run here too",
                        ));
                    }
                    if m.phase == Phase::StopAndCopy {
                        return Err(ApiError::conflict(
                            "the guest is paused for the last phase of a migration",
                        ));
                    }
                }
                self.control.resume();
                Ok(serde_json::json!({ "state": self.state() }))
            }
            ApiAction::Shutdown => {
                self.exit.exit(VmExit::Requested);
                Ok(serde_json::json!({ "state": "ShuttingDown" }))
            }
            ApiAction::SnapshotCreate { dir } => {
                if self.migration_active() {
                    return Err(ApiError::conflict("a migration is in progress"));
                }
                self.snapshot(&dir)
            }
            ApiAction::MigrationSend(req) => self.migrate(req),
            ApiAction::MigrationStatus => {
                if let Some(until) = self.linger_until.as_mut() {
                    // The final status has been read: leave right after.
                    *until = (*until).min(Instant::now() + Duration::from_millis(100));
                }
                Ok(self.migration_status())
            }
            ApiAction::MigrationCancel => {
                let Some(m) = self.migration.as_ref().filter(|m| m.status().is_active()) else {
                    return Err(ApiError::conflict("no migration is in progress"));
                };
                m.cancel();
                // The migration thread notices at once; wait for it to have
                // put the guest back as it was.
                let deadline = Instant::now() + Duration::from_secs(10);
                while m.status().is_active() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(self.migration_status())
            }
        }
    }

    fn migration_active(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.status().is_active())
    }

    fn migration_status(&self) -> serde_json::Value {
        let status = self
            .migration
            .as_ref()
            .map(|m| m.status())
            .unwrap_or_default();
        serde_json::to_value(status).unwrap_or(serde_json::Value::Null)
    }

    fn migrate(&mut self, req: SendRequest) -> ApiReply {
        if self.migration_active() {
            return Err(ApiError::conflict("a migration is already in progress"));
        }
        let ctx = {
            let m = lock(&self.machine);
            SourceContext {
                vm: m.vm.clone(),
                mem: m.mem.clone(),
                memfd: m.memfd.clone(),
                control: self.control.clone(),
                vcpus: m.config.vcpus,
                machine: Arc::new(MachineHandle {
                    machine: self.machine.clone(),
                    exit: self.exit.clone(),
                    cpuid: m.guest_cpuid.clone(),
                }),
            }
        };
        // Drop (and join) a finished earlier migration first.
        self.migration = None;
        let m = Migration::start(ctx, req)
            .map_err(|e| ApiError::new(500, format!("cannot start the migration thread: {e}")))?;
        let status = m.status();
        self.migration = Some(m);
        Ok(serde_json::to_value(status).unwrap_or(serde_json::Value::Null))
    }

    /// Pauses the guest (if running), writes a snapshot of it into `dir`,
    /// and leaves it paused. On failure a running guest is resumed.
    fn snapshot(&mut self, dir: &Path) -> ApiReply {
        let t0 = Instant::now();
        let was_paused = self.control.is_paused();
        self.control
            .pause()
            .map_err(|e| ApiError::new(500, e.to_string()))?;
        let paused_at = t0.elapsed();
        let result = {
            let mut m = lock(&self.machine);
            m.save_state().and_then(|st| {
                snapshot::write_snapshot(dir, &st, &m.mem, m.memfd.as_deref())
                    .map_err(VmmError::from)
            })
        };
        match result {
            Ok(stats) => Ok(serde_json::json!({
                "dir": dir,
                "state": self.state(),
                "state_bytes": stats.state_bytes,
                "memory_bytes_written": stats.memory_bytes_written,
                "pause_ms": paused_at.as_secs_f64() * 1000.0,
                "total_ms": t0.elapsed().as_secs_f64() * 1000.0,
            })),
            Err(e) => {
                if !was_paused {
                    self.control.resume();
                }
                let status = match &e {
                    VmmError::Snapshot(SnapshotError::Io { source, .. })
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::NotFound
                                | std::io::ErrorKind::PermissionDenied
                                | std::io::ErrorKind::NotADirectory
                                | std::io::ErrorKind::AlreadyExists
                                | std::io::ErrorKind::ReadOnlyFilesystem
                        ) =>
                    {
                        400
                    }
                    _ => 500,
                };
                Err(ApiError::new(status, format!("snapshot not written: {e}")))
            }
        }
    }

    fn drain_api(&mut self) {
        let _ = self.api_evt.read();
        while let Ok(req) = self.api_rx.try_recv() {
            let reply = self.handle_api(req.action);
            let _ = req.reply.send(reply);
        }
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
                self.stdin_open = false;
            }
            Ok(n) => {
                let serial = lock(&self.machine).serial.clone();
                let mut serial = lock(&serial);
                // The guest's FIFO may be full; drop what does not fit rather
                // than block the event loop.
                serial.enqueue_input(&buf[..n]);
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(self.exit.evt(), TOKEN_EXIT, EventSet::IN));
        let _ = ops.add(Events::with_data(
            &self.reset_evt,
            TOKEN_RESET,
            EventSet::IN,
        ));
        let _ = ops.add(Events::with_data(&self.api_evt, TOKEN_API, EventSet::IN));
        if self.stdin_open {
            let _ = ops.add(Events::with_data_raw(
                libc::STDIN_FILENO,
                TOKEN_STDIN,
                EventSet::IN,
            ));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_EXIT => {
                let _ = self.exit.evt().read();
                if let Some(VmExit::Migrated { .. }) = self.exit.reason() {
                    // Keep answering GET /migration a moment, so that whoever
                    // drives the migration can read how it ended.
                    self.linger_until = Some(Instant::now() + MIGRATED_LINGER);
                } else {
                    self.done = true;
                }
            }
            TOKEN_RESET => {
                let _ = self.reset_evt.read();
                self.exit.exit(VmExit::Reset);
                self.done = true;
            }
            TOKEN_API => self.drain_api(),
            TOKEN_STDIN => self.read_stdin(ops),
            _ => {}
        }
    }
}
