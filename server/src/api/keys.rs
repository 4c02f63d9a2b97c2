//! The key directory: devices upload their keys and prekeys, users publish signed device lists,
//! senders claim one prekey bundle per device. The server checks what it can (sizes, that a
//! device uploads only its own keys, self-signatures, increasing list versions); clients verify
//! everything again, since they must not trust the server.

use super::{parse_user, Json};
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use crate::storage::{KeyUpload, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use parley_crypto::identity::{verify_device_keys, verify_device_list, verify_signed_prekey};
use parley_crypto::keys::parse_x25519_public;
use parley_crypto::PublicKey;
use parley_spec::error::DeviceRef;
use parley_spec::v1::keys::{
    ClaimRequest, ClaimResponse, DeviceKeys, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey, UploadKeysRequest,
    UploadKeysResponse, MAX_CLAIM_DEVICES, MAX_ONE_TIME_PREKEYS_PER_UPLOAD,
};
use parley_spec::{ErrorCode, ServerName, UserId};
use std::time::Instant;

fn bad(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::BadRequest, message)
}

/// The verified signing key of a device's keys.
fn signing_key(keys: &DeviceKeys) -> Result<PublicKey> {
    verify_device_keys(keys).map(|v| *v.device().signing_key()).map_err(|e| bad(format!("device keys: {e}")))
}

