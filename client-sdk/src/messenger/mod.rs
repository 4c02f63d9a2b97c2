//! [`Messenger`]: end-to-end encrypted 1:1 messaging for one device, on top of [`Api`],
//! [`Connection`] and the local [`Store`]. It is a thin async driver of the sans-I/O
//! [`E2eeMachine`](crate::e2ee::E2eeMachine), which holds the rules (see [`crate::e2ee`]):
//!
//! - **Identity.** The first device of an account creates the user's identity key and shows a
//!   32-byte recovery secret once; the identity key signs the device list. A new device signs
//!   itself in with the recovery secret ([`Messenger::add_device`]) and keeps the identity, so
//!   any device can sign the list without another ([`Messenger::remove_device`]).
//! - **Trust.** Device lists are verified against the identity key pinned on first contact and
//!   against the last version seen; a changed identity, a rollback, an equivocation or a forged
//!   list is an [`MessengerEvent::Untrusted`] event and a typed error, and nothing is encrypted
//!   to a device that is not in a verified list.
//! - **Sending.** A message is written to history and the outbox first, then sent by the
//!   outbox task, one pass at a time, oldest first; the outbox entry is removed when the server
//!   answers `sent`, so a message composed offline goes out on reconnect, exactly once.
//! - **Receiving.** One task takes the connection's events in order, hands messages and
//!   receipts to the machine, and confirms inbox positions once what came before is stored.
//!
//! No lock is held across network I/O: the machine is locked for one call at a time (store
//! work only) and every request it asks for is performed with the lock released, so a send
//! that waits for the server does not hold up incoming messages.

mod devices;
mod driver;
mod files;
mod groups;
#[cfg(test)]
mod tests;

pub use crate::e2ee::{MessengerEvent, Undecryptable, Untrust};
pub use crate::groups::{GroupError, GroupMessage, GroupPolicy, GroupProblem, GroupRecord, GroupState, MetaChange};
pub use files::{TransferProgress, MAX_THUMBNAIL_BYTES, THUMBNAIL_SIDE};
pub use groups::{AddReport, DeviceRemoval, MAX_COMMIT_ATTEMPTS};

