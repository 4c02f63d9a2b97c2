//! Media over HTTP: limits, uploads (create or dedup, state and fresh URLs, signed part PUTs,
//! completion) and authenticated, ranged, streamed downloads. See `spec/media.md`.

use super::Json;
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use crate::media::{part_range, resolve_range, valid_upload_id};
use crate::storage::{AdmitError, Admitted, DevicePk, UploadLimits, UploadRow};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use parley_spec::v1::media::{
    media_id, parse_media_id, CompleteUploadRequest, CreateUploadRequest, MediaConfig, MediaInfo, PartUrlQuery, UploadState,
};
use parley_spec::{ErrorCode, ServerName, Timestamp};

fn not_found() -> Error {
    Error::new(ErrorCode::NotFound, "no such upload (unknown, expired, completed or another user's)")
}

/// The caller's unexpired upload `id`.
async fn own_upload(state: &AppState, auth: &AuthDevice, id: &str) -> Result<UploadRow> {
    if !valid_upload_id(id) {
        return Err(not_found());
    }
    match state.store.upload(id).await? {
        Some(upload) if upload.user == auth.user_pk => Ok(upload),
        _ => Err(not_found()),
    }
}

async fn pending(state: &AppState, upload: &UploadRow) -> Result<UploadState> {
    let expires = Timestamp::from_millis(u64::try_from(upload.expires_ts).unwrap_or(0));
    let targets = state.media.targets(upload).await?;
    Ok(UploadState::pending(upload.id.clone(), upload.part_bytes, upload.received.clone(), targets, expires))
}

fn info(state: &AppState, sha256: &[u8; 32], size: u64) -> MediaInfo {
    MediaInfo::new(state.server_name.clone(), media_id(sha256), size)
}

/// GET /v1/media/config
pub async fn get_config(State(state): State<AppState>, auth: AuthDevice) -> Result<axum::Json<MediaConfig>> {
    let media = &state.media.config;
    let used = state.store.media_used(auth.user_pk).await?;
    Ok(axum::Json(MediaConfig::new(media.max_file_bytes, media.part_bytes, media.quota_bytes, used)))
}

/// POST /v1/media/uploads
pub async fn create_upload(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<CreateUploadRequest>,
) -> Result<(StatusCode, axum::Json<UploadState>)> {
    let config = &state.media.config;
    let sha256: [u8; 32] =
        request.sha256.0.as_slice().try_into().map_err(|_| Error::new(ErrorCode::BadRequest, "sha256 must be 32 bytes"))?;
    if request.size == 0 {
        return Err(Error::new(ErrorCode::BadRequest, "size must be at least 1"));
    }
    if request.size > config.max_file_bytes {
        return Err(Error::new(ErrorCode::TooLarge, format!("files are at most {} bytes here", config.max_file_bytes)));
    }
    let limits = UploadLimits {
        quota_bytes: config.quota_bytes,
        max_pending: config.max_pending_uploads,
        upload_ttl_ms: config.upload_ttl_ms,
        retention_ms: config.retention_ms,
        part_bytes: config.part_bytes,
    };
    let new_id = crate::media::new_upload_id();
    match state.store.admit_upload(auth.user_pk, &sha256, request.size, &new_id, limits).await {
        Ok(Admitted::Stored(size)) => Ok((StatusCode::OK, axum::Json(UploadState::complete(info(&state, &sha256, size))))),
        Ok(Admitted::Upload(upload)) => {
            let upload = match state.media.prepare(&state.store, upload.clone()).await {
                Ok(upload) => upload,
                Err(error) => {
                    state.store.drop_upload(&upload.id).await?;
                    return Err(error);
                }
            };
            Ok((StatusCode::CREATED, axum::Json(pending(&state, &upload).await?)))
        }
        Err(AdmitError::Quota(used, quota)) => Err(Error::new(
            ErrorCode::QuotaExceeded,
            format!("{used} of {quota} bytes used; this file needs {} more", request.size),
        )),
        Err(AdmitError::TooManyUploads) => Err(Error::new(
            ErrorCode::RateLimited,
            format!("at most {} uploads in progress; complete one first", config.max_pending_uploads),
        )),
        Err(AdmitError::Store(error)) => Err(error.into()),
    }
}

/// GET /v1/media/uploads/{upload_id}
pub async fn get_upload(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(id): Path<String>,
) -> Result<axum::Json<UploadState>> {
    let upload = own_upload(&state, &auth, &id).await?;
    Ok(axum::Json(pending(&state, &upload).await?))
}

