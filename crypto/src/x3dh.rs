//! X3DH key agreement over Curve25519, as specified by Signal: *The X3DH Key Agreement
//! Protocol*, revision 1, Marlinspike & Perrin, 2016 (<https://signal.org/docs/specifications/x3dh/>).
//!
//! Parley's parameters (`spec/e2ee.md`, section 4): curve X25519, hash SHA-256, info `"Parley X3DH v1"`,
//! and `Encode(PK)` is the raw 32-byte little-endian u-coordinate (the curve is fixed by the
//! protocol version, so there is no curve-type byte).
//!
//! The initiator ("Alice") fetches the responder's ("Bob's") [`PrekeyBundle`], checks the
//! signatures of the signed prekey (and of the last-resort prekey, if any) against the bundle's
//! ed25519 device signing key, makes an ephemeral key `EK_A` and computes
//!
//! ```text
//! DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   [DH4 = DH(EK_A, OPK_B)]
//! SK  = HKDF-SHA256(salt = 32 zero bytes, ikm = 32×0xFF || DH1 || DH2 || DH3 [|| DH4],
//!                   info = "Parley X3DH v1"), 32 bytes
//! AD  = IK_A || IK_B      (64 bytes)
//! ```
//!
//! `OPK_B` is the one-time prekey when the bundle has one, else the (signed) last-resort prekey
//! when it has one, else there is no DH4 (3-DH, allowed unless [`PrekeyPolicy::RequireOneTime`]).
//! Peers' public keys are parsed by [`crate::keys`]: canonically encoded (32 bytes, top bit
//! clear, below 2^255 - 19) and not of small order. A small-order key is [`X3dhError::WeakKey`]
//! when it is parsed; every DH output is also checked to be non-zero.
//! Prekey signatures are checked by [`crate::identity::verify_signed_prekey`].
//!
//! Alice sends Bob an [`InitialHeader`] naming `IK_A`, `EK_A` and which of Bob's prekeys she
//! used; Bob looks the secrets up, runs [`respond`] and gets the same `SK` and `AD`. Bob must
//! delete a one-time prekey secret once a session built on it has decrypted its first message.
//!
//! What this module does *not* check: the bundle's [`DeviceKeys`](parley_spec::v1::keys::DeviceKeys)
//! self-signature and its membership in the user's signed device list (see `crate::identity`),
//! and, on the responder side, that `IK_A` belongs to the claimed sender. Callers do both.
//!
//! `SK` and `AD` feed the Double Ratchet in [`crate::ratchet`].

use crate::identity::{verify_signed_prekey, Field, IdentityError};
use crate::keys::{parse_ed25519_public, parse_x25519_public, KeyError};
use parley_spec::v1::keys::{PrekeyBundle, SignedPrekey};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use x25519_dalek::{PublicKey as X25519PublicKey, StaticSecret};

/// Length of every X25519 key, DH output and derived key here.
pub const KEY_LEN: usize = 32;
/// HKDF info string of the X3DH key derivation.
pub const X3DH_INFO: &[u8] = b"Parley X3DH v1";
/// Length of the encoded [`AssociatedData`]: `IK_A || IK_B`.
pub const AD_LEN: usize = 2 * KEY_LEN;

/// Whether a fault lies with the input (from a peer, a server or the network) or with the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input from a peer or a server: malformed, forged, replayed or stale. Drop it (and
    /// perhaps report it); retrying does not help.
    BadInput,
    /// API misuse: the caller passed inconsistent arguments or a corrupt stored state.
    Misuse,
}

