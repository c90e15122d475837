//! The 16550 UART at COM1, from vm-superio, on the PIO bus. Output goes to
//! stdout or a file; input (when interactive) comes from the event loop.
//!
//! Output is gathered into lines ([`ConsoleOut`]): vm-superio flushes its
//! writer after every byte, which made each byte the guest printed a
//! write(2) to the console, on the vCPU thread, while the guest waited in
//! its port write. A line now goes out when it ends, when 4 KiB are
//! waiting, or at the latest [`PARTIAL_LINE_DELAY`] after its first byte
//! (a prompt without a newline), by a timer on the event loop.

use std::io::Write;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::bus::BusDevice;
use super::persist::Persist;

/// An interrupt line backed by an EventFd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    pub fn evt(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's registers and unread input, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// How long the start of an unfinished line may wait before it is written.
pub const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(2);

/// Output waiting beyond this is written at once, line or not.
const CONSOLE_BUFFER: usize = 4096;

/// The UART's writer: keeps what the guest prints until a line ends (or
/// the buffer fills), and ignores vm-superio's flush after each byte.
pub struct ConsoleOut {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// Every byte goes out at once (no timer to finish partial lines).
    unbuffered: bool,
}

impl ConsoleOut {
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            unbuffered: false,
        }
    }

    /// Writes out whatever waits. A console that cannot take it (a closed
    /// pipe, a full disk) loses the output, never the guest.
    fn write_out(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.inner.write_all(&self.buf);
            self.buf.clear();
        }
        let _ = self.inner.flush();
    }

    fn pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.unbuffered || self.buf.len() >= CONSOLE_BUFFER || b.contains(&b'\n') {
            self.write_out();
        }
        Ok(b.len())
    }

    /// vm-superio calls this after every byte: the line decides instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
    line_seen: bool,
    /// Fires [`PARTIAL_LINE_DELAY`] after an unfinished line began.
    flush_timer: TimerFd,
    timer_armed: bool,
}

fn timer() -> Result<TimerFd, SerialError> {
    TimerFd::new().map_err(|e| SerialError(format!("cannot create the console's timer: {e}")))
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        Ok(Self {
            serial: Serial::new(EventFdTrigger::new(irq), ConsoleOut::new(out)),
            line_seen: false,
            flush_timer: timer()?,
            timer_armed: false,
        })
    }

    pub fn irq_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().evt()
    }

    /// Queues console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Writes out what the guest printed so far, line or not.
    pub fn flush(&mut self) {
        self.serial.writer_mut().write_out();
    }

    /// After a byte was printed: makes sure an unfinished line goes out
    /// soon even if the guest prints nothing more.
    fn arm_for_partial_line(&mut self) {
        if self.timer_armed || !self.serial.writer_mut().pending() {
            return;
        }
        // Failing to arm leaves the line until the next newline or flush;
        // better to write it now than to risk that.
        if self.flush_timer.reset(PARTIAL_LINE_DELAY, None).is_ok() {
            self.timer_armed = true;
        } else {
            self.flush();
        }
    }
}

impl MutEventSubscriber for SerialDevice {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.flush_timer, EventSet::IN)) {
            // Without the timer a partial line would wait for its newline:
            // write every byte at once instead.
            eprintln!("ferry: serial: cannot watch the console's timer: {e:?}");
            self.serial.writer_mut().unbuffered = true;
            self.flush();
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.flush_timer.wait();
        self.timer_armed = false;
        self.flush();
    }
}

/// What a UART is rebuilt on: its interrupt line and where its output goes.
pub struct SerialArgs {
    pub irq: EventFd,
    pub out: Box<dyn Write + Send>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid serial state: {0}")]
pub struct SerialError(String);

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type ConstructorArgs = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> SerialDeviceState {
        self.serial.state().into()
    }

    fn restore(args: SerialArgs, state: &SerialDeviceState) -> Result<Self, SerialError> {
        let serial = Serial::from_state(
            &state.into(),
            EventFdTrigger::new(args.irq),
            NoEvents,
            ConsoleOut::new(args.out),
        )
        .map_err(|e| SerialError(format!("{e:?}")))?;
        Ok(Self {
            serial,
            line_seen: false,
            flush_timer: timer()?,
            timer_armed: false,
        })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.serial.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        // A failed write to the console must not stop the guest.
        let _ = self.serial.write(offset as u8, data[0]);
        if offset == 0 {
            self.arm_for_partial_line();
        }
        if offset == 0 && data[0] == b'\n' && !self.line_seen {
            // The guest's first console line: the end of start-up as a
            // user sees it.
            self.line_seen = true;
            crate::startup::mark("first-console-line");
            crate::startup::report();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_interrupt() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone())).unwrap();
        // LSR reports the transmitter empty.
        let mut b = [0u8];
        dev.read(0x3f8, 5, &mut b);
        assert_ne!(b[0] & 0x20, 0);
        for c in b"hi\n" {
            dev.write(0x3f8, 0, &[*c]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt, queue input, read it back.
        dev.write(0x3f8, 1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert!(irq.read().unwrap() >= 1);
        dev.read(0x3f8, 5, &mut b);
        assert_eq!(b[0] & 1, 1);
        dev.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'x');
        // Wide or out-of-range accesses are ignored, not fatal.
        let mut wide = [0u8; 2];
        dev.read(0x3f8, 0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        dev.write(0x3f8, 9, &[1]);
    }

    fn print(dev: &mut SerialDevice, s: &[u8]) {
        for c in s {
            dev.write(0x3f8, 0, &[*c]);
        }
    }

    #[test]
    fn output_goes_out_by_the_line() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(sink.clone())).unwrap();
        print(&mut dev, b"one ");
        assert_eq!(&*sink.0.lock().unwrap(), b"", "a byte at a time");
        print(&mut dev, b"line\ntwo");
        assert_eq!(&*sink.0.lock().unwrap(), b"one line\n");
        // A snapshot or the VM's end writes out the unfinished line.
        dev.flush();
        assert_eq!(&*sink.0.lock().unwrap(), b"one line\ntwo");
        // A long line without an end is written once the buffer is full.
        sink.0.lock().unwrap().clear();
        print(&mut dev, &[b'x'; CONSOLE_BUFFER + 10]);
        assert_eq!(sink.0.lock().unwrap().len(), CONSOLE_BUFFER);
    }

    #[test]
    fn an_unfinished_line_is_written_by_the_event_loop_soon_after() {
        use event_manager::SubscriberOps;
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(
            SerialDevice::new(irq, Box::new(sink.clone())).unwrap(),
        ));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        em.add_subscriber(dev.clone());
        print(&mut dev.lock().unwrap(), b"login: ");
        assert_eq!(&*sink.0.lock().unwrap(), b"");
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().is_empty() && start.elapsed() < Duration::from_secs(5) {
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"login: ");
        // The timer is armed again by the next unfinished line.
        print(&mut dev.lock().unwrap(), b"x");
        let start = std::time::Instant::now();
        while sink.0.lock().unwrap().len() < 8 && start.elapsed() < Duration::from_secs(5) {
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"login: x");
    }
}
