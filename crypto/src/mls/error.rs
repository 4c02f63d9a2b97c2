//! [`MlsError`]: what went wrong in an MLS operation, sorted into bad input from a peer and
//! misuse by the caller ([`ErrorKind`]). openmls' own error types stay inside this module: a
//! variant carries openmls' message as text for logs and debugging, never its type.

use super::credential::CredentialError;
pub use crate::x3dh::ErrorKind;
use openmls::prelude::{
    CommitBuilderStageError, CreateCommitError, CreateMessageError, CreationFromExternalError, ExportGroupInfoError,
    KeyPackageNewError, LeaveGroupError, MergeCommitError, MergePendingCommitError, MlsGroupStateError, NewGroupError,
    ProcessMessageError, ProposeRemoveMemberError, PublicProcessMessageError, ValidationError, WelcomeError,
};
use std::fmt::Display;

/// Why an MLS operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// The bytes are not a TLS-encoded MLS message of the expected type (bad input).
    #[error("malformed MLS input: expected {expected}")]
    Malformed {
        /// What the bytes should have been.
        expected: &'static str,
    },
    /// The input uses another ciphersuite than [`super::CIPHERSUITE`] (bad input).
    #[error("the input uses another ciphersuite")]
    WrongCiphersuite,
    /// A KeyPackage does not verify: signatures, lifetime, capabilities (bad input).
    #[error("invalid KeyPackage: {0}")]
    InvalidKeyPackage(String),
    /// A leaf's credential is not a Parley credential (bad input).
    #[error("a leaf's credential: {0}")]
    Credential(#[from] CredentialError),
    /// The message belongs to another group (bad input).
    #[error("the message belongs to another group")]
    WrongGroup,
    /// The message is from an epoch this member does not have (too old, or from the future):
    /// it missed commits, or the message is stale (bad input).
    #[error("the message is from an epoch this member does not have")]
    WrongEpoch,
    /// The hub's group is in epoch `current` and the handshake message is for another epoch
    /// (another commit won the epoch: process it and redo the change), or the application
    /// message is from an epoch the members no longer keep (bad input).
    #[error("the message is not for the group's current epoch {current}")]
    EpochConflict {
        /// The epoch the hub's group is in.
        current: u64,
    },
    /// The sender is not a member (external senders and external commits are not used in
    /// Parley groups) (bad input).
    #[error("the sender is not a member of the group")]
    UnsupportedSender,
    /// A proposal type Parley groups do not use (bad input).
    #[error("unsupported proposal type")]
    UnsupportedProposal,
    /// A commit leaves out proposals the hub accepted in its epoch: every commit must include
    /// all of them (the committer missed some: process the group stream and commit again)
    /// (bad input).
    #[error("the commit leaves out {missing} proposal(s) accepted in this epoch")]
    MissingProposals {
        /// How many accepted proposals the commit does not include.
        missing: usize,
    },
    /// The Welcome is for none of this client's KeyPackages (bad input: it was meant for
    /// someone else, or the KeyPackage was already used).
    #[error("the Welcome is for none of this client's KeyPackages")]
    NoMatchingKeyPackage,
    /// MLS validation refused the message: a signature, membership tag, decryption, commit or
    /// tree check failed (bad input).
    #[error("MLS validation failed: {0}")]
    Rejected(String),
    /// The signing identity passed is not the one this client's credential names (misuse).
    #[error("the device identity passed is not this client's")]
    WrongSigner,
    /// The group's state does not allow the operation now: a commit is pending, proposals are
    /// pending, or this member was removed (misuse).
    #[error("the group's state does not allow this: {0}")]
    State(String),
    /// This member is no longer in the group (misuse: the group is kept only to read its past).
    #[error("this member was removed from the group")]
    Inactive,
    /// The operation's arguments are not acceptable (a leaf that is not a member, removing
    /// oneself, an empty list) (misuse).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The storage provider failed, or holds a state openmls cannot read (misuse: the caller
    /// supplies the storage).
    #[error("MLS storage failed: {0}")]
    Storage(String),
    /// openmls reported an internal error: a bug here or there. Treated as misuse (do not retry
    /// the same call).
    #[error("internal MLS error: {0}")]
    Internal(String),
}

