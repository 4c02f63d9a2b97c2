//! The Double Ratchet for 1:1 sessions, as specified by Signal: *The Double Ratchet Algorithm*,
//! revision 1, Perrin & Marlinspike, 2016 (<https://signal.org/docs/specifications/doubleratchet/>),
//! bootstrapped by X3DH ([`crate::x3dh`], section 7.1 of the Double Ratchet specification).
//!
//! Parameters (Double Ratchet section 5.2, with an AEAD instead of CBC + HMAC):
//!
//! ```text
//! GENERATE_DH  X25519 (x25519-dalek); DH outputs must be non-zero (no low-order keys)
//! KDF_RK(rk, dh)  HKDF-SHA256(salt = rk, ikm = dh, info = "Parley ratchet v1") -> 64 bytes
//!                 = new root key (32) || chain key (32)
//! KDF_CK(ck)      message key = HMAC-SHA256(ck, 0x01), next chain key = HMAC-SHA256(ck, 0x02)
//! ENCRYPT(mk, plaintext, ad)
//!                 HKDF-SHA256(salt = 32 zero bytes, ikm = mk, info = "Parley message keys v1")
//!                 -> 44 bytes = ChaCha20-Poly1305 key (32) || nonce (12);
//!                 associated data = X3DH AD (IK_A || IK_B, 64) || every message byte before
//!                 the AEAD output (version, type, X3DH initial header if any, ratchet header)
//! MAX_SKIP        1000 per chain step; at most 2000 skipped keys kept, oldest evicted first
//! ```
//!
//! X3DH bootstrap: the initiator ("Alice") starts with `RK = SK`, `DHr` = the responder's signed
//! prekey and a fresh `DHs`, and does the first sending ratchet step at once. The responder
//! ("Bob") starts with `RK = SK`, `DHs` = its signed prekey key pair, and no chains.
//!
//! One deviation from the pseudocode, taken from Olm: the sending half of a DH ratchet step is
//! deferred. On a message with a new ratchet key, `decrypt` only does the receiving half
//! (`RK, CKr = KDF_RK(RK, DH(DHs, DHr))`) and drops the sending chain; the next `encrypt` makes
//! the new `DHs` (so only `encrypt` needs an RNG) and does `RK, CKs = KDF_RK(RK, DH(DHs, DHr))`,
//! `PN = Ns`, `Ns = 0`. Both sides run the same root-chain steps in the same order, so this
//! interoperates with itself; the new key pair is simply created later.
//!
//! # Message format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       1     version = 0x01
//! 1       1     type: 0x00 normal, 0x01 initial (carries the X3DH initial header)
//! 2       73    [type 0x01 only] X3DH initial header (see x3dh::InitialHeader):
//!                 IK_A (32) || EK_A (32) || signed prekey id (u32 BE)
//!                 || prekey kind (u8: 0 none, 1 one-time, 2 last-resort) || prekey id (u32 BE)
//! h       40    ratchet header: ratchet public key (32) || PN (u32 BE) || N (u32 BE)
//! h+40    n+16  ChaCha20-Poly1305 ciphertext of the n-byte plaintext, then the 16-byte tag
//! ```
//!
//! The initiator sends initial (type 0x01) messages until it has decrypted a reply, so whichever
//! of them reaches the responder first can start its session ([`Session::accept_initial`]).
//!
//! # Guarantees
//!
//! A failed `decrypt` leaves the session exactly as it was (every change is staged and committed
//! only after the AEAD tag verifies). A message key is deleted when used, so a replayed message
//! fails. Secrets are zeroized on drop and never appear in `Debug` output.
//!
//! A [`Session`] is deliberately not `Clone`: two copies that both encrypt would reuse message
//! keys. For the same reason, persist [`Session::to_bytes`] after every `encrypt` before the
//! ciphertext leaves the device, and never restore an older snapshot.

use crate::keys::{parse_x25519_public, KeyError};
use crate::x3dh::{
    self, AssociatedData, ErrorKind, InitialHeader, Initiated, PrekeyRef, Responded, StaticSecret, X25519PublicKey,
};
use crate::x3dh::{X3dhError, AD_LEN, KEY_LEN};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use std::collections::BTreeMap;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Version byte of every message.
pub const MESSAGE_VERSION: u8 = 1;
/// HKDF info of `KDF_RK`.
pub const RATCHET_INFO: &[u8] = b"Parley ratchet v1";
/// HKDF info of the message key expansion (AEAD key and nonce).
pub const MESSAGE_KEYS_INFO: &[u8] = b"Parley message keys v1";
/// Most message keys skipped in one chain step (per chain).
pub const MAX_SKIP: u32 = 1000;
/// Most skipped message keys kept per session; the oldest are evicted first.
pub const MAX_STORED_SKIPPED: usize = 2000;
/// Length of the Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Version byte of [`Session::to_bytes`].
pub const SESSION_STATE_VERSION: u8 = 1;
/// How many of the peer's previous ratchet keys are remembered, so that a late message from a
/// closed chain fails as [`RatchetError::DuplicateOrExpired`] rather than as a bogus DH ratchet step.
pub const MAX_PREVIOUS_RATCHET_KEYS: usize = 64;

const TYPE_NORMAL: u8 = 0;
const TYPE_INITIAL: u8 = 1;
const NONCE_LEN: usize = 12;

/// Why a ratchet operation failed. [`RatchetError::kind`] sorts them into bad input and misuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RatchetError {
    /// The message is too short (bad input).
    #[error("message truncated")]
    Truncated,
    /// The message has an unknown version byte (bad input).
    #[error("unsupported message version {0}")]
    UnsupportedVersion(u8),
    /// The message has an unknown type or a bad field (bad input).
    #[error("malformed message")]
    Malformed,
    /// The X3DH part of an initial message is bad (see the inner error's kind).
    #[error("X3DH: {0}")]
    X3dh(#[from] X3dhError),
    /// A peer's ratchet key has low order (bad input).
    #[error("the peer's ratchet key has low order")]
    WeakKey,
    /// An initial message names a prekey this device does not hold: already used (a replay),
    /// rotated away, or never existed (bad input).
    #[error("the message names a prekey this device does not hold")]
    UnknownPrekey,
    /// [`Session::accept_initial`] was given a message without an X3DH initial header (bad input).
    #[error("not an initial message")]
    NotInitialMessage,
    /// An initial message that starts another session than this one: try
    /// [`Session::accept_initial`] (bad input for this session).
    #[error("the initial message belongs to another session")]
    SessionMismatch,
    /// The message would skip more than [`MAX_SKIP`] message keys (bad input).
    #[error("message skips too many message keys")]
    TooManySkipped,
    /// The message key was already used (a replay) or evicted (too old) (bad input).
    #[error("message already decrypted, or too old")]
    DuplicateOrExpired,
    /// The AEAD tag does not verify: tampered, or not for this session (bad input).
    #[error("message does not decrypt")]
    DecryptFailed,
    /// A responder session cannot send before it has decrypted a message (misuse).
    #[error("this session cannot send before it has received a message")]
    CannotSendYet,
    /// The sending chain reached 2^32 messages; start a new session (misuse).
    #[error("message counter exhausted")]
    CounterExhausted,
    /// The plaintext is too large for the AEAD (misuse).
    #[error("plaintext too large")]
    TooLarge,
    /// [`Session::from_bytes`] was given bytes that are not a valid session (misuse).
    #[error("stored session state is corrupt")]
    CorruptState,
    /// [`Session::from_bytes`] was given an unknown state version (misuse).
    #[error("unsupported stored session version {0}")]
    UnsupportedStateVersion(u8),
}

