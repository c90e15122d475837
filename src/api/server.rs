//! The HTTP side of the control socket.
//!
//! One accept thread, `ferry-api`, checks who is calling (SO_PEERCRED) and
//! gives each connection a short-lived thread of its own, `ferry-api-conn`,
//! so that a client that sends slowly, or a VMM that is slow to answer, holds
//! up only that one connection. The connection thread reads one request head
//! within `MAX_HEAD_LEN` and parses it with httparse, reads its body within
//! `MAX_BODY_LEN` (a Content-Length or chunked body, bounded while it is
//! read, never allocated from what the client declares), asks the VMM,
//! answers with a Content-Length body and closes: one request per
//! connection.
//!
//! Issue 13: this used to be a gate in front of tiny_http on a private
//! socket. Every request then crossed two sockets and four threads (gate,
//! connection, answer copier, tiny_http's pool, a dispatcher, a request
//! thread); on this 2-core host, with one core taken by a spinning vCPU, the
//! first `GET /vm` after a restore took 3–20 ms to answer. The gate already
//! parsed and bounded every request, so it now answers them itself.

use crate::security::ThreadFilter;
use crate::util::{io_msg, lock};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, SockAddr, Socket, Type};
use vmm_sys_util::eventfd::EventFd;

use super::{ApiAction, ApiError, ApiRequest};

/// Largest request body accepted; larger ones get 413.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// How long a request waits for the VMM's answer before getting 504.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request line plus headers read; beyond it, 414 (no end of the
/// request line yet) or 431.
pub const MAX_HEAD_LEN: usize = 64 * 1024;

/// Connections served at once; more are answered 503 and closed, so that a
/// client opening connections and never sending costs threads only up to
/// this bound.
const MAX_CONNECTIONS: usize = 64;

/// A chunk-size line (size, extensions) longer than this is malformed.
const MAX_CHUNK_LINE: usize = 1024;

/// How long a client may take to send its request head or body.
const CLIENT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client may take to read its answer.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// `sockaddr_un.sun_path` holds 108 bytes including the NUL.
const MAX_SOCKET_PATH_LEN: usize = 107;

/// Turns the optional JSON body of a matched route into the VMM action.
type ActionParser = fn(Option<Value>) -> Result<ApiAction, ApiError>;

struct Route {
    method: &'static str,
    path: &'static str,
    action: ActionParser,
}

/// Every endpoint. Routes that take parameters deserialize them from the body
/// here (e.g. `serde_json::from_value::<SnapshotParams>`) and report a bad
/// body with `ApiError::bad_request`.
const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/vm",
        action: |body| without_params(body, ApiAction::GetVm),
    },
    Route {
        method: "PUT",
        path: "/vm/pause",
        action: |body| without_params(body, ApiAction::Pause),
    },
    Route {
        method: "PUT",
        path: "/vm/resume",
        action: |body| without_params(body, ApiAction::Resume),
    },
    Route {
        method: "PUT",
        path: "/vm/shutdown",
        action: |body| without_params(body, ApiAction::Shutdown),
    },
    Route {
        method: "PUT",
        path: "/snapshot/create",
        action: snapshot_create,
    },
    Route {
        method: "PUT",
        path: "/migration/send",
        action: migration_send,
    },
    Route {
        method: "GET",
        path: "/migration",
        action: |body| without_params(body, ApiAction::MigrationStatus),
    },
    Route {
        method: "PUT",
        path: "/migration/cancel",
        action: |body| without_params(body, ApiAction::MigrationCancel),
    },
];

/// `{"destination": "host:port", "max_downtime_ms": 50, "bandwidth_mib_s": null}`.
fn migration_send(body: Option<Value>) -> Result<ApiAction, ApiError> {
    let body = body.ok_or_else(|| {
        ApiError::bad_request("send a JSON body {\"destination\": \"<host>:<port>\"}")
    })?;
    let req: crate::migration::SendRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid migration request: {e}")))?;
    req.validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(ApiAction::MigrationSend(req))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreateBody {
    dir: PathBuf,
}

/// `{"dir": "..."}`: where to write the snapshot.
fn snapshot_create(body: Option<Value>) -> Result<ApiAction, ApiError> {
    let body = body.ok_or_else(|| {
        ApiError::bad_request("send a JSON body {\"dir\": \"<directory for the snapshot>\"}")
    })?;
    let SnapshotCreateBody { dir } = serde_json::from_value(body)
        .map_err(|e| ApiError::bad_request(format!("invalid snapshot request: {e}")))?;
    if dir.as_os_str().is_empty() {
        return Err(ApiError::bad_request("\"dir\" must not be empty"));
    }
    Ok(ApiAction::SnapshotCreate { dir })
}

/// Actions without parameters accept no body, `null` or `{}`; anything else
/// is more likely a mistake than something to ignore silently.
fn without_params(body: Option<Value>, action: ApiAction) -> Result<ApiAction, ApiError> {
    match body {
        None | Some(Value::Null) => Ok(action),
        Some(Value::Object(map)) if map.is_empty() => Ok(action),
        Some(_) => Err(ApiError::bad_request(
            "this endpoint takes no parameters: send no body, null or {}",
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("control socket {}: already in use by a running process", path.display())]
    InUse { path: PathBuf },
    #[error("control socket {}: the path exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error(
        "control socket {}: the path is {len} bytes long, too long for a Unix socket (maximum \
         {MAX_SOCKET_PATH_LEN})",
        path.display()
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("control socket {}: cannot {action}: {}", path.display(), io_msg(source))]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("control socket: cannot start its thread: {}", io_msg(.0))]
    Thread(io::Error),
}

/// The running control socket. Dropping it stops the accept thread, waits
/// (briefly) for answers being written and removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    /// The listener, to wake the accept thread when stopping (its path may
    /// be gone by then).
    listener: UnixListener,
    context: Arc<Context>,
}

