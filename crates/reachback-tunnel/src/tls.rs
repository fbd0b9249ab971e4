//! QUIC endpoints with mutual TLS: both sides present certificates from the
//! internal CA and trust nothing else. The ring crypto provider is passed
//! explicitly so no process-wide default is needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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

/// Transport settings shared by every tunnel: many concurrent flows, windows large
/// enough for a fast link, and keepalive below the idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(65_536));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    transport.send_window(64 * 1024 * 1024);
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    // idle timeout 20 s: a vanished peer is found out in bounded time
    transport.max_idle_timeout(Some(quinn::VarInt::from_u32(20_000).into()));
    transport
}

/// The broker's endpoint: requires a client certificate from the CA.
pub fn server_endpoint(listen: SocketAddr, material: &TlsMaterial) -> anyhow::Result<quinn::Endpoint> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(material.roots()?), provider())
        .build()
        .context("building the client-certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain()?, material.key()?)
        .context("the broker certificate")?;
    tls.alpn_protocols = vec![reachback_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).context("QUIC server crypto")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let socket = std::net::UdpSocket::bind(listen).with_context(|| format!("binding the tunnel endpoint on UDP {listen}"))?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket, Arc::new(quinn::TokioRuntime))?;
    Ok(endpoint)
}

/// A client endpoint (agent or connector) that presents its certificate and trusts only the CA.
pub fn client_endpoint(material: &TlsMaterial) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(material.roots()?)
        .with_client_auth_cert(material.chain()?, material.key()?)
        .context("the client certificate")?;
    tls.alpn_protocols = vec![reachback_proto::ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("QUIC client crypto")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let bind: SocketAddr = "[::]:0".parse().context("wildcard address")?;
    let socket = std::net::UdpSocket::bind(bind).or_else(|_| std::net::UdpSocket::bind("0.0.0.0:0")).context("binding a UDP socket")?;
    let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
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
pub fn peer_identity(connection: &quinn::Connection) -> anyhow::Result<PeerIdentity> {
    let identity = connection.peer_identity().context("no peer certificate")?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| anyhow::anyhow!("unexpected peer identity type"))?;
    let leaf = chain.first().context("empty peer certificate chain")?;
    let (_, certificate) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|error| anyhow::anyhow!("unreadable peer certificate: {error}"))?;
    let subject = certificate.subject();
    let id = subject.iter_common_name().next().and_then(|name| name.as_str().ok()).context("the certificate has no common name")?;
    let kind = subject.iter_organizational_unit().next().and_then(|unit| unit.as_str().ok()).unwrap_or("");
    let serial = certificate.raw_serial().iter().map(|byte| format!("{byte:02x}")).collect();
    let key_fingerprint = ring::digest::digest(&ring::digest::SHA256, certificate.public_key().raw).as_ref().to_vec();
    Ok(PeerIdentity { id: id.to_string(), kind: kind.to_string(), serial, key_fingerprint })
}
