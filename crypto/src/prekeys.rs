//! A responder device's prekey secrets, as a client keeps them: generated with an injected RNG,
//! stored as 32 bytes, published as signed or one-time prekeys, and handed to
//! [`Session::accept_initial`](crate::ratchet::Session::accept_initial) through
//! [`LoadedPrekeys`] once the caller has looked up the ones an initial message names.
//!
//! Also the digest that identifies one initial message ([`initial_message_id`]), which a client
//! remembers so that a replayed first message cannot restart a session a second time.

use crate::identity::DeviceIdentity;
use crate::ratchet::PrekeyStore;
use crate::x3dh::{InitialHeader, StaticSecret, X25519PublicKey};
use parley_spec::v1::keys::{OneTimePrekey, SignedPrekey};
use rand::{CryptoRng, RngCore};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// Length of a stored prekey secret.
pub const PREKEY_SECRET_LEN: usize = 32;

/// Stored prekey bytes that are not a prekey secret (wrong length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a stored prekey secret must be {PREKEY_SECRET_LEN} bytes")]
pub struct MalformedPrekeySecret;

/// One X25519 prekey secret (signed, last-resort or one-time): zeroized on drop, never printed.
#[derive(Clone)]
pub struct PrekeySecret(StaticSecret);

impl std::fmt::Debug for PrekeySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PrekeySecret").field(&"<redacted>").finish()
    }
}

impl PrekeySecret {
    /// A fresh secret from `rng`.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        Self(StaticSecret::random_from_rng(rng))
    }

    /// A secret stored earlier with [`PrekeySecret::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MalformedPrekeySecret> {
        let array: Zeroizing<[u8; PREKEY_SECRET_LEN]> = Zeroizing::new(bytes.try_into().map_err(|_| MalformedPrekeySecret)?);
        Ok(Self(StaticSecret::from(*array)))
    }

    /// The bytes to store.
    pub fn to_bytes(&self) -> Zeroizing<[u8; PREKEY_SECRET_LEN]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public half.
    pub fn public_key(&self) -> X25519PublicKey {
        X25519PublicKey::from(&self.0)
    }

    /// The public half as a one-time prekey with this id, to upload.
    pub fn one_time_prekey(&self, key_id: u32) -> OneTimePrekey {
        OneTimePrekey::new(key_id, self.public_key().as_bytes().to_vec())
    }

    /// The public half signed by `device` (a signed or last-resort prekey), to upload.
    pub fn signed_prekey(&self, device: &DeviceIdentity, key_id: u32) -> SignedPrekey {
        device.sign_prekey(key_id, &self.public_key())
    }
}

/// The secrets one initial message names, looked up ahead of
/// [`Session::accept_initial`](crate::ratchet::Session::accept_initial) by a caller whose store
/// cannot be queried synchronously. Each slot answers only for its own key id.
pub struct LoadedPrekeys {
    identity: StaticSecret,
    signed: Option<(u32, PrekeySecret)>,
    one_time: Option<(u32, PrekeySecret)>,
    last_resort: Option<(u32, PrekeySecret)>,
}

impl std::fmt::Debug for LoadedPrekeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPrekeys")
            .field("signed", &self.signed.as_ref().map(|(id, _)| id))
            .field("one_time", &self.one_time.as_ref().map(|(id, _)| id))
            .field("last_resort", &self.last_resort.as_ref().map(|(id, _)| id))
            .finish_non_exhaustive()
    }
}

impl LoadedPrekeys {
    /// The device's identity secret, and no prekeys yet.
    pub fn new(device: &DeviceIdentity) -> Self {
        Self { identity: device.identity_secret().clone(), signed: None, one_time: None, last_resort: None }
    }

    /// Adds the signed prekey `key_id`.
    pub fn with_signed(mut self, key_id: u32, secret: PrekeySecret) -> Self {
        self.signed = Some((key_id, secret));
        self
    }

    /// Adds the one-time prekey `key_id`.
    pub fn with_one_time(mut self, key_id: u32, secret: PrekeySecret) -> Self {
        self.one_time = Some((key_id, secret));
        self
    }

    /// Adds the last-resort prekey `key_id`.
    pub fn with_last_resort(mut self, key_id: u32, secret: PrekeySecret) -> Self {
        self.last_resort = Some((key_id, secret));
        self
    }
}

fn lookup(slot: &Option<(u32, PrekeySecret)>, key_id: u32) -> Option<StaticSecret> {
    slot.as_ref().filter(|(id, _)| *id == key_id).map(|(_, secret)| secret.0.clone())
}

impl PrekeyStore for LoadedPrekeys {
    fn identity_key(&self) -> StaticSecret {
        self.identity.clone()
    }
    fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        lookup(&self.signed, key_id)
    }
    fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        lookup(&self.one_time, key_id)
    }
    fn last_resort_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        lookup(&self.last_resort, key_id)
    }
}

