//! MLS groups (RFC 9420) over openmls, behind a small API of our own: the rest of Parley never
//! touches an openmls type.
//!
//! * One ciphersuite, [`CIPHERSUITE`] (`MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519`).
//! * Every leaf's credential names a user and a device and its signature key is that device's
//!   ed25519 signing key (see [`MemberLeaf`]); [`MemberLeaf::check_against_list`] tells whether a
//!   signed device list vouches for a leaf. The API hands the caller every new leaf of a
//!   commit, a proposal or a Welcome *before* it is merged or joined, so the caller can refuse
//!   members nobody vouches for.
//! * Handshake messages (proposals, commits) are sent as MLS `PublicMessage`s so the group's hub
//!   can follow the public state and order commits; application messages are always
//!   `PrivateMessage`s. A Welcome carries no ratchet tree: the tree travels apart
//!   ([`Group::ratchet_tree`], [`MlsClient::join`]), as it is large in big groups.
//! * Wire artifacts cross the API as bytes: TLS-serialized `MLSMessage`s (KeyPackages, commits,
//!   proposals, application messages, Welcomes, GroupInfos) and the TLS-serialized ratchet tree.
//! * State lives in an openmls storage provider of the caller's choice ([`MlsStorage`]);
//!   openmls writes it as it goes, so a group is [loaded](MlsClient::load_group) again by its
//!   id after a restart. A [`MemoryStorage`] client is persisted by the caller as opaque
//!   key-value pairs: it starts from the stored pairs ([`MlsClient::with_state`]) and reports
//!   what changed since ([`MlsClient::take_state_changes`], [`StateChange`]), which the SDK
//!   writes to its profile store in one transaction.
//! * Randomness comes from openmls' RustCrypto provider (the operating system's RNG), and
//!   openmls reads the system clock to check leaf lifetimes; KeyPackage lifetimes are given by
//!   the caller ([`Lifetime`]).
//!
//! * The hub, which has no leaf, follows a group's public state with [`HubGroup`]: it checks
//!   commits (and their GroupInfo) and application messages, and merges the commits it accepts.
//!
//! Errors are [`MlsError`], with [`MlsError::kind`] telling bad input from misuse; no input from a
//! peer makes this module panic.

mod credential;
mod error;
mod group;
mod hub;
mod key_package;
mod state;
#[cfg(test)]
mod tests;

pub use credential::{CredentialError, LeafMismatch, MemberLeaf};
pub use error::{ErrorKind, MlsError};
pub use group::{CommitBundle, Group, Incoming, IncomingCommit, IncomingProposal, MemberChange, PendingJoin};
pub use hub::{AcceptedCommit, AcceptedProposal, ApplicationInfo, HubGroup, MessageKind};
pub use key_package::{KeyPackage, Lifetime, MAX_KEY_PACKAGE_LIFETIME_SECS};
/// openmls' in-memory storage provider (for tests and short-lived clients).
pub use openmls_rust_crypto::MemoryStorage;
/// openmls' storage traits, for implementing [`MlsStorage`] over a database.
pub use openmls_traits::storage;
pub use state::StateChange;

use crate::identity::DeviceIdentity;
use credential::DeviceSigner;
use openmls::prelude::{
    Capabilities, Ciphersuite, CredentialType, ExtensionType, LeafNodeIndex, MlsGroupCreateConfig, MlsGroupJoinConfig,
    PURE_PLAINTEXT_WIRE_FORMAT_POLICY,
};
use openmls_rust_crypto::RustCrypto;
use openmls_traits::OpenMlsProvider;
use parley_spec::{DeviceId, UserId};

/// The one ciphersuite of Parley groups.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519;

/// How many past epochs' message secrets a member keeps, to decrypt application messages the
/// hub ordered after a commit that were sent before it.
pub const MAX_PAST_EPOCHS: usize = 2;

/// A storage provider for MLS client state: any openmls `StorageProvider` of the current
/// storage version.
pub trait MlsStorage: storage::StorageProvider<{ storage::CURRENT_VERSION }> {}

