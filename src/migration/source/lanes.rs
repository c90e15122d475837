//! The extra memory connections ("lanes") of a migration with
//! `connections` > 1: each has a sender thread of its own, so that page
//! copies, checksums and TLS encryption of one pass run on several cores.
//! The migration channel stays lane 0 and keeps every control frame; lane
//! `i` carries the stripes of guest memory that [`stripe_owner`] gives it,
//! and ends with a `Seal` of its own.
//!
//! [`stripe_owner`]: crate::migration::protocol::stripe_owner

use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::migration::memory::PageSender;
use crate::migration::protocol::{
    expect_small, lane_nonce, send_json, DigestWriter, Join, Kind, LaneOffer, ProtocolError,
};
use crate::migration::storage::Pacer;
use crate::migration::transport::{self, Channel, Security};
use crate::vstate::memory::GuestMemoryMmap;

/// The source's default: one connection per host CPU, at most 4. Each
/// lane's thread copies, checksums and encrypts its share of the pages;
/// more lanes than cores only adds contention, and beyond 4 the link, not
/// the CPU, is what limits on the hosts this was measured on.
pub fn default_connections() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .clamp(1, 4)
}

/// What a lane is asked to send.
pub struct LaneJob {
    /// Data ranges (each within one of this lane's stripes).
    pub ranges: Vec<(u64, u64)>,
    /// Ranges to declare zero without reading them.
    pub holes: Vec<(u64, u64)>,
    /// The vCPUs are paused: send straight from guest memory.
    pub paused: bool,
    /// End the lane with its `Seal` after this job.
    pub seal: bool,
}

struct Lane {
    jobs: Option<mpsc::Sender<LaneJob>>,
    results: mpsc::Receiver<Result<u64, ProtocolError>>,
    tcp: TcpStream,
    thread: Option<JoinHandle<()>>,
}

/// The extra connections of one migration, numbered 1.. (0 is the
/// channel).
pub struct Lanes {
    lanes: Vec<Lane>,
    /// Wire bytes all lanes sent so far, for progress.
    pub wire: Arc<AtomicU64>,
}

/// How a lane reports a failure: its number and what went wrong.
#[derive(Debug, thiserror::Error)]
#[error("memory connection {index}: {source}")]
pub struct LaneError {
    pub index: u32,
    pub source: ProtocolError,
}

/// What opening the lanes needs from the session.
pub struct LaneSetup<'a> {
    pub security: &'a Security,
    pub destination: &'a str,
    pub addr: SocketAddr,
    pub migration_id: &'a str,
    pub nonce: &'a str,
    pub connections: u32,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub reply_timeout: Duration,
    pub write_timeout: Duration,
}

