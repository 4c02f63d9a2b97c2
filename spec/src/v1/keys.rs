//! The key directory: `POST /v1/keys/upload`, `PUT /v1/keys/device-list`,
//! `GET /v1/users/{user_id}/device-list`, `POST /v1/keys/claim`.
//!
//! The server stores and hands out key material; it cannot forge it. Every signature here is
//! ed25519 over the **canonical JSON** (sorted keys, no whitespace; see `parley_crypto::canonical`)
//! of the object *without* its `signature` field, prefixed by a domain-separation string:
//!
//! | object | signed by | prefix |
//! |---|---|---|
//! | [`DeviceKeys`] | the device's own signing key | `parley device keys v1\0` |
//! | [`SignedPrekey`] (and the last-resort prekey) | the device's signing key | `parley signed prekey v1\0` |
//! | [`SignedDeviceList`] | the user's identity key | `parley device list v1\0` |
//!
//! A user's identity key signs the device list, so a server cannot add a device to a user.

use crate::{error::ErrorBody, Base64Bytes, DeviceId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A device's long-term public keys, self-signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeviceKeys {
    /// Owner.
    pub user_id: UserId,
    /// The device.
    pub device_id: DeviceId,
    /// ed25519 public key (32 bytes) that signs this device's prekeys.
    pub signing_key: Base64Bytes,
    /// x25519 public key (32 bytes): the device's identity key in X3DH.
    pub identity_key: Base64Bytes,
    /// ed25519 signature (64 bytes) by `signing_key`.
    pub signature: Base64Bytes,
}

impl DeviceKeys {
    /// Builds device keys.
    pub fn new(user_id: UserId, device_id: DeviceId, signing_key: Vec<u8>, identity_key: Vec<u8>, signature: Vec<u8>) -> Self {
        Self {
            user_id,
            device_id,
            signing_key: signing_key.into(),
            identity_key: identity_key.into(),
            signature: signature.into(),
        }
    }
}

/// An x25519 prekey signed by the device's signing key (the signed prekey, or the
/// last-resort prekey that is handed out when one-time prekeys run out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SignedPrekey {
    /// Chosen by the device; unique among its prekeys.
    pub key_id: u32,
    /// x25519 public key (32 bytes).
    pub public_key: Base64Bytes,
    /// ed25519 signature (64 bytes) by the device's signing key.
    pub signature: Base64Bytes,
}

impl SignedPrekey {
    /// Builds a signed prekey.
    pub fn new(key_id: u32, public_key: Vec<u8>, signature: Vec<u8>) -> Self {
        Self { key_id, public_key: public_key.into(), signature: signature.into() }
    }
}

/// A one-time x25519 prekey (unsigned; handed out at most once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct OneTimePrekey {
    /// Chosen by the device; unique among its prekeys.
    pub key_id: u32,
    /// x25519 public key (32 bytes).
    pub public_key: Base64Bytes,
}

impl OneTimePrekey {
    /// Builds a one-time prekey.
    pub fn new(key_id: u32, public_key: Vec<u8>) -> Self {
        Self { key_id, public_key: public_key.into() }
    }
}

/// Body of `POST /v1/keys/upload`. Every part is optional: a device uploads its keys once,
/// then a new signed prekey now and then, and more one-time prekeys when told to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UploadKeysRequest {
    /// The device's keys (must name the calling device; cannot change once set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_keys: Option<DeviceKeys>,
    /// Replaces the current signed prekey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_prekey: Option<SignedPrekey>,
    /// Replaces the last-resort prekey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resort_prekey: Option<SignedPrekey>,
    /// Added to the pool of one-time prekeys (at most 100 per request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub one_time_prekeys: Vec<OneTimePrekey>,
}

/// Answer to `POST /v1/keys/upload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct UploadKeysResponse {
    /// Unclaimed one-time prekeys the server holds for this device now.
    pub one_time_prekey_count: u32,
}

impl UploadKeysResponse {
    /// Builds the answer.
    pub fn new(one_time_prekey_count: u32) -> Self {
        Self { one_time_prekey_count }
    }
}

/// One device in a signed device list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DeviceListEntry {
    /// The device.
    pub device_id: DeviceId,
    /// Its ed25519 signing key (as in its [`DeviceKeys`]).
    pub signing_key: Base64Bytes,
    /// Its x25519 identity key (as in its [`DeviceKeys`]).
    pub identity_key: Base64Bytes,
}

impl DeviceListEntry {
    /// Builds an entry.
    pub fn new(device_id: DeviceId, signing_key: Vec<u8>, identity_key: Vec<u8>) -> Self {
        Self { device_id, signing_key: signing_key.into(), identity_key: identity_key.into() }
    }
}

/// A user's devices, signed by the user's identity key. `version` only ever grows; clients
/// reject a list whose version is lower than one they have seen (rollback).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SignedDeviceList {
    /// Owner.
    pub user_id: UserId,
    /// Strictly increasing with each change.
    pub version: u64,
    /// The user's ed25519 identity public key (32 bytes).
    pub identity_key: Base64Bytes,
    /// The devices, sorted by `device_id`.
    pub devices: Vec<DeviceListEntry>,
    /// ed25519 signature (64 bytes) by `identity_key`.
    pub signature: Base64Bytes,
}

