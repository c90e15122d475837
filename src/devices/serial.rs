//! The 16550 UART at COM1, from vm-superio, on the PIO bus. Output goes to
//! stdout or a file; input (when interactive) comes from the event loop.

use std::io::Write;

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

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

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    line_seen: bool,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(irq), out),
            line_seen: false,
        }
    }

    pub fn irq_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().evt()
    }

    /// Queues console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
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
            args.out,
        )
        .map_err(|e| SerialError(format!("{e:?}")))?;
        Ok(Self {
            serial,
            line_seen: false,
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
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
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
}
