//! [`GroupMachine`]: MLS groups for one device, with no I/O, like [`E2eeMachine`] for 1:1
//! messages. It holds the device's [`MlsClient`] and the rules of the group protocol
//! (`spec/groups.md`); a driver ([`Messenger`](crate::messenger::Messenger)) performs the
//! network requests it hands out and feeds it the group stream.
//!
//! - **Receiving.** [`GroupMachine::receive`] takes the group stream (`group_event` frames, or
//!   `GET /v1/groups/{id}/events`) in `group_seq` order. It answers [`Received::Ack`] once what
//!   the event derived is stored (MLS state, history, cursor: one transaction), so the driver
//!   acknowledges only what is safe. An application message is decrypted; the device's own
//!   message is recognised by its sender and skipped (MLS cannot decrypt it; its history row
//!   only gets its position). Another member's commit is checked (every new leaf against its
//!   owner's verified signed device list) and merged, or refused: the group is then
//!   [`GroupState::Stuck`] and nothing after it is acknowledged. The device's own commit is
//!   merged when it comes back at its position, not when the hub answered, so messages
//!   ordered before it are read in the old epoch. A Welcome is joined once every member leaf
//!   is vouched for. Device lists the machine does not have are asked for
//!   ([`Received::NeedLists`]); a hole in the stream is reported ([`Received::Gap`]).
//! - **Sending.** [`GroupMachine::encrypt_text`] writes the message to history and returns the
//!   submission; commits ([`GroupMachine::commit_add`], [`GroupMachine::commit_remove`],
//!   [`GroupMachine::commit_prune`]) are kept as *pending* (one at a time per group, stored with the group so a lost answer is
//!   re-sent with the same id) until they come back; [`GroupMachine::commit_refused`] drops
//!   one that lost its epoch, so the driver catches up and rebuilds it.
//! - **Devices that left their owner's list.** Every commit also removes the member leaves
//!   that the device lists the driver hands in no longer vouch for (the user's list is given,
//!   and the leaf's device is not in it or has another key): `spec/groups.md` §2. Users whose
//!   list is not given are left alone, and so is this device's own leaf.
//! - **State.** Every operation writes the MLS client's state changes
//!   ([`MlsClient::take_state_changes`]) to the [`GroupStore`] before it returns, so a group
//!   survives a restart; if that write fails, the client is rebuilt from the stored state.
//!
//! Group metadata (the name) travels as an encrypted [`Content::GroupMeta`] message; no server
//! table holds it.

mod leave;
mod memory;
mod policy;
mod store;
#[cfg(test)]
mod tests;

pub use memory::MemoryGroupStore;
pub use policy::MetaChange;
pub use store::{Confirmation, GroupChanges, GroupMessage, GroupPolicy, GroupRecord, GroupState, GroupStore};

#[cfg(doc)]
use crate::e2ee::E2eeMachine;
use crate::e2ee::{MessengerEvent, StoreError};
use parley_crypto::identity::{DeviceIdentity, VerifiedDeviceList, DEVICE_IDENTITY_BYTES};
use parley_crypto::mls::MemoryStorage;
use parley_crypto::mls::{
    ErrorKind, Group, Incoming, IncomingCommit, KeyPackage, LeafIndex, Lifetime, Member, MemberChange, MemberLeaf,
};
use parley_crypto::mls::{MlsClient, MlsError, PendingJoin};
use parley_spec::v1::content::{Attachment, Content, GroupFileContent, GroupTextContent};
use parley_spec::v1::groups::{CreateGroupRequest, GroupEvent, GroupEventKind, GroupSendRequest, GroupSentResponse};
use parley_spec::v1::keypackages::UploadKeyPackagesRequest;
use parley_spec::{DeviceId, GroupId, GroupSeq, Timestamp, UserId};
use rand::RngCore;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use uuid::Uuid;

/// One-time KeyPackages a device keeps uploaded (the server's low watermark).
pub const KEY_PACKAGE_TARGET: u32 = 20;

/// How long a KeyPackage this device makes is valid, in seconds (30 days).
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 30 * 24 * 60 * 60;

/// Letters of a group id's random local part.
const LOCAL_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Length of a group id's random local part.
const LOCAL_LEN: usize = 16;

/// What went wrong in a group, as the application is told ([`MessengerEvent::GroupProblem`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupProblem {
    /// A commit or a Welcome brings in a leaf its user's signed device list does not vouch for.
    /// A commit is then not merged and the group is stuck; a Welcome is not joined.
    #[error("device {device} of {user} is not vouched for by its user's signed device list: {reason}")]
    UnvouchedMember {
        /// The user the leaf claims.
        user: UserId,
        /// The device the leaf claims.
        device: DeviceId,
        /// What the check found.
        reason: String,
    },
    /// A message could not be read (it is skipped).
    #[error("a group message could not be read: {0}")]
    Undecryptable(String),
    /// A commit could not be processed: the group cannot move on for this device.
    #[error("a commit could not be processed: {0}")]
    BadCommit(String),
    /// A commit or metadata breaks the group's policy (an add or a removal of another user's
    /// device by a member who is not an admin, the member limit, metadata from a non-admin). A
    /// commit is then not merged and the group is stuck; metadata is dropped.
    #[error("the group's policy forbids this: {0}")]
    PolicyViolation(String),
    /// A proposal could not be processed or breaks the group's rule (only the removal of the
    /// proposer's own devices): the group cannot move on for this device.
    #[error("a proposal could not be processed: {0}")]
    BadProposal(String),
    /// The decrypted message is of a kind this version does not know (it is skipped).
    #[error("a group message of an unknown kind")]
    UnknownContent,
    /// A Welcome could not be joined.
    #[error("cannot join: {0}")]
    JoinFailed(String),
    /// The stream skipped positions the server could not supply.
    #[error("the group's stream jumps from {cursor} to {next}")]
    Gap {
        /// The last position handled.
        cursor: GroupSeq,
        /// The position that arrived.
        next: GroupSeq,
    },
    /// A member's device list could not be fetched or verified.
    #[error("the device list of {user} is unavailable or untrusted: {reason}")]
    ListUnavailable {
        /// Whose list.
        user: UserId,
        /// Why.
        reason: String,
    },
}

