//! The source side of the share: a synchronous NFSv3 client over
//! `nfs3_client`, in-process, with no root and no kernel mount.
//!
//! Each connection carries one call at a time, so the client keeps a small
//! pool: a thread takes an idle connection or opens a new one, and gives it
//! back when the call is done. The bulk copy and the mirror of guest writes
//! thus never wait behind each other's calls. A `write_at` longer than the
//! server's wtmax (1 MiB with ours) sends up to four pieces at once, each on
//! its own connection, so a bulk copy that hands over a few MiB at a time
//! keeps the link busy despite the round trips.
//!
//! Writes are UNSTABLE; `sync` sends COMMIT and checks the server's write
//! verifier, so data a restarted server lost is reported, not ignored.
//!
//! Nothing waits forever: connecting, and every call, has a time limit, and
//! each socket has TCP keepalive plus TCP_USER_TIMEOUT so that a link that
//! goes down is noticed within seconds even while a long COMMIT is pending.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, createhow3, diropargs3, filename3, ftype3, nfs_fh3, nfsstat3, post_op_attr,
    post_op_fh3, sattr3, set_mode3, set_size3, stable_how, writeverf3, COMMIT3args, CREATE3args,
    FSINFO3args, LOOKUP3args, Nfs3Result, READ3args, READDIRPLUS3args, REMOVE3args, SETATTR3args,
    WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{ConnectError, MountError, Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use tokio::net::TcpStream;

use super::{check_name, check_range, Share, ShareAccess, ShareError, ShareFile};

/// Limit for establishing a TCP connection, and for the whole mount.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for one call other than COMMIT.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// COMMIT flushes a file's dirty pages on the destination, which may take a
/// while on a slow disk; a dead link is caught earlier by [`LINK_TIMEOUT`].
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(120);
/// Data unacknowledged for this long, or keepalive probes unanswered for
/// this long, and the kernel gives up on the connection.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunk size used when the server offers no sensible maximum.
const FALLBACK_IO: u32 = 64 * 1024;
/// Upper bound on the chunk size, whatever the server offers.
const MAX_IO: u32 = 4 << 20;

type Conn = Nfs3Client<Stream>;

/// A share served by a [`super::NfsShareServer`] (or any NFSv3 server that
/// offers MOUNT and NFS on one port).
pub struct NfsShare {
    client: Arc<Client>,
    /// Mirrored guest writes, which the guest waits for, go through a
    /// client of their own: its own reactor and connections. On the shared
    /// one, a reply could wait for whichever copy worker held the reactor
    /// to finish sealing its 1 MiB WRITE before it was noticed.
    urgent: Arc<Client>,
}

struct Client {
    // Declared before the runtime: connections go before their reactor.
    idle: Mutex<Vec<Conn>>,
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    access: Arc<ShareAccess>,
    describe: String,
    root: nfs_fh3,
    rtmax: u32,
    wtmax: u32,
}

impl NfsShare {
    /// Mounts `export_path` from the server at `addr` (MOUNT and NFS on the
    /// same port, no portmapper).
    pub fn connect(
        addr: SocketAddr,
        export_path: &str,
        access: ShareAccess,
    ) -> Result<Self, ShareError> {
        let access = Arc::new(access);
        let describe = format!("nfs://{addr}{export_path}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ShareError::io(format!("starting the client for {describe}"), e))?;
        let mounted = runtime.block_on(async {
            tokio::time::timeout(CONNECT_TIMEOUT, mount(addr, export_path, &access)).await
        });
        let (conn, root, fsinfo) = match mounted {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                return Err(ShareError::Connect {
                    share: describe,
                    why: e,
                })
            }
            Err(_) => {
                return Err(ShareError::Timeout {
                    share: describe,
                    op: "MOUNT",
                    secs: CONNECT_TIMEOUT.as_secs(),
                })
            }
        };
        let (rtmax, wtmax) = match fsinfo {
            Some((rtmax, wtmax)) => (io_size(rtmax), io_size(wtmax)),
            None => (FALLBACK_IO, FALLBACK_IO),
        };
        let urgent = Client {
            idle: Mutex::new(Vec::new()),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ShareError::io(format!("starting the client for {describe}"), e))?,
            addr,
            access: access.clone(),
            describe: describe.clone(),
            root: root.clone(),
            rtmax,
            wtmax,
        };
        // Its first connection now, not in the guest's first write.
        urgent.give_back(urgent.connection()?);
        Ok(NfsShare {
            client: Arc::new(Client {
                idle: Mutex::new(vec![conn]),
                runtime,
                addr,
                access,
                describe,
                root,
                rtmax,
                wtmax,
            }),
            urgent: Arc::new(urgent),
        })
    }

    /// Largest WRITE the client sends (the server's wtmax, within bounds).
    pub fn write_size(&self) -> u32 {
        self.client.wtmax
    }
}

