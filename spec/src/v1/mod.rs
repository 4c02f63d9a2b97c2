//! Version 1 of the client API. See `spec/client-api.md` for the prose.
//!
//! One module per area; each endpoint has its request/response types and an OpenAPI stub
//! function named after the handler (`register`, `send_message`, ...) whose doc line is
//! `METHOD /path`.

pub mod account;
pub mod content;
pub mod devices;
pub mod events;
pub mod groups;
pub mod keypackages;
pub mod keys;
pub mod media;
pub mod messages;
pub mod presence;
pub mod push;
pub mod sync;
pub mod ws;

pub use crate::numbers::Timestamp;