impl SignedDeviceList {
    /// Builds a device list.
    pub fn new(user_id: UserId, version: u64, identity_key: Vec<u8>, devices: Vec<DeviceListEntry>, signature: Vec<u8>) -> Self {
        Self { user_id, version, identity_key: identity_key.into(), devices, signature: signature.into() }
    }
}

/// Body of `POST /v1/keys/claim`: one prekey bundle per named device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The devices to claim a bundle for (at most 100).
    pub devices: Vec<crate::error::DeviceRef>,
}

impl ClaimRequest {
    /// Builds a claim.
    pub fn new(devices: Vec<crate::error::DeviceRef>) -> Self {
        Self { devices }
    }
}

/// What a sender needs to start a session with one device (X3DH).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PrekeyBundle {
    /// The device's keys.
    pub device_keys: DeviceKeys,
    /// Its current signed prekey.
    pub signed_prekey: SignedPrekey,
    /// A one-time prekey, handed out to this claimer only; absent when they ran out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_prekey: Option<OneTimePrekey>,
    /// With no one-time prekey left: the last-resort prekey, used in its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resort_prekey: Option<SignedPrekey>,
}

impl PrekeyBundle {
    /// Builds a bundle.
    pub fn new(
        device_keys: DeviceKeys,
        signed_prekey: SignedPrekey,
        one_time_prekey: Option<OneTimePrekey>,
        last_resort_prekey: Option<SignedPrekey>,
    ) -> Self {
        Self { device_keys, signed_prekey, one_time_prekey, last_resort_prekey }
    }
}

/// Answer to `POST /v1/keys/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClaimResponse {
    /// One bundle per claimed device that has uploaded keys.
    pub bundles: Vec<PrekeyBundle>,
    /// Claimed devices without uploaded keys (or unknown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<crate::error::DeviceRef>,
}

impl ClaimResponse {
    /// Builds the answer.
    pub fn new(bundles: Vec<PrekeyBundle>, missing: Vec<crate::error::DeviceRef>) -> Self {
        Self { bundles, missing }
    }
}

/// Domain-separation prefix of [`DeviceKeys`] signatures.
pub const DEVICE_KEYS_CONTEXT: &[u8] = b"parley device keys v1\0";
/// Domain-separation prefix of [`SignedPrekey`] signatures.
pub const SIGNED_PREKEY_CONTEXT: &[u8] = b"parley signed prekey v1\0";
/// Domain-separation prefix of [`SignedDeviceList`] signatures.
pub const DEVICE_LIST_CONTEXT: &[u8] = b"parley device list v1\0";
/// Most one-time prekeys per upload.
pub const MAX_ONE_TIME_PREKEYS_PER_UPLOAD: usize = 100;
/// Most devices per claim.
pub const MAX_CLAIM_DEVICES: usize = 100;

/// POST /v1/keys/upload
#[utoipa::path(post, path = "/v1/keys/upload", tag = "keys", security(("bearer" = [])), request_body = UploadKeysRequest,
    responses(
        (status = 200, body = UploadKeysResponse),
        (status = 400, description = "`bad_request`: bad sizes, keys or signatures; prekeys before device keys", body = ErrorBody),
        (status = 403, description = "`forbidden`: keys of another device, or changing device keys", body = ErrorBody),
    ))]
pub fn upload_keys() {}

/// PUT /v1/keys/device-list
#[utoipa::path(put, path = "/v1/keys/device-list", tag = "keys", security(("bearer" = [])), request_body = SignedDeviceList,
    responses(
        (status = 204, description = "Stored"),
        (status = 400, description = "`bad_request`: badly signed, unsorted, or version not newer", body = ErrorBody),
        (status = 403, description = "`forbidden`: another user's list", body = ErrorBody),
    ))]
pub fn put_device_list() {}

/// GET /v1/users/{user_id}/device-list
#[utoipa::path(get, path = "/v1/users/{user_id}/device-list", tag = "keys", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "The user")),
    responses((status = 200, body = SignedDeviceList), (status = 404, description = "`not_found`: none published", body = ErrorBody)))]
pub fn get_device_list() {}

/// POST /v1/keys/claim
#[utoipa::path(post, path = "/v1/keys/claim", tag = "keys", security(("bearer" = [])), request_body = ClaimRequest,
    responses((status = 200, body = ClaimResponse), (status = 400, body = ErrorBody)))]
pub fn claim_keys() {}

crate::endpoint::endpoint! {
    /// `POST /v1/keys/upload`: device keys and prekeys.
    UploadKeys: Post "/v1/keys/upload", AccessToken, UploadKeysRequest => UploadKeysResponse
}
crate::endpoint::endpoint! {
    /// `PUT /v1/keys/device-list`: publishes the user's signed device list.
    PutDeviceList: Put "/v1/keys/device-list", AccessToken, SignedDeviceList => ()
}
crate::endpoint::endpoint! {
    /// `GET /v1/users/{user_id}/device-list`.
    GetDeviceList: Get "/v1/users/{user_id}/device-list", AccessToken, () => SignedDeviceList
}
crate::endpoint::endpoint! {
    /// `POST /v1/keys/claim`: one prekey bundle per device.
    ClaimKeys: Post "/v1/keys/claim", AccessToken, ClaimRequest => ClaimResponse
}
