//! `POST /_parley/federation/v1/keys/claim` — prekey bundles of devices of the destination's
//! users, claimed by the origin for one of its users. Answer: [`crate::v1::keys::ClaimResponse`].
//! Prose: `spec/federation.md`, "Queries".

use crate::error::DeviceRef;
use crate::UserId;
use serde::{Deserialize, Serialize};

/// Body of `POST /_parley/federation/v1/keys/claim`.
///
/// One-time prekeys are limited per requesting server and per `requester` (per claimed device);
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
