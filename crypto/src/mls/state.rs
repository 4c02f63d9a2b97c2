//! Persisting a [`MemoryStorage`] client's state without showing openmls types: the state is
//! openmls' key-value pairs as opaque bytes. A client starts from stored pairs
//! ([`MlsClient::with_state`]) and hands out what changed since it last did
//! ([`MlsClient::take_state_changes`]); the caller writes those changes to its own store, so
//! this crate does no I/O.

use super::{MemoryStorage, MlsClient};
use crate::identity::DeviceIdentity;
use parley_spec::{DeviceId, UserId};
use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError, RwLock};

/// One change to a client's stored state: `key` now holds `value`, or was deleted (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The opaque key.
    pub key: Vec<u8>,
    /// The new value, or `None` if the key was deleted.
    pub value: Option<Vec<u8>>,
}

/// The state as last handed out by [`MlsClient::take_state_changes`] (or loaded by
/// [`MlsClient::with_state`]): what the caller's store holds.
#[derive(Debug, Default)]
pub(super) struct Snapshot(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

impl MlsClient<MemoryStorage> {
    /// The client of `device` of `user` (signed by `identity`), starting from stored state:
    /// the pairs that [`take_state_changes`](Self::take_state_changes) reported and the caller
    /// kept (an empty iterator for a new device). Only later changes are reported.
    pub fn with_state(
        state: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        user: UserId,
        device: DeviceId,
        identity: &DeviceIdentity,
    ) -> Self {
        let snapshot: BTreeMap<Vec<u8>, Vec<u8>> = state.into_iter().collect();
        let values = snapshot.iter().map(|(key, value)| (key.clone(), value.clone())).collect();
        let mut client = Self::new(MemoryStorage { values: RwLock::new(values) }, user, device, identity);
        client.snapshot = Snapshot(Mutex::new(snapshot));
        client
    }

    /// What changed in the state since the last call (or since the client was made): new or
    /// rewritten keys with their values, deleted keys with `None`, sorted by key. Apply them
    /// all, in one transaction, to the stored pairs to keep them equal to the client's state.
    ///
    /// Each call compares the whole state with a copy of what was last taken (one lookup per
    /// key), so it costs time proportional to the size of the state, not of the change, and
    /// keeps that copy in memory: call it once after a batch of operations rather than after
    /// each. Pairs not yet taken are lost with the client.
    pub fn take_state_changes(&self) -> Vec<StateChange> {
        // A poisoned lock means a panic elsewhere mid-operation; the maps themselves are
        // always whole, so reading them on is sound.
        let mut snapshot = self.snapshot.0.lock().unwrap_or_else(PoisonError::into_inner);
        let values = self.storage().values.read().unwrap_or_else(PoisonError::into_inner);
        let mut changes: Vec<StateChange> = values
            .iter()
            .filter(|(key, value)| snapshot.get(*key) != Some(*value))
            .map(|(key, value)| StateChange { key: key.clone(), value: Some(value.clone()) })
            .collect();
        changes.extend(
            snapshot.keys().filter(|key| !values.contains_key(*key)).map(|key| StateChange { key: key.clone(), value: None }),
        );
        drop(values);
        for change in &changes {
            match &change.value {
                Some(value) => snapshot.insert(change.key.clone(), value.clone()),
                None => snapshot.remove(&change.key),
            };
        }
        changes.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        changes
    }
}

impl super::HubGroup<MemoryStorage> {
    /// The whole public state as one opaque blob, to store after each merge and give back to
    /// [`from_state_bytes`](Self::from_state_bytes). It holds no secrets (a hub has none).
    pub fn state_bytes(&self) -> Vec<u8> {
        let values = self.storage().values.read().unwrap_or_else(PoisonError::into_inner);
        let mut pairs: Vec<_> = values.iter().collect();
        pairs.sort_unstable();
        let mut out = Vec::with_capacity(pairs.iter().map(|(k, v)| k.len() + v.len() + 8).sum());
        for (key, value) in pairs {
            for part in [key, value] {
                // openmls' keys and values are far below 4 GiB (a 1,000-member tree is ~1 MB).
                out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    /// The group `group_id` from a blob made by [`state_bytes`](Self::state_bytes) (`None` when
    /// the blob holds no such group). A blob that does not parse is [`MlsError::Storage`].
    pub fn from_state_bytes(bytes: &[u8], group_id: &[u8]) -> Result<Option<Self>, super::MlsError> {
        let mut values = Vec::new();
        let mut rest = bytes;
        let take = |rest: &mut &[u8]| -> Result<Vec<u8>, super::MlsError> {
            let damaged = || super::MlsError::storage("damaged hub state");
            let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(damaged)?;
            let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| damaged())?;
            if tail.len() < len {
                return Err(damaged());
            }
            let (part, tail) = tail.split_at(len);
            *rest = tail;
            Ok(part.to_vec())
        };
        while !rest.is_empty() {
            let key = take(&mut rest)?;
            let value = take(&mut rest)?;
            values.push((key, value));
        }
        Self::load(MemoryStorage { values: RwLock::new(values.into_iter().collect()) }, group_id)
    }
}