fn io_size(offered: u32) -> u32 {
    if offered < 4096 {
        FALLBACK_IO
    } else {
        offered.min(MAX_IO)
    }
}

/// Mounts and asks FSINFO. The error is a sentence for [`ShareError::Connect`].
async fn mount(
    addr: SocketAddr,
    export_path: &str,
    access: &Arc<ShareAccess>,
) -> Result<(Conn, nfs_fh3, Option<(u32, u32)>), String> {
    let connector = Connector(access.clone());
    let connection = Nfs3ConnectionBuilder::new(connector, addr.ip().to_string(), export_path)
        .mount_port(addr.port())
        .nfs3_port(addr.port())
        .connect_from_privileged_port(false)
        .mount()
        .await
        .map_err(|e| match e {
            ConnectError::Mount(MountError::Denied(status)) => {
                format!("the server does not export {export_path} ({status})")
            }
            ConnectError::Io(e) => format!("cannot connect: {e}"),
            e => format!("mount failed: {e}"),
        })?;
    let root = connection.root_nfs_fh3();
    let mut conn = connection.into_nfs3_client();
    let fsinfo = match conn
        .fsinfo(&FSINFO3args {
            fsroot: root.clone(),
        })
        .await
        .map_err(|e| format!("FSINFO failed: {e}"))?
    {
        Nfs3Result::Ok(info) => Some((info.rtmax, info.wtmax)),
        Nfs3Result::Err(_) => None,
    };
    Ok((conn, root, fsinfo))
}

/// A connection for `nfs3_client`: TLS, or plain TCP in `--insecure` mode.
/// Unlike its own tokio wrapper, end of stream is an error: the client's
/// read loop would otherwise spin on a connection the server closed until
/// the call's time limit.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl nfs3_client::io::AsyncRead for Stream {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self {
            Stream::Plain(s) => tokio::io::AsyncReadExt::read(s, buf).await?,
            Stream::Tls(s) => tokio::io::AsyncReadExt::read(s, buf).await?,
        };
        match n {
            0 if !buf.is_empty() => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => Ok(n),
        }
    }
}

impl nfs3_client::io::AsyncWrite for Stream {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncWriteExt;
        let n = match self {
            Stream::Plain(s) => s.write(buf).await?,
            // The client waits for the answer next, never flushing: what
            // the TLS layer took must be on the wire before that.
            Stream::Tls(s) => {
                let n = s.write(buf).await?;
                s.flush().await?;
                n
            }
        };
        match n {
            0 if !buf.is_empty() => Err(std::io::ErrorKind::WriteZero.into()),
            n => Ok(n),
        }
    }
}

/// An NFS error status as a [`ShareError`]: "no space" and "quota" become
/// [`ShareError::NoSpace`].
pub(crate) fn status_error(share: &str, what: String, status: nfsstat3) -> ShareError {
    match status {
        nfsstat3::NFS3ERR_NOSPC | nfsstat3::NFS3ERR_DQUOT => ShareError::NoSpace { what },
        status => ShareError::Nfs {
            what: format!("{what} on {share}"),
            status: status.to_string(),
        },
    }
}

/// Opens connections with the time limits described above.
struct Connector(Arc<ShareAccess>);