/// Why an X3DH step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X3dhError {
    /// A key has the wrong size or is not a valid key (bad input).
    #[error("malformed {0}: wrong size or not a valid key")]
    MalformedKey(&'static str),
    /// A signature is malformed or does not verify (bad input).
    #[error("the {0} signature does not verify")]
    BadSignature(&'static str),
    /// The bundle has neither a one-time nor a last-resort prekey, and the policy requires one
    /// (bad input).
    #[error("the bundle has no one-time or last-resort prekey")]
    NoOneTimePrekey,
    /// A peer sent a low-order (small-order) public key: refused when it is parsed, or as a
    /// Diffie-Hellman output that is all zero (bad input).
    #[error("a public key has low order (all-zero Diffie-Hellman output)")]
    WeakKey,
    /// An initial header has the wrong length or a bad field (bad input).
    #[error("malformed X3DH initial header")]
    MalformedHeader,
    /// The caller passed a one-time prekey secret the header does not name, or none when it
    /// names one (misuse).
    #[error("the one-time prekey secret passed does not match the initial header")]
    PrekeyMismatch,
}

impl X3dhError {
    /// Whether this is bad input or API misuse.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::PrekeyMismatch => ErrorKind::Misuse,
            Self::MalformedKey(_) | Self::BadSignature(_) | Self::NoOneTimePrekey | Self::WeakKey | Self::MalformedHeader => {
                ErrorKind::BadInput
            }
        }
    }
}

/// Whether [`initiate`] accepts a bundle with neither a one-time nor a last-resort prekey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrekeyPolicy {
    /// Fall back to 3-DH (no DH4) when the bundle has neither (the Signal behaviour).
    #[default]
    AllowThreeDh,
    /// Fail with [`X3dhError::NoOneTimePrekey`] when the bundle has neither.
    RequireOneTime,
}

/// Which of the responder's prekeys was used as the DH4 input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrekeyRef {
    /// A one-time prekey: the responder deletes its secret once the session is established.
    OneTime(u32),
    /// The last-resort prekey: the responder keeps its secret.
    LastResort(u32),
}

impl PrekeyRef {
    /// The prekey's `key_id`.
    pub fn key_id(&self) -> u32 {
        match *self {
            Self::OneTime(id) | Self::LastResort(id) => id,
        }
    }
}

/// What the initiator tells the responder so it can run its half of X3DH.
///
/// Encoding ([`InitialHeader::LEN`] = 73 bytes, integers big-endian):
/// `IK_A (32) || EK_A (32) || signed_prekey_id (u32) || prekey kind (u8: 0 none, 1 one-time,
/// 2 last-resort) || prekey id (u32, 0 when kind is 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialHeader {
    /// The initiator's identity key `IK_A`.
    pub identity_key: X25519PublicKey,
    /// The initiator's ephemeral key `EK_A`.
    pub ephemeral_key: X25519PublicKey,
    /// The `key_id` of the responder's signed prekey that was used.
    pub signed_prekey_id: u32,
    /// The one-time or last-resort prekey used as DH4 input, if any.
    pub one_time_prekey: Option<PrekeyRef>,
}

impl InitialHeader {
    /// Length of the encoding.
    pub const LEN: usize = 2 * KEY_LEN + 4 + 1 + 4;

    /// The fixed binary encoding.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(self.identity_key.as_bytes());
        out[32..64].copy_from_slice(self.ephemeral_key.as_bytes());
        out[64..68].copy_from_slice(&self.signed_prekey_id.to_be_bytes());
        let (kind, id) = match self.one_time_prekey {
            None => (0u8, 0u32),
            Some(PrekeyRef::OneTime(id)) => (1, id),
            Some(PrekeyRef::LastResort(id)) => (2, id),
        };
        out[68] = kind;
        out[69..73].copy_from_slice(&id.to_be_bytes());
        out
    }

    /// Parses exactly [`InitialHeader::LEN`] bytes; rejects non-canonical encodings
    /// ([`X3dhError::MalformedHeader`]) and small-order keys ([`X3dhError::WeakKey`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, X3dhError> {
        let bytes: &[u8; Self::LEN] = bytes.try_into().map_err(|_| X3dhError::MalformedHeader)?;
        let id = u32::from_be_bytes([bytes[69], bytes[70], bytes[71], bytes[72]]);
        let one_time_prekey = match bytes[68] {
            0 if id == 0 => None,
            1 => Some(PrekeyRef::OneTime(id)),
            2 => Some(PrekeyRef::LastResort(id)),
            _ => return Err(X3dhError::MalformedHeader),
        };
        let key = |range: std::ops::Range<usize>| {
            parse_x25519_public(&bytes[range]).map_err(|e| match e {
                KeyError::SmallOrder => X3dhError::WeakKey,
                _ => X3dhError::MalformedHeader,
            })
        };
        Ok(Self {
            identity_key: key(0..32)?,
            ephemeral_key: key(32..64)?,
            signed_prekey_id: u32::from_be_bytes([bytes[64], bytes[65], bytes[66], bytes[67]]),
            one_time_prekey,
        })
    }
}

