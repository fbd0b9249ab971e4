//! Secrets at rest: the data directory and the files the server writes there are
//! its owner's alone, the secret key that replicas share, and the CA's private key
//! kept encrypted under it in the database.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use reachback_store::{AuditEntry, Store};

use crate::crypto::{CertificateAuthority, OpenError, SEALED_PREFIX, SecretKey};
use crate::state::{SecretKeySource, ServerConfig};

/// The secret key's file in the data directory, used when none is given.
pub const SECRET_KEY_FILE: &str = "secret.key";
/// What the CA's sealed private key is bound to: the CA row and the value's purpose.
const CA_KEY_CONTEXT: &[u8] = b"reachback certificate_authority 1 private_key_pem";
/// The private key file earlier versions wrote beside `ca.pem`.
const LEGACY_CA_KEY_FILE: &str = "ca-key.pem";

/// Creates the data directory (0700) and makes it, and the files the server keeps
/// there, private: a mode with group or other bits is changed to the owner's bits
/// alone (logged at INFO); a file the server cannot change is refused.
pub fn prepare_data_dir(config: &ServerConfig) -> anyhow::Result<()> {
    let dir = &config.data_dir;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    make_private(dir)?;
    for path in private_files(config) {
        make_private(&path)?;
    }
    // SQLite creates its write-ahead log and shared-memory files with the database
    // file's mode: a database file made 0600 before SQLite opens it keeps all three private
    if let Some(database) = sqlite_file(config)
        && !database.exists()
    {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&database)
            .with_context(|| format!("creating the database file {}", database.display()))?;
    }
    Ok(())
}

/// Checks the private files again once the database is open (SQLite made its log files).
pub fn check_private_files(config: &ServerConfig) -> anyhow::Result<()> {
    for path in private_files(config) {
        make_private(&path)?;
    }
    Ok(())
}

fn sqlite_file(config: &ServerConfig) -> Option<PathBuf> {
    reachback_store::sqlite_file(&config.database_url())
}

/// The files the server writes and keeps private: the SQLite database and its log
/// files, the generated bootstrap token, the generated secret key.
fn private_files(config: &ServerConfig) -> Vec<PathBuf> {
    let mut files = vec![config.data_dir.join("bootstrap-token"), config.data_dir.join(SECRET_KEY_FILE)];
    if let Some(database) = sqlite_file(config) {
        let name = database.as_os_str().to_owned();
        for suffix in ["-wal", "-shm"] {
            let mut companion = name.clone();
            companion.push(suffix);
            files.push(PathBuf::from(companion));
        }
        files.push(database);
    }
    files
}

/// Takes group and other permissions away from `path`, if it exists and has any.
fn make_private(path: &Path) -> anyhow::Result<()> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("reading the permissions of {}", path.display())),
    };
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let private = mode & 0o700;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(private)).map_err(|error| {
        anyhow::anyhow!(
            "{} is open to group or others (mode {mode:03o}) and this user cannot change that ({error}): its owner should run `chmod {private:03o} {}`, \
             or start reachback as its owner",
            path.display(),
            path.display()
        )
    })?;
    tracing::info!(path = %path.display(), from = %format_args!("{mode:03o}"), to = %format_args!("{private:03o}"), "removed group and other permissions");
    Ok(())
}