/// Identifies one initial message (one session start): SHA-256 of its X3DH
/// [`InitialHeader`] encoding. Every session start has a fresh ephemeral key, so two starts
/// never share an id; a replay of the same first message always does.
pub fn initial_message_id(header: &InitialHeader) -> [u8; 32] {
    Sha256::digest(header.to_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::verify_signed_prekey;
    use crate::ratchet::Session;
    use crate::x3dh::{self, PrekeyPolicy, PrekeyRef};
    use parley_spec::v1::keys::PrekeyBundle;
    use parley_spec::{DeviceId, UserId};
    use rand::SeedableRng as _;

    fn rng(seed: u64) -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    #[test]
    fn secrets_are_deterministic_under_a_seeded_rng_and_round_trip() {
        let a = PrekeySecret::generate(&mut rng(1));
        let b = PrekeySecret::generate(&mut rng(1));
        let c = PrekeySecret::generate(&mut rng(2));
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), c.public_key());
        let restored = PrekeySecret::from_bytes(a.to_bytes().as_slice()).unwrap();
        assert_eq!(restored.public_key(), a.public_key());
        assert_eq!(PrekeySecret::from_bytes(&[0; 31]).unwrap_err(), MalformedPrekeySecret);
        assert_eq!(format!("{a:?}"), r#"PrekeySecret("<redacted>")"#);
    }

    #[test]
    fn published_halves_verify_and_carry_the_public_key() {
        let mut rng = rng(3);
        let device = DeviceIdentity::generate(&mut rng);
        let secret = PrekeySecret::generate(&mut rng);
        let signed = secret.signed_prekey(&device, 5);
        assert_eq!(signed.key_id, 5);
        assert_eq!(verify_signed_prekey(&signed, &device.signing_public()).unwrap(), secret.public_key());
        let one_time = secret.one_time_prekey(1000);
        assert_eq!((one_time.key_id, one_time.public_key.0.as_slice()), (1000, secret.public_key().as_bytes().as_slice()));
    }

    /// A session started against a bundle built from [`PrekeySecret`]s is accepted with the
    /// same secrets passed back through [`LoadedPrekeys`], and only with them.
    #[test]
    fn loaded_prekeys_accept_a_session_start_and_name_only_their_own_ids() {
        let mut rng = rng(4);
        let (alice, bob) = (DeviceIdentity::generate(&mut rng), DeviceIdentity::generate(&mut rng));
        let (signed, one_time) = (PrekeySecret::generate(&mut rng), PrekeySecret::generate(&mut rng));
        let bob_keys = bob.device_keys(&UserId::parse("@bob:x").unwrap(), &DeviceId::parse("BOB").unwrap());
        let bundle = PrekeyBundle::new(bob_keys, signed.signed_prekey(&bob, 1), Some(one_time.one_time_prekey(1000)), None);
        let initiated = x3dh::initiate(&mut rng, alice.identity_secret(), &bundle, PrekeyPolicy::RequireOneTime).unwrap();
        let mut session = Session::initiate(&mut rng, initiated).unwrap();
        let first = session.encrypt(&mut rng, b"hello").unwrap();

        let without_one_time = LoadedPrekeys::new(&bob).with_signed(1, signed.clone());
        assert!(Session::accept_initial(&without_one_time, &first).is_err());
        let wrong_id = LoadedPrekeys::new(&bob).with_signed(1, signed.clone()).with_one_time(1001, one_time.clone());
        assert!(Session::accept_initial(&wrong_id, &first).is_err());
        let keys = LoadedPrekeys::new(&bob).with_signed(1, signed).with_one_time(1000, one_time);
        let accepted = Session::accept_initial(&keys, &first).unwrap();
        assert_eq!(accepted.plaintext, b"hello");
        assert_eq!(accepted.used_prekey, Some(PrekeyRef::OneTime(1000)));
        assert!(!format!("{keys:?}").contains("identity:"), "no secret in Debug: {keys:?}");
    }

    #[test]
    fn initial_message_ids_are_the_digest_of_the_header_and_differ_per_session_start() {
        let mut rng = rng(5);
        let header = |rng: &mut rand::rngs::StdRng| InitialHeader {
            identity_key: PrekeySecret::generate(rng).public_key(),
            ephemeral_key: PrekeySecret::generate(rng).public_key(),
            signed_prekey_id: 1,
            one_time_prekey: Some(PrekeyRef::OneTime(1000)),
        };
        let (a, b) = (header(&mut rng), header(&mut rng));
        assert_eq!(initial_message_id(&a), <[u8; 32]>::from(Sha256::digest(a.to_bytes())));
        assert_eq!(initial_message_id(&a), initial_message_id(&InitialHeader::from_bytes(&a.to_bytes()).unwrap()));
        assert_ne!(initial_message_id(&a), initial_message_id(&b));
    }
}
