//! Everything between the two hosts goes through here: mutual TLS 1.3
//! (rustls, ring) on the migration channel, the credentials the share uses
//! too, and certificates for operators without a PKI (`ferry tls-init`).
//!
//! A `--tls-dir` holds `ca.pem` (the trust anchor), `cert.pem` (this host's
//! chain) and `key.pem`. Both ends check the peer's chain against the CA;
//! the source also checks that the destination's certificate names the
//! host or IP it dialled, and a destination may restrict the client names
//! it takes. Plaintext exists only as an explicit `--insecure` choice.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{ClientConfig, ConnectionTrafficSecrets, RootCertStore, ServerConfig};

use crate::util::lock;

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// What one socket read may bring in: many records per system call, each
/// opened in place.
const RX_BUFFER: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--tls-dir {dir}: {what} {path}: {why}")]
    File {
        dir: PathBuf,
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--tls-dir {dir}: {why}")]
    Config { dir: PathBuf, why: String },
    #[error("cannot tell which host {0:?} names, to check its certificate (give HOST:PORT)")]
    Destination(String),
    #[error("{0:?} is not a host name or IP address a certificate can name")]
    BadName(String),
    #[error("cannot make the certificates: {0}")]
    Generate(String),
    #[error("cannot write {path}: {}", crate::util::io_msg(source))]
    Write { path: PathBuf, source: io::Error },
}

/// This host's credentials: its certificate and key, and the CA that
/// peers' certificates must chain to; one config per role.
pub struct TlsIdentity {
    pub dir: PathBuf,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The migration channel's: rustls hands its secrets over to our
    /// record layer after the handshake. Servers send no session tickets
    /// there: nothing resumes a migration channel (each one is a full,
    /// mutually authenticated handshake), and a ticket would be one more
    /// post-handshake message in flight when the secrets change hands.
    channel_server: Arc<ServerConfig>,
    channel_client: Arc<ClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("dir", &self.dir)
            .finish()
    }
}

/// ring, with AES-128-GCM first: as strong as the migration needs, and it
/// encrypts a good third faster than AES-256 (10 rounds instead of 14) on
/// the bulk of guest memory.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

impl TlsIdentity {
    /// Loads `dir/{ca,cert,key}.pem`; each error names the file and what is
    /// wrong with it.
    pub fn load(dir: &Path) -> Result<TlsIdentity, TlsError> {
        let file_err = |what, path: &Path, why: String| TlsError::File {
            dir: dir.to_path_buf(),
            what,
            path: path.to_path_buf(),
            why,
        };
        let read = |name: &str, what: &'static str| {
            let path = dir.join(name);
            std::fs::read(&path)
                .map(|b| (path.clone(), b))
                .map_err(|e| file_err(what, &path, crate::util::io_msg(&e)))
        };
        let certs = |what: &'static str, path: &Path, pem: &[u8]| {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(what, path, format!("not PEM certificates ({e})")))?;
            if certs.is_empty() {
                return Err(file_err(
                    what,
                    path,
                    "holds no certificate (-----BEGIN CERTIFICATE-----)".into(),
                ));
            }
            Ok(certs)
        };
        let (ca_path, ca_pem) = read(CA_FILE, "the CA certificate")?;
        let mut roots = RootCertStore::empty();
        for ca in certs("the CA certificate", &ca_path, &ca_pem)? {
            roots
                .add(ca)
                .map_err(|e| file_err("the CA certificate", &ca_path, e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let (cert_path, cert_pem) = read(CERT_FILE, "this host's certificate")?;
        let chain = certs("this host's certificate", &cert_path, &cert_pem)?;
        let (key_path, key_pem) = read(KEY_FILE, "this host's key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            file_err(
                "this host's key",
                &key_path,
                format!("no PEM private key ({e})"),
            )
        })?;
        let config_err = |why: String| TlsError::Config {
            dir: dir.to_path_buf(),
            why,
        };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| config_err(format!("{CA_FILE}: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| config_err(format!("{CERT_FILE} with {KEY_FILE}: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| config_err(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| config_err(format!("{CERT_FILE} with {KEY_FILE}: {e}")))?;
        let mut channel_server = server.clone();
        channel_server.send_tls13_tickets = 0;
        channel_server.enable_secret_extraction = true;
        let mut channel_client = client.clone();
        channel_client.enable_secret_extraction = true;
        channel_client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsIdentity {
            dir: dir.to_path_buf(),
            server: Arc::new(server),
            client: Arc::new(client),
            channel_server: Arc::new(channel_server),
            channel_client: Arc::new(channel_client),
        })
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// The name the destination's certificate must carry: the host part of
/// `host:port` (an IP address, or a DNS name).
pub fn server_name(destination: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match destination.parse::<SocketAddr>() {
        Ok(a) => return Ok(ServerName::IpAddress(a.ip().into())),
        Err(_) => destination
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty())
            .ok_or_else(|| TlsError::Destination(destination.to_string()))?,
    };
    peer_name(host).map_err(|_| TlsError::Destination(destination.to_string()))
}

/// A host name or IP address as a certificate names it.
pub fn peer_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::BadName(name.to_string()))
}

/// Whether `cert` (already verified against the CA) names one of `names`,
/// as a DNS or IP subject alternative name.
pub fn cert_names_any(cert: &CertificateDer<'_>, names: &[ServerName<'static>]) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    names
        .iter()
        .any(|n| ee.verify_is_valid_for_subject_name(n).is_ok())
}

/// Whether the TLS layer (not the socket) failed.
pub fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

