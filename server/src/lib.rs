//! The Parley homeserver: HTTP + WebSocket client API, accounts and devices, inboxes,
//! receipts, presence, rate limits, metrics and storage. The binary `parleyd` is
//! [`cli::main`].

pub(crate) mod admin;
pub(crate) mod api;
pub mod app;
pub(crate) mod auth;
pub mod certs;
pub mod cli;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod devnet;
pub(crate) mod directory;
pub(crate) mod error;
pub(crate) mod federation;
pub(crate) mod groups;
pub(crate) mod hub;
pub(crate) mod media;
/// The S3 client the media store uses, for measuring a store without the server (`parley-media-bench`).
pub use media::{s3_store, MediaError};
pub(crate) mod messaging;
pub(crate) mod metrics;
pub(crate) mod outgoing;
pub(crate) mod presence;
pub(crate) mod proxy;
pub(crate) mod push;
pub(crate) mod ratelimit;
pub(crate) mod storage;
pub(crate) mod ws;
