//! Parley cryptography, with no I/O: canonical encoding of anything that is signed or hashed,
//! ed25519 signatures, parsing of peers' public keys, device identity and signed device lists, 1:1 sessions (X3DH + Double
//! Ratchet) and the prekey secrets a client keeps for them, MLS groups, safety numbers and
//! chunked media encryption. Primitives come from vetted crates (ed25519-dalek, x25519-dalek,
//! chacha20poly1305, hkdf, hmac, sha2); this crate composes them. Randomness comes in through
//! `rand_core` RNG parameters so tests can be deterministic.
//!
//! [`mls`] wraps openmls (RFC 9420, pinned to 0.9.2 with `openmls_rust_crypto` and
//! `openmls_traits`) in an API of our own, so no other crate touches an openmls type: one
//! ciphersuite, credentials that name a user and device with the device's ed25519 key as the
//! signature key, wire artifacts as bytes, typed errors, and state in a storage provider the
//! caller supplies; the hub follows a group's public state with `mls::HubGroup`. openmls draws its randomness from the operating system and reads the clock
//! for leaf lifetimes; everything else here stays deterministic.

pub mod canonical;
pub mod identity;
pub mod keys;
pub mod media;
pub mod mls;
pub mod prekeys;
pub mod push;
pub mod ratchet;
pub mod safety;
pub mod signing;
pub mod x3dh;

pub use canonical::canonical_json;
pub use signing::{KeyPair, PublicKey, SignatureError};
