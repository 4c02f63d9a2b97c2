//! The storage boundary of the [`E2eeMachine`](super::E2eeMachine): everything it must not lose,
//! behind typed traits, one per kind of state. [`CryptoStore`] is all of them together; the
//! SQLite profile store ([`crate::store::Store`]) and [`MemoryStore`](super::MemoryStore) (for
//! tests) implement it.
//!
//! The traits are async because the SQLite store is (sqlx). The machine awaits nothing else:
//! its methods are async over the store only, never over the network. Each method is one
//! small, local operation; the machine calls them one at a time, in order.
//!
//! The groups are the seam for what comes next: MLS group state joins as one more trait
//! (`GroupStore`: group states, pending commits, key packages) in [`CryptoStore`]'s list.

use parley_crypto::identity::{DeviceIdentity, UserIdentity, VerifiedDeviceList};
use parley_crypto::prekeys::PrekeySecret;
use parley_spec::v1::keys::SignedDeviceList;
use parley_spec::{DeviceId, ServerMsgId, Timestamp, UserId};
use std::future::Future;
use uuid::Uuid;
use zeroize::Zeroizing;

pub use crate::store::StoredMessage;

/// Superseded sessions kept per peer device.
pub const PREVIOUS_SESSIONS_KEPT: usize = 3;

/// The kinds of this device's prekeys (their ids are separate namespaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrekeyKind {
    /// The signed prekey (medium-term; named by every session start).
    Signed,
    /// A one-time prekey: deleted once a session start used it.
    OneTime,
    /// The signed last-resort prekey, used when the one-time prekeys ran out; kept.
    LastResort,
}

impl PrekeyKind {
    /// The name the SQLite store uses (`prekeys.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signed => "signed",
            Self::OneTime => "one_time",
            Self::LastResort => "last_resort",
        }
    }
}

/// Identifies one initial message (a session start): see
/// [`initial_message_id`](parley_crypto::prekeys::initial_message_id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InitialMessageId(pub [u8; 32]);

/// A message waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Its id (kept across retries, so the server stores it once).
    pub client_msg_id: Uuid,
    /// Recipient.
    pub to: UserId,
    /// Text (a file's caption).
    pub body: String,
    /// The file, for a file message.
    pub file: Option<parley_spec::v1::content::Attachment>,
    /// A temporary chat's file: the server deletes it once every device it went to downloaded
    /// it (`SendRequest.media_once`).
    pub media_once: bool,
}

/// A slot of a superseded session (higher is newer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionSlot(pub i64);

