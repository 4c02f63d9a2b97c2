//! Parley client library.
//!
//! - [`Client`]: unauthenticated; registers accounts and logs devices in, giving a [`Session`].
//! - [`Api`]: every authenticated HTTP endpoint (devices, send, read, sync, presence, privacy).
//! - [`Connection`] + [`Events`]: the device's WebSocket, run by a background task that
//!   reconnects with backoff and resumes from the last handled inbox position, acknowledges
//!   automatically, heartbeats, drops repeated messages and re-sends unanswered sends with
//!   the same `client_msg_id` after a reconnect.
//! - [`e2ee::E2eeMachine`]: end-to-end encryption with no I/O, over a typed
//!   [`e2ee::CryptoStore`] (the SQLite [`store::Store`], or [`e2ee::MemoryStore`]);
//!   [`messenger::Messenger`] drives it with the connection and the HTTP API.
//!
//! The wire types come from [`parley_spec`], re-exported as [`spec`]; the ones an application
//! needs most are re-exported at the crate root.
//!
//! ```no_run
//! # async fn demo() -> Result<(), parley_sdk::Error> {
//! use parley_sdk::{Client, ConnectOptions, Connection, Event, RegisterRequest};
//!
//! let client = Client::new("http://127.0.0.1:8008")?;
//! let session = client.register(RegisterRequest::new("alice", "correct horse battery")).await?;
//! let (conn, mut events) = Connection::open(&session, ConnectOptions::default()).await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         conn.read(m.sender.clone(), vec![m.id]).await?;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Logging uses `tracing` at debug level and never includes access tokens or message
//! contents.

mod client;
mod connection;
pub mod e2ee;
mod error;
pub mod groups;
mod http;
pub mod media;
pub mod messenger;
pub mod store;

pub use client::{Client, Session};
pub use connection::{ConnectOptions, Connection, Event, Events};
pub use error::Error;
pub use http::Api;

/// The protocol crate, for every wire type.
pub use parley_spec as spec;

pub use parley_spec::{
    v1::{
        account::{LoginRequest, RegisterRequest, WhoAmIResponse},
        content::{Attachment, Thumbnail},
        devices::{DeviceInfo, DevicesResponse, UserDevicesResponse},
        events::{InboxEvent, MessageEvent, ReceiptEvent, ReceiptKind, SequencedEvent},
        messages::{Envelope, ReadRequest, SendRequest, SentResponse},
        presence::{PresenceInfo, PresenceStatus, SubscriptionsResponse, Visibility},
        sync::SyncResponse,
        ws::TypingNotice,
    },
    DeviceId, ErrorBody, ErrorCode, Seq, ServerMsgId, Timestamp, UserId,
};
