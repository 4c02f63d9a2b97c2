//! A group as one member sees it: create, join from a Welcome, add, remove, self-update, leave,
//! encrypt, and process what arrives. Every change to the membership is shown to the caller as
//! [`MemberChange`]s before it takes effect ([`IncomingCommit`], [`IncomingProposal`],
//! [`PendingJoin`]), so new leaves can be checked against signed device lists first.
//!
//! # Commits and the hub
//!
//! A commit this member makes ([`CommitBundle`]) is *pending* until the hub accepts it: send
//! the commit, and when it comes back (as [`Incoming::OwnCommit`]) or the hub confirms it,
//! [`Group::merge_pending_commit`]. If the hub refuses it because another commit won the epoch,
//! [`Group::clear_pending_commit`], process the winning commit, and make the change again on
//! top. Welcomes go out only after the commit that made them was accepted, together with the
//! [`Group::ratchet_tree`] of the new epoch.

use super::credential::MemberLeaf;
use super::error;
use super::key_package::{tls_bytes, KeyPackage};
use super::{create_config, join_config, LeafIndex, Member, MlsClient, MlsError, MlsStorage};
use crate::identity::DeviceIdentity;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    CommitMessageBundle, GroupId, LeafNode, MlsGroup, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent,
    Proposal, QueuedProposal, RatchetTreeIn, Sender, StagedCommit, StagedWelcome,
};
use openmls_traits::OpenMlsProvider as _;

/// What a commit produced: the commit for the hub, a Welcome if it added members, and the
/// signed GroupInfo of the new epoch (which the hub keeps for joiners). All TLS-serialized
/// `MLSMessage`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitBundle {
    /// The commit (an MLS `PublicMessage`).
    pub commit: Vec<u8>,
    /// The Welcome for the added members, if any.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the epoch the commit creates.
    pub group_info: Vec<u8>,
}

/// A change of membership, as announced by a commit, a proposal or a Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// A device joins with this leaf (its leaf index is known once merged).
    Added(MemberLeaf),
    /// The member at `index` replaces its leaf (an update proposal, or the committer's new leaf
    /// in the commit's path).
    Updated {
        /// The member's leaf index.
        index: LeafIndex,
        /// Its new leaf.
        leaf: MemberLeaf,
    },
    /// The member at `index`, with this leaf, leaves the group.
    Removed {
        /// The member's leaf index.
        index: LeafIndex,
        /// Its current leaf.
        leaf: MemberLeaf,
    },
}

impl MemberChange {
    /// The leaf this change brings into the group (to be checked), if any.
    pub fn new_leaf(&self) -> Option<&MemberLeaf> {
        match self {
            Self::Added(leaf) | Self::Updated { leaf, .. } => Some(leaf),
            Self::Removed { .. } => None,
        }
    }
}

/// A verified commit from another member, not yet applied: check its
/// [`new_leaves`](Self::new_leaves), then [`Group::merge_commit`] it, or drop it to refuse.
#[derive(Debug)]
pub struct IncomingCommit {
    staged: Box<StagedCommit>,
    committer: Member,
    changes: Vec<MemberChange>,
    /// Who asked for each of `changes`.
    requesters: Vec<Member>,
}

impl IncomingCommit {
    /// Who made the commit (its leaf before the commit).
    pub fn committer(&self) -> &Member {
        &self.committer
    }

    /// What the commit changes in the membership.
    pub fn changes(&self) -> &[MemberChange] {
        &self.changes
    }

    /// Each change with the member who asked for it: the sender of the proposal that brought
    /// it (a member leaving), or the committer (what the commit proposes itself, its new leaf).
    /// Group policy is checked against these (only admins add, or remove other users).
    pub fn requests(&self) -> impl Iterator<Item = (&Member, &MemberChange)> {
        self.requesters.iter().zip(&self.changes)
    }

    /// The leaves the commit brings in (adds, updates and the committer's new leaf): each must be
    /// vouched for by its user's signed device list.
    pub fn new_leaves(&self) -> impl Iterator<Item = &MemberLeaf> {
        self.changes.iter().filter_map(MemberChange::new_leaf)
    }

    /// Whether the commit removes this member.
    pub fn removes_me(&self) -> bool {
        self.staged.self_removed()
    }

    /// The epoch the commit moves the group to.
    pub fn epoch(&self) -> u64 {
        self.staged.epoch().as_u64()
    }
}

