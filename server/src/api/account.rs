//! Accounts and devices: register, login, logout, whoami, device list and removal, and a
//! user's device ids for senders.

use super::{parse_user, Json};
use crate::app::AppState;
use crate::auth::{generate_device_id, generate_token, hash_token, AuthDevice};
use crate::config::RegistrationMode;
use crate::error::{Error, Result};
use crate::hub::CloseReason;
use crate::storage::StoreError;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use parley_spec::ids::validate_localpart;
use parley_spec::v1::account::{LoginRequest, RegisterRequest, SessionResponse, WhoAmIResponse};
use parley_spec::v1::devices::{DeleteDeviceRequest, DeviceInfo, DevicesResponse, UserDevicesResponse};
use parley_spec::{DeviceId, ErrorCode, UserId};
use std::net::SocketAddr;
use zeroize::Zeroizing;

/// Longest accepted password, in bytes (argon2 input stays bounded).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Longest device display name, in bytes.
pub const MAX_DEVICE_NAME_BYTES: usize = 256;

fn check_password(state: &AppState, password: &str) -> Result<()> {
    let min = state.config.auth.min_password_bytes;
    if password.len() < min || password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::new(ErrorCode::InvalidPassword, format!("password must be {min} to {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

fn check_device_name(name: Option<&str>) -> Result<()> {
    if name.is_some_and(|n| n.len() > MAX_DEVICE_NAME_BYTES) {
        return Err(Error::new(ErrorCode::BadRequest, "device_name is longer than 256 bytes"));
    }
    if name.is_some_and(|n| n.chars().any(char::is_control)) {
        return Err(Error::new(ErrorCode::BadRequest, "device_name must not contain control characters"));
    }
    Ok(())
}

/// POST /v1/register
pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(request): Json<RegisterRequest>,
) -> Result<axum::Json<SessionResponse>> {
    state.limits.check_auth(peer.ip(), &state.metrics)?;
    let password = Zeroizing::new(request.password);
    validate_localpart(&request.username).map_err(|e| Error::new(ErrorCode::InvalidUsername, e.to_string()))?;
    let user_id =
        UserId::new(&request.username, &state.server_name).map_err(|e| Error::new(ErrorCode::InvalidUsername, e.to_string()))?;
    check_password(&state, &password)?;
    check_device_name(request.device_name.as_deref())?;
    let registration_token = match state.config.registration.mode {
        RegistrationMode::Open => None,
        RegistrationMode::Closed => {
            return Err(Error::new(ErrorCode::RegistrationClosed, "registration is closed on this server"))
        }
        RegistrationMode::Token => {
            let token = request
                .registration_token
                .as_deref()
                .ok_or_else(|| Error::new(ErrorCode::InvalidRegistrationToken, "a registration token is required"))?;
            Some(hash_token(token))
        }
    };
    if state.store.user_by_localpart(&request.username).await?.is_some() {
        return Err(Error::new(ErrorCode::UserTaken, "that username is taken"));
    }
    let password_hash = state.passwords.hash(password).await?;
    let device_id = generate_device_id();
    let token = generate_token();
    let created = state
        .store
        .create_user_with_device(
            &request.username,
            &password_hash,
            device_id.as_str(),
            request.device_name.as_deref(),
            &hash_token(&token),
            registration_token.as_ref().map(|t| t.as_slice()),
        )
        .await;
    match created {
        Ok(_) => {}
        Err(StoreError::Conflict) => return Err(Error::new(ErrorCode::UserTaken, "that username is taken")),
        Err(StoreError::TokenRejected) => {
            return Err(Error::new(ErrorCode::InvalidRegistrationToken, "unknown, used up or expired registration token"))
        }
        Err(other) => return Err(other.into()),
    }
    state.directory.invalidate(&request.username);
    tracing::info!(user = %user_id, device = %device_id, "registered");
    Ok(axum::Json(SessionResponse::new(user_id, device_id, token.to_string())))
}

/// POST /v1/login
pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Json(request): Json<LoginRequest>,
) -> Result<axum::Json<SessionResponse>> {
    state.limits.check_auth(peer.ip(), &state.metrics)?;
    let password = Zeroizing::new(request.password);
    check_device_name(request.device_name.as_deref())?;
    // Accept the localpart or the full user id of this server.
    let localpart = match request.username.parse::<UserId>() {
        Ok(user) if user.is_of(&state.server_name) => user.localpart().to_owned(),
        Ok(_) => return Err(Error::new(ErrorCode::WrongCredentials, "wrong username or password")),
        Err(_) => request.username.clone(),
    };
    let user = if validate_localpart(&localpart).is_ok() {
        // Guessing one account's password is limited from any number of addresses.
        state.limits.check_login(&localpart, &state.metrics)?;
        state.store.user_by_localpart(&localpart).await?
    } else {
        None
    };
    let ok = state.passwords.verify(user.as_ref().map(|u| u.password_hash.clone()), password).await?;
    let user = match user {
        Some(user) if ok => user,
        _ => return Err(Error::new(ErrorCode::WrongCredentials, "wrong username or password")),
    };
    let user_id = UserId::new(&user.localpart, &state.server_name).map_err(Error::internal)?;
    let token = generate_token();
    let device_id = generate_device_id();
    match state
        .store
        .create_device(
            user.pk,
            device_id.as_str(),
            request.device_name.as_deref(),
            &hash_token(&token),
            state.config.limits.max_devices_per_user,
        )
        .await
    {
        Ok(_) => {}
        Err(StoreError::TooMany) => {
            return Err(Error::new(
                ErrorCode::TooManyDevices,
                format!("at most {} devices per user", state.config.limits.max_devices_per_user),
            ))
        }
        Err(other) => return Err(other.into()),
    }
    state.directory.invalidate(&user.localpart);
    crate::federation::remote::device_list_changed(&state, user.pk, &user_id).await?;
    tracing::info!(user = %user_id, device = %device_id, "logged in");
    Ok(axum::Json(SessionResponse::new(user_id, device_id, token.to_string())))
}

/// POST /v1/logout
pub async fn logout(State(state): State<AppState>, auth: AuthDevice) -> Result<StatusCode> {
    remove_device(&state, &auth, auth.device_pk).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_device(state: &AppState, auth: &AuthDevice, device_pk: i64) -> Result<()> {
    state.store.delete_device(device_pk).await?;
    state.directory.invalidate(auth.user_id.localpart());
    state.hub.close(device_pk, CloseReason::Revoked);
    crate::federation::remote::device_list_changed(state, auth.user_pk, &auth.user_id).await?;
    Ok(())
}

/// GET /v1/whoami
pub async fn whoami(auth: AuthDevice) -> axum::Json<WhoAmIResponse> {
    axum::Json(WhoAmIResponse::new(auth.user_id, auth.device_id))
}

/// GET /v1/devices
pub async fn list_devices(State(state): State<AppState>, auth: AuthDevice) -> Result<axum::Json<DevicesResponse>> {
    let devices = state.store.devices_of(auth.user_pk).await?;
    let devices = devices
        .into_iter()
        .filter_map(|d| {
            let id = DeviceId::parse(&d.device_id).ok()?;
            Some(DeviceInfo::new(id, d.display_name, d.created_ts, d.last_seen_ts))
        })
        .collect();
    Ok(axum::Json(DevicesResponse::new(devices)))
}

/// DELETE /v1/devices/{device_id}
pub async fn delete_device(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(device_id): Path<String>,
    Json(request): Json<DeleteDeviceRequest>,
) -> Result<StatusCode> {
    let password = Zeroizing::new(request.password);
    let user = state
        .store
        .user_by_localpart(auth.user_id.localpart())
        .await?
        .ok_or_else(|| Error::internal("authenticated user vanished"))?;
    if !state.passwords.verify(Some(user.password_hash), password).await? {
        return Err(Error::new(ErrorCode::WrongCredentials, "wrong password"));
    }
    let device = state
        .store
        .devices_of(auth.user_pk)
        .await?
        .into_iter()
        .find(|d| d.device_id == device_id)
        .ok_or_else(|| Error::new(ErrorCode::NotFound, "no such device"))?;
    remove_device(&state, &auth, device.pk).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// GET /v1/users/{user_id}/devices
pub async fn user_devices(
    State(state): State<AppState>,
    _auth: AuthDevice,
    Path(user_id): Path<String>,
) -> Result<axum::Json<UserDevicesResponse>> {
    let user_id = parse_user(&user_id)?;
    if !user_id.is_of(&state.server_name) {
        let remote = crate::federation::remote::devices(&state, &user_id, true).await?;
        return Ok(axum::Json(UserDevicesResponse::new(user_id, remote.devices.clone())));
    }
    let entry = state.directory.user(&user_id).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
    let devices = entry.devices.iter().map(|(_, id)| id.clone()).collect();
    Ok(axum::Json(UserDevicesResponse::new(user_id, devices)))
}