/// The secret key in force: given (file or environment) or, by default, the data
/// directory's `secret.key`, generated (0600) when missing — unless the database
/// already holds a CA key encrypted under some secret, which a new key cannot open.
fn secret_key(config: &ServerConfig, database_has_sealed_key: bool) -> anyhow::Result<SecretKey> {
    let path = match &config.security.secret_key {
        SecretKeySource::Value(key) => return Ok(key.clone()),
        SecretKeySource::File(path) => {
            let key = read_secret_key(path)?;
            let mode = std::fs::metadata(path).map(|metadata| metadata.permissions().mode()).unwrap_or(0);
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = %format_args!("{:03o}", mode & 0o777), "the secret key file is readable by group or others");
            }
            return Ok(key);
        }
        SecretKeySource::DataDir => config.data_dir.join(SECRET_KEY_FILE),
    };
    if path.exists() {
        return read_secret_key(&path);
    }
    if database_has_sealed_key {
        anyhow::bail!(
            "the CA private key in the database is encrypted under a secret key this server does not have ({} does not exist): \
             every replica needs the same secret — start this one with the --secret-key-file (or REACHBACK_SECRET_KEY) the others use",
            path.display()
        );
    }
    let key = SecretKey::generate()?;
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating the secret key file {}", path.display()))?;
    file.write_all(format!("{}\n", key.to_hex()).as_bytes()).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated the secret key that encrypts the CA key; other replicas need the same one (--secret-key-file)");
    Ok(key)
}

fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the secret key file {}", path.display()))?;
    SecretKey::parse(&text).map_err(|message| anyhow::anyhow!("{}: {message}", path.display()))
}

/// Loads the internal CA, creating it on first start. Its private key is kept in
/// the database encrypted under the secret key; one an older version stored in
/// plaintext is encrypted now (one transaction, audited). The certificate goes to
/// `ca.pem`; a private key file an older version wrote beside it is deleted.
pub async fn load_ca(store: &Store, config: &ServerConfig) -> anyhow::Result<(CertificateAuthority, SecretKey)> {
    let stored = store.load_ca().await?;
    let sealed_in_database = stored.as_ref().is_some_and(|(_, key)| key.starts_with("rbenc"));
    let secret = secret_key(config, sealed_in_database)?;
    let (certificate, sealed) = match stored {
        None => {
            let (certificate, key) = CertificateAuthority::generate()?;
            // another replica may have stored its CA first: the one in force is returned
            let in_force = store.save_ca(&certificate, &secret.seal(key.as_bytes(), CA_KEY_CONTEXT)?).await?;
            tracing::info!("created the internal certificate authority");
            in_force
        }
        Some((certificate, key)) if !key.starts_with("rbenc") => {
            let sealed = secret.seal(key.as_bytes(), CA_KEY_CONTEXT)?;
            let audit = AuditEntry {
                actor: "system".into(),
                action: "encrypt_ca_key".into(),
                resource_type: "certificate_authority".into(),
                resource_id: "1".into(),
                ..AuditEntry::default()
            };
            if store.replace_ca_key(&key, &sealed, audit).await? {
                tracing::info!("encrypted the CA private key that an earlier version stored in plaintext");
                (certificate, sealed)
            } else {
                // another replica encrypted it meanwhile
                store.load_ca().await?.context("the CA disappeared from the database")?
            }
        }
        Some(pair) => pair,
    };
    let private_key = match secret.open(&sealed, CA_KEY_CONTEXT) {
        Ok(bytes) => String::from_utf8(bytes).context("the decrypted CA private key is not text")?,
        Err(OpenError::WrongKey) => anyhow::bail!(
            "the CA private key in the database is encrypted under another secret key: every replica needs the same secret — \
             start this server with the --secret-key-file (or REACHBACK_SECRET_KEY) the others use{}",
            match &config.security.secret_key {
                SecretKeySource::DataDir => format!(" (this one used {})", config.data_dir.join(SECRET_KEY_FILE).display()),
                _ => String::new(),
            }
        ),
        Err(error) => anyhow::bail!("the CA private key in the database cannot be read: {error} (it should begin with {SEALED_PREFIX})"),
    };
    let ca = CertificateAuthority::load(&certificate, &private_key)?;
    ca.mirror_to(&config.data_dir)?;
    let legacy = config.data_dir.join(LEGACY_CA_KEY_FILE);
    if legacy.exists() {
        std::fs::remove_file(&legacy).with_context(|| format!("deleting {}", legacy.display()))?;
        tracing::info!(path = %legacy.display(), "deleted the CA private key file an earlier version wrote (the key is kept encrypted in the database)");
    }
    Ok((ca, secret))
}