/// PUT /v1/media/uploads/{upload_id}/parts/{part}: the URL authorizes the request.
///
/// A refusal comes with `Connection: close`: the part's body may be left unread, so the
/// connection cannot carry another request, and the client must not put one on it (a client
/// that did saw its next request fail with a broken pipe).
pub async fn put_part(state: State<AppState>, path: Path<(String, u32)>, query: Query<PartUrlQuery>, body: Body) -> Response {
    match receive_part(state, path, query, body).await {
        Ok(status) => status.into_response(),
        Err(error) => {
            let mut response = error.into_response();
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

async fn receive_part(
    State(state): State<AppState>,
    Path((id, part)): Path<(String, u32)>,
    Query(query): Query<PartUrlQuery>,
    body: Body,
) -> Result<StatusCode> {
    if !valid_upload_id(&id) {
        return Err(Error::new(ErrorCode::UploadUrlInvalid, "not an upload URL of this server"));
    }
    state.media.check_part_url(&id, part, query.expires, &query.sig)?;
    // Claimed before the state is read and until the part is recorded: a part is written by
    // one request at a time, never once received, and never while the upload completes.
    let claim = state.media.claim(&id, part).await?;
    let upload = state.store.upload(&id).await?.ok_or_else(not_found)?;
    let range = part_range(&upload, part).ok_or_else(|| Error::new(ErrorCode::NotFound, "no such part"))?;
    if upload.received.binary_search(&part).is_ok() {
        return Err(Error::new(ErrorCode::UploadUrlUsed, "this part was received already"));
    }
    state.media.write_part(&claim, range, body).await?;
    if !state.store.record_part(&id, part).await? {
        return Err(Error::new(ErrorCode::UploadUrlUsed, "this part was received already"));
    }
    drop(claim);
    Ok(StatusCode::NO_CONTENT)
}

/// POST /v1/media/uploads/{upload_id}/complete
pub async fn complete_upload(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(id): Path<String>,
    Json(request): Json<CompleteUploadRequest>,
) -> Result<axum::Json<MediaInfo>> {
    if !valid_upload_id(&id) {
        return Err(not_found());
    }
    // No part is written from here until the upload is published or dropped (and a second
    // completion meanwhile is refused).
    let completing = state.media.completing(&id).await?;
    let upload = own_upload(&state, &auth, &id).await?;
    let parts = crate::media::part_count(upload.size, upload.part_bytes);
    let whole = if state.media.is_s3() {
        let mut listed = request.parts;
        listed.sort_by_key(|p| p.part);
        let numbers: Vec<u32> = listed.iter().map(|p| p.part).collect();
        if numbers != (1..=parts).collect::<Vec<_>>() {
            return Err(Error::new(
                ErrorCode::UploadIncomplete,
                format!("list each of the {parts} parts once, with the ETag the store answered (got parts {numbers:?})"),
            ));
        }
        state.media.complete_s3(&upload, listed.into_iter().map(|p| p.etag).collect()).await?
    } else {
        if upload.received.len() != parts as usize {
            return Err(Error::new(
                ErrorCode::UploadIncomplete,
                format!(
                    "{} of {parts} parts received; ask for the upload's state to see which are missing",
                    upload.received.len()
                ),
            ));
        }
        state.media.verify(&upload).await?
    };
    if !whole {
        state.media.discard(&id).await;
        state.store.drop_upload(&id).await?;
        return Err(Error::new(
            ErrorCode::MediaHashMismatch,
            "the uploaded bytes do not have the declared size and SHA-256; the upload is dropped",
        ));
    }
    state.media.publish(&state.store, &upload).await?;
    state.media.discard(&id).await;
    drop(completing);
    Ok(axum::Json(info(&state, &upload.sha256, upload.size)))
}

/// GET /v1/media/{server}/{media_id}
pub async fn download(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path((server, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    let sha256 = parse_media_id(&id).ok_or_else(|| Error::new(ErrorCode::BadRequest, "a media id is 64 lowercase hex digits"))?;
    if server != state.server_name.as_str() {
        let server = ServerName::parse(&server).map_err(|e| Error::new(ErrorCode::BadRequest, e.to_string()))?;
        crate::federation::remote::check_reachable(&state, &server)?;
        if let (None, Some(federation)) = (state.store.media_size(&sha256).await?, &state.federation) {
            state.media.fetch_remote(&state.store, &federation.client, &server, &sha256).await?;
        }
    }
    serve(&state, &sha256, &id, headers.get(header::RANGE).and_then(|v| v.to_str().ok()), Some(auth.device_pk)).await
}

/// The stored file `sha256` (whose id is `id`), whole or the one `range` asked. A response
/// that reaches the file's end and is streamed out to its last byte counts as `device`'s
/// download (temporary chats' files go once every device they went to downloaded them).
pub async fn serve(
    state: &AppState,
    sha256: &[u8; 32],
    id: &str,
    range: Option<&str>,
    device: Option<DevicePk>,
) -> Result<Response> {
    let size = state.store.media_size(sha256).await?.ok_or_else(|| Error::new(ErrorCode::NotFound, "no such media"))?;
    let requested = resolve_range(range, size);
    let range = match requested {
        Some(Err(())) => {
            let mut response = Error::new(ErrorCode::RangeNotSatisfiable, format!("the file is {size} bytes")).into_response();
            response.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return Ok(response);
        }
        Some(Ok(range)) => Some(range),
        None => None,
    };
    let object = state.media.read(sha256, range.clone()).await?;
    let length = object.range.end - object.range.start;
    let reaches_end = object.range.end == size;
    let stream = crate::media::into_stream(object);
    let body = match device {
        Some(device) if reaches_end => {
            let (store, sha256) = (state.store.clone(), *sha256);
            let mut left = length;
            // Recorded once the last byte is handed on (not when the client went away before).
            Body::from_stream(stream.map(move |chunk| {
                if let Ok(bytes) = &chunk {
                    let before = left;
                    left = left.saturating_sub(bytes.len() as u64);
                    if before > 0 && left == 0 {
                        let store = store.clone();
                        tokio::spawn(async move {
                            if let Err(error) = store.media_downloaded(&sha256, device).await {
                                tracing::warn!(%error, "recording a download failed");
                            }
                        });
                    }
                }
                chunk
            }))
        }
        _ => Body::from_stream(stream),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, header_value(&format!("\"{id}\"")));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=31536000, immutable"));
    if let Some(range) = range {
        headers.insert(header::CONTENT_RANGE, header_value(&format!("bytes {}-{}/{size}", range.start, range.end - 1)));
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(response)
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("ASCII digits, hex and punctuation") // invariant: built from numbers and a checked id
}
