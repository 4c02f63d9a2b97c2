//! Parley cryptography, with no I/O: canonical encoding of anything that is signed or hashed,
//! ed25519 signatures, parsing of peers' public keys, device identity and signed device lists, 1:1 sessions (X3DH + Double
//! Ratchet) and the prekey secrets a client keeps for them, safety numbers and chunked media
//! encryption. Primitives come from vetted crates (ed25519-dalek, x25519-dalek,
//! chacha20poly1305, hkdf, hmac, sha2); this crate composes them. Randomness comes in through
//! `rand_core` RNG parameters so tests can be deterministic.

pub mod canonical;
pub mod identity;
pub mod keys;
pub mod media;
pub mod prekeys;
pub mod ratchet;
pub mod safety;
pub mod signing;
pub mod x3dh;

pub use canonical::canonical_json;
pub use signing::{KeyPair, PublicKey, SignatureError};
