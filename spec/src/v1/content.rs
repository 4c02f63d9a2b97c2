//! What is inside a 1:1 ciphertext once decrypted: the end-to-end content. The server never
//! sees these types; they travel encrypted in [`crate::v1::messages::Envelope::ciphertext`].

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