/// Why a group operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An MLS operation on local state failed.
    #[error("MLS: {0}")]
    Mls(#[from] MlsError),
    /// This device has no such group.
    #[error("no group {0} on this device")]
    UnknownGroup(GroupId),
    /// The group was left behind: removed, or stuck on a refused commit.
    #[error("group {group_id} is {state}")]
    NotActive {
        /// The group.
        group_id: GroupId,
        /// Its state.
        state: GroupState,
    },
    /// A commit of this device is still waiting for its position in the stream.
    #[error("a commit of this device in {0} is still on its way")]
    CommitPending(GroupId),
    /// Members are leaving and their proposals wait for a commit: commit them
    /// ([`GroupMachine::commit_pending`]) before sending (openmls sends nothing until then).
    #[error("proposals wait for a commit in {0}")]
    ProposalsPending(GroupId),
    /// The operation is not available yet.
    #[error("{0} is not supported yet")]
    NotSupported(&'static str),
    /// The arguments do not make sense.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The group's policy does not let this user do it (it is not an admin, or the group is
    /// at its member limit).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// The commit lost its epoch to other members' commits too many times.
    #[error("the change to {group_id} lost to other members' changes {attempts} times; try again")]
    Conflict {
        /// The group.
        group_id: GroupId,
        /// How many times it was tried.
        attempts: u32,
    },
    /// The server's stream does not bring the group to the epoch the hub named.
    #[error("the stream of {group_id} does not reach epoch {epoch}")]
    Behind {
        /// The group.
        group_id: GroupId,
        /// The epoch the hub is in.
        epoch: u64,
    },
}

impl std::fmt::Display for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Verified device lists handed to [`GroupMachine::receive`], each marked fresh when it was just
/// fetched from the server (a leaf a stale list does not vouch for is checked again against a
/// fresh one before it is refused), and to the commit functions (which remove the member leaves
/// these lists no longer vouch for; freshness does not matter there).
#[derive(Debug, Clone, Default)]
pub struct Lists {
    lists: BTreeMap<UserId, (VerifiedDeviceList, bool)>,
    /// Users whose list cannot be had (the server has none, or it failed verification), with
    /// why: their leaves are not vouched for.
    unavailable: BTreeMap<UserId, String>,
}

impl Lists {
    /// No lists.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a user's list.
    pub fn insert(&mut self, list: VerifiedDeviceList, fresh: bool) {
        self.unavailable.remove(list.user_id());
        self.lists.insert(list.user_id().clone(), (list, fresh));
    }

    /// Records that `user`'s list cannot be had, and why: their leaves are refused.
    pub fn mark_unavailable(&mut self, user: UserId, reason: String) {
        self.lists.remove(&user);
        self.unavailable.insert(user, reason);
    }

    /// A user's list.
    pub fn get(&self, user: &UserId) -> Option<&VerifiedDeviceList> {
        self.lists.get(user).map(|(list, _)| list)
    }
}

/// A device list [`GroupMachine::receive`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListNeed {
    /// Whose.
    pub user: UserId,
    /// Fetch it from the server even if one is known (the known one does not vouch for a leaf).
    pub refresh: bool,
}

/// What [`GroupMachine::receive`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Received {
    /// Handled and stored: acknowledge the group's stream up to this position.
    Ack(GroupSeq),
    /// Nothing to store or acknowledge (the group is stuck or this device was removed).
    Ignored,
    /// Device lists are needed first: get them and call again with them.
    NeedLists(Vec<ListNeed>),
    /// Events before this one are missing: fetch the stream after `after`, handle those, then
    /// this one again.
    Gap {
        /// The last position handled.
        after: GroupSeq,
    },
}

/// A commit or Welcome processed and waiting for device lists.
struct Staged {
    group_id: GroupId,
    seq: GroupSeq,
    what: StagedWhat,
}

enum StagedWhat {
    Commit(IncomingCommit),
    Join(Box<PendingJoin>),
}

/// What a set of leaves comes to against the lists.
enum Vouch {
    Vouched,
    Need(Vec<ListNeed>),
    Refused(GroupProblem),
}