/// The X3DH shared secret `SK` (32 bytes): zeroized on drop, compared in constant time, never
/// printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SharedKey([u8; KEY_LEN]);

impl SharedKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key bytes. Handle with care.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl ConstantTimeEq for SharedKey {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for SharedKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SharedKey {}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(<redacted>)")
    }
}

/// The X3DH associated data `AD = IK_A || IK_B`: the initiator's then the responder's identity
/// key. Public; every ratchet message authenticates it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AssociatedData([u8; AD_LEN]);

impl AssociatedData {
    /// Builds `IK_A || IK_B`.
    pub fn new(initiator_identity: &X25519PublicKey, responder_identity: &X25519PublicKey) -> Self {
        let mut out = [0u8; AD_LEN];
        out[..KEY_LEN].copy_from_slice(initiator_identity.as_bytes());
        out[KEY_LEN..].copy_from_slice(responder_identity.as_bytes());
        Self(out)
    }

    /// Wraps the 64 encoded bytes.
    pub fn from_bytes(bytes: [u8; AD_LEN]) -> Self {
        Self(bytes)
    }

    /// The 64 encoded bytes.
    pub fn as_bytes(&self) -> &[u8; AD_LEN] {
        &self.0
    }

    /// `IK_A`.
    pub fn initiator_identity(&self) -> X25519PublicKey {
        X25519PublicKey::from(take32(&self.0[..KEY_LEN]))
    }

    /// `IK_B`.
    pub fn responder_identity(&self) -> X25519PublicKey {
        X25519PublicKey::from(take32(&self.0[KEY_LEN..]))
    }
}

impl std::fmt::Debug for AssociatedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AssociatedData(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// The initiator's result: what to send, and what to start the ratchet with
/// (`crate::ratchet::Session::initiate`).
pub struct Initiated {
    header: InitialHeader,
    shared_key: SharedKey,
    associated_data: AssociatedData,
    remote_signed_prekey: X25519PublicKey,
}

impl Initiated {
    /// The header the responder needs (the ratchet puts it in front of every message until the
    /// responder answers).
    pub fn header(&self) -> &InitialHeader {
        &self.header
    }

    /// `SK`.
    pub fn shared_key(&self) -> &SharedKey {
        &self.shared_key
    }

    /// `AD = IK_A || IK_B`.
    pub fn associated_data(&self) -> &AssociatedData {
        &self.associated_data
    }

    /// The responder's signed prekey: the initiator's first ratchet public key of the peer.
    pub fn remote_signed_prekey(&self) -> &X25519PublicKey {
        &self.remote_signed_prekey
    }
}

impl std::fmt::Debug for Initiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiated")
            .field("header", &self.header)
            .field("associated_data", &self.associated_data)
            .finish_non_exhaustive()
    }
}

/// The responder's result: what to start the ratchet with (`crate::ratchet::Session::accept`).
pub struct Responded {
    header: InitialHeader,
    shared_key: SharedKey,
    associated_data: AssociatedData,
    signed_prekey: StaticSecret,
}

impl Responded {
    /// The header this came from.
    pub fn header(&self) -> &InitialHeader {
        &self.header
    }

    /// `SK`.
    pub fn shared_key(&self) -> &SharedKey {
        &self.shared_key
    }

    /// `AD = IK_A || IK_B`.
    pub fn associated_data(&self) -> &AssociatedData {
        &self.associated_data
    }

    /// `IK_A`: check that it belongs to the claimed sender's device.
    pub fn remote_identity_key(&self) -> X25519PublicKey {
        self.header.identity_key
    }

    /// The one-time (delete it once the session works) or last-resort prekey used, if any.
    pub fn used_prekey(&self) -> Option<PrekeyRef> {
        self.header.one_time_prekey
    }

    /// The signed prekey secret: the responder's first ratchet key pair.
    pub(crate) fn signed_prekey(&self) -> &StaticSecret {
        &self.signed_prekey
    }
}

