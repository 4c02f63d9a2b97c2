//! [`MemoryStore`]: the [`CryptoStore`](super::CryptoStore) in memory, for tests and for
//! callers that keep nothing on disk. It mirrors the SQLite store's semantics (unique history
//! rows per sender and id, superseded sessions capped, receipts only for matching messages).

use super::store::{
    AccountStore, InitialMessageId, MessageStore, OutboxEntry, PrekeyKind, SessionSlot, SessionStore, StoreError, StoredMessage,
    SupersededSession, TrustStore, PREVIOUS_SESSIONS_KEPT,
};
use parley_crypto::identity::{DeviceIdentity, UserIdentity, VerifiedDeviceList, DEVICE_IDENTITY_BYTES};
use parley_crypto::prekeys::PrekeySecret;
use parley_spec::v1::keys::SignedDeviceList;
use parley_spec::{DeviceId, ServerMsgId, Timestamp, UserId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use uuid::Uuid;
use zeroize::Zeroizing;

type PeerDevice = (UserId, DeviceId);
/// The user identity seed and the device keys, as stored.
type AccountBytes = (Zeroizing<[u8; 32]>, Zeroizing<[u8; DEVICE_IDENTITY_BYTES]>);

#[derive(Default)]
struct State {
    account: Option<AccountBytes>,
    prekeys: BTreeMap<(PrekeyKind, u32), PrekeySecret>,
    next_prekey_id: Option<u32>,
    sessions: BTreeMap<PeerDevice, Zeroizing<Vec<u8>>>,
    /// Oldest first.
    previous: BTreeMap<PeerDevice, Vec<SupersededSession>>,
    seen: BTreeSet<InitialMessageId>,
    lists: BTreeMap<UserId, SignedDeviceList>,
    outbox: Vec<OutboxEntry>,
    messages: Vec<StoredMessage>,
}

/// A [`CryptoStore`](super::CryptoStore) in memory. Clones share the same state, so a test can
/// keep one to look inside while the machine owns another.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change: every method
        // changes the state in one step.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The history with `peer`, oldest first.
    pub fn history(&self, peer: &UserId) -> Vec<StoredMessage> {
        self.state().messages.iter().filter(|m| &m.peer == peer).cloned().collect()
    }

    /// How many superseded sessions are kept with a peer device.
    pub fn previous_session_count(&self, user: &UserId, device: &DeviceId) -> usize {
        self.state().previous.get(&(user.clone(), device.clone())).map_or(0, Vec::len)
    }
}

impl AccountStore for MemoryStore {
    async fn account(&self) -> Result<Option<(UserIdentity, DeviceIdentity)>, StoreError> {
        Ok(self
            .state()
            .account
            .as_ref()
            .map(|(user, device)| (UserIdentity::from_bytes(user), DeviceIdentity::from_bytes(device))))
    }

    async fn save_account(&self, identity: &UserIdentity, device: &DeviceIdentity) -> Result<(), StoreError> {
        self.state().account = Some((identity.to_bytes(), device.to_bytes()));
        Ok(())
    }

    async fn prekey(&self, kind: PrekeyKind, key_id: u32) -> Result<Option<PrekeySecret>, StoreError> {
        Ok(self.state().prekeys.get(&(kind, key_id)).cloned())
    }

    async fn save_prekey(&self, kind: PrekeyKind, key_id: u32, secret: &PrekeySecret) -> Result<(), StoreError> {
        self.state().prekeys.insert((kind, key_id), secret.clone());
        Ok(())
    }

    async fn delete_prekey(&self, kind: PrekeyKind, key_id: u32) -> Result<(), StoreError> {
        self.state().prekeys.remove(&(kind, key_id));
        Ok(())
    }

    async fn next_one_time_prekey_id(&self) -> Result<Option<u32>, StoreError> {
        Ok(self.state().next_prekey_id)
    }

    async fn set_next_one_time_prekey_id(&self, next: u32) -> Result<(), StoreError> {
        self.state().next_prekey_id = Some(next);
        Ok(())
    }
}

