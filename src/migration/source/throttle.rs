//! Auto-converge: holds the vCPUs back for a share of every period, so that
//! a guest that dirties memory faster than pre-copy sends it slows down.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::vstate::vcpu::VcpuControl;

/// Short enough that a throttled guest still gets CPU often, long enough
/// that kicking the vCPUs out of KVM_RUN costs little beside it.
const PERIOD: Duration = Duration::from_millis(20);

/// Holds the vCPUs back for `percent` of every period while set; off again
/// when dropped.
pub struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
    control: Arc<VcpuControl>,
}

impl Throttle {
    /// Starts the throttle thread, narrowed to its own seccomp list (a
    /// list that cannot go in fails the migration: without a throttle it
    /// might not converge).
    pub fn start(control: Arc<VcpuControl>) -> std::io::Result<Throttle> {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s, c) = (percent.clone(), stop.clone(), control.clone());
        let thread = crate::security::spawn_narrowed(
            "throttle".into(),
            crate::security::ThreadFilter::Throttle,
            move || {
                while !s.load(Ordering::SeqCst) {
                    let pct = p.load(Ordering::SeqCst);
                    if pct == 0 {
                        std::thread::sleep(PERIOD);
                        continue;
                    }
                    c.set_throttled(true);
                    std::thread::sleep(PERIOD * pct / 100);
                    c.set_throttled(false);
                    std::thread::sleep(PERIOD * (100 - pct) / 100);
                }
                c.set_throttled(false);
            },
        )?;
        Ok(Throttle {
            percent,
            stop,
            thread: Some(thread),
            control,
        })
    }

    pub fn set(&self, pct: u32) {
        self.percent.store(pct, Ordering::SeqCst);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.control.set_throttled(false);
    }
}
