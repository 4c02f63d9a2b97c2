//! Error codes and the JSON error body. Every error a client sees, over HTTP or in a WebSocket
//! `error` frame, has a stable [`ErrorCode`]; the message is for humans and may change.

use crate::ids::{DeviceId, UserId};
use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code. Clients branch on these; they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON or does not match the expected shape.
    BadJson,
    /// A request parameter is invalid (the message says which).
    BadRequest,
    /// A WebSocket frame is malformed (not JSON, wrong shape, binary when text is expected).
    BadFrame,
    /// A WebSocket frame has an unknown `type`.
    UnknownFrame,
    /// The request, frame or an envelope is larger than the server's limit.
    TooLarge,
    /// No access token was given.
    MissingToken,
    /// The access token is unknown, was revoked, or its device was removed.
    UnknownToken,
    /// Username or password is wrong.
    WrongCredentials,
    /// The authenticated device may not do this.
    Forbidden,
    /// The resource does not exist.
    NotFound,
    /// The user id is already registered.
    UserTaken,
    /// The username is not a valid localpart.
    InvalidUsername,
    /// The password does not meet the server's rules.
    InvalidPassword,
    /// Registration is closed on this server.
    RegistrationClosed,
    /// Registration needs a valid registration token, and none or a wrong one was given.
    InvalidRegistrationToken,
    /// The user already has the maximum number of devices.
    TooManyDevices,
    /// A send did not target exactly the current devices; the body lists the difference.
    DevicesMismatch,
    /// The target user does not exist.
    UnknownUser,
    /// Too many requests; retry after `retry_after_ms`.
    RateLimited,
    /// The server is shutting down or overloaded; retry later.
    Unavailable,
    /// Too many password hashes (register, login, device removal) are in progress; retry after
    /// `retry_after_ms`.
    ServerBusy,
    /// A bug or an unexpected failure on the server. Details are in the server's log.
    Internal,
    /// Federation: the request carries no `Authorization: Parley` signature.
    Unsigned,
    /// Federation: the `Authorization` header does not parse.
    BadAuthorization,
    /// Federation: the signature does not verify with the origin's key.
    BadSignature,
    /// Federation: the request was signed for another server.
    WrongDestination,
    /// Federation: the request's timestamp is outside the clock skew window.
    StaleRequest,
    /// Federation: this exact signed request was seen before.
    ReplayedRequest,
    /// Federation: the origin's signing key could not be fetched or does not include the key id.
    UnknownServerKey,
    /// Federation: this server does not federate with that server (allow/deny lists).
    ServerDenied,
    /// The user's homeserver could not be reached; retry later.
    RemoteUnavailable,
    /// An uploaded KeyPackage failed a check (the message names it): it does not parse or verify,
    /// uses another ciphersuite, its lifetime is not current or too long, its leaf does not name
    /// the uploading device or carry its signing key, or its `last_resort` extension is not
    /// where it belongs.
    BadKeypackage,
    /// Groups: a commit or proposal for an epoch that is not the group's current one (another
    /// commit won it); `current_epoch` names the hub's epoch. Catch up, then rebuild on top.
    EpochConflict,
    /// Groups: the sending device is not a member of the group.
    NotAMember,
    /// Groups: the hub has no such group.
    UnknownGroup,
    /// Groups: the group id is taken.
    GroupExists,
    /// Groups: the commit would take the group past its member limit.
    GroupFull,
    /// Groups: an MLS message does not parse, is not of this group, does not verify against the
    /// group's public state, or breaks the wire-format rules (the message says which).
    BadMlsMessage,
    /// Groups: group fan-out from a server that is not the group's hub.
    NotTheHub,
    /// Groups: a commit leaves out proposals the hub accepted in this epoch (a member's request
    /// to leave). Read the group stream, then commit again: the new commit includes them.
    MissingProposals,
    /// Media: the upload would take the user past their storage quota (`GET /v1/media/config`
    /// tells the quota and what is used).
    QuotaExceeded,
    /// Media: an upload URL whose signature does not verify, or that expired; ask
    /// `GET /v1/media/uploads/{upload_id}` for fresh ones.
    UploadUrlInvalid,
    /// Media: an upload URL used a second time (the part was received already).
    UploadUrlUsed,
    /// Media: completing an upload with parts still missing.
    UploadIncomplete,
    /// Media: the uploaded bytes do not hash to the declared SHA-256; the upload is dropped.
    MediaHashMismatch,
    /// Media: the requested byte range lies outside the file.
    RangeNotSatisfiable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::BadRequest => "bad_request",
            Self::BadFrame => "bad_frame",
            Self::UnknownFrame => "unknown_frame",
            Self::TooLarge => "too_large",
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::WrongCredentials => "wrong_credentials",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::UserTaken => "user_taken",
            Self::InvalidUsername => "invalid_username",
            Self::InvalidPassword => "invalid_password",
            Self::RegistrationClosed => "registration_closed",
            Self::InvalidRegistrationToken => "invalid_registration_token",
            Self::TooManyDevices => "too_many_devices",
            Self::DevicesMismatch => "devices_mismatch",
            Self::UnknownUser => "unknown_user",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::ServerBusy => "server_busy",
            Self::Internal => "internal",
            Self::Unsigned => "unsigned",
            Self::BadAuthorization => "bad_authorization",
            Self::BadSignature => "bad_signature",
            Self::WrongDestination => "wrong_destination",
            Self::StaleRequest => "stale_request",
            Self::ReplayedRequest => "replayed_request",
            Self::UnknownServerKey => "unknown_server_key",
            Self::ServerDenied => "server_denied",
            Self::RemoteUnavailable => "remote_unavailable",
            Self::BadKeypackage => "bad_keypackage",
            Self::EpochConflict => "epoch_conflict",
            Self::NotAMember => "not_a_member",
            Self::UnknownGroup => "unknown_group",
            Self::GroupExists => "group_exists",
            Self::GroupFull => "group_full",
            Self::BadMlsMessage => "bad_mls_message",
            Self::NotTheHub => "not_the_hub",
            Self::MissingProposals => "missing_proposals",
            Self::QuotaExceeded => "quota_exceeded",
            Self::UploadUrlInvalid => "upload_url_invalid",
            Self::UploadUrlUsed => "upload_url_used",
            Self::UploadIncomplete => "upload_incomplete",
            Self::MediaHashMismatch => "media_hash_mismatch",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
        }
    }

    /// The HTTP status that goes with this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadJson | Self::BadRequest | Self::BadFrame | Self::UnknownFrame => 400,
            Self::InvalidUsername | Self::InvalidPassword => 400,
            Self::TooLarge => 413,
            Self::MissingToken | Self::UnknownToken | Self::WrongCredentials => 401,
            Self::Forbidden | Self::RegistrationClosed | Self::InvalidRegistrationToken => 403,
            Self::TooManyDevices => 403,
            Self::NotFound | Self::UnknownUser => 404,
            Self::UserTaken | Self::DevicesMismatch => 409,
            Self::RateLimited => 429,
            Self::Unavailable | Self::ServerBusy => 503,
            Self::Internal => 500,
            Self::Unsigned | Self::BadAuthorization | Self::BadSignature | Self::WrongDestination => 401,
            Self::StaleRequest | Self::ReplayedRequest | Self::UnknownServerKey => 401,
            Self::ServerDenied => 403,
            Self::RemoteUnavailable => 502,
            Self::BadKeypackage | Self::BadMlsMessage => 400,
            Self::EpochConflict | Self::GroupExists | Self::MissingProposals => 409,
            Self::NotAMember | Self::GroupFull | Self::NotTheHub => 403,
            Self::UnknownGroup => 404,
            Self::QuotaExceeded | Self::UploadUrlInvalid => 403,
            Self::UploadUrlUsed | Self::UploadIncomplete => 409,
            Self::MediaHashMismatch => 400,
            Self::RangeNotSatisfiable => 416,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON body of every error response, and the payload of a WebSocket `error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct ErrorBody {
    /// Stable error code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// With `rate_limited` and `server_busy`: how long to wait before retrying, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// With `devices_mismatch`: which devices were missing or should not have been targeted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<DevicesMismatch>,
    /// With `epoch_conflict`: the group's current epoch at the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_epoch: Option<u64>,
}

impl ErrorBody {
    /// An error body with just a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None, devices: None, current_epoch: None }
    }
}

/// The difference between the devices a send targeted and the current devices.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct DevicesMismatch {
    /// Devices that exist but got no envelope.
    pub missing: Vec<DeviceRef>,
    /// Targeted devices that do not exist, appear twice, or are the sending device itself.
    pub extra: Vec<DeviceRef>,
}

impl DevicesMismatch {
    /// Builds a mismatch report.
    pub fn new(missing: Vec<DeviceRef>, extra: Vec<DeviceRef>) -> Self {
        Self { missing, extra }
    }
}

/// A device of a user (device ids are unique per user only).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[non_exhaustive]
pub struct DeviceRef {
    /// The owner.
    pub user: UserId,
    /// The device.
    pub device: DeviceId,
}

impl DeviceRef {
    /// Builds a device reference.
    pub fn new(user: UserId, device: DeviceId) -> Self {
        Self { user, device }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_str() {
        for code in
            [ErrorCode::BadJson, ErrorCode::DevicesMismatch, ErrorCode::RateLimited, ErrorCode::ServerBusy, ErrorCode::Internal]
        {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code.as_str()));
        }
    }
}
