//! MLS groups: `POST /v1/groups` (create), `POST /v1/groups/{group_id}/send` (submit one MLS
//! message), `GET /v1/groups/{group_id}/events` (the device's group stream, for resync) and
//! `GET /v1/groups` (the device's groups). Prose: `spec/groups.md`.
//!
//! A group's hub is the server named in its id (`!local:hub`). Every submission goes to the hub
//! (through the sender's own server, over federation when the hub is elsewhere), which checks it
//! against the group's public MLS state, gives it the next [`GroupSeq`] and fans it out once per
//! participating server. Devices receive the group stream as WebSocket `group_event` frames
//! ([`GroupEvent`]) from their cursor on, and acknowledge with `group_ack`.

use crate::error::ErrorBody;
use crate::{Base64Bytes, DeviceId, GroupId, GroupSeq, Timestamp, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Body of `POST /v1/groups`: a new group hubbed on this server, from its creator's epoch-0
/// state (the creator's device is the only member).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CreateGroupRequest {
    /// The group's id, chosen by the creator (its hub must be this server): the MLS group id is
    /// the UTF-8 of this string, so the client needs it before it creates the MLS group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// The GroupInfo of epoch 0 (an `MLSMessage`), signed by the creator.
    pub group_info: Base64Bytes,
    /// The ratchet tree of epoch 0 (TLS-serialized).
    pub ratchet_tree: Base64Bytes,
}

impl CreateGroupRequest {
    /// Builds the request.
    pub fn new(group_id: GroupId, group_info: Vec<u8>, ratchet_tree: Vec<u8>) -> Self {
        Self { group_id, group_info: Base64Bytes(group_info), ratchet_tree: Base64Bytes(ratchet_tree) }
    }
}

/// Answer to `POST /v1/groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct CreateGroupResponse {
    /// The new group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
}

impl CreateGroupResponse {
    /// Builds the answer.
    pub fn new(group_id: GroupId) -> Self {
        Self { group_id }
    }
}

/// Body of `POST /v1/groups/{group_id}/send`: one MLS message for the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupSendRequest {
    /// Chosen by the client. The same id from the same device is answered with the same
    /// `group_seq` and stored once.
    pub client_msg_id: Uuid,
    /// The `MLSMessage`: an application message (a `PrivateMessage`) or a commit (a
    /// `PublicMessage`).
    pub message: Base64Bytes,
    /// With a commit: the GroupInfo of the epoch it creates, signed by the committer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_info: Option<Base64Bytes>,
    /// With a commit that adds members: its Welcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub welcome: Option<Base64Bytes>,
    /// Media ids of files on the sender's server that an application message carries (at most
    /// [`MAX_MESSAGE_MEDIA`](crate::v1::messages::MAX_MESSAGE_MEDIA)): the sender's server keeps
    /// each until every one of its member devices has the message (`spec/media.md` §5). The
    /// sender's server does not pass them on to the hub.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media: Vec<String>,
}

impl GroupSendRequest {
    /// An application message.
    pub fn application(client_msg_id: Uuid, message: Vec<u8>) -> Self {
        Self { client_msg_id, message: Base64Bytes(message), group_info: None, welcome: None, media: Vec::new() }
    }

    /// The request naming files it carries (`media`).
    pub fn with_media(mut self, media: Vec<String>) -> Self {
        self.media = media;
        self
    }

    /// A commit, with the GroupInfo of its epoch and its Welcome if it adds members.
    pub fn commit(client_msg_id: Uuid, commit: Vec<u8>, group_info: Vec<u8>, welcome: Option<Vec<u8>>) -> Self {
        Self {
            client_msg_id,
            message: Base64Bytes(commit),
            group_info: Some(Base64Bytes(group_info)),
            welcome: welcome.map(Base64Bytes),
            media: Vec::new(),
        }
    }
}

/// Answer to a group submission: the hub stored it durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupSentResponse {
    /// Echo of the request's id.
    pub client_msg_id: Uuid,
    /// The message's position in the group's stream.
    #[schema(value_type = u64)]
    pub group_seq: GroupSeq,
    /// The epoch the message belongs to (for a commit: the epoch it was sent in, so the new
    /// epoch is this plus one).
    pub epoch: u64,
    /// When the hub stored it.
    #[schema(value_type = u64)]
    pub ts: Timestamp,
    /// True when this answers a retry of a message that was already stored.
    #[serde(default)]
    pub duplicate: bool,
}

impl GroupSentResponse {
    /// Builds the answer.
    pub fn new(client_msg_id: Uuid, group_seq: GroupSeq, epoch: u64, ts: Timestamp, duplicate: bool) -> Self {
        Self { client_msg_id, group_seq, epoch, ts, duplicate }
    }
}

