//! Devices: `GET /v1/devices`, `DELETE /v1/devices/{device_id}`, `GET /v1/users/{user_id}/devices`.

use crate::{error::ErrorBody, v1::Timestamp, DeviceId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One of the caller's own devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// Device id.
    pub device_id: DeviceId,
    /// Human name given at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// When the device was created.
    pub created_ts: Timestamp,
    /// When the device was last connected, if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ts: Option<Timestamp>,
}

impl DeviceInfo {
    /// Builds a device description.
    pub fn new(
        device_id: DeviceId,
        display_name: Option<String>,
        created_ts: Timestamp,
        last_seen_ts: Option<Timestamp>,
    ) -> Self {
        Self { device_id, display_name, created_ts, last_seen_ts }
    }
}

/// Answer to `GET /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct DevicesResponse {
    /// The caller's devices, oldest first.
    pub devices: Vec<DeviceInfo>,
}

impl DevicesResponse {
    /// Builds the response.
    pub fn new(devices: Vec<DeviceInfo>) -> Self {
        Self { devices }
    }
}

/// Body of `DELETE /v1/devices/{device_id}`: removing a device needs the password again.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeleteDeviceRequest {
    /// The account password.
    pub password: String,
}

impl DeleteDeviceRequest {
    /// Builds the request.
    pub fn new(password: impl Into<String>) -> Self {
        Self { password: password.into() }
    }
}

impl std::fmt::Debug for DeleteDeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeleteDeviceRequest").finish_non_exhaustive()
    }
}

/// Answer to `GET /v1/users/{user_id}/devices`: the device ids a sender must encrypt to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct UserDevicesResponse {
    /// The user.
    pub user_id: UserId,
    /// Current device ids, oldest first.
    pub devices: Vec<DeviceId>,
}

impl UserDevicesResponse {
    /// Builds the response.
    pub fn new(user_id: UserId, devices: Vec<DeviceId>) -> Self {
        Self { user_id, devices }
    }
}

/// GET /v1/devices
#[utoipa::path(get, path = "/v1/devices", tag = "devices", security(("bearer" = [])),
    responses((status = 200, body = DevicesResponse), (status = 401, body = ErrorBody)))]
pub fn list_devices() {}

/// DELETE /v1/devices/{device_id}
///
/// Removes a device of the caller's: its token stops working at once, its live connection is
/// closed and its inbox is deleted.
#[utoipa::path(delete, path = "/v1/devices/{device_id}", tag = "devices", security(("bearer" = [])),
    params(("device_id" = String, Path, description = "The device to remove")),
    request_body = DeleteDeviceRequest,
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "`wrong_credentials`, `unknown_token`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    ))]
pub fn delete_device() {}

/// GET /v1/users/{user_id}/devices
#[utoipa::path(get, path = "/v1/users/{user_id}/devices", tag = "devices", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "The user, `@localpart:server`")),
    responses((status = 200, body = UserDevicesResponse), (status = 404, description = "`unknown_user`", body = ErrorBody)))]
pub fn user_devices() {}

crate::endpoint::endpoint! {
    /// `GET /v1/devices`: the caller's devices.
    ListDevices: Get "/v1/devices", AccessToken, () => DevicesResponse
}
crate::endpoint::endpoint! {
    /// `DELETE /v1/devices/{device_id}`: removes one of the caller's devices.
    DeleteDevice: Delete "/v1/devices/{device_id}", AccessToken, DeleteDeviceRequest => ()
}
crate::endpoint::endpoint! {
    /// `GET /v1/users/{user_id}/devices`: the devices a sender must encrypt to.
    UserDevices: Get "/v1/users/{user_id}/devices", AccessToken, () => UserDevicesResponse
}
