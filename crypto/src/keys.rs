//! Parsing public keys that come from peers: the one place that decides which 32-byte strings
//! are acceptable ed25519 and X25519 keys (`spec/e2ee.md`, section 3.7).
//!
//! # Policy
//!
//! * **X25519** ([`parse_x25519_public`]): exactly 32 bytes; a canonical u-coordinate (the
//!   unused top bit clear and the value below 2^255 − 19, so each key has one encoding); and
//!   **not of small order**. A Diffie–Hellman with a small-order point gives an output that
//!   does not depend on our secret (it is non-contributory), so such a key is refused when it is
//!   parsed, before it can reach a DH, an associated data or a stored session. Twist points are
//!   accepted, as RFC 7748 does. Every X25519 key from a peer (identity keys, signed,
//!   last-resort and one-time prekeys, X3DH initial headers, ratchet headers) goes through this
//!   function; [`crate::x3dh::diffie_hellman`] still checks every output as a second line.
//! * **ed25519** ([`parse_ed25519_public`]): exactly 32 bytes; a canonical encoding (the
//!   y-coordinate, sign bit cleared, below 2^255 − 19) of a curve point. Small-order keys parse,
//!   but can never carry a valid signature under strict verification.
//!
//! The parsers say *why* a key was refused ([`KeyError`]) and nothing about *which* key it
//! was; callers attach that (e.g. [`crate::identity::Field`]).

use crate::signing::PublicKey;
use x25519_dalek::StaticSecret;

/// Length of an ed25519 or X25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Why a peer's public key was refused (bad input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not exactly [`PUBLIC_KEY_LEN`] bytes.
    #[error("not {PUBLIC_KEY_LEN} bytes")]
    WrongLength,
    /// Not the canonical encoding of a field element (top bit set, or at least 2^255 − 19).
    #[error("not a canonical encoding")]
    NonCanonical,
    /// An ed25519 key that does not decompress to a curve point.
    #[error("not a curve point")]
    NotOnCurve,
    /// An X25519 key of small order: a Diffie–Hellman with it would not be contributory.
    #[error("a small-order point")]
    SmallOrder,
}

/// Whether 32 little-endian bytes, top bit ignored, encode an integer below 2^255 − 19.
fn is_canonical_field_element(bytes: &[u8; PUBLIC_KEY_LEN]) -> bool {
    // 2^255 - 19 = 0x7fff...ffed; only values from it to 2^255 - 1 are non-canonical.
    let top = bytes[31] & 0x7f;
    !(top == 0x7f && bytes[1..31].iter().all(|&b| b == 0xff) && bytes[0] >= 0xed)
}

/// Parses an X25519 public key from a peer: 32 bytes, a canonical u-coordinate (top bit clear,
/// below 2^255 − 19), not of small order (see the module documentation).
pub fn parse_x25519_public(bytes: &[u8]) -> Result<x25519_dalek::PublicKey, KeyError> {
    let array: [u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::WrongLength)?;
    if array[31] & 0x80 != 0 || !is_canonical_field_element(&array) {
        return Err(KeyError::NonCanonical);
    }
    let key = x25519_dalek::PublicKey::from(array);
    // A clamped scalar is a multiple of the cofactor 8 and below the group order times 8, so
    // its product with a point is the identity (all-zero output) exactly when the point has
    // small order. Any fixed scalar will do.
    let probe = StaticSecret::from([0x55; 32]);
    if !probe.diffie_hellman(&key).was_contributory() {
        return Err(KeyError::SmallOrder);
    }
    Ok(key)
}

/// Parses an ed25519 public key from a peer: 32 bytes, a canonical encoding of a curve point.
pub fn parse_ed25519_public(bytes: &[u8]) -> Result<PublicKey, KeyError> {
    let array: &[u8; PUBLIC_KEY_LEN] = bytes.try_into().map_err(|_| KeyError::WrongLength)?;
    if !is_canonical_field_element(array) {
        return Err(KeyError::NonCanonical);
    }
    PublicKey::from_bytes(array).map_err(|_| KeyError::NotOnCurve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_support::unhex32;
    use rand::SeedableRng as _;

    /// The canonical small-order u-coordinates (RFC 7748 section 7 / libsodium's blocklist).
    const SMALL_ORDER: [&str; 5] = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];

    fn x25519_key(seed: u64) -> x25519_dalek::PublicKey {
        x25519_dalek::PublicKey::from(&StaticSecret::random_from_rng(rand::rngs::StdRng::seed_from_u64(seed)))
    }

    #[test]
    fn x25519_valid_keys_parse_to_themselves() {
        let good = x25519_key(7);
        assert_eq!(parse_x25519_public(good.as_bytes()), Ok(good));
        // RFC 7748 section 6.1, Alice's public key.
        let alice = unhex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(parse_x25519_public(&alice).map(|k| k.to_bytes()), Ok(alice));
        // p - 2 is canonical and not of small order (p - 1 is canonical but of small order).
        let p_minus_2 = unhex32("ebffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
        assert_eq!(parse_x25519_public(&p_minus_2).map(|k| k.to_bytes()), Ok(p_minus_2));
    }

    #[test]
    fn x25519_wrong_lengths_are_refused() {
        let good = x25519_key(7);
        assert_eq!(parse_x25519_public(&good.as_bytes()[..31]), Err(KeyError::WrongLength));
        let mut long = good.as_bytes().to_vec();
        long.push(0);
        assert_eq!(parse_x25519_public(&long), Err(KeyError::WrongLength));
        assert_eq!(parse_x25519_public(&[]), Err(KeyError::WrongLength));
    }

    #[test]
    fn x25519_non_canonical_encodings_are_refused() {
        let mut high = x25519_key(7).to_bytes();
        high[31] |= 0x80;
        assert_eq!(parse_x25519_public(&high), Err(KeyError::NonCanonical));
        // p itself and p + 1.
        for text in [
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ] {
            assert_eq!(parse_x25519_public(&unhex32(text)), Err(KeyError::NonCanonical), "{text}");
        }
    }

    #[test]
    fn x25519_small_order_points_are_refused() {
        for small in SMALL_ORDER {
            assert_eq!(parse_x25519_public(&unhex32(small)), Err(KeyError::SmallOrder), "{small}");
        }
    }

    #[test]
    fn ed25519_keys() {
        let key = crate::signing::KeyPair::from_seed(&[3; 32]).public();
        assert_eq!(parse_ed25519_public(key.as_bytes()), Ok(key));
        assert_eq!(parse_ed25519_public(&key.as_bytes()[..31]), Err(KeyError::WrongLength));
        // y = p: non-canonical (it would decompress as y = 0).
        let p = unhex32("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f");
        assert_eq!(parse_ed25519_public(&p), Err(KeyError::NonCanonical));
        // y = 2 is not the y-coordinate of a curve point.
        let mut two = [0u8; 32];
        two[0] = 2;
        assert_eq!(parse_ed25519_public(&two), Err(KeyError::NotOnCurve));
    }
}
