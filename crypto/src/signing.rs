//! ed25519 signatures (ed25519-dalek) over canonical JSON. Secret keys are zeroized on drop and
//! never printed.

use crate::canonical::{canonical_json, CanonicalError};
use base64::Engine as _;
use ed25519_dalek::Signer as _;
use serde::Serialize;

/// Why a signature operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The signed value has no canonical encoding.
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
    /// The key or signature bytes are malformed (bad input from a peer).
    #[error("malformed key or signature")]
    Malformed,
    /// The signature does not verify.
    #[error("signature does not verify")]
    Invalid,
}

/// An ed25519 key pair.
pub struct KeyPair(ed25519_dalek::SigningKey);

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair(public: {})", self.public().to_base64())
    }
}

impl KeyPair {
    /// A fresh key pair from the operating system's RNG.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Restores a key pair from its 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The 32-byte secret seed. Handle with care: zeroize what you copy it into.
    pub fn seed(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs raw bytes.
    pub fn sign_bytes(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Signs the canonical JSON of `value`.
    pub fn sign_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<[u8; 64], SignatureError> {
        Ok(self.sign_bytes(&canonical_json(value)?))
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl PublicKey {
    /// Parses 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignatureError> {
        let bytes: &[u8; 32] = bytes.try_into().map_err(|_| SignatureError::Malformed)?;
        ed25519_dalek::VerifyingKey::from_bytes(bytes).map(Self).map_err(|_| SignatureError::Malformed)
    }

    /// Parses unpadded standard base64.
    pub fn from_base64(text: &str) -> Result<Self, SignatureError> {
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD.decode(text).map_err(|_| SignatureError::Malformed)?;
        Self::from_bytes(&bytes)
    }

    /// Unpadded standard base64 of the 32 bytes.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.0.as_bytes())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// Verifies a signature over raw bytes (strict: rejects malleable and small-order forms).
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let signature = ed25519_dalek::Signature::from_slice(signature).map_err(|_| SignatureError::Malformed)?;
        self.0.verify_strict(message, &signature).map_err(|_| SignatureError::Invalid)
    }

    /// Verifies a signature over the canonical JSON of `value`.
    pub fn verify_json<T: Serialize + ?Sized>(&self, value: &T, signature: &[u8]) -> Result<(), SignatureError> {
        self.verify_bytes(&canonical_json(value)?, signature)
    }
}

/// The bytes an object signature covers: `context` followed by the canonical JSON of `value`
/// with its top-level `signature` field removed (see `parley_spec::v1::keys`).
pub fn object_signing_bytes<T: Serialize + ?Sized>(context: &[u8], value: &T) -> Result<Vec<u8>, SignatureError> {
    let mut value = serde_json::to_value(value).map_err(crate::canonical::CanonicalError::from)?;
    if let Some(object) = value.as_object_mut() {
        object.remove("signature");
    }
    let mut bytes = context.to_vec();
    bytes.extend_from_slice(&canonical_json(&value)?);
    Ok(bytes)
}

impl KeyPair {
    /// Signs an object under a domain-separation `context` ([`object_signing_bytes`]).
    pub fn sign_object<T: Serialize + ?Sized>(&self, context: &[u8], value: &T) -> Result<[u8; 64], SignatureError> {
        Ok(self.sign_bytes(&object_signing_bytes(context, value)?))
    }
}

impl PublicKey {
    /// Verifies an object signature made by [`KeyPair::sign_object`].
    pub fn verify_object<T: Serialize + ?Sized>(
        &self,
        context: &[u8],
        value: &T,
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        self.verify_bytes(&object_signing_bytes(context, value)?, signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8032_test_1() {
        // RFC 8032 section 7.1, TEST 1 (empty message).
        let seed: [u8; 32] = hex32("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60");
        let key = KeyPair::from_seed(&seed);
        assert_eq!(key.public().as_bytes(), &hex32("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"));
        let sig = key.sign_bytes(b"");
        assert_eq!(
            hex(&sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        key.public().verify_bytes(b"", &sig).unwrap();
        assert!(key.public().verify_bytes(b"x", &sig).is_err());
    }

    #[test]
    fn json_signatures_ignore_field_order() {
        let key = KeyPair::generate();
        let sig = key.sign_json(&serde_json::json!({"a": 1, "b": 2})).unwrap();
        let reordered: serde_json::Value = serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap();
        key.public().verify_json(&reordered, &sig).unwrap();
        let round = PublicKey::from_base64(&key.public().to_base64()).unwrap();
        assert_eq!(round, key.public());
    }

    #[test]
    fn object_signatures_ignore_the_signature_field_and_bind_the_context() {
        let key = KeyPair::generate();
        let mut object = serde_json::json!({"a": 1, "signature": "x"});
        let sig = key.sign_object(b"ctx\0", &object).unwrap();
        object["signature"] = serde_json::json!("something else");
        key.public().verify_object(b"ctx\0", &object, &sig).unwrap();
        assert!(key.public().verify_object(b"other\0", &object, &sig).is_err());
        object["a"] = serde_json::json!(2);
        assert!(key.public().verify_object(b"ctx\0", &object, &sig).is_err());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn hex32(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).unwrap(), 16).unwrap();
        }
        out
    }
}
