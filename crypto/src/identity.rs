//! Device identity and signed device lists.
//!
//! # Keys
//!
//! * A **user identity** ([`UserIdentity`]) is one ed25519 key pair per user. Its only job is to
//!   sign the user's device list, so a server cannot add a device to a user. It can be restored
//!   from a 32-byte *recovery seed*: the ed25519 seed is
//!   `HKDF-SHA256(salt = none, ikm = recovery seed, info = "parley user identity v1")`, 32 bytes
//!   (see [`UserIdentity::from_recovery_seed`]); the derivation leaves room to derive other keys
//!   from the same recovery seed later under other `info` labels.
//! * A **device identity** ([`DeviceIdentity`]) is, per device, an ed25519 *signing* key pair
//!   (signs the device's [`DeviceKeys`] and its prekeys) and an x25519 *identity* key (the
//!   device's long-term key in X3DH).
//!
//! # Signatures
//!
//! Every signed wire object (see `parley_spec::v1::keys`) is signed the same way: ed25519 over
//!
//! ```text
//! CONTEXT || canonical_json(object as a JSON value, with its "signature" field removed)
//! ```
//!
//! where `CONTEXT` is [`DEVICE_KEYS_CONTEXT`], [`SIGNED_PREKEY_CONTEXT`] or
//! [`DEVICE_LIST_CONTEXT`] (each ends in a NUL byte) and canonical JSON is
//! [`crate::canonical`]; [`crate::signing::object_signing_bytes`] builds those bytes. Verification is ed25519
//! *strict* (no malleable signatures, no small-order keys).
//!
//! # Key validation
//!
//! Public keys from peers are parsed by [`crate::keys`] before use (canonical encodings; no
//! small-order X25519 keys). A refused key or signature is [`IdentityError::Malformed`] or
//! [`DeviceListError::Malformed`], naming the [`Field`].
//!
//! # Prekeys
//!
//! A device signs its signed and last-resort prekeys with [`DeviceIdentity::sign_prekey`];
//! anyone checks them with [`verify_signed_prekey`] (X3DH, the server on upload, the SDK).
//!
//! # Device lists
//!
//! A [`SignedDeviceList`] names every device of a user with its two public keys, sorted by
//! `device_id` (byte order, no duplicates), with a `version` that only grows; it is signed by
//! the user identity key. [`verify_device_list`] checks it against what the client already
//! knows — the pinned identity key and a [`DeviceListCheckpoint`] (version and SHA-256 of the
//! signed bytes of the last list it accepted) — and rejects rollbacks (lower version) and
//! equivocation (same version, different content). A list validly signed by a *different*
//! identity key than the pinned one yields the distinct [`DeviceListError::IdentityChanged`],
//! which the SDK reports as a warning: the safety number changed.

use crate::keys::{parse_ed25519_public, parse_x25519_public};
use crate::signing::{KeyPair, PublicKey};
use parley_spec::v1::keys::{
    DeviceKeys, DeviceListEntry, SignedDeviceList, SignedPrekey, DEVICE_KEYS_CONTEXT, DEVICE_LIST_CONTEXT, SIGNED_PREKEY_CONTEXT,
};
use parley_spec::{DeviceId, UserId};
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x25519_dalek::StaticSecret;
use zeroize::{Zeroize as _, Zeroizing};

/// `info` label of the HKDF that turns a recovery seed into the user identity's ed25519 seed.
pub const USER_IDENTITY_HKDF_INFO: &[u8] = b"parley user identity v1";
/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of [`DeviceIdentity::to_bytes`]: ed25519 seed (32) then x25519 secret (32).
pub const DEVICE_IDENTITY_BYTES: usize = 64;

/// A key or signature field of a signed object, as named in a [`IdentityError::Malformed`] or
/// [`DeviceListError::Malformed`] error. Callers branch on it; its `Display` is the field's
/// name on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// `DeviceKeys.signing_key`.
    DeviceSigningKey,
    /// `DeviceKeys.identity_key`.
    DeviceIdentityKey,
    /// `DeviceKeys.signature`.
    DeviceKeysSignature,
    /// `SignedPrekey.public_key` (a signed or last-resort prekey).
    PrekeyPublicKey,
    /// `SignedPrekey.signature`.
    PrekeySignature,
    /// `SignedDeviceList.identity_key`.
    DeviceListIdentityKey,
    /// `SignedDeviceList.signature`.
    DeviceListSignature,
    /// `DeviceListEntry.signing_key`.
    DeviceListEntrySigningKey,
    /// `DeviceListEntry.identity_key`.
    DeviceListEntryIdentityKey,
}