impl RatchetError {
    /// Whether this is bad input or API misuse.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::X3dh(e) => e.kind(),
            Self::CannotSendYet
            | Self::CounterExhausted
            | Self::TooLarge
            | Self::CorruptState
            | Self::UnsupportedStateVersion(_) => ErrorKind::Misuse,
            Self::Truncated
            | Self::UnsupportedVersion(_)
            | Self::Malformed
            | Self::WeakKey
            | Self::UnknownPrekey
            | Self::NotInitialMessage
            | Self::SessionMismatch
            | Self::TooManySkipped
            | Self::DuplicateOrExpired
            | Self::DecryptFailed => ErrorKind::BadInput,
        }
    }
}

/// The ratchet header of a message: the sender's current ratchet public key, the length of its
/// previous sending chain (`PN`) and the message's number in the current chain (`N`).
///
/// Encoding ([`Header::LEN`] = 40 bytes): `key (32) || PN (u32 BE) || N (u32 BE)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The sender's ratchet public key.
    pub ratchet_key: X25519PublicKey,
    /// `PN`: number of messages in the sender's previous sending chain.
    pub previous_chain_length: u32,
    /// `N`: this message's number in the sending chain.
    pub message_number: u32,
}

impl Header {
    /// Length of the encoding.
    pub const LEN: usize = KEY_LEN + 4 + 4;

    /// The fixed binary encoding.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..32].copy_from_slice(self.ratchet_key.as_bytes());
        out[32..36].copy_from_slice(&self.previous_chain_length.to_be_bytes());
        out[36..40].copy_from_slice(&self.message_number.to_be_bytes());
        out
    }

    /// Parses exactly [`Header::LEN`] bytes; the key must be canonically encoded
    /// ([`RatchetError::Malformed`]) and not of small order ([`RatchetError::WeakKey`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RatchetError> {
        if bytes.len() != Self::LEN {
            return Err(RatchetError::Truncated);
        }
        Ok(Self {
            ratchet_key: parse_x25519_public(&bytes[..32]).map_err(|e| match e {
                KeyError::SmallOrder => RatchetError::WeakKey,
                _ => RatchetError::Malformed,
            })?,
            previous_chain_length: be32(&bytes[32..36]),
            message_number: be32(&bytes[36..40]),
        })
    }
}

/// The X3DH initial header of a message, if it is an initial message. Lets a caller route a
/// message: to the session whose [`Session::initial_header`] matches, or to
/// [`Session::accept_initial`].
pub fn initial_header(ciphertext: &[u8]) -> Result<Option<InitialHeader>, RatchetError> {
    Ok(Parsed::parse(ciphertext)?.initial)
}

/// The secrets a responder device holds, looked up by the ids an initial message names.
/// Returned secrets are zeroized when dropped.
pub trait PrekeyStore {
    /// The device's X25519 identity secret.
    fn identity_key(&self) -> StaticSecret;
    /// The signed prekey secret with this `key_id` (keep recent ones for a while after rotating).
    fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret>;
    /// The one-time prekey secret with this `key_id`, unless already used.
    fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret>;
    /// The last-resort prekey secret with this `key_id`.
    fn last_resort_prekey(&self, key_id: u32) -> Option<StaticSecret>;
}

/// What [`Session::accept_initial`] returns.
pub struct AcceptedSession {
    /// The new session (persist it).
    pub session: Session,
    /// The first message's plaintext.
    pub plaintext: Vec<u8>,
    /// The prekey used as X3DH DH4 input; delete its secret now if it is a one-time prekey.
    pub used_prekey: Option<PrekeyRef>,
}

impl std::fmt::Debug for AcceptedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptedSession")
            .field("session", &self.session)
            .field("plaintext_len", &self.plaintext.len())
            .field("used_prekey", &self.used_prekey)
            .finish()
    }
}

/// A root, chain or message key: zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct Key32([u8; KEY_LEN]);

/// A skipped message key and when it was stored (for oldest-first eviction).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct SkippedKey {
    seq: u64,
    key: Key32,
}

/// (ratchet public key, message number)
type SkippedId = ([u8; KEY_LEN], u32);

