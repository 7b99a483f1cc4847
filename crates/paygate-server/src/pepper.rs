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
                create(path)?;
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

fn create(path: &Path) -> anyhow::Result<()> {
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
            let hex = Pepper::generate_hex();
            file.write_all(hex.as_bytes())?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            tracing::warn!(
                path = %path.display(),
                "generated a new key pepper (mode 0600); back it up with the database: without it no API key can be verified"
            );
            Ok(())
        }
        // Another process (the server, or a CLI call) created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => bail!("cannot create key pepper file {}: {e}", path.display()),
    }
}