/// A TCP connection, its TLS handshake, and the secret that opens it.
async fn connect_stream(addr: SocketAddr, access: &ShareAccess) -> std::io::Result<Stream> {
    use tokio::io::AsyncWriteExt;
    let tcp = connect_tcp(addr).await?;
    let admitted = async {
        match &access.tls {
            Some((config, name)) => {
                let mut s = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| {
                        std::io::Error::other(format!(
                            "TLS handshake failed: {}",
                            crate::migration::transport::explain_handshake_error(&e)
                        ))
                    })?;
                if let Some(secret) = &access.secret {
                    s.write_all(secret).await?;
                }
                s.flush().await?;
                Ok(Stream::Tls(Box::new(s)))
            }
            None => {
                let mut tcp = tcp;
                if let Some(secret) = &access.secret {
                    tcp.write_all(secret).await?;
                }
                Ok(Stream::Plain(tcp))
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, admitted)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
}

async fn connect_tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })??;
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(&stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(3))
            .with_interval(Duration::from_secs(1))
            .with_retries(5),
    )?;
    socket.set_tcp_user_timeout(Some(LINK_TIMEOUT))?;
    Ok(stream)
}

impl nfs3_client::net::Connector for Connector {
    type Connection = Stream;

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Self::Connection> {
        connect_stream(addr, &self.0).await
    }

    async fn connect_with_port(
        &self,
        addr: SocketAddr,
        _local_port: u16,
    ) -> std::io::Result<Self::Connection> {
        // Only used for privileged source ports, which the share never asks for.
        self.connect(addr).await
    }
}

impl Client {
    fn connection(&self) -> Result<Conn, ShareError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        self.runtime
            .block_on(connect_stream(self.addr, &self.access))
            .map(Nfs3Client::new)
            .map_err(|e| ShareError::Connect {
                share: self.describe.clone(),
                why: format!("cannot connect: {e}"),
            })
    }

    fn give_back(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }

    /// Runs one call on a pooled connection.
    fn call<R>(
        &self,
        op: &'static str,
        limit: Duration,
        f: impl AsyncFnOnce(&mut Conn) -> Result<R, RpcError>,
    ) -> Result<R, ShareError> {
        let mut conn = self.connection()?;
        let result = self
            .runtime
            .block_on(async { tokio::time::timeout(limit, f(&mut conn)).await });
        self.settle(op, limit, conn, result)
    }

    /// Runs `n` calls at once, call `i` being `f(connection, i)`, each on its
    /// own pooled connection. Fails with the first error, after all ended.
    fn call_parallel<R>(
        &self,
        op: &'static str,
        limit: Duration,
        n: usize,
        f: impl AsyncFn(&mut Conn, usize) -> Result<R, RpcError>,
    ) -> Result<Vec<R>, ShareError> {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            match self.connection() {
                Ok(conn) => conns.push(conn),
                Err(e) => {
                    conns.into_iter().for_each(|c| self.give_back(c));
                    return Err(e);
                }
            }
        }
        // The timers must be made inside the runtime.
        let results = self.runtime.block_on(async {
            join_all(
                conns
                    .iter_mut()
                    .enumerate()
                    .map(|(i, conn)| tokio::time::timeout(limit, f(conn, i)))
                    .collect(),
            )
            .await
        });
        let mut replies = Vec::with_capacity(n);
        let mut first_error = None;
        for (conn, result) in conns.into_iter().zip(results) {
            match self.settle(op, limit, conn, result) {
                Ok(reply) => replies.push(reply),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(replies), Err)
    }

    /// Gives the connection back unless its call failed in transport or
    /// timed out: such a connection may be mid-message and is dropped.
    fn settle<R>(
        &self,
        op: &'static str,
        limit: Duration,
        conn: Conn,
        result: Result<Result<R, RpcError>, tokio::time::error::Elapsed>,
    ) -> Result<R, ShareError> {
        match result {
            Ok(Ok(reply)) => {
                self.give_back(conn);
                Ok(reply)
            }
            Ok(Err(e)) => {
                if e.is_connection_reusable() {
                    self.give_back(conn);
                }
                Err(self.rpc_error(op, e))
            }
            Err(_) => Err(ShareError::Timeout {
                share: self.describe.clone(),
                op,
                secs: limit.as_secs(),
            }),
        }
    }

    fn rpc_error(&self, op: &str, e: RpcError) -> ShareError {
        let share = self.describe.clone();
        match e {
            RpcError::Io(e) => ShareError::Connect {
                share,
                why: if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    format!("{op}: the server closed the connection")
                } else {
                    format!("{op}: connection lost: {e}")
                },
            },
            e => ShareError::Protocol {
                share,
                why: format!("{op}: {e}"),
            },
        }
    }

    fn status_error(&self, what: String, status: nfsstat3) -> ShareError {
        status_error(&self.describe, what, status)
    }

    fn protocol(&self, why: String) -> ShareError {
        ShareError::Protocol {
            share: self.describe.clone(),
            why,
        }
    }

    fn lookup(&self, name: &str) -> Result<nfs_fh3, ShareError> {
        let args = LOOKUP3args {
            what: diropargs3 {
                dir: self.root.clone(),
                name: filename3::from(name.as_bytes()),
            },
        };
        match self.call("LOOKUP", RPC_TIMEOUT, async |c| c.lookup(&args).await)? {
            Nfs3Result::Ok(ok) => Ok(ok.object),
            Nfs3Result::Err((status, _)) => {
                Err(self.status_error(format!("looking up {name}"), status))
            }
        }
    }
}