/// One side of a 1:1 Double Ratchet session.
pub struct Session {
    is_initiator: bool,
    /// Initiator only: still attaching the initial header (no reply decrypted yet).
    awaiting_reply: bool,
    associated_data: AssociatedData,
    /// The X3DH header this session was started with (sent by the initiator).
    initial: InitialHeader,
    root_key: Key32,
    dhs: StaticSecret,
    dhs_public: X25519PublicKey,
    dhr: Option<X25519PublicKey>,
    /// `None`: the next `encrypt` starts a new sending chain (deferred DH ratchet step).
    sending_chain: Option<Key32>,
    receiving_chain: Option<Key32>,
    ns: u32,
    nr: u32,
    pn: u32,
    /// The peer's earlier ratchet keys (oldest first), at most [`MAX_PREVIOUS_RATCHET_KEYS`].
    previous_ratchet_keys: Vec<[u8; KEY_LEN]>,
    skipped: BTreeMap<SkippedId, SkippedKey>,
    next_skip_seq: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("is_initiator", &self.is_initiator)
            .field("awaiting_reply", &self.awaiting_reply)
            .field("associated_data", &self.associated_data)
            .field("sent_in_chain", &self.ns)
            .field("received_in_chain", &self.nr)
            .field("previous_chain_length", &self.pn)
            .field("skipped_keys", &self.skipped.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the initiator's session from its X3DH result. The first messages carry
    /// `x3dh.header()` until a reply decrypts.
    pub fn initiate(rng: &mut (impl RngCore + CryptoRng), x3dh: Initiated) -> Result<Self, RatchetError> {
        let dhs = StaticSecret::random_from_rng(rng);
        let dhr = *x3dh.remote_signed_prekey();
        let dh = x3dh::diffie_hellman(&dhs, &dhr).map_err(|_| RatchetError::WeakKey)?;
        let (root_key, sending_chain) = kdf_rk(&Key32(*x3dh.shared_key().as_bytes()), &dh);
        Ok(Self {
            is_initiator: true,
            awaiting_reply: true,
            associated_data: *x3dh.associated_data(),
            initial: *x3dh.header(),
            root_key,
            dhs_public: X25519PublicKey::from(&dhs),
            dhs,
            dhr: Some(dhr),
            sending_chain: Some(sending_chain),
            receiving_chain: None,
            ns: 0,
            nr: 0,
            pn: 0,
            previous_ratchet_keys: Vec::new(),
            skipped: BTreeMap::new(),
            next_skip_seq: 0,
        })
    }

    /// Starts the responder's session from its X3DH result. It cannot send until it has
    /// decrypted a message; [`Session::accept_initial`] does both steps.
    pub fn accept(x3dh: Responded) -> Self {
        let dhs = x3dh.signed_prekey().clone();
        Self {
            is_initiator: false,
            awaiting_reply: false,
            associated_data: *x3dh.associated_data(),
            initial: *x3dh.header(),
            root_key: Key32(*x3dh.shared_key().as_bytes()),
            dhs_public: X25519PublicKey::from(&dhs),
            dhs,
            dhr: None,
            sending_chain: None,
            receiving_chain: None,
            ns: 0,
            nr: 0,
            pn: 0,
            previous_ratchet_keys: Vec::new(),
            skipped: BTreeMap::new(),
            next_skip_seq: 0,
        }
    }

    /// Starts the responder's session from an incoming initial message: looks up the prekey
    /// secrets it names, runs X3DH, and decrypts it. On success the caller persists the session
    /// and deletes the one-time prekey secret (`used_prekey`), so a replay of the message then
    /// fails with [`RatchetError::UnknownPrekey`]. (Sessions on a last-resort prekey or 3-DH
    /// cannot detect such a replay here; a caller that cares remembers the initial headers it
    /// accepted.) The caller must also check [`Session::remote_identity_key`] against the
    /// sender's device list.
    pub fn accept_initial(keys: &impl PrekeyStore, ciphertext: &[u8]) -> Result<AcceptedSession, RatchetError> {
        let header = Parsed::parse(ciphertext)?.initial.ok_or(RatchetError::NotInitialMessage)?;
        let signed_prekey = keys.signed_prekey(header.signed_prekey_id).ok_or(RatchetError::UnknownPrekey)?;
        let one_time = match header.one_time_prekey {
            None => None,
            Some(PrekeyRef::OneTime(id)) => Some(keys.one_time_prekey(id).ok_or(RatchetError::UnknownPrekey)?),
            Some(PrekeyRef::LastResort(id)) => Some(keys.last_resort_prekey(id).ok_or(RatchetError::UnknownPrekey)?),
        };
        let responded = x3dh::respond(&keys.identity_key(), &signed_prekey, one_time.as_ref(), &header)?;
        let mut session = Session::accept(responded);
        let plaintext = session.decrypt(ciphertext)?;
        Ok(AcceptedSession { session, plaintext, used_prekey: header.one_time_prekey })
    }

    /// Encrypts `plaintext` into a self-contained message (see the module docs for the format).
    /// The RNG is used when a new sending chain starts (deferred DH ratchet step).
    pub fn encrypt(&mut self, rng: &mut (impl RngCore + CryptoRng), plaintext: &[u8]) -> Result<Vec<u8>, RatchetError> {
        if self.sending_chain.is_none() {
            let dhr = self.dhr.ok_or(RatchetError::CannotSendYet)?;
            let dhs = StaticSecret::random_from_rng(rng);
            let dh = x3dh::diffie_hellman(&dhs, &dhr).map_err(|_| RatchetError::WeakKey)?;
            let (root_key, chain) = kdf_rk(&self.root_key, &dh);
            self.root_key = root_key;
            self.dhs_public = X25519PublicKey::from(&dhs);
            self.dhs = dhs;
            self.sending_chain = Some(chain);
            self.pn = self.ns;
            self.ns = 0;
        }
        if self.ns == u32::MAX {
            return Err(RatchetError::CounterExhausted);
        }
        let chain = self.sending_chain.as_ref().ok_or(RatchetError::CannotSendYet)?;
        let (message_key, next_chain) = kdf_ck(chain);

        let header = Header { ratchet_key: self.dhs_public, previous_chain_length: self.pn, message_number: self.ns };
        let initial_len = if self.awaiting_reply { InitialHeader::LEN } else { 0 };
        let mut out = Vec::with_capacity(2 + initial_len + Header::LEN + plaintext.len() + TAG_LEN);
        out.push(MESSAGE_VERSION);
        if self.awaiting_reply {
            out.push(TYPE_INITIAL);
            out.extend_from_slice(&self.initial.to_bytes());
        } else {
            out.push(TYPE_NORMAL);
        }
        out.extend_from_slice(&header.to_bytes());
        let (cipher, nonce) = message_cipher(&message_key);
        let aad = self.aad(&out);
        let body = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .map_err(|_| RatchetError::TooLarge)?;
        out.extend_from_slice(&body);

        self.sending_chain = Some(next_chain);
        self.ns += 1;
        Ok(out)
    }

    /// Decrypts a message from the peer. Fails, leaving the session unchanged, on a malformed,
    /// tampered, replayed, too old or foreign message.
    pub fn decrypt(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, RatchetError> {
        let msg = Parsed::parse(ciphertext)?;
        if let Some(initial) = &msg.initial {
            if self.is_initiator || *initial != self.initial {
                return Err(RatchetError::SessionMismatch);
            }
        }
        let header = msg.header;

        // A key skipped earlier.
        let id: SkippedId = (header.ratchet_key.to_bytes(), header.message_number);
        if let Some(skipped) = self.skipped.get(&id) {
            let plaintext = self.open(&skipped.key, &msg)?;
            self.skipped.remove(&id);
            self.awaiting_reply = false;
            return Ok(plaintext);
        }

        // Stage every change; commit only once the tag verifies.
        let mut new_skipped = Vec::new();
        let dh_step = self.dhr != Some(header.ratchet_key);
        let (new_root, chain, nr) = if dh_step {
            if self.previous_ratchet_keys.contains(header.ratchet_key.as_bytes()) {
                // A chain that is closed: its remaining keys were skipped, used or evicted.
                return Err(RatchetError::DuplicateOrExpired);
            }
            if let (Some(chain), Some(dhr)) = (&self.receiving_chain, &self.dhr) {
                skip_keys(chain.clone(), self.nr, header.previous_chain_length, dhr, &mut new_skipped)?;
            }
            let dh = x3dh::diffie_hellman(&self.dhs, &header.ratchet_key).map_err(|_| RatchetError::WeakKey)?;
            let (root, chain) = kdf_rk(&self.root_key, &dh);
            (Some(root), chain, 0)
        } else {
            // Only the initiator's first `DHr` (the responder's signed prekey) has no receiving chain.
            (None, self.receiving_chain.clone().ok_or(RatchetError::DecryptFailed)?, self.nr)
        };
        if header.message_number < nr {
            return Err(RatchetError::DuplicateOrExpired);
        }
        let chain = skip_keys(chain, nr, header.message_number, &header.ratchet_key, &mut new_skipped)?;
        let (message_key, next_chain) = kdf_ck(&chain);
        let nr = header.message_number.checked_add(1).ok_or(RatchetError::Malformed)?;
        let plaintext = self.open(&message_key, &msg)?;

        if let Some(root) = new_root {
            self.root_key = root;
            if let Some(old) = self.dhr.replace(header.ratchet_key) {
                if self.previous_ratchet_keys.len() == MAX_PREVIOUS_RATCHET_KEYS {
                    self.previous_ratchet_keys.remove(0);
                }
                self.previous_ratchet_keys.push(old.to_bytes());
            }
            self.sending_chain = None;
        }
        self.receiving_chain = Some(next_chain);
        self.nr = nr;
        for (id, key) in new_skipped {
            self.skipped.insert(id, SkippedKey { seq: self.next_skip_seq, key });
            self.next_skip_seq += 1;
        }
        self.evict_skipped();
        self.awaiting_reply = false;
        Ok(plaintext)
    }

    /// `AD = IK_A || IK_B` of the X3DH that started this session.
    pub fn associated_data(&self) -> &AssociatedData {
        &self.associated_data
    }

    /// The peer device's X25519 identity key.
    pub fn remote_identity_key(&self) -> X25519PublicKey {
        if self.is_initiator {
            self.associated_data.responder_identity()
        } else {
            self.associated_data.initiator_identity()
        }
    }

    /// This device's X25519 identity key.
    pub fn local_identity_key(&self) -> X25519PublicKey {
        if self.is_initiator {
            self.associated_data.initiator_identity()
        } else {
            self.associated_data.responder_identity()
        }
    }

    /// Whether this side started the session.
    pub fn is_initiator(&self) -> bool {
        self.is_initiator
    }

    /// Whether outgoing messages still carry the X3DH initial header (initiator, no reply yet).
    pub fn is_awaiting_reply(&self) -> bool {
        self.awaiting_reply
    }

    /// The X3DH initial header that started this session.
    pub fn initial_header(&self) -> &InitialHeader {
        &self.initial
    }

    /// How many skipped message keys are stored.
    pub fn skipped_key_count(&self) -> usize {
        self.skipped.len()
    }

    /// The versioned binary encoding of the whole state, secrets included, for the local store:
    ///
    /// ```text
    /// version (u8 = 1) || flags (u8: 1 initiator, 2 awaiting reply, 4 DHr, 8 CKs, 16 CKr)
    /// || AD (64) || initial header (73) || RK (32) || DHs secret (32)
    /// || [DHr (32)] || [CKs (32)] || [CKr (32)] || Ns || Nr || PN (u32 BE each)
    /// || previous peer ratchet key count (u8) || those keys, oldest first (32 each)
    /// || next eviction sequence (u64 BE) || skipped count (u32 BE)
    /// || per skipped key, ascending by (key, N): ratchet key (32) || N (u32 BE) || sequence (u64 BE) || message key (32)
    /// ```
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let chains = [self.dhr.is_some(), self.sending_chain.is_some(), self.receiving_chain.is_some()];
        let len = 2
            + AD_LEN
            + InitialHeader::LEN
            + 2 * KEY_LEN
            + KEY_LEN * chains.iter().filter(|c| **c).count()
            + 12
            + 1
            + KEY_LEN * self.previous_ratchet_keys.len()
            + 8
            + 4
            + SKIPPED_ENTRY_LEN * self.skipped.len();
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        let flags = u8::from(self.is_initiator)
            | u8::from(self.awaiting_reply) << 1
            | u8::from(chains[0]) << 2
            | u8::from(chains[1]) << 3
            | u8::from(chains[2]) << 4;
        out.push(SESSION_STATE_VERSION);
        out.push(flags);
        out.extend_from_slice(self.associated_data.as_bytes());
        out.extend_from_slice(&self.initial.to_bytes());
        out.extend_from_slice(&self.root_key.0);
        out.extend_from_slice(self.dhs.as_bytes());
        if let Some(dhr) = &self.dhr {
            out.extend_from_slice(dhr.as_bytes());
        }
        if let Some(chain) = &self.sending_chain {
            out.extend_from_slice(&chain.0);
        }
        if let Some(chain) = &self.receiving_chain {
            out.extend_from_slice(&chain.0);
        }
        for n in [self.ns, self.nr, self.pn] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out.push(self.previous_ratchet_keys.len() as u8);
        for key in &self.previous_ratchet_keys {
            out.extend_from_slice(key);
        }
        out.extend_from_slice(&self.next_skip_seq.to_be_bytes());
        out.extend_from_slice(&(self.skipped.len() as u32).to_be_bytes());
        for ((key, n), skipped) in &self.skipped {
            out.extend_from_slice(key);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&skipped.seq.to_be_bytes());
            out.extend_from_slice(&skipped.key.0);
        }
        debug_assert_eq!(out.len(), len);
        out
    }