use crate::e2ee::{AccountStore as _, CryptoError, E2eeError, E2eeMachine, Progress};
use crate::groups::GroupMachine;
use crate::store::Store;
use crate::{Client, ConnectOptions, Connection, Error, Event, Events, LoginRequest, RegisterRequest, Session};
use driver::{Driver, Network};
use parley_crypto::identity::{verify_device_list, DeviceIdentity, UserIdentity, VerifiedDevice};
use parley_crypto::PublicKey;
use parley_spec::v1::presence::PresenceInfo;
use parley_spec::{DeviceId, Seq, ServerMsgId, Timestamp, UserId};
use rand::rngs::OsRng;
use std::path::Path;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Why a messenger operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MessengerError {
    /// Talking to the server, or the local store, failed.
    #[error(transparent)]
    Sdk(#[from] Error),
    /// A device list or key bundle failed verification.
    #[error("untrusted keys for {user}: {reason}")]
    Untrusted {
        /// Whose keys.
        user: UserId,
        /// Why.
        reason: Untrust,
    },
    /// A cryptographic operation on local state failed (the crypto crate's error, with its
    /// [`kind`](CryptoError::kind)).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The local profile is missing or damaged.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// A group operation failed.
    #[error(transparent)]
    Group(#[from] GroupError),
    /// A file transfer failed (a local file, a corrupt download, a cancel).
    #[error(transparent)]
    Media(crate::media::MediaError),
    /// The arguments do not make sense (API misuse), such as a device removing itself.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A bug: the driver misused the E2EE machine.
    #[error("internal error: {0}")]
    Internal(#[source] E2eeError),
}

impl From<E2eeError> for MessengerError {
    fn from(error: E2eeError) -> Self {
        match error {
            E2eeError::Untrusted { user, reason } => Self::Untrusted { user, reason },
            E2eeError::Crypto(e) => Self::Crypto(e),
            E2eeError::Store(e) => Self::Sdk(Error::Store(e)),
            E2eeError::NoAccount => Self::Profile(ProfileError::Missing("device keys")),
            other => Self::Internal(other),
        }
    }
}

/// What is wrong with the local profile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Something the profile must hold is not there.
    #[error("no {0} in the profile")]
    Missing(&'static str),
    /// Something the profile holds does not parse.
    #[error("the profile's {0} is damaged")]
    Damaged(&'static str),
}

type Machine = E2eeMachine<Store, OsRng>;

/// End-to-end encrypted messaging for one device. Cheap to clone.
#[derive(Clone)]
pub struct Messenger {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// Where uploads in progress keep their state (next to the profile).
    media_dir: std::path::PathBuf,
    session: Session,
    identity_key: PublicKey,
    driver: Driver<Store, OsRng, Network>,
    /// Flush requests for the outbox task (one pass at a time, in order).
    flushes: mpsc::UnboundedSender<Flush>,
    /// Whether the backlog of the current connection has been processed (see
    /// [`Messenger::caught_up`]).
    sync: watch::Sender<SyncState>,
    /// MLS groups (locked for one call at a time, never across a network round trip).
    groups: tokio::sync::Mutex<GroupMachine<Store>>,
    /// Held while one group event is handled (from the WebSocket or pulled), so the group
    /// stream is handled in order, one event at a time.
    group_serial: tokio::sync::Mutex<()>,
    /// Held for the whole of one commit of this device (build, submit, wait for it to come
    /// back), so two commits never race on the one pending-commit slot of a group (a user's
    /// change and a background commit of proposals, say).
    commit_serial: tokio::sync::Mutex<()>,
    /// Counts group events handled, for callers waiting for a position or an epoch.
    group_progress: watch::Sender<u64>,
}

/// A request for one pass over the outbox, answered with the outcome for `report`.
struct Flush {
    report: Option<Uuid>,
    done: oneshot::Sender<Result<(), MessengerError>>,
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
        let list = identity
            .sign_device_list(&session.user_id, 1, vec![device.list_entry(&session.device_id)])
            .map_err(CryptoError::from)?;
        let api = crate::Api::new(&session)?;
        let store = Store::open(path).await.map_err(Error::from)?;
        let machine = set_up(&store, &session, identity, device, &api).await?;
        api.put_device_list(&list).await?;
        let (messenger, events) = Self::start(path, store, session, machine).await?;
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
        let api = crate::Api::new(&session)?;
        let current = api.device_list(&session.user_id).await?;
        let verified = match verify_device_list(&current, &session.user_id, Some(&identity.public()), None) {
            Ok(verified) => verified,
            Err(e) => {
                // A wrong recovery secret: remove the device the login just created.
                if let Err(error) = api.logout().await {
                    tracing::warn!(%error, "could not remove the half-added device");
                }
                return Err(MessengerError::Untrusted { user: session.user_id.clone(), reason: Untrust::DeviceList(e) });
            }
        };
        let mut entries: Vec<_> = verified.devices().iter().map(VerifiedDevice::to_entry).collect();
        entries.push(device.list_entry(&session.device_id));
        let list = identity.sign_device_list(&session.user_id, verified.version() + 1, entries).map_err(CryptoError::from)?;
        let store = Store::open(path).await.map_err(Error::from)?;
        let machine = set_up(&store, &session, identity, device, &api).await?;
        api.put_device_list(&list).await?;
        Self::start(path, store, session, machine).await
    }

    /// Opens an existing profile and connects, resuming from the stored cursor.
    pub async fn open(path: &Path) -> Result<(Self, MessengerEvents), MessengerError> {
        let store = Store::open(path).await.map_err(Error::from)?;
        let json = store.get("session").await.map_err(Error::from)?.ok_or(ProfileError::Missing("session"))?;
        let session: Session = serde_json::from_slice(&json).map_err(|_| ProfileError::Damaged("session"))?;
        let machine = E2eeMachine::open(store.clone(), OsRng, session.user_id.clone(), session.device_id.clone()).await?;
        Self::start(path, store, session, machine).await
    }

    async fn start(
        path: &Path,
        store: Store,
        session: Session,
        machine: Machine,
    ) -> Result<(Self, MessengerEvents), MessengerError> {
        let since = match store.get("cursor").await.map_err(Error::from)? {
            Some(bytes) => std::str::from_utf8(&bytes).ok().and_then(|s| s.parse().ok()).map_or(Seq::ZERO, Seq::new),
            None => Seq::ZERO,
        };
        let (conn, events) =
            Connection::open(&session, ConnectOptions { since, manual_ack: true, ..ConnectOptions::default() }).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (flushes, flush_requests) = mpsc::unbounded_channel();
        let network = Network { api: crate::Api::new(&session)?, conn: Some(conn) };
        let (_, device) = store.account().await.map_err(Error::from)?.ok_or(ProfileError::Missing("device keys"))?;
        let groups = GroupMachine::open(store.clone(), session.user_id.clone(), session.device_id.clone(), &device).await?;
        drop(device);
        let inner = Arc::new(Inner {
            store,
            media_dir: media_dir(path),
            identity_key: machine.identity_key(),
            session,
            driver: Driver::new(machine, network, tx),
            flushes,
            sync: watch::channel(SyncState::Syncing).0,
            groups: tokio::sync::Mutex::new(groups),
            group_serial: tokio::sync::Mutex::new(()),
            commit_serial: tokio::sync::Mutex::new(()),
            group_progress: watch::channel(0).0,
        });
        tokio::spawn(run_outbox(Arc::downgrade(&inner), flush_requests));
        let messenger = Self { inner };
        tokio::spawn(messenger.clone().receive(events));
        // A device others cannot add to groups is only half set up; but a server without the
        // KeyPackage directory must not keep 1:1 messaging from working.
        if let Err(error) = messenger.ensure_key_packages().await {
            tracing::warn!(%error, "KeyPackages not uploaded");
        }
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
        self.inner.identity_key
    }

    fn conn(&self) -> &Connection {
        // Set in `start`; only unit tests of the driver run without a connection.
        self.inner.driver.transport().conn.as_ref().expect("a started messenger has a connection")
    }

    fn api(&self) -> &crate::Api {
        &self.inner.driver.transport().api
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.conn().clone().close().await;
    }

    /// Writes a text message to history and the outbox, then sends it (now, or when the
    /// connection is back). Returns its id.
    pub async fn send_text(&self, to: &UserId, body: &str) -> Result<Uuid, MessengerError> {
        let client_msg_id = self.inner.driver.machine().await.enqueue_text(to, body, Timestamp::now()).await?;
        self.flush(Some(client_msg_id)).await?;
        Ok(client_msg_id)
    }

    /// Sends everything in the outbox, oldest first. A message to a user whose keys are
    /// untrusted stays queued (and is reported) without holding back messages to others.
    pub async fn flush_outbox(&self) -> Result<(), MessengerError> {
        self.flush(None).await
    }

    /// Asks the outbox task for a pass; returns the outcome of the entry `report` (or the first
    /// failure that stopped the pass).
    async fn flush(&self, report: Option<Uuid>) -> Result<(), MessengerError> {
        let (done, outcome) = oneshot::channel();
        self.inner.flushes.send(Flush { report, done }).map_err(|_| Error::Closed)?;
        outcome.await.map_err(|_| Error::Closed)?
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
        self.inner.driver.machine().await.forget_device_list(user).await?;
        self.refresh_devices(user).await
    }

    /// The safety number of this user and `user`, from the verified (pinned) identity keys.
    pub async fn safety_number(&self, user: &UserId) -> Result<parley_crypto::safety::SafetyNumber, MessengerError> {
        let list = self.inner.driver.device_list(user, false).await?;
        Ok(parley_crypto::safety::safety_number(&self.inner.session.user_id, &self.inner.identity_key, user, list.identity_key()))
    }

    /// Fetches and verifies `user`'s device list now (for example when a contact is opened or
    /// after a [`MessengerEvent::DevicesChanged`]); returns its device ids.
    pub async fn refresh_devices(&self, user: &UserId) -> Result<Vec<DeviceId>, MessengerError> {
        let list = self.inner.driver.device_list(user, true).await?;
        Ok(list.devices().iter().map(|d| d.device_id().clone()).collect())
    }

    /// Tells `to`'s online devices that this user is typing (or stopped).
    pub async fn typing(&self, to: &UserId, typing: bool) -> Result<(), MessengerError> {
        Ok(self.conn().typing(to.clone(), typing).await?)
    }

    /// Subscribes to users' presence (they become contacts); current states and changes arrive
    /// as [`MessengerEvent::Presence`].
    pub async fn subscribe_presence(&self, users: Vec<UserId>) -> Result<Vec<PresenceInfo>, MessengerError> {
        Ok(self.api().subscribe_presence(users).await?.presence)
    }

    /// Marks messages of `peer` read (read receipts to the peer's devices and ours).
    pub async fn mark_read(&self, peer: &UserId, server_msg_ids: Vec<ServerMsgId>) -> Result<(), MessengerError> {
        use crate::e2ee::MessageStore as _;
        self.inner.store.mark_receipt(peer, peer, &server_msg_ids, true).await.map_err(Error::from)?;
        Ok(self.conn().read(peer.clone(), server_msg_ids).await?)
    }

    async fn receive(self, mut events: Events) {
        // Set when an event could not be processed (storage failed): from then on nothing is
        // confirmed, so the server redelivers it after the next reconnect.
        let mut failed = false;
        let driver = &self.inner.driver;
        while let Some(event) = events.next().await {
            let sync = match &event {
                Event::Connected { .. } | Event::Disconnected { .. } => Some(SyncState::Syncing),
                Event::CaughtUp { .. } => Some(SyncState::CaughtUp),
                _ => None,
            };
            let result = match event {
                Event::Message(message) => driver.receive_message(message).await,
                Event::Receipt(receipt) => driver.receive_receipt(receipt).await,
                Event::PrekeysLow { .. } => driver.replenish().await,
                // A group event that fails is not acknowledged: the server sends it again after
                // a reconnect. It does not hold up the 1:1 inbox.
                Event::GroupEvent(event) => {
                    if let Err(error) = self.receive_group_event(event).await {
                        tracing::warn!(%error, "group event not processed; it will be delivered again");
                    }
                    Ok(())
                }
                Event::KeyPackagesLow { count } => {
                    if let Err(error) = self.replenish_key_packages(count).await {
                        tracing::warn!(%error, "KeyPackages not replenished");
                    }
                    Ok(())
                }
                Event::Presence(info) => {
                    driver.emit(MessengerEvent::Presence(info));
                    Ok(())
                }
                Event::Typing(notice) => {
                    driver.emit(MessengerEvent::Typing(notice));
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
                        if let Err(error) = messenger.flush_group_outbox().await {
                            tracing::warn!(%error, "group messages not re-sent");
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
    async fn checkpoint(&self, seq: Seq) -> Result<(), MessengerError> {
        self.inner.store.set("cursor", seq.to_string().as_bytes()).await.map_err(Error::from)?;
        self.conn().confirm(seq);
        Ok(())
    }
}

/// The outbox task: one pass over the outbox per flush request, in order, so messages go out
/// in the order they were written and no entry is sent by two passes at once. It holds the
/// messenger only while a pass runs, and ends with it.
async fn run_outbox(messenger: Weak<Inner>, mut requests: mpsc::UnboundedReceiver<Flush>) {
    while let Some(Flush { report, done }) = requests.recv().await {
        let Some(inner) = messenger.upgrade() else { break };
        let outcome = inner.driver.flush(report).await;
        drop(inner);
        // The caller stopped waiting: the pass counted anyway.
        let _ = done.send(outcome);
    }
}

/// The media work directory of the profile at `path`: `<profile>.media` next to it.
fn media_dir(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".media");
    path.with_file_name(name)
}

/// Saves the session, creates the E2EE machine for a new device (saving its keys) and uploads
/// its device keys and prekeys.
async fn set_up(
    store: &Store,
    session: &Session,
    identity: UserIdentity,
    device: DeviceIdentity,
    api: &crate::Api,
) -> Result<Machine, MessengerError> {
    // A session is strings and integers: its JSON encoding cannot fail.
    let session_json = Zeroizing::new(serde_json::to_vec(session).expect("a session encodes as JSON"));
    store.set("session", &session_json).await.map_err(Error::from)?;
    let mut machine =
        E2eeMachine::create(store.clone(), OsRng, session.user_id.clone(), session.device_id.clone(), identity, device).await?;
    let request = machine.initial_keys().await?;
    let network = Network { api: api.clone(), conn: None };
    let (tx, _events) = mpsc::unbounded_channel();
    let driver = Driver::new(machine, network, tx);
    driver.drive(Progress::Next(request)).await?;
    Ok(driver.into_machine())
}