/// A failed handshake in words an operator can act on.
pub fn explain_handshake_error(e: &io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                "the peer closed the connection during the TLS handshake (does it speak TLS, with certificates from the same CA?)".to_string()
            }
            _ => crate::util::io_msg(e),
        };
    };
    let hint = match tls {
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            " (its certificate is not signed by the CA in our ca.pem)"
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            " (its certificate has expired)"
        }
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            " (its certificate is not valid yet: check the clocks)"
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            " (its certificate does not name the host or IP we dialled)"
        }
        E::AlertReceived(
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError,
        ) => " (the peer does not accept our certificate: is it from the peer's CA?)",
        E::AlertReceived(A::CertificateExpired) => " (the peer says our certificate has expired)",
        E::AlertReceived(A::CertificateRequired) => " (the peer wants a client certificate)",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            " (the peer does not speak TLS: is it an --insecure ferry?)"
        }
        _ => "",
    };
    format!("{tls}{hint}")
}

/// The handshake runs through rustls's unbuffered API in our own buffers;
/// then rustls hands over the traffic secrets (`dangerous_into_kernel_connection`)
/// and this module's TLS 1.3 record layer seals and opens records in place
/// with ring. rustls 0.23's own data path (buffered, and unbuffered too:
/// `ReadTraffic` pops a fresh `Vec` per record) copies every record into
/// and out of its queues; here a received record is decrypted where the
/// socket read put it and copied once, into the caller's buffer, and a sent
/// record is gathered once from the caller's slices into the send buffer
/// and sealed there. The kernel connection still does the key schedule:
/// a peer's KeyUpdate and our own before the AEAD's confidentiality limit.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn update_tx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    fn update_rx(&mut self) -> Result<(u64, ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    fn confidentiality_limit(&self) -> u64 {
        let suite = match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        };
        match suite {
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            #[allow(unreachable_patterns)]
            _ => u64::MAX,
        }
    }
}

/// Largest plaintext in one record (RFC 8446 5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest ciphertext in one record: plaintext, content type, padding and
/// tag may not exceed 2^14 + 256 (RFC 8446 5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Plaintext encrypted per socket write: 16 full records, sent while they
/// are still in cache.
const TX_BATCH: usize = 16 * MAX_PLAINTEXT;
/// Handshake messages the peer may send us before the channel is up
/// (certificate chains): bounded, like everything the peer sends.
const MAX_HANDSHAKE_OUT: usize = 256 << 10;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

/// One direction's AEAD key, IV and record sequence number.
struct Keys {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Keys, rustls::Error> {
        use ring::aead;
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => {
                return Err(rustls::Error::General(
                    "the negotiated cipher suite has no record layer here".into(),
                ));
            }
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| rustls::Error::General("bad traffic key length".into()))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| rustls::Error::General("bad traffic IV length".into()))?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446 5.3), and the sequence number moves on.
    fn next_nonce(&mut self) -> ring::aead::Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        ring::aead::Nonce::assume_unique_for_key(nonce)
    }
}

/// TLS bytes read from the socket. `[start, end)` is not yet opened;
/// `[pt_start, pt_end)`, before `start`, is the plaintext of an opened
/// record that the caller has not taken yet.
struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    pt_start: usize,
    pt_end: usize,
}

impl RxBuf {
    fn new() -> RxBuf {
        RxBuf {
            buf: vec![0u8; RX_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            pt_start: 0,
            pt_end: 0,
        }
    }

    /// Reads more from the socket behind what is there. Moves the unopened
    /// tail to the front first when a whole record might not fit, which is
    /// only allowed once the pending plaintext is taken.
    fn fill(&mut self, sock: &mut Sock<'_>) -> io::Result<usize> {
        debug_assert!(self.pt_start == self.pt_end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < MAX_CIPHERTEXT + HEADER {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        self.pt_start = 0;
        self.pt_end = 0;
        if self.end == self.buf.len() {
            return Err(tls_err(rustls::Error::General(
                "the peer's TLS handshake messages do not fit the receive buffer".into(),
            )));
        }
        sock.read(&mut self.buf[self.end..])
            .inspect(|&n| self.end += n)
    }
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn peer_misbehaved(why: &str) -> io::Error {
    tls_err(rustls::Error::General(format!(
        "the peer broke the TLS record protocol: {why}"
    )))
}

/// What opening one record gave.
enum Opened {
    /// Application data, now at `rx.buf[pt_start..pt_end]`.
    Data,
    /// A post-handshake message, handled.
    Control,
    /// close_notify: the peer's stream ends here.
    Closed,
}

struct TlsState {
    kernel: Kernel,
    peer_cert: Option<CertificateDer<'static>>,
    tx: Keys,
    rx: Keys,
    /// Records per key before the AEAD's confidentiality limit, less a
    /// margin: we update our key before it, and refuse a peer past it.
    limit: u64,
    rxb: RxBuf,
    /// Application data rustls decrypted itself while the handshake was
    /// finishing (a peer may send right behind its Finished).
    carry: Vec<u8>,
    carry_pos: usize,
    txb: Vec<u8>,
    peer_closed: bool,
    /// After a failure the record streams are out of step: every later call
    /// gets the first error again instead of garbage.
    failed: Option<(io::ErrorKind, String)>,
}

/// The migration channel: TLS over TCP, or plain TCP in `--insecure` mode.
/// Clones share the one TLS session; the protocol never reads and writes
/// at the same time, so one lock over it costs nothing.
pub struct Channel {
    tcp: TcpStream,
    tls: Option<Arc<Mutex<TlsState>>>,
    /// Until the handshake is done: every read and write must end by then,
    /// however slowly the peer trickles its bytes.
    deadline: Option<Instant>,
}

/// The socket, each call bounded by the deadline.
struct Sock<'a> {
    tcp: &'a TcpStream,
    deadline: Option<Instant>,
}

impl Sock<'_> {
    fn arm(&self, write: bool) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not complete the handshake in time",
            ));
        }
        if write {
            self.tcp.set_write_timeout(Some(left))
        } else {
            self.tcp.set_read_timeout(Some(left))
        }
    }
}

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(false)?;
        (&*self.tcp).read(buf)
    }
}

