//! Fixed test vectors for 1:1 sessions (X3DH + Double Ratchet): `spec/vectors/session_v1.json`.
//!
//! The values are regenerated from `StdRng::seed_from_u64(SEED)` (rand 0.8: ChaCha12) and must
//! match the file byte for byte. Every random value the protocol drew (ephemeral and ratchet
//! secrets) is written out too, so another implementation can check itself without
//! reproducing the RNG. After an intended change, rewrite the file with
//! `PARLEY_UPDATE_VECTORS=1 cargo test -p parley-crypto --test session_vectors`.

use parley_crypto::identity::DeviceIdentity;
use parley_crypto::ratchet::{PrekeyStore, Session};
use parley_crypto::x3dh::{self, PrekeyPolicy, StaticSecret, X25519PublicKey};
use parley_spec::v1::keys::{DeviceKeys, OneTimePrekey, PrekeyBundle};
use parley_spec::{DeviceId, UserId};
use rand::rngs::StdRng;
use rand::{CryptoRng, RngCore, SeedableRng};
use serde_json::json;

const SEED: u64 = 0x5061_726c_6579; // "Parley"
const SIGNED_PREKEY_ID: u32 = 1;
const ONE_TIME_PREKEY_ID: u32 = 1001;
const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/session_v1.json");

/// Wraps the seeded RNG and records what the library draws from it.
struct RecordingRng {
    inner: StdRng,
    drawn: Vec<u8>,
}

impl RecordingRng {
    fn take(&mut self) -> String {
        hex(&std::mem::take(&mut self.drawn))
    }

    fn secret(&mut self) -> StaticSecret {
        let mut bytes = [0u8; 32];
        self.inner.fill_bytes(&mut bytes);
        StaticSecret::from(bytes)
    }
}

impl RngCore for RecordingRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
        self.drawn.extend_from_slice(dest);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for RecordingRng {}

struct BobKeys {
    identity: StaticSecret,
    signed_prekey: StaticSecret,
    one_time_prekey: StaticSecret,
}

