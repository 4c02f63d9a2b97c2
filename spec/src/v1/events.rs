//! Inbox events: what a device receives, over the WebSocket (`event` frames) or `GET /v1/sync`.
//! Each device has its own inbox with a sequence number per entry: the sync cursor.

use crate::{v1::Timestamp, Base64Bytes, DeviceId, Seq, ServerMsgId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An entry of a device's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum InboxEvent {
    /// A message for this device (sent by someone else, or by the user's own other device).
    Message(MessageEvent),
    /// A delivered or read receipt for messages the user sent (or, with `by` = the user
    /// itself, a read marker set on another of the user's devices).
    Receipt(ReceiptEvent),
}

/// A message, as the target device receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct MessageEvent {
    /// `server_msg_id` on the sender's server; with `sender`'s server name, the global id.
    #[schema(value_type = u64)]
    pub id: ServerMsgId,
    /// Who sent it.
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The conversation's recipient (differs from the receiving user on the sender's own devices).
    pub to: UserId,
    /// When the sender's server stored it.
    pub ts: Timestamp,
    /// The ciphertext for this device.
    pub ciphertext: Base64Bytes,
}

/// Which receipt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// A device of the recipient acknowledged receipt.
    Delivered,
    /// The recipient marked the messages read.
    Read,
}

/// A receipt for a set of messages of `sender`'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ReceiptEvent {
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// The user who received or read the messages.
    pub by: UserId,
    /// For `delivered`, the device that acknowledged; for `read`, the device that marked.
    pub by_device: DeviceId,
    /// Whose messages these are.
    pub sender: UserId,
    /// The messages' `server_msg_id`s.
    #[schema(value_type = Vec<u64>)]
    pub message_ids: Vec<ServerMsgId>,
    /// When the server recorded the receipt.
    pub ts: Timestamp,
}

impl ReceiptEvent {
    /// Builds a receipt.
    pub fn new(
        kind: ReceiptKind,
        by: UserId,
        by_device: DeviceId,
        sender: UserId,
        message_ids: Vec<ServerMsgId>,
        ts: Timestamp,
    ) -> Self {
        Self { kind, by, by_device, sender, message_ids, ts }
    }
}

impl MessageEvent {
    /// Builds a message event.
    pub fn new(id: ServerMsgId, sender: UserId, sender_device: DeviceId, to: UserId, ts: Timestamp, ciphertext: Vec<u8>) -> Self {
        Self { id, sender, sender_device, to, ts, ciphertext: Base64Bytes(ciphertext) }
    }
}

/// An inbox event with its sequence number in the device's inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SequencedEvent {
    /// Position in this device's inbox (strictly increasing, gaps allowed).
    #[schema(value_type = u64)]
    pub seq: Seq,
    /// The event.
    pub event: InboxEvent,
}

impl SequencedEvent {
    /// Builds a sequenced event.
    pub fn new(seq: Seq, event: InboxEvent) -> Self {
        Self { seq, event }
    }
}