impl<S: storage::StorageProvider<{ storage::CURRENT_VERSION }>> MlsStorage for S {}

/// The position of a member's leaf in the group's tree. Stable while the member stays in the
/// group; a removed member's index may be reused by a later add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeafIndex(u32);

impl LeafIndex {
    /// The index as a number.
    pub fn get(self) -> u32 {
        self.0
    }

    fn from_openmls(index: LeafNodeIndex) -> Self {
        Self(index.u32())
    }

    fn to_openmls(self) -> LeafNodeIndex {
        LeafNodeIndex::new(self.0)
    }
}

impl std::fmt::Display for LeafIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A member of a group: its leaf index and what its leaf says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Where the leaf is in the tree.
    pub index: LeafIndex,
    /// The user, device and signature key of the leaf.
    pub leaf: MemberLeaf,
}

impl Member {
    /// Our view of one of openmls' members (its credential must be a Parley credential).
    fn from_openmls(member: openmls::prelude::Member) -> Result<Self, MlsError> {
        Ok(Self {
            index: LeafIndex::from_openmls(member.index),
            leaf: MemberLeaf::from_parts(&member.credential, &member.signature_key)?,
        })
    }
}

/// openmls' provider over the caller's storage.
struct Provider<S> {
    crypto: RustCrypto,
    storage: S,
}

impl<S: MlsStorage> OpenMlsProvider for Provider<S> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = S;

    fn storage(&self) -> &S {
        &self.storage
    }

    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }

    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

/// One device's MLS client: its storage and its own leaf (user, device, signing key). Operations
/// that sign take the device's [`DeviceIdentity`], whose secret stays with the caller; it must be
/// the identity the client was created with ([`MlsError::WrongSigner`] otherwise).
pub struct MlsClient<S> {
    provider: Provider<S>,
    own: MemberLeaf,
    /// What [`MlsClient::take_state_changes`] last handed out (`MemoryStorage` clients only).
    snapshot: state::Snapshot,
}

impl<S> std::fmt::Debug for MlsClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsClient").field("own", &self.own).finish_non_exhaustive()
    }
}

impl<S: MlsStorage> MlsClient<S> {
    /// The client of `device` of `user`, whose leaves are signed by `identity`'s signing key,
    /// keeping its state in `storage`.
    pub fn new(storage: S, user: UserId, device: DeviceId, identity: &DeviceIdentity) -> Self {
        Self {
            provider: Provider { crypto: RustCrypto::default(), storage },
            own: MemberLeaf::new(user, device, identity.signing_public()),
            snapshot: state::Snapshot::default(),
        }
    }

    /// The storage provider.
    pub fn storage(&self) -> &S {
        &self.provider.storage
    }

    /// This client's own leaf: its user, device and signature key.
    pub fn own_leaf(&self) -> &MemberLeaf {
        &self.own
    }

    /// openmls' signer over `identity`, if it is this client's.
    fn signer<'a>(&self, identity: &'a DeviceIdentity) -> Result<DeviceSigner<'a>, MlsError> {
        if identity.signing_public().as_bytes() != self.own.signature_key_bytes() {
            return Err(MlsError::WrongSigner);
        }
        Ok(DeviceSigner(identity.signing_key()))
    }
}

/// The capabilities every Parley leaf advertises: our ciphersuite, basic credentials, and the
/// last-resort KeyPackage extension (which must be listed, or receivers refuse last-resort
/// KeyPackages).
fn capabilities() -> Capabilities {
    Capabilities::new(None, Some(&[CIPHERSUITE]), Some(&[ExtensionType::LastResort]), None, Some(&[CredentialType::Basic]))
}

/// The configuration of groups this client creates.
fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .use_ratchet_tree_extension(false)
        .capabilities(capabilities())
        .build()
}

/// The configuration of groups this client joins (the same policy as [`create_config`]).
fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .use_ratchet_tree_extension(false)
        .build()
}