/// A verified proposal from a member, not yet stored: check its [`change`](Self::change), then
/// [`Group::store_proposal`] it so the next commit includes it, or drop it to refuse.
#[derive(Debug)]
pub struct IncomingProposal {
    queued: Box<QueuedProposal>,
    sender: Member,
    change: MemberChange,
}

impl IncomingProposal {
    /// Who proposed.
    pub fn sender(&self) -> &Member {
        &self.sender
    }

    /// What the proposal would change.
    pub fn change(&self) -> &MemberChange {
        &self.change
    }
}

/// What [`Group::process`] found in a message.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// An application message from a member.
    Application {
        /// The sender.
        sender: Member,
        /// The decrypted content.
        plaintext: Vec<u8>,
    },
    /// A proposal from a member.
    Proposal(IncomingProposal),
    /// A commit from another member.
    Commit(IncomingCommit),
    /// This member's own pending commit, fanned back: it was accepted; call
    /// [`Group::merge_pending_commit`].
    OwnCommit,
    /// This member's own application message, fanned back (it cannot decrypt its own
    /// messages): skip it.
    OwnMessage,
}

/// A Welcome this client can join, not joined yet: check the [`members`](Self::members) (every
/// leaf must be vouched for by a signed device list), then [`accept`](Self::accept) it, or drop it
/// to refuse. The KeyPackage it used is spent either way (unless it is a last-resort one).
pub struct PendingJoin {
    staged: StagedWelcome,
    members: Vec<Member>,
    sender: Member,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingJoin").field("members", &self.members).field("sender", &self.sender).finish_non_exhaustive()
    }
}

impl PendingJoin {
    /// The group's id.
    pub fn group_id(&self) -> &[u8] {
        self.staged.group_context().group_id().as_slice()
    }

    /// The epoch the Welcome joins.
    pub fn epoch(&self) -> u64 {
        self.staged.group_context().epoch().as_u64()
    }

    /// Every member of the group, this device included.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member who sent the Welcome.
    pub fn welcome_sender(&self) -> &Member {
        &self.sender
    }

    /// Joins the group.
    pub fn accept<S: MlsStorage>(self, client: &MlsClient<S>) -> Result<Group, MlsError> {
        let inner = self.staged.into_group(&client.provider).map_err(error::welcome)?;
        Ok(Group { inner })
    }
}

/// One member's view of a group. Its state is kept in the client's storage as it changes;
/// dropping a `Group` loses nothing ([`MlsClient::load_group`]).
#[derive(Debug)]
pub struct Group {
    inner: MlsGroup,
}

impl<S: MlsStorage> MlsClient<S> {
    /// Creates a group with this device as its only member, in epoch 0.
    pub fn create_group(&self, identity: &DeviceIdentity, group_id: &[u8]) -> Result<Group, MlsError> {
        let signer = self.signer(identity)?;
        let inner = MlsGroup::new_with_group_id(
            &self.provider,
            &signer,
            &create_config(),
            GroupId::from_slice(group_id),
            self.own.credential_with_key(),
        )
        .map_err(error::new_group)?;
        Ok(Group { inner })
    }

    /// Loads a group from storage by its id (`None` if there is none).
    pub fn load_group(&self, group_id: &[u8]) -> Result<Option<Group>, MlsError> {
        let inner = MlsGroup::load(&self.provider.storage, &GroupId::from_slice(group_id)).map_err(MlsError::storage)?;
        Ok(inner.map(|inner| Group { inner }))
    }

    /// Reads a Welcome (an `MLSMessage`) and the ratchet tree of the epoch it joins
    /// ([`Group::ratchet_tree`]), and verifies them. Every leaf must carry a Parley credential.
    pub fn join(&self, welcome: &[u8], ratchet_tree: &[u8]) -> Result<PendingJoin, MlsError> {
        const EXPECTED: &str = "a Welcome";
        let message = MlsMessageIn::tls_deserialize_exact(welcome).map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        let MlsMessageBodyIn::Welcome(welcome) = message.extract() else {
            return Err(MlsError::Malformed { expected: EXPECTED });
        };
        if welcome.ciphersuite() != super::CIPHERSUITE {
            return Err(MlsError::WrongCiphersuite);
        }
        let tree =
            RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(|_| MlsError::Malformed { expected: "a ratchet tree" })?;
        let staged =
            StagedWelcome::new_from_welcome(&self.provider, &join_config(), welcome, Some(tree)).map_err(error::welcome)?;
        let members = staged.members().map(Member::from_openmls).collect::<Result<Vec<_>, MlsError>>()?;
        let sender_index = LeafIndex::from_openmls(staged.welcome_sender_index());
        let sender = members
            .iter()
            .find(|m| m.index == sender_index)
            .cloned()
            .ok_or_else(|| MlsError::rejected("the Welcome's sender is not a member"))?;
        Ok(PendingJoin { staged, members, sender })
    }
}

