//! The Parley homeserver: HTTP + WebSocket client API, accounts and devices, inboxes,
//! receipts, presence, rate limits, metrics and storage. The binary `parleyd` is
//! [`cli::main`].

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod certs;
pub mod cli;
pub mod config;
pub mod devnet;
pub mod directory;
pub mod error;
pub mod federation;
pub mod hub;
pub mod messaging;
pub mod metrics;
pub mod outgoing;
pub mod presence;
pub mod ratelimit;
pub mod storage;
pub mod ws;
