//! Groups across servers (prose: `spec/groups.md` §5).
//!
//! - `POST /_parley/federation/v1/groups/{group_id}/submit` — a member's server hands its user's
//!   submission to the group's hub ([`GroupSubmission`]); the answer is the hub's
//!   [`GroupSentResponse`] or its error, which the member's server passes on to its client.
//! - Transaction item `group_message` ([`GroupMessageItem`], hub → each participating server,
//!   through the durable queue, once per server per message). A server accepts it only from the
//!   group's hub.

use crate::error::DeviceRef;
use crate::v1::groups::{GroupEventKind, GroupSendRequest, GroupSentResponse};
use crate::{Base64Bytes, DeviceId, GroupId, GroupSeq, Timestamp, UserId};
use serde::{Deserialize, Serialize};

/// Body of `POST /_parley/federation/v1/groups/{group_id}/submit`: a user of the origin submits
/// one MLS message to the group (the origin authenticated the user's device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupSubmission {
    /// The submitting user (a user of the origin).
    pub sender: UserId,
    /// The submitting device.
    pub sender_device: DeviceId,
    /// What the device sent.
    pub request: GroupSendRequest,
}

impl GroupSubmission {
    /// Builds a submission.
    pub fn new(sender: UserId, sender_device: DeviceId, request: GroupSendRequest) -> Self {
        Self { sender, sender_device, request }
    }
}

/// A message of a group's stream, from the group's hub to a participating server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct GroupMessageItem {
    /// The group (its hub must be the transaction's origin).
    #[schema(value_type = String)]
    pub group_id: GroupId,
    /// Position in the group's stream.
    #[schema(value_type = u64)]
    pub group_seq: GroupSeq,
    /// The epoch it was sent in.
    pub epoch: u64,
    /// `application` or `commit` (never `welcome`: Welcomes ride with their commit).
    pub kind: GroupEventKind,
    /// The submitting user.
    pub sender: UserId,
    /// The submitting device.
    pub sender_device: DeviceId,
    /// The sender's id for it.
    pub client_msg_id: uuid::Uuid,
    /// The `MLSMessage`.
    pub message: Base64Bytes,
    /// When the hub stored it (ms).
    #[schema(value_type = u64)]
    pub ts: Timestamp,
    /// For a commit: the devices it adds, as the hub read them from the verified commit. The
    /// destination starts the stream of its own devices among them here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<DeviceRef>,
    /// For a commit: the devices it removes. The destination ends the stream of its own devices
    /// among them after this commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<DeviceRef>,
    /// For a commit that adds devices of the destination: its Welcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub welcome: Option<Base64Bytes>,
    /// With `welcome`: the ratchet tree of the new epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratchet_tree: Option<Base64Bytes>,
}

impl GroupMessageItem {
    /// An item without membership changes (an application message, or a commit that only
    /// updates keys).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        group_id: GroupId,
        group_seq: GroupSeq,
        epoch: u64,
        kind: GroupEventKind,
        sender: UserId,
        sender_device: DeviceId,
        client_msg_id: uuid::Uuid,
        message: Vec<u8>,
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
            ts,
            added: Vec::new(),
            removed: Vec::new(),
            welcome: None,
            ratchet_tree: None,
        }
    }

    /// The same item with a commit's membership changes and, when it adds devices of the
    /// destination, its Welcome and the new ratchet tree.
    pub fn with_changes(self, added: Vec<DeviceRef>, removed: Vec<DeviceRef>, welcome: Option<(Vec<u8>, Vec<u8>)>) -> Self {
        let (welcome, ratchet_tree) = match welcome {
            Some((welcome, tree)) => (Some(Base64Bytes(welcome)), Some(Base64Bytes(tree))),
            None => (None, None),
        };
        Self { added, removed, welcome, ratchet_tree, ..self }
    }
}

/// POST /_parley/federation/v1/groups/{group_id}/submit
#[utoipa::path(post, path = "/_parley/federation/v1/groups/{group_id}/submit", tag = "federation",
    security(("server_signatures" = [])),
    params(("group_id" = String, Path, description = "The group (its hub is the destination)")),
    request_body = GroupSubmission,
    responses(
        (status = 200, description = "Stored by the hub", body = GroupSentResponse),
        (status = 400, description = "`bad_json`, `bad_request`, `bad_mls_message`", body = crate::ErrorBody),
        (status = 401, description = "see `send`", body = crate::ErrorBody),
        (status = 403, description = "`server_denied`, `forbidden` (`sender` is not a user of the origin), `not_a_member`, `group_full`", body = crate::ErrorBody),
        (status = 404, description = "`unknown_group`", body = crate::ErrorBody),
        (status = 409, description = "`epoch_conflict`", body = crate::ErrorBody),
    ))]
pub fn submit_group_message() {}

crate::endpoint::endpoint! {
    /// `POST /_parley/federation/v1/groups/{group_id}/submit`.
    SubmitGroupMessage: Post "/_parley/federation/v1/groups/{group_id}/submit", ServerSignatures, GroupSubmission => GroupSentResponse
}
