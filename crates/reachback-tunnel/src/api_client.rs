//! The HTTP client every command uses to reach the server's API (`agent enroll`,
//! `connector run`, `ctl`): HTTPS verified against the platform's trust store, or
//! against a CA pinned with `--ca-pin sha256:HEX`; plain HTTP only to a loopback
//! address unless the caller says `--insecure-http`.
//!
//! A pin is checked before anything secret is sent: one TLS handshake whose only
//! purpose is to see the chain the server presents, then every request verifies
//! the server's certificate (names included) against the CA that carries the pin.

use std::io::Read;
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// How a client decides to trust the API.
#[derive(Clone, Debug, Default)]
pub struct ApiTrust {
    /// `sha256:<64 hex>`: the SHA-256 of the CA certificate's DER SubjectPublicKeyInfo
    pub ca_pin: Option<String>,
    /// allow `http://` to an address that is not loopback
    pub insecure_http: bool,
}

impl ApiTrust {
    /// With a pin, the CA the server hands out for the tunnel must be the pinned one.
    pub fn check_tunnel_ca(&self, ca_pem: &str) -> anyhow::Result<()> {
        let Some(pin) = &self.ca_pin else { return Ok(()) };
        let expected = normalise_pin(pin)?;
        // every certificate in the bundle becomes a trust anchor of the tunnel: one, the pinned one
        let count = CertificateDer::pem_slice_iter(ca_pem.as_bytes()).count();
        anyhow::ensure!(count == 1, "the server handed out {count} tunnel CA certificates, not the pinned one alone; nothing was kept");
        let returned = pin_of_pem(ca_pem)?;
        anyhow::ensure!(returned == expected, "the server handed out a tunnel CA with pin {returned}, not the pinned {expected}; nothing was kept");
        Ok(())
    }
}

/// An HTTP client for one server's API.
#[derive(Clone)]
pub struct ApiClient {
    pub agent: ureq::Agent,
    /// the API's base URL, without a trailing slash
    pub base: String,
    /// the pinned CA certificate (PEM), when the trust came from a pin
    pub pinned_ca_pem: Option<String>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ApiClient").field("base", &self.base).finish_non_exhaustive()
    }
}

/// The pin of a certificate: `sha256:` and the hex SHA-256 of its DER SubjectPublicKeyInfo.
pub fn pin_of_der(der: &[u8]) -> anyhow::Result<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|error| anyhow::anyhow!("unreadable certificate: {error}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate.public_key().raw);
    Ok(format!("sha256:{}", hex(digest.as_ref())))
}

/// The pin of the first certificate in a PEM text.
pub fn pin_of_pem(pem: &str) -> anyhow::Result<String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next().context("no certificate in the PEM text")?.context("reading the certificate")?;
    pin_of_der(&der)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Checks the form `sha256:<64 hex>` and returns it in lowercase.
pub fn normalise_pin(pin: &str) -> anyhow::Result<String> {
    let pin = pin.trim();
    let Some(hex_part) = pin.strip_prefix("sha256:").or_else(|| pin.strip_prefix("SHA256:")) else {
        bail!("--ca-pin must look like sha256:<64 hex digits> (the server prints it at start; `reachback ctl ca pin` too)");
    };
    if hex_part.len() != 64 || !hex_part.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        bail!("--ca-pin must look like sha256:<64 hex digits>, got {} characters after sha256:", hex_part.len());
    }
    Ok(format!("sha256:{}", hex_part.to_ascii_lowercase()))
}

/// Scheme, host (without IPv6 brackets) and port of an API URL.
struct Target {
    https: bool,
    host: String,
    port: u16,
}

fn parse_target(base: &str) -> anyhow::Result<Target> {
    let uri: ureq::http::Uri = base.parse().with_context(|| format!("'{base}' is not a URL (e.g. https://reachback.corp.example:8080)"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => bail!("'{base}' must start with https:// or http://"),
    };
    let host = uri.host().with_context(|| format!("'{base}' names no host"))?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Target { https, host, port })
}

/// Whether a host name or address is this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|address| address.is_loopback())
}

impl ApiClient {
    /// A client for the API at `base`, trusting it as `trust` says. With a pin this
    /// makes one TLS handshake to check it, and fails when the server's chain holds
    /// no CA with that pin.
    pub fn new(base: &str, trust: &ApiTrust, timeout: Duration) -> anyhow::Result<ApiClient> {
        let base = base.trim().trim_end_matches('/').to_string();
        let target = parse_target(&base)?;
        let config = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(timeout));
        if !target.https {
            if !trust.insecure_http && !is_loopback_host(&target.host) {
                bail!(
                    "refusing to send keys to {} over plain HTTP: use https:// (with --ca-pin sha256:… as the server prints it at start), \
                     or pass --insecure-http when a trusted network or proxy protects the connection",
                    target.host
                );
            }
            return Ok(ApiClient { agent: config.build().into(), base, pinned_ca_pem: None });
        }
        let (roots, pinned_ca_pem) = match &trust.ca_pin {
            Some(pin) => {
                let pin = normalise_pin(pin)?;
                let ca = pinned_ca(&target, &pin, timeout)?;
                let pem = to_pem(&ca);
                (ureq::tls::RootCerts::new_with_certs(&[ureq::tls::Certificate::from_der(&ca).to_owned()]), Some(pem))
            }
            None => (ureq::tls::RootCerts::PlatformVerifier, None),
        };
        let tls = ureq::tls::TlsConfig::builder().root_certs(roots).build();
        Ok(ApiClient { agent: config.tls_config(tls).build().into(), base, pinned_ca_pem })
    }

    /// The URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Posts JSON to an API path and returns the body, turning a problem document into a readable error.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let url = self.url(path);
        let response = self.agent.post(&url).header("Content-Type", "application/json").send(body.to_string()).map_err(|error| explain(&url, error))?;
        Self::answer(response)
    }

    /// Gets JSON from an API path.
    pub fn get_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = self.url(path);
        let response = self.agent.get(&url).call().map_err(|error| explain(&url, error))?;
        Self::answer(response)
    }

    /// The pin of the server's internal CA, as the server (verified by this client's trust) says.
    pub fn server_ca_pin(&self) -> anyhow::Result<String> {
        let answer = self.get_json("/api/v1/ca")?;
        let pem = answer["certificate"].as_str().context("the server's answer has no CA certificate")?;
        pin_of_pem(pem)
    }

    fn answer(response: ureq::http::Response<ureq::Body>) -> anyhow::Result<serde_json::Value> {
        let status = response.status();
        let mut text = String::new();
        response.into_body().into_reader().take(4 * 1024 * 1024).read_to_string(&mut text).context("reading the answer")?;
        let value: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let detail = value["detail"].as_str().unwrap_or(text.as_str()).to_string();
            let fields: Vec<String> = value["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|error| format!("{}: {}", error["field"].as_str().unwrap_or("?"), error["message"].as_str().unwrap_or("?")))
                .collect();
            bail!("the server refused ({status}): {detail}{}", if fields.is_empty() { String::new() } else { format!(" ({})", fields.join("; ")) });
        }
        Ok(value)
    }
}