/// MLS groups for one device over a [`GroupStore`]. See the module documentation.
pub struct GroupMachine<S> {
    store: S,
    client: MlsClient<MemoryStorage>,
    device: DeviceIdentity,
    user_id: UserId,
    device_id: DeviceId,
    staged: Option<Staged>,
    events: VecDeque<MessengerEvent>,
    /// Groups where this device should commit the stored proposals.
    commits_wanted: BTreeSet<GroupId>,
}

impl<S> std::fmt::Debug for GroupMachine<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupMachine").field("user_id", &self.user_id).field("device_id", &self.device_id).finish_non_exhaustive()
    }
}

impl<S: GroupStore> GroupMachine<S> {
    /// The machine of `device_id` of `user_id`, signing with `device`, from the MLS state in
    /// `store` (none for a new device).
    pub async fn open(store: S, user_id: UserId, device_id: DeviceId, device: &DeviceIdentity) -> Result<Self, GroupError> {
        let state = store.mls_state().await?;
        let device = copy_identity(device);
        let client = MlsClient::with_state(state, user_id.clone(), device_id.clone(), &device);
        Ok(Self {
            store,
            client,
            device,
            user_id,
            device_id,
            staged: None,
            events: VecDeque::new(),
            commits_wanted: BTreeSet::new(),
        })
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The events queued since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<MessengerEvent> {
        self.events.drain(..).collect()
    }

    /// One group's record.
    pub async fn group(&self, group_id: &GroupId) -> Result<Option<GroupRecord>, GroupError> {
        Ok(self.store.group(group_id).await?)
    }

    /// The current members of a group: (user, device), in leaf order.
    pub async fn members(&self, group_id: &GroupId) -> Result<Vec<(UserId, DeviceId)>, GroupError> {
        self.record(group_id).await?;
        let group = self.load(group_id)?;
        Ok(group.members()?.into_iter().map(|m| (m.leaf.user().clone(), m.leaf.device().clone())).collect())
    }

    /// `count` new one-time KeyPackages (and a last-resort one if asked), valid for
    /// [`KEY_PACKAGE_LIFETIME_SECS`] from `now_secs`, to upload. Their private keys are stored
    /// first.
    pub async fn key_packages(
        &mut self,
        count: u32,
        last_resort: bool,
        now_secs: u64,
    ) -> Result<UploadKeyPackagesRequest, GroupError> {
        let lifetime = Lifetime::starting_at(now_secs, KEY_PACKAGE_LIFETIME_SECS);
        let mut one_time = Vec::new();
        for _ in 0..count {
            one_time.push(self.client.create_key_package(&self.device, lifetime, false)?.to_bytes().to_vec());
        }
        let last_resort = match last_resort {
            true => Some(self.client.create_key_package(&self.device, lifetime, true)?.to_bytes().to_vec()),
            false => None,
        };
        self.persist(GroupChanges::default()).await?;
        Ok(UploadKeyPackagesRequest::new(one_time, last_resort))
    }

    /// Creates a group hubbed on this user's server with this device as its only member, named
    /// `name` (told to members later, encrypted), and stores it. Returns its id and the request
    /// that registers it with the hub.
    pub async fn create_group(
        &mut self,
        rng: &mut (impl RngCore + ?Sized),
        name: Option<String>,
        now: Timestamp,
    ) -> Result<(GroupId, CreateGroupRequest), GroupError> {
        let local: String =
            (0..LOCAL_LEN).map(|_| LOCAL_ALPHABET[(rng.next_u32() % LOCAL_ALPHABET.len() as u32) as usize] as char).collect();
        let group_id =
            GroupId::new(&local, &self.user_id.server_name()).map_err(|e| GroupError::InvalidRequest(e.to_string()))?;
        if self.store.group(&group_id).await?.is_some() {
            return Err(GroupError::InvalidRequest(format!("group {group_id} exists already")));
        }
        let group = self.client.create_group(&self.device, group_id.mls_group_id())?;
        let request =
            CreateGroupRequest::new(group_id.clone(), group.group_info(&self.client, &self.device)?, group.ratchet_tree()?);
        let record = GroupRecord {
            group_id: group_id.clone(),
            name,
            policy: GroupPolicy::with_admins(vec![self.user_id.clone()]),
            state: GroupState::Active,
            problem: None,
            cursor: GroupSeq::ZERO,
            epoch: group.epoch(),
            pending: None,
            created_ts: now,
            last_ts: now,
        };
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
        Ok((group_id, request))
    }

    /// Forgets a group whose creation the hub refused.
    pub async fn forget_group(&mut self, group_id: &GroupId) -> Result<(), GroupError> {
        self.persist(GroupChanges { delete: Some(group_id.clone()), ..GroupChanges::default() }).await
    }

    /// Encrypts a text for the group, writes it to the history (position unknown until the hub
    /// stores it) and returns the submission. The same `client_msg_id` may be encrypted again
    /// (after an `epoch_conflict`): the history keeps one row.
    pub async fn encrypt_text(
        &mut self,
        group_id: &GroupId,
        client_msg_id: Uuid,
        body: &str,
        now: Timestamp,
    ) -> Result<GroupSendRequest, GroupError> {
        self.encrypt_message(group_id, client_msg_id, body, None, now).await
    }

    /// [`GroupMachine::encrypt_text`] for a text or a file (`body` is then its caption).
    pub async fn encrypt_message(
        &mut self,
        group_id: &GroupId,
        client_msg_id: Uuid,
        body: &str,
        file: Option<Attachment>,
        now: Timestamp,
    ) -> Result<GroupSendRequest, GroupError> {
        let mut record = self.active(group_id).await?;
        let content = match &file {
            None => Content::GroupText(GroupTextContent::new(client_msg_id, body)),
            Some(file) => Content::GroupFile(GroupFileContent::new(client_msg_id, file.clone(), body)),
        };
        let message = self.encrypt(group_id, &content)?;
        // A file on this user's server is held there until the local members have the message.
        let media = crate::media::held_media(file.as_ref(), &self.user_id);
        let stored = GroupMessage {
            local_id: 0,
            group_id: group_id.clone(),
            group_seq: None,
            sender: self.user_id.clone(),
            sender_device: self.device_id.clone(),
            client_msg_id,
            ts: now,
            body: body.to_owned(),
            file,
        };
        record.last_ts = record.last_ts.max(now);
        self.persist(GroupChanges { record: Some(record), messages: vec![stored], ..GroupChanges::default() }).await?;
        Ok(GroupSendRequest::application(client_msg_id, message).with_media(media))
    }

    /// Encrypts the group's metadata and policy for the members, if it has a name and this
    /// user is an admin (members take metadata only from admins).
    pub async fn encrypt_meta(&mut self, group_id: &GroupId) -> Result<Option<GroupSendRequest>, GroupError> {
        let record = self.active(group_id).await?;
        if !record.policy.is_admin(&self.user_id) {
            return Ok(None);
        }
        let Some(meta) = policy::meta_of(&record) else { return Ok(None) };
        let message = self.encrypt(group_id, &Content::GroupMeta(meta))?;
        self.persist(GroupChanges::default()).await?;
        Ok(Some(GroupSendRequest::application(Uuid::new_v4(), message)))
    }

    /// Records the hub's answer to an own application message: its position and time.
    pub async fn message_sent(&mut self, group_id: &GroupId, sent: &GroupSentResponse) -> Result<(), GroupError> {
        let confirmed = self.confirmation(group_id, sent.client_msg_id, sent.group_seq, sent.ts);
        self.persist(GroupChanges { confirmations: vec![confirmed], ..GroupChanges::default() }).await
    }

    /// A commit adding the devices of `key_packages` that are not members yet (each must have
    /// been checked against its owner's signed device list: [`check_key_package`]); `None` when
    /// every one is a member already. It also removes the leaves `lists` no longer vouch for
    /// ([`commit_prune`](Self::commit_prune)). The commit is pending until it comes back in the
    /// stream.
    pub async fn commit_add(
        &mut self,
        group_id: &GroupId,
        key_packages: &[KeyPackage],
        lists: &Lists,
    ) -> Result<Option<GroupSendRequest>, GroupError> {
        let record = self.committable(group_id).await?;
        if !record.policy.is_admin(&self.user_id) {
            return Err(GroupError::NotAllowed(format!("only admins add members to {group_id}")));
        }
        let mut group = self.load(group_id)?;
        let members = group.members()?;
        let stale = stale_leaves(&group, &members, lists, &record.policy, &self.user_id);
        // A stale leaf's device may come back with a leaf its list vouches for.
        let mut present: BTreeSet<(UserId, DeviceId)> = members
            .iter()
            .filter(|m| !stale.contains(&m.index))
            .map(|m| (m.leaf.user().clone(), m.leaf.device().clone()))
            .collect();
        let adds: Vec<KeyPackage> = key_packages
            .iter()
            .filter(|kp| present.insert((kp.leaf().user().clone(), kp.leaf().device().clone())))
            .cloned()
            .collect();
        if adds.is_empty() {
            return Ok(None);
        }
        let after = members.len() - stale.len() + adds.len();
        if let Some(max) = record.policy.max_members.filter(|max| after > *max as usize) {
            return Err(GroupError::NotAllowed(format!("{group_id} would have {after} devices; its limit is {max}")));
        }
        let bundle = group.add_and_remove_members(&self.client, &self.device, &adds, &stale)?;
        let request = GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, bundle.welcome);
        self.keep_pending(record, &request).await?;
        Ok(Some(request))
    }

