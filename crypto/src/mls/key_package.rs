//! KeyPackages: what a device publishes so others can add it to groups. Created by
//! [`MlsClient::create_key_package`] (the private keys stay in the client's storage until a
//! Welcome uses them), parsed and verified by [`KeyPackage::from_bytes`].

use super::credential::MemberLeaf;
use super::{capabilities, MlsClient, MlsError, MlsStorage, CIPHERSUITE};
use crate::identity::DeviceIdentity;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProtocolVersion};
use openmls_rust_crypto::RustCrypto;

/// The longest KeyPackage lifetime openmls accepts, in seconds (12 weeks; openmls adds one hour
/// of clock-skew margin before `not_before`, which [`Lifetime::starting_at`] also does).
pub const MAX_KEY_PACKAGE_LIFETIME_SECS: u64 = 12 * 7 * 24 * 60 * 60;

/// Clock-skew margin put before `not_before`, as openmls does.
const SKEW_MARGIN_SECS: u64 = 60 * 60;

/// The validity period of a KeyPackage, in seconds since the Unix epoch (inclusive bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// Not valid before.
    pub not_before: u64,
    /// Not valid after.
    pub not_after: u64,
}

impl Lifetime {
    /// Valid from an hour before `now` (clock skew) until `now + valid_for_secs`.
    pub fn starting_at(now: u64, valid_for_secs: u64) -> Self {
        Self { not_before: now.saturating_sub(SKEW_MARGIN_SECS), not_after: now.saturating_add(valid_for_secs) }
    }

    fn to_openmls(self) -> openmls::prelude::Lifetime {
        openmls::prelude::Lifetime::init(self.not_before, self.not_after)
    }
}

/// A verified KeyPackage of [`CIPHERSUITE`]: its signatures hold, its lifetime is valid now, its
/// extensions are among its capabilities, and its credential is a Parley credential. Whether a
/// signed device list vouches for [`leaf`](Self::leaf) is for the caller to check.
#[derive(Debug, Clone)]
pub struct KeyPackage {
    inner: openmls::prelude::KeyPackage,
    bytes: Vec<u8>,
    leaf: MemberLeaf,
    reference: Vec<u8>,
}

impl PartialEq for KeyPackage {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for KeyPackage {}

impl KeyPackage {
    /// Parses and verifies a TLS-serialized `MLSMessage` holding a KeyPackage.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MlsError> {
        const EXPECTED: &str = "a KeyPackage";
        let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        let MlsMessageBodyIn::KeyPackage(key_package) = message.extract() else {
            return Err(MlsError::Malformed { expected: EXPECTED });
        };
        let crypto = RustCrypto::default();
        let key_package =
            key_package.validate(&crypto, ProtocolVersion::Mls10).map_err(|e| MlsError::InvalidKeyPackage(e.to_string()))?;
        Self::from_openmls(key_package, &crypto)
    }

    fn from_openmls(inner: openmls::prelude::KeyPackage, crypto: &RustCrypto) -> Result<Self, MlsError> {
        if inner.ciphersuite() != CIPHERSUITE {
            return Err(MlsError::WrongCiphersuite);
        }
        let leaf_node = inner.leaf_node();
        let leaf = MemberLeaf::from_parts(leaf_node.credential(), leaf_node.signature_key().as_slice())?;
        let reference = inner.hash_ref(crypto).map_err(MlsError::internal)?.as_slice().to_vec();
        let bytes = MlsMessageOut::from(inner.clone()).to_bytes().map_err(MlsError::internal)?;
        Ok(Self { inner, bytes, leaf, reference })
    }

    /// The TLS-serialized `MLSMessage`, for upload.
    pub fn to_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The user, device and signature key of the KeyPackage's leaf.
    pub fn leaf(&self) -> &MemberLeaf {
        &self.leaf
    }

    /// Whether it carries the last-resort extension (RFC 9420 section 17.3 `last_resort`): the
    /// KeyPackage may be handed out more than once, when no other is left.
    pub fn is_last_resort(&self) -> bool {
        self.inner.last_resort()
    }

    /// Its validity period.
    pub fn lifetime(&self) -> Lifetime {
        let lifetime = self.inner.life_time();
        Lifetime { not_before: lifetime.not_before(), not_after: lifetime.not_after() }
    }

    /// Its `KeyPackageRef` (RFC 9420 section 5.2): the hash a Welcome names it by.
    pub fn reference(&self) -> &[u8] {
        &self.reference
    }

    pub(crate) fn openmls(&self) -> &openmls::prelude::KeyPackage {
        &self.inner
    }
}

impl<S: MlsStorage> MlsClient<S> {
    /// Creates a KeyPackage of this device valid for `lifetime` (at most
    /// [`MAX_KEY_PACKAGE_LIFETIME_SECS`] long), with the last-resort extension if `last_resort`.
    /// Its private keys go to the client's storage, where a Welcome naming it finds them.
    pub fn create_key_package(
        &self,
        identity: &DeviceIdentity,
        lifetime: Lifetime,
        last_resort: bool,
    ) -> Result<KeyPackage, MlsError> {
        let signer = self.signer(identity)?;
        if lifetime.not_after < lifetime.not_before
            || lifetime.not_after - lifetime.not_before > MAX_KEY_PACKAGE_LIFETIME_SECS + SKEW_MARGIN_SECS
        {
            return Err(MlsError::InvalidRequest(format!(
                "a KeyPackage lifetime must be at most {MAX_KEY_PACKAGE_LIFETIME_SECS} s (plus the skew margin)"
            )));
        }
        let mut builder = openmls::prelude::KeyPackage::builder()
            .key_package_lifetime(lifetime.to_openmls())
            .leaf_node_capabilities(capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, &self.provider, &signer, self.own.credential_with_key())
            .map_err(super::error::new_key_package)?;
        KeyPackage::from_openmls(bundle.key_package().clone(), &self.provider.crypto)
    }
}

/// Serializes a value openmls can TLS-encode (an internal failure if it cannot).
pub(crate) fn tls_bytes(value: &impl openmls::prelude::tls_codec::Serialize) -> Result<Vec<u8>, MlsError> {
    value.tls_serialize_detached().map_err(MlsError::internal)
}