fn check_signed_prekey(name: &str, prekey: &SignedPrekey, signer: &PublicKey) -> Result<()> {
    verify_signed_prekey(prekey, signer).map(drop).map_err(|e| bad(format!("{name}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(Error::internal)
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(Error::internal)
}

/// POST /v1/keys/upload
pub async fn upload_keys(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<UploadKeysRequest>,
) -> Result<axum::Json<UploadKeysResponse>> {
    if request.one_time_prekeys.len() > MAX_ONE_TIME_PREKEYS_PER_UPLOAD {
        return Err(bad(format!("at most {MAX_ONE_TIME_PREKEYS_PER_UPLOAD} one-time prekeys per upload")));
    }
    // The device keys being uploaded, or the ones stored before: prekeys are checked against them.
    let device_keys = match &request.device_keys {
        Some(keys) => {
            if keys.user_id != auth.user_id || keys.device_id != auth.device_id {
                return Err(Error::new(ErrorCode::Forbidden, "a device can only upload its own keys"));
            }
            signing_key(keys)?;
            Some(keys.clone())
        }
        None => match state.store.stored_device_keys(auth.device_pk).await? {
            Some(json) => Some(from_json::<DeviceKeys>(&json)?),
            None => None,
        },
    };
    let needs_keys =
        request.signed_prekey.is_some() || request.last_resort_prekey.is_some() || !request.one_time_prekeys.is_empty();
    let Some(device_keys) = device_keys else {
        if needs_keys {
            return Err(bad("upload device_keys before prekeys"));
        }
        return Ok(axum::Json(UploadKeysResponse::new(0)));
    };
    let signer = signing_key(&device_keys)?;
    if let Some(prekey) = &request.signed_prekey {
        check_signed_prekey("signed_prekey", prekey, &signer)?;
    }
    if let Some(prekey) = &request.last_resort_prekey {
        check_signed_prekey("last_resort_prekey", prekey, &signer)?;
    }
    for prekey in &request.one_time_prekeys {
        parse_x25519_public(&prekey.public_key.0).map_err(|_| bad("malformed one-time prekey"))?;
    }
    let upload = KeyUpload {
        device_keys: request.device_keys.as_ref().map(to_json).transpose()?,
        signed_prekey: request.signed_prekey.as_ref().map(to_json).transpose()?,
        last_resort_prekey: request.last_resort_prekey.as_ref().map(to_json).transpose()?,
        one_time_prekeys: request.one_time_prekeys.iter().map(|p| (p.key_id, p.public_key.0.clone())).collect(),
    };
    match state.store.upload_keys(auth.device_pk, upload).await {
        Ok(count) => Ok(axum::Json(UploadKeysResponse::new(count))),
        Err(StoreError::Conflict) => {
            Err(Error::new(ErrorCode::Forbidden, "this device's keys are already set and cannot change"))
        }
        Err(other) => Err(other.into()),
    }
}

/// PUT /v1/keys/device-list
pub async fn put_device_list(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(list): Json<SignedDeviceList>,
) -> Result<StatusCode> {
    if list.user_id != auth.user_id {
        return Err(Error::new(ErrorCode::Forbidden, "a user can only publish its own device list"));
    }
    // Signature, sorting and keys. Rollback is checked against the stored version below;
    // identity changes are for clients to judge.
    verify_device_list(&list, &auth.user_id, None, None).map_err(|e| bad(format!("device list: {e}")))?;
    match state.store.put_device_list(auth.user_pk, list.version, &to_json(&list)?).await {
        Ok(()) => {
            crate::federation::remote::device_list_changed(&state, auth.user_pk, &auth.user_id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(StoreError::Conflict) => Err(Error::new(ErrorCode::BadRequest, "version must be greater than the published one")),
        Err(other) => Err(other.into()),
    }
}

/// GET /v1/users/{user_id}/device-list
pub async fn get_device_list(
    State(state): State<AppState>,
    _auth: AuthDevice,
    Path(user_id): Path<String>,
) -> Result<axum::Json<SignedDeviceList>> {
    let user_id = parse_user(&user_id)?;
    if !user_id.is_of(&state.server_name) {
        let devices = crate::federation::remote::devices(&state, &user_id, true).await?;
        return devices
            .device_list
            .clone()
            .map(axum::Json)
            .ok_or_else(|| Error::new(ErrorCode::NotFound, "no device list published"));
    }
    let entry = state.directory.user(&user_id).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
    let json =
        state.store.device_list(entry.pk).await?.ok_or_else(|| Error::new(ErrorCode::NotFound, "no device list published"))?;
    Ok(axum::Json(from_json(&json)?))
}

/// POST /v1/keys/claim
pub async fn claim_keys(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<ClaimRequest>,
) -> Result<axum::Json<ClaimResponse>> {
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(bad(format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    let (local, remote): (Vec<DeviceRef>, Vec<DeviceRef>) =
        request.devices.into_iter().partition(|d| d.user.is_of(&state.server_name));
    let mut response = claim_local(&state, local, None).await?;
    if !remote.is_empty() {
        let answer = crate::federation::remote::claim(&state, &auth.user_id, remote).await?;
        response.bundles.extend(answer.bundles);
        response.missing.extend(answer.missing);
    }
    Ok(axum::Json(response))
}

/// Claims bundles for devices of local users, for clients here (`requester` `None`) and for
/// `requester`, a user of another server (`(its server, the user)`): one-time prekeys for
/// those are limited per server and per user (`[federation] one_time_claims_per_*`); past a
/// limit the bundle carries the last-resort prekey.
pub async fn claim_local(
    state: &AppState,
    devices: Vec<DeviceRef>,
    requester: Option<(&ServerName, &UserId)>,
) -> Result<ClaimResponse> {
    let mut bundles = Vec::new();
    let mut missing = Vec::new();
    let limits = requester.zip(state.federation.as_ref().map(|fed| &fed.claim_limits));
    for target in devices {
        let device = match state.directory.user(&target.user).await? {
            Some(entry) => entry.devices.iter().find(|(_, id)| *id == target.device).map(|(pk, _)| *pk),
            None => None,
        };
        let claimed = match device {
            Some(device) => {
                let now = Instant::now();
                let one_time = match limits {
                    Some(((server, user), limits)) => limits.take(server.as_str(), user.as_str(), device, now),
                    None => true,
                };
                let claimed = state.store.claim_keys(device, one_time).await;
                // Counted only when a one-time prekey was handed out.
                let handed_out = matches!(&claimed, Ok(Some(c)) if c.one_time_prekey.is_some());
                if let (true, false, Some(((server, user), limits))) = (one_time, handed_out, limits) {
                    limits.refund(server.as_str(), user.as_str(), device, now);
                }
                claimed?.map(|c| (device, c))
            }
            None => None,
        };
        let Some((device, claimed)) = claimed else {
            missing.push(DeviceRef::new(target.user, target.device));
            continue;
        };
        if claimed.remaining < state.config.limits.prekey_low_watermark {
            crate::ws::notify_prekeys_low(state, device, claimed.remaining);
        }
        bundles.push(PrekeyBundle::new(
            from_json(&claimed.device_keys)?,
            from_json(&claimed.signed_prekey)?,
            claimed.one_time_prekey.map(|(key_id, public_key)| OneTimePrekey::new(key_id, public_key)),
            claimed.last_resort_prekey.as_deref().map(from_json).transpose()?,
        ));
    }
    Ok(ClaimResponse::new(bundles, missing))
}
