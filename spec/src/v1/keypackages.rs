//! The KeyPackage directory: `POST /v1/keypackages` (upload) and `POST /v1/keypackages/claim`.
//! Prose: `spec/groups.md`, section 4 "KeyPackages".
//!
//! A KeyPackage is what a device publishes so that others can add it to an MLS group. It travels
//! as base64 of its TLS-serialized `MLSMessage`. The server verifies each one on upload (it
//! parses, ciphersuite 0x0003, signatures, lifetime, and that its leaf names the uploading device
//! with that device's ed25519 signing key) and hands out each one-time KeyPackage at most once;
//! the device's last-resort KeyPackage is handed out, repeatedly, only when no one-time
//! KeyPackage is left. Clients check every KeyPackage against the owner's signed device list
//! again: the server is not trusted.

use crate::error::{DeviceRef, ErrorBody};
use crate::{Base64Bytes, DeviceId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most one-time KeyPackages per upload.
pub const MAX_KEYPACKAGES_PER_UPLOAD: usize = 100;

/// Body of `POST /v1/keypackages`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UploadKeyPackagesRequest {
    /// One-time KeyPackages, added to the device's pool (at most
    /// [`MAX_KEYPACKAGES_PER_UPLOAD`]; none may carry the `last_resort` extension).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_packages: Vec<Base64Bytes>,
    /// A KeyPackage with the `last_resort` extension; replaces the device's previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resort: Option<Base64Bytes>,
}

impl UploadKeyPackagesRequest {
    /// Builds an upload.
    pub fn new(key_packages: Vec<Vec<u8>>, last_resort: Option<Vec<u8>>) -> Self {
        Self { key_packages: key_packages.into_iter().map(Base64Bytes).collect(), last_resort: last_resort.map(Base64Bytes) }
    }
}

/// Answer to `POST /v1/keypackages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct UploadKeyPackagesResponse {
    /// Unclaimed one-time KeyPackages the server holds for this device now.
    pub count: u32,
}

impl UploadKeyPackagesResponse {
    /// Builds the answer.
    pub fn new(count: u32) -> Self {
        Self { count }
    }
}

/// Body of `POST /v1/keypackages/claim`: one KeyPackage per named device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClaimKeyPackagesRequest {
    /// The devices to claim a KeyPackage of (at most [`crate::v1::keys::MAX_CLAIM_DEVICES`]).
    pub devices: Vec<DeviceRef>,
}

impl ClaimKeyPackagesRequest {
    /// Builds a claim.
    pub fn new(devices: Vec<DeviceRef>) -> Self {
        Self { devices }
    }
}

/// One claimed KeyPackage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClaimedKeyPackage {
    /// Its owner.
    pub user: UserId,
    /// Its device.
    pub device: DeviceId,
    /// The KeyPackage (base64 of its TLS-serialized `MLSMessage`): a one-time one, handed out to
    /// this claimer only, or the device's last-resort one when none is left.
    pub key_package: Base64Bytes,
}

impl ClaimedKeyPackage {
    /// Builds an entry.
    pub fn new(user: UserId, device: DeviceId, key_package: Vec<u8>) -> Self {
        Self { user, device, key_package: key_package.into() }
    }
}

/// Answer to `POST /v1/keypackages/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct ClaimKeyPackagesResponse {
    /// One KeyPackage per claimed device that has one.
    pub key_packages: Vec<ClaimedKeyPackage>,
    /// Claimed devices with no KeyPackage (none uploaded, all expired, or unknown devices).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<DeviceRef>,
}

impl ClaimKeyPackagesResponse {
    /// Builds the answer.
    pub fn new(key_packages: Vec<ClaimedKeyPackage>, missing: Vec<DeviceRef>) -> Self {
        Self { key_packages, missing }
    }
}

/// POST /v1/keypackages
#[utoipa::path(post, path = "/v1/keypackages", tag = "keypackages", security(("bearer" = [])),
    request_body = UploadKeyPackagesRequest,
    responses(
        (status = 200, body = UploadKeyPackagesResponse),
        (status = 400, description = "`bad_keypackage` (the message names the check that failed), `bad_request` (too many, or device keys not uploaded yet), `bad_json`", body = ErrorBody),
        (status = 413, description = "`too_large`", body = ErrorBody),
    ))]
pub fn upload_keypackages() {}

/// POST /v1/keypackages/claim
#[utoipa::path(post, path = "/v1/keypackages/claim", tag = "keypackages", security(("bearer" = [])),
    request_body = ClaimKeyPackagesRequest,
    responses(
        (status = 200, body = ClaimKeyPackagesResponse),
        (status = 400, description = "`bad_request`: too many devices", body = ErrorBody),
    ))]
pub fn claim_keypackages() {}

crate::endpoint::endpoint! {
    /// `POST /v1/keypackages`: one-time and last-resort KeyPackages of the calling device.
    UploadKeyPackages: Post "/v1/keypackages", AccessToken, UploadKeyPackagesRequest => UploadKeyPackagesResponse
}
crate::endpoint::endpoint! {
    /// `POST /v1/keypackages/claim`: one KeyPackage per device.
    ClaimKeyPackages: Post "/v1/keypackages/claim", AccessToken, ClaimKeyPackagesRequest => ClaimKeyPackagesResponse
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_is_base64_and_leaves_out_what_is_absent() {
        let upload = UploadKeyPackagesRequest::new(vec![vec![1, 2, 3]], None);
        assert_eq!(serde_json::to_string(&upload).unwrap(), r#"{"key_packages":["AQID"]}"#);
        let parsed: UploadKeyPackagesRequest = serde_json::from_str(r#"{"last_resort":"AQID"}"#).unwrap();
        assert_eq!(parsed, UploadKeyPackagesRequest::new(vec![], Some(vec![1, 2, 3])));
        assert!(serde_json::from_str::<UploadKeyPackagesRequest>(r#"{"key_packages":["not base64!"]}"#).is_err());
    }
}
