//! The machine's typed errors and reasons. The crypto crate's errors are carried as they are,
//! so a caller can ask [`CryptoError::kind`] whether a peer sent bad input or the local state
//! is wrong.

use super::store::StoreError;
use super::RequestId;
use parley_crypto::identity::{DeviceListError, IdentityError};
use parley_crypto::prekeys::MalformedPrekeySecret;
use parley_crypto::ratchet::RatchetError;
use parley_crypto::x3dh::{ErrorKind, X3dhError};
use parley_spec::{DeviceId, ErrorCode, UserId};

/// A cryptographic operation failed; the crypto crate's error, unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// Double Ratchet (including a stored session that does not load).
    #[error("crypto: {0}")]
    Ratchet(#[from] RatchetError),
    /// X3DH.
    #[error("crypto: {0}")]
    X3dh(#[from] X3dhError),
    /// Signing or checking a device list.
    #[error("crypto: {0}")]
    DeviceList(#[from] DeviceListError),
    /// Device keys or a signed prekey.
    #[error("crypto: {0}")]
    Identity(#[from] IdentityError),
    /// A stored prekey secret.
    #[error("crypto: {0}")]
    PrekeySecret(#[from] MalformedPrekeySecret),
}

impl CryptoError {
    /// Whether a peer (or the server) sent bad input, or the caller or its stored state is at
    /// fault.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Ratchet(e) => e.kind(),
            Self::X3dh(e) => e.kind(),
            Self::DeviceList(_) | Self::Identity(_) => ErrorKind::BadInput,
            Self::PrekeySecret(_) => ErrorKind::Misuse,
        }
    }
}

/// What was wrong with a prekey bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Its device keys are not the ones the signed device list names.
    #[error(transparent)]
    DeviceKeys(#[from] DeviceListError),
    /// Its prekeys fail X3DH's checks (signatures, points).
    #[error(transparent)]
    X3dh(#[from] X3dhError),
}

/// Why something the server sent about a user cannot be trusted. Nothing is encrypted to or
/// accepted from the devices concerned until it is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Untrust {
    /// The signed device list failed verification: a changed identity key, a rollback, an
    /// equivocation, or a forged or malformed list.
    DeviceList(DeviceListError),
    /// A prekey bundle does not match the verified device list.
    Bundle {
        /// The device whose bundle it is.
        device: DeviceId,
        /// What was wrong.
        error: BundleError,
    },
    /// A session start came from a device the signed list does not name.
    UnlistedSender(DeviceId),
    /// A session start used an identity key the signed list does not give that device.
    SenderKeyMismatch(DeviceId),
    /// The server kept answering `devices_mismatch` although the verified lists were fetched
    /// again: it insists on devices the signed lists do not name.
    DevicesKeepDiffering,
}

impl std::fmt::Display for Untrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeviceList(
                e @ (DeviceListError::IdentityChanged { .. }
                | DeviceListError::Rollback { .. }
                | DeviceListError::Equivocation { .. }),
            ) => write!(f, "{e}"),
            Self::DeviceList(e) => write!(f, "device list: {e}"),
            Self::Bundle { device, error } => write!(f, "prekey bundle of {device}: {error}"),
            Self::UnlistedSender(device) => write!(f, "device {device} is not in the signed device list"),
            Self::SenderKeyMismatch(device) => write!(f, "device {device} used an identity key its signed list does not name"),
            Self::DevicesKeepDiffering => write!(f, "the server's device list keeps differing from the signed device lists"),
        }
    }
}

/// Why a received ciphertext was not shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undecryptable {
    /// Neither the current nor a superseded session with the device decrypts it, and it does
    /// not start a session.
    #[error("no session with this device decrypts the message")]
    NoSession,
    /// A session start that was accepted before.
    #[error("replayed first message")]
    ReplayedFirstMessage,
    /// The ratchet refused it (tampered, truncated, unknown prekey) or the stored session with
    /// the device does not load.
    #[error("{0}")]
    Crypto(CryptoError),
    /// The sender's keys cannot be trusted.
    #[error("{0}")]
    Untrusted(Untrust),
    /// The sender's device list, needed to check a session start, could not be fetched.
    #[error("the sender's device list could not be fetched: {0}")]
    DeviceListUnavailable(Failure),
    /// It decrypted, but its content is of no known kind.
    #[error("unknown content")]
    UnknownContent,
}

/// How a request that the driver performed failed, as far as the machine cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The server refused it with this code.
    #[error("the server answered {0}")]
    Refused(ErrorCode),
    /// No answer: transport failure, timeout, connection closed.
    #[error("no answer from the server")]
    NoAnswer,
}

/// Why a machine operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum E2eeError {
    /// A device list or key bundle failed verification (an
    /// [`MessengerEvent::Untrusted`](super::MessengerEvent::Untrusted) was queued too).
    #[error("untrusted keys for {user}: {reason}")]
    Untrusted {
        /// Whose keys.
        user: UserId,
        /// Why.
        reason: Untrust,
    },
    /// A cryptographic operation on local state failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The device's own keys are not in the store.
    #[error("no device keys in the store")]
    NoAccount,
    /// An answer for a request the machine is not waiting for, or of the wrong type (misuse).
    #[error("unexpected answer for request {0:?}")]
    UnexpectedAnswer(RequestId),
}