impl SessionStore for MemoryStore {
    async fn session(&self, user: &UserId, device: &DeviceId) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        Ok(self.state().sessions.get(&(user.clone(), device.clone())).cloned())
    }

    async fn save_session(&self, user: &UserId, device: &DeviceId, state: &[u8]) -> Result<(), StoreError> {
        self.state().sessions.insert((user.clone(), device.clone()), Zeroizing::new(state.to_vec()));
        Ok(())
    }

    async fn archive_session(&self, user: &UserId, device: &DeviceId) -> Result<(), StoreError> {
        let mut state = self.state();
        let key = (user.clone(), device.clone());
        let Some(current) = state.sessions.get(&key).cloned() else { return Ok(()) };
        let previous = state.previous.entry(key).or_default();
        let next = previous.last().map_or(1, |p| p.slot.0 + 1);
        previous.push(SupersededSession { slot: SessionSlot(next), state: current });
        let excess = previous.len().saturating_sub(PREVIOUS_SESSIONS_KEPT);
        previous.drain(..excess);
        Ok(())
    }

    async fn previous_sessions(&self, user: &UserId, device: &DeviceId) -> Result<Vec<SupersededSession>, StoreError> {
        let state = self.state();
        let previous = state.previous.get(&(user.clone(), device.clone()));
        Ok(previous.map(|p| p.iter().rev().cloned().collect()).unwrap_or_default())
    }

    async fn save_previous_session(
        &self,
        user: &UserId,
        device: &DeviceId,
        slot: SessionSlot,
        state: &[u8],
    ) -> Result<(), StoreError> {
        let mut guard = self.state();
        if let Some(previous) = guard.previous.get_mut(&(user.clone(), device.clone())) {
            for stored in previous.iter_mut().filter(|p| p.slot == slot) {
                stored.state = Zeroizing::new(state.to_vec());
            }
        }
        Ok(())
    }

    async fn initial_message_seen(&self, id: &InitialMessageId) -> Result<bool, StoreError> {
        Ok(self.state().seen.contains(id))
    }

    async fn mark_initial_message_seen(&self, id: &InitialMessageId) -> Result<(), StoreError> {
        self.state().seen.insert(*id);
        Ok(())
    }
}

impl TrustStore for MemoryStore {
    async fn device_list(&self, user: &UserId) -> Result<Option<SignedDeviceList>, StoreError> {
        Ok(self.state().lists.get(user).cloned())
    }

    async fn save_device_list(&self, list: &VerifiedDeviceList) -> Result<(), StoreError> {
        self.state().lists.insert(list.user_id().clone(), list.signed().clone());
        Ok(())
    }

    async fn forget_device_list(&self, user: &UserId) -> Result<(), StoreError> {
        self.state().lists.remove(user);
        Ok(())
    }
}

impl MessageStore for MemoryStore {
    async fn enqueue(&self, entry: &OutboxEntry, _now: Timestamp) -> Result<(), StoreError> {
        let mut state = self.state();
        if !state.outbox.iter().any(|e| e.client_msg_id == entry.client_msg_id) {
            state.outbox.push(entry.clone());
        }
        Ok(())
    }

    async fn outbox(&self) -> Result<Vec<OutboxEntry>, StoreError> {
        Ok(self.state().outbox.clone())
    }

    async fn dequeue(&self, client_msg_id: Uuid) -> Result<(), StoreError> {
        self.state().outbox.retain(|e| e.client_msg_id != client_msg_id);
        Ok(())
    }

    async fn add_message(&self, message: &StoredMessage) -> Result<bool, StoreError> {
        let mut state = self.state();
        if state.messages.iter().any(|m| m.sender == message.sender && m.client_msg_id == message.client_msg_id) {
            return Ok(false);
        }
        let local_id = state.messages.last().map_or(1, |m| m.local_id + 1);
        state.messages.push(StoredMessage { local_id, ..message.clone() });
        Ok(true)
    }

    async fn has_server_message(&self, sender: &UserId, server_msg_id: ServerMsgId) -> Result<bool, StoreError> {
        Ok(self.state().messages.iter().any(|m| &m.sender == sender && m.server_msg_id == Some(server_msg_id)))
    }

    async fn mark_sent(
        &self,
        sender: &UserId,
        client_msg_id: Uuid,
        server_msg_id: ServerMsgId,
        ts: Timestamp,
    ) -> Result<(), StoreError> {
        for message in self.state().messages.iter_mut() {
            if &message.sender == sender && message.client_msg_id == client_msg_id {
                message.server_msg_id = Some(server_msg_id);
                message.ts = ts;
            }
        }
        Ok(())
    }

    async fn mark_receipt(
        &self,
        peer: &UserId,
        sender: &UserId,
        server_msg_ids: &[ServerMsgId],
        read: bool,
    ) -> Result<Vec<ServerMsgId>, StoreError> {
        let mut marked = BTreeSet::new();
        for message in self.state().messages.iter_mut() {
            let Some(id) = message.server_msg_id else { continue };
            if &message.peer == peer && &message.sender == sender && server_msg_ids.contains(&id) {
                message.delivered = true;
                message.read |= read;
                marked.insert(id);
            }
        }
        Ok(server_msg_ids.iter().copied().filter(|id| marked.remove(id)).collect())
    }
}
