//! [`Messenger`]: end-to-end encrypted 1:1 messaging for one device, on top of [`Api`],
//! [`Connection`] and the local [`Store`].
//!
//! - **Identity.** The first device of an account creates the user's identity key and shows a
//!   32-byte recovery secret once; the identity key signs the device list. A new device signs
//!   itself in with the recovery secret ([`Messenger::add_device`]).
//! - **Trust.** Device lists are verified against the identity key pinned on first contact and
//!   against the last version seen; a changed identity, a rollback, an equivocation or a forged
//!   list is an [`MessengerEvent::Untrusted`] event and a typed error, and nothing is encrypted
//!   to a device that is not in a verified list. Prekey bundles must carry exactly the keys the
//!   verified list names.
//! - **Sending.** A message is written to history and the outbox first, then encrypted once per
//!   device of the recipient and per other device of the sender (X3DH + Double Ratchet) and sent
//!   with its `client_msg_id`; the outbox entry is removed when the server answers `sent`, so a
//!   message composed offline goes out on reconnect, exactly once.
//! - **Receiving.** Ciphertexts are decrypted (accepting new sessions after checking the sender's
//!   identity key against its verified device list), stored in history (deduplicated by sender
//!   and `client_msg_id`) and handed to the application as typed events.

use crate::store::{OutboxEntry, Store, StoredMessage};
use crate::{Api, Client, ConnectOptions, Connection, Error, Event, Events, LoginRequest, RegisterRequest, Session};
use parley_crypto::identity::{
    verify_device_list, DeviceIdentity, DeviceListCheckpoint, DeviceListDiff, DeviceListError, UserIdentity, VerifiedDevice,
    VerifiedDeviceList,
};
use parley_crypto::ratchet::{self, PrekeyStore, Session as Ratchet};
use parley_crypto::x3dh::{self, PrekeyPolicy, PrekeyRef};
use parley_crypto::PublicKey;
use parley_spec::error::DeviceRef;
use parley_spec::v1::content::{Content, TextContent};
use parley_spec::v1::events::{MessageEvent, ReceiptEvent, ReceiptKind};
use parley_spec::v1::keys::{ClaimRequest, OneTimePrekey, SignedDeviceList, UploadKeysRequest};
use parley_spec::v1::messages::{Envelope, SendRequest};
use parley_spec::v1::presence::PresenceInfo;
use parley_spec::v1::ws::TypingNotice;
use parley_spec::{DeviceId, ErrorCode, UserId};
use rand::rngs::OsRng;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, watch, Mutex};
use uuid::Uuid;
use x25519_dalek::StaticSecret;
use zeroize::Zeroizing;

/// One-time prekeys uploaded at a time.
const PREKEY_BATCH: u32 = 50;
const SIGNED_PREKEY_ID: u32 = 1;
const LAST_RESORT_ID: u32 = 2;
const FIRST_ONE_TIME_ID: u32 = 1000;

/// What the application sees.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessengerEvent {
    /// A decrypted message (from someone else, or a copy of one sent from another own device).
    Message(StoredMessage),
    /// One of our messages reached a device of the recipient.
    Delivered {
        /// The recipient.
        by: UserId,
        /// Server ids of the messages.
        message_ids: Vec<u64>,
    },
    /// The recipient read our messages.
    Read {
        /// The recipient.
        by: UserId,
        /// Server ids of the messages.
        message_ids: Vec<u64>,
    },
    /// An outbox message was stored by the server.
    Sent {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's id.
        server_msg_id: u64,
    },
    /// A contact's verified device list changed.
    DevicesChanged {
        /// Whose.
        user: UserId,
        /// Devices added.
        added: Vec<DeviceId>,
        /// Devices removed.
        removed: Vec<DeviceId>,
    },
    /// Something the server sent about `user` cannot be trusted (changed identity key, rollback,
    /// forged or equivocating device list, mismatching keys). Nothing is encrypted to or accepted
    /// from the devices concerned until it is resolved.
    Untrusted {
        /// Whose keys.
        user: UserId,
        /// What was wrong.
        reason: String,
    },
    /// A contact's presence (on connect, and on each change).
    Presence(PresenceInfo),
    /// Someone is typing to this user (or stopped).
    Typing(TypingNotice),
    /// An outbox message was refused for good by the server and removed from the outbox.
    SendFailed {
        /// Its id.
        client_msg_id: Uuid,
        /// The server's error code.
        code: ErrorCode,
    },
    /// A ciphertext could not be decrypted (tampered, replayed, or from an unknown session).
    Undecryptable {
        /// Sender.
        sender: UserId,
        /// Sender's device.
        device: DeviceId,
        /// Why.
        reason: String,
    },
}

