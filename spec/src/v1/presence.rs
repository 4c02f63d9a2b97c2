//! Presence: `GET /v1/presence/{user_id}`, `PUT /v1/presence/subscriptions`,
//! `GET /v1/presence/subscriptions`, `PUT /v1/account/privacy`.

use crate::{error::ErrorBody, v1::Timestamp, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Online state as a viewer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PresenceStatus {
    /// At least one device holds a heartbeating WebSocket.
    Online,
    /// No device is connected; `last_seen_ts` says since when (if the privacy setting allows).
    Offline,
    /// The user's privacy setting hides presence from this viewer.
    Hidden,
}

/// A user's presence, as one viewer may see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PresenceInfo {
    /// Whose presence.
    pub user: UserId,
    /// Online, offline or hidden.
    pub status: PresenceStatus,
    /// When the user was last online; absent when hidden or never seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ts: Option<Timestamp>,
}

impl PresenceInfo {
    /// Builds a presence description.
    pub fn new(user: UserId, status: PresenceStatus, last_seen_ts: Option<Timestamp>) -> Self {
        Self { user, status, last_seen_ts }
    }
}

/// Who may see a user's online state and last-seen time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone.
    #[default]
    Everyone,
    /// Only users this user has subscribed to (their contacts).
    Contacts,
    /// No one.
    Nobody,
}

impl Visibility {
    /// The setting as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Everyone => "everyone",
            Self::Contacts => "contacts",
            Self::Nobody => "nobody",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "everyone" => Some(Self::Everyone),
            "contacts" => Some(Self::Contacts),
            "nobody" => Some(Self::Nobody),
            _ => None,
        }
    }
}

/// Body of `PUT /v1/account/privacy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct PrivacySettings {
    /// Who sees online state and last-seen.
    pub last_seen: Visibility,
}

impl PrivacySettings {
    /// Builds the settings.
    pub fn new(last_seen: Visibility) -> Self {
        Self { last_seen }
    }
}

/// Body of `PUT /v1/presence/subscriptions`: adds these users to the caller's contacts, whose
/// presence the caller then receives live (a `presence` frame for each now, and on each change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SubscribeRequest {
    /// Users to subscribe to (at most 1,000 per request).
    pub users: Vec<UserId>,
}

impl SubscribeRequest {
    /// Builds the request.
    pub fn new(users: Vec<UserId>) -> Self {
        Self { users }
    }
}

/// Answer to the subscription endpoints: the caller's contacts with their presence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SubscriptionsResponse {
    /// One entry per contact.
    pub presence: Vec<PresenceInfo>,
}

impl SubscriptionsResponse {
    /// Builds the response.
    pub fn new(presence: Vec<PresenceInfo>) -> Self {
        Self { presence }
    }
}

/// GET /v1/presence/{user_id}
#[utoipa::path(get, path = "/v1/presence/{user_id}", tag = "presence", security(("bearer" = [])),
    params(("user_id" = String, Path, description = "The user")),
    responses((status = 200, body = PresenceInfo), (status = 404, description = "`unknown_user`", body = ErrorBody)))]
pub fn get_presence() {}

/// PUT /v1/presence/subscriptions
#[utoipa::path(put, path = "/v1/presence/subscriptions", tag = "presence", security(("bearer" = [])),
    request_body = SubscribeRequest,
    responses((status = 200, body = SubscriptionsResponse), (status = 404, description = "`unknown_user`", body = ErrorBody)))]
pub fn subscribe_presence() {}

/// GET /v1/presence/subscriptions
#[utoipa::path(get, path = "/v1/presence/subscriptions", tag = "presence", security(("bearer" = [])),
    responses((status = 200, body = SubscriptionsResponse)))]
pub fn list_subscriptions() {}

/// PUT /v1/account/privacy
#[utoipa::path(put, path = "/v1/account/privacy", tag = "presence", security(("bearer" = [])),
    request_body = PrivacySettings,
    responses((status = 204, description = "Saved"), (status = 400, body = ErrorBody)))]
pub fn set_privacy() {}

crate::endpoint::endpoint! {
    /// `GET /v1/presence/{user_id}`.
    GetPresence: Get "/v1/presence/{user_id}", AccessToken, () => PresenceInfo
}
crate::endpoint::endpoint! {
    /// `PUT /v1/presence/subscriptions`: adds contacts.
    SubscribePresence: Put "/v1/presence/subscriptions", AccessToken, SubscribeRequest => SubscriptionsResponse
}
crate::endpoint::endpoint! {
    /// `GET /v1/presence/subscriptions`: the caller's contacts with their presence.
    ListSubscriptions: Get "/v1/presence/subscriptions", AccessToken, () => SubscriptionsResponse
}
crate::endpoint::endpoint! {
    /// `PUT /v1/account/privacy`.
    SetPrivacy: Put "/v1/account/privacy", AccessToken, PrivacySettings => ()
}