impl Lanes {
    /// No extra connections.
    pub fn none() -> Lanes {
        Lanes {
            lanes: Vec::new(),
            wire: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Opens lanes 1..connections to `offer`, each authenticated as the
    /// channel is and joined with the offer's secret, and starts their
    /// sender threads.
    pub fn open(
        s: &LaneSetup<'_>,
        offer: &LaneOffer,
        mem: &GuestMemoryMmap,
        pacer: &Arc<Pacer>,
        cancel: &Arc<AtomicBool>,
    ) -> Result<Lanes, LaneError> {
        let mut out = Lanes::none();
        let addr = SocketAddr::new(s.addr.ip(), offer.port);
        for index in 1..s.connections {
            let err = |source| LaneError { index, source };
            let channel = connect(s, addr, index, offer).map_err(err)?;
            out.lanes.push(
                Lane::start(
                    channel,
                    index,
                    &lane_nonce(s.nonce, index),
                    mem,
                    pacer,
                    cancel,
                    &out.wire,
                )
                .map_err(|e| err(e.into()))?,
            );
        }
        Ok(out)
    }

    pub fn count(&self) -> usize {
        self.lanes.len()
    }

    /// Hands lane `i + 1` its job.
    pub fn send(&self, jobs: Vec<LaneJob>) -> Result<(), LaneError> {
        for (i, (lane, job)) in self.lanes.iter().zip(jobs).enumerate() {
            let sent = lane.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
            if !sent {
                return Err(LaneError {
                    index: i as u32 + 1,
                    source: ProtocolError::Io(std::io::Error::other("its sender thread ended")),
                });
            }
        }
        Ok(())
    }

    /// Waits for every lane's answer to its last job; returns their wire
    /// bytes, or the first failure. `tick` runs every 50 ms meanwhile.
    pub fn wait(&self, tick: &mut dyn FnMut()) -> Result<u64, LaneError> {
        let mut total = 0;
        let mut first_err = None;
        for (i, lane) in self.lanes.iter().enumerate() {
            let index = i as u32 + 1;
            loop {
                match lane.results.recv_timeout(Duration::from_millis(50)) {
                    Ok(Ok(n)) => total += n,
                    Ok(Err(source)) => {
                        first_err.get_or_insert(LaneError { index, source });
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        tick();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        first_err.get_or_insert(LaneError {
                            index,
                            source: ProtocolError::Io(std::io::Error::other(
                                "its sender thread ended",
                            )),
                        });
                    }
                }
                break;
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Closes every lane at once (a stuck write ends with its socket).
    pub fn shutdown(&mut self) {
        for lane in &mut self.lanes {
            lane.jobs = None;
            let _ = lane.tcp.shutdown(std::net::Shutdown::Both);
        }
        for lane in &mut self.lanes {
            if let Some(t) = lane.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// TCP, then TLS with the same checks as the channel (the destination's
/// certificate must name the host dialled), then `Join`, then `Joined`.
fn connect(
    s: &LaneSetup<'_>,
    addr: SocketAddr,
    index: u32,
    offer: &LaneOffer,
) -> Result<Channel, ProtocolError> {
    let tcp = TcpStream::connect_timeout(&addr, s.connect_timeout)?;
    tcp.set_nodelay(true).ok();
    let mut channel = match s.security {
        Security::Tls(id) => {
            let name = transport::server_name(s.destination)
                .map_err(|e| ProtocolError::Io(std::io::Error::other(e.to_string())))?;
            Channel::connect(tcp, id, name, Instant::now() + s.handshake_timeout).map_err(|e| {
                ProtocolError::Io(std::io::Error::other(format!(
                    "TLS handshake failed: {}",
                    transport::explain_handshake_error(&e)
                )))
            })?
        }
        Security::Insecure => Channel::plain(tcp),
    };
    channel.set_read_timeout(Some(s.reply_timeout)).ok();
    channel.set_write_timeout(Some(s.write_timeout)).ok();
    send_json(
        &mut channel,
        Kind::Join,
        &Join {
            migration_id: s.migration_id.to_string(),
            index,
            secret: offer.secret.clone(),
        },
    )?;
    channel.flush()?;
    expect_small(&mut channel, Kind::Joined, 1024)?;
    Ok(channel)
}

impl Lane {
    fn start(
        channel: Channel,
        index: u32,
        nonce: &str,
        mem: &GuestMemoryMmap,
        pacer: &Arc<Pacer>,
        cancel: &Arc<AtomicBool>,
        wire: &Arc<AtomicU64>,
    ) -> std::io::Result<Lane> {
        let tcp = channel.tcp().try_clone()?;
        let (jobs_tx, jobs) = mpsc::channel::<LaneJob>();
        let (results_tx, results) = mpsc::channel();
        let mut w = DigestWriter::new(BufWriter::with_capacity(256 << 10, channel));
        w.start_digest(nonce);
        let (mem, pacer, cancel, wire) = (mem.clone(), pacer.clone(), cancel.clone(), wire.clone());
        let thread = std::thread::Builder::new()
            .name(format!("migration-lane{index}"))
            .spawn(move || {
                // Without its filter it sends nothing: the session sees the
                // lane gone and fails the migration.
                if !crate::security::narrow_thread(
                    "migration lane",
                    crate::security::ThreadFilter::LaneOut,
                ) {
                    return;
                }
                while let Ok(job) = jobs.recv() {
                    let r = run_job(&mut w, &mem, &job, &pacer, &cancel, &wire);
                    let failed = r.is_err();
                    if results_tx.send(r).is_err() || failed || job.seal {
                        return;
                    }
                }
            })?;
        Ok(Lane {
            jobs: Some(jobs_tx),
            results,
            tcp,
            thread: Some(thread),
        })
    }
}

fn run_job(
    w: &mut DigestWriter<BufWriter<Channel>>,
    mem: &GuestMemoryMmap,
    job: &LaneJob,
    pacer: &Pacer,
    cancel: &AtomicBool,
    wire: &AtomicU64,
) -> Result<u64, ProtocolError> {
    let mut sender = PageSender::new(w, mem);
    let mut charged = 0u64;
    let mut between = |sent: u64| -> Result<(), ProtocolError> {
        wire.fetch_add(sent - charged, Ordering::Relaxed);
        if !job.paused {
            pacer.consume(sent - charged, cancel);
        }
        charged = sent;
        if cancel.load(Ordering::SeqCst) && !job.paused {
            return Err(ProtocolError::Io(std::io::Error::other("cancelled")));
        }
        Ok(())
    };
    for &(gpa, len) in &job.ranges {
        sender.send_range(gpa, len, job.paused, &mut between)?;
    }
    for &(gpa, len) in &job.holes {
        sender.send_zero(gpa, len)?;
    }
    let mut n = sender.wire_bytes;
    wire.fetch_add(n - charged, Ordering::Relaxed);
    if job.seal {
        // A lane digests from its start, so there always is one.
        let seal = w.seal().unwrap_or(crate::migration::protocol::Seal {
            frames: 0,
            digest: 0,
        });
        n += send_json(w, Kind::Seal, &seal)?;
    }
    w.flush()?;
    Ok(n)
}