impl ApiServer {
    /// The socket's path, made absolute.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept: it fails on a shut-down listener, sees `stopping`
        // and ends.
        // SAFETY: shutdown(2) on a descriptor we own; no memory involved.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.listener),
                libc::SHUT_RDWR,
            )
        };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = fs::remove_file(crate::security::jailed_path(&self.path));
        // An answer given (say, to `PUT /vm/shutdown`) reaches its client
        // before the process ends.
        self.context.drain();
    }
}

/// Serves the control socket at `path` with the default reply timeout.
///
/// The socket file is created with mode 0600. A stale socket left by a dead
/// process is replaced; a socket something still answers on is an error, and
/// so is a path that is not a socket.
pub fn start_api_server(
    path: &Path,
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
) -> Result<ApiServer, ApiServerError> {
    start_api_server_with_timeout(path, to_vmm, wake, REPLY_TIMEOUT)
}

/// [`start_api_server`] with a chosen time to wait for the VMM's answers.
pub fn start_api_server_with_timeout(
    path: &Path,
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
    reply_timeout: Duration,
) -> Result<ApiServer, ApiServerError> {
    // Absolute, so that the right file is removed on drop even if the
    // working directory changes meanwhile.
    let path = std::path::absolute(path).map_err(|source| ApiServerError::Io {
        path: path.to_path_buf(),
        action: "resolve the path",
        source,
    })?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH_LEN {
        return Err(ApiServerError::PathTooLong { path, len });
    }
    remove_stale_socket(&path)?;
    let listener = bind_owner_only(&path).map_err(|source| {
        if source.kind() == io::ErrorKind::AddrInUse {
            ApiServerError::InUse { path: path.clone() }
        } else {
            ApiServerError::Io {
                path: path.clone(),
                action: "bind",
                source,
            }
        }
    })?;
    // From here on the socket file is ours: remove it again on any failure.
    let cleanup = |e: ApiServerError| {
        let _ = fs::remove_file(&path);
        e
    };
    let accepting = listener.try_clone().map_err(|source| {
        cleanup(ApiServerError::Io {
            path: path.clone(),
            action: "clone the listener of",
            source,
        })
    })?;
    let context = Arc::new(Context {
        to_vmm,
        wake,
        reply_timeout,
        owner_uid: crate::security::invoking_uid(),
        connections: AtomicUsize::new(0),
        in_flight: Mutex::new(0),
        done: Condvar::new(),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let context = Arc::clone(&context);
        let stopping = Arc::clone(&stopping);
        thread::Builder::new()
            .name("ferry-api".into())
            .spawn(move || accept_loop(&accepting, &context, &stopping))
            .map_err(|e| cleanup(ApiServerError::Thread(e)))?
    };
    // After a --uid drop the socket must still be removable at exit.
    crate::security::own_after_drop(&path);
    Ok(ApiServer {
        path,
        stopping,
        acceptor: Some(acceptor),
        listener,
        context,
    })
}

/// Accepts on the socket; each connection of an allowed client gets a
/// thread of its own.
fn accept_loop(listener: &UnixListener, context: &Arc<Context>, stopping: &AtomicBool) {
    let mut refused = Refused::default();
    loop {
        if !narrow(ThreadFilter::ApiAccept) {
            return;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                // Out of descriptors, say: the connections in flight end and
                // give theirs back; never spin.
                eprintln!("ferry: control socket: accept: {}", io_msg(&e));
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        // Started before the process filter (set-up of a --uid run), this
        // thread narrows itself as soon as it is in: before this client.
        if !narrow(ThreadFilter::ApiAccept) {
            return;
        }
        // The socket is 0600, but after a --uid drop it belongs to that
        // user: another process running as the same uid must still not
        // drive the VM. Only root and whoever started ferry may.
        match peer_uid(&client) {
            Ok(uid) if uid == 0 || uid == context.owner_uid => {}
            Ok(uid) => {
                eprintln!("ferry: control socket: refused a client running as uid {uid}");
                continue;
            }
            Err(e) => {
                eprintln!(
                    "ferry: control socket: cannot tell the client's uid: {}",
                    io_msg(&e)
                );
                continue;
            }
        }
        let Some(slot) = Connection::take(context) else {
            refused.refuse(client);
            continue;
        };
        // If the thread cannot start, the connection closes with the closure.
        let _ = thread::Builder::new()
            .name("ferry-api-conn".into())
            .spawn(move || {
                if narrow(ThreadFilter::ApiConnection) {
                    serve_connection(client, &slot);
                }
            });
    }
}

/// Narrows the calling thread to `filter` once the process is confined
/// (issue 10: each thread its own allow-list); false if the filter cannot
/// go in: the thread then stops rather than serve unconfined.
fn narrow(filter: ThreadFilter) -> bool {
    crate::security::narrow_thread("control socket", filter)
}

/// The uid of the process at the other end of `client` (SO_PEERCRED).
fn peer_uid(client: &UnixStream) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Connections refused for want of a slot, answered 503 by the accept
/// thread, which must never block on them.
#[derive(Default)]
struct Refused(std::collections::VecDeque<(Instant, UnixStream)>);

impl Refused {
    /// How many answered, half-closed connections are kept open (so that the
    /// client's request write still succeeds and it reads the answer) and
    /// for how long.
    const KEPT: usize = 64;
    const LINGER: Duration = Duration::from_secs(1);

    fn refuse(&mut self, client: UnixStream) {
        let now = Instant::now();
        while self.0.front().is_some_and(|(at, _)| {
            now.duration_since(*at) > Self::LINGER || self.0.len() >= Self::KEPT
        }) {
            self.0.pop_front();
        }
        // The answer goes out only if the socket takes it at once.
        let _ = client.set_nonblocking(true);
        let reply = Reply::error(ApiError::new(
            503,
            format!("too many control connections at once (maximum {MAX_CONNECTIONS})"),
        ));
        if write_reply(&mut &client, &reply).is_ok() {
            let _ = client.shutdown(std::net::Shutdown::Write);
            self.0.push_back((now, client));
        }
    }
}

/// What follows a request head.
enum Body {
    None,
    Length(u64),
    Chunked,
}

/// One request head, owned.
struct Head {
    method: String,
    path: String,
    body: Body,
    expect_continue: bool,
}

/// Reads and answers one request, then closes the connection.
fn serve_connection(mut client: UnixStream, slot: &Connection) {
    let context = &slot.0;
    let _ = client.set_read_timeout(Some(CLIENT_READ_TIMEOUT));
    let _ = client.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    let mut buffer = Vec::with_capacity(4096);
    let (head, head_len) = match read_head(&mut client, &mut buffer) {
        Ok(Some(head)) => head,
        Ok(None) => return,
        Err(e) => return refuse(client, e),
    };
    // Bytes read with the head belong to the body (any pipelined request
    // after it is not served: one request per connection).
    let early = buffer.split_off(head_len);
    if head.expect_continue && !matches!(head.body, Body::None) {
        let _ = client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let body = match head.body {
        Body::None => Ok(Vec::new()),
        Body::Length(n) if n > MAX_BODY_LEN as u64 => Err(too_large()),
        Body::Length(n) => read_length_body(&mut client, early, n as usize),
        Body::Chunked => read_chunked_body(&mut client, early),
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => return refuse(client, e),
    };
    // From here until the answer is written, a stopping server waits for it.
    let _in_flight = InFlight::new(context);
    let reply = answer(&head.method, &head.path, &body, context).unwrap_or_else(Reply::error);
    let _ = write_reply(&mut client, &reply);
    let _ = client.shutdown(std::net::Shutdown::Both);
}

/// Reads until a complete request head is in `buffer`, within
/// `MAX_HEAD_LEN`. `Ok(None)`: the client went away first.
fn read_head(
    client: &mut UnixStream,
    buffer: &mut Vec<u8>,
) -> Result<Option<(Head, usize)>, ApiError> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buffer) {
            Ok(httparse::Status::Complete(n)) => {
                let body = body_of(req.headers)?;
                let expect_continue = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("expect")
                        && h.value.eq_ignore_ascii_case(b"100-continue")
                });
                let head = Head {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    body,
                    expect_continue,
                };
                return Ok(Some((head, n)));
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ApiError::new(431, "more than 64 request headers"))
            }
            Err(e) => return Err(ApiError::bad_request(format!("malformed request: {e}"))),
        }
        if buffer.len() >= MAX_HEAD_LEN {
            return Err(if buffer.windows(2).any(|w| w == b"\r\n") {
                ApiError::new(
                    431,
                    format!("request headers too large (maximum {MAX_HEAD_LEN} bytes)"),
                )
            } else {
                ApiError::new(
                    414,
                    format!("request line too long (maximum {MAX_HEAD_LEN} bytes)"),
                )
            });
        }
        let want = (MAX_HEAD_LEN - buffer.len()).min(chunk.len());
        match client.read(&mut chunk[..want]) {
            Ok(0) => return Ok(None),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(None),
        }
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        413,
        format!("request body too large (maximum {MAX_BODY_LEN} bytes)"),
    )
}

