//! The PIO and MMIO buses: address ranges mapped to devices that vCPU exits
//! are dispatched to.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through port I/O or MMIO exits.
///
/// `base` is the start of the range the device was inserted at and `offset`
/// the access address relative to it.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A map from non-overlapping address ranges to devices.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if let Some((&b, r)) = self.ranges.range(..end).next_back() {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((base, &range.device))
    }

    /// Dispatches a read; returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 0x8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(5))), 0x20, 0x8)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x14, 0x8),
            Err(BusError::Overlap {
                base: 0x14,
                len: 0x8
            })
        );
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(0))), 0x8, 0x9),
            Err(BusError::Overlap {
                base: 0x8,
                len: 0x9
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x20, &[9]));
        assert!(bus.read(0x27, &mut b));
        assert_eq!(b[0], 16);
        assert!(!bus.read(0x18, &mut b));
        assert!(!bus.write(0x28, &[0]));
    }
}
