//! Server-to-server transactions and queries.
//!
//! - `PUT /_parley/federation/v1/send/{txn_id}` — a [`Transaction`]: a batch of items from the
//!   origin to the destination, idempotent by `(origin, txn_id)`. Answer: [`TransactionResponse`].
//! - `GET /_parley/federation/v1/users/{user_id}/devices` — [`UserDevices`] of a user of the
//!   destination.
//! - `POST /_parley/federation/v1/keys/claim` — see [`super::claim`].
//!
//! Every request is signed by the origin server (see `parley_federation::request`).

use crate::v1::events::ReceiptEvent;
use crate::v1::keys::SignedDeviceList;
use crate::v1::presence::PresenceInfo;
use crate::{Base64Bytes, DeviceId, ErrorBody, ServerMsgId, ServerName, Timestamp, UserId};
use serde::{Deserialize, Serialize};

/// Domain-separation prefix of origin signatures on relayed messages.
pub const MESSAGE_CONTEXT: &[u8] = b"parley federation message v1\0";

/// Most items in one transaction a server accepts.
pub const MAX_TXN_ITEMS: usize = 10_000;

/// Body of `PUT /_parley/federation/v1/send/{txn_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct Transaction {
    /// The sending server (must match the request signature's origin).
    pub origin: ServerName,
    /// When the origin built the transaction (ms).
    #[schema(value_type = u64)]
    pub origin_ts: Timestamp,
    /// The items, in the order the origin queued them.
    pub items: Vec<Item>,
}

impl Transaction {
    /// Builds a transaction.
    pub fn new(origin: ServerName, origin_ts: Timestamp, items: Vec<Item>) -> Self {
        Self { origin, origin_ts, items }
    }
}

/// A [`Transaction`] whose items are JSON already serialized: the origin stores each durable item
/// serialized once and sends it as it is. Serializes to exactly the JSON of the
/// [`Transaction`] with those items (a test checks this).
#[derive(Debug, Serialize)]
pub struct RawTransaction<'a> {
    /// The sending server.
    pub origin: &'a ServerName,
    /// When the origin built the transaction (ms).
    pub origin_ts: Timestamp,
    /// The items' JSON ([`Item`]), in order.
    pub items: Vec<&'a serde_json::value::RawValue>,
}

/// One thing a transaction carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Item {
    /// A 1:1 message for devices of a user of the destination, signed by the origin.
    Message(SignedMessage),
    /// A delivered or read receipt by a user of the origin for messages of a destination user.
    Receipt(ReceiptEvent),
    /// A typing notice (ephemeral: may be dropped).
    Typing(TypingItem),
    /// Presence of origin users for their subscribers on the destination (ephemeral).
    Presence(PresenceItem),
    /// A user of the origin follows presence of users of the destination.
    PresenceSubscription(PresenceSubscription),
    /// A user of the origin changed devices or published a new device list: forget cached copies.
    DeviceListChanged(DeviceListChanged),
    /// A message of a group whose hub is the origin (`spec/groups.md` §5).
    GroupMessage(super::groups::GroupMessageItem),
    /// Receipt markers of a group: of the origin's users (to the group's hub), or of any members
    /// (from the hub to the participating servers).
    GroupReceipts(crate::v1::groups::GroupReceipts),
}

impl Item {
    /// Typing and presence may be dropped when the destination stays unreachable.
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, Self::Typing(_) | Self::Presence(_))
    }
}

/// One device's ciphertext in a relayed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FedEnvelope {
    /// The target device of `to`.
    pub device: DeviceId,
    /// Opaque ciphertext.
    pub ciphertext: Base64Bytes,
}

impl FedEnvelope {
    /// Builds an envelope.
    pub fn new(device: DeviceId, ciphertext: Vec<u8>) -> Self {
        Self { device, ciphertext: ciphertext.into() }
    }
}