/// Reads a body of `len` (≤ `MAX_BODY_LEN`) bytes, `early` of which came
/// with the head.
fn read_length_body(
    client: &mut UnixStream,
    mut early: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>, ApiError> {
    early.truncate(len);
    let missing = len - early.len();
    let got = client
        .take(missing as u64)
        .read_to_end(&mut early)
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    if got < missing {
        return Err(ApiError::bad_request(format!(
            "the request body ended after {} of its {len} bytes",
            early.len()
        )));
    }
    Ok(early)
}

/// Reads a chunked body; the decoded body is bounded by `MAX_BODY_LEN` and
/// each chunk-size line by `MAX_CHUNK_LINE` while they are read.
fn read_chunked_body(client: &mut UnixStream, early: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let mut input = ChunkInput {
        client,
        pending: early,
        at: 0,
    };
    let mut body = Vec::new();
    loop {
        let line = input.line()?;
        let size_text = line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_text)
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 16)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| ApiError::bad_request("malformed chunk size in the request body"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !input.line()?.is_empty() {}
            return Ok(body);
        }
        // Compared against what is left, never summed: a size near u64::MAX
        // must not wrap past the bound.
        if size > (MAX_BODY_LEN - body.len()) as u64 {
            return Err(too_large());
        }
        input.bytes(size as usize, &mut body)?;
        if !input.line()?.is_empty() {
            return Err(ApiError::bad_request(
                "a chunk of the request body overran its size",
            ));
        }
    }
}

/// The client's bytes, those read with the head first.
struct ChunkInput<'a> {
    client: &'a mut UnixStream,
    pending: Vec<u8>,
    at: usize,
}

