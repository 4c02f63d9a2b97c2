//! Media (attachments): `GET /v1/media/config`, `POST /v1/media/uploads`,
//! `GET /v1/media/uploads/{upload_id}`, `PUT /v1/media/uploads/{upload_id}/parts/{part}`
//! (a signed, single-use upload URL), `POST /v1/media/uploads/{upload_id}/complete` and
//! `GET /v1/media/{server}/{media_id}`. Prose: `spec/media.md`.
//!
//! The server only ever holds ciphertext: clients encrypt a file with a random key
//! (`parley-crypto::media`) and send the key, the ciphertext's SHA-256 and the media id inside
//! the end-to-end encrypted message. A stored file is named by the SHA-256 of its ciphertext
//! (its *media id*, 64 lowercase hex digits), so a second upload of the same ciphertext (a
//! forward) stores nothing new, and any server can check what it fetched.

use crate::error::ErrorBody;
use crate::{Base64Bytes, ServerName, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Length of a media id: lowercase hex of a SHA-256.
pub const MEDIA_ID_LEN: usize = 64;

/// A media id (the ciphertext's SHA-256) as lowercase hex.
pub fn media_id(sha256: &[u8; 32]) -> String {
    sha256.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 a media id names, or `None` when it is not 64 lowercase hex digits.
pub fn parse_media_id(id: &str) -> Option<[u8; 32]> {
    if id.len() != MEDIA_ID_LEN || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Answer to `GET /v1/media/config`: this server's limits and the caller's use of its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct MediaConfig {
    /// Largest file (ciphertext bytes) the server accepts.
    pub max_file_bytes: u64,
    /// Size of every upload part but the last.
    pub part_bytes: u64,
    /// Bytes of media a user may hold (uploads in progress included).
    pub quota_bytes: u64,
    /// Bytes the caller holds now.
    pub used_bytes: u64,
}

impl MediaConfig {
    /// Builds the answer.
    pub fn new(max_file_bytes: u64, part_bytes: u64, quota_bytes: u64, used_bytes: u64) -> Self {
        Self { max_file_bytes, part_bytes, quota_bytes, used_bytes }
    }
}

/// Body of `POST /v1/media/uploads`: the ciphertext the client is about to upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CreateUploadRequest {
    /// Ciphertext bytes (at least 1, at most `max_file_bytes`).
    pub size: u64,
    /// SHA-256 of the whole ciphertext (32 bytes).
    pub sha256: Base64Bytes,
}

impl CreateUploadRequest {
    /// Builds the request.
    pub fn new(size: u64, sha256: [u8; 32]) -> Self {
        Self { size, sha256: Base64Bytes(sha256.to_vec()) }
    }
}

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct MediaInfo {
    /// The server that stores it (the uploader's homeserver).
    pub server: ServerName,
    /// Its media id: lowercase hex of the ciphertext's SHA-256.
    pub media_id: String,
    /// Ciphertext bytes.
    pub size: u64,
}

impl MediaInfo {
    /// Builds the description.
    pub fn new(server: ServerName, media_id: String, size: u64) -> Self {
        Self { server, media_id, size }
    }
}

/// Where one part of an upload goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct PartTarget {
    /// Part number, from 1.
    pub part: u32,
    /// Offset of the part in the ciphertext.
    pub offset: u64,
    /// Its exact length in bytes.
    pub size: u64,
    /// Where to `PUT` it: an absolute URL, or a path relative to the homeserver's base URL.
    /// Time-limited and single-use; it carries its own authorization (send no access token).
    pub url: String,
}

impl PartTarget {
    /// Builds a target.
    pub fn new(part: u32, offset: u64, size: u64, url: String) -> Self {
        Self { part, offset, size, url }
    }
}

/// Whether an upload still waits for parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UploadStatus {
    /// Parts are missing or the upload was not completed yet.
    Pending,
    /// The file is stored (`media` says where); nothing needs uploading.
    Complete,
}