/// Why a messenger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// Talking to the server failed.
    #[error(transparent)]
    Sdk(#[from] Error),
    /// A device list or key bundle failed verification.
    #[error("untrusted keys for {user}: {reason}")]
    Untrusted {
        /// Whose keys.
        user: UserId,
        /// Why.
        reason: String,
    },
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// The local profile is missing or damaged.
    #[error("profile: {0}")]
    Profile(String),
}

fn crypto(e: impl std::fmt::Display) -> MessengerError {
    MessengerError::Crypto(e.to_string())
}

/// End-to-end encrypted messaging for one device. Cheap to clone.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    api: Api,
    conn: Connection,
    session: Session,
    device: DeviceIdentity,
    identity: UserIdentity,
    events: mpsc::UnboundedSender<MessengerEvent>,
    /// Serializes everything that touches ratchet state, prekeys and the outbox.
    lock: Mutex<()>,
    /// Verified device lists already loaded (the store holds them; this saves reading and
    /// verifying them again on every send).
    lists: std::sync::Mutex<BTreeMap<UserId, VerifiedDeviceList>>,
    /// Whether the backlog of the current connection has been processed (see
    /// [`Messenger::caught_up`]).
    sync: watch::Sender<SyncState>,
}

/// Where the receiving side stands, for [`Messenger::caught_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    /// Connecting, or delivering the backlog.
    Syncing,
    /// The backlog is processed; what follows is live.
    CaughtUp,
    /// The connection is closed for good.
    Stopped,
}

/// The stream of [`MessengerEvent`]s.
pub struct MessengerEvents(mpsc::UnboundedReceiver<MessengerEvent>);

impl MessengerEvents {
    /// The next event; `None` when the messenger stopped.
    pub async fn next(&mut self) -> Option<MessengerEvent> {
        self.0.recv().await
    }
}

impl Messenger {
    /// Registers an account, creates its identity and first device, and opens the profile at
    /// `path`. Returns the recovery secret: show it once; it is the only way to add devices.
    pub async fn register(
        base_url: &str,
        path: &Path,
        username: &str,
        password: &str,
    ) -> Result<(Self, MessengerEvents, Zeroizing<[u8; 32]>), MessengerError> {
        let session = Client::new(base_url)?.register(RegisterRequest::new(username, password)).await?;
        let (identity, recovery) = UserIdentity::generate_with_recovery_seed(&mut OsRng);
        let device = DeviceIdentity::generate(&mut OsRng);
        let store = Store::open(path).await?;
        save_profile(&store, &session, &identity, &device).await?;
        let api = Api::new(&session)?;
        upload_initial_keys(&store, &api, &session, &device).await?;
        let list = identity.sign_device_list(&session.user_id, 1, vec![device.list_entry(&session.device_id)]).map_err(crypto)?;
        api.put_device_list(&list).await?;
        let (messenger, events) = Self::start(store, session, identity, device).await?;
        Ok((messenger, events, recovery))
    }

    /// Signs a new device into an existing account with the recovery secret, and opens its
    /// profile at `path`.
    pub async fn add_device(
        base_url: &str,
        path: &Path,
        username: &str,
        password: &str,
        recovery: &[u8; 32],
    ) -> Result<(Self, MessengerEvents), MessengerError> {
        let session = Client::new(base_url)?.login(LoginRequest::new(username, password)).await?;
        let identity = UserIdentity::from_recovery_seed(recovery);
        let device = DeviceIdentity::generate(&mut OsRng);
        let api = Api::new(&session)?;
        let current = api.device_list(&session.user_id).await?;
        let verified = match verify_device_list(&current, &session.user_id, Some(&identity.public()), None) {
            Ok(verified) => verified,
            Err(e) => {
                // A wrong recovery secret: remove the device the login just created.
                if let Err(error) = api.logout().await {
                    tracing::warn!(%error, "could not remove the half-added device");
                }
                return Err(MessengerError::Untrusted { user: session.user_id.clone(), reason: e.to_string() });
            }
        };
        let mut entries: Vec<_> = verified.devices().iter().map(VerifiedDevice::to_entry).collect();
        entries.push(device.list_entry(&session.device_id));
        let store = Store::open(path).await?;
        save_profile(&store, &session, &identity, &device).await?;
        upload_initial_keys(&store, &api, &session, &device).await?;
        let list = identity.sign_device_list(&session.user_id, verified.version() + 1, entries).map_err(crypto)?;
        api.put_device_list(&list).await?;
        let (messenger, events) = Self::start(store, session, identity, device).await?;
        Ok((messenger, events))
    }

