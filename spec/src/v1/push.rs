//! Push: `PUT /v1/push`, `GET /v1/push`, `DELETE /v1/push` — where the server wakes this device
//! when an event arrives while it has no live connection. Prose: `spec/push.md`.
//!
//! The wake-up carries no content: no sender, no text, no counter of anything but itself; the
//! app, once woken, connects and reads its inbox. With `keys`, the body is encrypted to the
//! device (RFC 8291), so the push service sees only ciphertext.

use crate::error::ErrorBody;
use crate::Base64Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest endpoint URL accepted.
pub const MAX_ENDPOINT_LEN: usize = 1000;

/// The Web Push subscription keys of a device (RFC 8291).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PushSubscriptionKeys {
    /// The device's P-256 public key, uncompressed (65 bytes).
    pub p256dh: Base64Bytes,
    /// The auth secret (16 bytes).
    pub auth: Base64Bytes,
}

impl PushSubscriptionKeys {
    /// Builds the keys.
    pub fn new(p256dh: Vec<u8>, auth: Vec<u8>) -> Self {
        Self { p256dh: Base64Bytes(p256dh), auth: Base64Bytes(auth) }
    }
}

/// Body of `PUT /v1/push` and answer to `GET /v1/push`: the calling device's push endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Pusher {
    /// The push resource URL (UnifiedPush / Web Push endpoint): `https://`, at most
    /// [`MAX_ENDPOINT_LEN`] bytes.
    pub endpoint: String,
    /// Keys to encrypt the wake-up to the device; without them the body is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<PushSubscriptionKeys>,
}

impl Pusher {
    /// Builds a registration.
    pub fn new(endpoint: impl Into<String>, keys: Option<PushSubscriptionKeys>) -> Self {
        Self { endpoint: endpoint.into(), keys }
    }
}

/// The wake-up's plaintext (encrypted to the device when it registered keys): nothing about
/// what arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct WakeUp {
    /// Format version, 1.
    pub v: u32,
}

impl Default for WakeUp {
    fn default() -> Self {
        Self { v: 1 }
    }
}

/// Answer to `GET /v1/push/vapid`: the key this server signs its pushes with (RFC 8292), for
/// the app to give its push distributor (Web Push `applicationServerKey`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct VapidPublicKey {
    /// The P-256 public key, uncompressed (65 bytes), base64url without padding.
    pub public_key: String,
}

impl VapidPublicKey {
    /// Builds the answer.
    pub fn new(public_key: String) -> Self {
        Self { public_key }
    }
}

crate::endpoint::endpoint! {
    /// `GET /v1/push/vapid`: this server's VAPID public key.
    GetVapidKey: Get "/v1/push/vapid", AccessToken, () => VapidPublicKey
}
crate::endpoint::endpoint! {
    /// `PUT /v1/push`: sets the calling device's push endpoint (replacing any).
    SetPusher: Put "/v1/push", AccessToken, Pusher => ()
}
crate::endpoint::endpoint! {
    /// `GET /v1/push`: the calling device's push endpoint.
    GetPusher: Get "/v1/push", AccessToken, () => Pusher
}
crate::endpoint::endpoint! {
    /// `DELETE /v1/push`: removes the calling device's push endpoint.
    DeletePusher: Delete "/v1/push", AccessToken, () => ()
}

/// GET /v1/push/vapid
#[utoipa::path(get, path = "/v1/push/vapid", tag = "push", security(("bearer" = [])),
    responses((status = 200, body = VapidPublicKey)))]
pub fn get_vapid_key() {}

/// PUT /v1/push
#[utoipa::path(put, path = "/v1/push", tag = "push", security(("bearer" = [])), request_body = Pusher,
    responses((status = 204, description = "Registered"),
        (status = 400, description = "`bad_request`: not an https URL, too long, a private address, or bad keys", body = ErrorBody)))]
pub fn set_pusher() {}

/// GET /v1/push
#[utoipa::path(get, path = "/v1/push", tag = "push", security(("bearer" = [])),
    responses((status = 200, body = Pusher), (status = 404, description = "`not_found`: none registered (or the push service said it is gone)", body = ErrorBody)))]
pub fn get_pusher() {}

/// DELETE /v1/push
#[utoipa::path(delete, path = "/v1/push", tag = "push", security(("bearer" = [])),
    responses((status = 204, description = "Removed (or there was none)")))]
pub fn delete_pusher() {}
