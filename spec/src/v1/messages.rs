//! Sending: `POST /v1/send` (the HTTP twin of the WebSocket `send` frame) and `POST /v1/read`
//! (the twin of the `read` frame).

use crate::{error::ErrorBody, v1::Timestamp, Base64Bytes, DeviceId, ServerMsgId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// One ciphertext for one target device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Envelope {
    /// Owner of the target device: the recipient, or the sender (for the sender's other devices).
    pub user: UserId,
    /// The target device.
    pub device: DeviceId,
    /// Opaque to the server (end-to-end encrypted by the client).
    pub ciphertext: Base64Bytes,
}

impl Envelope {
    /// Builds an envelope.
    pub fn new(user: UserId, device: DeviceId, ciphertext: Vec<u8>) -> Self {
        Self { user, device, ciphertext: Base64Bytes(ciphertext) }
    }
}

/// A 1:1 message: one envelope per device of the recipient and per other device of the sender.
///
/// The server checks the envelope set against the current devices and answers
/// `devices_mismatch` (with the difference) when it does not match, so a client can never
/// silently leave a device out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SendRequest {
    /// Chosen by the client (UUID). Retrying with the same id never makes a second message.
    pub client_msg_id: Uuid,
    /// The recipient.
    pub to: UserId,
    /// One envelope per target device.
    pub envelopes: Vec<Envelope>,
    /// Media ids of files on the sender's server that the message carries (at most
    /// [`MAX_MESSAGE_MEDIA`]): the server keeps each file at least until every local device the
    /// message went to has acknowledged it (`spec/media.md` §5), if the sender holds a
    /// reference to it. Unknown ids are ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<String>,
    /// A temporary chat's message: its `media` go from the server once every local device
    /// the message went to has downloaded them (`spec/media.md` §5), rather than when their
    /// references expire. Ignored for a message to another server's user.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub media_once: bool,
}

/// The most media ids one message may name.
pub const MAX_MESSAGE_MEDIA: usize = 16;

impl SendRequest {
    /// Builds a send request.
    pub fn new(client_msg_id: Uuid, to: UserId, envelopes: Vec<Envelope>) -> Self {
        Self { client_msg_id, to, envelopes, media: Vec::new(), media_once: false }
    }

    /// The request naming files it carries (`media`); `once` for a temporary chat's files.
    pub fn with_media(mut self, media: Vec<String>, once: bool) -> Self {
        self.media = media;
        self.media_once = once;
        self
    }
}

/// The `sent` receipt: the message is durably stored and will be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SentResponse {
    /// Echo of the request's id.
    pub client_msg_id: Uuid,
    /// The server's id for the message: with the sender's server name, its global name.
    #[schema(value_type = u64)]
    pub server_msg_id: ServerMsgId,
    /// When the server stored it.
    pub ts: Timestamp,
    /// True when this answers a retry of a message that was already stored.
    #[serde(default)]
    pub duplicate: bool,
}

impl SentResponse {
    /// Builds the response.
    pub fn new(client_msg_id: Uuid, server_msg_id: ServerMsgId, ts: Timestamp, duplicate: bool) -> Self {
        Self { client_msg_id, server_msg_id, ts, duplicate }
    }
}

/// Marks messages from `peer` as read: the read receipt goes to every device of `peer`, and
/// the caller's other devices learn it too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReadRequest {
    /// The sender of the messages that were read.
    pub peer: UserId,
    /// Their `server_msg_id`s (at most 1,000 per request). Only messages `peer` sent to the
    /// caller count; other ids are dropped, and none left is `bad_request`.
    #[schema(value_type = Vec<u64>)]
    pub message_ids: Vec<ServerMsgId>,
}

impl ReadRequest {
    /// Builds a read marker.
    pub fn new(peer: UserId, message_ids: Vec<ServerMsgId>) -> Self {
        Self { peer, message_ids }
    }
}

/// Most message ids in one read marker or receipt.
pub const MAX_READ_IDS: usize = 1000;

/// POST /v1/send
#[utoipa::path(post, path = "/v1/send", tag = "messages", security(("bearer" = [])),
    request_body = SendRequest,
    responses(
        (status = 200, description = "Stored (`sent`)", body = SentResponse),
        (status = 400, description = "`bad_json`, `bad_request`", body = ErrorBody),
        (status = 404, description = "`unknown_user`", body = ErrorBody),
        (status = 409, description = "`devices_mismatch`", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    ))]
pub fn send_message() {}

/// POST /v1/read
#[utoipa::path(post, path = "/v1/read", tag = "messages", security(("bearer" = [])),
    request_body = ReadRequest,
    responses(
        (status = 204, description = "Receipts queued durably"),
        (status = 400, description = "`bad_request` (also: none of the ids is a message `peer` sent to the caller)", body = ErrorBody),
        (status = 404, description = "`unknown_user`", body = ErrorBody),
    ))]
pub fn mark_read() {}

crate::endpoint::endpoint! {
    /// `POST /v1/send`: stores a message for every device of the recipient.
    SendMessage: Post "/v1/send", AccessToken, SendRequest => SentResponse
}
crate::endpoint::endpoint! {
    /// `POST /v1/read`: marks messages of a peer as read.
    MarkRead: Post "/v1/read", AccessToken, ReadRequest => ()
}
