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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
