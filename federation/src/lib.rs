//! Parley federation: the homeserver's long-term signing key (created on first start, kept in
//! the data directory) and the signed server-to-server request scheme ([`request`]), both
//! sans I/O. Discovery, the HTTPS transport and the durable outbound queue build on them.

pub mod discovery;
pub mod message;
pub mod request;
pub mod server_key;
pub mod server_keys;
pub mod tls;
pub mod transport;

pub use request::{Authorization, RequestAuthError, SignedParts};
pub use server_key::{ServerKey, ServerKeyError};
pub use server_keys::{sign_server_keys, verify_server_keys, ServerKeysError};