impl Group {
    /// The group's id.
    pub fn group_id(&self) -> &[u8] {
        self.inner.group_id().as_slice()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch().as_u64()
    }

    /// This member's leaf index.
    pub fn own_index(&self) -> LeafIndex {
        LeafIndex::from_openmls(self.inner.own_leaf_index())
    }

    /// Whether this member is still in the group (false once a commit removing it was merged).
    pub fn is_active(&self) -> bool {
        self.inner.is_active()
    }

    /// Whether a commit of this member awaits the hub's verdict.
    pub fn has_pending_commit(&self) -> bool {
        self.inner.pending_commit().is_some()
    }

    /// The members, in leaf order.
    pub fn members(&self) -> Result<Vec<Member>, MlsError> {
        self.inner.members().map(Member::from_openmls).collect()
    }

    /// The member at `index`, if there is one.
    pub fn member(&self, index: LeafIndex) -> Result<Option<Member>, MlsError> {
        self.inner.member_at(index.to_openmls()).map(Member::from_openmls).transpose()
    }

    /// The TLS-serialized ratchet tree of the current epoch, which joiners need with their
    /// Welcome (export it after merging the commit that added them).
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, MlsError> {
        tls_bytes(&self.inner.export_ratchet_tree())
    }

    /// The signed GroupInfo of the current epoch (an `MLSMessage`, without the ratchet tree): what
    /// a group's creator gives the hub, with [`ratchet_tree`](Self::ratchet_tree), to register the
    /// group ([`HubGroup::from_group_info`](super::HubGroup::from_group_info)). Commits carry
    /// their own ([`CommitBundle::group_info`]).
    pub fn group_info<S: MlsStorage>(&self, client: &MlsClient<S>, identity: &DeviceIdentity) -> Result<Vec<u8>, MlsError> {
        let signer = client.signer(identity)?;
        let message = self.inner.export_group_info(client.provider.crypto(), &signer, false).map_err(error::export_group_info)?;
        message_bytes(&message)
    }

