//! [`E2eeMachine`]: end-to-end encryption for one device, with no I/O (matrix-sdk-crypto's
//! `OlmMachine` is the model). Input is pushed in, work to do is pulled out, and the driver
//! reports how that work went:
//!
//! - **Pushed in:** received messages ([`E2eeMachine::receive_message`]) and receipts
//!   ([`E2eeMachine::receive_receipt`]), messages to send ([`E2eeMachine::enqueue_text`]),
//!   prekeys running low ([`E2eeMachine::replenish_prekeys`]).
//! - **Pulled out:** [`OutgoingRequest`]s, each with a [`RequestId`]: fetch a signed device
//!   list, claim prekey bundles, send envelopes, upload keys. The driver performs one and hands
//!   the answer (or a [`Failure`]) to [`E2eeMachine::mark_request_done`], which returns the next
//!   request of the same piece of work or says it is [`Done`]. Events for the application
//!   ([`MessengerEvent`]) queue up until [`E2eeMachine::take_events`].
//!
//! State lives in a [`CryptoStore`] (the SQLite profile store, or [`MemoryStore`] in tests);
//! randomness comes from the injected RNG; time is passed in. The methods are async only over
//! the store: none waits for the network, so a driver can hold the machine behind a lock for
//! the length of one call without ever holding it across a network round trip. Each call
//! reads what it needs from the store again, so state changed by other calls between two steps
//! of one piece of work (a session that an incoming message started while keys were being
//! claimed, say) is taken into account.
//!
//! Invariants:
//! - Nothing is encrypted to a device that is not in a verified device list, and a session
//!   start is accepted only from a device whose listed identity key made it.
//! - A device list is verified against the identity key pinned on first contact and against
//!   the last version accepted; a rollback, an equivocation or a changed identity is
//!   [`Untrust`], reported as an event and an error.
//! - A first message (session start) is accepted once; a one-time prekey secret is deleted
//!   once used; a newer session supersedes an older one, which keeps decrypting what is still
//!   in flight on it.
//! - An outbox entry leaves the outbox only when the server answered `sent` or refused it for
//!   good; it is sent by one piece of work at a time, always with the same `client_msg_id`.
//!
//! **The seam for groups.** Everything here is the 1:1 (Double Ratchet) path. MLS groups plug
//! in at three places, marked `MLS:` below: a group message kind next to the 1:1 ciphertext in
//! [`E2eeMachine::receive_message`], a group content kind next to [`Content::Text`] in the
//! content dispatch, and a `GroupStore` part of [`CryptoStore`] with group requests (key
//! packages, commits) as more [`OutgoingRequest`] variants.

mod error;
mod keys;
mod memory;
mod outbox;
mod receive;
mod store;
mod trust;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use error::{BundleError, CryptoError, E2eeError, Failure, Undecryptable, Untrust};
pub use memory::MemoryStore;
pub use store::{
    AccountStore, CryptoStore, InitialMessageId, MessageStore, OutboxEntry, PrekeyKind, SessionSlot, SessionStore, StoreError,
    SupersededSession, TrustStore, PREVIOUS_SESSIONS_KEPT,
};

pub(crate) use outbox::is_permanent;

use crate::groups::{GroupMessage, GroupProblem};
use crate::store::StoredMessage;
use outbox::SendJob;
use parley_crypto::identity::{DeviceIdentity, UserIdentity, VerifiedDeviceList};
use parley_crypto::PublicKey;
#[cfg(doc)]
use parley_spec::v1::content::Content;
use parley_spec::v1::events::{MessageEvent, ReceiptEvent};
use parley_spec::v1::keys::{ClaimRequest, ClaimResponse, SignedDeviceList, UploadKeysRequest};
use parley_spec::v1::messages::{SendRequest, SentResponse};
use parley_spec::v1::presence::PresenceInfo;
use parley_spec::v1::ws::TypingNotice;
use parley_spec::{DeviceId, ErrorCode, GroupId, ServerMsgId, UserId};
use rand::{CryptoRng, RngCore};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use uuid::Uuid;

