//! Presence over HTTP: one user's presence, subscriptions (contacts) and the privacy setting.

use super::{parse_user, Json};
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use crate::presence;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use parley_spec::federation::v1::transaction::{Item, PresenceSubscription};
use parley_spec::v1::presence::{PresenceInfo, PrivacySettings, SubscribeRequest, SubscriptionsResponse};
use parley_spec::{ErrorCode, UserId};

/// Most users in one subscription request.
pub const MAX_SUBSCRIBE: usize = 1000;

/// GET /v1/presence/{user_id}
pub async fn get_presence(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(user_id): Path<String>,
) -> Result<axum::Json<PresenceInfo>> {
    let user_id = parse_user(&user_id)?;
    if !user_id.is_of(&state.server_name) {
        return Ok(axum::Json(remote_presence(&state, &user_id)));
    }
    let target = state.directory.user(&user_id).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
    Ok(axum::Json(presence::view(&state, &auth.user_id, &target).await?))
}

/// PUT /v1/presence/subscriptions
pub async fn subscribe(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<SubscribeRequest>,
) -> Result<axum::Json<SubscriptionsResponse>> {
    if request.users.len() > MAX_SUBSCRIBE {
        return Err(Error::new(ErrorCode::BadRequest, format!("at most {MAX_SUBSCRIBE} users per request")));
    }
    let mut names = Vec::with_capacity(request.users.len());
    let mut remote_servers = std::collections::BTreeSet::new();
    for user in &request.users {
        if !user.is_of(&state.server_name) {
            crate::federation::remote::check_reachable(&state, &user.server_name())?;
            remote_servers.insert(user.server_name());
            names.push(user.clone());
            continue;
        }
        if state.directory.user(user).await?.is_none() {
            return Err(Error::new(ErrorCode::UnknownUser, format!("no such user: {user}")));
        }
        names.push(user.clone());
    }
    state.store.add_contacts(&auth.user_id, &names).await?;
    // Each remote server learns the whole set of its users this user follows.
    let mut effects = crate::storage::Effects::default();
    for server in remote_servers {
        let contacts: Vec<UserId> =
            state.store.contacts_of(&auth.user_id).await?.into_iter().filter(|c| c.is_of(&server)).collect();
        let item = Item::PresenceSubscription(PresenceSubscription::new(auth.user_id.clone(), contacts));
        effects.outbound.push(crate::federation::sender::outbound(&server, &item)?);
    }
    if !effects.outbound.is_empty() {
        state.store.append(effects).await?;
    }
    list(&state, &auth).await
}

/// GET /v1/presence/subscriptions
pub async fn list_subscriptions(State(state): State<AppState>, auth: AuthDevice) -> Result<axum::Json<SubscriptionsResponse>> {
    list(&state, &auth).await
}

async fn list(state: &AppState, auth: &AuthDevice) -> Result<axum::Json<SubscriptionsResponse>> {
    Ok(axum::Json(SubscriptionsResponse::new(contacts_presence(state, &auth.user_id).await?)))
}

/// The presence of each of `viewer`'s contacts.
pub async fn contacts_presence(state: &AppState, viewer: &UserId) -> Result<Vec<PresenceInfo>> {
    let mut presence = Vec::new();
    for contact in state.store.contacts_of(viewer).await? {
        if !contact.is_of(&state.server_name) {
            presence.push(remote_presence(state, &contact));
            continue;
        }
        if let Some(entry) = state.directory.user(&contact).await? {
            presence.push(presence::view(state, viewer, &entry).await?);
        }
    }
    Ok(presence)
}

/// What this server last heard of a remote user's presence (offline when nothing yet).
fn remote_presence(state: &AppState, user: &UserId) -> PresenceInfo {
    state
        .federation
        .as_ref()
        .and_then(|fed| fed.remote_presence(user))
        .unwrap_or_else(|| PresenceInfo::new(user.clone(), parley_spec::v1::presence::PresenceStatus::Offline, None))
}

/// PUT /v1/account/privacy
pub async fn set_privacy(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<PrivacySettings>,
) -> Result<StatusCode> {
    state.store.set_visibility(auth.user_pk, request.last_seen.as_str()).await?;
    Ok(StatusCode::NO_CONTENT)
}
