//! Credentials bound to Parley identities: what a leaf of an MLS tree says about who holds it,
//! and the check of that claim against a user's signed device list.
//!
//! # Encoding
//!
//! Every leaf carries an MLS `BasicCredential` (credential type 1) whose `identity` is the UTF-8
//! text
//!
//! ```text
//! @localpart:server/DEVICEID
//! ```
//!
//! the user id, a `/`, and the device id, each in its canonical form (`parley_spec::ids`). Neither
//! part can contain `/` (a server name is a DNS name or an IP literal with an optional port, a
//! device id is `[A-Za-z0-9_-]`), so the text splits at its only `/`. A credential is accepted
//! only if both parts parse and re-encode to exactly the bytes received, so each (user, device)
//! has one encoding. The leaf's signature key is the device's ed25519 signing key from its
//! [`DeviceIdentity`](crate::identity::DeviceIdentity), the same key the user's signed device list
//! names, so a leaf is vouched for exactly when its credential names a listed device and its
//! signature key equals that device's signing key ([`MemberLeaf::check`],
//! [`MemberLeaf::check_against_list`]).

use crate::identity::VerifiedDeviceList;
use crate::keys::parse_ed25519_public;
use crate::signing::{KeyPair, PublicKey};
use openmls::prelude::{BasicCredential, Credential, CredentialType, CredentialWithKey, SignatureScheme};
use openmls_traits::signatures::{Signer, SignerError};
use parley_spec::{DeviceId, UserId};

/// Separates the user id from the device id in a credential's identity.
const SEPARATOR: char = '/';

/// Why a leaf's credential is not a Parley credential (bad input from a peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Not a `BasicCredential`.
    #[error("not a basic credential")]
    NotBasic,
    /// The identity is not `@user:server/DEVICE` in canonical form.
    #[error("the credential's identity is not a canonical user id and device id")]
    BadIdentity,
    /// The signature key is not a valid ed25519 public key.
    #[error("the leaf's signature key is not an ed25519 public key")]
    BadSignatureKey,
}

/// Why a leaf is not the device it was expected to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeafMismatch {
    /// The credential names another user.
    #[error("the leaf belongs to {found}, expected {expected}")]
    User {
        /// The expected user.
        expected: UserId,
        /// The user the credential names.
        found: UserId,
    },
    /// The credential names another device.
    #[error("the leaf belongs to device {found}, expected {expected}")]
    Device {
        /// The expected device.
        expected: DeviceId,
        /// The device the credential names.
        found: DeviceId,
    },
    /// The device is not in the user's signed device list.
    #[error("device {0} is not in its user's signed device list")]
    UnlistedDevice(DeviceId),
    /// The leaf's signature key is not the device's signing key.
    #[error("the leaf's signature key is not the signing key of device {0}")]
    SignatureKey(DeviceId),
}

/// What a leaf says about its holder: the user and device its credential names and its
/// signature key. The credential is a `BasicCredential` whose identity is the UTF-8 text
/// `@localpart:server/DEVICEID`, accepted only in canonical form (`spec/e2ee.md` §11). Parsed from a peer's leaf, it is a *claim*; [`check`](Self::check) or
/// [`check_against_list`](Self::check_against_list) decides whether a signed device list vouches
/// for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberLeaf {
    user: UserId,
    device: DeviceId,
    /// A valid ed25519 key (checked when parsed), kept as its 32 bytes: compact, and compared
    /// as the leaf's bytes.
    signature_key: [u8; 32],
}

impl MemberLeaf {
    /// A leaf claim (for our own leaf, or to compare with).
    pub fn new(user: UserId, device: DeviceId, signature_key: PublicKey) -> Self {
        Self { user, device, signature_key: *signature_key.as_bytes() }
    }

    /// The user the credential names.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The device the credential names.
    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    /// The leaf's signature key.
    pub fn signature_key(&self) -> PublicKey {
        // Invariant: the bytes were parsed as an ed25519 public key (`new`, `from_parts`).
        PublicKey::from_bytes(&self.signature_key).expect("a MemberLeaf holds a valid ed25519 key")
    }

    /// The leaf's signature key, as its 32 bytes.
    pub fn signature_key_bytes(&self) -> &[u8; 32] {
        &self.signature_key
    }

    /// The credential's identity bytes (see the module documentation).
    pub fn identity_bytes(&self) -> Vec<u8> {
        encode_identity(&self.user, &self.device)
    }

    /// Checks the leaf against the device the caller expects: the same user, device and ed25519
    /// signing key.
    pub fn check(&self, user: &UserId, device: &DeviceId, signing_key: &PublicKey) -> Result<(), LeafMismatch> {
        if &self.user != user {
            return Err(LeafMismatch::User { expected: user.clone(), found: self.user.clone() });
        }
        if &self.device != device {
            return Err(LeafMismatch::Device { expected: device.clone(), found: self.device.clone() });
        }
        if &self.signature_key != signing_key.as_bytes() {
            return Err(LeafMismatch::SignatureKey(self.device.clone()));
        }
        Ok(())
    }

