//! Every decoder of peer or stored input returns a typed error on garbage; none panics.
//! (A cheap, always-on stand-in for fuzzing; `cargo fuzz` targets can reuse these inputs.)

use parley_crypto::identity::{verify_device_keys, verify_device_list};
use parley_crypto::keys::{parse_ed25519_public, parse_x25519_public};
use parley_crypto::media::{decrypt, MediaKey};
use parley_crypto::ratchet::{self, Session};
use parley_crypto::x3dh::InitialHeader;
use parley_spec::v1::keys::{DeviceKeys, SignedDeviceList};
use parley_spec::UserId;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn ratchet_inputs(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = ratchet::initial_header(&bytes);
        let _ = InitialHeader::from_bytes(&bytes);
        let _ = Session::from_bytes(&bytes);
        let _ = parse_x25519_public(&bytes);
        let _ = parse_ed25519_public(&bytes);
    }

    #[test]
    fn stored_sessions_with_flipped_bytes(flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        // A real session's bytes with one bit changed: loading fails or yields a session that
        // may fail later, but never panics.
        let bytes = session_bytes();
        let mut bytes = bytes.to_vec();
        let i = flip.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(mut session) = Session::from_bytes(&bytes) {
            let _ = session.decrypt(&[1, 0, 0]);
        }
    }

    #[test]
    fn media_ciphertexts(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let key = MediaKey::from_parts(&[7; 32], &[1; 7]).unwrap();
        // Random bytes never authenticate under the key.
        prop_assert!(decrypt(&key, &bytes).is_err());
    }

    #[test]
    fn device_keys_and_lists(json in "\\PC{0,300}") {
        if let Ok(keys) = serde_json::from_str::<DeviceKeys>(&json) {
            let _ = verify_device_keys(&keys);
        }
        if let Ok(list) = serde_json::from_str::<SignedDeviceList>(&json) {
            let user: UserId = "@a:example.org".parse().unwrap();
            let _ = verify_device_list(&list, &user, None, None);
        }
    }
}

fn session_bytes() -> &'static [u8] {
    use std::sync::OnceLock;
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        use parley_crypto::identity::DeviceIdentity;
        use parley_crypto::x3dh::{self, PrekeyPolicy, StaticSecret, X25519PublicKey};
        use parley_spec::v1::keys::PrekeyBundle;
        let mut rng = rand::thread_rng();
        let bob = DeviceIdentity::generate(&mut rng);
        let signed = StaticSecret::random_from_rng(&mut rng);
        let bundle = PrekeyBundle::new(
            bob.device_keys(&"@b:example.org".parse().unwrap(), &"BOB".parse().unwrap()),
            bob.sign_prekey(1, &X25519PublicKey::from(&signed)),
            None,
            None,
        );
        let alice = StaticSecret::random_from_rng(&mut rng);
        let initiated = x3dh::initiate(&mut rng, &alice, &bundle, PrekeyPolicy::AllowThreeDh).unwrap();
        let mut session = Session::initiate(&mut rng, initiated).unwrap();
        session.encrypt(&mut rng, b"hello").unwrap();
        session.to_bytes().to_vec()
    })
}
