//! Signed server-to-server requests, sans I/O.
//!
//! Every federation request carries
//! `Authorization: Parley origin="…",destination="…",key="ed25519:…",ts="…",sig="…"`.
//! The signature is ed25519 by the origin's server key over
//! `"parley federation request v1\0" || canonical_json({"method", "uri", "origin",
//! "destination", "ts", "body_sha256"})`, where `uri` is the path with its query exactly as
//! sent, `ts` is milliseconds since the epoch and `body_sha256` the standard base64 SHA-256 of
//! the body bytes (of the empty string when there is none). The receiver checks the
//! destination, the clock skew window and the signature against the origin's published key;
//! replay protection (remembering signatures within the window) is the receiver's state.

use base64::Engine as _;
use parley_crypto::{KeyPair, PublicKey};
use parley_spec::{ServerName, Timestamp};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// Domain-separation prefix of request signatures.
pub const REQUEST_CONTEXT: &[u8] = b"parley federation request v1\0";
/// The authorization scheme name.
pub const SCHEME: &str = "Parley";

/// What a request signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedParts<'a> {
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Path and query as sent (`/_parley/v1/send/123?x=1`).
    pub uri: &'a str,
    /// The sending server.
    pub origin: &'a ServerName,
    /// The receiving server.
    pub destination: &'a ServerName,
    /// Milliseconds since the epoch when signed.
    pub ts: Timestamp,
    /// Standard base64 of the body's SHA-256.
    pub body_sha256: String,
}

impl<'a> SignedParts<'a> {
    /// The parts of a request with `body`.
    pub fn new(
        method: &'a str,
        uri: &'a str,
        origin: &'a ServerName,
        destination: &'a ServerName,
        ts: Timestamp,
        body: &[u8],
    ) -> Self {
        Self {
            method,
            uri,
            origin,
            destination,
            ts,
            body_sha256: base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body)),
        }
    }

    /// The bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut bytes = REQUEST_CONTEXT.to_vec();
        // Strings and an integer always have a canonical encoding.
        bytes.extend_from_slice(&parley_crypto::canonical_json(self).unwrap_or_default());
        bytes
    }

    /// Signs with the origin's key; returns the `Authorization` header value.
    pub fn authorization(&self, key_id: &str, key: &KeyPair) -> String {
        let sig = base64::engine::general_purpose::STANDARD.encode(key.sign_bytes(&self.signing_bytes()));
        format!(
            r#"{SCHEME} origin="{}",destination="{}",key="{}",ts="{}",sig="{}""#,
            self.origin, self.destination, key_id, self.ts, sig
        )
    }
}

/// A parsed `Authorization: Parley …` header (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    /// Claimed origin.
    pub origin: ServerName,
    /// Claimed destination.
    pub destination: ServerName,
    /// Key id of the origin's signing key.
    pub key_id: String,
    /// Claimed signing time (ms).
    pub ts: Timestamp,
    /// Signature bytes.
    pub signature: Vec<u8>,
}

fn need<'v>(value: Option<&'v str>, what: &'static str) -> Result<&'v str, RequestAuthError> {
    value.ok_or(RequestAuthError::Malformed(what))
}

/// Why a request is not accepted (all answered 401 with a stable code by the server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestAuthError {
    /// No `Authorization: Parley` header.
    #[error("unsigned request")]
    Unsigned,
    /// The header does not parse.
    #[error("malformed authorization: {0}")]
    Malformed(&'static str),
    /// Signed for another server.
    #[error("request is for another destination")]
    WrongDestination,
    /// Outside the clock skew window.
    #[error("request timestamp outside the allowed window")]
    Stale,
    /// The signature does not verify with the origin's key.
    #[error("bad signature")]
    BadSignature,
}