/// Answer to `POST /v1/media/uploads` and `GET /v1/media/uploads/{upload_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct UploadState {
    /// `complete` when the server already stores this ciphertext (a forward, or an upload
    /// completed before): the caller now holds a reference to it and uploads nothing.
    pub status: UploadStatus,
    /// The stored file, once complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaInfo>,
    /// The upload's id, while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Size of every part but the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_bytes: Option<u64>,
    /// Parts the server holds already.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub received: Vec<u32>,
    /// Fresh targets for the parts still missing, in order (may be sent in parallel).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartTarget>,
    /// When the upload is dropped if not completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ts: Option<Timestamp>,
}

impl UploadState {
    /// A file the server stores.
    pub fn complete(media: MediaInfo) -> Self {
        Self {
            status: UploadStatus::Complete,
            media: Some(media),
            upload_id: None,
            part_bytes: None,
            received: Vec::new(),
            parts: Vec::new(),
            expires_ts: None,
        }
    }

    /// An upload waiting for parts.
    pub fn pending(
        upload_id: String,
        part_bytes: u64,
        received: Vec<u32>,
        parts: Vec<PartTarget>,
        expires_ts: Timestamp,
    ) -> Self {
        Self {
            status: UploadStatus::Pending,
            media: None,
            upload_id: Some(upload_id),
            part_bytes: Some(part_bytes),
            received,
            parts,
            expires_ts: Some(expires_ts),
        }
    }
}

/// A part uploaded straight to an S3 store, as the store acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct UploadedPart {
    /// Part number, from 1.
    pub part: u32,
    /// The `ETag` header of the store's answer to the part's `PUT`.
    pub etag: String,
}

impl UploadedPart {
    /// Builds the description.
    pub fn new(part: u32, etag: String) -> Self {
        Self { part, etag }
    }
}

/// Body of `POST /v1/media/uploads/{upload_id}/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CompleteUploadRequest {
    /// With an S3 store (part URLs that are not this server's): every part with its `ETag`.
    /// Empty with the server's own part URLs (it knows what it received).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<UploadedPart>,
}

impl CompleteUploadRequest {
    /// Builds the request.
    pub fn new(parts: Vec<UploadedPart>) -> Self {
        Self { parts }
    }
}

/// Query of a signed part URL (`PUT /v1/media/uploads/{upload_id}/parts/{part}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[non_exhaustive]
pub struct PartUrlQuery {
    /// Expiry of the URL (ms since the epoch).
    pub expires: u64,
    /// The server's signature of the URL (base64url, no padding).
    pub sig: String,
}

crate::endpoint::endpoint! {
    /// `GET /v1/media/config`: limits and the caller's quota use.
    GetMediaConfig: Get "/v1/media/config", AccessToken, () => MediaConfig
}
crate::endpoint::endpoint! {
    /// `POST /v1/media/uploads`: starts an upload, or takes a reference to a stored file.
    CreateUpload: Post "/v1/media/uploads", AccessToken, CreateUploadRequest => UploadState
}
crate::endpoint::endpoint! {
    /// `GET /v1/media/uploads/{upload_id}`: what is received; fresh targets for the rest.
    GetUpload: Get "/v1/media/uploads/{upload_id}", AccessToken, () => UploadState
}
crate::endpoint::endpoint! {
    /// `PUT /v1/media/uploads/{upload_id}/parts/{part}`: one part's bytes, to a signed URL.
    PutUploadPart: Put "/v1/media/uploads/{upload_id}/parts/{part}", SignedUrl, PartUrlQuery => ()
}
crate::endpoint::endpoint! {
    /// `POST /v1/media/uploads/{upload_id}/complete`: checks size and hash, stores the file.
    CompleteUpload: Post "/v1/media/uploads/{upload_id}/complete", AccessToken, CompleteUploadRequest => MediaInfo
}
crate::endpoint::endpoint! {
    /// `GET /v1/media/{server}/{media_id}`: the ciphertext, streamed; `Range` supported.
    DownloadMedia: Get "/v1/media/{server}/{media_id}", AccessToken, () => ()
}

