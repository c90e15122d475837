//! The 16550 UART at COM1, from vm-superio, on the PIO bus. Output goes to
//! stdout or a file; input (when interactive) comes from the event loop.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

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

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(irq), out),
        }
    }

    pub fn irq_evt(&self) -> &EventFd {
        self.serial.interrupt_evt().evt()
    }

    /// Queues console input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
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
