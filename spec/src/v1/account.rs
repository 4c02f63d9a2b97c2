//! Accounts: `POST /v1/register`, `POST /v1/login`, `POST /v1/logout`, `GET /v1/whoami`.

use crate::{error::ErrorBody, DeviceId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /v1/register`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RegisterRequest {
    /// The localpart to register: `[a-z0-9._=-]+`, at most 64 bytes.
    pub username: String,
    /// The password (8 to 1024 bytes by default).
    pub password: String,
    /// A human name for the first device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// Required when the server's registration mode is `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_token: Option<String>,
}

impl RegisterRequest {
    /// A registration request without device name or token.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self { username: username.into(), password: password.into(), device_name: None, registration_token: None }
    }
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Body of `POST /v1/login`.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LoginRequest {
    /// The localpart (or the full user id) of the account.
    pub username: String,
    /// The password.
    pub password: String,
    /// A human name for the new device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
}

impl LoginRequest {
    /// A login request without device name.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self { username: username.into(), password: password.into(), device_name: None }
    }
}

impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Answer to register and login: a new device and its access token.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SessionResponse {
    /// The account.
    pub user_id: UserId,
    /// The device created for this session.
    pub device_id: DeviceId,
    /// Bearer token for this device. Shown once; the server stores only its hash.
    pub access_token: String,
}

impl std::fmt::Debug for SessionResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionResponse")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl SessionResponse {
    /// Builds a session response.
    pub fn new(user_id: UserId, device_id: DeviceId, access_token: String) -> Self {
        Self { user_id, device_id, access_token }
    }
}

/// Answer to `GET /v1/whoami`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct WhoAmIResponse {
    /// The authenticated user.
    pub user_id: UserId,
    /// The authenticated device.
    pub device_id: DeviceId,
}

impl WhoAmIResponse {
    /// Builds a whoami response.
    pub fn new(user_id: UserId, device_id: DeviceId) -> Self {
        Self { user_id, device_id }
    }
}

/// POST /v1/register
///
/// Creates an account and its first device. Open, closed or token-gated by server config.
#[utoipa::path(post, path = "/v1/register", tag = "account", request_body = RegisterRequest,
    responses(
        (status = 200, description = "Account and device created", body = SessionResponse),
        (status = 400, description = "`invalid_username`, `invalid_password`, `bad_json`", body = ErrorBody),
        (status = 403, description = "`registration_closed`, `invalid_registration_token`", body = ErrorBody),
        (status = 409, description = "`user_taken`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    ))]
pub fn register() {}

/// POST /v1/login
///
/// Password login; creates a new device with its own access token.
#[utoipa::path(post, path = "/v1/login", tag = "account", request_body = LoginRequest,
    responses(
        (status = 200, description = "Device created", body = SessionResponse),
        (status = 401, description = "`wrong_credentials`", body = ErrorBody),
        (status = 403, description = "`too_many_devices`", body = ErrorBody),
        (status = 429, description = "`rate_limited`", body = ErrorBody),
    ))]
pub fn login() {}

/// POST /v1/logout
///
/// Removes the calling device: its token stops working and its inbox is deleted.
#[utoipa::path(post, path = "/v1/logout", tag = "account", security(("bearer" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "`missing_token`, `unknown_token`", body = ErrorBody),
    ))]
pub fn logout() {}

/// GET /v1/whoami
#[utoipa::path(get, path = "/v1/whoami", tag = "account", security(("bearer" = [])),
    responses(
        (status = 200, body = WhoAmIResponse),
        (status = 401, description = "`missing_token`, `unknown_token`", body = ErrorBody),
    ))]
pub fn whoami() {}

crate::endpoint::endpoint! {
    /// `POST /v1/register`: creates an account and its first device.
    Register: Post "/v1/register", None, RegisterRequest => SessionResponse
}
crate::endpoint::endpoint! {
    /// `POST /v1/login`: creates a device of an existing account.
    Login: Post "/v1/login", None, LoginRequest => SessionResponse
}
crate::endpoint::endpoint! {
    /// `POST /v1/logout`: removes the calling device.
    Logout: Post "/v1/logout", AccessToken, () => ()
}
crate::endpoint::endpoint! {
    /// `GET /v1/whoami`.
    WhoAmI: Get "/v1/whoami", AccessToken, () => WhoAmIResponse
}