/// A message as carried between servers. A message that another server than its origin relays
/// must carry the origin's signature (`signature` over [`MESSAGE_CONTEXT`] followed by the
/// canonical JSON of the object without `signature`, by the origin key `key_id`), which survives
/// relaying. The origin sending its own message directly leaves both out (empty here): the
/// request signature over the transaction already proves who wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SignedMessage {
    /// The message id on the origin (unique per origin server).
    #[schema(value_type = u64)]
    pub id: ServerMsgId,
    /// The sender (a user of `origin`).
    pub sender: UserId,
    /// The sending device.
    pub sender_device: DeviceId,
    /// The recipient (a user of the destination).
    pub to: UserId,
    /// When the origin accepted it (ms).
    #[schema(value_type = u64)]
    pub ts: Timestamp,
    /// One ciphertext per device of `to`.
    pub envelopes: Vec<FedEnvelope>,
    /// The signing server.
    pub origin: ServerName,
    /// Id of the origin key that signed (`ed25519:…`); absent on a message sent by its origin.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schema(required = false)]
    pub key_id: String,
    /// ed25519 signature (64 bytes); absent on a message sent by its origin.
    #[serde(default, skip_serializing_if = "Base64Bytes::is_empty")]
    #[schema(required = false)]
    pub signature: Base64Bytes,
}

impl SignedMessage {
    /// An unsigned message (empty signature: what the origin sends directly; a message to be
    /// relayed is signed with `parley_federation::message::sign_message`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ServerMsgId,
        sender: UserId,
        sender_device: DeviceId,
        to: UserId,
        ts: Timestamp,
        envelopes: Vec<FedEnvelope>,
        origin: ServerName,
        key_id: String,
    ) -> Self {
        Self { id, sender, sender_device, to, ts, envelopes, origin, key_id, signature: Base64Bytes(Vec::new()) }
    }
}

/// A typing notice across servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TypingItem {
    /// Who types (a user of the origin).
    pub from: UserId,
    /// To whom (a user of the destination).
    pub to: UserId,
    /// Started or stopped.
    pub typing: bool,
}

impl TypingItem {
    /// Builds a typing notice.
    pub fn new(from: UserId, to: UserId, typing: bool) -> Self {
        Self { from, to, typing }
    }
}

/// Presence of one origin user, as each listed destination user may see it (the origin applies
/// its user's privacy settings before sending).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PresenceItem {
    /// The presence (its `user` is a user of the origin).
    pub presence: PresenceInfo,
    /// Destination users who subscribed and may see it (the destination ignores any that did
    /// not subscribe to this user there).
    pub viewers: Vec<UserId>,
}

impl PresenceItem {
    /// Builds a presence item.
    pub fn new(presence: PresenceInfo, viewers: Vec<UserId>) -> Self {
        Self { presence, viewers }
    }
}

/// `subscriber` (a user of the origin) now follows exactly these users' presence among the
/// destination's users (replacing what it followed there before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PresenceSubscription {
    /// The subscribing user (of the origin).
    pub subscriber: UserId,
    /// Users of the destination.
    pub contacts: Vec<UserId>,
}

impl PresenceSubscription {
    /// Builds a subscription.
    pub fn new(subscriber: UserId, contacts: Vec<UserId>) -> Self {
        Self { subscriber, contacts }
    }
}

/// A user's devices changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeviceListChanged {
    /// The user (of the origin).
    pub user: UserId,
}

impl DeviceListChanged {
    /// Builds the notice.
    pub fn new(user: UserId) -> Self {
        Self { user }
    }
}

/// Answer to a transaction. Items the destination refused (unknown user, bad signature,
/// a user of another server) are listed; the rest were accepted. A refused item is not retried.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct TransactionResponse {
    /// Refused items.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedItem>,
}

/// An item the destination refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct RejectedItem {
    /// Index in `items`.
    pub index: usize,
    /// Stable error code (see `ErrorCode`).
    pub code: crate::ErrorCode,
    /// Why.
    pub message: String,
}

impl RejectedItem {
    /// Builds a rejection.
    pub fn new(index: usize, code: crate::ErrorCode, message: impl Into<String>) -> Self {
        Self { index, code, message: message.into() }
    }
}

/// A user's current devices on their homeserver, and their signed device list if published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct UserDevices {
    /// The user.
    pub user_id: UserId,
    /// Registered devices: a message to the user carries one envelope per device.
    pub devices: Vec<DeviceId>,
    /// The user's signed device list (clients verify it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_list: Option<SignedDeviceList>,
}

impl UserDevices {
    /// Builds the answer.
    pub fn new(user_id: UserId, devices: Vec<DeviceId>, device_list: Option<SignedDeviceList>) -> Self {
        Self { user_id, devices, device_list }
    }
}

