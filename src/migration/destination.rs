//! The receiving side: listens, vets what connects, receives memory straight
//! into a fresh guest memory and then the state. The VMM turns the result
//! into a running guest once the source says go.

use std::fs::File;
use std::io::{BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::memory::{receive_pages, receive_zero};
use super::protocol::{
    expect, parse_json, read_header, read_payload, send_json, Hello, HelloAck, Kind, PassEnd,
    ProtocolError, Reason, ShareOffer, PAGE_SIZE, PROTOCOL_VERSION,
};
use super::share::NfsShareServer;
use crate::snapshot::VmState;
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::vm::Vm;

/// How long the destination waits for the next frame before giving up (the
/// source sends heartbeats while it has nothing else to send).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_MEMORY: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cannot set up the VM: {0}")]
    Vm(String),
}

/// A guest fully received, not yet running.
pub struct Incoming {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub hello: Hello,
    pub vm: Vm,
    pub memfd: File,
    pub mem: GuestMemoryMmap,
    pub state: VmState,
    /// Where the VM's files were copied (storage migration); removed again
    /// if the guest never runs here.
    pub share_dir: Option<ShareDir>,
}

/// `DIR/<migration id>/`: deleted on drop unless `keep` was called, so a
/// failed migration leaves nothing behind.
pub struct ShareDir {
    pub path: PathBuf,
    keep: bool,
}

impl ShareDir {
    /// The marker, next to the directory (not in the share), that says a
    /// copy is incomplete: a later `ferry receive --dir` removes what a
    /// killed one left behind.
    fn marker(base: &Path, id: &str) -> PathBuf {
        base.join(format!(".{id}.partial"))
    }

    fn create(base: &Path, id: &str) -> Result<ShareDir, DestinationError> {
        let path = base.join(id);
        let err = |e: std::io::Error| {
            DestinationError::Vm(format!("cannot create {}: {e}", path.display()))
        };
        std::fs::write(Self::marker(base, id), b"").map_err(err)?;
        std::fs::create_dir(&path).map_err(err)?;
        Ok(ShareDir { path, keep: false })
    }

    /// The guest runs on these files now.
    pub fn keep(&mut self) {
        self.keep = true;
        if let (Some(base), Some(id)) = (self.path.parent(), self.path.file_name()) {
            let _ = std::fs::remove_file(Self::marker(base, &id.to_string_lossy()));
        }
    }
}

impl Drop for ShareDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
            if let (Some(base), Some(id)) = (self.path.parent(), self.path.file_name()) {
                let _ = std::fs::remove_file(Self::marker(base, &id.to_string_lossy()));
            }
        }
    }
}

/// Removes incomplete copies that a killed `ferry receive` left in `base`.
pub fn remove_leftovers(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".partial"))
        {
            if !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()) {
                eprintln!(
                    "ferry: removing the incomplete copy {} left by an earlier migration",
                    base.join(id).display()
                );
                let _ = std::fs::remove_dir_all(base.join(id));
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Tells the source we are ready (restored, not running) and waits for its
/// go: until then the guest is the source's.
pub fn ready_and_wait_go(stream: &mut TcpStream) -> Result<(), ProtocolError> {
    send_json(stream, Kind::Ready, &serde_json::json!({}))?;
    stream.flush()?;
    expect(stream, Kind::Go)?;
    Ok(())
}

pub fn confirm_resumed(stream: &mut TcpStream) -> Result<(), ProtocolError> {
    send_json(stream, Kind::Resumed, &serde_json::json!({}))?;
    stream.flush()?;
    Ok(())
}

/// Best effort: the source learns why we give up.
fn tell_source(stream: &mut TcpStream, why: &dyn std::fmt::Display) {
    let _ = send_json(
        stream,
        Kind::Error,
        &Reason {
            reason: why.to_string(),
        },
    );
}

pub fn bind(addr: &str) -> Result<TcpListener, DestinationError> {
    TcpListener::bind(addr).map_err(|source| DestinationError::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// Waits for one migration. Connections that are not a valid migration
/// handshake are refused and logged, and the wait goes on; once a handshake
/// was accepted, any failure ends the wait with an error and everything
/// received is dropped.
pub fn accept_migration(
    listener: &TcpListener,
    dir: Option<&Path>,
) -> Result<Incoming, DestinationError> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ferry: accept failed: {e}");
                continue;
            }
        };
        let mut stream = stream;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(IDLE_TIMEOUT)).ok();
        let hello = match handshake(&mut stream, dir) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("ferry: refused a connection from {peer}: {e}");
                if !matches!(e, DestinationError::Protocol(ProtocolError::Io(_))) {
                    tell_source(&mut stream, &e);
                }
                continue;
            }
        };
        eprintln!(
            "ferry: receiving migration {} from {peer}: {} vCPUs, {} MiB",
            hello.migration_id,
            hello.vcpus,
            hello.memory_size >> 20
        );
        return receive(stream, peer, hello, dir);
    }
}

