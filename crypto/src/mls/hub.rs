//! A group as its hub sees it: the public state only (tree, group context, no secrets). The hub
//! registers a group from its creator's GroupInfo and ratchet tree, checks each commit against
//! the public state and the GroupInfo that comes with it, merges the commits it accepts, and
//! checks application messages as far as it can without the group's secrets (groups.md §3, §6).
//!
//! What openmls lets a hub see: a `PublicMessage` commit is verified whole (signature of a
//! member, the commit's proposals and path); its membership tag is not, as the hub has no
//! membership key. A `PrivateMessage` shows only its group id, epoch and content type: the sender
//! and the content are encrypted, so the hub cannot tell who sent it or check its signature.

use super::error;
use super::group::{commit_changes, leaf_of, removed_by};
use super::key_package::tls_bytes;
use super::{LeafIndex, Member, MemberChange, MlsError, MlsStorage, CIPHERSUITE, MAX_PAST_EPOCHS};
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::tls_codec::Deserialize as _;
use openmls::prelude::{
    ContentType, GroupId, MlsMessageBodyIn, MlsMessageIn, OpenMlsSignaturePublicKey, ProcessedMessageContent, Proposal,
    ProposalStore, ProtocolMessage, PublicGroup, QueuedProposal, RatchetTreeIn, Sender, StagedCommit, Verifiable as _,
};
use openmls_rust_crypto::RustCrypto;

/// A commit the hub verified, not yet applied: route by its [`changes`](Self::changes), then
/// [`HubGroup::merge`] it, or drop it to refuse.
#[derive(Debug)]
pub struct AcceptedCommit {
    staged: Box<StagedCommit>,
    committer: Member,
    changes: Vec<MemberChange>,
}

impl AcceptedCommit {
    /// Who made the commit (its leaf before the commit).
    pub fn committer(&self) -> &Member {
        &self.committer
    }

    /// What the commit changes in the membership.
    pub fn changes(&self) -> &[MemberChange] {
        &self.changes
    }

    /// The epoch the commit moves the group to.
    pub fn epoch(&self) -> u64 {
        self.staged.epoch().as_u64()
    }
}

/// A proposal the hub verified and its policy allows, not yet stored: [`HubGroup::store_proposal`]
/// it (the epoch's commit must then include it), or drop it to refuse.
#[derive(Debug)]
pub struct AcceptedProposal {
    queued: Box<QueuedProposal>,
    proposer: Member,
    removed: Member,
}

impl AcceptedProposal {
    /// Who proposed.
    pub fn proposer(&self) -> &Member {
        &self.proposer
    }

    /// The member the proposal removes (the proposer, or another device of its user).
    pub fn removed(&self) -> &Member {
        &self.removed
    }
}

/// What an MLS message submitted to the hub is, by its framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageKind {
    /// An application message (must be a `PrivateMessage`).
    Application,
    /// A standalone proposal (must be a `PublicMessage`).
    Proposal,
    /// A commit (must be a `PublicMessage`).
    Commit,
}

/// What the hub can tell of an application message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ApplicationInfo {
    /// The epoch it was encrypted in (the current one or one of the [`MAX_PAST_EPOCHS`] before).
    /// The sender is not visible: a `PrivateMessage` encrypts it.
    pub epoch: u64,
}

/// The hub's view of one group, kept in the storage it was given: openmls writes the public state
/// on creation and on each merge, so the group is [loaded](Self::load) again by its id.
pub struct HubGroup<S> {
    public: PublicGroup,
    storage: S,
    crypto: RustCrypto,
}

impl<S> std::fmt::Debug for HubGroup<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubGroup")
            .field("group_id", &self.public.group_id().as_slice())
            .field("epoch", &self.public.group_context().epoch().as_u64())
            .finish_non_exhaustive()
    }
}

impl<S: MlsStorage> HubGroup<S> {
    /// Registers a group from a signed GroupInfo (an `MLSMessage`) and the ratchet tree of its
    /// epoch: verifies the tree, every leaf, and the GroupInfo's signature against its signer's
    /// leaf, and stores the public state. Every leaf must carry a Parley credential.
    pub fn from_group_info(group_info: &[u8], ratchet_tree: &[u8], storage: S) -> Result<Self, MlsError> {
        let group_info = parse_group_info(group_info)?;
        let tree =
            RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(|_| MlsError::Malformed { expected: "a ratchet tree" })?;
        let crypto = RustCrypto::default();
        let (public, _) = PublicGroup::from_external(&crypto, &storage, tree, group_info, ProposalStore::new())
            .map_err(error::from_external)?;
        let hub = Self { public, storage, crypto };
        hub.members()?;
        Ok(hub)
    }

    /// Loads a group from storage by its id (`None` if there is none).
    pub fn load(storage: S, group_id: &[u8]) -> Result<Option<Self>, MlsError> {
        let public = PublicGroup::load(&storage, &GroupId::from_slice(group_id)).map_err(MlsError::storage)?;
        Ok(public.map(|public| Self { public, storage, crypto: RustCrypto::default() }))
    }

