//! Safety numbers: 60 digits two users compare (read aloud, or side by side) to confirm that
//! each holds the other's real identity key, with no one in the middle.
//!
//! The construction is Signal's numeric fingerprint, unchanged except for what goes in:
//!
//! 1. For each party, with `key` its 32-byte ed25519 user identity public key and `id` its user
//!    id (UTF-8 bytes of `@localpart:server`):
//!    `h = version (u16, big endian, 0) || key || id`, then 5200 times `h = SHA-512(h || key)`.
//! 2. The first 30 bytes of `h` give 30 digits: each 5-byte chunk, read as a big-endian 40-bit
//!    integer, modulo 100 000, written as 5 digits with leading zeros.
//! 3. The safety number is the two 30-digit strings concatenated in a canonical order — the
//!    party with the smaller user id (byte order) first; with equal ids, the smaller digits
//!    first — so both parties compute the same 60 digits.
//!
//! It is shown as 12 blocks of 5 digits. With 30 digits (about 100 bits) per party and 5200
//! iterations, finding a second key that gives the same half takes about 2^112 hash
//! computations.

use crate::signing::PublicKey;
use parley_spec::UserId;
use sha2::{Digest as _, Sha512};
use subtle::ConstantTimeEq;

/// Version prefix of the hashed input (Signal's, 0).
pub const SAFETY_NUMBER_VERSION: u16 = 0;
/// SHA-512 iterations per party.
pub const SAFETY_NUMBER_ITERATIONS: u32 = 5200;
/// Digits in a safety number.
pub const SAFETY_NUMBER_DIGITS: usize = 60;

/// Why a typed-in safety number did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SafetyNumberError {
    /// Not 60 ASCII digits (whitespace between them is allowed).
    #[error("a safety number is 60 digits")]
    Malformed,
}

/// A safety number: 60 ASCII digits. `Display` shows 12 blocks of 5 digits separated by
/// spaces; equality runs in constant time.
#[derive(Clone, Copy)]
pub struct SafetyNumber {
    digits: [u8; SAFETY_NUMBER_DIGITS],
}

impl SafetyNumber {
    /// The 60 digits, without spaces.
    pub fn digits(&self) -> &str {
        std::str::from_utf8(&self.digits).expect("safety numbers hold ASCII digits only")
    }

    /// The 12 blocks of 5 digits.
    pub fn blocks(&self) -> impl Iterator<Item = &str> + '_ {
        self.digits.chunks(5).map(|block| std::str::from_utf8(block).expect("safety numbers hold ASCII digits only"))
    }

    /// Parses 60 digits, ignoring whitespace (as shown by `Display`, or typed in by a user).
    pub fn parse(text: &str) -> Result<Self, SafetyNumberError> {
        let mut digits = [0u8; SAFETY_NUMBER_DIGITS];
        let mut n = 0;
        for byte in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
            if !byte.is_ascii_digit() || n == SAFETY_NUMBER_DIGITS {
                return Err(SafetyNumberError::Malformed);
            }
            digits[n] = byte;
            n += 1;
        }
        if n != SAFETY_NUMBER_DIGITS {
            return Err(SafetyNumberError::Malformed);
        }
        Ok(Self { digits })
    }
}

impl std::str::FromStr for SafetyNumber {
    type Err = SafetyNumberError;
    fn from_str(text: &str) -> Result<Self, SafetyNumberError> {
        Self::parse(text)
    }
}

impl std::fmt::Display for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, block) in self.blocks().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(block)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

impl ConstantTimeEq for SafetyNumber {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.digits.ct_eq(&other.digits)
    }
}

