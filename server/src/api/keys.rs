//! The key directory: devices upload their keys and prekeys, users publish signed device lists,
//! senders claim one prekey bundle per device. The server checks what it can (sizes, that a
//! device uploads only its own keys, self-signatures, increasing list versions); clients verify
//! everything again, since they must not trust the server.

use super::{parse_user, Json};
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{ApiError, ApiResult};
use crate::storage::{KeyUpload, StoreError};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use parley_crypto::PublicKey;
use parley_spec::error::DeviceRef;
use parley_spec::v1::keys::{
    ClaimRequest, ClaimResponse, DeviceKeys, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey, UploadKeysRequest,
    UploadKeysResponse, DEVICE_KEYS_CONTEXT, DEVICE_LIST_CONTEXT, MAX_CLAIM_DEVICES, MAX_ONE_TIME_PREKEYS_PER_UPLOAD,
    SIGNED_PREKEY_CONTEXT,
};
use parley_spec::ErrorCode;

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn check_len(name: &str, bytes: &[u8], len: usize) -> ApiResult<()> {
    if bytes.len() != len {
        return Err(bad(format!("{name} must be {len} bytes")));
    }
    Ok(())
}

fn signing_key(keys: &DeviceKeys) -> ApiResult<PublicKey> {
    PublicKey::from_bytes(&keys.signing_key.0).map_err(|_| bad("signing_key is not an ed25519 public key"))
}

fn check_signed_prekey(name: &str, prekey: &SignedPrekey, signer: &PublicKey) -> ApiResult<()> {
    check_len(name, &prekey.public_key.0, 32)?;
    signer
        .verify_object(SIGNED_PREKEY_CONTEXT, prekey, &prekey.signature.0)
        .map_err(|_| bad(format!("{name} is not signed by the device's signing key")))
}

fn to_json<T: serde::Serialize>(value: &T) -> ApiResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(ApiError::internal)
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes).map_err(ApiError::internal)
}

/// POST /v1/keys/upload
pub async fn upload_keys(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<UploadKeysRequest>,
) -> ApiResult<axum::Json<UploadKeysResponse>> {
    if request.one_time_prekeys.len() > MAX_ONE_TIME_PREKEYS_PER_UPLOAD {
        return Err(bad(format!("at most {MAX_ONE_TIME_PREKEYS_PER_UPLOAD} one-time prekeys per upload")));
    }
    // The device keys being uploaded, or the ones stored before: prekeys are checked against them.
    let device_keys = match &request.device_keys {
        Some(keys) => {
            if keys.user_id != auth.user_id || keys.device_id != auth.device_id {
                return Err(ApiError::new(ErrorCode::Forbidden, "a device can only upload its own keys"));
            }
            check_len("identity_key", &keys.identity_key.0, 32)?;
            let signer = signing_key(keys)?;
            signer
                .verify_object(DEVICE_KEYS_CONTEXT, keys, &keys.signature.0)
                .map_err(|_| bad("device keys are not self-signed"))?;
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
        check_len("one-time prekey", &prekey.public_key.0, 32)?;
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
            Err(ApiError::new(ErrorCode::Forbidden, "this device's keys are already set and cannot change"))
        }
        Err(other) => Err(other.into()),
    }
}

/// PUT /v1/keys/device-list
pub async fn put_device_list(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(list): Json<SignedDeviceList>,
) -> ApiResult<StatusCode> {
    if list.user_id != auth.user_id {
        return Err(ApiError::new(ErrorCode::Forbidden, "a user can only publish its own device list"));
    }
    if !list.devices.windows(2).all(|w| w[0].device_id < w[1].device_id) {
        return Err(bad("devices must be sorted by device_id without duplicates"));
    }
    for entry in &list.devices {
        check_len("signing_key", &entry.signing_key.0, 32)?;
        check_len("identity_key", &entry.identity_key.0, 32)?;
    }
    let identity = PublicKey::from_bytes(&list.identity_key.0).map_err(|_| bad("identity_key is not an ed25519 public key"))?;
    identity
        .verify_object(DEVICE_LIST_CONTEXT, &list, &list.signature.0)
        .map_err(|_| bad("the device list is not signed by identity_key"))?;
    match state.store.put_device_list(auth.user_pk, list.version, &to_json(&list)?).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::Conflict) => Err(ApiError::new(ErrorCode::BadRequest, "version must be greater than the published one")),
        Err(other) => Err(other.into()),
    }
}

/// GET /v1/users/{user_id}/device-list
pub async fn get_device_list(
    State(state): State<AppState>,
    _auth: AuthDevice,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<SignedDeviceList>> {
    let user_id = parse_user(&user_id)?;
    let entry = state.directory.user(&user_id).await?.ok_or_else(|| ApiError::new(ErrorCode::UnknownUser, "no such user"))?;
    let json =
        state.store.device_list(entry.pk).await?.ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no device list published"))?;
    Ok(axum::Json(from_json(&json)?))
}

/// POST /v1/keys/claim
pub async fn claim_keys(
    State(state): State<AppState>,
    _auth: AuthDevice,
    Json(request): Json<ClaimRequest>,
) -> ApiResult<axum::Json<ClaimResponse>> {
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(bad(format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    let mut bundles = Vec::new();
    let mut missing = Vec::new();
    for target in request.devices {
        let device = match state.directory.user(&target.user).await? {
            Some(entry) => entry.devices.iter().find(|(_, id)| *id == target.device).map(|(pk, _)| *pk),
            None => None,
        };
        let claimed = match device {
            Some(device) => state.store.claim_keys(device).await?.map(|c| (device, c)),
            None => None,
        };
        let Some((device, claimed)) = claimed else {
            missing.push(DeviceRef::new(target.user, target.device));
            continue;
        };
        if claimed.remaining < state.config.limits.prekey_low_watermark {
            crate::ws::notify_prekeys_low(&state, device, claimed.remaining);
        }
        bundles.push(PrekeyBundle::new(
            from_json(&claimed.device_keys)?,
            from_json(&claimed.signed_prekey)?,
            claimed.one_time_prekey.map(|(key_id, public_key)| OneTimePrekey::new(key_id, public_key)),
            claimed.last_resort_prekey.as_deref().map(from_json).transpose()?,
        ));
    }
    Ok(axum::Json(ClaimResponse::new(bundles, missing)))
}