/// The socket blocks, with a send timeout: EAGAIN from a write means the
/// timeout elapsed with the peer taking nothing. Taken as "try again" it
/// would spin or wait for the peer unbounded on a link that is down; a hard
/// TimedOut ends the write.
fn write_timed_out(r: io::Result<usize>) -> io::Result<usize> {
    r.map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock => io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer took no data within the send timeout",
        ),
        _ => e,
    })
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(true)?;
        write_timed_out((&*self.tcp).write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.arm(true)?;
        write_timed_out((&*self.tcp).write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Channel {
    pub fn plain(tcp: TcpStream) -> Channel {
        Channel {
            tcp,
            tls: None,
            deadline: None,
        }
    }

    /// Completes a TLS handshake as the client, checking the server's
    /// certificate against the CA and `name`.
    pub fn connect(
        tcp: TcpStream,
        identity: &TlsIdentity,
        name: ServerName<'static>,
        deadline: Instant,
    ) -> io::Result<Channel> {
        let mut conn = UnbufferedClientConnection::new(identity.channel_client.clone(), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut hs = Handshake::new(&tcp, deadline);
        hs.drive(
            &mut conn,
            UnbufferedConnectionCommon::<ClientConnectionData>::process_tls_records,
        )?;
        let peer_cert = first_cert(conn.peer_certificates());
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
        let state = hs.finish(Kernel::Client(kernel), secrets, peer_cert)?;
        Ok(Channel {
            tcp,
            tls: Some(Arc::new(Mutex::new(state))),
            deadline: None,
        })
    }

    /// Completes a TLS handshake as the server, requiring a client
    /// certificate that chains to the CA. The deadline stays in force
    /// (for the Hello) until [`Channel::clear_deadline`].
    pub fn accept(
        tcp: TcpStream,
        identity: &TlsIdentity,
        deadline: Instant,
    ) -> io::Result<Channel> {
        let mut conn = UnbufferedServerConnection::new(identity.channel_server.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut hs = Handshake::new(&tcp, deadline);
        hs.drive(
            &mut conn,
            UnbufferedConnectionCommon::<ServerConnectionData>::process_tls_records,
        )?;
        let peer_cert = first_cert(conn.peer_certificates());
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
        let state = hs.finish(Kernel::Server(kernel), secrets, peer_cert)?;
        Ok(Channel {
            tcp,
            tls: Some(Arc::new(Mutex::new(state))),
            deadline: Some(deadline),
        })
    }

    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// Back to the socket's own timeouts.
    pub fn clear_deadline(&mut self, read_timeout: Option<Duration>) {
        self.deadline = None;
        let _ = self.tcp.set_read_timeout(read_timeout);
        let _ = self.tcp.set_write_timeout(None);
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The peer's end-entity certificate (TLS only).
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        lock(self.tls.as_ref()?).peer_cert.clone()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel {
            tcp: self.tcp.try_clone()?,
            tls: self.tls.clone(),
            deadline: self.deadline,
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp.set_write_timeout(t)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }
}

fn first_cert(certs: Option<&[CertificateDer<'_>]>) -> Option<CertificateDer<'static>> {
    certs
        .and_then(|c| c.first())
        .map(|c| c.clone().into_owned())
}

/// The handshake's buffers: what the peer sent lands in `rx`, which the
/// channel then keeps (bytes of the peer's first records may be in it).
struct Handshake<'a> {
    sock: Sock<'a>,
    rx: RxBuf,
    tx: Vec<u8>,
    carry: Vec<u8>,
}

impl<'a> Handshake<'a> {
    fn new(tcp: &'a TcpStream, deadline: Instant) -> Handshake<'a> {
        Handshake {
            sock: Sock {
                tcp,
                deadline: Some(deadline),
            },
            rx: RxBuf::new(),
            tx: Vec::new(),
            carry: Vec::new(),
        }
    }

    /// Runs rustls's state machine until the handshake is complete (the
    /// peer's certificate checked) and nothing is left to send.
    fn drive<D>(
        &mut self,
        conn: &mut UnbufferedConnectionCommon<D>,
        process: for<'c, 'i> fn(
            &'c mut UnbufferedConnectionCommon<D>,
            &'i mut [u8],
        ) -> UnbufferedStatus<'c, 'i, D>,
    ) -> io::Result<()> {
        loop {
            let UnbufferedStatus { discard, state } =
                process(conn, &mut self.rx.buf[self.rx.start..self.rx.end]);
            let (mut read, mut traffic) = (false, false);
            match state {
                Err(e) => {
                    self.rx.start += discard;
                    self.send_alert(conn, process);
                    return Err(tls_err(e));
                }
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(rec) = r.next_record() {
                        let rec = rec.map_err(tls_err)?;
                        // Bounded by the receive buffer it came from.
                        self.carry.extend_from_slice(rec.payload);
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let used = self.tx.len();
                    loop {
                        match e.encode(&mut self.tx[used..]) {
                            Ok(n) => {
                                self.tx.truncate(used + n);
                                break;
                            }
                            Err(EncodeError::InsufficientSize(s))
                                if used + s.required_size <= MAX_HANDSHAKE_OUT =>
                            {
                                self.tx.resize(used + s.required_size, 0);
                            }
                            Err(e) => {
                                return Err(tls_err(rustls::Error::General(format!(
                                    "cannot encode our handshake: {e}"
                                ))));
                            }
                        }
                    }
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    self.sock.write_all(&self.tx).map_err(timeout_message)?;
                    self.tx.clear();
                    t.done();
                }
                Ok(ConnectionState::BlockedHandshake) => read = true,
                Ok(ConnectionState::WriteTraffic(_)) => traffic = true,
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the TLS session during the handshake",
                    ));
                }
                Ok(other) => {
                    return Err(tls_err(rustls::Error::General(format!(
                        "unexpected TLS handshake state {other:?}"
                    ))));
                }
            }
            self.rx.start += discard;
            if traffic {
                // A TLS 1.3 server may send before the client's Finished;
                // we wait until the client's certificate is checked.
                if !conn.is_handshaking() {
                    return Ok(());
                }
                read = true;
            }
            if read {
                // rustls keeps a message split over records in the buffer
                // it was given: it never has pending plaintext here.
                self.rx.pt_start = self.rx.pt_end;
                match self.rx.fill(&mut self.sock).map_err(timeout_message)? {
                    0 => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        ));
                    }
                    _ => continue,
                }
            }
        }
    }

    /// After a failure rustls may have an alert queued for the peer, so
    /// that it learns why (e.g. that its certificate is not trusted); best
    /// effort, within the deadline.
    fn send_alert<D>(
        &mut self,
        conn: &mut UnbufferedConnectionCommon<D>,
        process: for<'c, 'i> fn(
            &'c mut UnbufferedConnectionCommon<D>,
            &'i mut [u8],
        ) -> UnbufferedStatus<'c, 'i, D>,
    ) {
        let mut out = vec![0u8; 1024];
        for _ in 0..4 {
            // The same buffer again: rustls may hold ranges of a message
            // it has only partly received in it.
            let UnbufferedStatus { discard, state } =
                process(conn, &mut self.rx.buf[self.rx.start..self.rx.end]);
            let more = match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    if let Ok(n) = e.encode(&mut out) {
                        let _ = self.sock.write_all(&out[..n]);
                    }
                    // The alert is the one message a failure queues. Asking
                    // rustls again would make it deframe the failed input
                    // once more and queue a second fatal alert (a debug
                    // assertion in rustls: random bytes sent to a receiver
                    // panicked its handshake thread).
                    self.rx.start += discard;
                    return;
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    true
                }
                _ => false,
            };
            self.rx.start += discard;
            if !more {
                return;
            }
        }
    }

    fn finish(
        self,
        kernel: Kernel,
        secrets: rustls::ExtractedSecrets,
        peer_cert: Option<CertificateDer<'static>>,
    ) -> io::Result<TlsState> {
        let limit = kernel.confidentiality_limit().saturating_sub(1024).max(1);
        Ok(TlsState {
            limit,
            tx: Keys::new(secrets.tx).map_err(tls_err)?,
            rx: Keys::new(secrets.rx).map_err(tls_err)?,
            kernel,
            peer_cert,
            rxb: self.rx,
            carry: self.carry,
            carry_pos: 0,
            txb: Vec::with_capacity(TX_BATCH + TX_BATCH / MAX_PLAINTEXT * (HEADER + 1 + TAG)),
            peer_closed: false,
            failed: None,
        })
    }
}