    /// A commit removing every device of `users` that is a member, and the leaves `lists` no
    /// longer vouch for ([`commit_prune`](Self::commit_prune)); `None` when none of `users` is
    /// a member.
    pub async fn commit_remove(
        &mut self,
        group_id: &GroupId,
        users: &[UserId],
        lists: &Lists,
    ) -> Result<Option<GroupSendRequest>, GroupError> {
        if users.contains(&self.user_id) {
            return Err(GroupError::InvalidRequest("to remove your own user, leave the group".into()));
        }
        let record = self.committable(group_id).await?;
        let mut group = self.load(group_id)?;
        let members = group.members()?;
        if !members.iter().any(|m| users.contains(m.leaf.user())) {
            return Ok(None);
        }
        if !record.policy.is_admin(&self.user_id) {
            return Err(GroupError::NotAllowed(format!("only admins remove other users from {group_id}")));
        }
        // A leaf whose removal is proposed already goes with the proposal (twice is invalid).
        let proposed = group.pending_removals();
        let mut indices: Vec<LeafIndex> =
            members.iter().filter(|m| users.contains(m.leaf.user()) && !proposed.contains(&m.index)).map(|m| m.index).collect();
        for index in stale_leaves(&group, &members, lists, &record.policy, &self.user_id) {
            if !indices.contains(&index) {
                indices.push(index);
            }
        }
        // When every one of them is leaving already, this commits just their proposals.
        let bundle = group.add_and_remove_members(&self.client, &self.device, &[], &indices)?;
        let request = GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, bundle.welcome);
        self.keep_pending(record, &request).await?;
        Ok(Some(request))
    }

    /// A commit removing only the member leaves that `lists` no longer vouch for: the user's
    /// list is given and the leaf's device is not in it, or has another signing key
    /// (`spec/groups.md` §2). Users whose list is not given are left alone, and so is this
    /// device's own leaf. `None` when no leaf is stale.
    pub async fn commit_prune(&mut self, group_id: &GroupId, lists: &Lists) -> Result<Option<GroupSendRequest>, GroupError> {
        let record = self.committable(group_id).await?;
        let mut group = self.load(group_id)?;
        let stale = stale_leaves(&group, &group.members()?, lists, &record.policy, &self.user_id);
        if stale.is_empty() {
            return Ok(None);
        }
        let bundle = group.add_and_remove_members(&self.client, &self.device, &[], &stale)?;
        let request = GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, bundle.welcome);
        self.keep_pending(record, &request).await?;
        Ok(Some(request))
    }

    /// The pending commit of this device in a group, as submitted (to re-send it with the same
    /// id after a lost answer).
    pub async fn pending_commit(&self, group_id: &GroupId) -> Result<Option<GroupSendRequest>, GroupError> {
        Ok(self.record(group_id).await?.pending)
    }

    /// The hub refused the pending commit for good (another commit won its epoch): drops it; the
    /// group stays in its epoch until the stream brings the winner.
    pub async fn commit_refused(&mut self, group_id: &GroupId) -> Result<(), GroupError> {
        let mut record = self.record(group_id).await?;
        let mut group = self.load(group_id)?;
        group.clear_pending_commit(&self.client)?;
        record.pending = None;
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await
    }

    /// Handles one event of a group's stream (see the module documentation). `lists` holds the
    /// device lists gathered so far for this event.
    pub async fn receive(&mut self, event: &GroupEvent, lists: &Lists) -> Result<Received, GroupError> {
        let group_id = &event.group_id;
        let record = self.store.group(group_id).await?;
        if event.kind == GroupEventKind::Welcome {
            return match record {
                Some(record) if matches!(record.state, GroupState::Active | GroupState::Leaving) => {
                    // Already a member (a repeat).
                    Ok(if event.group_seq <= record.cursor { Received::Ack(record.cursor) } else { Received::Ignored })
                }
                previous => self.join(event, lists, previous).await,
            };
        }
        let Some(record) = record else {
            tracing::debug!(group = %group_id, seq = event.group_seq.get(), "event of a group this device is not in; skipped");
            return Ok(Received::Ack(event.group_seq));
        };
        if event.group_seq <= record.cursor {
            return Ok(Received::Ack(record.cursor));
        }
        if !matches!(record.state, GroupState::Active | GroupState::Leaving) {
            return Ok(Received::Ignored);
        }
        if event.group_seq != record.cursor.next() {
            return Ok(Received::Gap { after: record.cursor });
        }
        let mine = event.sender == self.user_id && event.sender_device == self.device_id;
        match event.kind {
            GroupEventKind::Application => self.application(event, record, mine).await,
            GroupEventKind::Commit => self.commit(event, record, mine, lists).await,
            GroupEventKind::Proposal => self.proposal(event, record, mine).await,
            // Handled above; an unknown future kind is skipped.
            _ => {
                let mut record = record;
                record.cursor = event.group_seq;
                self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
                Ok(Received::Ack(event.group_seq))
            }
        }
    }

    async fn application(&mut self, event: &GroupEvent, mut record: GroupRecord, mine: bool) -> Result<Received, GroupError> {
        let group_id = &event.group_id;
        record.cursor = event.group_seq;
        if mine {
            // MLS cannot decrypt one's own message: the history has it; it gets its position.
            let confirmed = self.confirmation(group_id, event.client_msg_id, event.group_seq, event.ts);
            let changes = GroupChanges { record: Some(record), confirmations: vec![confirmed], ..GroupChanges::default() };
            self.persist(changes).await?;
            return Ok(Received::Ack(event.group_seq));
        }
        let mut group = self.load(group_id)?;
        let mut messages = Vec::new();
        let mut events = Vec::new();
        let problem = |reason| MessengerEvent::GroupProblem { group_id: group_id.clone(), reason };
        match group.process(&self.client, &event.message.0) {
            Ok(Incoming::Application { sender, plaintext }) => {
                let posted = match serde_json::from_slice::<Content>(&plaintext) {
                    Ok(Content::GroupText(text)) => Some((text.client_msg_id, text.body, None)),
                    Ok(Content::GroupFile(file)) => Some((file.client_msg_id, file.caption, Some(file.file))),
                    Ok(Content::GroupMeta(meta)) => {
                        events.extend(self.take_meta(&mut record, sender.leaf.user(), meta));
                        None
                    }
                    _ => {
                        events.push(problem(GroupProblem::UnknownContent));
                        None
                    }
                };
                if let Some((client_msg_id, body, file)) = posted {
                    let message = GroupMessage {
                        local_id: 0,
                        group_id: group_id.clone(),
                        group_seq: Some(event.group_seq),
                        sender: sender.leaf.user().clone(),
                        sender_device: sender.leaf.device().clone(),
                        client_msg_id,
                        ts: event.ts,
                        body,
                        file,
                    };
                    record.last_ts = record.last_ts.max(event.ts);
                    events.push(MessengerEvent::GroupMessage(message.clone()));
                    messages.push(message);
                }
            }
            Ok(other) => events.push(problem(GroupProblem::Undecryptable(format!("not an application message: {other:?}")))),
            Err(error) if error.kind() == ErrorKind::BadInput => {
                events.push(problem(GroupProblem::Undecryptable(error.to_string())));
            }
            Err(error) => return Err(error.into()),
        }
        self.persist(GroupChanges { record: Some(record), messages, ..GroupChanges::default() }).await?;
        self.events.extend(events);
        Ok(Received::Ack(event.group_seq))
    }

    async fn commit(
        &mut self,
        event: &GroupEvent,
        mut record: GroupRecord,
        mine: bool,
        lists: &Lists,
    ) -> Result<Received, GroupError> {
        let group_id = &event.group_id;
        let mut group = self.load(group_id)?;
        let before = member_set(&group)?;
        // Our commit, at its position (the very bytes we submitted: a server cannot pass another
        // commit off as ours): everything ordered before it was read in the old epoch.
        let ours = record.pending.as_ref().is_some_and(|pending| pending.message == event.message);
        if mine && ours && group.has_pending_commit() {
            group.merge_pending_commit(&self.client)?;
            record.pending = None;
            return self.merged(event, record, &group, before, false).await;
        }
        let staged = match self.staged.take() {
            Some(Staged { group_id: g, seq, what: StagedWhat::Commit(commit) }) if &g == group_id && seq == event.group_seq => {
                Some(commit)
            }
            _ => None,
        };
        let commit = match staged {
            Some(commit) => commit,
            None => match group.process(&self.client, &event.message.0) {
                Ok(Incoming::Commit(commit)) => commit,
                Ok(other) => return self.stuck(record, GroupProblem::BadCommit(format!("not a commit: {other:?}"))).await,
                Err(error) if error.kind() == ErrorKind::BadInput => {
                    return self.stuck(record, GroupProblem::BadCommit(error.to_string())).await
                }
                Err(error) => return Err(error.into()),
            },
        };
        match vouch(commit.new_leaves(), lists) {
            Vouch::Vouched => {}
            Vouch::Need(needs) => {
                let what = StagedWhat::Commit(commit);
                self.staged = Some(Staged { group_id: group_id.clone(), seq: event.group_seq, what });
                return Ok(Received::NeedLists(needs));
            }
            Vouch::Refused(problem) => return self.stuck(record, problem).await,
        }
        let added = commit.changes().iter().filter(|c| matches!(c, MemberChange::Added(_))).count();
        let removed = commit.changes().iter().filter(|c| matches!(c, MemberChange::Removed { .. })).count();
        if let Err(reason) = policy::check_commit(&record.policy, &commit, before.len() + added - removed) {
            return self.stuck(record, GroupProblem::PolicyViolation(reason)).await;
        }
        let removes_me = commit.removes_me();
        group.merge_commit(&self.client, commit)?;
        // A pending commit of ours lost this epoch (openmls dropped it).
        record.pending = None;
        if removes_me {
            record.state = GroupState::Removed;
        }
        self.merged(event, record, &group, before, removes_me).await
    }

    /// After a commit was merged: stores the new epoch and position, reports the changes.
    async fn merged(
        &mut self,
        event: &GroupEvent,
        mut record: GroupRecord,
        group: &Group,
        before: BTreeSet<(UserId, DeviceId)>,
        removed_me: bool,
    ) -> Result<Received, GroupError> {
        let group_id = event.group_id.clone();
        record.cursor = event.group_seq;
        record.epoch = group.epoch();
        record.last_ts = record.last_ts.max(event.ts);
        let mut events = Vec::new();
        if removed_me {
            events.push(MessengerEvent::GroupRemoved { group_id: group_id.clone() });
        } else {
            let after = member_set(group)?;
            let users = |set: &BTreeSet<(UserId, DeviceId)>| set.iter().map(|(u, _)| u.clone()).collect::<BTreeSet<_>>();
            let (users_before, users_after) = (users(&before), users(&after));
            let added: Vec<UserId> = users_after.difference(&users_before).cloned().collect();
            let removed: Vec<UserId> = users_before.difference(&users_after).cloned().collect();
            if before != after {
                events.push(MessengerEvent::GroupMembersChanged { group_id: group_id.clone(), added, removed });
            }
            events.push(MessengerEvent::GroupEpoch { group_id: group_id.clone(), epoch: record.epoch });
        }
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
        self.events.extend(events);
        Ok(Received::Ack(event.group_seq))
    }

    /// Refuses a commit: the group is stuck at its position (nothing after it is acknowledged).
    async fn stuck(&mut self, mut record: GroupRecord, problem: GroupProblem) -> Result<Received, GroupError> {
        let group_id = record.group_id.clone();
        tracing::warn!(group = %group_id, %problem, "commit refused; the group is stuck");
        record.state = GroupState::Stuck;
        record.problem = Some(problem.to_string());
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
        self.events.push_back(MessengerEvent::GroupProblem { group_id, reason: problem });
        Ok(Received::Ignored)
    }

    /// A Welcome for this device: joins once every member is vouched for.
    async fn join(&mut self, event: &GroupEvent, lists: &Lists, previous: Option<GroupRecord>) -> Result<Received, GroupError> {
        let group_id = &event.group_id;
        let refuse = |this: &mut Self, reason: GroupProblem| {
            tracing::warn!(group = %group_id, problem = %reason, "Welcome not joined");
            this.events.push_back(MessengerEvent::GroupProblem { group_id: group_id.clone(), reason });
            Ok(Received::Ack(event.group_seq))
        };
        let staged = match self.staged.take() {
            Some(Staged { group_id: g, seq, what: StagedWhat::Join(join) }) if &g == group_id && seq == event.group_seq => {
                Some(*join)
            }
            _ => None,
        };
        let pending = match staged {
            Some(pending) => pending,
            None => {
                let Some(tree) = &event.ratchet_tree else {
                    return refuse(self, GroupProblem::JoinFailed("the Welcome came without its ratchet tree".into()));
                };
                match self.client.join(&event.message.0, &tree.0) {
                    Ok(pending) => pending,
                    Err(error) if error.kind() == ErrorKind::BadInput => {
                        return refuse(self, GroupProblem::JoinFailed(error.to_string()))
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        };
        if pending.group_id() != group_id.mls_group_id() {
            return refuse(self, GroupProblem::JoinFailed("the Welcome is for another group".into()));
        }
        match vouch(pending.members().iter().map(|m| &m.leaf), lists) {
            Vouch::Vouched => {}
            Vouch::Need(needs) => {
                let what = StagedWhat::Join(Box::new(pending));
                self.staged = Some(Staged { group_id: group_id.clone(), seq: event.group_seq, what });
                return Ok(Received::NeedLists(needs));
            }
            Vouch::Refused(problem) => return refuse(self, problem),
        }
        let by = pending.welcome_sender().leaf.user().clone();
        let group = pending.accept(&self.client)?;
        let record = GroupRecord {
            group_id: group_id.clone(),
            name: previous.and_then(|p| p.name),
            // The member who added this device is an admin (only admins add) until the
            // metadata it sends after the add says who the admins are.
            policy: GroupPolicy::with_admins(vec![by.clone()]),
            state: GroupState::Active,
            problem: None,
            cursor: event.group_seq,
            epoch: group.epoch(),
            pending: None,
            created_ts: event.ts,
            last_ts: event.ts,
        };
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
        self.events.push_back(MessengerEvent::GroupJoined { group_id: group_id.clone(), by });
        Ok(Received::Ack(event.group_seq))
    }

    /// The record of a group this device has.
    async fn record(&self, group_id: &GroupId) -> Result<GroupRecord, GroupError> {
        self.store.group(group_id).await?.ok_or_else(|| GroupError::UnknownGroup(group_id.clone()))
    }

    /// The record of a group this device is an active member of.
    async fn active(&self, group_id: &GroupId) -> Result<GroupRecord, GroupError> {
        let record = self.record(group_id).await?;
        if record.state != GroupState::Active {
            return Err(GroupError::NotActive { group_id: group_id.clone(), state: record.state });
        }
        Ok(record)
    }

    /// The record of a group this device may commit to now.
    async fn committable(&self, group_id: &GroupId) -> Result<GroupRecord, GroupError> {
        let record = self.active(group_id).await?;
        if record.pending.is_some() {
            return Err(GroupError::CommitPending(group_id.clone()));
        }
        Ok(record)
    }

    async fn keep_pending(&mut self, mut record: GroupRecord, request: &GroupSendRequest) -> Result<(), GroupError> {
        record.pending = Some(request.clone());
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await
    }

    /// The group's MLS state, loaded from the client's storage (always current).
    fn load(&self, group_id: &GroupId) -> Result<Group, GroupError> {
        self.client.load_group(group_id.mls_group_id())?.ok_or_else(|| GroupError::UnknownGroup(group_id.clone()))
    }

    fn encrypt(&self, group_id: &GroupId, content: &Content) -> Result<Vec<u8>, GroupError> {
        let plaintext = serde_json::to_vec(content).map_err(|e| GroupError::InvalidRequest(e.to_string()))?;
        let mut group = self.load(group_id)?;
        if group.has_pending_proposals() {
            return Err(GroupError::ProposalsPending(group_id.clone()));
        }
        Ok(group.encrypt(&self.client, &self.device, &plaintext)?)
    }

    /// The history update that gives an own message its position.
    fn confirmation(&self, group_id: &GroupId, client_msg_id: Uuid, group_seq: GroupSeq, ts: Timestamp) -> Confirmation {
        Confirmation { group_id: group_id.clone(), sender: self.user_id.clone(), client_msg_id, group_seq, ts }
    }

    /// Writes `changes` with the MLS client's state changes, in one transaction. If that fails,
    /// the client is rebuilt from what is stored, so it never runs ahead of the store.
    async fn persist(&mut self, mut changes: GroupChanges) -> Result<(), GroupError> {
        changes.mls = self.client.take_state_changes();
        if let Err(error) = self.store.apply_group_changes(&changes).await {
            self.staged = None;
            match self.store.mls_state().await {
                Ok(state) => {
                    self.client = MlsClient::with_state(state, self.user_id.clone(), self.device_id.clone(), &self.device);
                }
                Err(reload) => tracing::warn!(error = %reload, "MLS state not reloaded after a failed write"),
            }
            return Err(error.into());
        }
        Ok(())
    }
}

/// Checks a claimed KeyPackage: it parses and verifies, its leaf is the device it was claimed
/// for, and `list` (its user's verified signed device list) vouches for that leaf.
pub fn check_key_package(
    bytes: &[u8],
    user: &UserId,
    device: &DeviceId,
    list: &VerifiedDeviceList,
) -> Result<KeyPackage, String> {
    let key_package = KeyPackage::from_bytes(bytes).map_err(|e| e.to_string())?;
    let leaf = key_package.leaf();
    if leaf.user() != user || leaf.device() != device {
        return Err(format!("it is the KeyPackage of {} device {}", leaf.user(), leaf.device()));
    }
    leaf.check_against_list(list).map_err(|e| e.to_string())?;
    Ok(key_package)
}

/// The members of a group as (user, device).
fn member_set(group: &Group) -> Result<BTreeSet<(UserId, DeviceId)>, GroupError> {
    Ok(group.members()?.into_iter().map(|m| (m.leaf.user().clone(), m.leaf.device().clone())).collect())
}

/// The leaves among `members` that `lists` no longer vouch for, in the given order: the user's
/// list is given, and the leaf's device is not in it or its signing key differs. Users whose
/// list is not given (or unavailable) are left alone, and so is `own` (this device's leaf). One
/// pass, one map lookup per member. Generic over the index so it is tested at size without a
/// group.
fn stale<'a, I: Copy + PartialEq + 'a>(members: impl IntoIterator<Item = (I, &'a MemberLeaf)>, own: I, lists: &Lists) -> Vec<I> {
    members
        .into_iter()
        .filter(|(index, leaf)| {
            *index != own && lists.get(leaf.user()).is_some_and(|list| leaf.check_against_list(list).is_err())
        })
        .map(|(index, _)| index)
        .collect()
}

/// [`stale`] over a group's members (`group`'s current ones) that `me` may remove under `policy`
/// (an admin any, a member its own user's), but for those whose removal is proposed already
/// (the proposal removes them; a second removal would be invalid).
fn stale_leaves(group: &Group, members: &[Member], lists: &Lists, policy: &GroupPolicy, me: &UserId) -> Vec<LeafIndex> {
    let proposed = group.pending_removals();
    let admin = policy.is_admin(me);
    let mine = |index: &LeafIndex| members.iter().any(|m| m.index == *index && m.leaf.user() == me);
    let mut stale = stale(members.iter().map(|m| (m.index, &m.leaf)), group.own_index(), lists);
    stale.retain(|index| !proposed.contains(index) && (admin || mine(index)));
    stale
}

/// Checks leaves against the lists: lists missing (or stale where a leaf fails) are asked for;
/// a leaf a fresh list does not vouch for is refused.
fn vouch<'a>(leaves: impl Iterator<Item = &'a MemberLeaf>, lists: &Lists) -> Vouch {
    let mut needs: BTreeMap<UserId, bool> = BTreeMap::new();
    let mut refused = None;
    for leaf in leaves {
        if let Some(reason) = lists.unavailable.get(leaf.user()) {
            refused.get_or_insert_with(|| GroupProblem::UnvouchedMember {
                user: leaf.user().clone(),
                device: leaf.device().clone(),
                reason: format!("no verified device list: {reason}"),
            });
            continue;
        }
        match lists.lists.get(leaf.user()) {
            None => {
                needs.entry(leaf.user().clone()).or_insert(false);
            }
            Some((list, fresh)) => {
                if let Err(mismatch) = leaf.check_against_list(list) {
                    if !fresh {
                        needs.insert(leaf.user().clone(), true);
                    } else if refused.is_none() {
                        refused = Some(GroupProblem::UnvouchedMember {
                            user: leaf.user().clone(),
                            device: leaf.device().clone(),
                            reason: mismatch.to_string(),
                        });
                    }
                }
            }
        }
    }
    if !needs.is_empty() {
        return Vouch::Need(needs.into_iter().map(|(user, refresh)| ListNeed { user, refresh }).collect());
    }
    refused.map_or(Vouch::Vouched, Vouch::Refused)
}

/// A copy of a device identity (the type is not `Clone`, so that copies are deliberate).
fn copy_identity(device: &DeviceIdentity) -> DeviceIdentity {
    let bytes: zeroize::Zeroizing<[u8; DEVICE_IDENTITY_BYTES]> = device.to_bytes();
    DeviceIdentity::from_bytes(&bytes)
}