impl PartialEq for SafetyNumber {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for SafetyNumber {}

/// One party's 30 digits (step 1 and 2 of the module docs), for any key encoding.
fn party_digits(key: &[u8], stable_id: &[u8], iterations: u32) -> [u8; 30] {
    let mut hash = Sha512::new()
        .chain_update(SAFETY_NUMBER_VERSION.to_be_bytes())
        .chain_update(key)
        .chain_update(stable_id)
        .chain_update(key)
        .finalize();
    for _ in 1..iterations {
        hash = Sha512::new().chain_update(hash).chain_update(key).finalize();
    }
    let mut digits = [0u8; 30];
    for (chunk, out) in hash[..30].chunks_exact(5).zip(digits.chunks_exact_mut(5)) {
        let mut value = chunk.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)) % 100_000;
        for digit in out.iter_mut().rev() {
            *digit = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    digits
}

/// Joins two halves: `first` then `second`.
fn join(first: &[u8; 30], second: &[u8; 30]) -> SafetyNumber {
    let mut digits = [0u8; SAFETY_NUMBER_DIGITS];
    digits[..30].copy_from_slice(first);
    digits[30..].copy_from_slice(second);
    SafetyNumber { digits }
}

/// The safety number of two users with their identity keys. Symmetric: swapping the two
/// parties gives the same number.
pub fn safety_number(user_a: &UserId, key_a: &PublicKey, user_b: &UserId, key_b: &PublicKey) -> SafetyNumber {
    let a = party_digits(key_a.as_bytes(), user_a.as_str().as_bytes(), SAFETY_NUMBER_ITERATIONS);
    let b = party_digits(key_b.as_bytes(), user_b.as_str().as_bytes(), SAFETY_NUMBER_ITERATIONS);
    let a_first = match user_a.as_str().as_bytes().cmp(user_b.as_str().as_bytes()) {
        std::cmp::Ordering::Less => true,
        std::cmp::Ordering::Greater => false,
        std::cmp::Ordering::Equal => a <= b,
    };
    if a_first {
        join(&a, &b)
    } else {
        join(&b, &a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_support::{check_vector_file, hex, unhex, unhex32};
    use crate::signing::KeyPair;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn signal_test_vector() {
        // libsignal's fingerprint test vector (33-byte Curve25519 keys with their 0x05 type
        // byte, phone numbers as stable ids, 5200 iterations); Signal orders the halves by
        // their digits.
        let alice_key = unhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868");
        let bob_key = unhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b");
        let a = party_digits(&alice_key, b"+14152222222", 5200);
        let b = party_digits(&bob_key, b"+14153333333", 5200);
        let number = if a <= b { join(&a, &b) } else { join(&b, &a) };
        assert_eq!(number.digits(), "300354477692869396892869876765458257569162576843440918079131");
    }

    #[test]
    fn symmetric_and_sensitive() {
        let (ka, kb, km) = (KeyPair::from_seed(&[1; 32]), KeyPair::from_seed(&[2; 32]), KeyPair::from_seed(&[3; 32]));
        let (a, b) = (user("@alice:example.org"), user("@bob:example.org"));
        let n = safety_number(&a, &ka.public(), &b, &kb.public());
        assert_eq!(n, safety_number(&b, &kb.public(), &a, &ka.public()));
        assert_eq!(n.digits().len(), 60);
        assert!(n.digits().bytes().all(|c| c.is_ascii_digit()));
        // A different key or a different id changes it.
        assert_ne!(n, safety_number(&a, &ka.public(), &b, &km.public()));
        assert_ne!(n, safety_number(&a, &ka.public(), &user("@bob:example.com"), &kb.public()));
        // Display and parse.
        let shown = n.to_string();
        assert_eq!(shown.len(), 60 + 11);
        assert_eq!(shown.split(' ').count(), 12);
        assert_eq!(SafetyNumber::parse(&shown).unwrap(), n);
        assert_eq!(shown.parse::<SafetyNumber>().unwrap(), n);
        assert!(SafetyNumber::parse(&shown[1..]).is_err());
        assert!(SafetyNumber::parse(&format!("{shown}1")).is_err());
        assert!(SafetyNumber::parse(&format!("x{}", &shown[1..])).is_err());
        // Same user on both sides (two identities): still symmetric.
        let same = safety_number(&a, &ka.public(), &a, &kb.public());
        assert_eq!(same, safety_number(&a, &kb.public(), &a, &ka.public()));
    }

    #[test]
    fn safety_vectors() {
        use serde_json::json;
        let seed_a: [u8; 32] = std::array::from_fn(|i| 0xa0 ^ i as u8);
        let seed_b: [u8; 32] = std::array::from_fn(|i| 0xb0 ^ i as u8);
        let (ka, kb) = (KeyPair::from_seed(&seed_a), KeyPair::from_seed(&seed_b));
        let (a, b) = (user("@alice:example.org"), user("@bob:chat.example.net"));
        let n = safety_number(&a, &ka.public(), &b, &kb.public());
        let half = |u: &UserId, k: &KeyPair| {
            String::from_utf8(party_digits(k.public().as_bytes(), u.as_str().as_bytes(), SAFETY_NUMBER_ITERATIONS).to_vec())
                .unwrap()
        };
        let generated = json!({
            "description": "Parley safety numbers v1 (Signal's numeric fingerprint): per party h = 0x0000 || identity_public || user_id, then 5200 times h = SHA-512(h || identity_public); 30 digits from the first 30 bytes (5-byte big-endian chunks mod 100000, zero-padded); the party with the smaller user id first.",
            "parties": [
                {"user_id": a, "ed25519_seed_hex": hex(&seed_a), "identity_public_hex": hex(ka.public().as_bytes()), "digits": half(&a, &ka)},
                {"user_id": b, "ed25519_seed_hex": hex(&seed_b), "identity_public_hex": hex(kb.public().as_bytes()), "digits": half(&b, &kb)},
            ],
            "safety_number": n.digits(),
            "display": n.to_string(),
        });
        check_vector_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/safety_v1.json"), &generated);
        // The stored keys give the stored number.
        let key =
            |i: usize| PublicKey::from_bytes(&unhex32(generated["parties"][i]["identity_public_hex"].as_str().unwrap())).unwrap();
        assert_eq!(safety_number(&b, &key(1), &a, &key(0)).digits(), generated["safety_number"].as_str().unwrap());
    }
}