/// What a group event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum GroupEventKind {
    /// An MLS application message (a `PrivateMessage`).
    Application,
    /// An MLS commit (a `PublicMessage`): every member processes it, in order.
    Commit,
    /// An MLS proposal (a `PublicMessage`): a member asks to remove its own user's devices (it
    /// leaves). Every member stores it; the commit that ends the epoch must include it.
    Proposal,
    /// For a device that a commit added: the commit's Welcome (in `message`) and the ratchet
    /// tree of the new epoch (in `ratchet_tree`), at the commit's position. The device's
    /// stream starts here.
    Welcome,
}

impl GroupEventKind {
    /// The kind as it appears on the wire and in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Application => "application",
            Self::Commit => "commit",
            Self::Proposal => "proposal",
            Self::Welcome => "welcome",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "application" => Self::Application,
            "commit" => Self::Commit,
            "proposal" => Self::Proposal,
            "welcome" => Self::Welcome,
            _ => return None,
        })
    }
}

/// One message of a group's stream, as a device receives it (WebSocket `group_event`, and
/// `GET /v1/groups/{group_id}/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupEvent {
    /// The group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// Its position in the group's stream.
    #[schema(value_type = u64)]
    pub group_seq: GroupSeq,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// What it is.
    pub kind: GroupEventKind,
    /// Who submitted it, as its server vouches (for application messages the MLS signature
    /// inside is what proves it).
    pub sender: UserId,
    /// The submitting device.
    pub sender_device: DeviceId,
    /// The sender's id for it.
    pub client_msg_id: Uuid,
    /// The `MLSMessage` (for `welcome`: the Welcome).
    pub message: Base64Bytes,
    /// For `welcome` only: the ratchet tree of the epoch the Welcome leads to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratchet_tree: Option<Base64Bytes>,
    /// When the hub stored it.
    #[schema(value_type = u64)]
    pub ts: Timestamp,
}

impl GroupEvent {
    /// Builds an event (`ratchet_tree` only for a `welcome`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        group_id: GroupId,
        group_seq: GroupSeq,
        epoch: u64,
        kind: GroupEventKind,
        sender: UserId,
        sender_device: DeviceId,
        client_msg_id: Uuid,
        message: Vec<u8>,
        ratchet_tree: Option<Vec<u8>>,
        ts: Timestamp,
    ) -> Self {
        Self {
            group_id,
            group_seq,
            epoch,
            kind,
            sender,
            sender_device,
            client_msg_id,
            message: Base64Bytes(message),
            ratchet_tree: ratchet_tree.map(Base64Bytes),
            ts,
        }
    }
}

impl GroupEventsResponse {
    /// Builds the answer.
    pub fn new(events: Vec<GroupEvent>, more: bool) -> Self {
        Self { events, more }
    }
}

impl GroupSummary {
    /// Builds a summary.
    pub fn new(group_id: GroupId, acked: GroupSeq, latest: GroupSeq) -> Self {
        Self { group_id, acked, latest }
    }
}

impl GroupListResponse {
    /// Builds the answer.
    pub fn new(groups: Vec<GroupSummary>) -> Self {
        Self { groups }
    }
}

/// A member's receipt markers in a group: the highest position one of the user's devices
/// received (`delivered`) and read (`read`). A message at position `p` was delivered to (read
/// by) every member whose marker is at least `p`: receipts are counted per message from the
/// markers, never sent per member and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupReceipt {
    /// The member.
    pub user: UserId,
    /// The highest position one of the user's devices received.
    #[schema(value_type = u64)]
    pub delivered: GroupSeq,
    /// The highest position one of the user's devices read.
    #[schema(value_type = u64)]
    pub read: GroupSeq,
}

impl GroupReceipt {
    /// Builds a marker.
    pub fn new(user: UserId, delivered: GroupSeq, read: GroupSeq) -> Self {
        Self { user, delivered, read }
    }
}

/// Receipt markers of a group that moved (WebSocket `group_receipts`, and the federation item
/// of the same name): batched, at most once per `limits.group_receipt_interval_ms` per server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupReceipts {
    /// The group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// The markers that moved (at most [`MAX_GROUP_RECEIPTS`]).
    pub receipts: Vec<GroupReceipt>,
}

impl GroupReceipts {
    /// Builds the batch.
    pub fn new(group_id: GroupId, receipts: Vec<GroupReceipt>) -> Self {
        Self { group_id, receipts }
    }
}

/// Most markers in one `group_receipts` frame or item.
pub const MAX_GROUP_RECEIPTS: usize = 5000;

/// Query of `GET /v1/groups/{group_id}/events`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[non_exhaustive]
pub struct GroupEventsQuery {
    /// Events after this position (0: from the device's first).
    #[serde(default)]
    #[param(value_type = u64)]
    pub after: GroupSeq,
    /// At most this many (default and maximum [`MAX_GROUP_EVENTS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl GroupEventsQuery {
    /// The events after `after`.
    pub fn after(after: GroupSeq) -> Self {
        Self { after, limit: None }
    }
}

