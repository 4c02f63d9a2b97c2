//! The device directory: an in-memory cache of each user's devices, used on every send to
//! check the envelopes against the current devices. Loaded from the store on a miss and
//! invalidated whenever this server adds or removes a device.

use crate::storage::{DevicePk, Store, StoreError, UserPk};
use parley_spec::{DeviceId, ServerName, UserId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A local user and its devices.
#[derive(Debug)]
pub struct UserEntry {
    /// Internal key.
    pub pk: UserPk,
    /// Full user id.
    pub user_id: UserId,
    /// Shared form of the user id, for inbox rows.
    pub user_id_arc: Arc<str>,
    /// Devices, oldest first.
    pub devices: Vec<(DevicePk, DeviceId)>,
}

/// The cache.
pub struct Directory {
    store: Arc<Store>,
    server_name: ServerName,
    users: RwLock<HashMap<String, Arc<UserEntry>>>,
    generation: AtomicU64,
}

impl Directory {
    /// An empty cache over `store`.
    pub fn new(store: Arc<Store>, server_name: ServerName) -> Self {
        Self { store, server_name, users: RwLock::default(), generation: AtomicU64::new(0) }
    }

    /// The local user `user_id` (None when it is not a local user or does not exist).
    pub async fn user(&self, user_id: &UserId) -> Result<Option<Arc<UserEntry>>, StoreError> {
        if !user_id.is_of(&self.server_name) {
            return Ok(None);
        }
        self.local(user_id.localpart()).await
    }

    /// The local user with this localpart.
    pub async fn local(&self, localpart: &str) -> Result<Option<Arc<UserEntry>>, StoreError> {
        if let Some(entry) = self.users.read().unwrap_or_else(|e| e.into_inner()).get(localpart) {
            return Ok(Some(entry.clone()));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Some(user) = self.store.user_by_localpart(localpart).await? else { return Ok(None) };
        let devices = self.store.devices_of(user.pk).await?;
        let Ok(user_id) = UserId::new(localpart, &self.server_name) else { return Ok(None) };
        let entry = Arc::new(UserEntry {
            pk: user.pk,
            user_id_arc: Arc::from(user_id.as_str()),
            user_id,
            devices: devices.into_iter().filter_map(|d| DeviceId::parse(&d.device_id).ok().map(|id| (d.pk, id))).collect(),
        });
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        // Cache only if no device changed while we were reading.
        if self.generation.load(Ordering::Acquire) == generation {
            users.insert(localpart.to_owned(), entry.clone());
        }
        Ok(Some(entry))
    }

    /// Forgets a user's cached devices (after adding or removing one).
    pub fn invalidate(&self, localpart: &str) {
        let mut users = self.users.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        users.remove(localpart);
    }
}
