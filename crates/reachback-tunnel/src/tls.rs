//! Mutual TLS 1.3 over TCP: both sides present certificates from the internal CA
//! and trust nothing else. The ring crypto provider is passed explicitly so no
//! process-wide default is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

use crate::mux::{Connection, MuxLimits};
use crate::socket::Congestion;

/// PEM texts of a certificate, its private key, and the CA to trust.
#[derive(Clone)]
pub struct TlsMaterial {
    pub certificate_pem: String,
    pub private_key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("TlsMaterial").field("private_key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

/// ring, with AES-128-GCM first: as safe here as AES-256 and cheaper per byte,
/// which matters on a relay that encrypts every byte twice.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![cipher_suite::TLS13_AES_128_GCM_SHA256, cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    Arc::new(provider)
}

impl TlsMaterial {
    fn chain(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let chain = CertificateDer::pem_slice_iter(self.certificate_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("reading the certificate")?;
        anyhow::ensure!(!chain.is_empty(), "no certificate in the PEM text");
        Ok(chain)
    }

    fn key(&self) -> anyhow::Result<PrivateKeyDer<'static>> {
        PrivateKeyDer::from_pem_slice(self.private_key_pem.as_bytes()).context("reading the private key")
    }

    fn roots(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(certificate.context("reading the CA certificate")?).context("adding the CA certificate")?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate in the PEM text");
        Ok(roots)
    }
}

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client's tunnel may go without the replica's kernel acknowledging
/// anything before the client gives it up and moves to another replica. The kernel
/// probes a quiet tunnel every second (TCP keepalive, whole seconds) and drops the
/// connection at the first probe when nothing, probe or data, was acknowledged for
/// this long (`TCP_USER_TIMEOUT`): a replica whose host vanished or whose network is
/// cut is left at the second probe, 2 s after the last thing it acknowledged, and the
/// reconnection (at most 0.5 s) lands on a live replica within 3 s. A replica that is
/// only slow (its process busy, its kernel still acknowledging) is not left: the
/// application's keepalive (`--client-keepalive`) is for a process that stopped
/// answering, and a short application-level timeout made overloaded replicas shed
/// their clients onto the others (docs/decisions.md).
pub const CLIENT_DEAD_AFTER: Duration = Duration::from_millis(1500);

/// The client side of a tunnel: [`tune`], then the kernel-level liveness of [`CLIENT_DEAD_AFTER`].
fn tune_client(stream: &tokio::net::TcpStream, congestion: &Congestion) {
    tune(stream, congestion);
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(1)).with_interval(Duration::from_secs(1)).with_retries(3);
    if let Err(error) = socket.set_tcp_keepalive(&keepalive).and_then(|()| socket.set_tcp_user_timeout(Some(CLIENT_DEAD_AFTER))) {
        tracing::debug!(%error, "could not set the tunnel's kernel-level liveness");
    }
}

fn tune(stream: &tokio::net::TcpStream, congestion: &Congestion) {
    let _ = stream.set_nodelay(true);
    if let Err(error) = congestion.apply(stream) {
        tracing::debug!(?congestion, %error, "could not set the tunnel's congestion control");
    }
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(15)).with_interval(Duration::from_secs(5)).with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// A server certificate that can be swapped while connections are served (renewal,
/// SIGHUP): the API's and the broker's.
#[derive(Debug)]
pub struct CertificateSlot {
    current: RwLock<Arc<CertifiedKey>>,
    /// when the current certificate stops being valid, and when it started
    validity: RwLock<(SystemTime, SystemTime)>,
}

impl rustls::server::ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }
}

/// The validity of the first certificate in a PEM text: (not before, not after).
pub fn certificate_validity(pem: &str) -> anyhow::Result<(SystemTime, SystemTime)> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next().context("no certificate in the PEM text")?.context("reading the certificate")?;
    validity_of(&der)
}

fn validity_of(der: &[u8]) -> anyhow::Result<(SystemTime, SystemTime)> {
    let (_, leaf) = x509_parser::parse_x509_certificate(der).map_err(|error| anyhow::anyhow!("unreadable certificate: {error}"))?;
    let to_time = |seconds: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(seconds.max(0) as u64);
    Ok((to_time(leaf.validity().not_before.timestamp()), to_time(leaf.validity().not_after.timestamp())))
}

fn certified_key(chain_pem: &str, key_pem: &str) -> anyhow::Result<(CertifiedKey, (SystemTime, SystemTime))> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>().context("reading the certificate chain")?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in the PEM text");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading the private key")?;
    let signing_key =
        rustls::crypto::ring::default_provider().key_provider.load_private_key(key).context("the private key is not usable (ECDSA, Ed25519 or RSA)")?;
    let validity = validity_of(&chain[0])?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().context("the private key does not belong to the certificate")?;
    Ok((certified, validity))
}

impl CertificateSlot {
    pub fn new(chain_pem: &str, key_pem: &str) -> anyhow::Result<CertificateSlot> {
        let (certified, validity) = certified_key(chain_pem, key_pem)?;
        Ok(CertificateSlot { current: RwLock::new(Arc::new(certified)), validity: RwLock::new(validity) })
    }

    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        let (certified, validity) = certified_key(chain_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(certified);
        *self.validity.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = validity;
        Ok(())
    }

    /// Whether two thirds of the current certificate's lifetime have passed.
    pub fn due_for_renewal(&self, now: SystemTime) -> bool {
        self.until_renewal(now).is_zero()
    }