    /// Restores a session from [`Session::to_bytes`]; rejects anything malformed or
    /// inconsistent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RatchetError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != SESSION_STATE_VERSION {
            return Err(RatchetError::UnsupportedStateVersion(version));
        }
        let flags = r.u8()?;
        if flags & !0x1F != 0 {
            return Err(RatchetError::CorruptState);
        }
        let bit = |b: u8| flags & (1 << b) != 0;
        let (is_initiator, awaiting_reply, has_dhr, has_cks, has_ckr) = (bit(0), bit(1), bit(2), bit(3), bit(4));
        let mut ad = [0u8; AD_LEN];
        ad.copy_from_slice(r.take(AD_LEN)?);
        let associated_data = AssociatedData::from_bytes(ad);
        let initial = InitialHeader::from_bytes(r.take(InitialHeader::LEN)?).map_err(|_| RatchetError::CorruptState)?;
        let root_key = Key32(r.array32()?);
        let dhs = StaticSecret::from(r.array32()?);
        let dhr = if has_dhr { Some(X25519PublicKey::from(r.array32()?)) } else { None };
        let sending_chain = if has_cks { Some(Key32(r.array32()?)) } else { None };
        let receiving_chain = if has_ckr { Some(Key32(r.array32()?)) } else { None };
        let (ns, nr, pn) = (r.u32()?, r.u32()?, r.u32()?);
        let previous_count = usize::from(r.u8()?);
        if previous_count > MAX_PREVIOUS_RATCHET_KEYS {
            return Err(RatchetError::CorruptState);
        }
        let previous_ratchet_keys = (0..previous_count).map(|_| r.array32()).collect::<Result<Vec<_>, _>>()?;
        let next_skip_seq = r.u64()?;
        let count = r.u32()? as usize;
        if count > MAX_STORED_SKIPPED || r.0.len() != count * SKIPPED_ENTRY_LEN {
            return Err(RatchetError::CorruptState);
        }
        let mut skipped = BTreeMap::new();
        let mut last: Option<SkippedId> = None;
        for _ in 0..count {
            let id: SkippedId = (r.array32()?, r.u32()?);
            let seq = r.u64()?;
            let key = Key32(r.array32()?);
            if last.is_some_and(|l| l >= id) || seq >= next_skip_seq {
                return Err(RatchetError::CorruptState);
            }
            last = Some(id);
            skipped.insert(id, SkippedKey { seq, key });
        }
        // Invariants `initiate`, `accept`, `encrypt` and `decrypt` maintain.
        let consistent = associated_data.initiator_identity() == initial.identity_key
            && (is_initiator || !awaiting_reply)
            && (!is_initiator || has_dhr)
            && (!has_ckr || has_dhr)
            && (!has_cks || has_dhr);
        if !consistent {
            return Err(RatchetError::CorruptState);
        }
        Ok(Self {
            is_initiator,
            awaiting_reply,
            associated_data,
            initial,
            root_key,
            dhs_public: X25519PublicKey::from(&dhs),
            dhs,
            dhr,
            sending_chain,
            receiving_chain,
            ns,
            nr,
            pn,
            previous_ratchet_keys,
            skipped,
            next_skip_seq,
        })
    }

    /// `X3DH AD || prefix`: the AEAD associated data of a message whose bytes before the AEAD
    /// output are `prefix`.
    fn aad(&self, prefix: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AD_LEN + prefix.len());
        aad.extend_from_slice(self.associated_data.as_bytes());
        aad.extend_from_slice(prefix);
        aad
    }

    fn open(&self, message_key: &Key32, msg: &Parsed<'_>) -> Result<Vec<u8>, RatchetError> {
        let (cipher, nonce) = message_cipher(message_key);
        let aad = self.aad(msg.prefix);
        cipher.decrypt(Nonce::from_slice(&nonce), Payload { msg: msg.body, aad: &aad }).map_err(|_| RatchetError::DecryptFailed)
    }

    /// Keeps the newest [`MAX_STORED_SKIPPED`] skipped keys.
    fn evict_skipped(&mut self) {
        if self.skipped.len() <= MAX_STORED_SKIPPED {
            return;
        }
        let mut seqs: Vec<u64> = self.skipped.values().map(|s| s.seq).collect();
        seqs.sort_unstable();
        let keep_from = seqs[seqs.len() - MAX_STORED_SKIPPED];
        self.skipped.retain(|_, s| s.seq >= keep_from);
    }
}

