//! Presence: a user is online while at least one device holds a heartbeating WebSocket, and
//! offline with a last-seen time otherwise. Changes go to the user's subscribers (the users who
//! added them as a contact) as `presence` frames, filtered by the user's privacy setting.
//! Presence is ephemeral: a subscriber that is offline simply gets the current state when it
//! subscribes or asks again.

use crate::app::AppState;
use crate::directory::UserEntry;
use crate::error::Result;
use crate::storage::{StoreError, UserPk};
use bytes::Bytes;
use parley_spec::federation::v1::transaction::{Item, PresenceItem, PresenceSubscription};
use parley_spec::v1::presence::{PresenceInfo, PresenceStatus, Visibility};
use parley_spec::v1::ws::ServerFrame;
use parley_spec::{ServerName, Timestamp, UserId};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Online device counts per user.
#[derive(Default)]
pub struct Presence {
    online: Mutex<HashMap<UserPk, usize>>,
}

impl Presence {
    /// A device of `user` connected. Returns true when the user just came online.
    pub fn connected(&self, user: UserPk) -> bool {
        let mut online = self.online.lock().unwrap_or_else(|e| e.into_inner());
        let count = online.entry(user).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// A device of `user` disconnected. Returns true when the user just went offline.
    pub fn disconnected(&self, user: UserPk) -> bool {
        let mut online = self.online.lock().unwrap_or_else(|e| e.into_inner());
        match online.get_mut(&user) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                online.remove(&user);
                true
            }
            None => false,
        }
    }

    /// Whether any device of `user` is connected.
    pub fn is_online(&self, user: UserPk) -> bool {
        self.online.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&user)
    }
}

/// Whether `viewer` may see `target`'s presence, given the target's setting and whether the
/// target has the viewer as a contact.
pub fn visible(visibility: Visibility, viewer_is_contact: bool, viewer_is_target: bool) -> bool {
    viewer_is_target
        || match visibility {
            Visibility::Everyone => true,
            Visibility::Contacts => viewer_is_contact,
            Visibility::Nobody => false,
        }
}

/// A connection of `user` opened here: whether the user just came online (this was their
/// first connection here, and no other worker holds one).
pub async fn connected(state: &AppState, user: UserPk) -> bool {
    if !state.presence.connected(user) {
        return false;
    }
    let Some(cluster) = state.hub.relay() else { return true };
    let elsewhere = cluster.online_elsewhere(user).await;
    cluster.hold_user(user).await;
    !elsewhere
}

/// A connection of `user` here closed: whether the user just went offline (it was their last
/// one here, and no other worker holds one).
pub async fn disconnected(state: &AppState, user: UserPk) -> bool {
    if !state.presence.disconnected(user) {
        return false;
    }
    let Some(cluster) = state.hub.relay() else { return true };
    cluster.release_user(user).await;
    !cluster.online_elsewhere(user).await
}

/// Whether any device of `user` is connected, here or to another worker.
pub async fn is_online(state: &AppState, user: UserPk) -> bool {
    if state.presence.is_online(user) {
        return true;
    }
    match state.hub.relay() {
        Some(cluster) => cluster.online_elsewhere(user).await,
        None => false,
    }
}

/// `target`'s presence as `viewer` may see it.
pub async fn view(state: &AppState, viewer: &UserId, target: &UserEntry) -> Result<PresenceInfo, StoreError> {
    let Some(row) = state.store.user_by_localpart(target.user_id.localpart()).await? else {
        return Ok(PresenceInfo::new(target.user_id.clone(), PresenceStatus::Hidden, None));
    };
    let visibility = Visibility::parse(&row.visibility).unwrap_or_default();
    let is_contact = visibility == Visibility::Contacts && state.store.has_contact(&target.user_id, viewer).await?;
    if !visible(visibility, is_contact, viewer == &target.user_id) {
        return Ok(PresenceInfo::new(target.user_id.clone(), PresenceStatus::Hidden, None));
    }
    if is_online(state, target.pk).await {
        Ok(PresenceInfo::new(target.user_id.clone(), PresenceStatus::Online, None))
    } else {
        Ok(PresenceInfo::new(target.user_id.clone(), PresenceStatus::Offline, row.last_seen_ts))
    }
}