    /// How long until the current certificate is due for renewal.
    pub fn until_renewal(&self, now: SystemTime) -> Duration {
        let (not_before, not_after) = *self.validity.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        reachback_proto::renewal::until_renewal(not_before, not_after, now)
    }
}

/// The broker's side: a TCP listener whose connections must present a client certificate from the CA.
pub struct TunnelListener {
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    congestion: Congestion,
    limits: MuxLimits,
}

impl TunnelListener {
    pub async fn bind(listen: SocketAddr, material: &TlsMaterial) -> anyhow::Result<TunnelListener> {
        let slot = Arc::new(CertificateSlot::new(&material.certificate_pem, &material.private_key_pem).context("the broker certificate")?);
        Self::bind_with_certificate(listen, &material.ca_pem, slot).await
    }

    /// Binds with a certificate the caller may swap later (renewal).
    pub async fn bind_with_certificate(listen: SocketAddr, ca_pem: &str, certificate: Arc<CertificateSlot>) -> anyhow::Result<TunnelListener> {
        let roots = TlsMaterial { certificate_pem: String::new(), private_key_pem: String::new(), ca_pem: ca_pem.to_string() }.roots()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .context("building the client-certificate verifier")?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(certificate);
        tls.alpn_protocols = vec![reachback_proto::ALPN.to_vec()];
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the tunnel endpoint on TCP {listen}"))?;
        Ok(TunnelListener { listener, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)), congestion: Congestion::System, limits: MuxLimits::default() })
    }

    /// The congestion control of the accepted tunnels (the system's unless set).
    pub fn with_congestion(mut self, congestion: Congestion) -> TunnelListener {
        self.congestion = congestion;
        self
    }

    /// The multiplexer's limits for every accepted tunnel (the defaults unless set).
    pub fn with_limits(mut self, limits: MuxLimits) -> TunnelListener {
        self.limits = limits;
        self
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The next TCP connection (its TLS handshake is for [`TunnelListener::handshake`], in its own task).
    pub async fn accept(&self) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
        self.listener.accept().await
    }

    /// Completes the TLS handshake and starts the multiplexer.
    pub async fn handshake(&self, stream: tokio::net::TcpStream, remote: SocketAddr) -> anyhow::Result<Connection> {
        tune(&stream, &self.congestion);
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await.context("TLS handshake timed out")?.context("TLS handshake")?;
        let certificates = tls.get_ref().1.peer_certificates().map(|chain| chain.iter().map(|certificate| certificate.to_vec()).collect()).unwrap_or_default();
        Ok(Connection::start_with_limits(tls, false, remote, certificates, self.limits.clone()))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }
}

/// A client (agent or connector) that presents its certificate and trusts only the CA.
#[derive(Clone)]
pub struct TunnelConnector {
    connector: tokio_rustls::TlsConnector,
    congestion: Congestion,
    limits: MuxLimits,
}

impl TunnelConnector {
    pub fn new(material: &TlsMaterial) -> anyhow::Result<TunnelConnector> {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_root_certificates(material.roots()?)
            .with_client_auth_cert(material.chain()?, material.key()?)
            .context("the client certificate")?;
        tls.alpn_protocols = vec![reachback_proto::ALPN.to_vec()];
        Ok(TunnelConnector { connector: tokio_rustls::TlsConnector::from(Arc::new(tls)), congestion: Congestion::System, limits: MuxLimits::default() })
    }

    /// The congestion control of the tunnel (the system's unless set).
    pub fn with_congestion(mut self, congestion: Congestion) -> TunnelConnector {
        self.congestion = congestion;
        self
    }

    /// The multiplexer's limits for the tunnel (the defaults unless set; a
    /// connector sets `accept_streams: false`).
    pub fn with_limits(mut self, limits: MuxLimits) -> TunnelConnector {
        self.limits = limits;
        self
    }

    pub async fn connect(&self, address: SocketAddr) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(address).await.with_context(|| format!("connecting to {address}"))?;
        tune_client(&stream, &self.congestion);
        let name = ServerName::try_from(reachback_proto::BROKER_SERVER_NAME).context("broker name")?;
        let tls =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, self.connector.connect(name, stream)).await.context("TLS handshake timed out")?.context("TLS handshake")?;
        Ok(Connection::start_with_limits(tls, true, address, Vec::new(), self.limits.clone()))
    }
}

/// Who is on the other end, read from its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// the certificate's common name: a device id or a connector id
    pub id: String,
    /// the organisational unit: `device` or `connector`
    pub kind: String,
    /// the serial number, lowercase hex
    pub serial: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo (DER)
    pub key_fingerprint: Vec<u8>,
}

/// Reads the peer's identity from the certificate it presented (verified by TLS already).
pub fn peer_identity(connection: &Connection) -> anyhow::Result<PeerIdentity> {
    let leaf = connection.peer_certificates().first().context("no peer certificate")?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf).map_err(|error| anyhow::anyhow!("unreadable peer certificate: {error}"))?;
    let subject = certificate.subject();
    let id = subject.iter_common_name().next().and_then(|name| name.as_str().ok()).context("the certificate has no common name")?;
    let kind = subject.iter_organizational_unit().next().and_then(|unit| unit.as_str().ok()).unwrap_or("");
    let serial = certificate.raw_serial().iter().map(|byte| format!("{byte:02x}")).collect();
    let key_fingerprint = ring::digest::digest(&ring::digest::SHA256, certificate.public_key().raw).as_ref().to_vec();
    Ok(PeerIdentity { id: id.to_string(), kind: kind.to_string(), serial, key_fingerprint })
}