impl Authorization {
    /// Parses the header value.
    pub fn parse(value: &str) -> Result<Self, RequestAuthError> {
        let params = value.strip_prefix(SCHEME).and_then(|rest| rest.strip_prefix(' ')).ok_or(RequestAuthError::Unsigned)?;
        let (mut origin, mut destination, mut key_id, mut ts, mut sig) = (None, None, None, None, None);
        for part in params.split(',') {
            let (name, value) = part.trim().split_once('=').ok_or(RequestAuthError::Malformed("parameter without ="))?;
            let value =
                value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).ok_or(RequestAuthError::Malformed("unquoted value"))?;
            let slot = match name {
                "origin" => &mut origin,
                "destination" => &mut destination,
                "key" => &mut key_id,
                "ts" => &mut ts,
                "sig" => &mut sig,
                _ => return Err(RequestAuthError::Malformed("unknown parameter")),
            };
            if slot.replace(value).is_some() {
                return Err(RequestAuthError::Malformed("repeated parameter"));
            }
        }
        Ok(Self {
            origin: ServerName::parse(need(origin, "missing origin")?).map_err(|_| RequestAuthError::Malformed("bad origin"))?,
            destination: ServerName::parse(need(destination, "missing destination")?)
                .map_err(|_| RequestAuthError::Malformed("bad destination"))?,
            key_id: need(key_id, "missing key")?.to_owned(),
            ts: Timestamp::from_millis(need(ts, "missing ts")?.parse().map_err(|_| RequestAuthError::Malformed("bad ts"))?),
            signature: base64::engine::general_purpose::STANDARD
                .decode(need(sig, "missing sig")?)
                .map_err(|_| RequestAuthError::Malformed("bad sig"))?,
        })
    }

    /// Checks destination and time window (cheap, before any key lookup).
    pub fn check_envelope(&self, me: &ServerName, now: Timestamp, max_skew_ms: u64) -> Result<(), RequestAuthError> {
        if &self.destination != me {
            return Err(RequestAuthError::WrongDestination);
        }
        if self.ts.as_millis().abs_diff(now.as_millis()) > max_skew_ms {
            return Err(RequestAuthError::Stale);
        }
        Ok(())
    }

    /// Verifies the signature over the request with the origin's key `key_id`.
    pub fn verify(&self, method: &str, uri: &str, body: &[u8], key: &PublicKey) -> Result<(), RequestAuthError> {
        let parts = SignedParts::new(method, uri, &self.origin, &self.destination, self.ts, body);
        key.verify_bytes(&parts.signing_bytes(), &self.signature).map_err(|_| RequestAuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (ServerName, ServerName) {
        (ServerName::parse("a.example").unwrap(), ServerName::parse("b.example:8448").unwrap())
    }

    #[test]
    fn signed_requests_verify_and_every_part_is_bound() {
        let (a, b) = names();
        let key = KeyPair::from_seed(&[9; 32]);
        let parts = SignedParts::new("PUT", "/_parley/v1/send/17", &a, &b, Timestamp::from_millis(1_000_000), br#"{"pdus":[]}"#);
        let header = parts.authorization("ed25519:k1", &key);
        let auth = Authorization::parse(&header).unwrap();
        assert_eq!(
            (auth.origin.as_str(), auth.key_id.as_str(), auth.ts),
            ("a.example", "ed25519:k1", Timestamp::from_millis(1_000_000))
        );
        auth.check_envelope(&b, Timestamp::from_millis(1_000_500), 60_000).unwrap();
        auth.verify("PUT", "/_parley/v1/send/17", br#"{"pdus":[]}"#, &key.public()).unwrap();
        // Any change is caught.
        assert_eq!(
            auth.verify("POST", "/_parley/v1/send/17", br#"{"pdus":[]}"#, &key.public()),
            Err(RequestAuthError::BadSignature)
        );
        assert_eq!(
            auth.verify("PUT", "/_parley/v1/send/18", br#"{"pdus":[]}"#, &key.public()),
            Err(RequestAuthError::BadSignature)
        );
        assert_eq!(
            auth.verify("PUT", "/_parley/v1/send/17", br#"{"pdus":[1]}"#, &key.public()),
            Err(RequestAuthError::BadSignature)
        );
        let other = KeyPair::from_seed(&[8; 32]);
        assert_eq!(
            auth.verify("PUT", "/_parley/v1/send/17", br#"{"pdus":[]}"#, &other.public()),
            Err(RequestAuthError::BadSignature)
        );
        // Impersonation: the same signature claimed for another origin fails.
        let forged = header.replace("origin=\"a.example\"", "origin=\"c.example\"");
        let forged = Authorization::parse(&forged).unwrap();
        assert_eq!(
            forged.verify("PUT", "/_parley/v1/send/17", br#"{"pdus":[]}"#, &key.public()),
            Err(RequestAuthError::BadSignature)
        );
        // Wrong destination and stale timestamps.
        assert_eq!(auth.check_envelope(&a, Timestamp::from_millis(1_000_000), 60_000), Err(RequestAuthError::WrongDestination));
        assert_eq!(auth.check_envelope(&b, Timestamp::from_millis(1_000_000 + 60_001), 60_000), Err(RequestAuthError::Stale));
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        assert_eq!(Authorization::parse("Bearer x"), Err(RequestAuthError::Unsigned));
        for bad in [
            "Parley origin=a.example",
            r#"Parley origin="a.example""#,
            r#"Parley origin="a.example",origin="a.example",destination="b",key="k",ts="1",sig="AA==""#,
            r#"Parley origin="a b",destination="b",key="k",ts="1",sig="AA==""#,
            r#"Parley origin="a",destination="b",key="k",ts="x",sig="AA==""#,
            r#"Parley origin="a",destination="b",key="k",ts="1",sig="!!""#,
            r#"Parley origin="a",destination="b",key="k",ts="1",sig="AA==",extra="1""#,
        ] {
            assert!(matches!(Authorization::parse(bad), Err(RequestAuthError::Malformed(_))), "{bad}");
        }
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any header value parses or fails with a typed error; never a panic.
        #[test]
        fn arbitrary_headers_never_panic(value in "\\PC{0,200}") {
            let _ = Authorization::parse(&value);
        }

        /// Headers that look almost right also only ever fail cleanly.
        #[test]
        fn near_valid_headers_never_panic(origin in "[a-z.:0-9\\[\\]]{0,30}", ts in "[0-9a-z]{0,25}", sig in "[A-Za-z0-9+/=]{0,90}") {
            let header = format!(r#"Parley origin="{origin}",destination="b.example",key="ed25519:k",ts="{ts}",sig="{sig}""#);
            if let Ok(auth) = Authorization::parse(&header) {
                let key = KeyPair::from_seed(&[1; 32]);
                let _ = auth.verify("GET", "/", b"", &key.public());
            }
        }
    }
}

#[cfg(test)]
mod worked_example {
    //! The worked example of `spec/federation.md`, kept true by this test
    //! (`PARLEY_UPDATE_VECTORS=1` rewrites `spec/vectors/federation_request_v1.json`).

    use super::*;

    const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/federation_request_v1.json");
    const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/federation.md");

    fn generate() -> serde_json::Value {
        let key = KeyPair::from_seed(&[0x42; 32]);
        let origin = ServerName::parse("a.example").unwrap();
        let destination = ServerName::parse("b.example:8448").unwrap();
        let body = br#"{"events":[]}"#;
        let parts = SignedParts::new(
            "PUT",
            "/_parley/v1/send/17",
            &origin,
            &destination,
            Timestamp::from_millis(1_795_500_000_000),
            body,
        );
        let signed = parts.signing_bytes();
        serde_json::json!({
            "seed_hex": "42".repeat(32),
            "public_key": base64::engine::general_purpose::STANDARD.encode(key.public().as_bytes()),
            "key_id": "ed25519:example",
            "method": "PUT",
            "uri": "/_parley/v1/send/17",
            "body": std::str::from_utf8(body).unwrap(),
            "signed_bytes": String::from_utf8_lossy(&signed).replace('\0', "\\0"),
            "authorization": parts.authorization("ed25519:example", &key),
        })
    }

    #[test]
    fn the_worked_example_is_current_and_verifies() {
        let generated = generate();
        let pretty = serde_json::to_string_pretty(&generated).unwrap() + "\n";
        if std::env::var_os("PARLEY_UPDATE_VECTORS").is_some() {
            std::fs::write(VECTORS, &pretty).unwrap();
        }
        let stored: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(VECTORS).unwrap()).unwrap();
        assert_eq!(stored, generated, "spec/vectors/federation_request_v1.json is stale");
        // The header printed in the spec verifies with the published key.
        let header = stored["authorization"].as_str().unwrap();
        let spec = std::fs::read_to_string(SPEC).unwrap();
        assert!(spec.contains(header), "spec/federation.md must show the example header verbatim");
        let key = PublicKey::from_bytes(
            &base64::engine::general_purpose::STANDARD.decode(stored["public_key"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        let auth = Authorization::parse(header).unwrap();
        auth.verify("PUT", "/_parley/v1/send/17", stored["body"].as_str().unwrap().as_bytes(), &key).unwrap();
    }
}
