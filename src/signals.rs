//! SIGTERM and SIGINT as a requested shutdown of the VM.
//!
//! The process must not just die on them: the normal exit path is what stops
//! the vCPUs, flushes the serial log and drops the `ApiServer`, which removes
//! the control socket. So the signal handler only records the signal and
//! writes a byte to a socket pair; the event loop reads it and stops the VM
//! as `PUT /vm/shutdown` would.
//!
//! A second SIGTERM or SIGINT while that shutdown runs (a vCPU stuck in KVM's
//! instruction emulator can delay it) ends the process at once, as the
//! signal's default action would.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::SigId;

use crate::vstate::vcpu::{ExitSignal, VmExit};

/// The signals that stop the VM cleanly.
pub const SHUTDOWN_SIGNALS: [i32; 2] = [SIGTERM, SIGINT];

/// Handlers for [`SHUTDOWN_SIGNALS`], installed by [`ShutdownSignals::install`]
/// and retired on drop. Signals that arrive before the event loop runs wait
/// in the socket pair.
pub struct ShutdownSignals {
    wake: UnixStream,
    last: Arc<AtomicUsize>,
    /// Once true, the next signal gets its default action (terminate).
    armed: Arc<AtomicBool>,
    /// The pipe writes, unregistered on drop. The handlers that check `armed`
    /// stay: signal-hook cannot put the default disposition back.
    wake_ids: Vec<SigId>,
}

impl ShutdownSignals {
    /// Errors say what failed, ready for a message.
    pub fn install() -> io::Result<ShutdownSignals> {
        Self::try_install().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot handle SIGTERM and SIGINT: {}",
                    crate::util::io_msg(&e)
                ),
            )
        })
    }

    fn try_install() -> io::Result<ShutdownSignals> {
        let (wake, writer) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let last = Arc::new(AtomicUsize::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        let mut wake_ids = Vec::new();
        for signal in SHUTDOWN_SIGNALS {
            // Order matters: the default action is checked before this very
            // signal arms it.
            signal_hook::flag::register_conditional_default(signal, armed.clone())?;
            signal_hook::flag::register(signal, armed.clone())?;
            wake_ids.push(signal_hook::flag::register_usize(
                signal,
                last.clone(),
                signal as usize,
            )?);
            wake_ids.push(signal_hook::low_level::pipe::register(
                signal,
                writer.try_clone()?,
            )?);
        }
        Ok(ShutdownSignals {
            wake,
            last,
            armed,
            wake_ids,
        })
    }

    /// The subscriber that stops the VM through `exit` when a signal came.
    pub fn into_subscriber(self, exit: Arc<ExitSignal>) -> ShutdownSubscriber {
        ShutdownSubscriber {
            signals: self,
            exit,
        }
    }

    /// The signal that arrived, once one did.
    pub fn received(&self) -> Option<i32> {
        match self.last.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal as i32),
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }
}

impl Drop for ShutdownSignals {
    fn drop(&mut self) {
        // Past the event loop nobody reads the socket pair: a signal must
        // end the process as it would have before install().
        self.armed.store(true, Ordering::SeqCst);
        for id in self.wake_ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// The name of a signal, for messages.
pub fn signal_name(signal: i32) -> String {
    signal_hook::low_level::signal_name(signal)
        .map(str::to_string)
        .unwrap_or_else(|| format!("signal {signal}"))
}

/// Handles [`ShutdownSignals`] on the VMM's event loop.
pub struct ShutdownSubscriber {
    signals: ShutdownSignals,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ShutdownSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.signals.wake.as_raw_fd(), EventSet::IN)) {
            eprintln!("ferry: SIGTERM and SIGINT will not stop the VM cleanly: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.signals.drain();
        if let Some(signal) = self.signals.received() {
            eprintln!("ferry: {}: stopping the VM", signal_name(signal));
            self.exit.exit(VmExit::Requested);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::lock;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;

    /// Signals are process-wide: this is the one test that raises them, and
    /// it raises only one (a second would now end the test process).
    #[test]
    fn a_signal_becomes_a_requested_exit_and_arms_the_default_action() {
        let exit = Arc::new(ExitSignal::new().expect("eventfd"));
        let signals = ShutdownSignals::install().expect("install");
        assert_eq!(signals.received(), None);
        signal_hook::low_level::raise(SIGTERM).expect("raise");
        assert_eq!(signals.received(), Some(SIGTERM));
        assert!(signals.armed.load(Ordering::SeqCst));
        assert!(
            exit.reason().is_none(),
            "nothing happens off the event loop"
        );

        let mut manager =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().expect("epoll");
        let subscriber = Arc::new(Mutex::new(signals.into_subscriber(exit.clone())));
        manager.add_subscriber(subscriber.clone());
        assert_eq!(manager.run_with_timeout(5000).expect("event loop"), 1);
        assert!(matches!(exit.reason(), Some(VmExit::Requested)));
        // Drained: the loop does not wake again for the same signal.
        assert_eq!(manager.run_with_timeout(0).expect("event loop"), 0);
        assert_eq!(lock(&subscriber).signals.received(), Some(SIGTERM));
        assert_eq!(signal_name(SIGINT), "SIGINT");
    }
}