impl ChunkInput<'_> {
    fn byte(&mut self) -> Result<u8, ApiError> {
        if self.at == self.pending.len() {
            self.pending.resize(4096, 0);
            self.at = 0;
            let n = loop {
                match self.client.read(&mut self.pending) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            match n {
                Ok(n) if n > 0 => self.pending.truncate(n),
                _ => {
                    self.pending.clear();
                    return Err(ApiError::bad_request(
                        "the chunked request body ended early",
                    ));
                }
            }
        }
        self.at += 1;
        Ok(self.pending[self.at - 1])
    }

    /// One line without its CRLF, at most `MAX_CHUNK_LINE` long.
    fn line(&mut self) -> Result<Vec<u8>, ApiError> {
        let mut line = Vec::new();
        loop {
            match self.byte()? {
                b'\n' => {
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    return Ok(line);
                }
                b => line.push(b),
            }
            if line.len() > MAX_CHUNK_LINE {
                return Err(ApiError::bad_request(
                    "a chunk-size line of the request body is too long",
                ));
            }
        }
    }

    fn bytes(&mut self, n: usize, out: &mut Vec<u8>) -> Result<(), ApiError> {
        out.reserve(n);
        for _ in 0..n {
            out.push(self.byte()?);
        }
        Ok(())
    }
}

/// The body a request announces. Both a length and chunking, a length that
/// is not one number, or a transfer coding other than `chunked` is refused
/// rather than guessed at (the shapes of request smuggling).
fn body_of(headers: &[httparse::Header]) -> Result<Body, ApiError> {
    let mut length = None;
    let mut chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ApiError::bad_request("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(ApiError::bad_request(
                    "unsupported Transfer-Encoding (only chunked is accepted)",
                ));
            }
            chunked = true;
        }
    }
    match (length, chunked) {
        (Some(_), true) => Err(ApiError::bad_request(
            "both Content-Length and Transfer-Encoding",
        )),
        (Some(n), false) => Ok(Body::Length(n)),
        (None, true) => Ok(Body::Chunked),
        (None, false) => Ok(Body::None),
    }
}

/// Answers `error` and closes the connection, reading (at most a little
/// of) what the client still sends so that it gets to read the answer.
fn refuse(mut client: UnixStream, error: ApiError) {
    let _ = client.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
    if write_reply(&mut client, &Reply::error(error)).is_err() {
        return;
    }
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = client.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = io::copy(&mut (&client).take(1 << 20), &mut io::sink());
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// A socket file nobody accepts on any more is left over from a process that
/// died; anything else at the path is not ours to remove.
fn remove_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let io_error = |action, source| ApiServerError::Io {
        path: path.to_path_buf(),
        action,
        source,
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("inspect the path", e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(ApiServerError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(ApiServerError::InUse {
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(io_error("remove the stale socket", e))
                }
                _ => Ok(()),
            },
            Err(e) => Err(io_error("check whether the socket is in use", e)),
        },
    }
}

/// Binds a listening Unix socket whose file is created with mode 0600.
///
/// Linux creates the socket file with the mode of the socket's inode less the
/// umask. Setting that mode on the descriptor before bind() means the file
/// never exists with looser permissions, without changing the process-wide
/// umask under the feet of other threads.
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    // The kernel would cut the name at a NUL: bind() somewhere else.
    if path.as_os_str().as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not usable as a Unix socket path",
        ));
    }
    let address = SockAddr::unix(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)?;
    // fchmod(2) through File: std offers it on any descriptor that way.
    let socket = {
        let file = fs::File::from(OwnedFd::from(socket));
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        Socket::from(OwnedFd::from(file))
    };
    socket.bind(&address)?;
    let listener = (|| {
        socket.listen(128)?;
        // The umask can only have removed bits; give the owner back rw.
        let mode = fs::symlink_metadata(path)?.permissions().mode() & 0o777;
        if mode != 0o600 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        }
        Ok(UnixListener::from(socket))
    })();
    if listener.is_err() {
        let _ = fs::remove_file(path);
    }
    listener
}

struct Context {
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
    reply_timeout: Duration,
    /// Besides root, the only uid whose clients are served: whoever started
    /// ferry (before any `--uid` drop).
    owner_uid: u32,
    /// Connections being served (see `MAX_CONNECTIONS`).
    connections: AtomicUsize,
    /// Requests being answered: the server waits for them when it stops, so
    /// that an answer given (say, to `PUT /vm/shutdown`) reaches its client
    /// before the process ends.
    in_flight: Mutex<usize>,
    done: Condvar,
}

/// How long a stopping server waits for answers still being written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