impl Field {
    /// The field's name in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceSigningKey => "device signing_key",
            Self::DeviceIdentityKey => "device identity_key",
            Self::DeviceKeysSignature => "device keys signature",
            Self::PrekeyPublicKey => "prekey public_key",
            Self::PrekeySignature => "prekey signature",
            Self::DeviceListIdentityKey => "device list identity_key",
            Self::DeviceListSignature => "device list signature",
            Self::DeviceListEntrySigningKey => "device list entry signing_key",
            Self::DeviceListEntryIdentityKey => "device list entry identity_key",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why device keys or a signed prekey were rejected. Always bad input from a peer (or the
/// server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A key or signature has the wrong size, or a key is not acceptable to [`crate::keys`]
    /// (non-canonical, not a point, a small-order X25519 point).
    #[error("malformed {0}")]
    Malformed(Field),
    /// The signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// Why a device list was not signed or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceListError {
    /// The list belongs to another user than the one asked for.
    #[error("device list of {found}, expected {expected}")]
    WrongUser {
        /// The user whose list was requested.
        expected: UserId,
        /// The user the list names.
        found: UserId,
    },
    /// A key or signature has the wrong size or a key is not acceptable to [`crate::keys`].
    #[error("malformed {0}")]
    Malformed(Field),
    /// The entries are not sorted by `device_id`.
    #[error("device list entries are not sorted by device id")]
    Unsorted,
    /// A device appears twice.
    #[error("device {0} is listed twice")]
    DuplicateDevice(DeviceId),
    /// The signature does not verify under the list's identity key.
    #[error("device list signature does not verify")]
    BadSignature,
    /// The list is validly signed, but by another identity key than the pinned one: the user's
    /// identity (and so the safety number) changed. The SDK turns this into a warning event.
    #[error("the user's identity key changed")]
    IdentityChanged {
        /// The identity key the client had pinned.
        pinned: Box<PublicKey>,
        /// The identity key that signed this list.
        found: Box<PublicKey>,
    },
    /// The list is older than one already seen.
    #[error("device list version {found} is older than version {last_seen} already seen")]
    Rollback {
        /// The version already seen.
        last_seen: u64,
        /// The version of this list.
        found: u64,
    },
    /// Two different lists carry the same version: the signer (or whoever holds its key)
    /// showed different clients different lists.
    #[error("two different device lists carry version {version}")]
    Equivocation {
        /// The version in question.
        version: u64,
    },
    /// Device keys name a device that is not in the user's list.
    #[error("device {0} is not in the user's device list")]
    UnlistedDevice(DeviceId),
    /// Device keys differ from the keys the device list gives for that device.
    #[error("keys of device {0} differ from its device list entry")]
    KeyMismatch(DeviceId),
    /// Device keys failed verification.
    #[error(transparent)]
    DeviceKeys(#[from] IdentityError),
}

/// The bytes a wire object of this module is signed over
/// ([`object_signing_bytes`](crate::signing::object_signing_bytes)); their encoding cannot fail
/// (strings, integers and arrays only).
fn wire_message<T: Serialize>(context: &[u8], value: &T) -> Vec<u8> {
    crate::signing::object_signing_bytes(context, value).expect("key directory wire types always have a canonical JSON encoding")
}

fn check_signature_len(signature: &[u8], field: Field) -> Result<(), IdentityError> {
    if signature.len() == SIGNATURE_LEN {
        Ok(())
    } else {
        Err(IdentityError::Malformed(field))
    }
}

/// A user's identity: the ed25519 key pair that signs the user's device list. The secret is
/// zeroized on drop and never printed.
pub struct UserIdentity {
    key: KeyPair,
}

impl std::fmt::Debug for UserIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserIdentity(public: {})", self.key.public().to_base64())
    }
}

impl UserIdentity {
    /// A fresh identity (not recoverable from a recovery seed; see
    /// [`generate_with_recovery_seed`](Self::generate_with_recovery_seed)).
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Self::from_bytes(&seed)
    }

    /// A fresh recovery seed (to show the user once, e.g. as words) and the identity it gives.
    pub fn generate_with_recovery_seed(rng: &mut (impl RngCore + CryptoRng)) -> (Self, Zeroizing<[u8; 32]>) {
        let mut recovery = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(recovery.as_mut());
        (Self::from_recovery_seed(&recovery), recovery)
    }

    /// The identity a recovery seed gives: the ed25519 seed is
    /// `HKDF-SHA256(salt = none, ikm = recovery_seed, info = USER_IDENTITY_HKDF_INFO)`.
    /// The same recovery seed always gives the same identity.
    pub fn from_recovery_seed(recovery_seed: &[u8; 32]) -> Self {
        let hkdf = hkdf::Hkdf::<Sha256>::new(None, recovery_seed);
        let mut seed = Zeroizing::new([0u8; 32]);
        hkdf.expand(USER_IDENTITY_HKDF_INFO, seed.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        Self::from_bytes(&seed)
    }

    /// Restores an identity from [`to_bytes`](Self::to_bytes) (the ed25519 seed itself, *not*
    /// a recovery seed).
    pub fn from_bytes(seed: &[u8; 32]) -> Self {
        Self { key: KeyPair::from_seed(seed) }
    }

    /// The ed25519 seed, for local storage. Keep it secret.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.key.seed()
    }

    /// The identity public key (what safety numbers and device lists are about).
    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Signs a device list. The entries are sorted by `device_id`; a duplicate device or a
    /// malformed key is refused, so nothing is signed that [`verify_device_list`] would reject.
    pub fn sign_device_list(
        &self,
        user_id: &UserId,
        version: u64,
        mut entries: Vec<DeviceListEntry>,
    ) -> Result<SignedDeviceList, DeviceListError> {
        entries.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        check_entries(&entries)?;
        let mut list = SignedDeviceList::new(user_id.clone(), version, self.public().as_bytes().to_vec(), entries, Vec::new());
        let signature = self.key.sign_bytes(&wire_message(DEVICE_LIST_CONTEXT, &list));
        list.signature = signature.to_vec().into();
        Ok(list)
    }
}

/// A device's identity: an ed25519 signing key pair and an x25519 identity key. Secrets are
/// zeroized on drop and never printed.
pub struct DeviceIdentity {
    signing: KeyPair,
    identity: StaticSecret,
    identity_public: x25519_dalek::PublicKey,
}

impl std::fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("signing", &self.signing.public())
            .field("identity", &self.identity_public)
            .finish_non_exhaustive()
    }
}

impl DeviceIdentity {
    /// A fresh device identity.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut bytes = Zeroizing::new([0u8; DEVICE_IDENTITY_BYTES]);
        rng.fill_bytes(bytes.as_mut());
        Self::from_bytes(&bytes)
    }

    /// Restores a device identity from [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8; DEVICE_IDENTITY_BYTES]) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&bytes[..32]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[32..]);
        let identity = StaticSecret::from(secret);
        secret.zeroize();
        let identity_public = x25519_dalek::PublicKey::from(&identity);
        Self { signing: KeyPair::from_seed(&seed), identity, identity_public }
    }

    /// For local storage: the ed25519 seed (32 bytes) then the x25519 secret (32 bytes).
    /// Keep it secret.
    pub fn to_bytes(&self) -> Zeroizing<[u8; DEVICE_IDENTITY_BYTES]> {
        let mut out = Zeroizing::new([0u8; DEVICE_IDENTITY_BYTES]);
        out[..32].copy_from_slice(self.signing.seed().as_ref());
        out[32..].copy_from_slice(self.identity.as_bytes());
        out
    }

    /// The ed25519 signing key pair.
    pub fn signing_key(&self) -> &KeyPair {
        &self.signing
    }

    /// The ed25519 signing public key.
    pub fn signing_public(&self) -> PublicKey {
        self.signing.public()
    }

    /// The x25519 identity secret (for X3DH).
    pub fn identity_secret(&self) -> &StaticSecret {
        &self.identity
    }

    /// The x25519 identity public key.
    pub fn identity_public(&self) -> x25519_dalek::PublicKey {
        self.identity_public
    }

    /// This device's keys, self-signed, for `POST /v1/keys/upload`.
    pub fn device_keys(&self, user_id: &UserId, device_id: &DeviceId) -> DeviceKeys {
        let mut keys = DeviceKeys::new(
            user_id.clone(),
            device_id.clone(),
            self.signing_public().as_bytes().to_vec(),
            self.identity_public.as_bytes().to_vec(),
            Vec::new(),
        );
        let signature = self.signing.sign_bytes(&wire_message(DEVICE_KEYS_CONTEXT, &keys));
        keys.signature = signature.to_vec().into();
        keys
    }

    /// This device's entry for the user's device list.
    pub fn list_entry(&self, device_id: &DeviceId) -> DeviceListEntry {
        DeviceListEntry::new(
            device_id.clone(),
            self.signing_public().as_bytes().to_vec(),
            self.identity_public.as_bytes().to_vec(),
        )
    }

    /// Signs an x25519 prekey (the signed prekey or the last-resort prekey) with this device's
    /// signing key, for upload; [`verify_signed_prekey`] checks it.
    pub fn sign_prekey(&self, key_id: u32, public_key: &x25519_dalek::PublicKey) -> SignedPrekey {
        let mut prekey = SignedPrekey::new(key_id, public_key.as_bytes().to_vec(), Vec::new());
        let signature = self.signing.sign_bytes(&wire_message(SIGNED_PREKEY_CONTEXT, &prekey));
        prekey.signature = signature.to_vec().into();
        prekey
    }
}