impl Share for NfsShare {
    fn create(&self, name: &str, size: u64) -> Result<Arc<dyn ShareFile>, ShareError> {
        check_name(name)?;
        let client = &self.client;
        // Size 0 first: UNCHECKED on an existing file only applies the
        // attributes, and growing to `size` would keep its old contents.
        let args = CREATE3args {
            where_: diropargs3 {
                dir: client.root.clone(),
                name: filename3::from(name.as_bytes()),
            },
            how: createhow3::UNCHECKED(sattr3 {
                mode: set_mode3::Some(0o644),
                size: set_size3::Some(0),
                ..sattr3::default()
            }),
        };
        let fh = match client.call("CREATE", RPC_TIMEOUT, async |c| c.create(&args).await)? {
            Nfs3Result::Ok(ok) => match ok.obj {
                post_op_fh3::Some(fh) => fh,
                post_op_fh3::None => client.lookup(name)?,
            },
            Nfs3Result::Err((status, _)) => {
                return Err(client.status_error(format!("creating {name}"), status))
            }
        };
        if size > 0 {
            let args = SETATTR3args {
                object: fh.clone(),
                new_attributes: sattr3 {
                    size: set_size3::Some(size),
                    ..sattr3::default()
                },
                guard: Default::default(),
            };
            if let Nfs3Result::Err((status, _)) =
                client.call("SETATTR", RPC_TIMEOUT, async |c| c.setattr(&args).await)?
            {
                return Err(client.status_error(format!("sizing {name} to {size} bytes"), status));
            }
        }
        Ok(Arc::new(NfsFile {
            client: client.clone(),
            urgent: self.urgent.clone(),
            fh,
            name: name.to_string(),
            verf: Mutex::new(None),
        }))
    }

    fn remove(&self, name: &str) -> Result<(), ShareError> {
        check_name(name)?;
        let client = &self.client;
        let args = REMOVE3args {
            object: diropargs3 {
                dir: client.root.clone(),
                name: filename3::from(name.as_bytes()),
            },
        };
        match client.call("REMOVE", RPC_TIMEOUT, async |c| c.remove(&args).await)? {
            Nfs3Result::Ok(_) | Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(()),
            Nfs3Result::Err((status, _)) => {
                Err(client.status_error(format!("removing {name}"), status))
            }
        }
    }

