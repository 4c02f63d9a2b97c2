//! What is inside a 1:1 ciphertext once decrypted: the end-to-end content. The server never
//! sees these types; they travel encrypted in [`crate::v1::messages::Envelope::ciphertext`].
//!
//! The same JSON is the plaintext of an MLS group application message (`spec/groups.md` §3):
//! there it is [`Content::GroupText`] or [`Content::GroupMeta`]. Group metadata and policy (name,
//! topic, admins, member limit) travel only this way, encrypted to the members; no server table
//! holds them.
//!
//! A file travels as [`Content::File`] (1:1) or [`Content::GroupFile`]: the ciphertext is on a
//! media server (`spec/media.md`), the message carries where it is and what decrypts it
//! ([`Attachment`]), and, for an image, a small thumbnail made by the sender.

use crate::{Base64Bytes, UserId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroize as _;

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
    /// A file (with an optional caption).
    File(FileContent),
    /// A file in a group (with an optional caption).
    GroupFile(GroupFileContent),
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

/// A file sent 1:1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FileContent {
    /// As in [`TextContent::client_msg_id`].
    pub client_msg_id: Uuid,
    /// As in [`TextContent::to`].
    pub to: UserId,
    /// The file.
    pub file: Attachment,
    /// Text sent with it (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caption: String,
}

impl FileContent {
    /// Builds a file message.
    pub fn new(client_msg_id: Uuid, to: UserId, file: Attachment, caption: impl Into<String>) -> Self {
        Self { client_msg_id, to, file, caption: caption.into() }
    }
}

/// A file sent to a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupFileContent {
    /// As in [`GroupTextContent::client_msg_id`].
    pub client_msg_id: Uuid,
    /// The file.
    pub file: Attachment,
    /// Text sent with it (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caption: String,
}

impl GroupFileContent {
    /// Builds a group file message.
    pub fn new(client_msg_id: Uuid, file: Attachment, caption: impl Into<String>) -> Self {
        Self { client_msg_id, file, caption: caption.into() }
    }
}

/// A file on a media server, as a message names it (`spec/media.md`): where to fetch the
/// ciphertext and how to check and decrypt it. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Attachment {
    /// The server that stores it (the sender's homeserver).
    pub server: String,
    /// Its media id: the lowercase hex SHA-256 of the ciphertext.
    pub media_id: String,
    /// Key, ciphertext hash, size and type.
    pub media: MediaRef,
    /// The file's name as the sender had it (a receiver must not use it as a path unchecked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An image's width and height in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<(u32, u32)>,
    /// A small preview of an image, made by the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<Thumbnail>,
}

impl Attachment {
    /// An attachment without name, dimensions or thumbnail.
    pub fn new(server: impl Into<String>, media_id: impl Into<String>, media: MediaRef) -> Self {
        Self { server: server.into(), media_id: media_id.into(), media, name: None, dimensions: None, thumbnail: None }
    }

    /// With the file's name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// With an image's dimensions and preview.
    pub fn with_image(mut self, dimensions: (u32, u32), thumbnail: Option<Thumbnail>) -> Self {
        self.dimensions = Some(dimensions);
        self.thumbnail = thumbnail;
        self
    }
}

/// A small preview image, inside the encrypted message itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Thumbnail {
    /// Its MIME type (`image/jpeg`).
    pub mime: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The encoded image.
    pub data: Base64Bytes,
}

impl Thumbnail {
    /// Builds a thumbnail.
    pub fn new(mime: impl Into<String>, width: u32, height: u32, data: Vec<u8>) -> Self {
        Self { mime: mime.into(), width, height, data: data.into() }
    }
}

/// What decrypts a file and pins its ciphertext (`parley-crypto::media` checks and uses it).
///
/// ```json
/// {"key": "<base64, 32 bytes>", "nonce_prefix": "<base64, 7 bytes>",
///  "sha256": "<base64, 32 bytes: SHA-256 of the ciphertext>", "size": 1234, "mime": "image/png"}
/// ```
///
/// The key bytes are zeroized when the value is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MediaRef {
    /// The ChaCha20-Poly1305 key (32 bytes).
    pub key: Base64Bytes,
    /// The STREAM nonce prefix (7 bytes).
    pub nonce_prefix: Base64Bytes,
    /// SHA-256 of the ciphertext (32 bytes).
    pub sha256: Base64Bytes,
    /// Plaintext size in bytes.
    pub size: u64,
    /// MIME type of the plaintext, as the sender declared it.
    pub mime: String,
}

impl MediaRef {
    /// Builds a reference from its parts.
    pub fn from_parts(key: Vec<u8>, nonce_prefix: Vec<u8>, sha256: Vec<u8>, size: u64, mime: impl Into<String>) -> Self {
        Self { key: key.into(), nonce_prefix: nonce_prefix.into(), sha256: sha256.into(), size, mime: mime.into() }
    }
}

impl Drop for MediaRef {
    fn drop(&mut self) {
        self.key.0.zeroize();
    }
}