    /// The storage provider.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// Gives the storage provider back.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// The group's id.
    pub fn group_id(&self) -> &[u8] {
        self.public.group_id().as_slice()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.public.group_context().epoch().as_u64()
    }

    /// The members, in leaf order.
    pub fn members(&self) -> Result<Vec<Member>, MlsError> {
        self.public.members().map(Member::from_openmls).collect()
    }

    /// The member at `index`, if there is one.
    pub fn member(&self, index: LeafIndex) -> Result<Option<Member>, MlsError> {
        self.public.leaf(index.to_openmls()).map(|leaf| Ok(Member { index, leaf: leaf_of(leaf)? })).transpose()
    }

    /// The TLS-serialized ratchet tree of the current epoch, for joiners.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, MlsError> {
        tls_bytes(&self.public.export_ratchet_tree())
    }

    /// What `message` is (it must parse and be of this group); not verified.
    pub fn message_kind(&self, message: &[u8]) -> Result<MessageKind, MlsError> {
        Ok(match self.protocol_message(message)?.content_type() {
            ContentType::Application => MessageKind::Application,
            ContentType::Proposal => MessageKind::Proposal,
            ContentType::Commit => MessageKind::Commit,
        })
    }

    /// How many proposals accepted in this epoch wait for its commit.
    pub fn pending_proposals(&self) -> usize {
        self.public.queued_proposals(&self.storage).map_or(0, |queued| queued.len())
    }

    /// Verifies a standalone proposal (an `MLSMessage` with a `PublicMessage`) against the
    /// public state and the group's rule for proposals: only removals, of a leaf of the
    /// proposer's own user (a user leaving, from one of its devices), not already proposed in
    /// this epoch. Every other change is made by commit. The proposal must be for the current
    /// epoch ([`MlsError::EpochConflict`] otherwise). Changes nothing until
    /// [stored](Self::store_proposal).
    pub fn check_proposal(&self, message: &[u8]) -> Result<AcceptedProposal, MlsError> {
        let message = self.handshake(message, ContentType::Proposal)?;
        let processed = self.public.process_message(&self.crypto, message).map_err(error::public_process_message)?;
        let Sender::Member(sender) = processed.sender() else { return Err(MlsError::UnsupportedSender) };
        let proposer = self.member(LeafIndex::from_openmls(*sender))?.ok_or(MlsError::UnsupportedSender)?;
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(MlsError::rejected("the message is not a proposal"));
        };
        let removed = match queued.proposal() {
            Proposal::Remove(remove) => LeafIndex::from_openmls(remove.removed()),
            Proposal::SelfRemove => proposer.index,
            _ => {
                return Err(MlsError::rejected(
                    "only the removal of one's own devices may be proposed; other changes are committed",
                ))
            }
        };
        let removed =
            self.member(removed)?.ok_or_else(|| MlsError::rejected(format!("no member at leaf {removed} to remove")))?;
        if removed.leaf.user() != proposer.leaf.user() {
            return Err(MlsError::rejected("a member may propose removing only its own user's devices"));
        }
        let queued_proposals = self.public.queued_proposals(&self.storage).map_err(MlsError::storage)?;
        if queued_proposals.iter().any(|(_, other)| removed_by(other) == Some(removed.index)) {
            return Err(MlsError::rejected(format!("the removal of leaf {} is proposed already", removed.index)));
        }
        Ok(AcceptedProposal { queued, proposer, removed })
    }

    /// Stores a proposal returned by [`check_proposal`](Self::check_proposal): the epoch's
    /// commit must include it.
    pub fn store_proposal(&mut self, proposal: AcceptedProposal) -> Result<(), MlsError> {
        self.public.add_proposal(&self.storage, *proposal.queued).map_err(MlsError::storage)
    }

    /// Verifies a commit (an `MLSMessage` with a `PublicMessage`) and the GroupInfo of the
    /// epoch it creates: the commit must be for the current epoch ([`MlsError::EpochConflict`]
    /// names it otherwise), from a member, and valid against the public state; the GroupInfo
    /// must be signed by the committer's (new) leaf and carry the group context the commit
    /// leads to. Changes nothing until [merged](Self::merge).
    pub fn check_commit(&self, message: &[u8], group_info: &[u8]) -> Result<AcceptedCommit, MlsError> {
        let message = self.handshake(message, ContentType::Commit)?;
        let group_info = parse_group_info(group_info)?;
        let processed = self.public.process_message(&self.crypto, message).map_err(error::public_process_message)?;
        let Sender::Member(sender) = processed.sender() else { return Err(MlsError::UnsupportedSender) };
        let committer = self.member(LeafIndex::from_openmls(*sender))?.ok_or(MlsError::UnsupportedSender)?;
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(MlsError::rejected("the message is not a commit"));
        };
        self.check_group_info(group_info, &staged, &committer)?;
        let queued = self.public.queued_proposals(&self.storage).map_err(MlsError::storage)?;
        let missing = queued
            .iter()
            .filter(|(proposal_ref, _)| !staged.queued_proposals().any(|p| p.proposal_reference_ref() == proposal_ref))
            .count();
        if missing > 0 {
            return Err(MlsError::MissingProposals { missing });
        }
        let changes = commit_changes(&staged, &committer, |index| self.member(index))?.into_iter().map(|(_, c)| c).collect();
        Ok(AcceptedCommit { staged, committer, changes })
    }

    /// Applies a commit returned by [`check_commit`](Self::check_commit) and stores the new
    /// public state.
    pub fn merge(&mut self, commit: AcceptedCommit) -> Result<(), MlsError> {
        self.public.merge_commit(&self.storage, *commit.staged).map_err(error::merge_commit)
    }

    /// Checks an application message (an `MLSMessage` with a `PrivateMessage`) as far as the hub
    /// can: it is of this group, an application message, and from the current epoch or one of
    /// the [`MAX_PAST_EPOCHS`] before ([`MlsError::EpochConflict`] otherwise). A `PublicMessage`
    /// application message is refused (application messages are always encrypted).
    pub fn check_application(&self, message: &[u8]) -> Result<ApplicationInfo, MlsError> {
        let message = self.protocol_message(message)?;
        let ProtocolMessage::PrivateMessage(_) = &message else {
            return Err(MlsError::rejected("an application message must be a PrivateMessage"));
        };
        if message.content_type() != ContentType::Application {
            return Err(MlsError::rejected("a handshake message must be a PublicMessage"));
        }
        let (epoch, current) = (message.epoch().as_u64(), self.epoch());
        if epoch > current || current - epoch > MAX_PAST_EPOCHS as u64 {
            return Err(MlsError::EpochConflict { current });
        }
        Ok(ApplicationInfo { epoch })
    }

    /// Parses a handshake message of this group: a `PublicMessage` with content of `kind`, for
    /// the current epoch ([`MlsError::EpochConflict`] otherwise).
    fn handshake(&self, message: &[u8], kind: ContentType) -> Result<ProtocolMessage, MlsError> {
        let message = self.protocol_message(message)?;
        let ProtocolMessage::PublicMessage(_) = &message else {
            return Err(MlsError::rejected("a handshake message must be a PublicMessage"));
        };
        if message.content_type() != kind {
            return Err(MlsError::rejected(format!("the message is not a {kind:?}")));
        }
        if message.epoch() != self.public.group_context().epoch() {
            return Err(MlsError::EpochConflict { current: self.epoch() });
        }
        Ok(message)
    }

    /// Parses a public or private message and checks that it is of this group.
    fn protocol_message(&self, message: &[u8]) -> Result<ProtocolMessage, MlsError> {
        const EXPECTED: &str = "an MLS public or private message";
        let message = MlsMessageIn::tls_deserialize_exact(message).map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        let message = message.try_into_protocol_message().map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
        if message.group_id() != self.public.group_id() {
            return Err(MlsError::WrongGroup);
        }
        Ok(message)
    }

    /// Checks the GroupInfo sent with a commit: signed by the committer's leaf after the
    /// commit, and for the group context the commit leads to.
    fn check_group_info(
        &self,
        group_info: VerifiableGroupInfo,
        staged: &StagedCommit,
        committer: &Member,
    ) -> Result<(), MlsError> {
        if group_info.group_context() != staged.group_context() {
            return Err(MlsError::rejected("the GroupInfo's group context is not the commit's"));
        }
        let signature_key = match staged.update_path_leaf_node() {
            Some(leaf) => leaf.signature_key().as_slice().to_vec(),
            None => committer.leaf.signature_key_bytes().to_vec(),
        };
        let key = OpenMlsSignaturePublicKey::new(signature_key.into(), CIPHERSUITE.signature_algorithm())
            .map_err(MlsError::rejected)?;
        group_info.verify(&self.crypto, &key).map_err(|_| MlsError::rejected("the GroupInfo is not signed by the committer"))?;
        Ok(())
    }
}

/// Parses a GroupInfo `MLSMessage` of our ciphersuite (not yet verified).
fn parse_group_info(bytes: &[u8]) -> Result<VerifiableGroupInfo, MlsError> {
    const EXPECTED: &str = "a GroupInfo";
    let message = MlsMessageIn::tls_deserialize_exact(bytes).map_err(|_| MlsError::Malformed { expected: EXPECTED })?;
    let MlsMessageBodyIn::GroupInfo(group_info) = message.extract() else {
        return Err(MlsError::Malformed { expected: EXPECTED });
    };
    if group_info.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::WrongCiphersuite);
    }
    Ok(group_info)
}
