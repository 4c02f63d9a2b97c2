//! The WebSocket: `GET /v1/ws?since=N`, one per device, JSON text frames.
//!
//! Authenticate with `Authorization: Bearer <token>` on the upgrade request. The server first
//! sends `hello`, then every inbox event after `since` (and acknowledges everything up to it),
//! then `caught_up`, then live events. The client acknowledges with `ack` (cumulative), and
//! must send a frame (a `ping` if nothing else) at least every `heartbeat_interval_ms`; after
//! `heartbeat_timeout_ms` of silence the server closes the connection and the device counts
//! as offline.

use crate::{
    error::ErrorBody,
    v1::{
        events::SequencedEvent,
        groups::GroupEvent,
        messages::{ReadRequest, SendRequest, SentResponse},
        presence::PresenceInfo,
    },
    DeviceId, GroupId, GroupSeq, Seq, ServerMsgId, UserId,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

mod tagged;

/// Query of the WebSocket upgrade.
#[derive(Clone, Default, Serialize, Deserialize, IntoParams)]
#[non_exhaustive]
pub struct WsQuery {
    /// Resume after this inbox position (acknowledges everything up to it). 0 at first.
    #[serde(default)]
    #[param(value_type = u64)]
    pub since: Seq,
    /// For browsers, which cannot set headers on a WebSocket: the access token. Prefer the
    /// `Authorization` header everywhere else (URLs end up in logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
}

impl std::fmt::Debug for WsQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsQuery").field("since", &self.since).finish_non_exhaustive()
    }
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClientFrame {
    /// Send a message; answered by `sent` or `error` (with the same `client_msg_id`).
    Send(SendRequest),
    /// Everything up to `seq` was received: deletes it from the inbox (unless the server keeps
    /// history) and sends `delivered` receipts to the senders.
    Ack(AckFrame),
    /// Read marker: sends `read` receipts.
    Read(ReadFrame),
    /// Typing notification to a user's online devices. Never stored.
    Typing(TypingFrame),
    /// Heartbeat; answered by `pong`.
    Ping(PingFrame),
    /// Everything of a group up to `group_seq` was received (cumulative per group).
    GroupAck(GroupAckFrame),
    /// Everything of a group up to `group_seq` was read (the user's read marker).
    GroupRead(GroupAckFrame),
}

/// Identifies a client frame other than `send` (which has its `client_msg_id`): chosen by the
/// client, echoed in the `error` frame that answers it.
pub type FrameId = u64;

/// Cumulative acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AckFrame {
    /// The highest inbox position received.
    #[schema(value_type = u64)]
    pub seq: Seq,
    /// Echoed in the `error` frame if this frame fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl AckFrame {
    /// Builds an ack.
    pub fn new(seq: Seq) -> Self {
        Self { seq, id: None }
    }

    /// The same ack, identified by `id`.
    pub fn with_id(self, id: FrameId) -> Self {
        Self { id: Some(id), ..self }
    }
}

/// Cumulative acknowledgement (`group_ack`) or read marker (`group_read`) of a group's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupAckFrame {
    /// The group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// The highest position of the group's stream received.
    #[schema(value_type = u64)]
    pub group_seq: GroupSeq,
    /// Echoed in the `error` frame if this frame fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl GroupAckFrame {
    /// Builds a group ack.
    pub fn new(group_id: GroupId, group_seq: GroupSeq) -> Self {
        Self { group_id, group_seq, id: None }
    }
}

/// Read marker over the WebSocket: a [`ReadRequest`] with a frame id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ReadFrame {
    /// The sender of the messages that were read.
    pub peer: UserId,
    /// Their `server_msg_id`s (at most 1,000 per frame).
    #[schema(value_type = Vec<u64>)]
    pub message_ids: Vec<ServerMsgId>,
    /// Echoed in the `error` frame if this frame fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl ReadFrame {
    /// The frame of a read marker, identified by `id`.
    pub fn new(request: ReadRequest, id: Option<FrameId>) -> Self {
        Self { peer: request.peer, message_ids: request.message_ids, id }
    }

    /// The read marker without the frame id.
    pub fn into_request(self) -> ReadRequest {
        ReadRequest::new(self.peer, self.message_ids)
    }
}

/// Typing on or off, to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TypingFrame {
    /// The other user in the conversation.
    pub to: UserId,
    /// Whether the user is typing now.
    pub typing: bool,
    /// Echoed in the `error` frame if this frame fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl TypingFrame {
    /// Builds a typing notification.
    pub fn new(to: UserId, typing: bool) -> Self {
        Self { to, typing, id: None }
    }

    /// The same notification, identified by `id`.
    pub fn with_id(self, id: FrameId) -> Self {
        Self { id: Some(id), ..self }
    }
}

/// Heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PingFrame {
    /// Echoed in the `pong`.
    #[serde(default)]
    pub nonce: u64,
    /// Echoed in the `error` frame if this frame fails (a ping fails only when rate-limited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
}

impl PingFrame {
    /// Builds a ping.
    pub fn new(nonce: u64) -> Self {
        Self { nonce, id: None }
    }
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame {
    /// First frame on a connection.
    Hello(HelloFrame),
    /// An inbox event.
    Event(SequencedEvent),
    /// The backlog after `since` has been sent; what follows is live.
    CaughtUp(CaughtUpFrame),
    /// Answer to `send`: durably stored.
    Sent(SentResponse),
    /// Answer to a frame that failed. `client_msg_id` is set when it answers a `send`, `id`
    /// when it answers a frame that carried one.
    Error(ErrorFrame),
    /// Someone is typing to this user.
    Typing(TypingNotice),
    /// A contact's presence changed (or its current state, right after subscribing).
    Presence(PresenceInfo),
    /// Answer to `ping`.
    Pong(PingFrame),
    /// The device's one-time prekeys are running low: upload more (`POST /v1/keys/upload`).
    /// Sent on connect and after a claim, while the count is below the server's watermark.
    PrekeysLow(PrekeysLowFrame),
    /// The device's one-time KeyPackages are running low: upload more (`POST /v1/keypackages`).
    /// Sent on connect and after a claim, while the count is below the server's watermark.
    #[serde(rename = "keypackages_low")]
    KeyPackagesLow(KeyPackagesLowFrame),
    /// A message of one of the device's groups, in the group's order, from the device's group
    /// cursor on (the backlog before `caught_up`, then live).
    GroupEvent(GroupEvent),
    /// Receipt markers of members of one of the device's groups moved.
    GroupReceipts(crate::v1::groups::GroupReceipts),
}

/// [`ServerFrame::Event`] with its event as JSON already serialized: the server stores each inbox
/// event serialized once and sends it as it is, without parsing it again. Serializes to exactly
/// the JSON of `ServerFrame::Event(SequencedEvent { seq, event })` (a test checks this).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "event")]
pub struct RawEventFrame<'a> {
    /// Position in this device's inbox.
    pub seq: Seq,
    /// The event's JSON ([`crate::v1::events::InboxEvent`]).
    pub event: &'a serde_json::value::RawValue,
}

/// How many one-time prekeys the server still holds for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PrekeysLowFrame {
    /// Unclaimed one-time prekeys left.
    pub one_time_prekey_count: u32,
}

impl PrekeysLowFrame {
    /// Builds the frame.
    pub fn new(one_time_prekey_count: u32) -> Self {
        Self { one_time_prekey_count }
    }
}

/// How many one-time KeyPackages the server still holds for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct KeyPackagesLowFrame {
    /// Unclaimed one-time KeyPackages left.
    pub count: u32,
}

impl KeyPackagesLowFrame {
    /// Builds the frame.
    pub fn new(count: u32) -> Self {
        Self { count }
    }
}

/// First frame on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct HelloFrame {
    /// The authenticated user.
    pub user_id: UserId,
    /// The authenticated device.
    pub device_id: DeviceId,
    /// Send a frame at least this often.
    pub heartbeat_interval_ms: u64,
    /// The server closes the connection after this long without a frame.
    pub heartbeat_timeout_ms: u64,
}

impl HelloFrame {
    /// Builds a hello.
    pub fn new(user_id: UserId, device_id: DeviceId, heartbeat_interval_ms: u64, heartbeat_timeout_ms: u64) -> Self {
        Self { user_id, device_id, heartbeat_interval_ms, heartbeat_timeout_ms }
    }
}

/// The backlog is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct CaughtUpFrame {
    /// The inbox position of the last event sent so far (or `since`).
    #[schema(value_type = u64)]
    pub cursor: Seq,
}

impl CaughtUpFrame {
    /// Builds the frame.
    pub fn new(cursor: Seq) -> Self {
        Self { cursor }
    }
}

/// An error answering a frame. The connection stays open unless the server closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ErrorFrame {
    /// Set when answering a `send`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<Uuid>,
    /// The `id` of the frame this answers, when it had one (even if it was malformed, as long
    /// as it was a JSON object with a numeric `id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FrameId>,
    /// The error.
    #[serde(flatten)]
    pub error: ErrorBody,
}

