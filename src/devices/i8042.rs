//! The i8042 controller, only as far as a guest needs it to reset the
//! machine (command 0xfe on port 0x64), which ends the VM cleanly.

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::persist::Persist;
use super::serial::EventFdTrigger;

pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset_evt` is signalled when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            dev: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }
}

/// The controller keeps no guest-visible state: it reads 0 and acts on the
/// reset command at once. The state exists so that every device takes part
/// in snapshots the same way, and a later, stateful model fits in.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    /// The eventfd signalled on reset.
    type ConstructorArgs = EventFd;
    type Error = std::convert::Infallible;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(reset_evt: EventFd, _state: &I8042State) -> Result<Self, Self::Error> {
        Ok(I8042::new(reset_evt))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = self.dev.read(offset as u8);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(0x60, 4, &[0x01]);
        assert!(evt.read().is_err());
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
