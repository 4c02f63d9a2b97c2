//! Parley federation. This issue provides the homeserver's long-term signing key (created on
//! first start, kept in the data directory); the signed server-to-server transport, discovery
//! and the outbound queue build on it in the federation issue.

pub mod server_key;

pub use server_key::{ServerKey, ServerKeyError};