/// Verifies a signed (or last-resort) prekey against the device's ed25519 signing key: its public
/// key parses ([`parse_x25519_public`]: no small-order points), its signature is 64 bytes and
/// verifies strictly over [`SIGNED_PREKEY_CONTEXT`] and the prekey. Returns the prekey's X25519
/// key. A refused key is `Malformed(Field::PrekeyPublicKey)`, a signature of the wrong size
/// `Malformed(Field::PrekeySignature)`, one that does not verify `BadSignature`.
pub fn verify_signed_prekey(prekey: &SignedPrekey, signing_key: &PublicKey) -> Result<x25519_dalek::PublicKey, IdentityError> {
    let public = parse_x25519_public(&prekey.public_key.0).map_err(|_| IdentityError::Malformed(Field::PrekeyPublicKey))?;
    check_signature_len(&prekey.signature.0, Field::PrekeySignature)?;
    signing_key
        .verify_bytes(&wire_message(SIGNED_PREKEY_CONTEXT, prekey), &prekey.signature.0)
        .map_err(|_| IdentityError::BadSignature)?;
    Ok(public)
}

/// Device keys whose sizes, points and self-signature checked out. This proves only that the
/// device holds its signing key; that the device belongs to the user is proven by the user's
/// device list (see [`VerifiedDeviceList::check_device_keys`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDeviceKeys {
    user_id: UserId,
    device: VerifiedDevice,
}

impl VerifiedDeviceKeys {
    /// The user the keys claim to belong to.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// The device and its keys.
    pub fn device(&self) -> &VerifiedDevice {
        &self.device
    }

    /// The device list entry for these keys.
    pub fn list_entry(&self) -> DeviceListEntry {
        self.device.to_entry()
    }
}

/// Verifies device keys: sizes, valid points, and the self-signature by `signing_key`.
pub fn verify_device_keys(keys: &DeviceKeys) -> Result<VerifiedDeviceKeys, IdentityError> {
    let signing_key = parse_ed25519_public(&keys.signing_key.0).map_err(|_| IdentityError::Malformed(Field::DeviceSigningKey))?;
    let identity_key =
        parse_x25519_public(&keys.identity_key.0).map_err(|_| IdentityError::Malformed(Field::DeviceIdentityKey))?;
    check_signature_len(&keys.signature.0, Field::DeviceKeysSignature)?;
    signing_key
        .verify_bytes(&wire_message(DEVICE_KEYS_CONTEXT, keys), &keys.signature.0)
        .map_err(|_| IdentityError::BadSignature)?;
    Ok(VerifiedDeviceKeys {
        user_id: keys.user_id.clone(),
        device: VerifiedDevice { device_id: keys.device_id.clone(), signing_key, identity_key },
    })
}

/// One device of a verified device list (or of verified device keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDevice {
    device_id: DeviceId,
    signing_key: PublicKey,
    identity_key: x25519_dalek::PublicKey,
}

impl VerifiedDevice {
    /// The device.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Its ed25519 signing key.
    pub fn signing_key(&self) -> &PublicKey {
        &self.signing_key
    }

    /// Its x25519 identity key.
    pub fn identity_key(&self) -> &x25519_dalek::PublicKey {
        &self.identity_key
    }

    /// As a device list entry.
    pub fn to_entry(&self) -> DeviceListEntry {
        DeviceListEntry::new(self.device_id.clone(), self.signing_key.as_bytes().to_vec(), self.identity_key.as_bytes().to_vec())
    }
}

/// What a client remembers of the last device list it accepted for a user: its version and
/// the SHA-256 of its signed bytes
/// ([`object_signing_bytes`](crate::signing::object_signing_bytes) with [`DEVICE_LIST_CONTEXT`]). Enough to
/// detect rollback and equivocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListCheckpoint {
    /// The version of the accepted list.
    pub version: u64,
    /// SHA-256 of its signed bytes.
    pub digest: [u8; 32],
}

impl DeviceListCheckpoint {
    /// The checkpoint of a list accepted earlier (e.g. loaded from the client's store). The
    /// list is not verified again here.
    pub fn of(list: &SignedDeviceList) -> Self {
        Self { version: list.version, digest: Sha256::digest(wire_message(DEVICE_LIST_CONTEXT, list)).into() }
    }
}

/// A device list whose signature, structure and freshness checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDeviceList {
    list: SignedDeviceList,
    identity_key: PublicKey,
    devices: Vec<VerifiedDevice>,
    digest: [u8; 32],
}

impl VerifiedDeviceList {
    /// The user.
    pub fn user_id(&self) -> &UserId {
        &self.list.user_id
    }

    /// The list's version.
    pub fn version(&self) -> u64 {
        self.list.version
    }

    /// The user identity key that signed it.
    pub fn identity_key(&self) -> &PublicKey {
        &self.identity_key
    }

    /// The devices, sorted by device id.
    pub fn devices(&self) -> &[VerifiedDevice] {
        &self.devices
    }

