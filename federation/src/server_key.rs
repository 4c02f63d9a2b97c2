//! The homeserver's ed25519 signing key, with a key id. Stored as a small TOML-free text file
//! (`ed25519 <key id> <base64 seed>`), created with mode 0600 on first start.

use base64::Engine as _;
use parley_crypto::{KeyPair, PublicKey};
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

/// A server signing key and its id (`ed25519:<id>`).
#[derive(Debug)]
pub struct ServerKey {
    /// Key id, `ed25519:` followed by a short random string.
    pub key_id: String,
    /// The key pair.
    pub key: KeyPair,
}

impl ServerKey {
    /// A fresh key with a random id.
    pub fn generate() -> Self {
        let key = KeyPair::generate();
        let id_bytes: [u8; 6] = rand::random();
        let key_id = format!("ed25519:{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id_bytes));
        Self { key_id, key }
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
                let seed = key.key.seed();
                let text = Zeroizing::new(format!(
                    "ed25519 {} {}\n",
                    key.key_id,
                    base64::engine::general_purpose::STANDARD_NO_PAD.encode(&seed[..])
                ));
                write_private(path, text.as_bytes()).map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split_whitespace();
        if parts.next()? != "ed25519" {
            return None;
        }
        let key_id = parts.next()?.to_owned();
        let seed = Zeroizing::new(base64::engine::general_purpose::STANDARD_NO_PAD.decode(parts.next()?).ok()?);
        let seed: &[u8; 32] = seed.as_slice().try_into().ok()?;
        key_id.starts_with("ed25519:").then(|| Self { key_id, key: KeyPair::from_seed(seed) })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
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
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(ServerKey::load_or_create(&path), Err(ServerKeyError::Malformed(_))));
    }
}