    fn list(&self) -> Result<Vec<(String, u64)>, ShareError> {
        let client = &self.client;
        let mut files = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
            let args = READDIRPLUS3args {
                dir: client.root.clone(),
                cookie,
                cookieverf,
                dircount: 64 * 1024,
                maxcount: 1 << 20,
            };
            let reply = match client.call("READDIRPLUS", RPC_TIMEOUT, async |c| {
                c.readdirplus(&args).await
            })? {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((status, _)) => {
                    return Err(client.status_error("listing the share".into(), status))
                }
            };
            cookieverf = reply.cookieverf;
            let entries = reply.reply.entries.0;
            if entries.is_empty() && !reply.reply.eof {
                return Err(client.protocol("READDIRPLUS: no entries and no end".into()));
            }
            for entry in entries {
                cookie = entry.cookie;
                let name = String::from_utf8_lossy(entry.name.as_ref()).into_owned();
                if name == "." || name == ".." {
                    continue;
                }
                match entry.name_attributes {
                    post_op_attr::Some(attr) if attr.type_ == ftype3::NF3REG => {
                        files.push((name, attr.size))
                    }
                    post_op_attr::Some(_) => {}
                    // The server left the attributes out: ask.
                    post_op_attr::None => {
                        if let Some(size) = NfsFile::size_of(client, &client.lookup(&name)?)? {
                            files.push((name, size));
                        }
                    }
                }
            }
            if reply.reply.eof {
                break;
            }
        }
        files.sort();
        Ok(files)
    }

    fn describe(&self) -> String {
        self.client.describe.clone()
    }
}

/// How many WRITEs of one `write_at` are in flight at once, each on its own
/// connection: a connection carries one call at a time, and a buffer of a
/// few times the server's wtmax then streams instead of stopping and going.
const PARALLEL_WRITES: usize = 4;

enum WriteFailure {
    Status {
        status: nfsstat3,
        at: u64,
        len: usize,
    },
    Count {
        asked: usize,
        answered: usize,
    },
}

/// Writes one piece (at most wtmax) as UNSTABLE, going on after short
/// writes. Returns the write verifiers seen.
async fn write_piece(
    conn: &mut Conn,
    fh: &nfs_fh3,
    mut offset: u64,
    mut piece: &[u8],
) -> Result<Result<Vec<writeverf3>, WriteFailure>, RpcError> {
    let mut verfs = Vec::new();
    while !piece.is_empty() {
        let args = WRITE3args {
            file: fh.clone(),
            offset,
            // At most wtmax, which is a u32.
            count: piece.len() as u32,
            stable: stable_how::UNSTABLE,
            data: Opaque::borrowed(piece),
        };
        match conn.write(&args).await? {
            Nfs3Result::Ok(ok) => {
                let written = ok.count as usize;
                if written == 0 || written > piece.len() {
                    return Ok(Err(WriteFailure::Count {
                        asked: piece.len(),
                        answered: written,
                    }));
                }
                // A server may write more stably than asked; only unstable
                // data depends on the verifier.
                if ok.committed == stable_how::UNSTABLE {
                    verfs.push(ok.verf);
                }
                piece = &piece[written..];
                offset += written as u64;
            }
            Nfs3Result::Err((status, _)) => {
                return Ok(Err(WriteFailure::Status {
                    status,
                    at: offset,
                    len: piece.len(),
                }))
            }
        }
    }
    Ok(Ok(verfs))
}

/// Polls all the futures until every one is done; outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

struct NfsFile {
    client: Arc<Client>,
    urgent: Arc<Client>,
    fh: nfs_fh3,
    name: String,
    /// The server's write verifier as of the first unstable write: if it
    /// changes, the server restarted and dropped uncommitted data.
    verf: Mutex<Option<writeverf3>>,
}