/// What the application sees.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessengerEvent {
    /// A decrypted message (from someone else, or a copy of one sent from another own device).
    Message(StoredMessage),
    /// One of our messages reached a device of the recipient.
    Delivered {
        /// The recipient.
        by: UserId,
        /// Server ids of the messages.
        message_ids: Vec<ServerMsgId>,
    },
    /// The recipient read our messages.
    Read {
        /// The recipient.
        by: UserId,
        /// Server ids of the messages.
        message_ids: Vec<ServerMsgId>,
    },
    /// An outbox message was stored by the server.
    Sent {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's id.
        server_msg_id: ServerMsgId,
    },
    /// A contact's verified device list changed.
    DevicesChanged {
        /// Whose.
        user: UserId,
        /// Devices added.
        added: Vec<DeviceId>,
        /// Devices removed.
        removed: Vec<DeviceId>,
    },
    /// Something the server sent about `user` cannot be trusted (changed identity key, rollback,
    /// forged or equivocating device list, mismatching keys). Nothing is encrypted to or accepted
    /// from the devices concerned until it is resolved.
    Untrusted {
        /// Whose keys.
        user: UserId,
        /// What was wrong.
        reason: Untrust,
    },
    /// A contact's presence (on connect, and on each change).
    Presence(PresenceInfo),
    /// Someone is typing to this user (or stopped).
    Typing(TypingNotice),
    /// An outbox message was refused for good by the server and removed from the outbox.
    SendFailed {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's error code.
        code: ErrorCode,
    },
    /// A ciphertext could not be decrypted (tampered, replayed, or from an unknown session).
    Undecryptable {
        /// Sender.
        sender: UserId,
        /// Sender's device.
        device: DeviceId,
        /// Why.
        reason: Undecryptable,
    },
    /// This device joined a group (from a Welcome, every member vouched for).
    GroupJoined {
        /// The group.
        group_id: GroupId,
        /// Who added it.
        by: UserId,
    },
    /// A message from another member (or another own device) in a group.
    GroupMessage(GroupMessage),
    /// A commit changed who is in a group (users with their first device added, users with
    /// their last device removed).
    GroupMembersChanged {
        /// The group.
        group_id: GroupId,
        /// Users who joined.
        added: Vec<UserId>,
        /// Users who left.
        removed: Vec<UserId>,
    },
    /// A group moved to a new MLS epoch (after every merged commit).
    GroupEpoch {
        /// The group.
        group_id: GroupId,
        /// The new epoch.
        epoch: u64,
    },
    /// A member told the group's name (end-to-end encrypted).
    GroupRenamed {
        /// The group.
        group_id: GroupId,
        /// The name.
        name: String,
    },
    /// An admin changed a group's policy (topic, admins, member limit; end-to-end encrypted).
    GroupPolicyChanged {
        /// The group.
        group_id: GroupId,
        /// The policy now.
        policy: crate::groups::GroupPolicy,
    },
    /// A commit removed this device from a group: nothing more arrives from it.
    GroupRemoved {
        /// The group.
        group_id: GroupId,
    },
    /// Something in a group could not be accepted: a member nobody vouches for (the commit is
    /// not merged and the group is stuck), an unreadable message, a gap in the stream.
    GroupProblem {
        /// The group.
        group_id: GroupId,
        /// What.
        reason: GroupProblem,
    },
}

/// Names one [`OutgoingRequest`]; its answer is reported under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(u64);

/// Work for the driver: one network request.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum OutgoingRequest {
    /// Fetch `user`'s signed device list (`GET /v1/keys/device_list/{user}`); answer
    /// [`Response::DeviceList`].
    FetchDeviceList {
        /// Report the answer under this id.
        id: RequestId,
        /// Whose list.
        user: UserId,
    },
    /// Claim prekey bundles (`POST /v1/keys/claim`); answer [`Response::KeysClaimed`].
    ClaimKeys {
        /// Report the answer under this id.
        id: RequestId,
        /// The devices.
        request: ClaimRequest,
    },
    /// Send envelopes (over the WebSocket); answer [`Response::Sent`].
    Send {
        /// Report the answer under this id.
        id: RequestId,
        /// The envelopes, one per target device, with the outbox entry's `client_msg_id`.
        request: SendRequest,
    },
    /// Upload keys (`POST /v1/keys/upload`); answer [`Response::KeysUploaded`].
    UploadKeys {
        /// Report the answer under this id.
        id: RequestId,
        /// The keys (their secrets are stored already).
        request: UploadKeysRequest,
    },
}

impl OutgoingRequest {
    /// The id to report its answer under.
    pub fn id(&self) -> RequestId {
        match self {
            Self::FetchDeviceList { id, .. }
            | Self::ClaimKeys { id, .. }
            | Self::Send { id, .. }
            | Self::UploadKeys { id, .. } => *id,
        }
    }
}

