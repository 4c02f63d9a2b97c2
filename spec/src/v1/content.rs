//! What is inside a 1:1 ciphertext once decrypted: the end-to-end content. The server never
//! sees these types; they travel encrypted in [`crate::v1::messages::Envelope::ciphertext`].
//!
//! The same JSON is the plaintext of an MLS group application message (`spec/groups.md` §3):
//! there it is [`Content::GroupText`] or [`Content::GroupMeta`]. Group metadata and policy (name,
//! topic, admins, member limit) travel only this way, encrypted to the members; no server table
//! holds them.

use crate::UserId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The decrypted content of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Content {
    /// A text message.
    Text(TextContent),
    /// A text message in a group (an MLS application message): the group is the MLS group the
    /// message was decrypted in, so it names no recipient.
    GroupText(GroupTextContent),
    /// The group's metadata and policy as set by an admin (an MLS application message): sent by
    /// the creator right after creating the group, by an admin when it changes, and again after
    /// each commit that adds members, who cannot read messages of epochs before they joined.
    GroupMeta(GroupMetaContent),
}

/// A text message in a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupTextContent {
    /// The sender's id for this message (the `client_msg_id` of the group submission that
    /// carried it), the same on every member's device.
    pub client_msg_id: Uuid,
    /// The text.
    pub body: String,
}

impl GroupTextContent {
    /// Builds a group text message.
    pub fn new(client_msg_id: Uuid, body: impl Into<String>) -> Self {
        Self { client_msg_id, body: body.into() }
    }
}

/// A group's metadata and policy, end-to-end encrypted to its members (`spec/groups.md` §3):
/// no server sees it. Members take it only from an admin (for a new member, from the member
/// who added it, who must be an admin), and refuse commits that break it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupMetaContent {
    /// The group's name.
    pub name: String,
    /// The group's topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// The users who may add members, remove other users' devices and change this metadata
    /// (the creator at first). Every member may update its own leaf, remove its own user's
    /// devices, and commit other members' requests to leave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<UserId>,
    /// The most member devices the admins allow (the hub enforces its own limit as well).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
}

impl GroupMetaContent {
    /// Metadata with a name only.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), topic: None, admins: Vec::new(), max_members: None }
    }

    /// The metadata with its topic, admins and member limit.
    pub fn with_policy(mut self, topic: Option<String>, admins: Vec<UserId>, max_members: Option<u32>) -> Self {
        self.topic = topic;
        self.admins = admins;
        self.max_members = max_members;
        self
    }
}

/// A text message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TextContent {
    /// The sender's id for this message (the `client_msg_id` of the `SendRequest` that carried
    /// it), so every device names it the same way, also before the server assigns an id.
    pub client_msg_id: Uuid,
    /// The conversation's other party as the sender sees it (lets the sender's own devices file
    /// the copy under the right conversation).
    pub to: UserId,
    /// The text.
    pub body: String,
}

impl TextContent {
    /// Builds a text message.
    pub fn new(client_msg_id: Uuid, to: UserId, body: impl Into<String>) -> Self {
        Self { client_msg_id, to, body: body.into() }
    }
}