impl ErrorFrame {
    /// Builds an error frame answering a `send`, or a frame without an id.
    pub fn new(client_msg_id: Option<Uuid>, error: ErrorBody) -> Self {
        Self { client_msg_id, id: None, error }
    }

    /// Builds an error frame answering the frame `id`.
    pub fn for_frame(id: Option<FrameId>, error: ErrorBody) -> Self {
        Self { client_msg_id: None, id, error }
    }
}

/// Someone is typing (or stopped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct TypingNotice {
    /// Who is typing.
    pub from: UserId,
    /// Typing now or stopped.
    pub typing: bool,
}

impl TypingNotice {
    /// Builds the notice.
    pub fn new(from: UserId, typing: bool) -> Self {
        Self { from, typing }
    }
}

/// GET /v1/ws
///
/// Upgrades to the device's WebSocket. Frames are described by `ClientFrame` and `ServerFrame`.
#[utoipa::path(get, path = "/v1/ws", tag = "realtime", security(("bearer" = [])), params(WsQuery),
    responses(
        (status = 101, description = "Switching protocols; frames follow"),
        (status = 401, description = "`missing_token`, `unknown_token`", body = ErrorBody),
    ))]
pub fn websocket() {}

crate::endpoint::endpoint! {
    /// `GET /v1/ws`: the WebSocket upgrade (the token may be in the query).
    WebSocket: Get "/v1/ws", AccessToken, WsQuery => ()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_reject_unknown_fields_and_types() {
        let ok = r#"{"type":"ack","seq":5}"#;
        assert_eq!(serde_json::from_str::<ClientFrame>(ok).unwrap(), ClientFrame::Ack(AckFrame::new(Seq::new(5))));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"ack","seq":5,"x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
        let send = r#"{"type":"send","client_msg_id":"7f1b7e4e-8f3a-4a53-9a8e-0d4cbb7b1f6e","to":"@bob:x.org","envelopes":[],"sender_device":"EVIL"}"#;
        assert!(serde_json::from_str::<ClientFrame>(send).is_err());
    }

    #[test]
    fn frame_ids_are_optional_and_round_trip() {
        let with = r#"{"type":"ack","seq":5,"id":9}"#;
        assert_eq!(serde_json::from_str::<ClientFrame>(with).unwrap(), ClientFrame::Ack(AckFrame::new(Seq::new(5)).with_id(9)));
        assert_eq!(serde_json::to_string(&ClientFrame::Ack(AckFrame::new(Seq::new(5)))).unwrap(), r#"{"type":"ack","seq":5}"#);
        let read = r#"{"type":"read","peer":"@bob:x.org","message_ids":[1],"id":3}"#;
        let ClientFrame::Read(frame) = serde_json::from_str::<ClientFrame>(read).unwrap() else { panic!("read") };
        assert_eq!(frame.id, Some(3));
        assert_eq!(frame.into_request().message_ids, vec![ServerMsgId::new(1)]);
        let error = ServerFrame::Error(ErrorFrame::for_frame(Some(3), ErrorBody::new(crate::ErrorCode::BadFrame, "x")));
        assert_eq!(serde_json::to_string(&error).unwrap(), r#"{"type":"error","id":3,"code":"bad_frame","message":"x"}"#);
    }

    #[test]
    fn the_keypackages_low_frame_is_named_as_in_the_spec() {
        let frame = ServerFrame::KeyPackagesLow(KeyPackagesLowFrame::new(3));
        assert_eq!(serde_json::to_string(&frame).unwrap(), r#"{"type":"keypackages_low","count":3}"#);
    }

    #[test]
    fn a_raw_event_frame_is_the_event_frame() {
        use crate::v1::events::{InboxEvent, MessageEvent};
        let event = InboxEvent::Message(MessageEvent::new(
            ServerMsgId::new(7),
            UserId::parse("@alice:a.test").unwrap(),
            DeviceId::parse("DEV").unwrap(),
            UserId::parse("@bob:b.test").unwrap(),
            crate::Timestamp::from_millis(1_700_000_000_000),
            b"ciphertext".to_vec(),
        ));
        let stored = serde_json::to_string(&event).unwrap();
        let raw = serde_json::value::RawValue::from_string(stored).unwrap();
        let frame = serde_json::to_string(&RawEventFrame { seq: Seq::new(42), event: &raw }).unwrap();
        let typed = serde_json::to_string(&ServerFrame::Event(SequencedEvent::new(Seq::new(42), event.clone()))).unwrap();
        assert_eq!(frame, typed);
        assert_eq!(
            serde_json::from_str::<ServerFrame>(&frame).unwrap(),
            ServerFrame::Event(SequencedEvent::new(Seq::new(42), event))
        );
    }
}
