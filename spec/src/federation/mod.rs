//! The server-to-server (federation) API. Version 1 lives in [`v1`]: the key document
//! ([`v1::keys`]), transactions, items and queries ([`v1::transaction`]) and prekey claims
//! ([`v1::claim`]); the prose — signatures, discovery, retry semantics — is
//! `spec/federation.md`.

pub mod v1;