impl NfsFile {
    /// Writes all of `data` at `offset` through `client`.
    fn write_through(&self, client: &Client, offset: u64, data: &[u8]) -> Result<(), ShareError> {
        check_range(
            || format!("writing {} bytes at {offset} to {}", data.len(), self.name),
            offset,
            data.len(),
        )?;
        let step = client.wtmax as usize;
        let mut base = 0;
        while base < data.len() {
            let window = &data[base..data.len().min(base + step * PARALLEL_WRITES)];
            let pieces: Vec<&[u8]> = window.chunks(step).collect();
            let at = |i: usize| offset + (base + i * step) as u64;
            let results =
                client.call_parallel("WRITE", RPC_TIMEOUT, pieces.len(), async |c, i| {
                    write_piece(c, &self.fh, at(i), pieces[i]).await
                })?;
            for result in results {
                match result {
                    Ok(verfs) => verfs.into_iter().try_for_each(|v| self.check_verf(v))?,
                    Err(WriteFailure::Status { status, at, len }) => {
                        return Err(client.status_error(
                            format!("writing {len} bytes at {at} to {}", self.name),
                            status,
                        ))
                    }
                    Err(WriteFailure::Count { asked, answered }) => {
                        return Err(client.protocol(format!(
                            "WRITE of {asked} bytes to {} answered {answered} bytes written",
                            self.name
                        )))
                    }
                }
            }
            base += window.len();
        }
        Ok(())
    }

    /// Size of a regular file, None for anything else.
    fn size_of(client: &Client, fh: &nfs_fh3) -> Result<Option<u64>, ShareError> {
        let args = nfs3_client::nfs3_types::nfs3::GETATTR3args { object: fh.clone() };
        match client.call("GETATTR", RPC_TIMEOUT, async |c| c.getattr(&args).await)? {
            Nfs3Result::Ok(ok) => {
                Ok((ok.obj_attributes.type_ == ftype3::NF3REG).then_some(ok.obj_attributes.size))
            }
            Nfs3Result::Err((status, _)) => {
                Err(client.status_error("reading attributes".into(), status))
            }
        }
    }

    fn check_verf(&self, verf: writeverf3) -> Result<(), ShareError> {
        let mut known = self.verf.lock().unwrap_or_else(|p| p.into_inner());
        match *known {
            None => {
                *known = Some(verf);
                Ok(())
            }
            Some(v) if v == verf => Ok(()),
            Some(_) => Err(self.client.protocol(format!(
                "the server restarted: data written to {} but not yet committed was lost",
                self.name
            ))),
        }
    }
}

impl ShareFile for NfsFile {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ShareError> {
        self.write_through(&self.client, offset, data)
    }

    fn write_mirrored(&self, offset: u64, data: &[u8]) -> Result<(), ShareError> {
        self.write_through(&self.urgent, offset, data)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, ShareError> {
        let client = &self.client;
        check_range(
            || format!("reading at {offset} from {}", self.name),
            offset,
            buf.len(),
        )?;
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(client.rtmax as usize);
            let at = offset + done as u64;
            let args = READ3args {
                file: self.fh.clone(),
                offset: at,
                // At most rtmax, which is a u32.
                count: want as u32,
            };
            match client.call("READ", RPC_TIMEOUT, async |c| c.read(&args).await)? {
                Nfs3Result::Ok(ok) => {
                    let got = ok.data.len();
                    if got > want {
                        return Err(client.protocol(format!(
                            "READ of {want} bytes from {} answered {got}",
                            self.name
                        )));
                    }
                    buf[done..done + got].copy_from_slice(&ok.data);
                    done += got;
                    if ok.eof || got == 0 {
                        break;
                    }
                }
                Nfs3Result::Err((status, _)) => {
                    return Err(
                        client.status_error(format!("reading at {at} from {}", self.name), status)
                    )
                }
            }
        }
        Ok(done)
    }

    fn sync(&self) -> Result<(), ShareError> {
        let client = &self.client;
        let args = COMMIT3args {
            file: self.fh.clone(),
            offset: 0,
            count: 0,
        };
        match client.call("COMMIT", COMMIT_TIMEOUT, async |c| c.commit(&args).await)? {
            Nfs3Result::Ok(ok) => self.check_verf(ok.verf),
            Nfs3Result::Err((status, _)) => {
                Err(client.status_error(format!("committing {}", self.name), status))
            }
        }
    }
}