    /// Adds devices by their KeyPackages, in one commit (which also updates this member's
    /// path). The commit is pending until [merged](Self::merge_pending_commit).
    pub fn add_members<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        key_packages: &[KeyPackage],
    ) -> Result<CommitBundle, MlsError> {
        if key_packages.is_empty() {
            return Err(MlsError::InvalidRequest("no KeyPackage to add".into()));
        }
        let adds = key_packages.iter().map(|kp| kp.openmls().clone()).collect::<Vec<_>>();
        self.commit(client, identity, adds, Vec::new(), false)
    }

    /// Removes the members at `indices`, in one commit. To remove oneself, use
    /// [`leave`](Self::leave).
    pub fn remove_members<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        indices: &[LeafIndex],
    ) -> Result<CommitBundle, MlsError> {
        if indices.is_empty() {
            return Err(MlsError::InvalidRequest("no member to remove".into()));
        }
        self.add_and_remove_members(client, identity, &[], indices)
    }

    /// Adds devices by their KeyPackages and removes the members at `indices`, in one commit
    /// that also carries the stored proposals: a member's next change can carry removals it
    /// owes, such as devices that left their owner's signed device list. Both lists may be
    /// empty only while proposals are stored (the commit then carries just those). Pending
    /// until [merged](Self::merge_pending_commit).
    pub fn add_and_remove_members<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        key_packages: &[KeyPackage],
        indices: &[LeafIndex],
    ) -> Result<CommitBundle, MlsError> {
        if key_packages.is_empty() && indices.is_empty() && !self.has_pending_proposals() {
            return Err(MlsError::InvalidRequest("no member to add or remove, and no proposal to commit".into()));
        }
        for index in indices {
            if *index == self.own_index() {
                return Err(MlsError::InvalidRequest("a member cannot remove itself by commit; leave instead".into()));
            }
            if self.inner.member_at(index.to_openmls()).is_none() {
                return Err(MlsError::InvalidRequest(format!("no member at leaf {index}")));
            }
        }
        let adds = key_packages.iter().map(|kp| kp.openmls().clone()).collect::<Vec<_>>();
        let removes = indices.iter().map(|i| i.to_openmls()).collect();
        self.commit(client, identity, adds, removes, false)
    }

    /// Replaces this member's leaf and path keys (post-compromise security), in one commit.
    pub fn self_update<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
    ) -> Result<CommitBundle, MlsError> {
        self.commit(client, identity, Vec::new(), Vec::new(), true)
    }

    /// Commits the proposals stored with [`store_proposal`](Self::store_proposal) (for instance
    /// another member's request to leave).
    pub fn commit_pending_proposals<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
    ) -> Result<CommitBundle, MlsError> {
        if !self.has_pending_proposals() {
            return Err(MlsError::InvalidRequest("no pending proposal to commit".into()));
        }
        self.add_and_remove_members(client, identity, &[], &[])
    }

    /// Asks to leave: returns a proposal removing this member (an MLS `PublicMessage`), which
    /// another member commits. This member stays in the group until that commit arrives.
    pub fn leave<S: MlsStorage>(&mut self, client: &MlsClient<S>, identity: &DeviceIdentity) -> Result<Vec<u8>, MlsError> {
        let signer = client.signer(identity)?;
        let message = self.inner.leave_group(&client.provider, &signer).map_err(error::leave)?;
        message_bytes(&message)
    }

    /// Proposes removing the member at `index` (this member itself, or another device of its
    /// user when the user leaves): returns the proposal (an MLS `PublicMessage`), which another
    /// member commits. The proposal is also stored with this member's pending proposals.
    pub fn propose_remove<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        index: LeafIndex,
    ) -> Result<Vec<u8>, MlsError> {
        let signer = client.signer(identity)?;
        if !self.is_active() {
            return Err(MlsError::Inactive);
        }
        if self.inner.member_at(index.to_openmls()).is_none() {
            return Err(MlsError::InvalidRequest(format!("no member at leaf {index}")));
        }
        let (message, _) =
            self.inner.propose_remove_member(&client.provider, &signer, index.to_openmls()).map_err(error::propose_remove)?;
        message_bytes(&message)
    }

    /// Whether proposals are stored, waiting for a commit (openmls sends no application
    /// message until they are committed).
    pub fn has_pending_proposals(&self) -> bool {
        self.inner.pending_proposals().next().is_some()
    }

    /// The members the stored proposals remove (the next commit removes them).
    pub fn pending_removals(&self) -> Vec<LeafIndex> {
        self.inner.pending_proposals().filter_map(removed_by).collect()
    }

    /// Drops the stored proposals this member made (the hub refused them, so no commit may
    /// refer to them); other members' proposals stay.
    pub fn drop_own_proposals<S: MlsStorage>(&mut self, client: &MlsClient<S>) -> Result<(), MlsError> {
        let own = self.inner.own_leaf_index();
        let refs: Vec<_> = self
            .inner
            .pending_proposals()
            .filter(|queued| matches!(queued.sender(), Sender::Member(index) if *index == own))
            .map(|queued| queued.proposal_reference_ref().clone())
            .collect();
        for proposal_ref in refs {
            self.inner.remove_pending_proposal(&client.provider.storage, &proposal_ref).map_err(MlsError::storage)?;
        }
        Ok(())
    }

    /// Encrypts an application message (an MLS `PrivateMessage`) for the current epoch. openmls
    /// refuses while proposals are stored and not yet committed ([`MlsError::State`]): commit
    /// them first ([`commit_pending_proposals`](Self::commit_pending_proposals)).
    pub fn encrypt<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, MlsError> {
        if !self.is_active() {
            return Err(MlsError::Inactive);
        }
        let signer = client.signer(identity)?;
        let message = self.inner.create_message(&client.provider, &signer, plaintext).map_err(error::create_message)?;
        message_bytes(&message)
    }

    /// Reads a message of this group (an `MLSMessage` with a `PublicMessage` or
    /// `PrivateMessage`): decrypts application messages, verifies proposals and commits (which
    /// change nothing until the caller stores or merges them).
    pub fn process<S: MlsStorage>(&mut self, client: &MlsClient<S>, message: &[u8]) -> Result<Incoming, MlsError> {
        const EXPECTED: &str = "an MLS public or private message";
        let message = MlsMessageIn::tls_deserialize_exact(message).map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        let message = message.try_into_protocol_message().map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        if message.group_id() != self.inner.group_id() {
            return Err(MlsError::WrongGroup);
        }
        if !self.is_active() {
            return Err(MlsError::Inactive);
        }
        let processed = self.inner.process_message(&client.provider, message).map_err(error::process_message)?;
        let sender_index = match processed.sender() {
            Sender::Member(index) => LeafIndex::from_openmls(*index),
            _ => return Err(MlsError::UnsupportedSender),
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(application) => {
                Ok(Incoming::Application { sender: self.sender(sender_index)?, plaintext: application.into_bytes() })
            }
            ProcessedMessageContent::ProposalMessage(queued) => {
                let sender = self.sender(sender_index)?;
                let change = self.proposal_change(queued.proposal(), &sender)?;
                Ok(Incoming::Proposal(IncomingProposal { queued, sender, change }))
            }
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let committer = self.sender(sender_index)?;
                let (requesters, changes) = commit_changes(&staged, &committer, |index| self.member(index))?.into_iter().unzip();
                Ok(Incoming::Commit(IncomingCommit { staged, committer, changes, requesters }))
            }
            ProcessedMessageContent::OwnPendingCommit => Ok(Incoming::OwnCommit),
            ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::OwnMessage),
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => Err(MlsError::UnsupportedSender),
        }
    }

    /// Applies a commit returned by [`process`](Self::process): the group moves to its epoch.
    /// A pending commit of this member is dropped (the hub accepted the other one).
    pub fn merge_commit<S: MlsStorage>(&mut self, client: &MlsClient<S>, commit: IncomingCommit) -> Result<(), MlsError> {
        self.inner.merge_staged_commit(&client.provider, *commit.staged).map_err(error::merge_commit)
    }

    /// Queues a proposal returned by [`process`](Self::process), for the next commit.
    pub fn store_proposal<S: MlsStorage>(&mut self, client: &MlsClient<S>, proposal: IncomingProposal) -> Result<(), MlsError> {
        self.inner.store_pending_proposal(&client.provider.storage, *proposal.queued).map_err(MlsError::storage)
    }

    /// Applies this member's pending commit, once the hub accepted it.
    pub fn merge_pending_commit<S: MlsStorage>(&mut self, client: &MlsClient<S>) -> Result<(), MlsError> {
        if !self.has_pending_commit() {
            return Err(MlsError::InvalidRequest("no pending commit".into()));
        }
        self.inner.merge_pending_commit(&client.provider).map_err(error::merge_pending_commit)
    }

    /// Drops this member's pending commit (the hub refused it); the group stays in its epoch.
    pub fn clear_pending_commit<S: MlsStorage>(&mut self, client: &MlsClient<S>) -> Result<(), MlsError> {
        self.inner.clear_pending_commit(&client.provider.storage).map_err(MlsError::storage)
    }

    /// Makes a commit with `adds`, `removes`, the stored proposals, and a path update when
    /// asked or needed; it is pending until merged.
    fn commit<S: MlsStorage>(
        &mut self,
        client: &MlsClient<S>,
        identity: &DeviceIdentity,
        adds: Vec<openmls::prelude::KeyPackage>,
        removes: Vec<openmls::prelude::LeafNodeIndex>,
        force_self_update: bool,
    ) -> Result<CommitBundle, MlsError> {
        let signer = client.signer(identity)?;
        if !self.is_active() {
            return Err(MlsError::Inactive);
        }
        if self.has_pending_commit() {
            return Err(MlsError::State("a commit is already pending: merge or clear it first".into()));
        }
        let provider = &client.provider;
        let bundle: CommitMessageBundle = self
            .inner
            .commit_builder()
            .propose_adds(adds)
            .propose_removals(removes)
            .force_self_update(force_self_update)
            .load_psks(provider.storage())
            .map_err(error::create_commit)?
            .create_group_info(true)
            .build(provider.rand(), provider.crypto(), &signer, |_| true)
            .map_err(error::create_commit)?
            .stage_commit(provider)
            .map_err(error::stage_commit)?;
        let (commit, welcome, group_info) = bundle.into_messages();
        let group_info = group_info.ok_or_else(|| MlsError::internal("the commit builder made no GroupInfo"))?;
        Ok(CommitBundle {
            commit: message_bytes(&commit)?,
            welcome: welcome.as_ref().map(message_bytes).transpose()?,
            group_info: message_bytes(&group_info)?,
        })
    }

    /// The current member at `index`, which must exist (the sender of a verified message).
    fn sender(&self, index: LeafIndex) -> Result<Member, MlsError> {
        self.member(index)?.ok_or(MlsError::UnsupportedSender)
    }

    /// What a proposal from `sender` would change.
    fn proposal_change(&self, proposal: &Proposal, sender: &Member) -> Result<MemberChange, MlsError> {
        Ok(match proposal {
            Proposal::Add(add) => MemberChange::Added(leaf_of(add.key_package().leaf_node())?),
            Proposal::Update(update) => MemberChange::Updated { index: sender.index, leaf: leaf_of(update.leaf_node())? },
            Proposal::Remove(remove) => self.removal(LeafIndex::from_openmls(remove.removed()))?,
            Proposal::SelfRemove => MemberChange::Removed { index: sender.index, leaf: sender.leaf.clone() },
            _ => return Err(MlsError::UnsupportedProposal),
        })
    }

    /// The removal of the current member at `index`.
    fn removal(&self, index: LeafIndex) -> Result<MemberChange, MlsError> {
        let member = self.member(index)?.ok_or_else(|| MlsError::rejected(format!("no member at leaf {index} to remove")))?;
        Ok(MemberChange::Removed { index, leaf: member.leaf })
    }
}