impl Context {
    fn drain(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut n = lock(&self.in_flight);
        while *n > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            n = self
                .done
                .wait_timeout(n, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Counts one request in flight for as long as it lives.
struct InFlight(Arc<Context>);

impl InFlight {
    fn new(context: &Arc<Context>) -> InFlight {
        *lock(&context.in_flight) += 1;
        InFlight(Arc::clone(context))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut n = lock(&self.0.in_flight);
        *n = n.saturating_sub(1);
        self.0.done.notify_all();
    }
}

/// One of the `MAX_CONNECTIONS` connection slots, for as long as it lives.
struct Connection(Arc<Context>);

impl Connection {
    fn take(context: &Arc<Context>) -> Option<Connection> {
        let taken = context
            .connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            });
        taken.ok().map(|_| Connection(Arc::clone(context)))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What to send back.
struct Reply {
    status: u16,
    body: Option<Value>,
    allow: Option<String>,
}

impl Reply {
    fn error(error: ApiError) -> Reply {
        let status = if (400..=599).contains(&error.status) {
            error.status
        } else {
            500
        };
        Reply {
            status,
            body: Some(error.to_json()),
            allow: None,
        }
    }
}

/// Writes `reply` as one HTTP/1.1 response: always a Content-Length body
/// (none for 204), never chunked, and `Connection: close`.
fn write_reply(out: &mut impl Write, reply: &Reply) -> io::Result<()> {
    let data = match &reply.body {
        Some(value) => serde_json::to_vec(value).unwrap_or_else(|_| {
            // A Value always serializes; keep a fallback rather than panic.
            br#"{"error":"cannot encode the reply"}"#.to_vec()
        }),
        None => Vec::new(),
    };
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    if reply.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    if let Some(allow) = &reply.allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    if reply.status != 204 {
        head.push_str(&format!("Content-Length: {}\r\n", data.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut message = head.into_bytes();
    message.extend_from_slice(&data);
    out.write_all(&message)
}

fn answer(method: &str, url: &str, body: &[u8], context: &Context) -> Result<Reply, ApiError> {
    let path = url.split_once('?').map_or(url, |(path, _query)| path);
    let candidates: Vec<&Route> = ROUTES.iter().filter(|r| r.path == path).collect();
    if candidates.is_empty() {
        return Err(ApiError::new(404, format!("no such endpoint: {path}")));
    }
    let Some(route) = candidates.iter().find(|r| r.method == method) else {
        let allow = candidates
            .iter()
            .map(|r| r.method)
            .collect::<Vec<_>>()
            .join(", ");
        let mut reply = Reply::error(ApiError::new(
            405,
            format!("{method} is not allowed on {path} (allowed: {allow})"),
        ));
        reply.allow = Some(allow);
        return Ok(reply);
    };
    let action = (route.action)(json_body(body)?)?;
    ask_vmm(action, context)
}

/// The request body as JSON; `None` when there is none (or only whitespace).
fn json_body(body: &[u8]) -> Result<Option<Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
}

fn ask_vmm(action: ApiAction, context: &Context) -> Result<Reply, ApiError> {
    let unavailable = || ApiError::new(503, "the VMM is not running (shutting down?)");
    let (reply_tx, reply_rx) = mpsc::channel();
    context
        .to_vmm
        .send(ApiRequest {
            action,
            reply: reply_tx,
        })
        .map_err(|_| unavailable())?;
    // A failed write means the counter is saturated: the VMM has a wakeup
    // pending already and will find this request with the others.
    let _ = context.wake.write(1);
    match reply_rx.recv_timeout(context.reply_timeout) {
        Ok(Ok(Value::Null)) => Ok(Reply {
            status: 204,
            body: None,
            allow: None,
        }),
        Ok(Ok(value)) => Ok(Reply {
            status: 200,
            body: Some(value),
            allow: None,
        }),
        Ok(Err(error)) => Err(error),
        Err(RecvTimeoutError::Timeout) => Err(ApiError::new(
            504,
            format!(
                "the VMM did not answer within {} s",
                context.reply_timeout.as_secs_f64()
            ),
        )),
        Err(RecvTimeoutError::Disconnected) => Err(unavailable()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client::{error_message, request};
    use serde_json::json;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::sync::mpsc::Receiver;
    use tempfile::TempDir;

    /// A fake VMM: answers like the real one would, from the channel.
    fn fake_vmm(requests: Receiver<ApiRequest>) -> JoinHandle<()> {
        thread::spawn(move || {
            let mut paused = false;
            for request in requests {
                let reply = match request.action.clone() {
                    ApiAction::GetVm => Ok(json!({
                        "state": if paused { "paused" } else { "running" }
                    })),
                    ApiAction::Pause if paused => {
                        Err(ApiError::conflict("the VM is already paused"))
                    }
                    ApiAction::Resume if !paused => Err(ApiError::conflict("the VM is not paused")),
                    ApiAction::Pause | ApiAction::Resume => {
                        paused = !paused;
                        Ok(Value::Null)
                    }
                    ApiAction::Shutdown => Err(ApiError::new(200, "not a valid error status")),
                    ApiAction::SnapshotCreate { dir } => Ok(json!({ "dir": dir })),
                    other => Ok(json!({ "action": format!("{other:?}") })),
                };
                request.respond(reply);
            }
        })
    }

    struct Harness {
        dir: TempDir,
        sock: PathBuf,
        wake: EventFd,
        server: Option<ApiServer>,
    }

    impl Harness {
        /// A server on a fresh socket, answered by `fake_vmm`.
        fn new() -> Harness {
            let (tx, rx) = mpsc::channel();
            fake_vmm(rx);
            Harness::with_channel(tx, REPLY_TIMEOUT)
        }

        fn with_channel(tx: Sender<ApiRequest>, timeout: Duration) -> Harness {
            let dir = tempfile::tempdir().expect("tempdir");
            let sock = dir.path().join("api.sock");
            let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
            let server =
                start_api_server_with_timeout(&sock, tx, wake.try_clone().expect("clone"), timeout)
                    .expect("start");
            Harness {
                dir,
                sock,
                wake,
                server: Some(server),
            }
        }

        fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
            request(&self.sock, method, path, body.as_ref()).expect("request")
        }

        /// Sends raw bytes, returns the raw response text.
        fn raw(&self, bytes: &[u8]) -> String {
            let mut stream = UnixStream::connect(&self.sock).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            stream.write_all(bytes).expect("write");
            // Half-close: a server waiting for more body sees the end now.
            stream
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response);
            String::from_utf8_lossy(&response).into_owned()
        }
    }

    #[test]
    fn get_vm_roundtrip_wakes_the_vmm() {
        let h = Harness::new();
        assert_eq!(
            h.call("GET", "/vm", None),
            (200, json!({"state": "running"}))
        );
        assert!(h.wake.read().expect("the eventfd was written") >= 1);
        // A query string does not change the route.
        assert_eq!(h.call("GET", "/vm?verbose=1", None).0, 200);
        let raw = h.raw(b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert!(raw.contains("Content-Type: application/json\r\n"), "{raw}");
        assert!(raw.contains("Content-Length: 19\r\n"), "{raw}");
        assert!(raw.ends_with("\r\n\r\n{\"state\":\"running\"}"), "{raw}");
    }

    #[test]
    fn pause_and_resume() {
        let h = Harness::new();
        assert_eq!(h.call("PUT", "/vm/pause", None), (204, Value::Null));
        assert_eq!(h.call("GET", "/vm", None).1, json!({"state": "paused"}));
        let (status, body) = h.call("PUT", "/vm/pause", None);
        assert_eq!(
            (status, error_message(&body)),
            (409, Some("the VM is already paused"))
        );
        assert_eq!(
            h.call("PUT", "/vm/resume", Some(json!({}))),
            (204, Value::Null)
        );
        assert_eq!(
            h.call("PUT", "/vm/pause", Some(Value::Null)),
            (204, Value::Null)
        );
        let (status, body) = h.call("PUT", "/vm/resume", Some(json!({"now": true})));
        assert_eq!(status, 400);
        assert!(error_message(&body).is_some_and(|m| m.contains("takes no parameters")));
        assert_eq!(h.call("GET", "/vm", None).1, json!({"state": "paused"}));
    }

    #[test]
    fn migration_send_is_validated_before_it_reaches_the_vmm() {
        let h = Harness::new();
        let cases = [
            (
                json!({"destination": "nowhere"}),
                "\"destination\" must be <host>:<port>",
            ),
            (
                json!({"destination": "h:1", "max_downtime_ms": 0}),
                "\"max_downtime_ms\" must be between 1 and 60000",
            ),
            (
                json!({"destination": "h:1", "bandwidth_mib_s": 0}),
                "\"bandwidth_mib_s\" must be between 1 and 1048576",
            ),
            (
                json!({"destination": "h:1", "storage": "shared", "share": {"path": "/x"}}),
                "does not go with \"storage\": \"shared\"",
            ),
            (
                json!({"destination": "h:1", "bogus": 1}),
                "invalid migration request",
            ),
            (json!({"destination": "h:1"}), "give \"tls_dir\""),
            (
                json!({"destination": "h:1", "tls_dir": "/nonexistent"}),
                "/nonexistent/ca.pem",
            ),
        ];
        for (body, want) in cases {
            let (status, reply) = h.call("PUT", "/migration/send", Some(body.clone()));
            assert_eq!(status, 400, "{body} -> {reply}");
            let msg = error_message(&reply).unwrap_or_default();
            assert!(msg.contains(want), "{body} -> {msg}");
        }
        // A valid one goes through to the VMM as given.
        let (status, reply) = h.call(
            "PUT",
            "/migration/send",
            Some(json!({"destination": "h:1", "max_downtime_ms": 1, "insecure": true})),
        );
        assert_eq!(status, 200, "{reply}");
        let action = reply["action"].as_str().unwrap_or_default();
        assert!(action.contains("max_downtime_ms: 1"), "{action}");
    }

    #[test]
    fn vmm_error_with_a_non_error_status_becomes_500() {
        let h = Harness::new();
        let (status, body) = h.call("PUT", "/vm/shutdown", None);
        assert_eq!(
            (status, error_message(&body)),
            (500, Some("not a valid error status"))
        );
    }

    #[test]
    fn unknown_path_is_404() {
        let h = Harness::new();
        let (status, body) = h.call("GET", "/nope", None);
        assert_eq!(
            (status, body),
            (404, json!({"error": "no such endpoint: /nope"}))
        );
        let raw = h.raw(b"PUT /vm/pause/extra HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(raw.starts_with("HTTP/1.1 404 "), "{raw}");
        assert!(raw.contains("Content-Type: application/json\r\n"), "{raw}");
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        let h = Harness::new();
        let (status, body) = h.call("DELETE", "/vm", None);
        assert_eq!(status, 405);
        assert_eq!(
            error_message(&body),
            Some("DELETE is not allowed on /vm (allowed: GET)")
        );
        let raw = h.raw(b"GET /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(raw.starts_with("HTTP/1.1 405 "), "{raw}");
        assert!(raw.contains("Allow: PUT\r\n"), "{raw}");
        assert!(raw.contains("Content-Type: application/json\r\n"), "{raw}");
    }

    #[test]
    fn malformed_json_is_400() {
        let h = Harness::new();
        let raw = h.raw(
            b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\nContent-Length: 9\r\n\r\n{not json",
        );
        assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
        assert!(raw.contains("{\"error\":\"malformed JSON body: "), "{raw}");
        // Whitespace only counts as no body.
        let raw =
            h.raw(b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\nContent-Length: 2\r\n\r\n \n");
        assert!(raw.starts_with("HTTP/1.1 204 "), "{raw}");
    }

    #[test]
    fn oversized_body_is_413() {
        let h = Harness::new();
        let mut big = format!(
            "PUT /vm/pause HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_LEN + 1
        )
        .into_bytes();
        big.extend(std::iter::repeat_n(b' ', MAX_BODY_LEN + 1));
        let raw = h.raw(&big);
        assert!(raw.starts_with("HTTP/1.1 413 "), "{raw}");
        assert!(
            raw.contains("request body too large (maximum 65536 bytes)"),
            "{raw}"
        );

        // Without Content-Length (chunked), the limit holds while reading.
        let mut chunked = b"PUT /vm/pause HTTP/1.1\r\nConnection: close\r\n\
            Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
        for _ in 0..2 {
            chunked.extend(format!("{:x}\r\n", MAX_BODY_LEN).as_bytes());
            chunked.extend(std::iter::repeat_n(b' ', MAX_BODY_LEN));
            chunked.extend(b"\r\n");
        }
        chunked.extend(b"0\r\n\r\n");
        let raw = h.raw(&chunked);
        assert!(raw.starts_with("HTTP/1.1 413 "), "{raw}");

        // Exactly the limit is fine.
        let mut fits = format!(
            "PUT /vm/pause HTTP/1.1\r\nConnection: close\r\nContent-Length: {MAX_BODY_LEN}\r\n\r\n"
        )
        .into_bytes();
        fits.extend(std::iter::repeat_n(b' ', MAX_BODY_LEN - 2));
        fits.extend(b"{}");
        let raw = h.raw(&fits);
        assert!(raw.starts_with("HTTP/1.1 204 "), "{raw}");
    }

    /// Sends `head` (then keeps sending filler, as an attacker would, up to
    /// `total`), reads the answer as soon as it comes.
    fn send_huge(h: &Harness, head: &[u8], filler: u8, total: usize) -> String {
        let stream = UnixStream::connect(&h.sock).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut w = stream.try_clone().expect("clone");
        let head = head.to_vec();
        let writer = thread::spawn(move || {
            let _ = w.write_all(&head);
            let chunk = vec![filler; 64 << 10];
            let mut sent = head.len();
            while sent < total && w.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
        });
        let mut response = Vec::new();
        let _ = (&stream).read_to_end(&mut response);
        drop(stream);
        let _ = writer.join();
        String::from_utf8_lossy(&response).into_owned()
    }

    #[test]
    fn oversized_request_line_and_headers_are_refused_unbuffered() {
        let h = Harness::new();
        // A 64 MiB request line: refused after 64 KiB of it.
        let raw = send_huge(&h, b"GET /", b'a', 64 << 20);
        assert!(raw.starts_with("HTTP/1.1 414 "), "{raw:.200}");
        assert!(raw.contains("request line too long"), "{raw:.300}");
        // Endless headers.
        let raw = send_huge(&h, b"GET /vm HTTP/1.1\r\nX-Big: ", b'b', 64 << 20);
        assert!(raw.starts_with("HTTP/1.1 431 "), "{raw:.200}");
        let mut many = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert!(h.raw(&many).starts_with("HTTP/1.1 431 "));
        // Just under the bound is served.
        let mut fits = b"GET /vm HTTP/1.1\r\nConnection: close\r\nX-Pad: ".to_vec();
        fits.extend(std::iter::repeat_n(b'p', MAX_HEAD_LEN - 200));
        fits.extend(b"\r\n\r\n");
        let raw = h.raw(&fits);
        assert!(raw.starts_with("HTTP/1.1 200 "), "{raw:.200}");
        // Smuggling shapes are refused, not guessed at.
        let raw = h.raw(
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        );
        assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
        assert_eq!(h.call("GET", "/vm", None).0, 200);
    }

    #[test]
    fn many_oversized_bodies_leak_no_connection() {
        let h = Harness::new();
        let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = fds();
        for i in 0..600 {
            let raw = send_huge(
                &h,
                b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n",
                b' ',
                256 << 10,
            );
            assert!(raw.starts_with("HTTP/1.1 413 "), "request {i}: {raw}");
        }
        assert_eq!(h.call("GET", "/vm", None).0, 200);
        // Every refused connection was closed (other tests in this process
        // open and close descriptors too: allow for them, not for 600).
        thread::sleep(Duration::from_millis(200));
        assert!(
            fds() < before + 100,
            "{before} descriptors before, {} after",
            fds()
        );
    }

    #[test]
    fn absurd_content_length_does_not_take_the_process_down() {
        let h = Harness::new();
        let mut stream = UnixStream::connect(&h.sock).expect("connect");
        stream
            .write_all(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 1000000000000\r\n\r\n{}")
            .expect("write");
        drop(stream);
        // The declared length is never allocated (tiny_http once aborted the
        // process here); the server keeps serving.
        thread::sleep(Duration::from_millis(200));
        assert_eq!(h.call("GET", "/vm", None).0, 200);
    }

    #[test]
    fn garbage_does_not_stop_the_server() {
        let h = Harness::new();
        let raw = h.raw(b"\x00\xff garbage\r\n\r\n");
        assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 400"), "{raw}");
        let raw = h.raw(b"GET /vm HTTP/1.1\r\nbad header line\r\n\r\n");
        assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
        let raw = h.raw(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}");
        // The client stopped sending: the body read fails, or ends short.
        assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 400"), "{raw}");
        assert_eq!(h.call("GET", "/vm", None).0, 200);
    }

    #[test]
    fn socket_is_owner_only() {
        let h = Harness::new();
        let meta = fs::symlink_metadata(&h.sock).expect("socket exists");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(
            h.server.as_ref().map(ApiServer::path),
            Some(h.sock.as_path())
        );
    }

    #[test]
    fn drop_removes_the_socket() {
        let mut h = Harness::new();
        assert!(h.sock.exists());
        h.server = None;
        assert!(!h.sock.exists());
        let err = request(&h.sock, "GET", "/vm", None).expect_err("server gone");
        assert!(
            err.to_string().contains("is ferry running with --api-sock"),
            "{err}"
        );
    }

    #[test]
    fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        drop(UnixListener::bind(&sock).expect("bind"));
        assert!(sock.exists(), "a closed listener leaves its file behind");
        let (tx, rx) = mpsc::channel();
        fake_vmm(rx);
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let _server = start_api_server(&sock, tx, wake).expect("stale socket replaced");
        assert_eq!(request(&sock, "GET", "/vm", None).expect("request").0, 200);
    }

    #[test]
    fn live_socket_is_refused() {
        let h = Harness::new();
        let (tx, _rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let err = start_api_server(&h.sock, tx, wake).err().expect("in use");
        assert!(matches!(err, ApiServerError::InUse { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "control socket {}: already in use by a running process",
                h.sock.display()
            )
        );
        // The first server is untouched.
        assert_eq!(h.call("GET", "/vm", None).0, 200);
    }

    #[test]
    fn non_socket_path_is_left_alone() {
        let h = Harness::new();
        let file = h.dir.path().join("notes.txt");
        fs::write(&file, b"keep me").expect("write");
        let (tx, _rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let err = start_api_server(&file, tx, wake)
            .err()
            .expect("not a socket");
        assert!(matches!(err, ApiServerError::NotASocket { .. }), "{err}");
        assert_eq!(fs::read(&file).expect("read"), b"keep me");

        let (tx, _rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let long = h.dir.path().join("x".repeat(120));
        let err = start_api_server(&long, tx, wake).err().expect("too long");
        assert!(matches!(err, ApiServerError::PathTooLong { .. }), "{err}");
    }

    #[test]
    fn vmm_gone_is_503() {
        let (tx, rx) = mpsc::channel();
        drop(rx);
        let h = Harness::with_channel(tx, REPLY_TIMEOUT);
        let (status, body) = h.call("PUT", "/vm/pause", None);
        assert_eq!(status, 503);
        assert!(error_message(&body).is_some_and(|m| m.contains("not running")));

        // Dropping a request without answering it is the same.
        let (tx, rx) = mpsc::channel::<ApiRequest>();
        thread::spawn(move || rx.into_iter().for_each(drop));
        let h = Harness::with_channel(tx, REPLY_TIMEOUT);
        assert_eq!(h.call("GET", "/vm", None).0, 503);
    }

    #[test]
    fn slow_vmm_is_504() {
        let (tx, rx) = mpsc::channel::<ApiRequest>();
        // Holds on to every request without answering.
        let holder = thread::spawn(move || rx.into_iter().collect::<Vec<_>>());
        let h = Harness::with_channel(tx, Duration::from_millis(100));
        let (status, body) = h.call("GET", "/vm", None);
        assert_eq!(status, 504);
        assert_eq!(
            error_message(&body),
            Some("the VMM did not answer within 0.1 s")
        );
        drop(h);
        let held = holder.join().expect("holder");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].action, ApiAction::GetVm);
    }

    #[test]
    fn concurrent_clients() {
        let h = Harness::new();
        let sock = h.sock.clone();
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let sock = sock.clone();
                thread::spawn(move || request(&sock, "GET", "/vm", None).map(|r| r.0))
            })
            .collect();
        for client in clients {
            assert_eq!(client.join().expect("join").expect("request"), 200);
        }
    }

    #[test]
    fn chunked_and_continued_bodies_are_read() {
        let h = Harness::new();
        // {"dir": "/x"} in three chunks, one with an extension, and a trailer.
        let raw = h.raw(
            b"PUT /snapshot/create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              4\r\n{\"di\r\n5;ext=1\r\nr\": \"\r\n4\r\n/x\"}\r\n0\r\nX-Trailer: t\r\n\r\n",
        );
        assert!(raw.starts_with("HTTP/1.1 200 "), "{raw}");
        assert!(raw.contains(r#"{"dir":"/x"}"#), "{raw}");
        // curl's Expect: 100-continue gets its interim answer, then the real one.
        let raw = h.raw(
            b"PUT /snapshot/create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 12\r\n\r\n\
              {\"dir\":\"/y\"}",
        );
        assert!(
            raw.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "),
            "{raw}"
        );
        assert!(raw.contains(r#"{"dir":"/y"}"#), "{raw}");
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let h = Harness::new();
        for (bytes, says) in [
            (
                &b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n{}"[..],
                "unsupported Transfer-Encoding",
            ),
            (
                b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                "malformed chunk size",
            ),
            (
                b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n",
                "overran its size",
            ),
            (
                b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}",
                "ended early",
            ),
            (
                b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}",
                "ended after 2 of its 5 bytes",
            ),
        ] {
            let raw = h.raw(bytes);
            assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
            assert!(raw.contains(says), "{says}: {raw}");
        }
        // A chunk size that would wrap the running total is refused by size.
        let raw = h.raw(
            b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              1\r\n \r\nffffffffffffffff\r\n{}\r\n0\r\n\r\n",
        );
        assert!(raw.starts_with("HTTP/1.1 413 "), "{raw}");
        // A chunk-size line that never ends is refused by its length.
        let mut endless = b"PUT /vm/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'0', 1 << 20));
        let raw = send_huge(&h, &endless, b'0', 4 << 20);
        assert!(raw.starts_with("HTTP/1.1 400 "), "{raw:.200}");
        assert!(raw.contains("too long"), "{raw:.300}");
        assert_eq!(h.call("GET", "/vm", None).0, 200);
    }

    #[test]
    fn idle_connections_beyond_the_bound_are_answered_503() {
        let h = Harness::new();
        // Connections that never send hold their slots (until their read
        // timeout); the next one is told why it is not served.
        let idle: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| UnixStream::connect(&h.sock).expect("connect"))
            .collect();
        // Each slot is taken by the accept thread in order: wait until all are.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h
            .server
            .as_ref()
            .expect("server")
            .context
            .connections
            .load(Ordering::SeqCst)
            < MAX_CONNECTIONS
        {
            assert!(
                Instant::now() < deadline,
                "the idle connections were not all accepted"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let (status, body) = h.call("GET", "/vm", None);
        assert_eq!(status, 503, "{body}");
        assert!(
            error_message(&body).is_some_and(|m| m.contains("too many control connections")),
            "{body}"
        );
        // Once they go, the socket serves again.
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _) = h.call("GET", "/vm", None);
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still refused after the idle clients left"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}