/// GET /v1/media/config
#[utoipa::path(get, path = "/v1/media/config", tag = "media", security(("bearer" = [])),
    responses((status = 200, body = MediaConfig)))]
pub fn get_media_config() {}

/// POST /v1/media/uploads
#[utoipa::path(post, path = "/v1/media/uploads", tag = "media", security(("bearer" = [])),
    request_body = CreateUploadRequest,
    responses(
        (status = 200, description = "The ciphertext is stored already (`status: complete`)", body = UploadState),
        (status = 201, description = "Upload started (`status: pending`)", body = UploadState),
        (status = 400, description = "`bad_request`: size 0 or a hash that is not 32 bytes", body = ErrorBody),
        (status = 413, description = "`too_large`: above `max_file_bytes`", body = ErrorBody),
        (status = 403, description = "`quota_exceeded`", body = ErrorBody),
        (status = 429, description = "`rate_limited`: too many uploads in progress", body = ErrorBody)))]
pub fn create_upload() {}

/// GET /v1/media/uploads/{upload_id}
#[utoipa::path(get, path = "/v1/media/uploads/{upload_id}", tag = "media", security(("bearer" = [])),
    params(("upload_id" = String, Path, description = "The upload")),
    responses((status = 200, body = UploadState), (status = 404, description = "`not_found`: unknown, expired or another user's", body = ErrorBody)))]
pub fn get_upload() {}

/// PUT /v1/media/uploads/{upload_id}/parts/{part}
#[utoipa::path(put, path = "/v1/media/uploads/{upload_id}/parts/{part}", tag = "media", security(("signed_url" = [])),
    params(("upload_id" = String, Path, description = "The upload"), ("part" = u32, Path, description = "Part number, from 1"), PartUrlQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "Exactly the part's bytes"),
    responses(
        (status = 204, description = "Part stored"),
        (status = 403, description = "`upload_url_invalid`: the signature does not verify, or the URL expired", body = ErrorBody),
        (status = 409, description = "`upload_url_used`: this part was received already", body = ErrorBody),
        (status = 400, description = "`bad_request`: the body is not the part's length", body = ErrorBody)))]
pub fn put_upload_part() {}

/// POST /v1/media/uploads/{upload_id}/complete
#[utoipa::path(post, path = "/v1/media/uploads/{upload_id}/complete", tag = "media", security(("bearer" = [])),
    params(("upload_id" = String, Path, description = "The upload")),
    request_body = CompleteUploadRequest,
    responses(
        (status = 200, body = MediaInfo),
        (status = 409, description = "`upload_incomplete`: parts are missing (or, with an S3 store, a part or ETag is not the store's)", body = ErrorBody),
        (status = 400, description = "`media_hash_mismatch`: the parts do not hash to the declared SHA-256 (the upload is dropped)", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody)))]
pub fn complete_upload() {}

/// GET /v1/media/{server}/{media_id}
#[utoipa::path(get, path = "/v1/media/{server}/{media_id}", tag = "media", security(("bearer" = [])),
    params(("server" = String, Path, description = "The server that stores it"), ("media_id" = String, Path, description = "Lowercase hex SHA-256 of the ciphertext"),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n`")),
    responses(
        (status = 200, description = "The whole ciphertext", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 416, description = "`range_not_satisfiable`", body = ErrorBody)))]
pub fn download_media() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ids_are_lowercase_hex_of_the_hash_and_parse_back() {
        let hash: [u8; 32] = std::array::from_fn(|i| (i * 8 + 1) as u8);
        let id = media_id(&hash);
        assert_eq!(id.len(), MEDIA_ID_LEN);
        assert!(id.starts_with("0109111921"));
        assert_eq!(parse_media_id(&id), Some(hash));
        assert_eq!(parse_media_id(&id.to_uppercase()), None);
        assert_eq!(parse_media_id(&id[1..]), None);
        assert_eq!(parse_media_id(&format!("{}g", &id[1..])), None);
    }
}
