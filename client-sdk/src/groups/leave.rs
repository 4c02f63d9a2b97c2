//! Leaving a group, and the proposals that come with it (`spec/groups.md` §3, §4).
//!
//! MLS does not let a member commit its own removal. A user leaves by proposing the removal of
//! each leaf of its own devices ([`GroupMachine::propose_leave`], one proposal per call, each
//! submitted and answered before the next); another member commits them. The hub accepts only
//! such proposals and refuses a commit of the epoch that leaves one out, so every device stores
//! every proposal it reads ([`GroupMachine::receive`]) and openmls puts them in its next commit.
//! A device whose removal is proposed is [`GroupState::Leaving`]: it sends and commits nothing
//! more, and reads on until the commit that removes it.
//!
//! Who commits: the remaining member with the lowest leaf index, as soon as it reads a proposal
//! ([`GroupMachine::take_commits_wanted`]); and any member that sends or commits before, since
//! openmls sends no application message while proposals are stored
//! ([`GroupMachine::commit_pending`]).

use super::{
    stale_leaves, GroupChanges, GroupError, GroupMachine, GroupProblem, GroupRecord, GroupState, GroupStore, Lists, Received,
};
use parley_crypto::mls::{ErrorKind, Incoming, MemberChange};
use parley_spec::v1::groups::{GroupEvent, GroupSendRequest};
use parley_spec::GroupId;
use uuid::Uuid;

impl<S: GroupStore> GroupMachine<S> {
    /// The next proposal of this user's leave: the removal of one of its leaves (its other
    /// devices first, this one last) that no stored proposal removes yet. `None` when every one
    /// is proposed: the group is then [`GroupState::Leaving`] here. Submit the proposal and wait
    /// for the hub's answer before asking for the next; on `epoch_conflict` catch up first (the
    /// new epoch has no proposals, so the leave is proposed again from the start).
    pub async fn propose_leave(&mut self, group_id: &GroupId) -> Result<Option<GroupSendRequest>, GroupError> {
        let mut record = self.record(group_id).await?;
        if !matches!(record.state, GroupState::Active | GroupState::Leaving) {
            return Err(GroupError::NotActive { group_id: group_id.clone(), state: record.state });
        }
        if record.pending.is_some() {
            return Err(GroupError::CommitPending(group_id.clone()));
        }
        let mut group = self.load(group_id)?;
        let proposed = group.pending_removals();
        let own_index = group.own_index();
        let mut leaves: Vec<_> = group
            .members()?
            .into_iter()
            .filter(|m| m.leaf.user() == &self.user_id && !proposed.contains(&m.index))
            .map(|m| m.index)
            .collect();
        // This device's own leaf last: once it is proposed, the device is leaving.
        leaves.sort_by_key(|index| *index == own_index);
        let Some(&index) = leaves.first() else {
            if record.state != GroupState::Leaving {
                record.state = GroupState::Leaving;
                self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
            }
            return Ok(None);
        };
        let message = group.propose_remove(&self.client, &self.device, index)?;
        self.persist(GroupChanges::default()).await?;
        Ok(Some(GroupSendRequest::application(Uuid::new_v4(), message)))
    }

    /// Whether proposals wait for a commit in this group (openmls sends no application message
    /// until they are committed: [`commit_pending`](Self::commit_pending) first).
    pub async fn has_pending_proposals(&self, group_id: &GroupId) -> Result<bool, GroupError> {
        self.record(group_id).await?;
        Ok(self.load(group_id)?.has_pending_proposals())
    }

    /// A commit of the stored proposals (and of the removals `lists` owe, as every commit);
    /// `None` when no proposal is stored. Pending until it comes back, like any commit of this
    /// device.
    pub async fn commit_pending(&mut self, group_id: &GroupId, lists: &Lists) -> Result<Option<GroupSendRequest>, GroupError> {
        let record = self.committable(group_id).await?;
        let mut group = self.load(group_id)?;
        if !group.has_pending_proposals() {
            return Ok(None);
        }
        let stale = stale_leaves(&group, &group.members()?, lists, &record.policy, &self.user_id);
        let bundle = group.add_and_remove_members(&self.client, &self.device, &[], &stale)?;
        let request = GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, bundle.welcome);
        self.keep_pending(record, &request).await?;
        Ok(Some(request))
    }

    /// The groups in which this device should commit the stored proposals now (it is the
    /// remaining member with the lowest leaf index), since the last call.
    pub fn take_commits_wanted(&mut self) -> Vec<GroupId> {
        std::mem::take(&mut self.commits_wanted).into_iter().collect()
    }

    /// A proposal at its position: this device's own is stored already; another member's is
    /// checked against the group's rule (the removal of a device of the proposer's own user),
    /// then stored for the next commit. A proposal that breaks the rule leaves the group stuck,
    /// as a bad commit does (the hub should have refused it).
    pub(super) async fn proposal(
        &mut self,
        event: &GroupEvent,
        mut record: GroupRecord,
        mine: bool,
    ) -> Result<Received, GroupError> {
        let group_id = &event.group_id;
        record.cursor = event.group_seq;
        if mine {
            self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
            return Ok(Received::Ack(event.group_seq));
        }
        let mut group = self.load(group_id)?;
        let proposal = match group.process(&self.client, &event.message.0) {
            Ok(Incoming::Proposal(proposal)) => proposal,
            Ok(other) => return self.stuck(record, GroupProblem::BadProposal(format!("not a proposal: {other:?}"))).await,
            Err(error) if error.kind() == ErrorKind::BadInput => {
                return self.stuck(record, GroupProblem::BadProposal(error.to_string())).await
            }
            Err(error) => return Err(error.into()),
        };
        let removed = match proposal.change() {
            MemberChange::Removed { index, leaf } if leaf.user() == proposal.sender().leaf.user() => *index,
            other => {
                let reason = format!(
                    "{} proposed {other:?}; only the removal of one's own devices may be proposed",
                    proposal.sender().leaf.user()
                );
                return self.stuck(record, GroupProblem::BadProposal(reason)).await;
            }
        };
        group.store_proposal(&self.client, proposal)?;
        let own = group.own_index();
        if removed == own {
            record.state = GroupState::Leaving;
        } else {
            let leaving = group.pending_removals();
            let committer = group.members()?.into_iter().map(|m| m.index).find(|index| !leaving.contains(index));
            if committer == Some(own) && record.state == GroupState::Active {
                self.commits_wanted.insert(group_id.clone());
            }
        }
        self.persist(GroupChanges { record: Some(record), ..GroupChanges::default() }).await?;
        Ok(Received::Ack(event.group_seq))
    }
}
