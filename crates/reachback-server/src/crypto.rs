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
/// replicas) and mirrored to the data directory (private key file 0600).
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

    /// Writes `ca.pem` and `ca-key.pem` (0600) into the data directory.
    pub fn mirror_to(&self, data_dir: &Path, private_key_pem: &str) -> anyhow::Result<()> {
        std::fs::write(data_dir.join("ca.pem"), &self.certificate_pem).context("writing ca.pem")?;
        crate::write_private_file(&data_dir.join("ca-key.pem"), private_key_pem)
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
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating the server key")?;
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
        params.distinguished_name = name;
        params.serial_number = Some(SerialNumber::from_slice(&Self::new_serial()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, lifetime);
        let certificate = params.signed_by(&key, &self.issuer).context("signing the server certificate")?;
        Ok((certificate.pem(), key.serialize_pem()))
    }
}

/// Valid from a little before now (clocks differ) for `lifetime`.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    let back = time::Duration::minutes(5).min(time::Duration::seconds(lifetime.as_secs() as i64 / 2));
    params.not_before = now - back;
    params.not_after = now + time::Duration::seconds(lifetime.as_secs().min(20 * 365 * 86_400) as i64);
}

#[cfg(test)]
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
}