const SKIPPED_ENTRY_LEN: usize = KEY_LEN + 4 + 8 + KEY_LEN;

/// A parsed message, borrowing from the input.
struct Parsed<'a> {
    initial: Option<InitialHeader>,
    header: Header,
    /// Every byte before the AEAD output (authenticated as associated data).
    prefix: &'a [u8],
    /// AEAD ciphertext and tag.
    body: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, RatchetError> {
        let (&version, rest) = bytes.split_first().ok_or(RatchetError::Truncated)?;
        if version != MESSAGE_VERSION {
            return Err(RatchetError::UnsupportedVersion(version));
        }
        let (&kind, rest) = rest.split_first().ok_or(RatchetError::Truncated)?;
        let (initial, rest) = match kind {
            TYPE_NORMAL => (None, rest),
            TYPE_INITIAL => {
                if rest.len() < InitialHeader::LEN {
                    return Err(RatchetError::Truncated);
                }
                let (initial, rest) = rest.split_at(InitialHeader::LEN);
                (Some(InitialHeader::from_bytes(initial)?), rest)
            }
            _ => return Err(RatchetError::Malformed),
        };
        if rest.len() < Header::LEN + TAG_LEN {
            return Err(RatchetError::Truncated);
        }
        let (header, body) = rest.split_at(Header::LEN);
        let prefix_len = bytes.len() - body.len();
        Ok(Self { initial, header: Header::from_bytes(header)?, prefix: &bytes[..prefix_len], body })
    }
}

/// Reads a stored session; any shortfall is [`RatchetError::CorruptState`].
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RatchetError> {
        if self.0.len() < n {
            return Err(RatchetError::CorruptState);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RatchetError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, RatchetError> {
        Ok(be32(self.take(4)?))
    }

    fn u64(&mut self) -> Result<u64, RatchetError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    fn array32(&mut self) -> Result<[u8; KEY_LEN], RatchetError> {
        Ok(array32(self.take(KEY_LEN)?))
    }
}

/// `KDF_RK`: HKDF-SHA256(salt = root key, ikm = DH output, info = RATCHET_INFO) → (root, chain).
fn kdf_rk(root_key: &Key32, dh: &[u8; KEY_LEN]) -> (Key32, Key32) {
    let mut okm = Zeroizing::new([0u8; 2 * KEY_LEN]);
    hkdf::Hkdf::<Sha256>::new(Some(&root_key.0), dh)
        .expand(RATCHET_INFO, okm.as_mut())
        .expect("64 bytes is a valid HKDF-SHA256 length");
    (Key32(array32(&okm[..KEY_LEN])), Key32(array32(&okm[KEY_LEN..])))
}

/// `KDF_CK`: (message key, next chain key) = (HMAC(ck, 0x01), HMAC(ck, 0x02)).
fn kdf_ck(chain_key: &Key32) -> (Key32, Key32) {
    (hmac_byte(chain_key, 0x01), hmac_byte(chain_key, 0x02))
}

fn hmac_byte(key: &Key32, byte: u8) -> Key32 {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC takes keys of any length");
    mac.update(&[byte]);
    let mut out = mac.finalize().into_bytes();
    let key = Key32(array32(&out));
    out.as_mut_slice().zeroize();
    key
}

/// The AEAD and nonce of one message key.
fn message_cipher(message_key: &Key32) -> (ChaCha20Poly1305, [u8; NONCE_LEN]) {
    let mut okm = Zeroizing::new([0u8; KEY_LEN + NONCE_LEN]);
    hkdf::Hkdf::<Sha256>::new(Some(&[0u8; KEY_LEN]), &message_key.0)
        .expand(MESSAGE_KEYS_INFO, okm.as_mut())
        .expect("44 bytes is a valid HKDF-SHA256 length");
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&okm[..KEY_LEN]));
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&okm[KEY_LEN..]);
    (cipher, nonce)
}

/// Advances `chain` from message number `from` to `until`, staging the skipped message keys
/// under `ratchet_key`; returns the chain key for message `until`.
fn skip_keys(
    mut chain: Key32,
    from: u32,
    until: u32,
    ratchet_key: &X25519PublicKey,
    out: &mut Vec<(SkippedId, Key32)>,
) -> Result<Key32, RatchetError> {
    if until <= from {
        return Ok(chain);
    }
    if until - from > MAX_SKIP {
        return Err(RatchetError::TooManySkipped);
    }
    for n in from..until {
        let (message_key, next) = kdf_ck(&chain);
        out.push(((ratchet_key.to_bytes(), n), message_key));
        chain = next;
    }
    Ok(chain)
}

