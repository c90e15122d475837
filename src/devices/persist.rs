//! The one contract by which every device gives and takes its state.
//!
//! A device saves itself into a plain serde struct, and is rebuilt from the
//! arguments its constructor needs here (host resources: files, eventfds,
//! guest memory, chosen by this VMM) plus that saved state. Keeping the two
//! apart is what lets a destination choose its own host paths while the
//! guest-visible state comes from the source: the state never names a host
//! resource.

pub trait Persist: Sized {
    /// What the guest could observe of the device: serialized into snapshots
    /// and the migration stream.
    type State;
    /// What this host gives the device to be rebuilt with.
    type ConstructorArgs;
    type Error;

    fn save(&self) -> Self::State;

    /// A device like the saved one, on this host's resources. Fails, naming
    /// the mismatch, when the state does not fit the arguments (a disk of
    /// another size, a device of another type).
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