impl std::fmt::Debug for Responded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responded")
            .field("header", &self.header)
            .field("associated_data", &self.associated_data)
            .finish_non_exhaustive()
    }
}

/// X25519 Diffie-Hellman (RFC 7748, via x25519-dalek), rejecting an all-zero output, which
/// means `public` has low order.
pub fn diffie_hellman(secret: &StaticSecret, public: &X25519PublicKey) -> Result<Zeroizing<[u8; KEY_LEN]>, X3dhError> {
    let shared = secret.diffie_hellman(public);
    if !shared.was_contributory() {
        return Err(X3dhError::WeakKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Parses a peer's X25519 key with [`parse_x25519_public`]: a small-order key is
/// [`X3dhError::WeakKey`], any other refusal [`X3dhError::MalformedKey`] naming `what`.
fn peer_x25519(bytes: &[u8], what: &'static str) -> Result<X25519PublicKey, X3dhError> {
    parse_x25519_public(bytes).map_err(|e| match e {
        KeyError::SmallOrder => X3dhError::WeakKey,
        _ => X3dhError::MalformedKey(what),
    })
}

/// Checks a signed (or last-resort) prekey with [`verify_signed_prekey`], naming it `what` in
/// this module's errors.
fn verify_prekey(
    prekey: &SignedPrekey,
    signing_key: &crate::PublicKey,
    what: &'static str,
) -> Result<X25519PublicKey, X3dhError> {
    verify_signed_prekey(prekey, signing_key).map_err(|e| match e {
        IdentityError::BadSignature | IdentityError::Malformed(Field::PrekeySignature) => X3dhError::BadSignature(what),
        IdentityError::Malformed(_) => X3dhError::MalformedKey(what),
    })
}

/// The initiator's half: checks `bundle` (sizes, prekey signatures), makes an ephemeral key and
/// derives `SK` and `AD`. `own_identity` is the initiator device's X25519 identity secret.
pub fn initiate(
    rng: &mut (impl RngCore + CryptoRng),
    own_identity: &StaticSecret,
    bundle: &PrekeyBundle,
    policy: PrekeyPolicy,
) -> Result<Initiated, X3dhError> {
    let signing_key =
        parse_ed25519_public(&bundle.device_keys.signing_key.0).map_err(|_| X3dhError::MalformedKey("device signing key"))?;
    let identity_b = peer_x25519(&bundle.device_keys.identity_key.0, "identity key")?;
    let signed_prekey = verify_prekey(&bundle.signed_prekey, &signing_key, "signed prekey")?;
    let last_resort = match &bundle.last_resort_prekey {
        Some(p) => Some((p.key_id, verify_prekey(p, &signing_key, "last-resort prekey")?)),
        None => None,
    };
    let one_time = match &bundle.one_time_prekey {
        Some(p) => Some((PrekeyRef::OneTime(p.key_id), peer_x25519(&p.public_key.0, "one-time prekey")?)),
        None => last_resort.map(|(id, key)| (PrekeyRef::LastResort(id), key)),
    };
    if one_time.is_none() && policy == PrekeyPolicy::RequireOneTime {
        return Err(X3dhError::NoOneTimePrekey);
    }

    let ephemeral = StaticSecret::random_from_rng(rng);
    let identity_a = X25519PublicKey::from(own_identity);
    let mut dhs = vec![
        diffie_hellman(own_identity, &signed_prekey)?,
        diffie_hellman(&ephemeral, &identity_b)?,
        diffie_hellman(&ephemeral, &signed_prekey)?,
    ];
    if let Some((_, key)) = &one_time {
        dhs.push(diffie_hellman(&ephemeral, key)?);
    }
    Ok(Initiated {
        header: InitialHeader {
            identity_key: identity_a,
            ephemeral_key: X25519PublicKey::from(&ephemeral),
            signed_prekey_id: bundle.signed_prekey.key_id,
            one_time_prekey: one_time.map(|(r, _)| r),
        },
        shared_key: derive_shared_key(&dhs),
        associated_data: AssociatedData::new(&identity_a, &identity_b),
        remote_signed_prekey: signed_prekey,
    })
}

/// The responder's half. The caller looks up the secrets the `header` names: its identity
/// secret, the signed prekey `header.signed_prekey_id`, and the one-time or last-resort prekey
/// `header.one_time_prekey` (exactly when the header names one). After the first message of the
/// resulting session decrypts, the caller deletes a one-time prekey secret.
pub fn respond(
    own_identity: &StaticSecret,
    signed_prekey: &StaticSecret,
    one_time_prekey: Option<&StaticSecret>,
    header: &InitialHeader,
) -> Result<Responded, X3dhError> {
    if one_time_prekey.is_some() != header.one_time_prekey.is_some() {
        return Err(X3dhError::PrekeyMismatch);
    }
    let mut dhs = vec![
        diffie_hellman(signed_prekey, &header.identity_key)?,
        diffie_hellman(own_identity, &header.ephemeral_key)?,
        diffie_hellman(signed_prekey, &header.ephemeral_key)?,
    ];
    if let Some(secret) = one_time_prekey {
        dhs.push(diffie_hellman(secret, &header.ephemeral_key)?);
    }
    Ok(Responded {
        header: *header,
        shared_key: derive_shared_key(&dhs),
        associated_data: AssociatedData::new(&header.identity_key, &X25519PublicKey::from(own_identity)),
        signed_prekey: signed_prekey.clone(),
    })
}

/// `SK = HKDF-SHA256(salt = 0^32, ikm = 0xFF^32 || DH1 || ... , info = X3DH_INFO)`.
fn derive_shared_key(dhs: &[Zeroizing<[u8; KEY_LEN]>]) -> SharedKey {
    let mut ikm = Zeroizing::new(Vec::with_capacity(KEY_LEN * (1 + dhs.len())));
    ikm.extend_from_slice(&[0xFF; KEY_LEN]);
    for dh in dhs {
        ikm.extend_from_slice(dh.as_ref());
    }
    let mut sk = SharedKey([0u8; KEY_LEN]);
    hkdf::Hkdf::<Sha256>::new(Some(&[0u8; KEY_LEN]), &ikm)
        .expand(X3DH_INFO, &mut sk.0)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    sk
}

fn take32(bytes: &[u8]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(bytes);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::DeviceIdentity;
    use parley_spec::v1::keys::{DeviceKeys, OneTimePrekey};
    use parley_spec::{DeviceId, UserId};
    use rand::SeedableRng as _;

    /// A device's X3DH secrets and the bundle it would publish (shared with the ratchet tests).
    pub(crate) struct TestDevice {
        pub identity: StaticSecret,
        /// Signs the prekeys; its identity secret is `identity`.
        pub device: DeviceIdentity,
        pub signed_prekey: StaticSecret,
        pub one_time: StaticSecret,
        pub last_resort: StaticSecret,
    }

    pub(crate) const SPK_ID: u32 = 7;
    pub(crate) const OTK_ID: u32 = 100;
    pub(crate) const LAST_RESORT_ID: u32 = 9;

    impl TestDevice {
        pub(crate) fn new(rng: &mut (impl RngCore + CryptoRng)) -> Self {
            let mut bytes = Zeroizing::new([0u8; 64]);
            rng.fill_bytes(&mut bytes[..32]);
            let identity = StaticSecret::random_from_rng(&mut *rng);
            bytes[32..].copy_from_slice(identity.as_bytes());
            Self {
                identity,
                device: DeviceIdentity::from_bytes(&bytes),
                signed_prekey: StaticSecret::random_from_rng(&mut *rng),
                one_time: StaticSecret::random_from_rng(&mut *rng),
                last_resort: StaticSecret::random_from_rng(&mut *rng),
            }
        }

        pub(crate) fn bundle(&self, one_time: bool, last_resort: bool) -> PrekeyBundle {
            let device_keys = DeviceKeys::new(
                UserId::parse("@bob:example.org").unwrap(),
                DeviceId::parse("BOBPHONE").unwrap(),
                self.device.signing_public().as_bytes().to_vec(),
                X25519PublicKey::from(&self.identity).as_bytes().to_vec(),
                vec![0; 64],
            );
            PrekeyBundle::new(
                device_keys,
                self.device.sign_prekey(SPK_ID, &X25519PublicKey::from(&self.signed_prekey)),
                one_time.then(|| OneTimePrekey::new(OTK_ID, X25519PublicKey::from(&self.one_time).as_bytes().to_vec())),
                last_resort.then(|| self.device.sign_prekey(LAST_RESORT_ID, &X25519PublicKey::from(&self.last_resort))),
            )
        }

        pub(crate) fn one_time_secret(&self, r: Option<PrekeyRef>) -> Option<&StaticSecret> {
            match r {
                None => None,
                Some(PrekeyRef::OneTime(OTK_ID)) => Some(&self.one_time),
                Some(PrekeyRef::LastResort(LAST_RESORT_ID)) => Some(&self.last_resort),
                Some(other) => panic!("unexpected prekey {other:?}"),
            }
        }
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    fn hex32(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).unwrap(), 16).unwrap();
        }
        out
    }

    #[test]
    fn rfc7748_section_6_1_diffie_hellman() {
        let a = StaticSecret::from(hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let b = StaticSecret::from(hex32("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
        let a_pub = X25519PublicKey::from(&a);
        let b_pub = X25519PublicKey::from(&b);
        assert_eq!(a_pub.as_bytes(), &hex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        assert_eq!(b_pub.as_bytes(), &hex32("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
        let k = hex32("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(*diffie_hellman(&a, &b_pub).unwrap(), k);
        assert_eq!(*diffie_hellman(&b, &a_pub).unwrap(), k);
    }

    #[test]
    fn low_order_points_are_rejected() {
        let secret = StaticSecret::random_from_rng(rng());
        // 0 and 1 are low-order u-coordinates.
        for u in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert_eq!(diffie_hellman(&secret, &X25519PublicKey::from(u)).unwrap_err(), X3dhError::WeakKey);
        }
    }

    fn agree(one_time: bool, last_resort: bool, expected: Option<PrekeyRef>) {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let out = initiate(&mut rng, &alice, &bob.bundle(one_time, last_resort), PrekeyPolicy::AllowThreeDh).unwrap();
        assert_eq!(out.header().one_time_prekey, expected);
        assert_eq!(out.header().signed_prekey_id, SPK_ID);
        let header = InitialHeader::from_bytes(&out.header().to_bytes()).unwrap();
        assert_eq!(&header, out.header());
        let back = respond(&bob.identity, &bob.signed_prekey, bob.one_time_secret(header.one_time_prekey), &header).unwrap();
        assert_eq!(back.shared_key(), out.shared_key());
        assert_eq!(back.associated_data(), out.associated_data());
        assert_eq!(back.used_prekey(), expected);
        assert_eq!(back.remote_identity_key(), X25519PublicKey::from(&alice));
        assert_eq!(out.associated_data().initiator_identity(), X25519PublicKey::from(&alice));
        assert_eq!(out.associated_data().responder_identity(), X25519PublicKey::from(&bob.identity));
        assert_eq!(out.remote_signed_prekey(), &X25519PublicKey::from(&bob.signed_prekey));
        // A different one-time secret gives a different key.
        if header.one_time_prekey.is_some() {
            let wrong = respond(&bob.identity, &bob.signed_prekey, Some(&bob.identity), &header).unwrap();
            assert_ne!(wrong.shared_key(), out.shared_key());
        }
        // Secrets stay out of Debug output.
        let debug = format!("{out:?} {back:?} {:?}", out.shared_key());
        assert!(!debug.contains(&format!("{:?}", out.shared_key().as_bytes())));
        assert!(debug.contains("redacted") || !debug.contains("shared_key"));
    }

    #[test]
    fn both_sides_agree_with_one_time_prekey() {
        agree(true, true, Some(PrekeyRef::OneTime(OTK_ID)));
        agree(true, false, Some(PrekeyRef::OneTime(OTK_ID)));
    }

    #[test]
    fn both_sides_agree_with_last_resort_prekey() {
        agree(false, true, Some(PrekeyRef::LastResort(LAST_RESORT_ID)));
    }

    #[test]
    fn both_sides_agree_with_three_dh() {
        agree(false, false, None);
    }

    #[test]
    fn three_dh_refused_when_policy_requires_one_time() {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let err = initiate(&mut rng, &alice, &bob.bundle(false, false), PrekeyPolicy::RequireOneTime).unwrap_err();
        assert_eq!(err, X3dhError::NoOneTimePrekey);
        assert_eq!(err.kind(), ErrorKind::BadInput);
        initiate(&mut rng, &alice, &bob.bundle(false, true), PrekeyPolicy::RequireOneTime).unwrap();
    }

    #[test]
    fn bad_prekey_signatures_are_rejected() {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let policy = PrekeyPolicy::AllowThreeDh;

        // Signed by another key.
        let mut bundle = bob.bundle(true, false);
        let other = DeviceIdentity::from_bytes(&[9; 64]);
        bundle.signed_prekey = other.sign_prekey(SPK_ID, &X25519PublicKey::from(&bob.signed_prekey));
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("signed prekey"));

        // Signature over another key id.
        let mut bundle = bob.bundle(true, false);
        bundle.signed_prekey.key_id += 1;
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("signed prekey"));

        // Key swapped under the signature.
        let mut bundle = bob.bundle(true, false);
        bundle.signed_prekey.public_key.0 = X25519PublicKey::from(&bob.one_time).as_bytes().to_vec();
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("signed prekey"));

        // Flipped signature bit; truncated signature.
        let mut bundle = bob.bundle(true, false);
        bundle.signed_prekey.signature.0[5] ^= 1;
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("signed prekey"));
        let mut bundle = bob.bundle(true, false);
        bundle.signed_prekey.signature.0.truncate(63);
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("signed prekey"));

        // A bad last-resort signature is rejected even when a one-time prekey is present.
        let mut bundle = bob.bundle(true, true);
        bundle.last_resort_prekey.as_mut().unwrap().signature.0[0] ^= 0x80;
        assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), X3dhError::BadSignature("last-resort prekey"));

        // verify_signed_prekey agrees.
        let good = bob.bundle(false, false).signed_prekey;
        assert_eq!(verify_signed_prekey(&good, &bob.device.signing_public()).unwrap(), X25519PublicKey::from(&bob.signed_prekey));
        assert!(verify_signed_prekey(&good, &other.signing_public()).is_err());
    }

    #[test]
    fn wrong_size_keys_are_rejected() {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let policy = PrekeyPolicy::AllowThreeDh;
        let check = |mutate: &dyn Fn(&mut PrekeyBundle), expected: X3dhError| {
            let mut bundle = bob.bundle(true, true);
            mutate(&mut bundle);
            let mut rng = rand::rngs::StdRng::seed_from_u64(2);
            assert_eq!(initiate(&mut rng, &alice, &bundle, policy).unwrap_err(), expected);
        };
        check(&|b| b.device_keys.identity_key.0.push(0), X3dhError::MalformedKey("identity key"));
        check(&|b| b.device_keys.identity_key.0.truncate(31), X3dhError::MalformedKey("identity key"));
        check(&|b| b.device_keys.signing_key.0.truncate(31), X3dhError::MalformedKey("device signing key"));
        check(&|b| b.signed_prekey.public_key.0.truncate(31), X3dhError::MalformedKey("signed prekey"));
        check(&|b| b.signed_prekey.public_key.0.clear(), X3dhError::MalformedKey("signed prekey"));
        check(&|b| b.one_time_prekey.as_mut().unwrap().public_key.0.push(1), X3dhError::MalformedKey("one-time prekey"));
        check(
            &|b| b.last_resort_prekey.as_mut().unwrap().public_key.0.truncate(1),
            X3dhError::MalformedKey("last-resort prekey"),
        );
        // A low-order one-time prekey.
        check(&|b| b.one_time_prekey.as_mut().unwrap().public_key.0 = vec![0; 32], X3dhError::WeakKey);
        // Non-canonical encodings: top bit set, or p = 2^255 - 19 itself.
        check(&|b| b.device_keys.identity_key.0[31] |= 0x80, X3dhError::MalformedKey("identity key"));
        let mut p = [0xff; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        check(&|b| b.one_time_prekey.as_mut().unwrap().public_key.0 = p.to_vec(), X3dhError::MalformedKey("one-time prekey"));
        p[0] = 0xec; // p - 1 is canonical, but of small order (checked in crate::keys)
        assert_eq!(parse_x25519_public(&p), Err(KeyError::SmallOrder));
        assert_eq!(parse_x25519_public(&[0; 33]), Err(KeyError::WrongLength));
    }

    #[test]
    fn responder_rejects_mismatched_prekeys_and_bad_headers() {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let out = initiate(&mut rng, &alice, &bob.bundle(true, false), PrekeyPolicy::AllowThreeDh).unwrap();
        let err = respond(&bob.identity, &bob.signed_prekey, None, out.header()).unwrap_err();
        assert_eq!(err, X3dhError::PrekeyMismatch);
        assert_eq!(err.kind(), ErrorKind::Misuse);

        let bytes = out.header().to_bytes();
        assert_eq!(InitialHeader::from_bytes(&bytes[..72]).unwrap_err(), X3dhError::MalformedHeader);
        let mut bad = bytes;
        bad[68] = 3;
        assert_eq!(InitialHeader::from_bytes(&bad).unwrap_err(), X3dhError::MalformedHeader);
        let mut bad = bytes;
        bad[68] = 0; // "none" with a non-zero id is not canonical
        assert_eq!(InitialHeader::from_bytes(&bad).unwrap_err(), X3dhError::MalformedHeader);
        let mut bad = bytes;
        bad[63] |= 0x80; // non-canonical ephemeral key
        assert_eq!(InitialHeader::from_bytes(&bad).unwrap_err(), X3dhError::MalformedHeader);
        // A low-order ephemeral key.
        let mut header = *out.header();
        header.ephemeral_key = X25519PublicKey::from([0u8; 32]);
        assert_eq!(respond(&bob.identity, &bob.signed_prekey, Some(&bob.one_time), &header).unwrap_err(), X3dhError::WeakKey);
    }

    /// One parser, one policy: a small-order key is refused where it is parsed. For an initial
    /// header this is new (it used to parse, and `respond` failed with `WeakKey`); the error is
    /// the same `WeakKey`, raised earlier.
    #[test]
    fn small_order_keys_are_refused_when_parsed() {
        let mut rng = rng();
        let bob = TestDevice::new(&mut rng);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let out = initiate(&mut rng, &alice, &bob.bundle(true, false), PrekeyPolicy::AllowThreeDh).unwrap();
        let bytes = out.header().to_bytes();
        let small_order = [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }];
        for (range, u) in [(0..32, small_order[0]), (32..64, small_order[0]), (0..32, small_order[1]), (32..64, small_order[1])] {
            let mut bad = bytes;
            bad[range].copy_from_slice(&u);
            assert_eq!(InitialHeader::from_bytes(&bad).unwrap_err(), X3dhError::WeakKey);
        }
        assert_eq!(X3dhError::WeakKey.kind(), ErrorKind::BadInput);

        // In a bundle: the identity key is WeakKey; a signed prekey of small order, even validly
        // signed, is a malformed key (as before: the prekey verifier always refused it).
        let mut bundle = bob.bundle(true, false);
        bundle.device_keys.identity_key.0 = small_order[1].to_vec();
        assert_eq!(initiate(&mut rng, &alice, &bundle, PrekeyPolicy::AllowThreeDh).unwrap_err(), X3dhError::WeakKey);
        let mut bundle = bob.bundle(true, true);
        bundle.signed_prekey = bob.device.sign_prekey(SPK_ID, &X25519PublicKey::from(small_order[0]));
        assert_eq!(
            initiate(&mut rng, &alice, &bundle, PrekeyPolicy::AllowThreeDh).unwrap_err(),
            X3dhError::MalformedKey("signed prekey")
        );
        bundle = bob.bundle(true, true);
        bundle.last_resort_prekey = Some(bob.device.sign_prekey(LAST_RESORT_ID, &X25519PublicKey::from(small_order[1])));
        assert_eq!(
            initiate(&mut rng, &alice, &bundle, PrekeyPolicy::AllowThreeDh).unwrap_err(),
            X3dhError::MalformedKey("last-resort prekey")
        );
    }
}
