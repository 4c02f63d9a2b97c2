//! Presence over HTTP: one user's presence, subscriptions (contacts) and the privacy setting.

use super::{parse_user, Json};
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{ApiError, ApiResult};
use crate::presence;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use parley_spec::v1::presence::{PresenceInfo, PrivacySettings, SubscribeRequest, SubscriptionsResponse};
use parley_spec::{ErrorCode, UserId};

/// Most users in one subscription request.
pub const MAX_SUBSCRIBE: usize = 1000;

/// GET /v1/presence/{user_id}
pub async fn get_presence(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<PresenceInfo>> {
    let user_id = parse_user(&user_id)?;
    let target = state.directory.user(&user_id).await?.ok_or_else(|| ApiError::new(ErrorCode::UnknownUser, "no such user"))?;
    Ok(axum::Json(presence::view(&state, &auth.user_id, &target).await?))
}

/// PUT /v1/presence/subscriptions
pub async fn subscribe(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<SubscribeRequest>,
) -> ApiResult<axum::Json<SubscriptionsResponse>> {
    if request.users.len() > MAX_SUBSCRIBE {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("at most {MAX_SUBSCRIBE} users per request")));
    }
    let mut names = Vec::with_capacity(request.users.len());
    for user in &request.users {
        if state.directory.user(user).await?.is_none() {
            return Err(ApiError::new(ErrorCode::UnknownUser, format!("no such user: {user}")));
        }
        names.push(user.to_string());
    }
    state.store.add_contacts(auth.user_id.as_str(), &names).await?;
    list(&state, &auth).await
}

/// GET /v1/presence/subscriptions
pub async fn list_subscriptions(State(state): State<AppState>, auth: AuthDevice) -> ApiResult<axum::Json<SubscriptionsResponse>> {
    list(&state, &auth).await
}

async fn list(state: &AppState, auth: &AuthDevice) -> ApiResult<axum::Json<SubscriptionsResponse>> {
    Ok(axum::Json(SubscriptionsResponse::new(contacts_presence(state, &auth.user_id).await?)))
}

/// The presence of each of `viewer`'s contacts.
pub async fn contacts_presence(state: &AppState, viewer: &UserId) -> ApiResult<Vec<PresenceInfo>> {
    let mut presence = Vec::new();
    for contact in state.store.contacts_of(viewer.as_str()).await? {
        let Ok(contact) = contact.parse::<UserId>() else { continue };
        if let Some(entry) = state.directory.user(&contact).await? {
            presence.push(presence::view(state, viewer, &entry).await?);
        }
    }
    Ok(presence)
}

/// PUT /v1/account/privacy
pub async fn set_privacy(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<PrivacySettings>,
) -> ApiResult<StatusCode> {
    state.store.set_visibility(auth.user_pk, request.last_seen.as_str()).await?;
    Ok(StatusCode::NO_CONTENT)
}
