//! Push registration: the calling device's push endpoint (`spec/push.md`).

use super::Json;
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use crate::push::{parse_endpoint, EndpointError, Registration};
use crate::storage::PushRow;
use axum::extract::State;
use axum::http::StatusCode;
use parley_crypto::push::PushKeys;
use parley_spec::v1::push::{PushSubscriptionKeys, Pusher, VapidPublicKey};
use parley_spec::ErrorCode;

/// PUT /v1/push
pub async fn set_pusher(State(state): State<AppState>, auth: AuthDevice, Json(pusher): Json<Pusher>) -> Result<StatusCode> {
    let endpoint = parse_endpoint(&pusher.endpoint, state.config.push.allow_private_addresses).map_err(|e| match e {
        EndpointError::Invalid(why) => Error::new(ErrorCode::BadRequest, why),
        EndpointError::Private => Error::new(ErrorCode::BadRequest, "the endpoint is a private address"),
    })?;
    let keys = match &pusher.keys {
        Some(keys) => {
            Some(PushKeys::parse(&keys.p256dh.0, &keys.auth.0).map_err(|e| Error::new(ErrorCode::BadRequest, e.to_string()))?)
        }
        None => None,
    };
    let row =
        PushRow { device: auth.device_pk, endpoint: endpoint.to_string(), keys: pusher.keys.map(|k| (k.p256dh.0, k.auth.0)) };
    state.store.set_pusher(&row).await?;
    state.push.register(auth.device_pk, Registration { endpoint, keys });
    if let Some(cluster) = state.hub.relay() {
        cluster.pusher_changed(auth.device_pk);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// GET /v1/push
pub async fn get_pusher(State(state): State<AppState>, auth: AuthDevice) -> Result<axum::Json<Pusher>> {
    let row = state
        .store
        .pushers_of(auth.device_pk)
        .await?
        .ok_or_else(|| Error::new(ErrorCode::NotFound, "no push endpoint registered for this device"))?;
    let keys = row.keys.map(|(p256dh, auth)| PushSubscriptionKeys::new(p256dh, auth));
    Ok(axum::Json(Pusher::new(row.endpoint, keys)))
}

/// DELETE /v1/push
pub async fn delete_pusher(State(state): State<AppState>, auth: AuthDevice) -> Result<StatusCode> {
    state.store.delete_pusher(auth.device_pk).await?;
    state.push.unregister(auth.device_pk);
    if let Some(cluster) = state.hub.relay() {
        cluster.pusher_changed(auth.device_pk);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// GET /v1/push/vapid
pub async fn get_vapid_key(State(state): State<AppState>, _auth: AuthDevice) -> axum::Json<VapidPublicKey> {
    use base64::Engine as _;
    axum::Json(VapidPublicKey::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&state.push.vapid_public_key)))
}
