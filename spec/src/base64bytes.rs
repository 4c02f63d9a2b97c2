//! Opaque bytes carried in JSON as standard base64 (with padding).

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Opaque bytes (a ciphertext, for example) that travel in JSON as a standard base64 string.
#[derive(Clone, PartialEq, Eq, Default, utoipa::ToSchema)]
#[schema(value_type = String, format = Byte)]
pub struct Base64Bytes(pub Vec<u8>);

impl std::fmt::Debug for Base64Bytes {
    // Never print contents: they may be ciphertexts or secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Bytes({} bytes)", self.0.len())
    }
}

impl Base64Bytes {
    /// Whether there are no bytes (an absent optional field serializes as nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for Base64Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl Serialize for Base64Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Base64Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Base64Bytes)
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}