impl MlsError {
    /// Whether this is bad input or API misuse.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Malformed { .. }
            | Self::WrongCiphersuite
            | Self::InvalidKeyPackage(_)
            | Self::Credential(_)
            | Self::WrongGroup
            | Self::WrongEpoch
            | Self::EpochConflict { .. }
            | Self::UnsupportedSender
            | Self::UnsupportedProposal
            | Self::MissingProposals { .. }
            | Self::NoMatchingKeyPackage
            | Self::Rejected(_) => ErrorKind::BadInput,
            Self::WrongSigner
            | Self::State(_)
            | Self::Inactive
            | Self::InvalidRequest(_)
            | Self::Storage(_)
            | Self::Internal(_) => ErrorKind::Misuse,
        }
    }

    pub(crate) fn storage(error: impl std::fmt::Display) -> Self {
        Self::Storage(error.to_string())
    }

    pub(crate) fn internal(error: impl std::fmt::Display) -> Self {
        Self::Internal(error.to_string())
    }

    pub(crate) fn state(error: impl std::fmt::Display) -> Self {
        Self::State(error.to_string())
    }

    pub(crate) fn rejected(error: impl std::fmt::Display) -> Self {
        Self::Rejected(error.to_string())
    }
}

/// openmls' error for using a group in a state that does not allow it.
pub(crate) fn group_state(error: MlsGroupStateError) -> MlsError {
    match error {
        MlsGroupStateError::UseAfterEviction => MlsError::Inactive,
        MlsGroupStateError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::state(other),
    }
}

pub(crate) fn create_message(error: CreateMessageError) -> MlsError {
    match error {
        CreateMessageError::GroupStateError(e) => group_state(e),
        CreateMessageError::LibraryError(e) => MlsError::internal(e),
    }
}

pub(crate) fn leave<E: Display>(error: LeaveGroupError<E>) -> MlsError {
    match error {
        LeaveGroupError::GroupStateError(e) => group_state(e),
        LeaveGroupError::StorageError(e) => MlsError::storage(e),
        LeaveGroupError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::state(other),
    }
}

pub(crate) fn propose_remove<E: Display>(error: ProposeRemoveMemberError<E>) -> MlsError {
    match error {
        ProposeRemoveMemberError::GroupStateError(e) => group_state(e),
        ProposeRemoveMemberError::StorageError(e) => MlsError::storage(e),
        ProposeRemoveMemberError::LibraryError(e) => MlsError::internal(e),
        ProposeRemoveMemberError::UnknownMember => MlsError::InvalidRequest("no such member to remove".into()),
    }
}

pub(crate) fn new_group<E: Display>(error: NewGroupError<E>) -> MlsError {
    match error {
        NewGroupError::StorageError(e) => MlsError::storage(e),
        NewGroupError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::InvalidRequest(other.to_string()),
    }
}

pub(crate) fn new_key_package(error: KeyPackageNewError) -> MlsError {
    match error {
        KeyPackageNewError::StorageError => MlsError::storage(error),
        KeyPackageNewError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::InvalidRequest(other.to_string()),
    }
}

pub(crate) fn create_commit(error: CreateCommitError) -> MlsError {
    match error {
        CreateCommitError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::state(other),
    }
}

pub(crate) fn stage_commit<E: Display>(error: CommitBuilderStageError<E>) -> MlsError {
    match error {
        CommitBuilderStageError::KeyStoreError(e) => MlsError::storage(e),
        CommitBuilderStageError::LibraryError(e) => MlsError::internal(e),
    }
}

pub(crate) fn merge_commit<E: Display>(error: MergeCommitError<E>) -> MlsError {
    match error {
        MergeCommitError::StorageError(e) => MlsError::storage(e),
        MergeCommitError::LibraryError(e) => MlsError::internal(e),
    }
}

pub(crate) fn merge_pending_commit<E: Display>(error: MergePendingCommitError<E>) -> MlsError {
    match error {
        MergePendingCommitError::MlsGroupStateError(e) => group_state(e),
        MergePendingCommitError::MergeCommitError(e) => merge_commit(e),
    }
}

/// Sorts openmls' processing errors: validation failures are bad input, storage and state
/// problems are the caller's.
pub(crate) fn process_message<E: Display>(error: ProcessMessageError<E>) -> MlsError {
    match error {
        ProcessMessageError::ValidationError(ValidationError::WrongEpoch) => MlsError::WrongEpoch,
        ProcessMessageError::LibraryError(e) => MlsError::internal(e),
        ProcessMessageError::StorageError(e) => MlsError::storage(e),
        ProcessMessageError::GroupStateError(e) => group_state(e),
        other => MlsError::rejected(other),
    }
}

