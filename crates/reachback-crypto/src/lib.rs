//! Secrets, hashes and the internal certificate authority.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;

/// A fresh random secret: `prefix` + 32 random bytes, base64url.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    // the system RNG does not fail on Linux; an all-zero secret would be caught by uniqueness
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether two secrets are equal, in time that does not depend on where they differ
/// (their SHA-256 digests are compared whole).
pub fn secrets_equal(sent: &str, expected: &str) -> bool {
    let (sent, expected) = (hash_secret(sent), hash_secret(expected));
    let difference = sent.iter().zip(&expected).fold(0u8, |difference, (a, b)| difference | (a ^ b));
    std::hint::black_box(difference) == 0
}

/// What sealed values begin with: the format's version.
pub const SEALED_PREFIX: &str = "rbenc1:";

/// The 32-byte secret that replicas share and that encrypts secrets the database
/// keeps (the CA's private key): AES-256-GCM.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(****)")
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// the value is not sealed (an older version stored it in plaintext)
    #[error("the value is not encrypted")]
    NotSealed,
    /// sealed in a format this version does not know
    #[error("the value is encrypted in a format this version does not know ({0}); was it written by a newer version?")]
    UnknownFormat(String),
    /// the value is cut short or not base64
    #[error("the encrypted value is damaged")]
    Damaged,
    /// the secret key is not the one it was sealed with (or the value was altered)
    #[error("the value is encrypted under another secret key")]
    WrongKey,
}

impl SecretKey {
    /// A fresh random key.
    pub fn generate() -> anyhow::Result<SecretKey> {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system has no randomness to make a secret key"))?;
        Ok(SecretKey(bytes))
    }

    /// Reads a key written as 64 hexadecimal digits or as base64 (standard or URL-safe,
    /// padded or not) of 32 bytes; surrounding white space is ignored.
    pub fn parse(text: &str) -> Result<SecretKey, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            (0..32).map(|index| u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).map_err(|_| String::new())).collect::<Result<Vec<u8>, _>>()
        } else {
            use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
            [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(text).ok()).ok_or_else(String::new)
        };
        match bytes.ok().and_then(|bytes| <[u8; 32]>::try_from(bytes).ok()) {
            Some(bytes) => Ok(SecretKey(bytes)),
            None => Err("a secret key must be 32 bytes written as 64 hexadecimal digits or in base64".into()),
        }
    }

    /// The key as 64 hexadecimal digits (what a generated key file holds).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn aead_key(&self) -> ring::aead::LessSafeKey {
        // a 32-byte key is always the right length for AES-256
        ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &self.0).unwrap_or_else(|_| unreachable!()))
    }

    /// Encrypts `plaintext` bound to `context` (what the value is and where it lives:
    /// a sealed value moved to another place does not open there). The result is
    /// `rbenc1:` and base64 of nonce ‖ ciphertext ‖ tag.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> anyhow::Result<String> {
        let mut nonce = [0u8; ring::aead::NONCE_LEN];
        ring::rand::SystemRandom::new().fill(&mut nonce).map_err(|_| anyhow::anyhow!("the system has no randomness for a nonce"))?;
        let mut sealed = plaintext.to_vec();
        self.aead_key()
            .seal_in_place_append_tag(ring::aead::Nonce::assume_unique_for_key(nonce), ring::aead::Aad::from(context), &mut sealed)
            .map_err(|_| anyhow::anyhow!("encryption failed"))?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(bytes)))
    }

    /// Decrypts what [`SecretKey::seal`] made with the same `context`.
    pub fn open(&self, sealed: &str, context: &[u8]) -> Result<Vec<u8>, OpenError> {
        let Some(encoded) = sealed.strip_prefix(SEALED_PREFIX) else {
            return match sealed.split_once(':') {
                Some((format, _)) if format.starts_with("rbenc") => Err(OpenError::UnknownFormat(format.to_string())),
                _ => Err(OpenError::NotSealed),
            };
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| OpenError::Damaged)?;
        if bytes.len() < ring::aead::NONCE_LEN + ring::aead::AES_256_GCM.tag_len() {
            return Err(OpenError::Damaged);
        }
        let (nonce, ciphertext) = bytes.split_at(ring::aead::NONCE_LEN);
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| OpenError::Damaged)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self.aead_key().open_in_place(nonce, ring::aead::Aad::from(context), &mut buffer).map_err(|_| OpenError::WrongKey)?;
        Ok(plaintext.to_vec())
    }
}

