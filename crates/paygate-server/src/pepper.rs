//! Loads the key pepper; in the embedded default, creates one on first start.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use paygate_domain::Pepper;

use crate::config::{Config, PepperSource};

pub fn load(config: &Config) -> anyhow::Result<Pepper> {
    let version = config.pepper_version;
    match &config.pepper {
        PepperSource::Inline(hex) => {
            Ok(Pepper::from_hex(version, hex).map_err(|e| anyhow::anyhow!("key_pepper: {e}"))?)
        }
        PepperSource::File(path) => read(path, version),
        PepperSource::BesideDatabase(path) => {
            if !path.exists() {
                create_secret_file(path, &Pepper::generate_hex(), "key pepper")?;
            }
            read(path, version)
        }
    }
}

fn read(path: &Path, version: u16) -> anyhow::Result<Pepper> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("key_pepper_file: cannot read {}", path.display()))?,
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "key pepper file is readable by others; chmod 600 it");
        }
    }
    Pepper::from_hex(version, &text).map_err(|e| anyhow::anyhow!("key_pepper_file {}: {e}", path.display()))
}

/// Creates `path` with mode 0600 holding `hex`, unless another process created
/// it first (then theirs is used).
pub fn create_secret_file(path: &Path, hex: &str, what: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(mut file) => {
            file.write_all(hex.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            tracing::warn!(path = %path.display(), "generated a new {what} (mode 0600); back it up with the database");
            Ok(())
        }
        // Another process (the server, or a CLI call) created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => bail!("cannot create {what} file {}: {e}", path.display()),
    }
}

/// The audit checkpoint signing key (Ed25519 seed, hex), held outside the database.
/// `create`: in the embedded default, create the key if it does not exist
/// (only `serve` does; verification must never invent a key).
pub fn load_audit_signer(config: &Config, create: bool) -> anyhow::Result<paygate_domain::audit::AuditSigner> {
    let path = match (&config.audit_signing_key_file, &config.database) {
        (Some(path), _) => path.clone(),
        (None, crate::config::Database::Sqlite { path, .. }) => {
            let beside = crate::config::beside(path, ".audit-key");
            if !beside.exists() {
                if !create {
                    bail!("no audit signing key at {} (it is created by `paygate serve`)", beside.display());
                }
                create_secret_file(&beside, &paygate_domain::audit::AuditSigner::generate_hex(), "audit signing key")?;
            }
            beside
        }
        (None, crate::config::Database::Postgres { .. }) => {
            bail!("audit_signing_key_file (PAYGATE_AUDIT_SIGNING_KEY_FILE) is required with PostgreSQL")
        }
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path)
            .with_context(|| format!("audit_signing_key_file: cannot read {}", path.display()))?,
    );
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut seed[..])
        .map_err(|_| anyhow::anyhow!("audit_signing_key_file {}: must hold 64 hex characters", path.display()))?;
    Ok(paygate_domain::audit::AuditSigner::from_bytes(&seed))
}

/// The application data key (32 bytes, hex) that encrypts bank account
/// numbers. Like the pepper: generated beside the SQLite database on first
/// start, required as a file with PostgreSQL (every node needs the same key).
pub fn load_data_key(config: &Config, create: bool) -> anyhow::Result<paygate_domain::bank::DataKey> {
    let path = match (&config.data_key_file, &config.database) {
        (Some(path), _) => path.clone(),
        (None, crate::config::Database::Sqlite { path, .. }) => {
            let beside = crate::config::beside(path, ".data-key");
            if !beside.exists() {
                if !create {
                    bail!("no data key at {} (it is created by `paygate serve`)", beside.display());
                }
                create_secret_file(&beside, &Pepper::generate_hex(), "data key")?;
            }
            beside
        }
        (None, crate::config::Database::Postgres { .. }) => {
            bail!("data_key_file (PAYGATE_DATA_KEY_FILE) is required with PostgreSQL")
        }
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path).with_context(|| format!("data_key_file: cannot read {}", path.display()))?,
    );
    let bytes = zeroize::Zeroizing::new(
        hex::decode(text.trim())
            .map_err(|_| anyhow::anyhow!("data_key_file {}: must hold hex characters", path.display()))?,
    );
    paygate_domain::bank::DataKey::new(&bytes).ok_or_else(|| {
        anyhow::anyhow!("data_key_file {}: must hold at least 32 bytes (64 hex characters)", path.display())
    })
}
