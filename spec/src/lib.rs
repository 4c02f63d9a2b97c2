//! The Parley protocol: wire types for the client API, WebSocket frames, identifiers and error
//! codes. Every other crate speaks through these types; the Markdown next to them (`spec/*.md`)
//! explains them, and `spec/openapi.json` is generated from them (see [`openapi`]).
//!
//! This crate has no I/O and no async runtime: it is serde types, parsing and constants only
//! (plus [`Timestamp::now`], which reads the system clock).

pub mod base64bytes;
pub mod endpoint;
pub mod error;
pub mod federation;
pub mod ids;
pub mod numbers;
pub mod openapi;
pub mod v1;

pub use base64bytes::Base64Bytes;
pub use error::{ErrorBody, ErrorCode};
pub use ids::{DeviceId, GroupId, IdError, ServerName, UserId};
pub use numbers::{GroupSeq, OutOfRange, Seq, ServerMsgId, Timestamp};