/// PUT /_parley/federation/v1/send/{txn_id}
#[utoipa::path(put, path = "/_parley/federation/v1/send/{txn_id}", tag = "federation", security(("server_signatures" = [])),
    params(("txn_id" = String, Path, description = "The origin's transaction id (idempotency key with the origin)")),
    request_body = Transaction,
    responses(
        (status = 200, description = "Applied (or applied before); refused items listed", body = TransactionResponse),
        (status = 400, description = "`bad_json`, `bad_request` (more than 10,000 items)", body = ErrorBody),
        (status = 401, description = "`unsigned`, `bad_authorization`, `wrong_destination`, `stale_request`, `unknown_server_key`, `bad_signature`, `replayed_request`", body = ErrorBody),
        (status = 403, description = "`server_denied`, `forbidden` (`origin` is not the signing server)", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    ))]
pub fn send_transaction() {}

/// GET /_parley/federation/v1/users/{user_id}/devices
#[utoipa::path(get, path = "/_parley/federation/v1/users/{user_id}/devices", tag = "federation", security(("server_signatures" = [])),
    params(("user_id" = String, Path, description = "A user of the destination")),
    responses(
        (status = 200, body = UserDevices),
        (status = 401, description = "see `send`", body = ErrorBody),
        (status = 403, description = "`server_denied`", body = ErrorBody),
        (status = 404, description = "`unknown_user`", body = ErrorBody),
    ))]
pub fn get_user_devices() {}

crate::endpoint::endpoint! {
    /// `PUT /_parley/federation/v1/send/{txn_id}`: a transaction of items for the destination.
    SendTransaction: Put "/_parley/federation/v1/send/{txn_id}", ServerSignatures, Transaction => TransactionResponse
}
crate::endpoint::endpoint! {
    /// `GET /_parley/federation/v1/users/{user_id}/devices`.
    GetUserDevices: Get "/_parley/federation/v1/users/{user_id}/devices", ServerSignatures, () => UserDevices
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    #[test]
    fn a_raw_transaction_is_the_transaction() {
        let origin = ServerName::parse("a.test").unwrap();
        let items = vec![
            Item::Typing(TypingItem::new(UserId::parse("@alice:a.test").unwrap(), UserId::parse("@bob:b.test").unwrap(), true)),
            Item::DeviceListChanged(DeviceListChanged::new(UserId::parse("@alice:a.test").unwrap())),
        ];
        let stored: Vec<Box<RawValue>> =
            items.iter().map(|item| RawValue::from_string(serde_json::to_string(item).unwrap()).unwrap()).collect();
        let raw = RawTransaction {
            origin: &origin,
            origin_ts: Timestamp::from_millis(1_700_000_000_000),
            items: stored.iter().map(|i| &**i).collect(),
        };
        let typed = Transaction::new(origin.clone(), Timestamp::from_millis(1_700_000_000_000), items);
        assert_eq!(serde_json::to_string(&raw).unwrap(), serde_json::to_string(&typed).unwrap());
        let empty = RawTransaction { origin: &origin, origin_ts: Timestamp::from_millis(1), items: Vec::new() };
        assert_eq!(serde_json::to_string(&empty).unwrap(), r#"{"origin":"a.test","origin_ts":1,"items":[]}"#);
    }

    #[test]
    fn a_message_sent_by_its_origin_carries_no_signature_and_a_signed_one_keeps_it() {
        let mut message = SignedMessage::new(
            ServerMsgId::new(7),
            UserId::parse("@alice:a.test").unwrap(),
            DeviceId::parse("DEVA").unwrap(),
            UserId::parse("@bob:b.test").unwrap(),
            Timestamp::from_millis(1),
            vec![FedEnvelope::new(DeviceId::parse("DEVB").unwrap(), b"c".to_vec())],
            ServerName::parse("a.test").unwrap(),
            String::new(),
        );
        let direct = serde_json::to_string(&Item::Message(message.clone())).unwrap();
        assert_eq!(
            direct,
            r#"{"type":"message","id":7,"sender":"@alice:a.test","sender_device":"DEVA","to":"@bob:b.test","ts":1,"envelopes":[{"device":"DEVB","ciphertext":"Yw=="}],"origin":"a.test"}"#
        );
        assert_eq!(serde_json::from_str::<Item>(&direct).unwrap(), Item::Message(message.clone()));
        message.key_id = "ed25519:k".into();
        message.signature = vec![1; 64].into();
        let signed = serde_json::to_string(&Item::Message(message.clone())).unwrap();
        assert!(signed.ends_with(r#""origin":"a.test","key_id":"ed25519:k","signature":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=="}"#), "{signed}");
        assert_eq!(serde_json::from_str::<Item>(&signed).unwrap(), Item::Message(message));
    }
}