/// A successful answer to an [`OutgoingRequest`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Response {
    /// To [`OutgoingRequest::FetchDeviceList`].
    DeviceList(SignedDeviceList),
    /// To [`OutgoingRequest::ClaimKeys`].
    KeysClaimed(ClaimResponse),
    /// To [`OutgoingRequest::Send`].
    Sent(SentResponse),
    /// To [`OutgoingRequest::UploadKeys`].
    KeysUploaded,
}

/// What to do after a step.
#[derive(Debug)]
#[must_use]
// Moved on at once after each step; boxing the request would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Progress {
    /// The same piece of work needs this request next.
    Next(OutgoingRequest),
    /// The piece of work is finished.
    Done(Done),
}

/// How a piece of work ended (its events are queued).
#[derive(Debug)]
#[non_exhaustive]
pub enum Done {
    /// A received message was handled: stored and reported, a repeat, or reported
    /// undecryptable.
    Received,
    /// A device list asked for with [`E2eeMachine::fetch_device_list`] was verified and stored.
    DeviceList(Box<VerifiedDeviceList>),
    /// An outbox entry was stored by the server and left the outbox.
    Sent {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's id.
        server_msg_id: ServerMsgId,
    },
    /// An outbox entry was refused for good and left the outbox.
    Refused {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's code.
        code: ErrorCode,
    },
    /// The outbox entry is being sent by another piece of work already.
    AlreadySending,
    /// Keys were uploaded.
    KeysUploaded,
    /// The last request failed, so the work stopped; an outbox entry stays queued for a later
    /// attempt.
    Failed(Failure),
}

/// What a request is part of.
enum Pending {
    /// A device list fetch, and what waits for it.
    DeviceList { user: UserId, then: AfterList },
    /// Bundles for a send.
    ClaimKeys(SendJob),
    /// The send itself.
    Send(SendJob),
    /// A key upload.
    UploadKeys,
}

/// What waits for a device list.
enum AfterList {
    /// The caller of [`E2eeMachine::fetch_device_list`].
    Report,
    /// An outbox entry being sent.
    Send(SendJob),
    /// A received session start from that user.
    Receive(MessageEvent),
}

/// End-to-end encryption for one device, over a [`CryptoStore`] `S` and an RNG `R`. See the
/// module documentation.
pub struct E2eeMachine<S, R> {
    store: S,
    rng: R,
    user_id: UserId,
    device_id: DeviceId,
    identity: UserIdentity,
    device: DeviceIdentity,
    /// Verified device lists loaded or fetched (the store has them too; this saves verifying
    /// them again on every send).
    lists: BTreeMap<UserId, VerifiedDeviceList>,
    next_request: u64,
    pending: BTreeMap<RequestId, Pending>,
    /// Receipts that named messages whose `sent` answer was still on its way: applied again
    /// as sends complete.
    deferred_receipts: Vec<ReceiptEvent>,
    /// Outbox entries some piece of work is sending.
    sending: BTreeSet<Uuid>,
    events: VecDeque<MessengerEvent>,
}

impl<S, R> std::fmt::Debug for E2eeMachine<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("E2eeMachine")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<S, R> E2eeMachine<S, R> {
    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// This device's user.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// This device.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// The user's identity public key (for safety numbers).
    pub fn identity_key(&self) -> PublicKey {
        self.identity.public()
    }

    /// The events queued since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<MessengerEvent> {
        self.events.drain(..).collect()
    }

    /// Whether a request is waiting for its answer.
    pub fn is_pending(&self, id: RequestId) -> bool {
        self.pending.contains_key(&id)
    }
}

impl<S: CryptoStore, R: RngCore + CryptoRng + Send> E2eeMachine<S, R> {
    /// A machine for a new device: saves its identity and device keys in `store`.
    pub async fn create(
        store: S,
        rng: R,
        user_id: UserId,
        device_id: DeviceId,
        identity: UserIdentity,
        device: DeviceIdentity,
    ) -> Result<Self, E2eeError> {
        store.save_account(&identity, &device).await?;
        Ok(Self::new(store, rng, user_id, device_id, identity, device))
    }