/// Tells `user`'s subscribers that it came online or went offline (in the background).
pub fn announce(state: &AppState, user: Arc<UserEntry>, online: bool, last_seen: Option<Timestamp>) {
    let state = state.clone();
    tokio::spawn(async move {
        if let Err(error) = announce_now(&state, &user, online, last_seen).await {
            tracing::warn!(%error, "presence announcement failed");
        }
    });
}

async fn announce_now(state: &AppState, user: &UserEntry, online: bool, last_seen: Option<Timestamp>) -> Result<(), StoreError> {
    let subscribers = state.store.subscribers_of(&user.user_id).await?;
    if subscribers.is_empty() {
        return Ok(());
    }
    let Some(row) = state.store.user_by_localpart(user.user_id.localpart()).await? else { return Ok(()) };
    let visibility = Visibility::parse(&row.visibility).unwrap_or_default();
    let (status, last_seen_ts) =
        if online { (PresenceStatus::Online, None) } else { (PresenceStatus::Offline, last_seen.or(row.last_seen_ts)) };
    let info = PresenceInfo::new(user.user_id.clone(), status, last_seen_ts);
    let shown = frame(info.clone());
    // Remote subscribers, grouped by server: one presence item per server (coalesced there).
    let mut remote: BTreeMap<ServerName, Vec<UserId>> = BTreeMap::new();
    for (subscriber, is_contact) in subscribers {
        if !visible(visibility, is_contact, false) {
            continue;
        }
        if !subscriber.is_of(&state.server_name) {
            remote.entry(subscriber.server_name()).or_default().push(subscriber);
            continue;
        }
        if let Some(entry) = state.directory.user(&subscriber).await? {
            for (device, _) in &entry.devices {
                state.hub.send_ephemeral(*device, shown.clone());
            }
        }
    }
    if let Some(fed) = &state.federation {
        for (server, viewers) in remote {
            fed.sender.push_ephemeral(&server, Item::Presence(PresenceItem::new(info.clone(), viewers)));
        }
    }
    Ok(())
}

/// A server tells us which of our users one of its users follows: the subscription replaces
/// the earlier one, and the current presence of each (as that user may see it) goes back.
pub async fn remote_subscription(state: &AppState, subscription: PresenceSubscription) -> Result<()> {
    let mut local = Vec::new();
    for contact in subscription.contacts.iter().take(crate::api::presence::MAX_SUBSCRIBE) {
        if let Some(entry) = state.directory.user(contact).await? {
            local.push(entry);
        }
    }
    let names: Vec<UserId> = local.iter().map(|e| e.user_id.clone()).collect();
    state.store.replace_remote_contacts(&subscription.subscriber, &state.server_name, &names).await?;
    let Some(fed) = &state.federation else { return Ok(()) };
    for entry in local {
        let info = view(state, &subscription.subscriber, &entry).await?;
        if info.status != PresenceStatus::Hidden {
            fed.sender.push_ephemeral(
                &subscription.subscriber.server_name(),
                Item::Presence(PresenceItem::new(info, vec![subscription.subscriber.clone()])),
            );
        }
    }
    Ok(())
}

/// Presence of a remote user for local viewers: sent to the devices of the viewers who
/// subscribed to that user here, and remembered if any did. The origin names the viewers, but
/// it cannot make this server push presence to users who never asked for it.
pub async fn deliver_remote(state: &AppState, item: PresenceItem) {
    let subscribers = match state.store.subscribers_of(&item.presence.user).await {
        Ok(subscribers) => subscribers.into_iter().map(|(owner, _)| owner).collect::<std::collections::HashSet<_>>(),
        Err(error) => {
            tracing::warn!(%error, "reading the subscribers of a remote user failed");
            return;
        }
    };
    let viewers: Vec<UserId> = item.viewers.into_iter().filter(|viewer| subscribers.contains(viewer)).collect();
    if viewers.is_empty() {
        tracing::debug!(user = %item.presence.user, "presence for no subscriber here; dropped");
        return;
    }
    if let Some(fed) = &state.federation {
        fed.remember_presence(item.presence.clone());
    }
    let shown = frame(item.presence);
    for viewer in viewers {
        let Ok(Some(entry)) = state.directory.user(&viewer).await else { continue };
        for (device, _) in &entry.devices {
            state.hub.send_ephemeral(*device, shown.clone());
        }
    }
}

/// A serialized `presence` frame.
pub fn frame(info: PresenceInfo) -> Bytes {
    Bytes::from(serde_json::to_vec(&ServerFrame::Presence(info)).unwrap_or_default())
}