impl PrekeyStore for BobKeys {
    fn identity_key(&self) -> StaticSecret {
        self.identity.clone()
    }
    fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        (key_id == SIGNED_PREKEY_ID).then(|| self.signed_prekey.clone())
    }
    fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        (key_id == ONE_TIME_PREKEY_ID).then(|| self.one_time_prekey.clone())
    }
    fn last_resort_prekey(&self, _: u32) -> Option<StaticSecret> {
        None
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn public(secret: &StaticSecret) -> String {
    hex(X25519PublicKey::from(secret).as_bytes())
}

fn generate() -> serde_json::Value {
    let mut rng = RecordingRng { inner: StdRng::seed_from_u64(SEED), drawn: Vec::new() };

    // Bob's device keys and prekeys, then Alice's identity key.
    let bob = BobKeys { identity: rng.secret(), signed_prekey: rng.secret(), one_time_prekey: rng.secret() };
    let mut seed = [0u8; 32];
    rng.inner.fill_bytes(&mut seed);
    // Bob's device identity: the ed25519 seed, then the x25519 identity secret.
    let mut device_bytes = [0u8; 64];
    device_bytes[..32].copy_from_slice(&seed);
    device_bytes[32..].copy_from_slice(&bob.identity.to_bytes());
    let bob_device = DeviceIdentity::from_bytes(&device_bytes);
    let bob_signing = bob_device.signing_public();
    let alice_identity = rng.secret();
    let signed_prekey = bob_device.sign_prekey(SIGNED_PREKEY_ID, &X25519PublicKey::from(&bob.signed_prekey));
    let bundle = PrekeyBundle::new(
        DeviceKeys::new(
            UserId::parse("@bob:example.org").unwrap(),
            DeviceId::parse("BOBPHONE").unwrap(),
            bob_signing.as_bytes().to_vec(),
            X25519PublicKey::from(&bob.identity).as_bytes().to_vec(),
            vec![0; 64], // not checked by X3DH (see parley_crypto::identity)
        ),
        signed_prekey.clone(),
        Some(OneTimePrekey::new(ONE_TIME_PREKEY_ID, X25519PublicKey::from(&bob.one_time_prekey).as_bytes().to_vec())),
        None,
    );

    // X3DH and Alice's session.
    rng.drawn.clear();
    let initiated = x3dh::initiate(&mut rng, &alice_identity, &bundle, PrekeyPolicy::RequireOneTime).unwrap();
    let alice_ephemeral = rng.take();
    let shared_key = hex(initiated.shared_key().as_bytes());
    let associated_data = hex(initiated.associated_data().as_bytes());
    let initial_header = hex(&initiated.header().to_bytes());
    let mut alice = Session::initiate(&mut rng, initiated).unwrap();
    let alice_ratchet_1 = rng.take();

    // Two initial messages from Alice, two replies from Bob, and Alice's next message.
    let mut messages = Vec::new();
    let mut record = |from: &str, plaintext: &str, ciphertext: &[u8]| {
        messages.push(json!({"from": from, "plaintext": plaintext, "ciphertext": hex(ciphertext)}));
    };
    let a1 = alice.encrypt(&mut rng, b"Hello Bob!").unwrap();
    let a2 = alice.encrypt(&mut rng, b"Are you there?").unwrap();
    record("alice", "Hello Bob!", &a1);
    record("alice", "Are you there?", &a2);
    let accepted = Session::accept_initial(&bob, &a1).unwrap();
    assert_eq!(accepted.plaintext, b"Hello Bob!");
    assert_eq!(accepted.used_prekey, Some(x3dh::PrekeyRef::OneTime(ONE_TIME_PREKEY_ID)));
    let mut bob_session = accepted.session;
    assert_eq!(bob_session.decrypt(&a2).unwrap(), b"Are you there?");

    assert!(rng.drawn.is_empty());
    let b1 = bob_session.encrypt(&mut rng, b"Hi Alice.").unwrap();
    let bob_ratchet_1 = rng.take();
    let b2 = bob_session.encrypt(&mut rng, b"Yes, I am here.").unwrap();
    record("bob", "Hi Alice.", &b1);
    record("bob", "Yes, I am here.", &b2);
    assert_eq!(alice.decrypt(&b2).unwrap(), b"Yes, I am here.");
    assert_eq!(alice.decrypt(&b1).unwrap(), b"Hi Alice.");

    assert!(rng.drawn.is_empty());
    let a3 = alice.encrypt(&mut rng, b"Great.").unwrap();
    let alice_ratchet_2 = rng.take();
    record("alice", "Great.", &a3);
    assert_eq!(bob_session.decrypt(&a3).unwrap(), b"Great.");

    json!({
        "description": "Parley 1:1 session v1: X3DH (info \"Parley X3DH v1\") then the Double Ratchet \
            (crypto/src/x3dh.rs, crypto/src/ratchet.rs). X25519 secrets are the 32 raw bytes before \
            clamping; public keys, SK, AD, headers and ciphertexts are raw bytes, all in hex. \
            Messages are listed in the order they were encrypted.",
        "generator": "crypto/tests/session_vectors.rs: rand 0.8 StdRng::seed_from_u64(0x5061726c6579); \
            every value drawn from it is listed here",
        "alice": {
            "identity_secret": hex(&alice_identity.to_bytes()),
            "identity_public": public(&alice_identity),
            "ephemeral_secret": alice_ephemeral,
            "ratchet_secret_1": alice_ratchet_1,
            "ratchet_secret_2": alice_ratchet_2,
        },
        "bob": {
            "identity_secret": hex(&bob.identity.to_bytes()),
            "identity_public": public(&bob.identity),
            "signing_seed": hex(&seed),
            "signing_public": hex(bob_signing.as_bytes()),
            "signed_prekey_id": SIGNED_PREKEY_ID,
            "signed_prekey_secret": hex(&bob.signed_prekey.to_bytes()),
            "signed_prekey_public": public(&bob.signed_prekey),
            "signed_prekey_signature": hex(&signed_prekey.signature.0),
            "one_time_prekey_id": ONE_TIME_PREKEY_ID,
            "one_time_prekey_secret": hex(&bob.one_time_prekey.to_bytes()),
            "one_time_prekey_public": public(&bob.one_time_prekey),
            "ratchet_secret_1": bob_ratchet_1,
        },
        "x3dh": {
            "shared_key": shared_key,
            "associated_data": associated_data,
            "initial_header": initial_header,
        },
        "messages": messages,
    })
}

#[test]
fn session_vectors_match_the_file() {
    let generated = format!("{}\n", serde_json::to_string_pretty(&generate()).unwrap());
    // Generating twice gives the same bytes.
    assert_eq!(generated, format!("{}\n", serde_json::to_string_pretty(&generate()).unwrap()));
    if std::env::var("PARLEY_UPDATE_VECTORS").as_deref() == Ok("1") {
        std::fs::create_dir_all(std::path::Path::new(PATH).parent().unwrap()).unwrap();
        std::fs::write(PATH, &generated).unwrap();
        return;
    }
    let stored = std::fs::read_to_string(PATH)
        .unwrap_or_else(|e| panic!("cannot read {PATH} ({e}); create it with PARLEY_UPDATE_VECTORS=1"));
    let (want, got): (serde_json::Value, serde_json::Value) =
        (serde_json::from_str(&stored).unwrap(), serde_json::from_str(&generated).unwrap());
    for key in ["alice", "bob", "x3dh", "messages"] {
        assert_eq!(got[key], want[key], "session vectors differ in `{key}`; if intended, rerun with PARLEY_UPDATE_VECTORS=1");
    }
    assert_eq!(generated, stored, "session vectors differ; if intended, rerun with PARLEY_UPDATE_VECTORS=1");
}