/// Most events in one answer of `GET /v1/groups/{group_id}/events`.
pub const MAX_GROUP_EVENTS: u32 = 500;

/// Answer to `GET /v1/groups/{group_id}/events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupEventsResponse {
    /// The events, in order.
    pub events: Vec<GroupEvent>,
    /// Whether more events follow the last one.
    pub more: bool,
}

/// One of the device's groups in `GET /v1/groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupSummary {
    /// The group.
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// The device's cursor: the last position it acknowledged.
    #[schema(value_type = u64)]
    pub acked: GroupSeq,
    /// The last position this server holds for the group.
    #[schema(value_type = u64)]
    pub latest: GroupSeq,
}

/// Answer to `GET /v1/groups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct GroupListResponse {
    /// The groups the device is a member of (or was removed from but has not acknowledged the
    /// removal yet).
    pub groups: Vec<GroupSummary>,
}

/// POST /v1/groups
#[utoipa::path(post, path = "/v1/groups", tag = "groups", security(("bearer" = [])),
    request_body = CreateGroupRequest,
    responses(
        (status = 200, description = "Created", body = CreateGroupResponse),
        (status = 400, description = "`bad_json`, `bad_request` (the hub is another server), `bad_mls_message`", body = ErrorBody),
        (status = 409, description = "`group_exists`", body = ErrorBody),
    ))]
pub fn create_group() {}

/// POST /v1/groups/{group_id}/send
#[utoipa::path(post, path = "/v1/groups/{group_id}/send", tag = "groups", security(("bearer" = [])),
    params(("group_id" = String, Path, description = "The group")),
    request_body = GroupSendRequest,
    responses(
        (status = 200, description = "Stored by the hub", body = GroupSentResponse),
        (status = 400, description = "`bad_json`, `bad_request`, `bad_mls_message`", body = ErrorBody),
        (status = 403, description = "`not_a_member`, `group_full`", body = ErrorBody),
        (status = 404, description = "`unknown_group`", body = ErrorBody),
        (status = 409, description = "`epoch_conflict` (with `current_epoch`)", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 502, description = "`remote_unavailable`: the hub cannot be reached", body = ErrorBody),
    ))]
pub fn group_send() {}

/// GET /v1/groups/{group_id}/events
#[utoipa::path(get, path = "/v1/groups/{group_id}/events", tag = "groups", security(("bearer" = [])),
    params(("group_id" = String, Path, description = "The group"), GroupEventsQuery),
    responses(
        (status = 200, body = GroupEventsResponse),
        (status = 403, description = "`not_a_member`", body = ErrorBody),
    ))]
pub fn group_events() {}

/// GET /v1/groups
#[utoipa::path(get, path = "/v1/groups", tag = "groups", security(("bearer" = [])),
    responses((status = 200, body = GroupListResponse)))]
pub fn list_groups() {}

crate::endpoint::endpoint! {
    /// `POST /v1/groups`: creates a group hubbed on this server.
    CreateGroup: Post "/v1/groups", AccessToken, CreateGroupRequest => CreateGroupResponse
}
crate::endpoint::endpoint! {
    /// `POST /v1/groups/{group_id}/send`: one MLS message, to the hub.
    GroupSend: Post "/v1/groups/{group_id}/send", AccessToken, GroupSendRequest => GroupSentResponse
}
crate::endpoint::endpoint! {
    /// `GET /v1/groups/{group_id}/events`: the device's group stream after a position.
    GroupEvents: Get "/v1/groups/{group_id}/events", AccessToken, GroupEventsQuery => GroupEventsResponse
}
crate::endpoint::endpoint! {
    /// `GET /v1/groups`: the device's groups.
    ListGroups: Get "/v1/groups", AccessToken, () => GroupListResponse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_event_is_named_as_in_the_spec() {
        let event = GroupEvent {
            group_id: GroupId::parse("!g:hub.test").unwrap(),
            group_seq: GroupSeq::new(42),
            epoch: 7,
            kind: GroupEventKind::Application,
            sender: UserId::parse("@alice:a.test").unwrap(),
            sender_device: DeviceId::parse("DEV").unwrap(),
            client_msg_id: Uuid::nil(),
            message: Base64Bytes(b"m".to_vec()),
            ratchet_tree: None,
            ts: Timestamp::from_millis(5),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["kind"], "application");
        assert_eq!(json["group_seq"], 42);
        assert!(json.get("ratchet_tree").is_none());
        for kind in [GroupEventKind::Application, GroupEventKind::Commit, GroupEventKind::Proposal, GroupEventKind::Welcome] {
            assert_eq!(GroupEventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
    }
}