/// The stored form of a high-entropy secret: its SHA-256.
pub fn hash_secret(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref().to_vec()
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt_bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut salt_bytes).map_err(|_| anyhow::anyhow!("no randomness"))?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|error| anyhow::anyhow!("salt: {error}"))?;
    argon2::Argon2::default().hash_password(password.as_bytes(), &salt).map(|hash| hash.to_string()).map_err(|error| anyhow::anyhow!("hashing failed: {error}"))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|parsed| argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// A device public key accepted for enrollment.
pub struct DevicePublicKey {
    spki: SubjectPublicKeyInfo,
    /// SHA-256 of the SubjectPublicKeyInfo DER
    pub fingerprint: Vec<u8>,
}

impl DevicePublicKey {
    /// Whether `signature` is this key's signature of `message` (ECDSA P-256 with
    /// SHA-256, ASN.1 DER; or Ed25519).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let algorithm: &dyn ring::signature::VerificationAlgorithm =
            if self.spki.algorithm() == &rcgen::PKCS_ED25519 { &ring::signature::ED25519 } else { &ring::signature::ECDSA_P256_SHA256_ASN1 };
        ring::signature::UnparsedPublicKey::new(algorithm, self.spki.der_bytes()).verify(message, signature).is_ok()
    }
}

/// Parses a PEM `PUBLIC KEY` (or bare base64 DER) holding an ECDSA P-256 or Ed25519 key.
pub fn parse_public_key(text: &str) -> Result<DevicePublicKey, String> {
    let text = text.trim();
    if text.len() > 4096 {
        return Err("is too long for a P-256 or Ed25519 public key".into());
    }
    let spki = if text.starts_with("-----BEGIN") {
        if !text.starts_with("-----BEGIN PUBLIC KEY-----") {
            return Err("must be a PEM PUBLIC KEY (SubjectPublicKeyInfo)".into());
        }
        SubjectPublicKeyInfo::from_pem(text)
    } else {
        let der = base64::engine::general_purpose::STANDARD
            .decode(text.split_whitespace().collect::<String>())
            .map_err(|_| "must be a PEM PUBLIC KEY or base64 DER".to_string())?;
        SubjectPublicKeyInfo::from_der(&der)
    }
    .map_err(|_| "is not a valid SubjectPublicKeyInfo of a supported key type (ECDSA P-256 or Ed25519)".to_string())?;
    let algorithm = spki.algorithm();
    let length_ok = if algorithm == &rcgen::PKCS_ECDSA_P256_SHA256 {
        spki.der_bytes().len() == 65 && spki.der_bytes()[0] == 4
    } else if algorithm == &rcgen::PKCS_ED25519 {
        spki.der_bytes().len() == 32
    } else {
        return Err("must be an ECDSA P-256 or Ed25519 key".into());
    };
    if !length_ok {
        return Err("holds a malformed key".into());
    }
    let fingerprint = hash_bytes(&spki.subject_public_key_info());
    Ok(DevicePublicKey { spki, fingerprint })
}

/// The key of a DER SubjectPublicKeyInfo (as a certificate carries it).
pub fn public_key_from_spki_der(der: &[u8]) -> Result<DevicePublicKey, String> {
    parse_public_key(&base64::engine::general_purpose::STANDARD.encode(der))
}

fn hash_bytes(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
}