    /// A machine for a device set up before (its keys are in `store`).
    pub async fn open(store: S, rng: R, user_id: UserId, device_id: DeviceId) -> Result<Self, E2eeError> {
        let (identity, device) = store.account().await?.ok_or(E2eeError::NoAccount)?;
        Ok(Self::new(store, rng, user_id, device_id, identity, device))
    }

    fn new(store: S, rng: R, user_id: UserId, device_id: DeviceId, identity: UserIdentity, device: DeviceIdentity) -> Self {
        Self {
            store,
            rng,
            user_id,
            device_id,
            identity,
            device,
            lists: BTreeMap::new(),
            next_request: 0,
            pending: BTreeMap::new(),
            deferred_receipts: Vec::new(),
            sending: BTreeSet::new(),
            events: VecDeque::new(),
        }
    }

    /// Reports how request `id` went; returns what the work it belongs to needs next. Every
    /// request handed out must be reported exactly once.
    pub async fn mark_request_done(&mut self, id: RequestId, answer: Result<Response, Failure>) -> Result<Progress, E2eeError> {
        let pending = self.pending.remove(&id).ok_or(E2eeError::UnexpectedAnswer(id))?;
        let matches = matches!(
            (&pending, &answer),
            (_, Err(_))
                | (Pending::DeviceList { .. }, Ok(Response::DeviceList(_)))
                | (Pending::ClaimKeys(_), Ok(Response::KeysClaimed(_)))
                | (Pending::Send(_), Ok(Response::Sent(_)))
                | (Pending::UploadKeys, Ok(Response::KeysUploaded))
        );
        if !matches {
            // Put it back: the driver mixed up its answers; the work itself is intact.
            self.pending.insert(id, pending);
            return Err(E2eeError::UnexpectedAnswer(id));
        }
        let job = match &pending {
            Pending::ClaimKeys(job) | Pending::Send(job) | Pending::DeviceList { then: AfterList::Send(job), .. } => {
                Some(job.client_msg_id())
            }
            _ => None,
        };
        let was_send = matches!(pending, Pending::Send(_));
        let result = self.dispatch(pending, answer).await;
        if let Some(client_msg_id) = job {
            self.settle(client_msg_id, &result);
        }
        if was_send && !self.pending.values().any(|p| matches!(p, Pending::Send(_))) {
            // No `sent` answer is on its way any more: what a receipt named and matched none of
            // our messages by now never will.
            self.deferred_receipts.clear();
        }
        result
    }

    async fn dispatch(&mut self, pending: Pending, answer: Result<Response, Failure>) -> Result<Progress, E2eeError> {
        match (pending, answer) {
            (Pending::DeviceList { user, then }, Ok(Response::DeviceList(list))) => {
                self.on_device_list(user, Ok(list), then).await
            }
            (Pending::DeviceList { user, then }, Err(failure)) => self.on_device_list(user, Err(failure), then).await,
            (Pending::ClaimKeys(job), Ok(Response::KeysClaimed(claimed))) => self.on_keys_claimed(job, claimed).await,
            (Pending::ClaimKeys(_), Err(failure)) => Ok(Progress::Done(Done::Failed(failure))),
            (Pending::Send(job), Ok(Response::Sent(sent))) => self.on_sent(job, sent).await,
            (Pending::Send(job), Err(failure)) => self.on_send_failed(job, failure).await,
            (Pending::UploadKeys, Ok(Response::KeysUploaded)) => Ok(Progress::Done(Done::KeysUploaded)),
            (Pending::UploadKeys, Err(failure)) => Ok(Progress::Done(Done::Failed(failure))),
            // Checked by the caller.
            (_, Ok(_)) => unreachable!("answer of the wrong type"),
        }
    }

    /// Registers `pending` under a new id and returns the request `make` builds with it.
    fn request(&mut self, pending: Pending, make: impl FnOnce(RequestId) -> OutgoingRequest) -> OutgoingRequest {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.pending.insert(id, pending);
        make(id)
    }

    fn emit(&mut self, event: MessengerEvent) {
        self.events.push_back(event);
    }

    /// Reports `reason` about `user` as an event and returns it as an error.
    fn untrusted(&mut self, user: &UserId, reason: Untrust) -> E2eeError {
        self.emit(MessengerEvent::Untrusted { user: user.clone(), reason: reason.clone() });
        E2eeError::Untrusted { user: user.clone(), reason }
    }
}

/// A fresh random message id from `rng` (a version-4 UUID).
fn new_uuid(rng: &mut (impl RngCore + CryptoRng)) -> Uuid {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}