fn array32(bytes: &[u8]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(bytes);
    out
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x3dh::tests::{TestDevice, LAST_RESORT_ID, OTK_ID, SPK_ID};
    use crate::x3dh::PrekeyPolicy;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    /// Bob's prekey secrets; the one-time prekey is deleted once used.
    struct Store {
        device: TestDevice,
        one_time_available: bool,
    }

    impl PrekeyStore for Store {
        fn identity_key(&self) -> StaticSecret {
            self.device.identity.clone()
        }
        fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret> {
            (key_id == SPK_ID).then(|| self.device.signed_prekey.clone())
        }
        fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret> {
            (key_id == OTK_ID && self.one_time_available).then(|| self.device.one_time.clone())
        }
        fn last_resort_prekey(&self, key_id: u32) -> Option<StaticSecret> {
            (key_id == LAST_RESORT_ID).then(|| self.device.last_resort.clone())
        }
    }

    impl Store {
        fn accept(&mut self, ciphertext: &[u8]) -> Result<(Session, Vec<u8>), RatchetError> {
            let accepted = Session::accept_initial(self, ciphertext)?;
            if let Some(PrekeyRef::OneTime(_)) = accepted.used_prekey {
                self.one_time_available = false;
            }
            Ok((accepted.session, accepted.plaintext))
        }
    }

    /// Alice's session with Bob (not yet contacted) and Bob's store.
    fn setup(seed: u64, one_time: bool, last_resort: bool) -> (StdRng, Session, Store) {
        let mut rng = StdRng::seed_from_u64(seed);
        let device = TestDevice::new(&mut rng);
        let alice_identity = StaticSecret::random_from_rng(&mut rng);
        let bundle = device.bundle(one_time, last_resort);
        let initiated = x3dh::initiate(&mut rng, &alice_identity, &bundle, PrekeyPolicy::AllowThreeDh).unwrap();
        let alice = Session::initiate(&mut rng, initiated).unwrap();
        (rng, alice, Store { device, one_time_available: true })
    }

    /// Alice and Bob after one message each way.
    fn established(seed: u64) -> (StdRng, Session, Session, Store) {
        let (mut rng, mut alice, mut store) = setup(seed, true, true);
        let (mut bob, _) = store.accept(&alice.encrypt(&mut rng, b"hi").unwrap()).unwrap();
        alice.decrypt(&bob.encrypt(&mut rng, b"hello").unwrap()).unwrap();
        (rng, alice, bob, store)
    }

    #[test]
    fn conversation_both_ways() {
        for (one_time, last_resort) in [(true, false), (false, true), (false, false)] {
            let (mut rng, mut alice, mut store) = setup(3, one_time, last_resort);
            let a1 = alice.encrypt(&mut rng, b"a1").unwrap();
            let a2 = alice.encrypt(&mut rng, b"a2").unwrap();
            assert_eq!(a1[..2], [MESSAGE_VERSION, TYPE_INITIAL]);
            assert_eq!(initial_header(&a1).unwrap(), Some(*alice.initial_header()));
            let (mut bob, p1) = store.accept(&a1).unwrap();
            assert_eq!(p1, b"a1");
            assert_eq!(bob.decrypt(&a2).unwrap(), b"a2");
            assert_eq!(bob.remote_identity_key(), alice.local_identity_key());
            assert_eq!(alice.remote_identity_key(), bob.local_identity_key());
            assert_eq!(bob.associated_data(), alice.associated_data());
            assert!(!bob.is_initiator() && alice.is_initiator());

            for round in 0..4u8 {
                let b = bob.encrypt(&mut rng, &[round; 3]).unwrap();
                assert_eq!(b[1], TYPE_NORMAL);
                assert_eq!(initial_header(&b).unwrap(), None);
                assert_eq!(alice.decrypt(&b).unwrap(), [round; 3]);
                assert!(!alice.is_awaiting_reply());
                let a = alice.encrypt(&mut rng, &[round; 1000]).unwrap();
                assert_eq!(a[1], TYPE_NORMAL);
                assert_eq!(a.len(), 2 + Header::LEN + 1000 + TAG_LEN);
                assert_eq!(bob.decrypt(&a).unwrap(), [round; 1000]);
            }
            // Empty plaintexts work too.
            assert_eq!(bob.decrypt(&alice.encrypt(&mut rng, b"").unwrap()).unwrap(), b"");
        }
    }

    #[test]
    fn out_of_order_and_lost_messages() {
        let (mut rng, mut alice, mut store) = setup(4, true, false);
        let a: Vec<_> = (0..6u8).map(|i| alice.encrypt(&mut rng, &[i]).unwrap()).collect();
        // Bob starts from the fifth message; the second and fourth are lost for now.
        let (mut bob, p) = store.accept(&a[4]).unwrap();
        assert_eq!(p, [4]);
        assert_eq!(bob.skipped_key_count(), 4);
        assert_eq!(bob.decrypt(&a[2]).unwrap(), [2]);
        assert_eq!(bob.decrypt(&a[0]).unwrap(), [0]);
        // Bob replies; Alice answers in a new chain (PN = 6).
        alice.decrypt(&bob.encrypt(&mut rng, b"r").unwrap()).unwrap();
        let c0 = alice.encrypt(&mut rng, b"c0").unwrap();
        let c1 = alice.encrypt(&mut rng, b"c1").unwrap();
        assert_eq!(bob.decrypt(&c1).unwrap(), b"c1");
        // a[5] was never seen: the PN of the new chain made Bob keep its key.
        assert_eq!(bob.decrypt(&a[5]).unwrap(), [5]);
        assert_eq!(bob.decrypt(&c0).unwrap(), b"c0");
        assert_eq!(bob.decrypt(&a[3]).unwrap(), [3]);
        // a[1] (an initial message) arrives last and still works.
        assert_eq!(bob.decrypt(&a[1]).unwrap(), [1]);
        assert_eq!(bob.skipped_key_count(), 0);
    }

    #[test]
    fn replays_fail() {
        let (mut rng, mut alice, mut store) = setup(5, true, false);
        let a0 = alice.encrypt(&mut rng, b"a0").unwrap();
        let a1 = alice.encrypt(&mut rng, b"a1").unwrap();
        let (mut bob, _) = store.accept(&a0).unwrap();
        // The one-time prekey is gone: the initial message cannot start a second session.
        assert_eq!(Session::accept_initial(&store, &a0).unwrap_err(), RatchetError::UnknownPrekey);
        assert_eq!(bob.decrypt(&a0).unwrap_err(), RatchetError::DuplicateOrExpired);
        assert_eq!(bob.decrypt(&a1).unwrap(), b"a1");
        assert_eq!(bob.decrypt(&a1).unwrap_err(), RatchetError::DuplicateOrExpired);
        let b0 = bob.encrypt(&mut rng, b"b0").unwrap();
        let b1 = bob.encrypt(&mut rng, b"b1").unwrap();
        assert_eq!(alice.decrypt(&b1).unwrap(), b"b1");
        assert_eq!(alice.decrypt(&b0).unwrap(), b"b0"); // from the skipped keys
        assert_eq!(alice.decrypt(&b0).unwrap_err(), RatchetError::DuplicateOrExpired);
        assert_eq!(alice.decrypt(&b1).unwrap_err(), RatchetError::DuplicateOrExpired);
        assert_eq!(RatchetError::DuplicateOrExpired.kind(), ErrorKind::BadInput);
    }

    #[test]
    fn tampering_anywhere_fails_and_leaves_the_session_usable() {
        let (mut rng, mut alice, mut store) = setup(6, true, true);
        let a0 = alice.encrypt(&mut rng, b"first message").unwrap();
        for i in 0..a0.len() {
            for mask in [0x01, 0x80] {
                let mut bad = a0.clone();
                bad[i] ^= mask;
                assert!(store.accept(&bad).is_err(), "byte {i} mask {mask:#x}");
                assert!(store.one_time_available);
            }
        }
        let (mut bob, _) = store.accept(&a0).unwrap();
        // An initial message (to an existing session) and a normal one.
        let a1 = alice.encrypt(&mut rng, b"second").unwrap();
        let mut messages = vec![(a1, b"second".to_vec())];
        for _ in 0..2 {
            for (msg, plaintext) in messages.drain(..) {
                let before = bob.to_bytes();
                for i in 0..msg.len() {
                    for mask in [0x01, 0x80] {
                        let mut bad = msg.clone();
                        bad[i] ^= mask;
                        assert!(bob.decrypt(&bad).is_err(), "byte {i} mask {mask:#x}");
                        assert_eq!(bob.to_bytes(), before, "state changed by a failed decrypt");
                    }
                }
                assert_eq!(bob.decrypt(&msg).unwrap(), plaintext);
            }
            alice.decrypt(&bob.encrypt(&mut rng, b"reply").unwrap()).unwrap();
            messages.push((alice.encrypt(&mut rng, b"normal").unwrap(), b"normal".to_vec()));
        }
    }

    #[test]
    fn truncated_input_is_an_error() {
        let (mut rng, mut alice, mut bob, mut store) = established(7);
        let initial_rejected = |store: &mut Store, msg: &[u8]| store.accept(msg).is_err();
        let (_, mut fresh, mut fresh_store) = setup(8, true, false);
        let first = fresh.encrypt(&mut rng, b"x").unwrap();
        for len in 0..first.len() {
            assert!(initial_rejected(&mut fresh_store, &first[..len]));
        }
        let msg = alice.encrypt(&mut rng, b"payload").unwrap();
        for len in 0..msg.len() {
            assert!(bob.decrypt(&msg[..len]).is_err());
            assert!(initial_rejected(&mut store, &msg[..len]));
        }
        assert_eq!(bob.decrypt(&[]).unwrap_err(), RatchetError::Truncated);
        assert_eq!(bob.decrypt(&[1]).unwrap_err(), RatchetError::Truncated);
        assert_eq!(bob.decrypt(&[2, 0]).unwrap_err(), RatchetError::UnsupportedVersion(2));
        assert_eq!(bob.decrypt(&[1, 7]).unwrap_err(), RatchetError::Malformed);
        assert_eq!(Session::accept_initial(&store, &msg).unwrap_err(), RatchetError::NotInitialMessage);
        assert_eq!(bob.decrypt(&msg).unwrap(), b"payload");
    }

    /// A small-order ratchet key is refused when the header is parsed (it used to parse and
    /// fail at the DH step, with the same error).
    #[test]
    fn small_order_ratchet_keys_are_refused_when_parsed() {
        let (mut rng, mut alice, mut bob, _) = established(15);
        let msg = alice.encrypt(&mut rng, b"payload").unwrap();
        // version, type, then the ratchet header.
        let header_at = 2;
        let header = Header::from_bytes(&msg[header_at..header_at + Header::LEN]).unwrap();
        let mut bytes = header.to_bytes();
        bytes[..32].copy_from_slice(&[0; 32]);
        assert_eq!(Header::from_bytes(&bytes).unwrap_err(), RatchetError::WeakKey);
        bytes[0] = 1;
        assert_eq!(Header::from_bytes(&bytes).unwrap_err(), RatchetError::WeakKey);
        bytes[31] = 0x80;
        assert_eq!(Header::from_bytes(&bytes).unwrap_err(), RatchetError::Malformed);
        let mut tampered = msg.clone();
        tampered[header_at..header_at + 32].copy_from_slice(&[0; 32]);
        assert_eq!(bob.decrypt(&tampered).unwrap_err(), RatchetError::WeakKey);
        assert_eq!(bob.decrypt(&msg).unwrap(), b"payload");
    }

    #[test]
    fn skip_limits_and_eviction() {
        let (mut rng, mut alice, mut bob, _) = established(9);
        // More than MAX_SKIP ahead in one chain.
        let mut sent: Vec<Vec<u8>> = (0..=MAX_SKIP).map(|_| alice.encrypt(&mut rng, b"m").unwrap()).collect();
        let too_far = alice.encrypt(&mut rng, b"too far").unwrap();
        assert_eq!(bob.decrypt(&too_far).unwrap_err(), RatchetError::TooManySkipped);
        assert_eq!(bob.decrypt(&sent.pop().unwrap()).unwrap(), b"m"); // skips exactly MAX_SKIP
        assert_eq!(bob.skipped_key_count(), MAX_SKIP as usize);
        assert_eq!(bob.decrypt(&too_far).unwrap(), b"too far");

        // Two more chains with MAX_SKIP - 1 skipped keys each: the oldest get evicted.
        let oldest = sent.remove(0);
        let mut newest = Vec::new();
        for _ in 0..2 {
            alice.decrypt(&bob.encrypt(&mut rng, b"r").unwrap()).unwrap();
            let mut chain: Vec<Vec<u8>> = (0..MAX_SKIP).map(|_| alice.encrypt(&mut rng, b"n").unwrap()).collect();
            bob.decrypt(&chain.pop().unwrap()).unwrap();
            newest = chain;
        }
        assert_eq!(bob.skipped_key_count(), MAX_STORED_SKIPPED);
        assert_eq!(bob.decrypt(&oldest).unwrap_err(), RatchetError::DuplicateOrExpired);
        assert_eq!(bob.decrypt(&sent.pop().unwrap()).unwrap(), b"m"); // the newest of the first chain survived
        assert_eq!(bob.decrypt(&newest[0]).unwrap(), b"n");
        // The state still round-trips with a full store.
        let bytes = bob.to_bytes();
        assert_eq!(Session::from_bytes(&bytes).unwrap().to_bytes(), bytes);
    }

    #[test]
    fn state_round_trips_and_rejects_corruption() {
        let (mut rng, mut alice, mut bob, _) = established(10);
        let lost: Vec<_> = (0..3).map(|i| alice.encrypt(&mut rng, &[i]).unwrap()).collect();
        bob.decrypt(&alice.encrypt(&mut rng, b"later").unwrap()).unwrap();
        let bytes = bob.to_bytes();
        let mut restored = Session::from_bytes(&bytes).unwrap();
        assert_eq!(restored.to_bytes(), bytes);
        assert_eq!(restored.skipped_key_count(), 3);
        assert_eq!(restored.decrypt(&lost[1]).unwrap(), [1]);
        let reply = restored.encrypt(&mut rng, b"from restored").unwrap();
        let mut alice = Session::from_bytes(&alice.to_bytes()).unwrap();
        assert_eq!(alice.decrypt(&reply).unwrap(), b"from restored");

        // A fresh responder (no chains yet) and an initiator awaiting a reply round-trip too.
        let (mut rng2, mut fresh, store) = setup(11, false, false);
        let first = fresh.encrypt(&mut rng2, b"x").unwrap();
        let fresh = Session::from_bytes(&fresh.to_bytes()).unwrap();
        assert!(fresh.is_awaiting_reply());
        let header = initial_header(&first).unwrap().unwrap();
        let responded = x3dh::respond(&store.device.identity, &store.device.signed_prekey, None, &header).unwrap();
        let accepted = Session::accept(responded);
        let mut accepted = Session::from_bytes(&accepted.to_bytes()).unwrap();
        assert_eq!(accepted.encrypt(&mut rng2, b"no").unwrap_err(), RatchetError::CannotSendYet);
        assert_eq!(RatchetError::CannotSendYet.kind(), ErrorKind::Misuse);
        assert_eq!(accepted.decrypt(&first).unwrap(), b"x");

        for len in 0..bytes.len() {
            assert!(Session::from_bytes(&bytes[..len]).is_err());
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(Session::from_bytes(&longer).unwrap_err(), RatchetError::CorruptState);
        let mut bad = bytes.to_vec();
        bad[0] = 2;
        assert_eq!(Session::from_bytes(&bad).unwrap_err(), RatchetError::UnsupportedStateVersion(2));
        let mut bad = bytes.to_vec();
        bad[1] |= 0x80;
        assert_eq!(Session::from_bytes(&bad).unwrap_err(), RatchetError::CorruptState);
        let mut bad = bytes.to_vec();
        bad[1] &= !0x04; // drop DHr but keep the receiving chain
        assert!(Session::from_bytes(&bad).is_err());
    }

    #[test]
    fn foreign_initial_message_is_a_session_mismatch() {
        let (mut rng, mut alice, mut bob, mut store) = established(12);
        // Alice (on another install, say) starts over with a new X3DH; Bob's old session refuses
        // it and accept_initial takes it (the one-time prekey is gone: last-resort).
        let alice_identity = StaticSecret::random_from_rng(&mut rng);
        let bundle = store.device.bundle(false, true);
        let initiated = x3dh::initiate(&mut rng, &alice_identity, &bundle, PrekeyPolicy::RequireOneTime).unwrap();
        let mut alice2 = Session::initiate(&mut rng, initiated).unwrap();
        let m = alice2.encrypt(&mut rng, b"new").unwrap();
        assert_eq!(bob.decrypt(&m).unwrap_err(), RatchetError::SessionMismatch);
        let (mut bob2, p) = store.accept(&m).unwrap();
        assert_eq!(p, b"new");
        // Both sessions keep working.
        assert_eq!(alice2.decrypt(&bob2.encrypt(&mut rng, b"ok2").unwrap()).unwrap(), b"ok2");
        assert_eq!(alice.decrypt(&bob.encrypt(&mut rng, b"ok1").unwrap()).unwrap(), b"ok1");
        // Messages of one session do not decrypt in the other.
        assert!(bob2.decrypt(&alice.encrypt(&mut rng, b"x").unwrap()).is_err());
        // An initiator never accepts initial messages.
        let (_, mut carol, _) = setup(13, true, false);
        assert_eq!(alice.decrypt(&carol.encrypt(&mut rng, b"c").unwrap()).unwrap_err(), RatchetError::SessionMismatch);
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let (_, alice, bob, _) = established(14);
        for session in [&alice, &bob] {
            let debug = format!("{session:?}");
            let state = session.to_bytes();
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            for secret in [&session.root_key.0, session.dhs.as_bytes()] {
                assert!(!debug.contains(&hex(secret)) && !debug.contains(&format!("{secret:?}")));
            }
            assert!(state.len() > 200);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Send { alice: bool },
        Deliver { to_bob: bool, pick: usize },
        Drop { to_bob: bool, pick: usize },
        Replay { to_bob: bool, pick: usize },
        Tamper { to_bob: bool, pick: usize, pos: usize, mask: u8 },
        Persist { alice: bool },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => any::<bool>().prop_map(|alice| Op::Send { alice }),
            5 => (any::<bool>(), any::<usize>()).prop_map(|(to_bob, pick)| Op::Deliver { to_bob, pick }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(to_bob, pick)| Op::Drop { to_bob, pick }),
            1 => (any::<bool>(), any::<usize>()).prop_map(|(to_bob, pick)| Op::Replay { to_bob, pick }),
            2 => (any::<bool>(), any::<usize>(), any::<usize>(), 1..=255u8)
                .prop_map(|(to_bob, pick, pos, mask)| Op::Tamper { to_bob, pick, pos, mask }),
            1 => any::<bool>().prop_map(|alice| Op::Persist { alice }),
        ]
    }

    /// Messages on their way to one side, and those already delivered.
    #[derive(Default)]
    struct Wire {
        in_flight: Vec<(Vec<u8>, Vec<u8>)>,
        delivered: Vec<Vec<u8>>,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn random_interleavings(seed in any::<u64>(), one_time in any::<bool>(), last_resort in any::<bool>(),
                                ops in proptest::collection::vec(op(), 1..80)) {
            let (mut rng, mut alice, mut store) = setup(seed, one_time, last_resort);
            let mut bob: Option<Session> = None;
            let mut to_bob = Wire::default();
            let mut to_alice = Wire::default();
            let mut counter = 0u32;
            for op in ops {
                match op {
                    Op::Send { alice: true } => {
                        counter += 1;
                        let plaintext = format!("alice {counter}").into_bytes();
                        to_bob.in_flight.push((alice.encrypt(&mut rng, &plaintext).unwrap(), plaintext));
                    }
                    Op::Send { alice: false } => {
                        if let Some(bob) = bob.as_mut() {
                            counter += 1;
                            let plaintext = format!("bob {counter}").into_bytes();
                            to_alice.in_flight.push((bob.encrypt(&mut rng, &plaintext).unwrap(), plaintext));
                        }
                    }
                    Op::Deliver { to_bob: dir, pick } | Op::Tamper { to_bob: dir, pick, .. } | Op::Drop { to_bob: dir, pick } => {
                        let wire = if dir { &mut to_bob } else { &mut to_alice };
                        if wire.in_flight.is_empty() {
                            continue;
                        }
                        let i = pick % wire.in_flight.len();
                        match op {
                            Op::Drop { .. } => {
                                wire.in_flight.remove(i);
                            }
                            Op::Tamper { pos, mask, .. } => {
                                let mut bad = wire.in_flight[i].0.clone();
                                let pos = pos % bad.len();
                                bad[pos] ^= mask;
                                let result = match (dir, bob.as_mut()) {
                                    (true, None) => store.accept(&bad).map(|(_, p)| p),
                                    (true, Some(bob)) => bob.decrypt(&bad),
                                    (false, _) => alice.decrypt(&bad),
                                };
                                prop_assert!(result.is_err(), "tampered byte {} accepted", pos);
                            }
                            _ => {
                                let (msg, plaintext) = wire.in_flight.remove(i);
                                let got = match (dir, bob.as_mut()) {
                                    (true, None) => {
                                        let (session, p) = store.accept(&msg).unwrap();
                                        bob = Some(session);
                                        p
                                    }
                                    (true, Some(bob)) => bob.decrypt(&msg).unwrap(),
                                    (false, _) => alice.decrypt(&msg).unwrap(),
                                };
                                prop_assert_eq!(got, plaintext);
                                wire.delivered.push(msg);
                            }
                        }
                    }
                    Op::Replay { to_bob: dir, pick } => {
                        let wire = if dir { &to_bob } else { &to_alice };
                        if wire.delivered.is_empty() {
                            continue;
                        }
                        let msg = &wire.delivered[pick % wire.delivered.len()];
                        let result = if dir { bob.as_mut().unwrap().decrypt(msg) } else { alice.decrypt(msg) };
                        prop_assert!(result.is_err(), "replay accepted");
                        if dir {
                            prop_assert!(store.accept(msg).is_err() || !one_time, "initial message replayed into a new session");
                        }
                    }
                    Op::Persist { alice: true } => alice = Session::from_bytes(&alice.to_bytes()).unwrap(),
                    Op::Persist { alice: false } => {
                        if let Some(b) = bob.take() {
                            bob = Some(Session::from_bytes(&b.to_bytes()).unwrap());
                        }
                    }
                }
            }
            // Everything still in flight is delivered, in reverse order, and decrypts.
            while let Some((msg, plaintext)) = to_bob.in_flight.pop() {
                let got = match bob.as_mut() {
                    None => {
                        let (session, p) = store.accept(&msg).unwrap();
                        bob = Some(session);
                        p
                    }
                    Some(bob) => bob.decrypt(&msg).unwrap(),
                };
                prop_assert_eq!(got, plaintext);
            }
            while let Some((msg, plaintext)) = to_alice.in_flight.pop() {
                prop_assert_eq!(alice.decrypt(&msg).unwrap(), plaintext);
            }
            // And the session still works both ways.
            let bob = match bob.as_mut() {
                Some(bob) => bob,
                None => bob.insert(store.accept(&alice.encrypt(&mut rng, b"start").unwrap()).unwrap().0),
            };
            prop_assert_eq!(bob.decrypt(&alice.encrypt(&mut rng, b"end a").unwrap()).unwrap(), b"end a".to_vec());
            prop_assert_eq!(alice.decrypt(&bob.encrypt(&mut rng, b"end b").unwrap()).unwrap(), b"end b".to_vec());
        }
    }
}
