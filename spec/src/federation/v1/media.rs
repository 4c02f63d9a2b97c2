//! GET /_parley/federation/v1/media/{media_id} — a stored file's ciphertext, for another server
//! whose user was sent a reference to it. Prose: `spec/media.md` §4.1.
//!
//! The requesting server fetches a file once, checks that its bytes hash to the media id (the
//! SHA-256 of the ciphertext) and serves it to its own users from its cache; users never reach
//! another homeserver directly.

use crate::error::ErrorBody;

crate::endpoint::endpoint! {
    /// `GET /_parley/federation/v1/media/{media_id}`: the whole ciphertext, streamed.
    GetMedia: Get "/_parley/federation/v1/media/{media_id}", ServerSignatures, () => ()
}

/// GET /_parley/federation/v1/media/{media_id}
#[utoipa::path(get, path = "/_parley/federation/v1/media/{media_id}", tag = "federation", security(("server_signatures" = [])),
    params(("media_id" = String, Path, description = "Lowercase hex SHA-256 of the ciphertext")),
    responses(
        (status = 200, description = "The whole ciphertext", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "`bad_request`: not a media id", body = ErrorBody),
        (status = 401, description = "see `send`", body = ErrorBody),
        (status = 404, description = "`not_found`: not stored here", body = ErrorBody)))]
pub fn get_media() {}