/// Sorts the hub's processing errors (the epoch was checked before, with the hub's epoch at hand).
pub(crate) fn public_process_message(error: PublicProcessMessageError) -> MlsError {
    match error {
        PublicProcessMessageError::ValidationError(ValidationError::WrongGroupId) => MlsError::WrongGroup,
        PublicProcessMessageError::ValidationError(ValidationError::WrongEpoch) => MlsError::WrongEpoch,
        PublicProcessMessageError::UnauthorizedExternalCommitMessage
        | PublicProcessMessageError::UnauthorizedExternalApplicationMessage => MlsError::UnsupportedSender,
        PublicProcessMessageError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::rejected(other),
    }
}

/// Sorts the errors of building the hub's group from a GroupInfo and a tree.
pub(crate) fn from_external<E: Display>(error: CreationFromExternalError<E>) -> MlsError {
    match error {
        CreationFromExternalError::UnsupportedCiphersuite(_) => MlsError::WrongCiphersuite,
        CreationFromExternalError::WriteToStorageError(e) => MlsError::storage(e),
        CreationFromExternalError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::rejected(other),
    }
}

pub(crate) fn export_group_info(error: ExportGroupInfoError) -> MlsError {
    match error {
        ExportGroupInfoError::GroupStateError(e) => group_state(e),
        ExportGroupInfoError::LibraryError(e) => MlsError::internal(e),
        other => MlsError::internal(other),
    }
}

/// Sorts openmls' Welcome errors.
pub(crate) fn welcome<E: Display>(error: WelcomeError<E>) -> MlsError {
    match error {
        WelcomeError::NoMatchingKeyPackage | WelcomeError::PrivateInitKeyNotFound => MlsError::NoMatchingKeyPackage,
        WelcomeError::LibraryError(e) => MlsError::internal(e),
        WelcomeError::StorageError(e) => MlsError::storage(e),
        WelcomeError::GroupAlreadyExists => MlsError::InvalidRequest("this client already has a group with that id".into()),
        other => MlsError::rejected(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(MlsError::Malformed { expected: "a Welcome" }.kind(), ErrorKind::BadInput);
        assert_eq!(MlsError::WrongEpoch.kind(), ErrorKind::BadInput);
        assert_eq!(MlsError::EpochConflict { current: 3 }.kind(), ErrorKind::BadInput);
        let wrong_group = PublicProcessMessageError::ValidationError(ValidationError::WrongGroupId);
        assert_eq!(public_process_message(wrong_group), MlsError::WrongGroup);
        assert!(matches!(public_process_message(PublicProcessMessageError::IncompatibleWireFormat), MlsError::Rejected(_)));
        let unsupported = CreationFromExternalError::<std::fmt::Error>::UnsupportedCiphersuite(super::super::CIPHERSUITE);
        assert_eq!(from_external(unsupported), MlsError::WrongCiphersuite);
        assert_eq!(from_external(CreationFromExternalError::WriteToStorageError(std::fmt::Error)).kind(), ErrorKind::Misuse);
        assert_eq!(MlsError::Credential(CredentialError::NotBasic).kind(), ErrorKind::BadInput);
        assert_eq!(MlsError::WrongSigner.kind(), ErrorKind::Misuse);
        assert_eq!(MlsError::Inactive.kind(), ErrorKind::Misuse);
        assert_eq!(MlsError::storage("disk").kind(), ErrorKind::Misuse);
        assert_eq!(group_state(MlsGroupStateError::UseAfterEviction), MlsError::Inactive);
        assert!(matches!(group_state(MlsGroupStateError::PendingCommit), MlsError::State(_)));
        let wrong_epoch = ProcessMessageError::<std::fmt::Error>::ValidationError(ValidationError::WrongEpoch);
        assert_eq!(process_message(wrong_epoch), MlsError::WrongEpoch);
        assert_eq!(welcome(WelcomeError::<std::fmt::Error>::NoMatchingKeyPackage), MlsError::NoMatchingKeyPackage);
        assert_eq!(welcome(WelcomeError::<std::fmt::Error>::StorageError(std::fmt::Error)).kind(), ErrorKind::Misuse);
    }
}