/// Reads and vets the source's Hello.
fn handshake(stream: &mut TcpStream, dir: Option<&Path>) -> Result<Hello, DestinationError> {
    let hello: Hello = parse_json(Kind::Hello, &expect(stream, Kind::Hello)?)?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(DestinationError::Refused(format!(
            "migration protocol version {}, this ferry speaks version {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    if hello.migration_id.is_empty()
        || hello.migration_id.len() > 64
        || !hello.migration_id.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(DestinationError::Refused("invalid migration id".into()));
    }
    if let Some(offer) = &hello.storage {
        if dir.is_none() {
            return Err(DestinationError::Refused(
                "the source wants to copy the VM's files, but this ferry receive has no --dir to put them in"
                    .into(),
            ));
        }
        let plain = |n: &String| {
            !n.is_empty()
                && n.len() <= 255
                && n != "."
                && n != ".."
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if offer.files.len() > 64 || !offer.files.iter().all(plain) {
            return Err(DestinationError::Refused(
                "invalid file names for the share".into(),
            ));
        }
    }
    if hello.vcpus == 0 || hello.vcpus > crate::config::MAX_VCPUS {
        return Err(DestinationError::Refused(format!(
            "{} vCPUs is not a VM this ferry can run",
            hello.vcpus
        )));
    }
    let host_mib = crate::util::host_memory_mib().unwrap_or(0);
    if hello.memory_size < MIN_MEMORY
        || !hello.memory_size.is_multiple_of(1 << 20)
        || hello.memory_size >> 20 > host_mib
    {
        return Err(DestinationError::Refused(format!(
            "guest memory of {} bytes does not fit this host ({host_mib} MiB)",
            hello.memory_size
        )));
    }
    check_cpuid(&hello.cpuid)?;
    Ok(hello)
}

/// The feature bits a guest may have come to rely on, by (leaf, subleaf,
/// register): every one it sees must be supported here.
const FEATURE_REGS: &[(u32, u32, usize, u32)] = &[
    // leaf 1 EDX, minus HTT (topology is ours to set).
    (1, 0, 3, !(1 << 28)),
    // leaf 1 ECX, minus the hypervisor bit (ours to set).
    (1, 0, 2, !(1 << 31)),
    (7, 0, 1, !0),
    (7, 0, 2, !0),
    (7, 0, 3, !0),
    (0xd, 1, 0, !0),
    (0x8000_0001, 0, 2, !0),
    (0x8000_0001, 0, 3, !0),
];

fn check_cpuid(guest: &[kvm_bindings::kvm_cpuid_entry2]) -> Result<(), DestinationError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| DestinationError::Vm(e.to_string()))?;
    let host = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| DestinationError::Vm(e.to_string()))?;
    let find = |set: &[kvm_bindings::kvm_cpuid_entry2], leaf: u32, sub: u32| {
        set.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    };
    let reg = |e: &kvm_bindings::kvm_cpuid_entry2, r: usize| [e.eax, e.ebx, e.ecx, e.edx][r];
    for &(leaf, sub, r, mask) in FEATURE_REGS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host.as_slice(), leaf, sub)
            .map(|h| reg(&h, r))
            .unwrap_or(0);
        let missing = reg(&g, r) & mask & !h;
        if missing != 0 {
            return Err(DestinationError::Refused(format!(
                "the guest uses CPU features this host lacks: CPUID leaf {leaf:#x}.{sub} {} bits {missing:#x}",
                ["EAX", "EBX", "ECX", "EDX"][r]
            )));
        }
    }
    Ok(())
}

/// Sets up the share for a storage migration: `DIR/<id>/`, served over NFS
/// (only to `peer`) unless the source writes through its own mount.
fn open_share(
    stream: &TcpStream,
    peer: SocketAddr,
    hello: &Hello,
    dir: Option<&Path>,
) -> Result<Option<(ShareDir, Option<NfsShareServer>, ShareOffer)>, DestinationError> {
    let (Some(offer), Some(base)) = (&hello.storage, dir) else {
        return Ok(None);
    };
    let share_dir = ShareDir::create(base, &hello.migration_id)?;
    if offer.mounted_share {
        let offer = ShareOffer {
            dir_name: hello.migration_id.clone(),
            nfs_port: None,
            export: None,
        };
        return Ok(Some((share_dir, None, offer)));
    }
    let local: IpAddr = stream
        .local_addr()
        .map_err(|e| DestinationError::Vm(e.to_string()))?
        .ip();
    let export = format!(
        "/ferry-{}",
        crate::util::random_hex::<16>()
            .map_err(|e| DestinationError::Vm(format!("cannot name the share: {e}")))?
    );
    let server = NfsShareServer::start(&share_dir.path, local, &export, Some(peer.ip()))
        .map_err(|e| DestinationError::Vm(format!("cannot start the NFS share: {e}")))?;
    eprintln!(
        "ferry: sharing {} over NFSv3 at {local}:{} as {export} (only to {})",
        share_dir.path.display(),
        server.port(),
        peer.ip()
    );
    let offer = ShareOffer {
        dir_name: hello.migration_id.clone(),
        nfs_port: Some(server.port()),
        export: Some(export),
    };
    Ok(Some((share_dir, Some(server), offer)))
}

