//! The homeserver's ed25519 signing key, with a key id. Stored as a small TOML-free text file
//! (`ed25519 <key id> <base64 seed>`), created with mode 0600 on first start.

use base64::Engine as _;
use parley_crypto::{KeyPair, PublicKey};
use parley_spec::Timestamp;
use std::path::Path;
use zeroize::Zeroizing;

/// Why the server key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum ServerKeyError {
    /// Reading or writing the key file failed.
    #[error("server key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file exists but is not a valid key.
    #[error("server key file {0} is malformed")]
    Malformed(String),
}

/// A server signing key and its id (`ed25519:<id>`), with the keys it replaced.
#[derive(Debug)]
pub struct ServerKey {
    /// Key id, `ed25519:` followed by a short random string.
    pub key_id: String,
    /// The key pair.
    pub key: KeyPair,
    /// Retired keys: still published so signatures made before `expired_ts` verify.
    pub old: Vec<OldKey>,
}

/// A retired server key (public half only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldKey {
    /// Its key id.
    pub key_id: String,
    /// The public key.
    pub public: PublicKey,
    /// When it was retired (ms); later signatures by it are invalid.
    pub expired_ts: Timestamp,
}

impl ServerKey {
    /// A fresh key with a random id.
    pub fn generate() -> Self {
        let key = KeyPair::generate();
        let id_bytes: [u8; 6] = rand::random();
        let key_id = format!("ed25519:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id_bytes));
        Self { key_id, key, old: Vec::new() }
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Loads the key from `path`, creating it (mode 0600) when the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, ServerKeyError> {
        let io = |source| ServerKeyError::Io { path: path.display().to_string(), source };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&Zeroizing::new(text)).ok_or_else(|| ServerKeyError::Malformed(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                write_private(path, key.to_text().as_bytes(), false).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Replaces the key in `path` with a fresh one; the current key becomes an old key retired
    /// `now`. The running server picks the new key up when it restarts. Returns it.
    pub fn rotate(path: &Path, now: Timestamp) -> Result<Self, ServerKeyError> {
        let io = |source| ServerKeyError::Io { path: path.display().to_string(), source };
        let current = Self::load_or_create(path)?;
        let mut next = Self::generate();
        next.old = current.old;
        next.old.push(OldKey { key_id: current.key_id, public: current.key.public(), expired_ts: now });
        // Write beside, then rename over: a crash leaves the old file or the new one, never half.
        let temporary = path.with_extension("key.new");
        let _ = std::fs::remove_file(&temporary);
        write_private(&temporary, next.to_text().as_bytes(), true).map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)?;
        Ok(next)
    }

    /// The file format: `ed25519 <id> <seed>` then one `old <id> <public key> <expired_ts>` line
    /// per retired key.
    fn to_text(&self) -> Zeroizing<String> {
        let seed = self.key.seed();
        let mut text =
            format!("ed25519 {} {}\n", self.key_id, base64::engine::general_purpose::STANDARD_NO_PAD.encode(&seed[..]));
        for old in &self.old {
            text.push_str(&format!(
                "old {} {} {}\n",
                old.key_id,
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(old.public.as_bytes()),
                old.expired_ts
            ));
        }
        Zeroizing::new(text)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let mut parts = lines.next()?.split_whitespace();
        if parts.next()? != "ed25519" {
            return None;
        }
        let key_id = parts.next()?.to_owned();
        let seed = Zeroizing::new(base64::engine::general_purpose::STANDARD_NO_PAD.decode(parts.next()?).ok()?);
        let seed: &[u8; 32] = seed.as_slice().try_into().ok()?;
        if !key_id.starts_with("ed25519:") || parts.next().is_some() {
            return None;
        }
        let mut old = Vec::new();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let mut parts = line.split_whitespace();
            if parts.next()? != "old" {
                return None;
            }
            let key_id = parts.next()?.to_owned();
            let public = base64::engine::general_purpose::STANDARD_NO_PAD.decode(parts.next()?).ok()?;
            let public = PublicKey::from_bytes(&public).ok()?;
            let expired_ts = Timestamp::from_millis(parts.next()?.parse().ok()?);
            old.push(OldKey { key_id, public, expired_ts });
        }
        Some(Self { key_id, key: KeyPair::from_seed(seed), old })
    }
}

fn write_private(path: &Path, bytes: &[u8], sync_dir: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if sync_dir {
        if let Some(dir) = path.parent() {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let first = ServerKey::load_or_create(&path).unwrap();
        let second = ServerKey::load_or_create(&path).unwrap();
        assert_eq!(first.key_id, second.key_id);
        assert_eq!(first.public(), second.public());
        // Rotation keeps the old key, retired now, and survives a reload.
        let rotated = ServerKey::rotate(&path, Timestamp::from_millis(5_000)).unwrap();
        assert_ne!(rotated.key_id, first.key_id);
        assert_eq!(
            rotated.old,
            vec![OldKey { key_id: first.key_id.clone(), public: first.public(), expired_ts: Timestamp::from_millis(5_000) }]
        );
        let reloaded = ServerKey::load_or_create(&path).unwrap();
        assert_eq!(
            (reloaded.key_id.clone(), reloaded.public(), reloaded.old.clone()),
            (rotated.key_id.clone(), rotated.public(), rotated.old.clone())
        );
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(ServerKey::load_or_create(&path), Err(ServerKeyError::Malformed(_))));
    }
}