    /// One device, if listed.
    pub fn device(&self, device_id: &DeviceId) -> Option<&VerifiedDevice> {
        self.devices.binary_search_by(|d| d.device_id.cmp(device_id)).ok().map(|i| &self.devices[i])
    }

    /// The signed list as received (to store or pass on).
    pub fn signed(&self) -> &SignedDeviceList {
        &self.list
    }

    /// What to remember to check the next list for this user.
    pub fn checkpoint(&self) -> DeviceListCheckpoint {
        DeviceListCheckpoint { version: self.list.version, digest: self.digest }
    }

    /// Verifies device keys (e.g. from a prekey bundle) and checks that they belong to this
    /// user and are exactly the keys the list gives for that device.
    pub fn check_device_keys(&self, keys: &DeviceKeys) -> Result<VerifiedDeviceKeys, DeviceListError> {
        if keys.user_id != self.list.user_id {
            return Err(DeviceListError::WrongUser { expected: self.list.user_id.clone(), found: keys.user_id.clone() });
        }
        let verified = verify_device_keys(keys)?;
        let listed = self.device(&keys.device_id).ok_or_else(|| DeviceListError::UnlistedDevice(keys.device_id.clone()))?;
        if listed != verified.device() {
            return Err(DeviceListError::KeyMismatch(keys.device_id.clone()));
        }
        Ok(verified)
    }
}

/// Checks entries: strictly increasing device ids, valid keys. Returns them parsed.
fn check_entries(entries: &[DeviceListEntry]) -> Result<Vec<VerifiedDevice>, DeviceListError> {
    let mut devices: Vec<VerifiedDevice> = Vec::with_capacity(entries.len());
    for entry in entries {
        if let Some(previous) = devices.last() {
            match previous.device_id.cmp(&entry.device_id) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Err(DeviceListError::DuplicateDevice(entry.device_id.clone())),
                std::cmp::Ordering::Greater => return Err(DeviceListError::Unsorted),
            }
        }
        let signing_key = parse_ed25519_public(&entry.signing_key.0)
            .map_err(|_| DeviceListError::Malformed(Field::DeviceListEntrySigningKey))?;
        let identity_key = parse_x25519_public(&entry.identity_key.0)
            .map_err(|_| DeviceListError::Malformed(Field::DeviceListEntryIdentityKey))?;
        devices.push(VerifiedDevice { device_id: entry.device_id.clone(), signing_key, identity_key });
    }
    Ok(devices)
}

/// Verifies a user's device list.
///
/// * `expected_user`: the user whose list was asked for.
/// * `pinned_identity`: the user's identity key as the client knows it (from an earlier list,
///   ideally confirmed by comparing safety numbers); `None` on first contact (trust on first
///   use).
/// * `last_seen`: the checkpoint of the last list accepted for this user, if any.
///
/// Checks, in order: the user; sizes and points of all keys; entries sorted by device id
/// without duplicates; the signature under the list's own identity key; that this key is the
/// pinned one ([`DeviceListError::IdentityChanged`] otherwise); and freshness: a lower version
/// than last seen is a [`DeviceListError::Rollback`], the same version with other content an
/// [`DeviceListError::Equivocation`] (the same list again is accepted).
pub fn verify_device_list(
    list: &SignedDeviceList,
    expected_user: &UserId,
    pinned_identity: Option<&PublicKey>,
    last_seen: Option<&DeviceListCheckpoint>,
) -> Result<VerifiedDeviceList, DeviceListError> {
    if &list.user_id != expected_user {
        return Err(DeviceListError::WrongUser { expected: expected_user.clone(), found: list.user_id.clone() });
    }
    let identity_key =
        parse_ed25519_public(&list.identity_key.0).map_err(|_| DeviceListError::Malformed(Field::DeviceListIdentityKey))?;
    if list.signature.0.len() != SIGNATURE_LEN {
        return Err(DeviceListError::Malformed(Field::DeviceListSignature));
    }
    let devices = check_entries(&list.devices)?;
    let message = wire_message(DEVICE_LIST_CONTEXT, list);
    identity_key.verify_bytes(&message, &list.signature.0).map_err(|_| DeviceListError::BadSignature)?;
    if let Some(pinned) = pinned_identity {
        if pinned != &identity_key {
            return Err(DeviceListError::IdentityChanged { pinned: Box::new(*pinned), found: Box::new(identity_key) });
        }
    }
    let digest: [u8; 32] = Sha256::digest(&message).into();
    if let Some(seen) = last_seen {
        if list.version < seen.version {
            return Err(DeviceListError::Rollback { last_seen: seen.version, found: list.version });
        }
        if list.version == seen.version && digest != seen.digest {
            return Err(DeviceListError::Equivocation { version: list.version });
        }
    }
    Ok(VerifiedDeviceList { list: list.clone(), identity_key, devices, digest })
}

/// How a user's devices changed between two verified lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceListDiff {
    /// Devices only in the new list.
    pub added: Vec<VerifiedDevice>,
    /// Devices only in the old list.
    pub removed: Vec<VerifiedDevice>,
    /// Devices in both lists with different keys, as `(old, new)`. Device keys never change
    /// legitimately, so clients should treat this like a removal and an addition, and warn.
    pub changed: Vec<(VerifiedDevice, VerifiedDevice)>,
}