fn receive(
    stream: TcpStream,
    peer: SocketAddr,
    hello: Hello,
    dir: Option<&Path>,
) -> Result<Incoming, DestinationError> {
    let mut stream = stream;
    let setup = (|| {
        let share = open_share(&stream, peer, &hello, dir)?;
        let vm = Vm::new().map_err(|e| DestinationError::Vm(e.to_string()))?;
        let (memfd, mem) = create_guest_memory(hello.memory_size)
            .map_err(|e| DestinationError::Vm(e.to_string()))?;
        vm.set_memory(&mem, false)
            .map_err(|e| DestinationError::Vm(e.to_string()))?;
        Ok::<_, DestinationError>((vm, memfd, mem, share))
    })();
    let (vm, memfd, mem, share) = match setup {
        Ok(s) => s,
        Err(e) => {
            tell_source(&mut stream, &e);
            return Err(e);
        }
    };
    send_json(
        &mut stream,
        Kind::HelloAck,
        &HelloAck {
            protocol: PROTOCOL_VERSION,
            migration_id: hello.migration_id.clone(),
            vcpus: hello.vcpus,
            memory_size: hello.memory_size,
            share: share.as_ref().map(|s| s.2.clone()),
        },
    )?;
    stream.flush().map_err(ProtocolError::from)?;
    // The share lives until the state arrives (the source completes the
    // storage copy before it sends the state), or until failure.
    let (share_dir, share_server) = match share {
        Some((d, s, _)) => (Some(d), s),
        None => (None, None),
    };

    let mut reader =
        BufReader::with_capacity(1 << 20, stream.try_clone().map_err(ProtocolError::from)?);
    let result = (|| -> Result<VmState, DestinationError> {
        loop {
            let h = read_header(&mut reader)?;
            match h.kind {
                Kind::MemoryPages => {
                    receive_pages(&mut reader, &h, &mem)?;
                }
                Kind::ZeroPages => {
                    receive_zero(&mut reader, &h, &mem)?;
                }
                Kind::PassEnd => {
                    let _: PassEnd = parse_json(Kind::PassEnd, &read_payload(&mut reader, &h)?)?;
                }
                Kind::Heartbeat => {
                    read_payload(&mut reader, &h)?;
                }
                Kind::State => {
                    let payload = read_payload(&mut reader, &h)?;
                    let state: VmState = parse_json(Kind::State, &payload)?;
                    check_state(&hello, &state)?;
                    return Ok(state);
                }
                Kind::Error => {
                    let r: Reason = parse_json(Kind::Error, &read_payload(&mut reader, &h)?)?;
                    return Err(ProtocolError::Peer(r.reason).into());
                }
                other => {
                    return Err(ProtocolError::Unexpected {
                        expected: "memory or state",
                        got: other,
                    }
                    .into())
                }
            }
        }
    })();
    drop(share_server);
    match result {
        Ok(mut state) => {
            if let Some(d) = &share_dir {
                // The copies live in the share directory, named as the
                // source's config says.
                let local = |p: &Path| d.path.join(p.file_name().unwrap_or(p.as_os_str()));
                state.config.kernel = local(&state.config.kernel);
                state.config.initrd = state.config.initrd.as_deref().map(local);
                for drive in state.config.drives.iter_mut() {
                    drive.path = local(&drive.path);
                }
                for drive in state.drives.iter_mut() {
                    drive.block.path = local(&drive.block.path);
                }
            }
            Ok(Incoming {
                stream,
                peer,
                hello,
                vm,
                memfd,
                mem,
                state,
                share_dir,
            })
        }
        Err(e) => {
            tell_source(&mut stream, &e);
            Err(e)
        }
    }
}

/// The state must describe the VM the handshake announced.
fn check_state(hello: &Hello, state: &VmState) -> Result<(), DestinationError> {
    let bad = |why: String| {
        DestinationError::Protocol(ProtocolError::Malformed {
            kind: Kind::State,
            why,
        })
    };
    if state.memory_size != hello.memory_size || state.config.memory_mib << 20 != hello.memory_size
    {
        return Err(bad("memory size differs from the handshake".into()));
    }
    if state.vcpus.len() != hello.vcpus as usize || state.config.vcpus != hello.vcpus {
        return Err(bad("vCPU count differs from the handshake".into()));
    }
    if state.drives.len() != state.config.drives.len() {
        return Err(bad("drive states do not match the config".into()));
    }
    let _ = PAGE_SIZE;
    Ok(())
}
