//! Parley federation. Sans I/O: the self-signed key document ([`server_keys`]), signed
//! server-to-server requests ([`request`]), origin signatures on relayed messages
//! ([`message`]), the logic of the outbound transaction queue with retry and backoff
//! ([`queue`], [`backoff`]) and discovery's decision tree ([`discovery`]'s `Resolver`, over a
//! lookup trait and a clock). With I/O: the homeserver's long-term signing key with rotation
//! ([`server_key`], a file in the data directory), discovery's DNS and `.well-known` lookups,
//! TLS material ([`tls`]) and the signed HTTPS client ([`transport`]). The queue's driver
//! (reading and writing the durable queue, sending) lives in the server, next to the database
//! it writes to.

pub mod backoff;
pub mod discovery;
pub mod message;
pub mod queue;
pub mod request;
pub mod server_key;
pub mod server_keys;
pub mod tls;
pub mod transport;

pub use request::{Authorization, RequestAuthError, SignedParts};
pub use server_key::{ServerKey, ServerKeyError};
pub use server_keys::{sign_server_keys, verify_server_keys, ServerKeysError};
