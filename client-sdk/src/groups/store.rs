//! The storage boundary of the [`GroupMachine`](super::GroupMachine): the MLS client's state, the
//! groups (name, state, cursor, the commit in flight) and their history. Everything one step
//! derived is written in one transaction ([`GroupStore::apply_group_changes`]), so a crash never
//! leaves a group's MLS state ahead of its history or its cursor, and nothing is acknowledged
//! before it is stored.

use crate::e2ee::StoreError;
use parley_crypto::mls::StateChange;
use parley_spec::v1::groups::GroupSendRequest;
use parley_spec::{DeviceId, GroupId, GroupSeq, Timestamp, UserId};
use std::future::Future;
use uuid::Uuid;

/// Where a group stands for this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupState {
    /// A member: messages are sent and received.
    Active,
    /// The removal of this device is proposed (its user leaves): it reads on, but sends and
    /// commits nothing, until the commit that removes it.
    Leaving,
    /// A commit removed this device: the history stays readable, nothing more arrives.
    Removed,
    /// A commit was refused (it brought in a member no signed device list vouches for): the
    /// group cannot move on for this device ([`GroupRecord::problem`] says why).
    Stuck,
}

impl GroupState {
    /// The name the SQLite store uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Leaving => "leaving",
            Self::Removed => "removed",
            Self::Stuck => "stuck",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Self::Active,
            "leaving" => Self::Leaving,
            "removed" => Self::Removed,
            "stuck" => Self::Stuck,
            _ => return None,
        })
    }
}

/// One group as this device keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    /// The group.
    pub group_id: GroupId,
    /// Its name, once a member told it (end-to-end encrypted; no server knows it).
    pub name: Option<String>,
    /// Its policy: topic, admins, member limit (end-to-end encrypted like the name).
    pub policy: GroupPolicy,
    /// Where it stands.
    pub state: GroupState,
    /// Why it is stuck, for people.
    pub problem: Option<String>,
    /// The last position of the group's stream whose result is stored (and may be
    /// acknowledged).
    pub cursor: GroupSeq,
    /// The MLS epoch this device is in.
    pub epoch: u64,
    /// This device's commit that awaits its position in the stream, as submitted (re-sent with
    /// the same id when its answer was lost).
    pub pending: Option<GroupSendRequest>,
    /// When this device created or joined it.
    pub created_ts: Timestamp,
    /// The latest message or change (for ordering conversations).
    pub last_ts: Timestamp,
}

/// A group's policy, from its end-to-end encrypted metadata ([`Content::GroupMeta`]): taken
/// only from an admin, and every commit is checked against it (`spec/groups.md` §3).
///
/// [`Content::GroupMeta`]: parley_spec::v1::content::Content::GroupMeta
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct GroupPolicy {
    /// The topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Who may add members, remove other users' devices and change the metadata. Empty when no
    /// admin is known (a group from before policies): then every member may.
    #[serde(default)]
    pub admins: Vec<UserId>,
    /// The most member devices the admins allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_members: Option<u32>,
}

impl GroupPolicy {
    /// A policy with these admins.
    pub fn with_admins(admins: Vec<UserId>) -> Self {
        Self { admins, ..Self::default() }
    }

    /// Whether `user` may add members, remove other users' devices and change the metadata.
    pub fn is_admin(&self, user: &UserId) -> bool {
        self.admins.is_empty() || self.admins.contains(user)
    }
}

/// A message of a group's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMessage {
    /// Local row id (history order; 0 before it is stored).
    pub local_id: i64,
    /// The group.
    pub group_id: GroupId,
    /// The hub's position for it; `None` for an own message the hub has not confirmed yet.
    pub group_seq: Option<GroupSeq>,
    /// Who sent it (as its MLS leaf says).
    pub sender: UserId,
    /// From which device.
    pub sender_device: DeviceId,
    /// The sender's id for it.
    pub client_msg_id: Uuid,
    /// When the hub stored it (for an unconfirmed own message: when it was written).
    pub ts: Timestamp,
    /// The text (a file's caption).
    pub body: String,
    /// The file, for a file message.
    pub file: Option<parley_spec::v1::content::Attachment>,
}

/// The hub's position and time for one of this device's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirmation {
    /// The group.
    pub group_id: GroupId,
    /// The sender (this user).
    pub sender: UserId,
    /// The message's id.
    pub client_msg_id: Uuid,
    /// Its position.
    pub group_seq: GroupSeq,
    /// When the hub stored it.
    pub ts: Timestamp,
}

/// What one step of the machine changed, written all or nothing.
#[derive(Debug, Default)]
pub struct GroupChanges {
    /// The MLS client's state changes.
    pub mls: Vec<StateChange>,
    /// The group's new record (inserted or replaced).
    pub record: Option<GroupRecord>,
    /// Messages to add; one already stored (same group, sender and id) only gets its
    /// `group_seq` and `ts` if it had none.
    pub messages: Vec<GroupMessage>,
    /// Own messages the hub stored: their position and time (nothing if the history has no
    /// such message, as for the group's metadata).
    pub confirmations: Vec<Confirmation>,
    /// A group to forget (its creation failed), with its history.
    pub delete: Option<GroupId>,
}

/// The MLS client's state as stored: opaque key-value pairs.
pub type MlsState = Vec<(Vec<u8>, Vec<u8>)>;

/// Group state and history.
pub trait GroupStore: Send + Sync {
    /// The MLS client's stored state (opaque key-value pairs).
    fn mls_state(&self) -> impl Future<Output = Result<MlsState, StoreError>> + Send;
    /// Writes `changes` in one transaction.
    fn apply_group_changes(&self, changes: &GroupChanges) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One group.
    fn group(&self, group_id: &GroupId) -> impl Future<Output = Result<Option<GroupRecord>, StoreError>> + Send;
    /// Every group, latest activity first.
    fn groups(&self) -> impl Future<Output = Result<Vec<GroupRecord>, StoreError>> + Send;
    /// The last `limit` messages of a group in the hub's order (`group_seq`), own messages the
    /// hub has not confirmed yet last.
    fn group_history(&self, group_id: &GroupId, limit: u32)
        -> impl Future<Output = Result<Vec<GroupMessage>, StoreError>> + Send;
}
