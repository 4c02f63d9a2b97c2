//! `POST /_parley/federation/v1/keys/claim` — prekey bundles of devices of the destination's
//! users, claimed by the origin for one of its users. Answer: [`crate::v1::keys::ClaimResponse`].
//! Prose: `spec/federation.md`, "Queries".
//!
//! `POST /_parley/federation/v1/keypackages/claim` — the same for MLS KeyPackages, with the same
//! body and limits. Answer: [`crate::v1::keypackages::ClaimKeyPackagesResponse`]. Prose:
//! `spec/groups.md` §5.

use crate::error::DeviceRef;
use crate::UserId;
use serde::{Deserialize, Serialize};

/// Body of `POST /_parley/federation/v1/keys/claim` and
/// `POST /_parley/federation/v1/keypackages/claim`.
///
/// One-time prekeys (and one-time KeyPackages) are limited per requesting server and per `requester` (per claimed device);
/// past a limit the bundle carries the device's last-resort prekey instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// The user of the origin on whose behalf the bundles are claimed.
    pub requester: UserId,
    /// The devices to claim a bundle for (at most [`crate::v1::keys::MAX_CLAIM_DEVICES`]).
    pub devices: Vec<DeviceRef>,
}

impl ClaimRequest {
    /// Builds a claim.
    pub fn new(requester: UserId, devices: Vec<DeviceRef>) -> Self {
        Self { requester, devices }
    }
}

/// POST /_parley/federation/v1/keys/claim
#[utoipa::path(post, path = "/_parley/federation/v1/keys/claim", tag = "federation", security(("server_signatures" = [])),
    request_body = ClaimRequest,
    responses(
        (status = 200, body = crate::v1::keys::ClaimResponse),
        (status = 400, description = "`bad_json`, `bad_request`", body = crate::ErrorBody),
        (status = 401, description = "see `send`", body = crate::ErrorBody),
        (status = 403, description = "`server_denied`, `forbidden` (`requester` is not a user of the origin)", body = crate::ErrorBody),
    ))]
pub fn claim_keys() {}

crate::endpoint::endpoint! {
    /// `POST /_parley/federation/v1/keys/claim`.
    ClaimKeys: Post "/_parley/federation/v1/keys/claim", ServerSignatures, ClaimRequest => crate::v1::keys::ClaimResponse
}

/// POST /_parley/federation/v1/keypackages/claim
#[utoipa::path(post, path = "/_parley/federation/v1/keypackages/claim", tag = "federation", security(("server_signatures" = [])),
    request_body = ClaimRequest,
    responses(
        (status = 200, body = crate::v1::keypackages::ClaimKeyPackagesResponse),
        (status = 400, description = "`bad_json`, `bad_request`", body = crate::ErrorBody),
        (status = 401, description = "see `send`", body = crate::ErrorBody),
        (status = 403, description = "`server_denied`, `forbidden` (`requester` is not a user of the origin)", body = crate::ErrorBody),
    ))]
pub fn claim_keypackages() {}

crate::endpoint::endpoint! {
    /// `POST /_parley/federation/v1/keypackages/claim`: one KeyPackage per device, one-time ones
    /// limited per requesting server and user as one-time prekeys are.
    ClaimKeyPackages: Post "/_parley/federation/v1/keypackages/claim", ServerSignatures, ClaimRequest => crate::v1::keypackages::ClaimKeyPackagesResponse
}