/// Turns a transport error into a message that says what to do.
pub fn explain(url: &str, error: ureq::Error) -> anyhow::Error {
    let text = error.to_string();
    if text.contains("certificate") || text.contains("UnknownIssuer") || text.contains("NotValidForName") || text.contains("invalid peer") {
        return anyhow::anyhow!(
            "cannot verify the server at {url}: {text}. If it uses Reachback's internal CA, pass --ca-pin sha256:… \
             (printed by the server at start; `reachback ctl ca pin` on the server host); if the name is not in its certificate, \
             start the server with --api-names naming it"
        );
    }
    anyhow::Error::new(error).context(format!("cannot reach {url}"))
}

fn to_pem(der: &[u8]) -> String {
    pem("CERTIFICATE", der)
}

/// A PEM block with this label around `der`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// Handshakes with the server, reads the chain it presents, and returns the
/// certificate (DER) whose pin is `pin`. Nothing but the handshake is sent.
fn pinned_ca(target: &Target, pin: &str, timeout: Duration) -> anyhow::Result<Vec<u8>> {
    let chain = presented_chain(target, timeout)?;
    let mut presented = Vec::new();
    for certificate in &chain {
        let certificate_pin = pin_of_der(certificate)?;
        if certificate_pin == pin {
            return Ok(certificate.to_vec());
        }
        presented.push(certificate_pin);
    }
    bail!(
        "the server at {}:{} is not the one pinned: expected CA pin {pin}, the server presented {}; nothing was sent",
        target.host,
        target.port,
        if presented.is_empty() { "no certificate".to_string() } else { presented.join(", ") }
    )
}

fn presented_chain(target: &Target, timeout: Duration) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verifier = Arc::new(ChainCapture { seen: seen.clone(), provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let name = match target.host.parse::<IpAddr>() {
        Ok(address) => ServerName::IpAddress(address.into()),
        Err(_) => ServerName::try_from(target.host.clone()).with_context(|| format!("'{}' is not a valid server name", target.host))?,
    };
    let address = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {}", target.host))?
        .next()
        .with_context(|| format!("{} has no address", target.host))?;
    let mut tcp = TcpStream::connect_timeout(&address, timeout).with_context(|| format!("cannot reach {address}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).context("starting TLS")?;
    while connection.is_handshaking() {
        connection.complete_io(&mut tcp).with_context(|| format!("TLS handshake with {address} (is it serving HTTPS?)"))?;
    }
    connection.send_close_notify();
    let _ = connection.complete_io(&mut tcp);
    let chain = std::mem::take(&mut *seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    Ok(chain)
}

/// A verifier used only to learn the presented chain: it accepts any chain but
/// still checks the handshake's signature, so the chain belongs to the peer.
#[derive(Debug)]
struct ChainCapture {
    seen: Arc<Mutex<Vec<CertificateDer<'static>>>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ChainCapture {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.clear();
        seen.push(end_entity.clone().into_owned());
        seen.extend(intermediates.iter().map(|certificate| certificate.clone().into_owned()));
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_checked_for_form() {
        assert!(normalise_pin("sha256:abc").is_err());
        assert!(normalise_pin("md5:00").is_err());
        let good = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(normalise_pin(&good).expect("pin"), format!("sha256:{}", "ab".repeat(32)));
    }

    #[test]
    fn plain_http_goes_to_loopback_only() {
        let trust = ApiTrust::default();
        assert!(ApiClient::new("http://127.0.0.1:8080", &trust, Duration::from_secs(1)).is_ok());
        assert!(ApiClient::new("http://[::1]:8080", &trust, Duration::from_secs(1)).is_ok());
        assert!(ApiClient::new("http://localhost:8080/", &trust, Duration::from_secs(1)).is_ok());
        let refused = ApiClient::new("http://10.1.2.3:8080", &trust, Duration::from_secs(1)).expect_err("refused");
        assert!(refused.to_string().contains("plain HTTP"), "{refused}");
        let insecure = ApiTrust { insecure_http: true, ..ApiTrust::default() };
        assert!(ApiClient::new("http://10.1.2.3:8080", &insecure, Duration::from_secs(1)).is_ok());
        assert!(ApiClient::new("ftp://x", &trust, Duration::from_secs(1)).is_err());
    }
}
