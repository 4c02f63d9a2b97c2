//! Publishing and checking server key documents (`GET /_parley/key/v1`).

use crate::server_key::ServerKey;
use parley_crypto::signing::object_signing_bytes;
use parley_crypto::PublicKey;
use parley_spec::federation::v1::keys::{OldVerifyKey, ServerKeys, SERVER_KEYS_CONTEXT};
use parley_spec::{ServerName, Timestamp};
use std::collections::BTreeMap;
use std::time::Duration;

/// Why a key document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerKeysError {
    /// The document is for another server.
    #[error("key document is for another server")]
    WrongServer,
    /// It is past `valid_until_ts`.
    #[error("key document expired")]
    Expired,
    /// No current key signed it, or a key is malformed.
    #[error("key document is not signed by one of its current keys")]
    BadSignature,
}

/// This server's key document, signed with its current key, valid for `valid_for_ms`.
pub fn sign_server_keys(server_name: &ServerName, key: &ServerKey, now: Timestamp, valid_for_ms: u64) -> ServerKeys {
    let mut document = ServerKeys::new(
        server_name.clone(),
        now.saturating_add(Duration::from_millis(valid_for_ms)),
        key.key_id.clone(),
        key.public().as_bytes().to_vec(),
    );
    for old in &key.old {
        document.old_verify_keys.insert(old.key_id.clone(), OldVerifyKey::new(old.public.as_bytes().to_vec(), old.expired_ts));
    }
    // A document of strings and integers always has a canonical encoding.
    let bytes = object_signing_bytes(SERVER_KEYS_CONTEXT, &without_signatures(&document)).unwrap_or_default();
    document.signatures.insert(key.key_id.clone(), key.key.sign_bytes(&bytes).to_vec().into());
    document
}

fn without_signatures(document: &ServerKeys) -> ServerKeys {
    let mut copy = document.clone();
    copy.signatures.clear();
    copy
}

/// The keys of a verified document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifiedKeys {
    /// Current keys by key id.
    pub current: BTreeMap<String, PublicKey>,
    /// Retired keys by key id, with the time after which their signatures are invalid.
    pub old: BTreeMap<String, (PublicKey, Timestamp)>,
}

impl VerifiedKeys {
    /// The key `key_id` if a signature made at `ts` by it is acceptable.
    pub fn key_for(&self, key_id: &str, ts: Timestamp) -> Option<PublicKey> {
        if let Some(key) = self.current.get(key_id) {
            return Some(*key);
        }
        self.old.get(key_id).filter(|(_, expired_ts)| ts <= *expired_ts).map(|(key, _)| *key)
    }
}

/// Checks a fetched document: right server, not expired, signed by every current key it lists
/// (at least one). Returns its current keys and its retired keys (which the current keys vouch
/// for by signing the document).
pub fn verify_server_keys(document: &ServerKeys, expected: &ServerName, now: Timestamp) -> Result<VerifiedKeys, ServerKeysError> {
    if &document.server_name != expected {
        return Err(ServerKeysError::WrongServer);
    }
    if document.valid_until_ts < now {
        return Err(ServerKeysError::Expired);
    }
    if document.verify_keys.is_empty() {
        return Err(ServerKeysError::BadSignature);
    }
    let bytes =
        object_signing_bytes(SERVER_KEYS_CONTEXT, &without_signatures(document)).map_err(|_| ServerKeysError::BadSignature)?;
    let mut keys = BTreeMap::new();
    for (key_id, verify_key) in &document.verify_keys {
        let key = PublicKey::from_bytes(&verify_key.key.0).map_err(|_| ServerKeysError::BadSignature)?;
        let signature = document.signatures.get(key_id).ok_or(ServerKeysError::BadSignature)?;
        key.verify_bytes(&bytes, &signature.0).map_err(|_| ServerKeysError::BadSignature)?;
        keys.insert(key_id.clone(), key);
    }
    let mut old = BTreeMap::new();
    for (key_id, old_key) in &document.old_verify_keys {
        let key = PublicKey::from_bytes(&old_key.key.0).map_err(|_| ServerKeysError::BadSignature)?;
        old.insert(key_id.clone(), (key, old_key.expired_ts));
    }
    Ok(VerifiedKeys { current: keys, old })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    #[test]
    fn documents_verify_and_tampering_is_caught() {
        let name = ServerName::parse("a.example").unwrap();
        let key = ServerKey::generate();
        let document = sign_server_keys(&name, &key, ms(1_000), 86_400_000);
        let keys = verify_server_keys(&document, &name, ms(2_000)).unwrap();
        assert_eq!(keys.current[&key.key_id], key.public());
        assert_eq!(keys.key_for(&key.key_id, ms(5)), Some(key.public()));
        assert_eq!(keys.key_for("ed25519:other", ms(5)), None);
        let other = ServerName::parse("b.example").unwrap();
        assert_eq!(verify_server_keys(&document, &other, ms(2_000)), Err(ServerKeysError::WrongServer));
        assert_eq!(verify_server_keys(&document, &name, ms(86_401_001)), Err(ServerKeysError::Expired));
        let mut extended = document.clone();
        extended.valid_until_ts = extended.valid_until_ts.saturating_add(Duration::from_millis(1));
        assert_eq!(verify_server_keys(&extended, &name, ms(2_000)), Err(ServerKeysError::BadSignature));
        let mut swapped = document.clone();
        let stranger = ServerKey::generate();
        swapped.verify_keys.get_mut(&key.key_id).unwrap().key = stranger.public().as_bytes().to_vec().into();
        assert_eq!(verify_server_keys(&swapped, &name, ms(2_000)), Err(ServerKeysError::BadSignature));
        // After a rotation the document lists the retired key; signatures made before its
        // retirement still verify, later ones do not.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.key");
        let before = ServerKey::load_or_create(&path).unwrap();
        let after = ServerKey::rotate(&path, ms(10_000)).unwrap();
        let rotated = verify_server_keys(&sign_server_keys(&name, &after, ms(20_000), 86_400_000), &name, ms(20_000)).unwrap();
        assert_eq!(rotated.key_for(&after.key_id, ms(20_000)), Some(after.public()));
        assert_eq!(rotated.key_for(&before.key_id, ms(9_999)), Some(before.public()));
        assert_eq!(rotated.key_for(&before.key_id, ms(10_001)), None);
        // Round trip through JSON keeps it valid.
        let json = serde_json::to_string(&document).unwrap();
        let parsed: ServerKeys = serde_json::from_str(&json).unwrap();
        verify_server_keys(&parsed, &name, ms(2_000)).unwrap();
    }
}