    /// Opens an existing profile and connects, resuming from the stored cursor.
    pub async fn open(path: &Path) -> Result<(Self, MessengerEvents), MessengerError> {
        let store = Store::open(path).await?;
        let missing = |what: &str| MessengerError::Profile(format!("no {what} in the profile"));
        let session: Session = serde_json::from_slice(&store.get("session").await?.ok_or_else(|| missing("session"))?)
            .map_err(|e| MessengerError::Profile(e.to_string()))?;
        let identity_bytes = store.get("user_identity").await?.ok_or_else(|| missing("identity"))?;
        let identity = UserIdentity::from_bytes(identity_bytes.as_slice().try_into().map_err(|_| missing("valid identity"))?);
        let device_bytes = store.get("device_identity").await?.ok_or_else(|| missing("device keys"))?;
        let device = DeviceIdentity::from_bytes(device_bytes.as_slice().try_into().map_err(|_| missing("valid device keys"))?);
        Self::start(store, session, identity, device).await
    }

    async fn start(
        store: Store,
        session: Session,
        identity: UserIdentity,
        device: DeviceIdentity,
    ) -> Result<(Self, MessengerEvents), MessengerError> {
        let since = match store.get("cursor").await? {
            Some(bytes) => std::str::from_utf8(&bytes).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
            None => 0,
        };
        let (conn, events) =
            Connection::open(&session, ConnectOptions { since, manual_ack: true, ..ConnectOptions::default() }).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            store,
            api: Api::new(&session)?,
            conn,
            session,
            device,
            identity,
            events: tx,
            lock: Mutex::new(()),
            lists: std::sync::Mutex::default(),
            sync: watch::channel(SyncState::Syncing).0,
        });
        let messenger = Self { inner };
        tokio::spawn(messenger.clone().receive(events));
        Ok((messenger, MessengerEvents(rx)))
    }

    /// This device's session.
    pub fn session(&self) -> &Session {
        &self.inner.session
    }

    /// The local store (history, outbox).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The user's identity public key (for safety numbers).
    pub fn identity_key(&self) -> PublicKey {
        self.inner.identity.public()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.inner.conn.clone().close().await;
    }

    /// Writes a text message to history and the outbox, then sends it (now, or when the
    /// connection is back). Returns its id.
    pub async fn send_text(&self, to: &UserId, body: &str) -> Result<Uuid, MessengerError> {
        let client_msg_id = Uuid::new_v4();
        let me = &self.inner.session;
        let message = StoredMessage {
            local_id: 0,
            peer: to.to_string(),
            sender: me.user_id.to_string(),
            sender_device: me.device_id.to_string(),
            client_msg_id: client_msg_id.to_string(),
            server_msg_id: None,
            ts: now_ms(),
            body: body.to_owned(),
            delivered: false,
            read: false,
        };
        self.inner.store.add_message(&message).await?;
        let entry = OutboxEntry { client_msg_id: client_msg_id.to_string(), to: to.to_string(), body: body.to_owned() };
        self.inner.store.enqueue(&entry, now_ms()).await?;
        self.flush(Some(&entry.client_msg_id)).await?;
        Ok(client_msg_id)
    }

    /// Sends everything in the outbox, oldest first. A message to a user whose keys are
    /// untrusted stays queued (and is reported) without holding back messages to others.
    pub async fn flush_outbox(&self) -> Result<(), MessengerError> {
        self.flush(None).await
    }

    /// Flushes the outbox; returns the outcome of the entry `report` (or the first
    /// non-trust error).
    async fn flush(&self, report: Option<&str>) -> Result<(), MessengerError> {
        let _guard = self.inner.lock.lock().await;
        let mut outcome = Ok(());
        for entry in self.inner.store.outbox().await? {
            match self.send_entry(&entry).await {
                Ok(()) => {}
                Err(e @ MessengerError::Untrusted { .. }) => {
                    tracing::warn!(error = %e, "message held in the outbox");
                    if report == Some(entry.client_msg_id.as_str()) {
                        outcome = Err(e);
                    }
                }
                Err(MessengerError::Sdk(e)) if e.server_code().is_some_and(is_permanent) => {
                    if report == Some(entry.client_msg_id.as_str()) {
                        outcome = Err(MessengerError::Sdk(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        outcome
    }

    /// Waits until the backlog is processed: every event that was waiting on the server when
    /// the connection was (re)established has been received and handled (messages decrypted
    /// and stored in history, receipts recorded). Returns at once when that is already the
    /// case. Fails with [`Error::Closed`] if the connection stops for good first.
    pub async fn caught_up(&self) -> Result<(), MessengerError> {
        let mut state = self.inner.sync.subscribe();
        let reached = state.wait_for(|s| *s != SyncState::Syncing).await.map(|s| *s);
        match reached {
            Ok(SyncState::CaughtUp) => Ok(()),
            _ => Err(Error::Closed.into()),
        }
    }

    /// Accepts `user`'s new identity key after a [`MessengerEvent::Untrusted`] about a changed
    /// identity (compare safety numbers first): forgets the pinned key and device list, and
    /// pins what the server serves now.
    pub async fn trust_new_identity(&self, user: &UserId) -> Result<Vec<DeviceId>, MessengerError> {
        self.inner.store.forget_device_list(user.as_str()).await?;
        self.inner.lists.lock().unwrap_or_else(|e| e.into_inner()).remove(user);
        self.refresh_devices(user).await
    }

    /// The safety number of this user and `user`, from the verified (pinned) identity keys.
    pub async fn safety_number(&self, user: &UserId) -> Result<parley_crypto::safety::SafetyNumber, MessengerError> {
        let list = self.device_list(user, false).await?;
        Ok(parley_crypto::safety::safety_number(
            &self.inner.session.user_id,
            &self.inner.identity.public(),
            user,
            list.identity_key(),
        ))
    }

    /// Fetches and verifies `user`'s device list now (for example when a contact is opened or
    /// after a [`MessengerEvent::DevicesChanged`]); returns its device ids.
    pub async fn refresh_devices(&self, user: &UserId) -> Result<Vec<DeviceId>, MessengerError> {
        let list = self.device_list(user, true).await?;
        Ok(list.devices().iter().map(|d| d.device_id().clone()).collect())
    }

    async fn send_entry(&self, entry: &OutboxEntry) -> Result<(), MessengerError> {
        let to: UserId = entry.to.parse().map_err(|e| MessengerError::Profile(format!("outbox: {e}")))?;
        let client_msg_id: Uuid = entry.client_msg_id.parse().map_err(|e| MessengerError::Profile(format!("outbox: {e}")))?;
        let content = Content::Text(TextContent::new(client_msg_id, to.clone(), entry.body.clone()));
        let plaintext = Zeroizing::new(serde_json::to_vec(&content).map_err(crypto)?);
        let mut refresh = false;
        for _attempt in 0..3 {
            let envelopes = self.encrypt_for(&to, &plaintext, refresh).await?;
            match self.inner.conn.send_request(SendRequest::new(client_msg_id, to.clone(), envelopes)).await {
                Ok(sent) => {
                    self.inner
                        .store
                        .mark_sent(self.inner.session.user_id.as_str(), &entry.client_msg_id, sent.server_msg_id, sent.ts as i64)
                        .await?;
                    self.inner.store.dequeue(&entry.client_msg_id).await?;
                    self.emit(MessengerEvent::Sent { client_msg_id, server_msg_id: sent.server_msg_id });
                    return Ok(());
                }
                Err(e) if e.server_code() == Some(ErrorCode::DevicesMismatch) => refresh = true,
                Err(e) if e.server_code().is_some_and(is_permanent) => {
                    // The server will never take it (unknown user, too large, ...): drop it from
                    // the outbox so it does not hold back later messages.
                    self.inner.store.dequeue(&entry.client_msg_id).await?;
                    let code = e.server_code().unwrap_or(ErrorCode::Internal);
                    self.emit(MessengerEvent::SendFailed { client_msg_id, code });
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(self.untrusted(&to, "the server's device list keeps differing from the signed device lists".into()))
    }

    /// One envelope per device of `to` and per other own device, from verified device lists.
    async fn encrypt_for(&self, to: &UserId, plaintext: &[u8], refresh: bool) -> Result<Vec<Envelope>, MessengerError> {
        let me = &self.inner.session;
        let mut targets: Vec<(UserId, VerifiedDevice, VerifiedDeviceList)> = Vec::new();
        // The recipient's devices and our own other devices (once, for a note to self).
        let users = if to == &me.user_id { vec![to] } else { vec![to, &me.user_id] };
        for user in users {
            let list = self.device_list(user, refresh).await?;
            for device in list.devices() {
                if user == &me.user_id && device.device_id() == &me.device_id {
                    continue;
                }
                targets.push((user.clone(), device.clone(), list.clone()));
            }
        }
        // Claim bundles for devices we have no session with, in one request.
        let mut sessions: BTreeMap<(String, String), Ratchet> = BTreeMap::new();
        let mut missing = Vec::new();
        for (user, device, _) in &targets {
            let stored = match self.inner.store.session(user.as_str(), device.device_id().as_str()).await? {
                Some(bytes) => Some(Ratchet::from_bytes(&bytes).map_err(crypto)?),
                None => None,
            };
            match stored {
                // A session is used only while the device still has the identity key it was
                // made with (a device whose keys changed under the same id starts over).
                Some(session) if session.remote_identity_key().as_bytes() == device.identity_key().as_bytes() => {
                    sessions.insert((user.to_string(), device.device_id().to_string()), session);
                }
                _ => missing.push(DeviceRef::new(user.clone(), device.device_id().clone())),
            }
        }
        if !missing.is_empty() {
            let claimed = self.inner.api.claim_keys(&ClaimRequest::new(missing)).await?;
            for bundle in claimed.bundles {
                let user = bundle.device_keys.user_id.clone();
                let Some((_, _, list)) =
                    targets.iter().find(|(u, d, _)| *u == user && *d.device_id() == bundle.device_keys.device_id)
                else {
                    continue;
                };
                // The bundle must carry exactly the keys the signed list names for that device.
                if let Err(e) = list.check_device_keys(&bundle.device_keys) {
                    return Err(self.untrusted(&user, format!("prekey bundle of {}: {e}", bundle.device_keys.device_id)));
                }
                let initiated =
                    x3dh::initiate(&mut OsRng, self.inner.device.identity_secret(), &bundle, PrekeyPolicy::AllowThreeDh)
                        .map_err(|e| self.untrusted(&user, format!("prekey bundle of {}: {e}", bundle.device_keys.device_id)))?;
                let session = Ratchet::initiate(&mut OsRng, initiated).map_err(crypto)?;
                sessions.insert((user.to_string(), bundle.device_keys.device_id.to_string()), session);
            }
        }
        let mut envelopes = Vec::with_capacity(targets.len());
        for (user, device, _) in &targets {
            let key = (user.to_string(), device.device_id().to_string());
            // A device without keys on the server cannot be reached; the server will answer
            // devices_mismatch if it insists on it.
            let Some(session) = sessions.get_mut(&key) else { continue };
            let ciphertext = session.encrypt(&mut OsRng, plaintext).map_err(crypto)?;
            self.inner.store.save_session(&key.0, &key.1, &session.to_bytes()).await?;
            envelopes.push(Envelope::new(user.clone(), device.device_id().clone(), ciphertext));
        }
        Ok(envelopes)
    }

    /// The verified device list of `user`: the stored one, or (when asked, or when none is
    /// stored) the server's, verified against the pinned identity key and the last version.
    async fn device_list(&self, user: &UserId, refresh: bool) -> Result<VerifiedDeviceList, MessengerError> {
        let cached = self.inner.lists.lock().unwrap_or_else(|e| e.into_inner()).get(user).cloned();
        if let (Some(list), false) = (&cached, refresh) {
            return Ok(list.clone());
        }
        let stored = match cached {
            Some(list) => Some(list),
            None => self.stored_device_list(user).await?,
        };
        if let (Some(list), false) = (&stored, refresh) {
            self.cache_list(user, list.clone());
            return Ok(list.clone());
        }
        let fetched = self.inner.api.device_list(user).await?;
        let pinned = match &stored {
            Some(list) => Some(*list.identity_key()),
            None if user == &self.inner.session.user_id => Some(self.inner.identity.public()),
            None => None,
        };
        let checkpoint: Option<DeviceListCheckpoint> = stored.as_ref().map(VerifiedDeviceList::checkpoint);
        let verified = match verify_device_list(&fetched, user, pinned.as_ref(), checkpoint.as_ref()) {
            Ok(verified) => verified,
            Err(
                e @ (DeviceListError::IdentityChanged { .. }
                | DeviceListError::Rollback { .. }
                | DeviceListError::Equivocation { .. }),
            ) => return Err(self.untrusted(user, e.to_string())),
            Err(e) => return Err(self.untrusted(user, format!("device list: {e}"))),
        };
        if let Some(old) = &stored {
            let diff = DeviceListDiff::between(old, &verified);
            if !diff.is_empty() {
                self.emit(MessengerEvent::DevicesChanged {
                    user: user.clone(),
                    added: diff.added.iter().map(|d| d.device_id().clone()).collect(),
                    removed: diff.removed.iter().map(|d| d.device_id().clone()).collect(),
                });
            }
        }
        let json = serde_json::to_vec(&fetched).map_err(crypto)?;
        self.inner.store.save_device_list(user.as_str(), verified.version(), verified.identity_key().as_bytes(), &json).await?;
        self.cache_list(user, verified.clone());
        Ok(verified)
    }

    /// The device list saved in the store, verified again against its own pinned key.
    async fn stored_device_list(&self, user: &UserId) -> Result<Option<VerifiedDeviceList>, MessengerError> {
        let Some((_, _, json)) = self.inner.store.device_list(user.as_str()).await? else { return Ok(None) };
        let list: SignedDeviceList = serde_json::from_slice(&json).map_err(|e| MessengerError::Profile(e.to_string()))?;
        let pinned = self.pinned_key(user, &list)?;
        Ok(Some(verify_device_list(&list, user, Some(&pinned), None).map_err(crypto)?))
    }

    fn cache_list(&self, user: &UserId, list: VerifiedDeviceList) {
        self.inner.lists.lock().unwrap_or_else(|e| e.into_inner()).insert(user.clone(), list);
    }

    fn pinned_key(&self, user: &UserId, list: &SignedDeviceList) -> Result<PublicKey, MessengerError> {
        PublicKey::from_bytes(&list.identity_key.0)
            .map_err(|_| MessengerError::Profile(format!("stored device list of {user} is damaged")))
    }

    fn untrusted(&self, user: &UserId, reason: String) -> MessengerError {
        self.emit(MessengerEvent::Untrusted { user: user.clone(), reason: reason.clone() });
        MessengerError::Untrusted { user: user.clone(), reason }
    }

    fn emit(&self, event: MessengerEvent) {
        let _ = self.inner.events.send(event);
    }

    async fn receive(self, mut events: Events) {
        // Set when an event could not be processed (storage failed): from then on nothing is
        // confirmed, so the server redelivers it after the next reconnect.
        let mut failed = false;
        while let Some(event) = events.next().await {
            let sync = match &event {
                Event::Connected { .. } | Event::Disconnected { .. } => Some(SyncState::Syncing),
                Event::CaughtUp { .. } => Some(SyncState::CaughtUp),
                _ => None,
            };
            let result = match event {
                Event::Message(message) => self.on_message(message).await,
                Event::Receipt(receipt) => self.on_receipt(receipt).await,
                Event::PrekeysLow { .. } => self.replenish().await,
                Event::Presence(info) => {
                    self.emit(MessengerEvent::Presence(info));
                    Ok(())
                }
                Event::Typing(notice) => {
                    self.emit(MessengerEvent::Typing(notice));
                    Ok(())
                }
                Event::Checkpoint { seq } if !failed => self.checkpoint(seq).await,
                Event::Connected { .. } => {
                    failed = false;
                    let messenger = self.clone();
                    tokio::spawn(async move {
                        if let Err(error) = messenger.flush_outbox().await {
                            tracing::warn!(%error, "outbox not flushed");
                        }
                    });
                    Ok(())
                }
                _ => Ok(()),
            };
            if let Err(error) = result {
                tracing::warn!(%error, "event not processed; it will be delivered again");
                failed = true;
            }
            if let Some(state) = sync {
                self.inner.sync.send_replace(state);
            }
        }
        self.inner.sync.send_replace(SyncState::Stopped);
    }

    /// Everything up to `seq` is stored: remember the position, then let the server forget it.
    async fn checkpoint(&self, seq: u64) -> Result<(), MessengerError> {
        self.inner.store.set("cursor", seq.to_string().as_bytes()).await?;
        self.inner.conn.confirm(seq);
        Ok(())
    }

    async fn on_message(&self, message: MessageEvent) -> Result<(), MessengerError> {
        let _guard = self.inner.lock.lock().await;
        let sender = message.sender.clone();
        let device = message.sender_device.clone();
        // Delivered again (it was stored, but the acknowledgement did not reach the server):
        // its message key is spent, and the history has it.
        if self.inner.store.has_server_message(sender.as_str(), message.id).await? {
            return Ok(());
        }
        let plaintext = match self.decrypt(&message).await {
            Ok(plaintext) => plaintext,
            Err(e) => {
                self.emit(MessengerEvent::Undecryptable { sender, device, reason: e.to_string() });
                return Ok(());
            }
        };
        let Ok(Content::Text(text)) = serde_json::from_slice::<Content>(&plaintext) else {
            self.emit(MessengerEvent::Undecryptable { sender, device, reason: "unknown content".into() });
            return Ok(());
        };
        let me = &self.inner.session.user_id;
        let peer = if &sender == me { text.to.clone() } else { sender.clone() };
        let stored = StoredMessage {
            local_id: 0,
            peer: peer.to_string(),
            sender: sender.to_string(),
            sender_device: device.to_string(),
            client_msg_id: text.client_msg_id.to_string(),
            server_msg_id: Some(message.id),
            ts: message.ts as i64,
            body: text.body,
            delivered: false,
            read: false,
        };
        if self.inner.store.add_message(&stored).await? {
            self.emit(MessengerEvent::Message(stored));
        }
        Ok(())
    }

    async fn decrypt(&self, message: &MessageEvent) -> Result<Zeroizing<Vec<u8>>, MessengerError> {
        let (user, device) = (message.sender.as_str(), message.sender_device.as_str());
        let ciphertext = &message.ciphertext.0;
        let is_initial = ratchet::initial_header(ciphertext).ok().flatten().is_some();
        // The current session first, then superseded ones (messages still in flight on a session
        // that a simultaneous start by both sides, or the peer starting over, replaced).
        if let Some(bytes) = self.inner.store.session(user, device).await? {
            let mut session = Ratchet::from_bytes(&bytes).map_err(crypto)?;
            if let Ok(plaintext) = session.decrypt(ciphertext) {
                self.inner.store.save_session(user, device, &session.to_bytes()).await?;
                return Ok(Zeroizing::new(plaintext));
            }
        }
        for (slot, bytes) in self.inner.store.previous_sessions(user, device).await? {
            let mut session = Ratchet::from_bytes(&bytes).map_err(crypto)?;
            if let Ok(plaintext) = session.decrypt(ciphertext) {
                self.inner.store.save_previous_session(user, device, slot, &session.to_bytes()).await?;
                return Ok(Zeroizing::new(plaintext));
            }
        }
        if !is_initial {
            return Err(crypto("no session with this device decrypts the message"));
        }
        let header = ratchet::initial_header(ciphertext).map_err(crypto)?.ok_or_else(|| crypto("no session with this device"))?;
        // A first message is accepted once: a replay would otherwise rewind the session (for
        // sessions on the last-resort prekey or without a one-time prekey, whose secrets stay).
        let seen_key = format!("initial:{}", hex(&Sha256::digest(header.to_bytes())));
        if self.inner.store.get(&seen_key).await?.is_some() {
            return Err(crypto("replayed first message"));
        }
        let prekeys = self.load_prekeys(&header).await?;
        let accepted = Ratchet::accept_initial(&prekeys, ciphertext).map_err(crypto)?;
        // The sender's identity key must be the one its verified device list names.
        let list = match self.device_list(&message.sender, false).await {
            Ok(list) if list.device(&message.sender_device).is_some() => list,
            _ => self.device_list(&message.sender, true).await?,
        };
        let listed = list
            .device(&message.sender_device)
            .ok_or_else(|| self.untrusted(&message.sender, format!("device {device} is not in the signed device list")))?;
        if listed.identity_key().as_bytes() != accepted.session.remote_identity_key().as_bytes() {
            return Err(
                self.untrusted(&message.sender, format!("device {device} used an identity key its signed list does not name"))
            );
        }
        if let Some(PrekeyRef::OneTime(id)) = accepted.used_prekey {
            self.inner.store.delete_prekey("one_time", id).await?;
        }
        self.inner.store.archive_session(user, device).await?;
        self.inner.store.save_session(user, device, &accepted.session.to_bytes()).await?;
        self.inner.store.set(&seen_key, b"1").await?;
        Ok(Zeroizing::new(accepted.plaintext))
    }

    async fn load_prekeys(&self, header: &x3dh::InitialHeader) -> Result<Prekeys, MessengerError> {
        let secret = |bytes: Option<Zeroizing<Vec<u8>>>| -> Option<StaticSecret> {
            let bytes = bytes?;
            let array: [u8; 32] = bytes.as_slice().try_into().ok()?;
            Some(StaticSecret::from(array))
        };
        let signed = secret(self.inner.store.prekey("signed", header.signed_prekey_id).await?);
        let (one_time, last_resort) = match header.one_time_prekey {
            Some(PrekeyRef::OneTime(id)) => (secret(self.inner.store.prekey("one_time", id).await?).map(|s| (id, s)), None),
            Some(PrekeyRef::LastResort(id)) => (None, secret(self.inner.store.prekey("last_resort", id).await?).map(|s| (id, s))),
            None => (None, None),
        };
        Ok(Prekeys {
            identity: self.inner.device.identity_secret().clone(),
            signed: signed.map(|s| (header.signed_prekey_id, s)),
            one_time,
            last_resort,
        })
    }

    async fn on_receipt(&self, receipt: ReceiptEvent) -> Result<(), MessengerError> {
        // Like a message, a receipt waits for a send in progress: its server id is then recorded.
        let _guard = self.inner.lock.lock().await;
        let me = &self.inner.session.user_id;
        let sender = receipt.sender.as_str();
        if &receipt.sender != me {
            // A read marker set on another of our devices: record it for that peer's messages.
            if &receipt.by == me && receipt.kind == ReceiptKind::Read {
                self.inner.store.mark_receipt(sender, sender, &receipt.message_ids, true).await?;
            }
            return Ok(());
        }
        // Only our messages that went to `by` count: the server could name anyone.
        let read = receipt.kind == ReceiptKind::Read;
        let message_ids = self.inner.store.mark_receipt(receipt.by.as_str(), me.as_str(), &receipt.message_ids, read).await?;
        if message_ids.is_empty() {
            tracing::debug!(by = %receipt.by, "receipt for none of our messages to its author; ignored");
            return Ok(());
        }
        let event = if read {
            MessengerEvent::Read { by: receipt.by, message_ids }
        } else {
            MessengerEvent::Delivered { by: receipt.by, message_ids }
        };
        self.emit(event);
        Ok(())
    }

    /// Tells `to`'s online devices that this user is typing (or stopped).
    pub async fn typing(&self, to: &UserId, typing: bool) -> Result<(), MessengerError> {
        Ok(self.inner.conn.typing(to.clone(), typing).await?)
    }

    /// Subscribes to users' presence (they become contacts); current states and changes arrive
    /// as [`MessengerEvent::Presence`].
    pub async fn subscribe_presence(&self, users: Vec<UserId>) -> Result<Vec<PresenceInfo>, MessengerError> {
        Ok(self.inner.api.subscribe_presence(users).await?.presence)
    }

    /// Marks messages of `peer` read (read receipts to the peer's devices and ours).
    pub async fn mark_read(&self, peer: &UserId, server_msg_ids: Vec<u64>) -> Result<(), MessengerError> {
        self.inner.store.mark_receipt(peer.as_str(), peer.as_str(), &server_msg_ids, true).await?;
        Ok(self.inner.conn.read(peer.clone(), server_msg_ids).await?)
    }

    /// Uploads a new batch of one-time prekeys.
    async fn replenish(&self) -> Result<(), MessengerError> {
        let _guard = self.inner.lock.lock().await;
        let mut upload = UploadKeysRequest::default();
        upload.one_time_prekeys = new_one_time_prekeys(&self.inner.store, PREKEY_BATCH).await?;
        self.inner.api.upload_keys(&upload).await?;
        Ok(())
    }
}

/// The secrets an initial message names, for [`Ratchet::accept_initial`].
struct Prekeys {
    identity: StaticSecret,
    signed: Option<(u32, StaticSecret)>,
    one_time: Option<(u32, StaticSecret)>,
    last_resort: Option<(u32, StaticSecret)>,
}

impl PrekeyStore for Prekeys {
    fn identity_key(&self) -> StaticSecret {
        self.identity.clone()
    }
    fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        self.signed.as_ref().filter(|(id, _)| *id == key_id).map(|(_, s)| s.clone())
    }
    fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        self.one_time.as_ref().filter(|(id, _)| *id == key_id).map(|(_, s)| s.clone())
    }
    fn last_resort_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        self.last_resort.as_ref().filter(|(id, _)| *id == key_id).map(|(_, s)| s.clone())
    }
}

async fn save_profile(
    store: &Store,
    session: &Session,
    identity: &UserIdentity,
    device: &DeviceIdentity,
) -> Result<(), MessengerError> {
    let session_json = Zeroizing::new(serde_json::to_vec(session).map_err(crypto)?);
    store.set("session", &session_json).await?;
    store.set("user_identity", identity.to_bytes().as_slice()).await?;
    store.set("device_identity", device.to_bytes().as_slice()).await?;
    Ok(())
}

/// Generates a signed prekey, a last-resort prekey and a first batch of one-time prekeys,
/// stores their secrets, and uploads the public halves with the device keys.
async fn upload_initial_keys(store: &Store, api: &Api, session: &Session, device: &DeviceIdentity) -> Result<(), MessengerError> {
    let mut upload = UploadKeysRequest::default();
    upload.device_keys = Some(device.device_keys(&session.user_id, &session.device_id));
    for (kind, id) in [("signed", SIGNED_PREKEY_ID), ("last_resort", LAST_RESORT_ID)] {
        let secret = StaticSecret::random_from_rng(OsRng);
        store.save_prekey(kind, id, secret.as_bytes()).await?;
        let signed = device.sign_prekey(id, &x25519_dalek::PublicKey::from(&secret));
        if kind == "signed" {
            upload.signed_prekey = Some(signed);
        } else {
            upload.last_resort_prekey = Some(signed);
        }
    }
    upload.one_time_prekeys = new_one_time_prekeys(store, PREKEY_BATCH).await?;
    api.upload_keys(&upload).await?;
    Ok(())
}

async fn new_one_time_prekeys(store: &Store, count: u32) -> Result<Vec<OneTimePrekey>, MessengerError> {
    let next = store
        .get("next_prekey_id")
        .await?
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()))
        .unwrap_or(FIRST_ONE_TIME_ID);
    let mut prekeys = Vec::with_capacity(count as usize);
    for id in next..next + count {
        let secret = StaticSecret::random_from_rng(OsRng);
        store.save_prekey("one_time", id, secret.as_bytes()).await?;
        prekeys.push(OneTimePrekey::new(id, x25519_dalek::PublicKey::from(&secret).as_bytes().to_vec()));
    }
    store.set("next_prekey_id", (next + count).to_string().as_bytes()).await?;
    Ok(prekeys)
}

/// Errors after which re-sending the same request can never succeed.
fn is_permanent(code: ErrorCode) -> bool {
    !matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::DevicesMismatch)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
