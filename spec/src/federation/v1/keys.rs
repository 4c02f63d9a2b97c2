//! GET /_parley/key/v1 — a server's signing keys, self-signed.
//!
//! The document lists the current verify keys and the old ones (with when they stopped being
//! used, so signatures made before then still verify), and is valid until `valid_until_ts`.
//! `signatures` maps a key id to an ed25519 signature over
//! `"parley server keys v1\0" || canonical_json(document without "signatures")`, by that key.

use crate::{Base64Bytes, ServerName, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Domain-separation prefix of key document signatures.
pub const SERVER_KEYS_CONTEXT: &[u8] = b"parley server keys v1\0";

/// A current verify key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct VerifyKey {
    /// ed25519 public key (32 bytes).
    pub key: Base64Bytes,
}

/// A retired verify key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct OldVerifyKey {
    /// ed25519 public key (32 bytes).
    pub key: Base64Bytes,
    /// Signatures made after this time (ms) with this key are not valid.
    #[schema(value_type = u64)]
    pub expired_ts: Timestamp,
}

impl OldVerifyKey {
    /// Builds a retired key entry.
    pub fn new(key: Vec<u8>, expired_ts: Timestamp) -> Self {
        Self { key: key.into(), expired_ts }
    }
}

/// A server's key document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct ServerKeys {
    /// Whose keys.
    pub server_name: ServerName,
    /// Cache the document at most until then (ms since the epoch).
    #[schema(value_type = u64)]
    pub valid_until_ts: Timestamp,
    /// Current keys by key id (`ed25519:…`).
    pub verify_keys: BTreeMap<String, VerifyKey>,
    /// Retired keys by key id.
    #[serde(default)]
    pub old_verify_keys: BTreeMap<String, OldVerifyKey>,
    /// Self-signatures by key id.
    #[serde(default)]
    pub signatures: BTreeMap<String, Base64Bytes>,
}

impl ServerKeys {
    /// An unsigned document with one current key.
    pub fn new(server_name: ServerName, valid_until_ts: Timestamp, key_id: String, key: Vec<u8>) -> Self {
        let mut verify_keys = BTreeMap::new();
        verify_keys.insert(key_id, VerifyKey { key: key.into() });
        Self { server_name, valid_until_ts, verify_keys, old_verify_keys: BTreeMap::new(), signatures: BTreeMap::new() }
    }
}

/// GET /_parley/key/v1
#[utoipa::path(get, path = "/_parley/key/v1", tag = "federation",
    responses((status = 200, description = "The server's keys, self-signed", body = ServerKeys)))]
pub fn get_server_keys() {}

crate::endpoint::endpoint! {
    /// `GET /_parley/key/v1`: the server's signing keys, self-signed (on both listeners).
    GetServerKeys: Get "/_parley/key/v1", None, () => ServerKeys
}