/// The membership changes of a staged commit from `committer`, each with the member who asked
/// for it (a proposal's sender; the committer for what the commit proposes itself and for its
/// path); `member_at` looks up the current members (before the commit).
pub(super) fn commit_changes(
    staged: &StagedCommit,
    committer: &Member,
    member_at: impl Fn(LeafIndex) -> Result<Option<Member>, MlsError>,
) -> Result<Vec<(Member, MemberChange)>, MlsError> {
    let removal = |index: LeafIndex| -> Result<MemberChange, MlsError> {
        let member = member_at(index)?.ok_or_else(|| MlsError::rejected(format!("no member at leaf {index} to remove")))?;
        Ok(MemberChange::Removed { index, leaf: member.leaf })
    };
    let mut changes = Vec::new();
    for proposal in staged.queued_proposals() {
        let change = match proposal.proposal() {
            Proposal::Add(add) => MemberChange::Added(leaf_of(add.key_package().leaf_node())?),
            Proposal::Update(update) => {
                let Sender::Member(index) = proposal.sender() else { return Err(MlsError::UnsupportedSender) };
                MemberChange::Updated { index: LeafIndex::from_openmls(*index), leaf: leaf_of(update.leaf_node())? }
            }
            Proposal::Remove(remove) => removal(LeafIndex::from_openmls(remove.removed()))?,
            Proposal::SelfRemove => {
                let Sender::Member(index) = proposal.sender() else { return Err(MlsError::UnsupportedSender) };
                removal(LeafIndex::from_openmls(*index))?
            }
            _ => return Err(MlsError::UnsupportedProposal),
        };
        let requester = match proposal.sender() {
            Sender::Member(index) if LeafIndex::from_openmls(*index) != committer.index => {
                member_at(LeafIndex::from_openmls(*index))?.ok_or(MlsError::UnsupportedSender)?
            }
            Sender::Member(_) => committer.clone(),
            _ => return Err(MlsError::UnsupportedSender),
        };
        changes.push((requester, change));
    }
    if let Some(leaf_node) = staged.update_path_leaf_node() {
        changes.push((committer.clone(), MemberChange::Updated { index: committer.index, leaf: leaf_of(leaf_node)? }));
    }
    Ok(changes)
}

/// The leaf a queued proposal removes, if it is a removal.
pub(super) fn removed_by(queued: &QueuedProposal) -> Option<LeafIndex> {
    match (queued.proposal(), queued.sender()) {
        (Proposal::Remove(remove), _) => Some(LeafIndex::from_openmls(remove.removed())),
        (Proposal::SelfRemove, Sender::Member(index)) => Some(LeafIndex::from_openmls(*index)),
        _ => None,
    }
}

pub(super) fn leaf_of(leaf_node: &LeafNode) -> Result<MemberLeaf, MlsError> {
    Ok(MemberLeaf::from_parts(leaf_node.credential(), leaf_node.signature_key().as_slice())?)
}

pub(super) fn message_bytes(message: &MlsMessageOut) -> Result<Vec<u8>, MlsError> {
    message.to_bytes().map_err(MlsError::internal)
}
