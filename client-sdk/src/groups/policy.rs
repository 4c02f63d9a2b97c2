//! Group policy (`spec/groups.md` §3): who may add members and remove other users' devices
//! (the admins), the member limit, the name and the topic. It travels end-to-end encrypted as
//! a [`Content::GroupMeta`] application message, so no server sees it and no server enforces it:
//! the clients do.
//!
//! - A device takes metadata only from an admin of the policy it holds. The creator starts as
//!   the only admin; a new member starts with the member who added it (who had to be an admin)
//!   until the metadata that admin sends after the add arrives.
//! - Every commit of another member is checked before it is merged: an add, or the removal of a
//!   device of another user, must have been asked for by an admin (a member leaving asks for
//!   its own removal by a proposal, which anyone may commit); the group stays within the
//!   member limit. A commit that breaks the policy is refused like one that brings in an
//!   unvouched leaf: the group is stuck for this device.
//! - This device builds only commits its policy allows ([`GroupError::NotAllowed`]).

use super::{GroupChanges, GroupError, GroupMachine, GroupPolicy, GroupRecord, GroupStore};
use crate::e2ee::MessengerEvent;
use parley_crypto::mls::{IncomingCommit, MemberChange};
use parley_spec::v1::content::GroupMetaContent;
use parley_spec::{GroupId, UserId};

/// A change of a group's metadata, by an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaChange {
    /// A new name.
    Name(String),
    /// A new topic, or none.
    Topic(Option<String>),
    /// The admins (at least one).
    Admins(Vec<UserId>),
    /// The member limit (devices), or none beyond the hub's.
    MaxMembers(Option<u32>),
}

/// Why a commit of `committer`'s breaks `policy`, if it does; `members_after` is the number of
/// member devices once it is merged.
pub(super) fn check_commit(policy: &GroupPolicy, commit: &IncomingCommit, members_after: usize) -> Result<(), String> {
    for (requester, change) in commit.requests() {
        let by = requester.leaf.user();
        match change {
            MemberChange::Added(leaf) if !policy.is_admin(by) => {
                return Err(format!("{by} added {} device {} but is not an admin", leaf.user(), leaf.device()));
            }
            MemberChange::Removed { leaf, .. } if leaf.user() != by && !policy.is_admin(by) => {
                return Err(format!("{by} removed {} device {} but is not an admin", leaf.user(), leaf.device()));
            }
            _ => {}
        }
    }
    match policy.max_members {
        Some(max) if members_after > max as usize => {
            Err(format!("the commit takes the group to {members_after} devices; its limit is {max}"))
        }
        _ => Ok(()),
    }
}

/// The metadata a group's record holds, as its admins send it.
pub(super) fn meta_of(record: &GroupRecord) -> Option<GroupMetaContent> {
    let policy = &record.policy;
    let name = record.name.clone()?;
    Some(GroupMetaContent::new(name).with_policy(policy.topic.clone(), policy.admins.clone(), policy.max_members))
}

impl<S: GroupStore> GroupMachine<S> {
    /// Changes the group's metadata on this device, if this user is an admin; send it to the
    /// members next ([`encrypt_meta`](Self::encrypt_meta)).
    pub async fn update_meta(&mut self, group_id: &GroupId, change: MetaChange) -> Result<(), GroupError> {
        let mut record = self.active(group_id).await?;
        if !record.policy.is_admin(&self.user_id) {
            return Err(GroupError::NotAllowed(format!("{} is not an admin of {group_id}", self.user_id)));
        }
        match change {
            MetaChange::Name(name) => record.name = Some(name),
            MetaChange::Topic(topic) => record.policy.topic = topic,
            MetaChange::Admins(admins) if admins.is_empty() => {
                return Err(GroupError::InvalidRequest("a group keeps at least one admin".into()))
            }
            MetaChange::Admins(admins) => record.policy.admins = admins,
            MetaChange::MaxMembers(max) => record.policy.max_members = max,
        }
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await
    }

    /// Metadata from `sender` at its position: taken from an admin (name, topic, admins, limit;
    /// metadata without admins, from an older version, keeps the admins), reported and dropped
    /// from anyone else.
    pub(super) fn take_meta(&self, record: &mut GroupRecord, sender: &UserId, meta: GroupMetaContent) -> Vec<MessengerEvent> {
        let group_id = record.group_id.clone();
        if !record.policy.is_admin(sender) {
            let reason = super::GroupProblem::PolicyViolation(format!("{sender} changed the metadata but is not an admin"));
            return vec![MessengerEvent::GroupProblem { group_id, reason }];
        }
        let mut events = Vec::new();
        if record.name.as_deref() != Some(meta.name.as_str()) {
            record.name = Some(meta.name.clone());
            events.push(MessengerEvent::GroupRenamed { group_id: group_id.clone(), name: meta.name });
        }
        let admins = if meta.admins.is_empty() { record.policy.admins.clone() } else { meta.admins };
        let policy = GroupPolicy { topic: meta.topic, admins, max_members: meta.max_members };
        if policy != record.policy {
            record.policy = policy.clone();
            events.push(MessengerEvent::GroupPolicyChanged { group_id, policy });
        }
        events
    }
}