impl DeviceListDiff {
    /// Compares two lists (normally of the same user, `old` accepted before `new`).
    pub fn between(old: &VerifiedDeviceList, new: &VerifiedDeviceList) -> Self {
        let mut diff = Self::default();
        let (mut olds, mut news) = (old.devices.iter().peekable(), new.devices.iter().peekable());
        loop {
            match (olds.peek(), news.peek()) {
                (None, None) => break,
                (Some(_), None) => diff.removed.extend(olds.by_ref().cloned()),
                (None, Some(_)) => diff.added.extend(news.by_ref().cloned()),
                (Some(o), Some(n)) => match o.device_id.cmp(&n.device_id) {
                    std::cmp::Ordering::Less => diff.removed.extend(olds.next().cloned()),
                    std::cmp::Ordering::Greater => diff.added.extend(news.next().cloned()),
                    std::cmp::Ordering::Equal => {
                        let (o, n) = (olds.next(), news.next());
                        if let (Some(o), Some(n)) = (o, n) {
                            if o != n {
                                diff.changed.push((o.clone(), n.clone()));
                            }
                        }
                    }
                },
            }
        }
        diff
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Helpers shared by the tests of this crate's modules: hex, and known-answer files under
/// `spec/vectors/`.
#[cfg(test)]
pub(crate) mod test_support {
    /// Lower-case hex.
    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses hex (panics on bad input: tests only).
    pub(crate) fn unhex(text: &str) -> Vec<u8> {
        assert!(text.len().is_multiple_of(2), "odd hex length");
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    /// Parses 32 bytes of hex.
    pub(crate) fn unhex32(text: &str) -> [u8; 32] {
        unhex(text).try_into().unwrap()
    }

    /// Compares `generated` with the JSON file at `path`; with `PARLEY_UPDATE_VECTORS=1`, writes
    /// `generated` there instead.
    pub(crate) fn check_vector_file(path: &str, generated: &serde_json::Value) {
        let mut text = serde_json::to_string_pretty(generated).unwrap();
        text.push('\n');
        if std::env::var("PARLEY_UPDATE_VECTORS").as_deref() == Ok("1") {
            std::fs::write(path, text).unwrap();
            return;
        }
        let stored = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (run with PARLEY_UPDATE_VECTORS=1 to create it)"));
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(&stored, generated, "{path} is out of date (PARLEY_UPDATE_VECTORS=1 rewrites it)");
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{check_vector_file, hex, unhex32};
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng as _;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn alice() -> UserId {
        UserId::parse("@alice:example.org").unwrap()
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    #[test]
    fn rfc7748_section_5_2_x25519() {
        let cases = [
            (
                "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
                "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
                "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
            ),
            (
                "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
                "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
                "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
            ),
        ];
        for (scalar, u, out) in cases {
            let secret = StaticSecret::from(unhex32(scalar));
            let shared = secret.diffie_hellman(&x25519_dalek::PublicKey::from(unhex32(u)));
            assert_eq!(hex(shared.as_bytes()), out);
        }
        // The iterated test: k = u = 9; (k, u) <- (X25519(k, u), k).
        let (mut k, mut u) = ([0u8; 32], [0u8; 32]);
        k[0] = 9;
        u[0] = 9;
        for i in 1..=1000 {
            let next = StaticSecret::from(k).diffie_hellman(&x25519_dalek::PublicKey::from(u)).to_bytes();
            u = k;
            k = next;
            if i == 1 {
                assert_eq!(hex(&k), "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079");
            }
        }
        assert_eq!(hex(&k), "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51");
    }

    #[test]
    fn identity_round_trips() {
        let mut rng = rng();
        let device = DeviceIdentity::generate(&mut rng);
        let restored = DeviceIdentity::from_bytes(&device.to_bytes());
        assert_eq!(restored.signing_public(), device.signing_public());
        assert_eq!(restored.identity_public(), device.identity_public());
        assert_eq!(restored.identity_secret().as_bytes(), device.identity_secret().as_bytes());

        let (user, recovery) = UserIdentity::generate_with_recovery_seed(&mut rng);
        assert_eq!(UserIdentity::from_recovery_seed(&recovery).public(), user.public());
        assert_eq!(UserIdentity::from_bytes(&user.to_bytes()).public(), user.public());
        assert_ne!(UserIdentity::from_bytes(&recovery).public(), user.public());

        let debug = format!("{device:?} {user:?}");
        assert!(!debug.contains(&hex(device.identity_secret().as_bytes())));
    }

    #[test]
    fn device_keys_sign_and_verify() {
        let device = DeviceIdentity::generate(&mut rng());
        let keys = device.device_keys(&alice(), &dev("PHONE"));
        let verified = verify_device_keys(&keys).unwrap();
        assert_eq!(verified.user_id(), &alice());
        assert_eq!(verified.device().device_id(), &dev("PHONE"));
        assert_eq!(verified.device().signing_key(), &device.signing_public());
        assert_eq!(verified.device().identity_key(), &device.identity_public());
        assert_eq!(verified.list_entry(), device.list_entry(&dev("PHONE")));

        let mut other = keys.clone();
        other.device_id = dev("LAPTOP");
        assert_eq!(verify_device_keys(&other), Err(IdentityError::BadSignature));
        let mut other = keys.clone();
        other.identity_key.0[0] ^= 1;
        assert_eq!(verify_device_keys(&other), Err(IdentityError::BadSignature));
        let mut other = keys.clone();
        other.signature.0.pop();
        assert!(matches!(verify_device_keys(&other), Err(IdentityError::Malformed(_))));
        let mut other = keys;
        other.identity_key.0 = vec![0; 32];
        assert!(matches!(verify_device_keys(&other), Err(IdentityError::Malformed(_))));
    }

    #[test]
    fn signed_prekeys() {
        let mut rng = rng();
        let device = DeviceIdentity::generate(&mut rng);
        let prekey = x25519_dalek::PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
        let signed = device.sign_prekey(17, &prekey);
        assert_eq!(verify_signed_prekey(&signed, &device.signing_public()).unwrap(), prekey);
        let stranger = DeviceIdentity::generate(&mut rng);
        assert_eq!(verify_signed_prekey(&signed, &stranger.signing_public()), Err(IdentityError::BadSignature));
        let mut other = signed.clone();
        other.key_id = 18;
        assert_eq!(verify_signed_prekey(&other, &device.signing_public()), Err(IdentityError::BadSignature));
        // A device-keys signature is not a prekey signature (domain separation).
        let keys = device.device_keys(&alice(), &dev("PHONE"));
        let forged = SignedPrekey::new(17, prekey.as_bytes().to_vec(), keys.signature.0);
        assert_eq!(verify_signed_prekey(&forged, &device.signing_public()), Err(IdentityError::BadSignature));
    }

    /// A device with fixed keys, and a fixed X25519 prekey.
    fn fixed_device_and_prekey() -> (DeviceIdentity, x25519_dalek::PublicKey) {
        let device = DeviceIdentity::from_bytes(&std::array::from_fn(|i| i as u8));
        let prekey = x25519_dalek::PublicKey::from(&StaticSecret::from([0x42; 32]));
        (device, prekey)
    }

    #[test]
    fn verify_signed_prekey_accepts_a_good_signature() {
        let (device, prekey) = fixed_device_and_prekey();
        let signed = device.sign_prekey(3, &prekey);
        assert_eq!(signed.key_id, 3);
        assert_eq!(signed.public_key.0, prekey.as_bytes());
        assert_eq!(verify_signed_prekey(&signed, &device.signing_public()), Ok(prekey));
        // Deterministic (ed25519): the same device signs the same prekey the same way.
        assert_eq!(device.sign_prekey(3, &prekey), signed);
    }

    #[test]
    fn verify_signed_prekey_rejects_a_bad_signature() {
        let (device, prekey) = fixed_device_and_prekey();
        let mut signed = device.sign_prekey(3, &prekey);
        signed.signature.0[10] ^= 0x01;
        assert_eq!(verify_signed_prekey(&signed, &device.signing_public()), Err(IdentityError::BadSignature));
        // The signature of another prekey.
        let mut swapped = device.sign_prekey(3, &prekey);
        swapped.signature = device.sign_prekey(4, &prekey).signature;
        assert_eq!(verify_signed_prekey(&swapped, &device.signing_public()), Err(IdentityError::BadSignature));
    }

    #[test]
    fn verify_signed_prekey_rejects_the_wrong_key() {
        let (device, prekey) = fixed_device_and_prekey();
        let signed = device.sign_prekey(3, &prekey);
        let other = DeviceIdentity::from_bytes(&[0x99; DEVICE_IDENTITY_BYTES]);
        assert_eq!(verify_signed_prekey(&signed, &other.signing_public()), Err(IdentityError::BadSignature));
    }

    #[test]
    fn verify_signed_prekey_rejects_malformed_fields() {
        let (device, prekey) = fixed_device_and_prekey();
        let signer = device.signing_public();
        let check = |mutate: &dyn Fn(&mut SignedPrekey), field: Field| {
            let mut signed = device.sign_prekey(3, &prekey);
            mutate(&mut signed);
            assert_eq!(verify_signed_prekey(&signed, &signer), Err(IdentityError::Malformed(field)));
        };
        check(&|p| p.signature.0.truncate(63), Field::PrekeySignature);
        check(&|p| p.signature.0.push(0), Field::PrekeySignature);
        check(&|p| p.public_key.0.truncate(31), Field::PrekeyPublicKey);
        check(&|p| p.public_key.0[31] |= 0x80, Field::PrekeyPublicKey);
        // A small-order prekey is refused even when validly signed.
        let small_order = x25519_dalek::PublicKey::from([0u8; 32]);
        let signed = device.sign_prekey(3, &small_order);
        assert_eq!(verify_signed_prekey(&signed, &signer), Err(IdentityError::Malformed(Field::PrekeyPublicKey)));
        // The key is checked before the signature.
        check(&|p| *p = SignedPrekey::new(3, vec![1; 5], vec![0; 2]), Field::PrekeyPublicKey);
        assert_eq!(IdentityError::Malformed(Field::PrekeySignature).to_string(), "malformed prekey signature");
    }

    /// The bytes a prekey signature covers: the context, then the canonical JSON of the prekey
    /// without its signature.
    #[test]
    fn signed_prekey_bytes_are_canonical_json() {
        use base64::Engine as _;
        let prekey = SignedPrekey::new(5, vec![0xFB; 32], vec![7; 64]);
        let payload = wire_message(SIGNED_PREKEY_CONTEXT, &prekey);
        let (context, json) = payload.split_at(SIGNED_PREKEY_CONTEXT.len());
        assert_eq!(context, SIGNED_PREKEY_CONTEXT);
        assert_eq!(
            std::str::from_utf8(json).unwrap(),
            format!(r#"{{"key_id":5,"public_key":"{}"}}"#, base64::engine::general_purpose::STANDARD.encode([0xFB; 32]))
        );
        // Same bytes as the wire type serialized without its signature.
        let mut value = serde_json::to_value(&prekey).unwrap();
        value.as_object_mut().unwrap().remove("signature");
        assert_eq!(json, crate::canonical::canonical_json(&value).unwrap());
    }

    struct Fixture {
        user: UserIdentity,
        devices: Vec<(DeviceId, DeviceIdentity)>,
    }

    fn fixture() -> Fixture {
        let mut rng = rng();
        let user = UserIdentity::generate(&mut rng);
        let devices = ["PHONE", "LAPTOP", "TABLET"].into_iter().map(|id| (dev(id), DeviceIdentity::generate(&mut rng))).collect();
        Fixture { user, devices }
    }

    impl Fixture {
        fn entries(&self, n: usize) -> Vec<DeviceListEntry> {
            self.devices.iter().take(n).map(|(id, d)| d.list_entry(id)).collect()
        }
    }

    #[test]
    fn device_lists_verify() {
        let f = fixture();
        let list = f.user.sign_device_list(&alice(), 1, f.entries(2)).unwrap();
        // Sorted on signing.
        assert_eq!(list.devices[0].device_id, dev("LAPTOP"));
        let v = verify_device_list(&list, &alice(), None, None).unwrap();
        assert_eq!(v.version(), 1);
        assert_eq!(v.identity_key(), &f.user.public());
        assert_eq!(v.devices().len(), 2);
        assert!(v.device(&dev("PHONE")).is_some());
        assert!(v.device(&dev("TABLET")).is_none());
        let pinned = f.user.public();
        let again = verify_device_list(&list, &alice(), Some(&pinned), Some(&v.checkpoint())).unwrap();
        assert_eq!(again, v);
        assert_eq!(DeviceListCheckpoint::of(&list), v.checkpoint());

        // Device keys are checked against the list.
        let (phone_id, phone) = &f.devices[0];
        v.check_device_keys(&phone.device_keys(&alice(), phone_id)).unwrap();
        let (tablet_id, tablet) = &f.devices[2];
        assert_eq!(
            v.check_device_keys(&tablet.device_keys(&alice(), tablet_id)),
            Err(DeviceListError::UnlistedDevice(dev("TABLET")))
        );
        assert_eq!(v.check_device_keys(&tablet.device_keys(&alice(), phone_id)), Err(DeviceListError::KeyMismatch(dev("PHONE"))));
        let bob = UserId::parse("@bob:example.org").unwrap();
        assert!(matches!(v.check_device_keys(&phone.device_keys(&bob, phone_id)), Err(DeviceListError::WrongUser { .. })));
    }

    #[test]
    fn device_list_rejections() {
        let f = fixture();
        let pinned = f.user.public();
        let v1 = f.user.sign_device_list(&alice(), 1, f.entries(2)).unwrap();
        let seen = verify_device_list(&v1, &alice(), Some(&pinned), None).unwrap().checkpoint();

        // Another user.
        let bob = UserId::parse("@bob:example.org").unwrap();
        assert!(matches!(verify_device_list(&v1, &bob, None, None), Err(DeviceListError::WrongUser { .. })));
        // Bad signature.
        let mut bad = v1.clone();
        bad.version = 2;
        assert_eq!(verify_device_list(&bad, &alice(), None, None), Err(DeviceListError::BadSignature));
        // Another identity: distinct error, only when validly signed.
        let mallory = UserIdentity::generate(&mut rand::rngs::StdRng::seed_from_u64(99));
        let other = mallory.sign_device_list(&alice(), 2, f.entries(3)).unwrap();
        assert_eq!(verify_device_list(&other, &alice(), None, Some(&seen)).unwrap().identity_key(), &mallory.public());
        assert_eq!(
            verify_device_list(&other, &alice(), Some(&pinned), Some(&seen)),
            Err(DeviceListError::IdentityChanged { pinned: Box::new(pinned), found: Box::new(mallory.public()) })
        );
        let mut forged = other.clone();
        forged.signature = v1.signature.clone();
        assert_eq!(verify_device_list(&forged, &alice(), Some(&pinned), None), Err(DeviceListError::BadSignature));
        // Rollback.
        let v0 = f.user.sign_device_list(&alice(), 0, f.entries(1)).unwrap();
        assert_eq!(
            verify_device_list(&v0, &alice(), Some(&pinned), Some(&seen)),
            Err(DeviceListError::Rollback { last_seen: 1, found: 0 })
        );
        // Equivocation.
        let v1b = f.user.sign_device_list(&alice(), 1, f.entries(3)).unwrap();
        assert_eq!(
            verify_device_list(&v1b, &alice(), Some(&pinned), Some(&seen)),
            Err(DeviceListError::Equivocation { version: 1 })
        );
        // Newer is fine.
        let v2 = f.user.sign_device_list(&alice(), 2, f.entries(3)).unwrap();
        verify_device_list(&v2, &alice(), Some(&pinned), Some(&seen)).unwrap();
        // Unsorted and duplicate entries, even when validly signed.
        let resign = |devices: Vec<DeviceListEntry>| {
            let mut list = SignedDeviceList::new(alice(), 5, pinned.as_bytes().to_vec(), devices, Vec::new());
            list.signature = f.user.key.sign_bytes(&wire_message(DEVICE_LIST_CONTEXT, &list)).to_vec().into();
            list
        };
        let mut entries = f.entries(2);
        entries.sort_by(|a, b| b.device_id.cmp(&a.device_id));
        assert_eq!(verify_device_list(&resign(entries), &alice(), None, None), Err(DeviceListError::Unsorted));
        let mut entries = f.entries(1);
        entries.push(entries[0].clone());
        assert_eq!(
            verify_device_list(&resign(entries.clone()), &alice(), None, None),
            Err(DeviceListError::DuplicateDevice(dev("PHONE")))
        );
        assert_eq!(f.user.sign_device_list(&alice(), 5, entries), Err(DeviceListError::DuplicateDevice(dev("PHONE"))));
        // Bad key sizes.
        let mut entries = f.entries(1);
        entries[0].signing_key.0.push(0);
        assert!(matches!(verify_device_list(&resign(entries.clone()), &alice(), None, None), Err(DeviceListError::Malformed(_))));
        assert!(matches!(f.user.sign_device_list(&alice(), 5, entries), Err(DeviceListError::Malformed(_))));
        let mut entries = f.entries(1);
        entries[0].identity_key.0.truncate(31);
        assert!(matches!(verify_device_list(&resign(entries), &alice(), None, None), Err(DeviceListError::Malformed(_))));
        let mut short = v1.clone();
        short.identity_key.0.truncate(31);
        assert!(matches!(verify_device_list(&short, &alice(), None, None), Err(DeviceListError::Malformed(_))));
        let mut short = v1;
        short.signature.0.truncate(63);
        assert!(matches!(verify_device_list(&short, &alice(), None, None), Err(DeviceListError::Malformed(_))));
    }

    #[test]
    fn device_list_diff() {
        let f = fixture();
        let old = f.user.sign_device_list(&alice(), 1, f.entries(2)).unwrap();
        let old = verify_device_list(&old, &alice(), None, None).unwrap();
        let mut entries = f.entries(3);
        entries.retain(|e| e.device_id != dev("LAPTOP"));
        let new = f.user.sign_device_list(&alice(), 2, entries).unwrap();
        let new = verify_device_list(&new, &alice(), None, None).unwrap();
        let diff = DeviceListDiff::between(&old, &new);
        assert_eq!(diff.added.iter().map(|d| d.device_id().as_str()).collect::<Vec<_>>(), ["TABLET"]);
        assert_eq!(diff.removed.iter().map(|d| d.device_id().as_str()).collect::<Vec<_>>(), ["LAPTOP"]);
        assert!(diff.changed.is_empty());
        assert!(DeviceListDiff::between(&new, &new).is_empty());
        let back = DeviceListDiff::between(&new, &old);
        assert_eq!(back.added, diff.removed);
        assert_eq!(back.removed, diff.added);

        // Same device id, new keys.
        let (_, tablet) = &f.devices[2];
        let swapped = vec![f.devices[0].1.list_entry(&dev("PHONE")), tablet.list_entry(&dev("LAPTOP"))];
        let swapped = f.user.sign_device_list(&alice(), 3, swapped).unwrap();
        let swapped = verify_device_list(&swapped, &alice(), None, None).unwrap();
        let diff = DeviceListDiff::between(&old, &swapped);
        assert!(diff.added.is_empty() && diff.removed.is_empty());
        assert_eq!(diff.changed.len(), 1);
        assert_eq!(diff.changed[0].1.identity_key(), &tablet.identity_public());
    }

    /// Fixed seeds of `spec/vectors/identity_v1.json`.
    type VectorInputs = ([u8; 32], Vec<(&'static str, [u8; 64])>, [u8; 32]);

    fn vector_inputs() -> VectorInputs {
        let recovery: [u8; 32] = std::array::from_fn(|i| i as u8);
        let device = |base: u8| -> [u8; 64] { std::array::from_fn(|i| base.wrapping_add(i as u8)) };
        let prekey_secret: [u8; 32] = std::array::from_fn(|i| 0xc0 ^ i as u8);
        (recovery, vec![("PHONE", device(0x40)), ("LAPTOP", device(0x80))], prekey_secret)
    }

    fn generate_identity_vectors() -> serde_json::Value {
        use serde_json::json;
        let (recovery, device_seeds, prekey_secret) = vector_inputs();
        let user = UserIdentity::from_recovery_seed(&recovery);
        let user_id = alice();
        let devices: Vec<(DeviceId, DeviceIdentity)> =
            device_seeds.iter().map(|(id, seed)| (dev(id), DeviceIdentity::from_bytes(seed))).collect();
        let (phone_id, phone) = &devices[0];

        let keys = phone.device_keys(&user_id, phone_id);
        verify_device_keys(&keys).unwrap();
        let prekey_secret = StaticSecret::from(prekey_secret);
        let prekey = phone.sign_prekey(1, &x25519_dalek::PublicKey::from(&prekey_secret));
        verify_signed_prekey(&prekey, &phone.signing_public()).unwrap();
        let list = user.sign_device_list(&user_id, 1, devices.iter().map(|(id, d)| d.list_entry(id)).collect()).unwrap();
        let verified = verify_device_list(&list, &user_id, Some(&user.public()), None).unwrap();

        json!({
            "description": "Parley device identity v1. Signatures are ed25519 over CONTEXT || canonical JSON of the object without its signature field; signed_bytes_hex is exactly those bytes. The user identity's ed25519 seed is HKDF-SHA256(salt=none, ikm=recovery_seed, info=\"parley user identity v1\"). A device's local bytes are its ed25519 seed then its x25519 secret. checkpoint_digest_hex is SHA-256 of the device list's signed bytes.",
            "user": {
                "user_id": user_id,
                "recovery_seed_hex": hex(&recovery),
                "ed25519_seed_hex": hex(user.to_bytes().as_ref()),
                "identity_public_hex": hex(user.public().as_bytes()),
            },
            "devices": devices.iter().map(|(id, d)| json!({
                "device_id": id,
                "local_bytes_hex": hex(d.to_bytes().as_ref()),
                "signing_public_hex": hex(d.signing_public().as_bytes()),
                "identity_public_hex": hex(d.identity_public().as_bytes()),
            })).collect::<Vec<_>>(),
            "device_keys": {
                "object": keys,
                "signed_bytes_hex": hex(&wire_message(DEVICE_KEYS_CONTEXT, &keys)),
            },
            "signed_prekey": {
                "device_id": phone_id,
                "x25519_secret_hex": hex(prekey_secret.as_bytes()),
                "object": prekey,
                "signed_bytes_hex": hex(&wire_message(SIGNED_PREKEY_CONTEXT, &prekey)),
            },
            "device_list": {
                "object": list,
                "signed_bytes_hex": hex(&wire_message(DEVICE_LIST_CONTEXT, &list)),
                "checkpoint_digest_hex": hex(&verified.checkpoint().digest),
            },
        })
    }

    #[test]
    fn identity_vectors() {
        let generated = generate_identity_vectors();
        check_vector_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/identity_v1.json"), &generated);
        // The stored objects verify as they are.
        let keys: DeviceKeys = serde_json::from_value(generated["device_keys"]["object"].clone()).unwrap();
        verify_device_keys(&keys).unwrap();
        let list: SignedDeviceList = serde_json::from_value(generated["device_list"]["object"].clone()).unwrap();
        verify_device_list(&list, &alice(), None, None).unwrap();
    }

    /// A signed list, its JSON, and the key that signed it, for the property tests.
    fn signed_fixture() -> (SignedDeviceList, PublicKey) {
        let f = fixture();
        (f.user.sign_device_list(&alice(), 42, f.entries(3)).unwrap(), f.user.public())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any byte of the serialized list, altered: either it no longer parses, or it parses
        /// to the same list, or verification rejects it.
        #[test]
        fn altered_json_bytes_are_rejected(index in any::<prop::sample::Index>(), mask in 1u8..=255) {
            let (list, pinned) = signed_fixture();
            let mut bytes = serde_json::to_vec(&list).unwrap();
            let i = index.index(bytes.len());
            bytes[i] ^= mask;
            if let Ok(altered) = serde_json::from_slice::<SignedDeviceList>(&bytes) {
                prop_assume!(altered != list);
                prop_assert!(verify_device_list(&altered, &alice(), None, None).is_err());
                prop_assert!(verify_device_list(&altered, &alice(), Some(&pinned), None).is_err());
            }
        }

        /// Any byte of any field, altered: rejected.
        #[test]
        fn altered_fields_are_rejected(field in 0usize..13, index in any::<prop::sample::Index>(), mask in 1u8..=255) {
            let (mut list, _) = signed_fixture();
            fn flip(bytes: &mut [u8], index: &prop::sample::Index, mask: u8) {
                let i = index.index(bytes.len());
                bytes[i] ^= mask;
            }
            /// Swaps one character of `id` for another character of `alphabet`.
            fn flip_id(id: &str, alphabet: &[u8], index: &prop::sample::Index, mask: u8) -> String {
                let mut bytes = id.as_bytes().to_vec();
                let i = index.index(bytes.len());
                let current = alphabet.iter().position(|&c| c == bytes[i]).unwrap();
                bytes[i] = alphabet[(current + 1 + mask as usize % (alphabet.len() - 1)) % alphabet.len()];
                String::from_utf8(bytes).unwrap()
            }
            const LOCALPART: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._=-";
            const DEVICE: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
            match field {
                0 => list.version ^= 1 << (mask % 64),
                1 => flip(&mut list.identity_key.0, &index, mask),
                2 => flip(&mut list.signature.0, &index, mask),
                3 => {
                    let local = flip_id(list.user_id.localpart(), LOCALPART, &index, mask);
                    list.user_id = UserId::parse(&format!("@{local}:example.org")).unwrap();
                }
                n => {
                    let entry = &mut list.devices[(n - 4) / 3];
                    match (n - 4) % 3 {
                        0 => entry.device_id = DeviceId::parse(&flip_id(entry.device_id.as_str(), DEVICE, &index, mask)).unwrap(),
                        1 => flip(&mut entry.signing_key.0, &index, mask),
                        _ => flip(&mut entry.identity_key.0, &index, mask),
                    }
                }
            }
            let user = list.user_id.clone();
            prop_assert!(verify_device_list(&list, &user, None, None).is_err());
        }
    }
}