/// The internal CA: created at first start, kept in the database (shared by
/// replicas; the private key encrypted under the secret key), its certificate
/// mirrored to the data directory.
pub struct CertificateAuthority {
    pub certificate_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    pub fn generate() -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Reachback internal CA");
        name.push(DnType::OrganizationName, "Reachback");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let certificate = params.self_signed(&key).context("signing the CA certificate")?;
        Ok((certificate.pem(), key.serialize_pem()))
    }

    pub fn load(certificate_pem: &str, private_key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(private_key_pem).context("reading the CA private key")?;
        let issuer = Issuer::from_ca_cert_pem(certificate_pem, key).context("reading the CA certificate")?;
        Ok(CertificateAuthority { certificate_pem: certificate_pem.to_string(), issuer })
    }

    /// Writes the certificate (public) to `ca.pem` in the data directory. The private
    /// key is never written to a file.
    pub fn mirror_to(&self, data_dir: &Path) -> anyhow::Result<()> {
        std::fs::write(data_dir.join("ca.pem"), &self.certificate_pem).context("writing ca.pem")
    }

    /// A fresh random certificate serial (positive, 16 bytes).
    pub fn new_serial() -> [u8; 16] {
        let mut serial = [0u8; 16];
        let _ = ring::rand::SystemRandom::new().fill(&mut serial);
        serial[0] &= 0x7f;
        serial[0] |= 0x01;
        serial
    }

    /// The CA's pin: `sha256:` and the hex SHA-256 of its DER SubjectPublicKeyInfo
    /// (what clients pass as `--ca-pin`).
    pub fn pin(&self) -> anyhow::Result<String> {
        reachback_tunnel::api_client::pin_of_pem(&self.certificate_pem)
    }

    /// Signs a client certificate for a device: CN is the device id, the hostname a DNS SAN.
    pub fn sign_device(&self, key: &DevicePublicKey, device_id: &str, hostname: &str, serial: [u8; 16], lifetime: Duration) -> anyhow::Result<String> {
        self.sign_client(key, device_id, "device", vec![hostname.to_string()], serial, lifetime)
    }

    /// Signs a client certificate for a connector: CN is the connector id.
    pub fn sign_connector(&self, key: &DevicePublicKey, connector_id: &str, serial: [u8; 16], lifetime: Duration) -> anyhow::Result<String> {
        self.sign_client(key, connector_id, "connector", Vec::new(), serial, lifetime)
    }

    fn sign_client(&self, key: &DevicePublicKey, id: &str, unit: &str, names: Vec<String>, serial: [u8; 16], lifetime: Duration) -> anyhow::Result<String> {
        let mut params = CertificateParams::new(names).context("certificate names")?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, id);
        name.push(DnType::OrganizationalUnitName, unit);
        params.distinguished_name = name;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        set_validity(&mut params, lifetime);
        let certificate = params.signed_by(&key.spki, &self.issuer).context("signing the client certificate")?;
        Ok(certificate.pem())
    }

    /// A fresh key and client certificate for this replica when it relays flows to
    /// another replica: CN is the node name, OU `replica` (only the CA's holders — the
    /// replicas, who share its key — can make one; no enrollment issues this unit).
    pub fn sign_replica(&self, node_name: &str, lifetime: Duration) -> anyhow::Result<(String, String)> {
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, node_name);
        name.push(DnType::OrganizationalUnitName, REPLICA_UNIT);
        self.sign_with_new_key(CertificateParams::default(), name, ExtendedKeyUsagePurpose::ClientAuth, lifetime)
    }

    /// A fresh key and certificate for this replica's tunnel endpoint, named
    /// [`reachback_proto::BROKER_SERVER_NAME`] (clients trust only the CA and dial with that
    /// name, so one name serves every replica) and the names it is advertised under.
    pub fn sign_broker(&self, advertised: &[String], lifetime: Duration) -> anyhow::Result<(String, String)> {
        let mut names = vec![reachback_proto::BROKER_SERVER_NAME.to_string()];
        for name in advertised {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        self.sign_server(reachback_proto::BROKER_SERVER_NAME, &names, lifetime)
    }

    /// A fresh key and certificate chain (leaf, then this CA: a client that pins the CA
    /// finds it in the chain) for the API's HTTPS listener.
    pub fn sign_api(&self, names: &[String], lifetime: Duration) -> anyhow::Result<(String, String)> {
        let common_name = names.first().map(String::as_str).unwrap_or("reachback");
        let (leaf, key) = self.sign_server(common_name, names, lifetime)?;
        Ok((format!("{leaf}{}", self.certificate_pem), key))
    }

    fn sign_server(&self, common_name: &str, names: &[String], lifetime: Duration) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>() {
                Ok(address) => Ok(SanType::IpAddress(address)),
                Err(_) => name.clone().try_into().map(SanType::DnsName).map_err(|_| anyhow::anyhow!("'{name}' is not a valid certificate name")),
            })
            .collect::<anyhow::Result<_>>()?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        self.sign_with_new_key(params, name, ExtendedKeyUsagePurpose::ServerAuth, lifetime)
    }

    /// A fresh P-256 key and a certificate for it with `name`, one usage, a new serial
    /// and `lifetime`: (certificate PEM, key PEM).
    fn sign_with_new_key(
        &self,
        mut params: CertificateParams,
        name: DistinguishedName,
        usage: ExtendedKeyUsagePurpose,
        lifetime: Duration,
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating a key")?;
        params.distinguished_name = name;
        params.serial_number = Some(SerialNumber::from_slice(&Self::new_serial()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        set_validity(&mut params, lifetime);
        let certificate = params.signed_by(&key, &self.issuer).context("signing the certificate")?;
        Ok((certificate.pem(), key.serialize_pem()))
    }
}

/// The organisational unit of a replica's client certificate.
pub const REPLICA_UNIT: &str = "replica";

/// Valid from a little before now (clocks differ) for `lifetime`.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let back = time::Duration::minutes(5).min(time::Duration::seconds(lifetime.as_secs() as i64 / 2));
    params.not_before = now - back;
    params.not_after = now + time::Duration::seconds(lifetime.as_secs().min(20 * 365 * 86_400) as i64);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn accepts_p256_and_ed25519_only() {
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(parse_public_key(&p256.public_key_pem()).is_ok());
        assert!(parse_public_key(&ed25519.public_key_pem()).is_ok());
        assert!(parse_public_key(&p384.public_key_pem()).is_err());
        assert!(parse_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----").is_err());
        assert!(parse_public_key("not a key").is_err());
        let (ca_pem, ca_key) = CertificateAuthority::generate().unwrap();
        let ca = CertificateAuthority::load(&ca_pem, &ca_key).unwrap();
        let key = parse_public_key(&ed25519.public_key_pem()).unwrap();
        let pem = ca.sign_device(&key, "dev1", "alice.corp.example", CertificateAuthority::new_serial(), Duration::from_secs(3600)).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = SecretKey::generate().unwrap();
        let sealed = key.seal(b"private", b"context 1").unwrap();
        assert!(sealed.starts_with(SEALED_PREFIX));
        assert!(!sealed.contains("private"));
        assert_ne!(sealed, key.seal(b"private", b"context 1").unwrap(), "a fresh nonce each time");
        assert_eq!(key.open(&sealed, b"context 1").unwrap(), b"private");
        assert_eq!(key.open(&sealed, b"context 2"), Err(OpenError::WrongKey));
        assert_eq!(SecretKey::generate().unwrap().open(&sealed, b"context 1"), Err(OpenError::WrongKey));
        assert_eq!(key.open("-----BEGIN PRIVATE KEY-----", b"context 1"), Err(OpenError::NotSealed));
        assert_eq!(key.open("rbenc1:AAAA", b"context 1"), Err(OpenError::Damaged));
        assert!(matches!(key.open("rbenc9:AAAA", b"context 1"), Err(OpenError::UnknownFormat(_))));
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 3;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(key.open(&String::from_utf8(altered).unwrap(), b"context 1"), Err(OpenError::WrongKey));
    }

    #[test]
    fn secret_keys_parse_from_hex_and_base64() {
        let key = SecretKey::generate().unwrap();
        assert_eq!(SecretKey::parse(&format!("{}\n", key.to_hex())).unwrap().0, key.0);
        let base64 = base64::engine::general_purpose::STANDARD.encode(key.0);
        assert_eq!(SecretKey::parse(&base64).unwrap().0, key.0);
        assert_eq!(SecretKey::parse(base64.trim_end_matches('=')).unwrap().0, key.0);
        assert!(SecretKey::parse("too short").is_err());
        assert!(SecretKey::parse(&"ab".repeat(31)).is_err());
        assert!(SecretKey::parse(&"zz".repeat(32)).is_err());
        assert_eq!(format!("{key:?}"), "SecretKey(****)");
        assert!(secrets_equal("same token", "same token"));
        assert!(!secrets_equal("same token", "same tokem"));
    }
}
