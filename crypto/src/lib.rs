//! Parley cryptography, with no I/O: canonical encoding of anything that is signed or hashed,
//! and ed25519 signatures over it. Later issues add device identity, 1:1 sessions, MLS groups
//! and media encryption here.

pub mod canonical;
pub mod signing;

pub use canonical::canonical_json;
pub use signing::{KeyPair, PublicKey, SignatureError};