/// A read timeout shows as EAGAIN; say what it means.
fn timeout_message(e: io::Error) -> io::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the peer did not complete the TLS handshake in time",
        )
    } else {
        e
    }
}

impl TlsState {
    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
        }
    }

    /// Remembers a failure that leaves the record stream out of step.
    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
        e
    }

    fn read(&mut self, sock: &mut Sock<'_>, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.carry_pos < self.carry.len() {
            let n = out.len().min(self.carry.len() - self.carry_pos);
            out[..n].copy_from_slice(&self.carry[self.carry_pos..self.carry_pos + n]);
            self.carry_pos += n;
            if self.carry_pos == self.carry.len() {
                self.carry = Vec::new();
                self.carry_pos = 0;
            }
            return Ok(n);
        }
        let mut got = 0;
        loop {
            let pending = self.rxb.pt_end - self.rxb.pt_start;
            if pending > 0 {
                let n = pending.min(out.len() - got);
                let at = self.rxb.pt_start;
                out[got..got + n].copy_from_slice(&self.rxb.buf[at..at + n]);
                self.rxb.pt_start += n;
                got += n;
                if got == out.len() {
                    return Ok(got);
                }
            }
            if self.peer_closed {
                return Ok(got);
            }
            self.check()?;
            match self.open_record(sock) {
                Ok(Some(Opened::Data | Opened::Control)) => {}
                Ok(Some(Opened::Closed)) => return Ok(got),
                Ok(None) if got > 0 => return Ok(got),
                Ok(None) => match self.rxb.fill(sock) {
                    Ok(0) => {
                        return Err(self.fail(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the connection without a TLS close_notify",
                        )));
                    }
                    Ok(_) => {}
                    // A read timeout leaves the stream whole: the caller may
                    // read on.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock
                                | io::ErrorKind::TimedOut
                                | io::ErrorKind::Interrupted
                        ) =>
                    {
                        return Err(e);
                    }
                    Err(e) => return Err(self.fail(e)),
                },
                Err(e) => {
                    let e = self.fail(e);
                    // Tell the peer why, so its side does not just see EOF.
                    if is_tls_error(&e) {
                        let _ = self.send_record(sock, CT_ALERT, &[&[2, 20]]);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Opens the first record in the receive buffer, if it is all there.
    fn open_record(&mut self, sock: &mut Sock<'_>) -> io::Result<Option<Opened>> {
        let rx = &mut self.rxb;
        let avail = rx.end - rx.start;
        if avail < HEADER {
            return Ok(None);
        }
        let hdr: [u8; HEADER] = rx.buf[rx.start..rx.start + HEADER].try_into().unwrap();
        let len = u16::from_be_bytes([hdr[3], hdr[4]]) as usize;
        if hdr[0] != CT_APPDATA {
            return Err(peer_misbehaved(&format!(
                "a record of type {} after the handshake (only encrypted records may follow)",
                hdr[0]
            )));
        }
        if !(TAG + 1..=MAX_CIPHERTEXT).contains(&len) {
            return Err(peer_misbehaved(&format!(
                "a record of {len} bytes (a TLS 1.3 record holds 17 to {MAX_CIPHERTEXT})"
            )));
        }
        if avail < HEADER + len {
            return Ok(None);
        }
        if self.rx.seq >= self.limit {
            return Err(peer_misbehaved(
                "more records under one key than the cipher allows (no KeyUpdate)",
            ));
        }
        let body = rx.start + HEADER;
        rx.start = body + len;
        let nonce = self.rx.next_nonce();
        let plain = self
            .rx
            .key
            .open_in_place(
                nonce,
                ring::aead::Aad::from(hdr),
                &mut rx.buf[body..body + len],
            )
            .map_err(|_| {
                tls_err(rustls::Error::General(
                    "a TLS record from the peer failed authentication (corrupted or forged in transit)"
                        .into(),
                ))
            })?;
        // Inner plaintext: content, its type, then zero padding.
        let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(peer_misbehaved("a record with no content type"));
        };
        let content_type = plain[type_at];
        match content_type {
            CT_APPDATA if type_at <= MAX_PLAINTEXT => {
                rx.pt_start = body;
                rx.pt_end = body + type_at;
                Ok(Some(Opened::Data))
            }
            CT_ALERT if type_at == 2 => {
                let (level, desc) = (plain[0], plain[1]);
                if desc == 0 {
                    self.peer_closed = true;
                    return Ok(Some(Opened::Closed));
                }
                let desc = rustls::AlertDescription::from(desc);
                // Only a warning-level user_canceled (RFC 8446 6.1) is
                // not the end of the session.
                if level == 1 && desc == rustls::AlertDescription::UserCanceled {
                    return Ok(Some(Opened::Control));
                }
                Err(tls_err(rustls::Error::AlertReceived(desc)))
            }
            CT_HANDSHAKE if type_at > 0 => {
                let msgs = plain[..type_at].to_vec();
                self.handle_post_handshake(sock, &msgs)?;
                Ok(Some(Opened::Control))
            }
            t => Err(peer_misbehaved(&format!(
                "an encrypted record of content type {t} with {type_at} bytes"
            ))),
        }
    }

    /// Post-handshake messages: session tickets (our servers send none;
    /// the kernel connection takes a foreign server's), and KeyUpdate.
    fn handle_post_handshake(&mut self, sock: &mut Sock<'_>, mut msgs: &[u8]) -> io::Result<()> {
        while !msgs.is_empty() {
            if msgs.len() < 4 {
                return Err(peer_misbehaved("a truncated handshake message header"));
            }
            let len = u32::from_be_bytes([0, msgs[1], msgs[2], msgs[3]]) as usize;
            let Some(body) = msgs.get(4..4 + len) else {
                return Err(peer_misbehaved(
                    "a handshake message split across records after the handshake",
                ));
            };
            let rest = &msgs[4 + len..];
            match (msgs[0], &mut self.kernel) {
                (HS_NEW_SESSION_TICKET, Kernel::Client(k)) => {
                    k.handle_new_session_ticket(body).map_err(tls_err)?
                }
                (HS_KEY_UPDATE, _) => {
                    if !rest.is_empty() {
                        return Err(peer_misbehaved("data behind a KeyUpdate in its record"));
                    }
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(peer_misbehaved("a malformed KeyUpdate")),
                    };
                    self.rx =
                        Keys::new(self.kernel.update_rx().map_err(tls_err)?).map_err(tls_err)?;
                    if requested {
                        self.update_tx_key(sock)?;
                    }
                }
                (t, _) => {
                    return Err(peer_misbehaved(&format!(
                        "handshake message type {t} after the handshake"
                    )));
                }
            }
            msgs = rest;
        }
        Ok(())
    }

    /// Tells the peer (under the old key) that we move to the next one.
    fn update_tx_key(&mut self, sock: &mut Sock<'_>) -> io::Result<()> {
        self.send_record(sock, CT_HANDSHAKE, &[&[HS_KEY_UPDATE, 0, 0, 1, 0]])?;
        self.tx = Keys::new(self.kernel.update_tx().map_err(tls_err)?).map_err(tls_err)?;
        Ok(())
    }

    /// Seals one record of `content_type` holding `parts` at the end of
    /// the send buffer.
    fn seal_into_txb(&mut self, content_type: u8, parts: &[&[u8]]) {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(n <= MAX_PLAINTEXT);
        let len = (n + 1 + TAG) as u16;
        let hdr = [CT_APPDATA, 3, 3, (len >> 8) as u8, len as u8];
        self.txb.extend_from_slice(&hdr);
        let body = self.txb.len();
        for p in parts {
            self.txb.extend_from_slice(p);
        }
        self.txb.push(content_type);
        let nonce = self.tx.next_nonce();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(hdr), &mut self.txb[body..])
            .expect("a record within the AEAD's limits");
        self.txb.extend_from_slice(tag.as_ref());
    }

    fn send_record(
        &mut self,
        sock: &mut Sock<'_>,
        content_type: u8,
        parts: &[&[u8]],
    ) -> io::Result<()> {
        self.txb.clear();
        self.seal_into_txb(content_type, parts);
        sock.write_all(&self.txb)
    }

    /// Encrypts up to [`TX_BATCH`] bytes of `bufs` as full records, each
    /// gathered straight from the caller's slices, and sends them.
    fn write(&mut self, sock: &mut Sock<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.check()?;
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(TX_BATCH);
        if total == 0 {
            return Ok(0);
        }
        if self.tx.seq + (total / MAX_PLAINTEXT + 1) as u64 >= self.limit {
            self.update_tx_key(sock).map_err(|e| self.fail(e))?;
        }
        self.txb.clear();
        let (mut slice, mut off) = (0, 0);
        let mut left = total;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(4);
        while left > 0 {
            let mut want = left.min(MAX_PLAINTEXT);
            left -= want;
            parts.clear();
            while want > 0 {
                let b = &bufs[slice][off..];
                let k = b.len().min(want);
                if k > 0 {
                    parts.push(&b[..k]);
                }
                want -= k;
                off += k;
                if off == bufs[slice].len() {
                    slice += 1;
                    off = 0;
                }
            }
            self.seal_into_txb(CT_APPDATA, &parts);
        }
        match sock.write_all(&self.txb) {
            Ok(()) => Ok(total),
            // Part of the records may be out: the stream cannot go on.
            Err(e) => Err(self.fail(e)),
        }
    }
}