    /// Checks the leaf against its user's verified signed device list: the list is the user's,
    /// it names the device, and the leaf's signature key is that device's signing key.
    pub fn check_against_list(&self, list: &VerifiedDeviceList) -> Result<(), LeafMismatch> {
        if list.user_id() != &self.user {
            return Err(LeafMismatch::User { expected: list.user_id().clone(), found: self.user.clone() });
        }
        let device = list.device(&self.device).ok_or_else(|| LeafMismatch::UnlistedDevice(self.device.clone()))?;
        self.check(list.user_id(), device.device_id(), device.signing_key())
    }

    /// Parses a leaf's credential and signature key.
    pub(crate) fn from_parts(credential: &Credential, signature_key: &[u8]) -> Result<Self, CredentialError> {
        if credential.credential_type() != CredentialType::Basic {
            return Err(CredentialError::NotBasic);
        }
        let (user, device) = decode_identity(credential.serialized_content())?;
        let signature_key = parse_ed25519_public(signature_key).map_err(|_| CredentialError::BadSignatureKey)?;
        Ok(Self { user, device, signature_key: *signature_key.as_bytes() })
    }

    /// The openmls credential and signature key of this leaf.
    pub(crate) fn credential_with_key(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.identity_bytes()).into(),
            signature_key: self.signature_key.to_vec().into(),
        }
    }
}

/// `@user:server/DEVICE` as UTF-8.
fn encode_identity(user: &UserId, device: &DeviceId) -> Vec<u8> {
    format!("{user}{SEPARATOR}{device}").into_bytes()
}

/// Parses `@user:server/DEVICE`, accepting only the canonical encoding.
fn decode_identity(bytes: &[u8]) -> Result<(UserId, DeviceId), CredentialError> {
    let text = std::str::from_utf8(bytes).map_err(|_| CredentialError::BadIdentity)?;
    let (user, device) = text.split_once(SEPARATOR).ok_or(CredentialError::BadIdentity)?;
    let user = UserId::parse(user).map_err(|_| CredentialError::BadIdentity)?;
    let device = DeviceId::parse(device).map_err(|_| CredentialError::BadIdentity)?;
    if encode_identity(&user, &device) != bytes {
        return Err(CredentialError::BadIdentity);
    }
    Ok((user, device))
}

/// openmls' [`Signer`] over a device's ed25519 key pair. It borrows the key: the secret is never
/// copied out of [`KeyPair`] (whose key is zeroized when dropped), and nothing here can print it.
pub(crate) struct DeviceSigner<'a>(pub(crate) &'a KeyPair);

impl Signer for DeviceSigner<'_> {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign_bytes(payload).to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn device(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn identity_round_trips() {
        for (u, d) in [("@alice:example.org", "ABC"), ("@b.o_b=1:[::1]:8448", "x-Y_z"), ("@c:127.0.0.1:1", "D")] {
            let bytes = encode_identity(&user(u), &device(d));
            assert_eq!(bytes, format!("{u}/{d}").into_bytes());
            assert_eq!(decode_identity(&bytes), Ok((user(u), device(d))), "{u} {d}");
        }
    }

    #[test]
    fn bad_identities_are_refused() {
        for bad in [
            &b""[..],
            b"@alice:example.org",
            b"@alice:example.org/",
            b"alice:example.org/ABC",
            b"@alice:example.org/AB/C",
            b"@alice:example.org/A C",
            b"@Alice:example.org/ABC",
            b"\xff@alice:example.org/ABC",
        ] {
            assert_eq!(decode_identity(bad), Err(CredentialError::BadIdentity), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn leaf_from_parts_checks_type_and_key() {
        let key = KeyPair::from_seed(&[7; 32]).public();
        let leaf = MemberLeaf::new(user("@alice:example.org"), device("ABC"), key);
        let cwk = leaf.credential_with_key();
        assert_eq!(MemberLeaf::from_parts(&cwk.credential, cwk.signature_key.as_slice()), Ok(leaf.clone()));
        assert_eq!(MemberLeaf::from_parts(&cwk.credential, &[1; 31]), Err(CredentialError::BadSignatureKey));
        let other = Credential::new(CredentialType::X509, leaf.identity_bytes());
        assert_eq!(MemberLeaf::from_parts(&other, key.as_bytes()), Err(CredentialError::NotBasic));
    }

    #[test]
    fn check_reports_each_mismatch() {
        let key = KeyPair::from_seed(&[7; 32]).public();
        let other_key = KeyPair::from_seed(&[8; 32]).public();
        let leaf = MemberLeaf::new(user("@alice:example.org"), device("ABC"), key);
        assert_eq!(leaf.check(&user("@alice:example.org"), &device("ABC"), &key), Ok(()));
        assert!(matches!(leaf.check(&user("@bob:example.org"), &device("ABC"), &key), Err(LeafMismatch::User { .. })));
        assert!(matches!(leaf.check(&user("@alice:example.org"), &device("XYZ"), &key), Err(LeafMismatch::Device { .. })));
        assert_eq!(
            leaf.check(&user("@alice:example.org"), &device("ABC"), &other_key),
            Err(LeafMismatch::SignatureKey(device("ABC")))
        );
    }

    #[test]
    fn signer_signs_with_the_device_key() {
        let pair = KeyPair::from_seed(&[9; 32]);
        let signer = DeviceSigner(&pair);
        let signature = signer.sign(b"payload").unwrap();
        assert_eq!(pair.public().verify_bytes(b"payload", &signature).map_err(|e| e.to_string()), Ok(()));
        assert_eq!(signer.signature_scheme(), SignatureScheme::ED25519);
    }
}