/// A superseded session with a peer device.
#[derive(Clone)]
pub struct SupersededSession {
    /// Where it is kept.
    pub slot: SessionSlot,
    /// The serialized session.
    pub state: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for SupersededSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupersededSession").field("slot", &self.slot).finish_non_exhaustive()
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The storage backend failed (I/O, SQLite).
    #[error("local store: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored record does not parse; names it.
    #[error("local store: damaged {0}")]
    Damaged(&'static str),
}

/// This device's own keys: the user identity, the device identity and the prekey secrets.
pub trait AccountStore: Send + Sync {
    /// The user identity and device keys, once saved.
    fn account(&self) -> impl Future<Output = Result<Option<(UserIdentity, DeviceIdentity)>, StoreError>> + Send;
    /// Saves the user identity and device keys (once, when the device is set up).
    fn save_account(
        &self,
        identity: &UserIdentity,
        device: &DeviceIdentity,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A prekey secret, unless deleted or never made.
    fn prekey(&self, kind: PrekeyKind, key_id: u32) -> impl Future<Output = Result<Option<PrekeySecret>, StoreError>> + Send;
    /// Saves a prekey secret.
    fn save_prekey(
        &self,
        kind: PrekeyKind,
        key_id: u32,
        secret: &PrekeySecret,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes a prekey secret (a used one-time prekey: forward secrecy).
    fn delete_prekey(&self, kind: PrekeyKind, key_id: u32) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The id the next one-time prekey gets, once one was made.
    fn next_one_time_prekey_id(&self) -> impl Future<Output = Result<Option<u32>, StoreError>> + Send;
    /// Records the id the next one-time prekey gets.
    fn set_next_one_time_prekey_id(&self, next: u32) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// 1:1 ratchet sessions with peer devices (serialized by
/// [`Session::to_bytes`](parley_crypto::ratchet::Session::to_bytes)), the superseded ones, and
/// the session starts already accepted.
pub trait SessionStore: Send + Sync {
    /// The current session with a peer device.
    fn session(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Option<Zeroizing<Vec<u8>>>, StoreError>> + Send;
    /// Saves the current session with a peer device.
    fn save_session(&self, user: &UserId, device: &DeviceId, state: &[u8])
        -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Moves the current session with a peer device to the superseded ones, keeping the newest
    /// [`PREVIOUS_SESSIONS_KEPT`]; nothing when there is none.
    fn archive_session(&self, user: &UserId, device: &DeviceId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The superseded sessions with a peer device, newest first.
    fn previous_sessions(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> impl Future<Output = Result<Vec<SupersededSession>, StoreError>> + Send;
    /// Saves a superseded session after it decrypted a message.
    fn save_previous_session(
        &self,
        user: &UserId,
        device: &DeviceId,
        slot: SessionSlot,
        state: &[u8],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Whether this session start was accepted before.
    fn initial_message_seen(&self, id: &InitialMessageId) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Remembers an accepted session start.
    fn mark_initial_message_seen(&self, id: &InitialMessageId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Verified device lists of contacts (and of the own user), each with its pinned identity key
/// and the version last seen (the checkpoint against rollback and equivocation).
pub trait TrustStore: Send + Sync {
    /// The list last accepted for `user`, as signed.
    fn device_list(&self, user: &UserId) -> impl Future<Output = Result<Option<SignedDeviceList>, StoreError>> + Send;
    /// Saves an accepted list (replacing the previous one of its user).
    fn save_device_list(&self, list: &VerifiedDeviceList) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forgets `user`'s list and pinned identity key (the next fetch pins what the server serves).
    fn forget_device_list(&self, user: &UserId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The outbox and the message history.
pub trait MessageStore: Send + Sync {
    /// Queues a message for sending (once per id).
    fn enqueue(&self, entry: &OutboxEntry, now: Timestamp) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The outbox, oldest first.
    fn outbox(&self) -> impl Future<Output = Result<Vec<OutboxEntry>, StoreError>> + Send;
    /// Removes an entry (answered `sent`, or refused for good).
    fn dequeue(&self, client_msg_id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Adds a message to the history; false if it was there already (same sender and id).
    fn add_message(&self, message: &StoredMessage) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Whether a message with this sender and server id is in the history already.
    fn has_server_message(
        &self,
        sender: &UserId,
        server_msg_id: ServerMsgId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Records the server's id and time for one of `sender`'s messages.
    fn mark_sent(
        &self,
        sender: &UserId,
        client_msg_id: Uuid,
        server_msg_id: ServerMsgId,
        ts: Timestamp,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Marks messages of `sender` in the conversation with `peer` (by server id) delivered or
    /// read; returns the ids marked, in the order given, each once.
    fn mark_receipt(
        &self,
        peer: &UserId,
        sender: &UserId,
        server_msg_ids: &[ServerMsgId],
        read: bool,
    ) -> impl Future<Output = Result<Vec<ServerMsgId>, StoreError>> + Send;
}

/// Everything the [`E2eeMachine`](super::E2eeMachine) keeps. MLS group state will be one more
/// supertrait here.
pub trait CryptoStore: AccountStore + SessionStore + TrustStore + MessageStore {}

impl<T: AccountStore + SessionStore + TrustStore + MessageStore> CryptoStore for T {}