impl Channel {
    fn sock(&self) -> Sock<'_> {
        Sock {
            tcp: &self.tcp,
            deadline: self.deadline,
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut sock = self.sock();
        match &self.tls {
            None => sock.read(buf),
            Some(tls) => lock(tls).read(&mut sock, buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut sock = self.sock();
        match &self.tls {
            None => sock.write_vectored(bufs),
            Some(tls) => lock(tls).write(&mut sock, bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a ferry talks to its peer: mutual TLS, or (only when asked for)
/// plaintext.
#[derive(Debug, Clone)]
pub enum Security {
    Tls(Arc<TlsIdentity>),
    Insecure,
}

// ---- certificates for people without a PKI ----

/// The CA's parameters. Its name is made from its key so that two CAs
/// never share one: a verifier that finds the issuer by name would
/// otherwise report another CA's certificate as a bad signature rather than
/// an unknown issuer.
fn ca_params(key: &rcgen::KeyPair) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    let label: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(
        rcgen::DnType::CommonName,
        format!("Ferry migration CA {label}"),
    );
    p.distinguished_name = dn;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
    p
}

/// A CA that issues host certificates (`ferry tls-init`).
pub struct CertAuthority {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// One host's certificate and key, PEM.
pub struct HostCert {
    pub cert_pem: String,
    pub key_pem: String,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl CertAuthority {
    pub fn generate() -> Result<CertAuthority, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let params = ca_params(&key);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA that `tls-init` wrote to `dir` (`ca.pem`, `ca-key.pem`), to
    /// issue more certificates with.
    pub fn load(dir: &Path) -> Result<CertAuthority, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| TlsError::File {
                dir: dir.to_path_buf(),
                what: "the CA",
                path,
                why: crate::util::io_msg(&e),
            })
        };
        let cert_pem = read(CA_FILE)?;
        let key = rcgen::KeyPair::from_pem(&read(CA_KEY_FILE)?).map_err(gen_err)?;
        Ok(CertAuthority {
            cert_pem,
            issuer: rcgen::Issuer::new(ca_params(&key), key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate naming `host` (an IP SAN when it is an address), for
    /// use as server and as client, valid in `[not_before, not_after]`.
    pub fn issue_valid(
        &self,
        host: &str,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<HostCert, TlsError> {
        peer_name(host)?;
        let mut p = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, host);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(
                host.to_string()
                    .try_into()
                    .map_err(|_| TlsError::BadName(host.to_string()))?,
            ),
        }];
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.not_before = not_before;
        p.not_after = not_after;
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(HostCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate for `host`, valid from yesterday for ten years.
    pub fn issue(&self, host: &str) -> Result<HostCert, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            host,
            now - time::Duration::days(1),
            now + time::Duration::days(3650),
        )
    }

    /// Writes `dir/{ca.pem,cert.pem,key.pem}` for `cert`.
    pub fn write_host_dir(&self, dir: &Path, cert: &HostCert) -> Result<(), TlsError> {
        create_dir(dir)?;
        write_file(&dir.join(CA_FILE), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(CERT_FILE), cert.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(KEY_FILE), cert.key_pem.as_bytes(), 0o600)
    }
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Created with its final mode, so a key is never readable by others, not
/// even for a moment.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    // An existing file keeps its old mode through open().
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

/// `ferry tls-init`: a new CA in `out` and one directory per host, each a
/// ready `--tls-dir`. Returns the host directories.
pub fn tls_init(out: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, TlsError> {
    if hosts.is_empty() {
        return Err(TlsError::BadName(String::new()));
    }
    for h in hosts {
        peer_name(h)?;
        if h.contains('/') || h == "." || h == ".." {
            return Err(TlsError::BadName(h.clone()));
        }
    }
    let ca = CertAuthority::generate()?;
    create_dir(out)?;
    write_file(&out.join(CA_FILE), ca.cert_pem.as_bytes(), 0o644)?;
    write_file(
        &out.join(CA_KEY_FILE),
        ca.issuer.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    let mut dirs = Vec::new();
    for h in hosts {
        let dir = out.join(h);
        ca.write_host_dir(&dir, &ca.issue(h)?)?;
        dirs.push(dir);
    }
    Ok(dirs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_names_are_the_host_part() {
        assert_eq!(
            server_name("10.0.0.2:7777").unwrap(),
            ServerName::IpAddress("10.0.0.2".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name("[::1]:7777").unwrap(),
            ServerName::IpAddress("::1".parse::<IpAddr>().unwrap().into())
        );
        assert_eq!(
            server_name("host-b.example:7777").unwrap(),
            ServerName::try_from("host-b.example").unwrap()
        );
        assert!(server_name(":7777").is_err());
        assert!(server_name("nocolon").is_err());
    }

    #[test]
    fn tls_init_writes_loadable_dirs_with_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dirs = tls_init(tmp.path(), &["10.1.2.3".into(), "host-b".into()]).unwrap();
        assert_eq!(dirs.len(), 2);
        let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(tmp.path().join(CA_KEY_FILE)), 0o600);
        for d in &dirs {
            assert_eq!(mode(d.join(KEY_FILE)), 0o600);
            TlsIdentity::load(d).unwrap();
        }
        let pem = std::fs::read(dirs[0].join(CERT_FILE)).unwrap();
        let cert = CertificateDer::from_pem_slice(&pem).unwrap();
        assert!(cert_names_any(&cert, &[peer_name("10.1.2.3").unwrap()]));
        assert!(!cert_names_any(&cert, &[peer_name("host-b").unwrap()]));
    }

    /// Big vectored writes one way and small frames both ways arrive
    /// whole, through the read buffer and across clones of the channel.
    #[test]
    fn large_transfers_arrive_intact_over_tls() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = tls_init(tmp.path(), &["127.0.0.1".into()]).unwrap();
        let id = Arc::new(TlsIdentity::load(&dirs[0]).unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        const TOTAL: usize = 64 << 20;
        let server_id = id.clone();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut ch = Channel::accept(tcp, &server_id, deadline).unwrap();
            ch.clear_deadline(Some(Duration::from_secs(30)));
            let mut reader = io::BufReader::with_capacity(1 << 20, ch.try_clone().unwrap());
            let mut buf = vec![0u8; 4 << 20];
            let mut sum = 0u64;
            let mut got = 0;
            while got < TOTAL {
                let n = (TOTAL - got).min(buf.len());
                reader.read_exact(&mut buf[..n]).unwrap();
                sum = buf[..n]
                    .iter()
                    .fold(sum, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
                got += n;
            }
            ch.write_all(&sum.to_le_bytes()).unwrap();
            ch.flush().unwrap();
            sum
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let ch = Channel::connect(tcp, &id, peer_name("127.0.0.1").unwrap(), deadline).unwrap();
        let mut reader = ch.try_clone().unwrap();
        let mut w = io::BufWriter::with_capacity(256 << 10, ch);
        let chunk: Vec<u8> = (0..4usize << 20)
            .map(|i| (i * 7 + i / 4099) as u8)
            .collect();
        let started = Instant::now();
        let mut sum = 0u64;
        let mut sent = 0;
        while sent < TOTAL {
            let header = [0xa5u8; 24];
            let n = (TOTAL - sent).min(chunk.len()) - header.len();
            let mut done = 0;
            while done < header.len() + n {
                // write_all_vectored is unstable: finish by hand.
                let k = if done < header.len() {
                    w.write_vectored(&[
                        io::IoSlice::new(&header[done..]),
                        io::IoSlice::new(&chunk[..n]),
                    ])
                    .unwrap()
                } else {
                    w.write(&chunk[done - header.len()..n]).unwrap()
                };
                assert!(k > 0);
                done += k;
            }
            for &b in header.iter().chain(&chunk[..n]) {
                sum = sum.wrapping_mul(31).wrapping_add(b as u64);
            }
            sent += header.len() + n;
        }
        w.flush().unwrap();
        let mut back = [0u8; 8];
        reader.read_exact(&mut back).unwrap();
        eprintln!("64 MiB over TLS in {:?}", started.elapsed());
        assert_eq!(u64::from_le_bytes(back), sum);
        assert_eq!(server.join().unwrap(), sum);
    }

    fn identity() -> (tempfile::TempDir, Arc<TlsIdentity>) {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = tls_init(tmp.path(), &["127.0.0.1".into()]).unwrap();
        let id = Arc::new(TlsIdentity::load(&dirs[0]).unwrap());
        (tmp, id)
    }

    /// A client and a server channel, the client's bytes to the server
    /// passing through `relay` (which may cut, delay or damage them) on a
    /// thread of its own; the server's bytes to the client go straight.
    fn pair_through(
        id: &Arc<TlsIdentity>,
        relay: impl FnOnce(TcpStream, TcpStream) + Send + 'static,
    ) -> (Channel, Channel) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        std::thread::spawn(move || {
            let (from_client, _) = front.accept().unwrap();
            let to_server = TcpStream::connect(addr).unwrap();
            let (mut back_r, mut back_w) = (
                to_server.try_clone().unwrap(),
                from_client.try_clone().unwrap(),
            );
            std::thread::spawn(move || {
                let _ = io::copy(&mut back_r, &mut back_w);
                let _ = back_w.shutdown(Shutdown::Write);
            });
            relay(from_client, to_server);
        });
        let sid = id.clone();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let mut ch =
                Channel::accept(tcp, &sid, Instant::now() + Duration::from_secs(20)).unwrap();
            ch.clear_deadline(Some(Duration::from_secs(20)));
            ch
        });
        let tcp = TcpStream::connect(front_addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = Channel::connect(tcp, id, peer_name("127.0.0.1").unwrap(), deadline).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        (client, server.join().unwrap())
    }

    /// Forwards in pieces of 1 to 7 bytes, so that records arrive cut
    /// anywhere, headers included.
    fn trickle(mut from: TcpStream, mut to: TcpStream) {
        to.set_nodelay(true).unwrap();
        let mut buf = [0u8; 7];
        let mut k = 0usize;
        loop {
            let want = 1 + k % buf.len();
            k += 1;
            match from.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }

    fn pattern(len: usize, seed: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 131 + seed * 17) ^ (i >> 9)) as u8)
            .collect()
    }

    /// Writes of sizes around the record size, single and vectored, read
    /// back with reads of odd sizes: every byte arrives, in order.
    #[test]
    fn odd_sized_writes_and_reads_arrive_intact() {
        let (_tmp, id) = identity();
        let (mut client, mut server) = pair_through(&id, |mut a, mut b| {
            let _ = io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        let sizes = [
            1usize,
            16383,
            16384,
            16385,
            3,
            0,
            32768,
            100_001,
            5,
            262_144,
            262_145,
            1 << 20,
        ];
        let mut expected = Vec::new();
        let writer = {
            let mut sent = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let a = pattern(n, i);
                let b = pattern(n / 3 + 1, i + 100);
                sent.extend_from_slice(&a);
                sent.extend_from_slice(&b);
            }
            expected.extend_from_slice(&sent);
            std::thread::spawn(move || {
                for (i, &n) in sizes.iter().enumerate() {
                    let a = pattern(n, i);
                    let b = pattern(n / 3 + 1, i + 100);
                    if i % 2 == 0 {
                        client.write_all(&a).unwrap();
                        client.write_all(&b).unwrap();
                    } else {
                        let (mut da, mut db) = (0, 0);
                        while da < a.len() || db < b.len() {
                            let k = client
                                .write_vectored(&[
                                    io::IoSlice::new(&a[da..]),
                                    io::IoSlice::new(&b[db..]),
                                ])
                                .unwrap();
                            assert!(k > 0);
                            let ka = k.min(a.len() - da);
                            da += ka;
                            db += k - ka;
                        }
                    }
                }
                client
            })
        };
        let mut got = Vec::new();
        let reads = [1usize, 7, 16384, 5000, 16385, 300_000, 13];
        let mut i = 0;
        while got.len() < expected.len() {
            let want = reads[i % reads.len()].min(expected.len() - got.len());
            i += 1;
            let mut buf = vec![0u8; want];
            let n = server.read(&mut buf).unwrap();
            assert!(n > 0 && n <= want);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == expected, "the stream arrived altered");
        // And back the other way, through the same session.
        let mut client = writer.join().unwrap();
        server.write_all(b"done").unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"done");
    }

    /// Records cut into pieces of a few bytes by the network are put back
    /// together, during the handshake and after.
    #[test]
    fn records_split_across_socket_reads_arrive_intact() {
        let (_tmp, id) = identity();
        let (mut client, mut server) = pair_through(&id, trickle);
        let data = pattern(200_003, 9);
        let sent = data.clone();
        let w = std::thread::spawn(move || client.write_all(&sent).unwrap());
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).unwrap();
        w.join().unwrap();
        assert!(got == data, "the stream arrived altered");
    }

    /// One flipped bit in a record after the handshake: the receiver
    /// refuses the record with a TLS error saying so, and every later read
    /// fails the same way rather than returning data.
    #[test]
    fn a_corrupted_record_is_refused_clearly() {
        let (_tmp, id) = identity();
        let damage = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let armed = damage.clone();
        let (mut client, mut server) = pair_through(&id, move |mut a, mut b| {
            let mut buf = [0u8; 4096];
            loop {
                let n = match a.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    // Past the 5-byte header: the ciphertext or its tag.
                    buf[n.min(40) - 1] ^= 0x10;
                }
                if b.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        client.write_all(b"first").unwrap();
        let mut first = [0u8; 5];
        server.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"first");
        damage.store(true, std::sync::atomic::Ordering::SeqCst);
        client.write_all(&pattern(30_000, 1)).unwrap();
        let mut buf = vec![0u8; 30_000];
        let err = server.read_exact(&mut buf).unwrap_err();
        assert!(is_tls_error(&err), "{err:?}");
        assert!(err.to_string().contains("failed authentication"), "{err}");
        let again = server.read(&mut buf).unwrap_err();
        assert!(
            again.to_string().contains("failed authentication"),
            "{again}"
        );
    }

    /// A peer that trickles bytes of a plausible handshake never keeps
    /// accept() past its deadline: each byte does not re-arm it.
    #[test]
    fn the_handshake_deadline_holds_against_a_trickling_peer() {
        let (_tmp, id) = identity();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let trickler = std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            // A handshake record header announcing 16 KiB, then a byte at a
            // time, each well within any per-read timeout.
            let mut bytes = vec![22u8, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc];
            bytes.extend(std::iter::repeat_n(0u8, 1 << 14));
            for b in bytes {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) || tcp.write_all(&[b]).is_err()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (tcp, _) = listener.accept().unwrap();
        let err = match Channel::accept(tcp, &id, Instant::now() + Duration::from_millis(800)) {
            Ok(_) => panic!("a trickled handshake was accepted"),
            Err(e) => e,
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("in time"), "{err}");
        trickler.join().unwrap();
    }

    /// close_notify from the peer ends the stream with EOF; a peer that
    /// just hangs up is an error, not a clean end.
    #[test]
    fn close_notify_is_eof_and_a_bare_hangup_is_not() {
        let (_tmp, id) = identity();
        let (client, mut server) = pair_through(&id, |mut a, mut b| {
            let _ = io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        {
            let mut st = lock(client.tls.as_ref().unwrap());
            let mut sock = client.sock();
            st.send_record(&mut sock, CT_APPDATA, &[b"bye"]).unwrap();
            st.send_record(&mut sock, CT_ALERT, &[&[1, 0]]).unwrap();
        }
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"bye");
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        assert_eq!(server.read(&mut buf).unwrap(), 0);

        let (client, mut server) = pair_through(&id, |mut a, mut b| {
            let _ = io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        client.shutdown(Shutdown::Both).unwrap();
        let err = server.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    /// A KeyUpdate asking for ours: both directions move to new keys and
    /// the stream goes on (rustls's kernel connection does the schedule).
    #[test]
    fn a_key_update_moves_both_directions_to_new_keys() {
        let (_tmp, id) = identity();
        let (mut client, mut server) = pair_through(&id, |mut a, mut b| {
            let _ = io::copy(&mut a, &mut b);
            let _ = b.shutdown(Shutdown::Write);
        });
        {
            let mut st = lock(client.tls.as_ref().unwrap());
            let mut sock = client.sock();
            st.send_record(&mut sock, CT_HANDSHAKE, &[&[HS_KEY_UPDATE, 0, 0, 1, 1]])
                .unwrap();
            st.tx = Keys::new(st.kernel.update_tx().unwrap()).unwrap();
        }
        client.write_all(b"after").unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after");
        // The server answered with its own KeyUpdate before this.
        server.write_all(b"reply").unwrap();
        let mut st = lock(client.tls.as_ref().unwrap());
        let mut sock = client.sock();
        assert!(matches!(st.open_record(&mut sock), Ok(None)));
        drop(st);
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"reply");
    }

    #[test]
    fn a_missing_or_bad_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let err = TlsIdentity::load(tmp.path()).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("CA certificate"),
            "{err}"
        );
        let dirs = tls_init(&tmp.path().join("t"), &["h".into()]).unwrap();
        std::fs::write(dirs[0].join(KEY_FILE), "garbage").unwrap();
        let err = TlsIdentity::load(&dirs[0]).unwrap_err().to_string();
        assert!(
            err.contains("key.pem") && err.contains("private key"),
            "{err}"
        );
    }
}
