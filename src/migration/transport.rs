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

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::util::lock;

pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Plaintext the TLS layer takes per write before it encrypts and sends:
/// large enough that a 4 MiB memory chunk goes out in a few big writes of
/// full 16 KiB records rather than many small ones.
const TLS_BUFFER: usize = 1 << 20;
/// What one socket read may bring in for the TLS layer. rustls asks for
/// 4 KiB at a time; reading for it from this buffer instead saves most of
/// the system calls (a 16 KiB record would take four or five).
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
        Ok(TlsIdentity {
            dir: dir.to_path_buf(),
            server: Arc::new(server),
            client: Arc::new(client),
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

enum Tls {
    Client(ClientConnection),
    Server(ServerConnection),
}

/// TLS bytes read from the socket and not yet taken by rustls.
struct RxBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RxBuf {
    fn new() -> RxBuf {
        RxBuf {
            buf: vec![0u8; RX_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

struct TlsState {
    conn: Tls,
    rx: RxBuf,
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

/// The socket as the TLS layer sees it, each call bounded by the deadline;
/// with `rx`, reads go through that buffer.
struct Sock<'a> {
    tcp: &'a TcpStream,
    deadline: Option<Instant>,
    rx: Option<&'a mut RxBuf>,
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
        let Some(rx) = self.rx.as_deref_mut() else {
            return (&*self.tcp).read(buf);
        };
        if rx.start == rx.end {
            let n = (&*self.tcp).read(&mut rx.buf)?;
            rx.start = 0;
            rx.end = n;
            if n == 0 {
                return Ok(0);
            }
        }
        let n = buf.len().min(rx.end - rx.start);
        buf[..n].copy_from_slice(&rx.buf[rx.start..rx.start + n]);
        rx.start += n;
        Ok(n)
    }
}

/// The socket blocks, with a send timeout: EAGAIN from a write means the
/// timeout elapsed with the peer taking nothing. rustls takes WouldBlock
/// for "try reading instead" and would then wait for the peer's bytes,
/// unbounded on a link that is down; a hard TimedOut ends the write.
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
        let mut conn = ClientConnection::new(identity.client_config(), name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        let mut rx = RxBuf::new();
        handshake(&mut conn, &tcp, deadline, &mut rx)?;
        Ok(Channel {
            tcp,
            tls: Some(Arc::new(Mutex::new(TlsState {
                conn: Tls::Client(conn),
                rx,
            }))),
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
        let mut conn = ServerConnection::new(identity.server_config())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        let mut rx = RxBuf::new();
        handshake(&mut conn, &tcp, deadline, &mut rx)?;
        Ok(Channel {
            tcp,
            tls: Some(Arc::new(Mutex::new(TlsState {
                conn: Tls::Server(conn),
                rx,
            }))),
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
        let tls = self.tls.as_ref()?;
        let guard = lock(tls);
        let certs = match &guard.conn {
            Tls::Client(c) => c.peer_certificates(),
            Tls::Server(c) => c.peer_certificates(),
        };
        certs
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned())
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

/// Bytes of the peer's first messages after the handshake may already be
/// in `rx`: it goes with the connection.
fn handshake<C, S>(
    conn: &mut C,
    tcp: &TcpStream,
    deadline: Instant,
    rx: &mut RxBuf,
) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    let mut sock = Sock {
        tcp,
        deadline: Some(deadline),
        rx: Some(rx),
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(timeout_message)?;
    }
    // TLS 1.3 servers may still have session tickets to send.
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(timeout_message)?;
    }
    Ok(())
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

/// A byte stream, plain or TLS, as [`Channel::with_io`] hands it out.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

impl Channel {
    /// Runs `f` on the TLS session over the socket, or on the plain socket.
    fn with_io<R>(&mut self, f: impl FnOnce(&mut dyn Io) -> io::Result<R>) -> io::Result<R> {
        let Some(tls) = &self.tls else {
            return f(&mut Sock {
                tcp: &self.tcp,
                deadline: self.deadline,
                rx: None,
            });
        };
        let mut guard = lock(tls);
        let TlsState { conn, rx } = &mut *guard;
        let mut sock = Sock {
            tcp: &self.tcp,
            deadline: self.deadline,
            rx: Some(rx),
        };
        match conn {
            Tls::Client(c) => f(&mut rustls::Stream::new(c, &mut sock)),
            Tls::Server(c) => f(&mut rustls::Stream::new(c, &mut sock)),
        }
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.with_io(|s| s.read(buf))
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.with_io(|s| s.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.with_io(|s| s.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.with_io(|s| s.flush())
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
