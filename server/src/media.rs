//! The media store: ciphertext files behind [`object_store`], named by their SHA-256
//! (`objects/<media id>`), and the parts of uploads in progress (`uploads/<upload id>/<part>`).
//! Which files exist and who references them is in the database (`storage::store::media`);
//! this module moves bytes, signs and checks upload URLs, and sweeps what expired.
//!
//! An upload's parts arrive in any order, each to a URL this server signed (HMAC-SHA256 with a
//! key derived from the server's signing key), used once. With the filesystem store each part
//! is written in place, at its offset of the upload's one file (`uploads/<upload id>/data`), so
//! the bytes are written once; completing the upload reads that file through SHA-256 and, only
//! when the hash and size are the declared ones, renames it to its final name. A part is claimed
//! before its first byte is written and an upload completes only while no part is being
//! written (after which none can start), so the bytes hashed are the bytes published. With S3
//! the parts go to a multipart upload, completed and read back through SHA-256. Memory stays
//! flat whatever the file size: bodies and objects are streamed in chunks of [`CHUNK_BYTES`].

use crate::config::Config;
use crate::error::{Error, RemoteFailure, Result};
use crate::storage::{Store, UploadRow};
use axum::body::Body;
use base64::Engine as _;
use futures_util::StreamExt as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, GetResult, ObjectStore, ObjectStoreExt as _, WriteMultipart};
use parley_spec::v1::media::{media_id, PartTarget};
use parley_spec::{ErrorCode, ServerName};
use sha2::{Digest as _, Sha256};
use std::ops::Range;
use std::sync::Arc;

/// Bytes read at a time from a file of the filesystem store (object_store's own stream reads
/// 8 KiB per blocking task).
const READ_CHUNK_BYTES: usize = 256 * 1024;

mod s3;

/// Most parts of one upload.
pub const MAX_PARTS: u32 = 10_000;

/// Bytes buffered per write to the object store (and so per upload part or assembly in
/// progress).
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Bytes buffered per part when the server itself writes a file to an S3 store (a fetch from
/// another server, a move to a cold store): S3 refuses parts under 5 MiB but the last.
pub const S3_CHUNK_BYTES: usize = 5 * 1024 * 1024;

/// What the signature of an upload URL covers, before the upload id, part and expiry.
const URL_CONTEXT: &str = "parley media part url v1";

/// Why the media store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The store's directory cannot be created.
    #[error("media directory {0}: {1}")]
    Dir(std::path::PathBuf, std::io::Error),
    /// The S3 store's HTTP client cannot be built.
    #[error("media store HTTP client: {0}")]
    Http(String),
    /// The object store refused to open.
    #[error("media store: {0}")]
    Store(#[from] object_store::Error),
}

/// The media store of a server.
pub struct Media {
    store: Arc<dyn ObjectStore>,
    /// The colder store files move to once they are old (`[media.cold]`).
    cold: Option<Arc<dyn ObjectStore>>,
    /// The same store when it is S3: presigned URLs and multipart uploads.
    s3: Option<Arc<object_store::aws::AmazonS3>>,
    url_key: parley_crypto::media::UrlKey,
    /// The `[media]` settings.
    pub config: crate::config::MediaConfig,
    /// Held while a file appears (completion) or disappears (the sweep), so that a file being
    /// deleted is never one an upload has just completed.
    lifecycle: tokio::sync::Mutex<()>,
    /// The filesystem store's directory (None with S3): parts are written in place there.
    dir: Option<std::path::PathBuf>,
    /// Parts being written and uploads being completed (see the module's documentation).
    writes: Writes,
    /// Files being fetched from other servers: one fetch per file, later askers wait for it.
    fetching: std::sync::Mutex<std::collections::HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
    metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media").field("store", &self.store).finish_non_exhaustive()
    }
}

/// The bytes of a read, streamed: a file of the filesystem store in [`READ_CHUNK_BYTES`]
/// reads, any other store as it streams.
pub fn into_stream(result: GetResult) -> futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let range = result.range.clone();
    match result.payload {
        object_store::GetResultPayload::File(file, path) => {
            let opened = async move {
                let mut file = tokio::fs::File::from_std(file);
                file.seek(std::io::SeekFrom::Start(range.start)).await?;
                Ok::<_, std::io::Error>(tokio_util::io::ReaderStream::with_capacity(
                    file.take(range.end - range.start),
                    READ_CHUNK_BYTES,
                ))
            };
            futures_util::stream::once(opened)
                .map(|opened| match opened {
                    Ok(stream) => stream.boxed(),
                    Err(error) => futures_util::stream::once(async move { Err(error) }).boxed(),
                })
                .flatten()
                .map(move |chunk| {
                    chunk.map_err(|source| object_store::Error::Generic {
                        store: "media",
                        source: format!("{}: {source}", path.display()).into(),
                    })
                })
                .boxed()
        }
        object_store::GetResultPayload::Stream(stream) => stream,
    }
}

/// What is going on with one upload's bytes right now.
#[derive(Debug, Default)]
struct UploadWrites {
    /// Parts being written.
    parts: std::collections::HashSet<u32>,
    /// Whether the upload is being completed (no part may start).
    completing: bool,
}

/// How long a part's request, or a completion, waits for another request still writing that
/// part (or any part) to end: a client resuming at once after it cut a connection finds the
/// server still writing what the cut request sent, for the moment the server takes to notice.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parts being written and uploads being completed, with a signal each time one ends.
#[derive(Default)]
struct WritesState {
    uploads: std::sync::Mutex<std::collections::HashMap<String, UploadWrites>>,
    ended: tokio::sync::Notify,
}

type Writes = Arc<WritesState>;

fn lock(writes: &Writes) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, UploadWrites>> {
    writes.uploads.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why a claim or a completion cannot start now.
enum Busy {
    /// Another request completes the upload.
    Completing,
    /// Parts are being written (by another request, for a part claim: that very part).
    Writing(usize),
}

/// Runs `attempt` until it succeeds, waiting for a write or completion to end between tries,
/// for at most [`CLAIM_WAIT`]; the last refusal then.
async fn waiting<T>(writes: &Writes, mut attempt: impl FnMut() -> std::result::Result<T, Busy>) -> std::result::Result<T, Busy> {
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    loop {
        let ended = writes.ended.notified();
        tokio::pin!(ended);
        // Registered before trying, so an end between the try and the wait is not missed.
        ended.as_mut().enable();
        match attempt() {
            Ok(done) => return Ok(done),
            Err(busy) => {
                if tokio::time::timeout_at(deadline, ended).await.is_err() {
                    return Err(busy);
                }
            }
        }
    }
}

/// A part claimed for writing, released when the last clone is dropped: the request's, and
/// each write of it still in flight (a request dropped mid-part keeps its part claimed until
/// its last write landed).
pub struct PartClaim {
    writes: Writes,
    upload_id: String,
    part: u32,
}

impl Drop for PartClaim {
    fn drop(&mut self) {
        let mut writes = lock(&self.writes);
        if let Some(upload) = writes.get_mut(&self.upload_id) {
            upload.parts.remove(&self.part);
            if upload.parts.is_empty() && !upload.completing {
                writes.remove(&self.upload_id);
            }
        }
        drop(writes);
        self.writes.ended.notify_waiters();
    }
}

/// An upload being completed: while this lives no part of it can be written. Released when
/// dropped.
pub struct Completing {
    writes: Writes,
    upload_id: String,
}

impl Drop for Completing {
    fn drop(&mut self) {
        lock(&self.writes).remove(&self.upload_id);
        self.writes.ended.notify_waiters();
    }
}

/// Whether the object `found` (streamed through SHA-256) has `upload`'s declared size and hash.
async fn is_declared(found: GetResult, upload: &UploadRow) -> Result<bool> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut stream = into_stream(found);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(internal)?;
        total += chunk.len() as u64;
        hasher.update(&chunk);
    }
    Ok(total == upload.size && hasher.finalize().as_slice() == upload.sha256)
}

/// A blocking file operation's outcome.
fn joined(outcome: std::result::Result<std::io::Result<()>, tokio::task::JoinError>) -> Result<()> {
    outcome.map_err(Error::internal)?.map_err(Error::internal)
}

fn internal(error: object_store::Error) -> Error {
    Error::Internal(Box::new(error))
}

/// `objects/<media id>`
fn object_path(sha256: &[u8; 32]) -> Path {
    Path::from_iter(["objects", &media_id(sha256)])
}

fn upload_dir(upload_id: &str) -> Path {
    Path::from_iter(["uploads", upload_id])
}

/// The file the parts of an upload are written into (filesystem store), at their offsets.
fn data_path(upload_id: &str) -> Path {
    Path::from_iter(["uploads", upload_id, "data"])
}

/// The object an S3 multipart upload writes: `uploads/<upload id>.upload`, renamed to its
/// media id once its hash is checked.
fn upload_object(upload_id: &str) -> Path {
    Path::from_iter(["uploads", &format!("{upload_id}.upload")])
}

/// Number of parts of a `size`-byte file cut in `part_bytes` parts.
pub fn part_count(size: u64, part_bytes: u64) -> u32 {
    u32::try_from(size.div_ceil(part_bytes)).unwrap_or(u32::MAX)
}

/// Offset and length of part `part` (from 1) of an upload.
pub fn part_range(upload: &UploadRow, part: u32) -> Option<Range<u64>> {
    if part == 0 || part > part_count(upload.size, upload.part_bytes) {
        return None;
    }
    let start = u64::from(part - 1) * upload.part_bytes;
    Some(start..upload.size.min(start + upload.part_bytes))
}

/// Whether `id` has the shape of an upload id this server makes (so it is safe in a path).
pub fn valid_upload_id(id: &str) -> bool {
    (16..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A new random upload id (128 bits, base64url).
pub fn new_upload_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

impl Media {
    /// Opens the filesystem store under `config.media.dir` (created owner-only), with fsync:
    /// a part or file is on disk before the server says it is stored.
    pub fn open(
        config: &Config,
        server_key: &parley_federation::ServerKey,
        metrics: crate::metrics::Metrics,
    ) -> std::result::Result<Self, MediaError> {
        let (store, s3, dir): (Arc<dyn ObjectStore>, _, _) = match &config.media.s3 {
            Some(s3) => {
                let store = Arc::new(s3_store(s3)?);
                (store.clone(), Some(store), None)
            }
            None => {
                let dir = config.data_dir.join(&config.media.dir);
                (fs_store(&dir)?, None, Some(dir))
            }
        };
        let cold: Option<Arc<dyn ObjectStore>> = match &config.media.cold {
            Some(crate::config::ColdConfig { s3: Some(s3), .. }) => Some(Arc::new(s3_store(s3)?)),
            Some(crate::config::ColdConfig { dir: Some(dir), .. }) => Some(fs_store(&config.data_dir.join(dir))?),
            _ => None,
        };
        let url_key = parley_crypto::media::UrlKey::derive(&server_key.key.seed());
        Ok(Self {
            store,
            cold,
            s3,
            url_key,
            config: config.media.clone(),
            lifecycle: tokio::sync::Mutex::new(()),
            dir,
            writes: Default::default(),
            fetching: Default::default(),
            metrics,
        })
    }

    /// Starts what the store needs for a new upload (an S3 multipart upload) and records it;
    /// `upload` as it is otherwise.
    pub async fn prepare(&self, store: &Store, mut upload: UploadRow) -> Result<UploadRow> {
        let Some(s3) = &self.s3 else { return Ok(upload) };
        if upload.store_upload_id.is_none() {
            let id = object_store::multipart::MultipartStore::create_multipart(s3.as_ref(), &upload_object(&upload.id))
                .await
                .map_err(internal)?;
            store.set_store_upload_id(&upload.id, &id).await?;
            upload.store_upload_id = Some(id);
        }
        Ok(upload)
    }

    /// Whether parts go straight to an S3 store (which then tracks them, not this server).
    pub fn is_s3(&self) -> bool {
        self.s3.is_some()
    }

    /// What the signature of a part URL covers.
    fn url_message(upload_id: &str, part: u32, expires: u64) -> Vec<u8> {
        format!("{URL_CONTEXT}\n{upload_id}\n{part}\n{expires}").into_bytes()
    }

    /// A signed URL (a path relative to this server's base URL) for part `part` of an upload,
    /// valid until `expires` (ms).
    pub fn part_url(&self, upload_id: &str, part: u32, expires: u64) -> String {
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(self.url_key.sign(&Self::url_message(upload_id, part, expires)));
        let path = parley_spec::endpoint::segments::<parley_spec::v1::media::PutUploadPart>(&[upload_id, &part.to_string()])
            .expect("two parameters for two segments") // invariant: the path has two parameters
            .join("/");
        format!("/{path}?expires={expires}&sig={sig}")
    }

    /// Targets for the parts of `upload` not received yet, each URL valid for `url_ttl_ms`
    /// (never past the upload's own expiry): this server's signed URLs, or presigned URLs of
    /// the S3 multipart upload.
    pub async fn targets(&self, upload: &UploadRow) -> Result<Vec<PartTarget>> {
        let now = parley_spec::Timestamp::now().as_millis();
        let expires = now.saturating_add(self.config.url_ttl_ms).min(u64::try_from(upload.expires_ts).unwrap_or(0));
        let mut targets = Vec::new();
        for part in (1..=part_count(upload.size, upload.part_bytes)).filter(|part| upload.received.binary_search(part).is_err()) {
            let Some(range) = part_range(upload, part) else { continue };
            let url = match (&self.s3, &upload.store_upload_id) {
                (Some(s3), Some(multipart)) => {
                    use object_store::signer::{SignedUrlOptions, Signer as _};
                    let options = SignedUrlOptions::default()
                        .with_query([("partNumber", part.to_string().as_str()), ("uploadId", multipart.as_str())]);
                    let ttl = std::time::Duration::from_millis(expires.saturating_sub(now).max(1));
                    s3.signed_url_opts(object_store::signer::Method::PUT, &upload_object(&upload.id), ttl, &options)
                        .await
                        .map_err(internal)?
                        .to_string()
                }
                (Some(_), None) => return Err(Error::Unavailable),
                (None, _) => self.part_url(&upload.id, part, expires),
            };
            targets.push(PartTarget::new(part, range.start, range.end - range.start, url));
        }
        Ok(targets)
    }

    /// Completes the S3 multipart upload of `upload` with the parts' ETags, in part order,
    /// then reads the object back through SHA-256. False (and the object deleted) when it is
    /// not the declared size and hash; `upload_incomplete` when S3 refuses the parts.
    pub async fn complete_s3(&self, upload: &UploadRow, etags: Vec<String>) -> Result<bool> {
        let (Some(s3), Some(multipart)) = (&self.s3, &upload.store_upload_id) else {
            return Err(Error::internal("not an S3 upload"));
        };
        let parts = etags.into_iter().map(|content_id| object_store::multipart::PartId { content_id }).collect();
        let path = upload_object(&upload.id);
        if let Err(error) =
            object_store::multipart::MultipartStore::complete_multipart(s3.as_ref(), &path, multipart, parts).await
        {
            return Err(Error::new(ErrorCode::UploadIncomplete, format!("the store refused the parts: {error}")));
        }
        if !is_declared(self.store.get(&path).await.map_err(internal)?, upload).await? {
            self.store.delete(&path).await.map_err(internal)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Checks a part URL's signature (in constant time) and expiry.
    pub fn check_part_url(&self, upload_id: &str, part: u32, expires: u64, sig: &str) -> Result<()> {
        let invalid = |m: &str| Error::new(ErrorCode::UploadUrlInvalid, m);
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| invalid("the signature is not base64url"))?;
        if !self.url_key.verify(&Self::url_message(upload_id, part, expires), &sig) {
            return Err(invalid("the upload URL's signature does not verify"));
        }
        if parley_spec::Timestamp::now().as_millis() >= expires {
            return Err(invalid("the upload URL expired; ask for the upload's state to get fresh ones"));
        }
        Ok(())
    }

    /// Claims part `part` of upload `upload_id` for writing. While another request writes that
    /// part or completes the upload, waits for it to end (at most [`CLAIM_WAIT`], then
    /// `upload_url_used`). Take the claim before checking that the part was not received yet,
    /// and record it before dropping the claim.
    pub async fn claim(&self, upload_id: &str, part: u32) -> Result<Arc<PartClaim>> {
        let claimed = waiting(&self.writes, || {
            let mut writes = lock(&self.writes);
            let upload = writes.entry(upload_id.to_owned()).or_default();
            if upload.completing {
                return Err(Busy::Completing);
            }
            if !upload.parts.insert(part) {
                return Err(Busy::Writing(1));
            }
            Ok(Arc::new(PartClaim { writes: self.writes.clone(), upload_id: upload_id.to_owned(), part }))
        })
        .await;
        claimed.map_err(|busy| match busy {
            Busy::Completing => Error::new(ErrorCode::UploadUrlUsed, "the upload is being completed"),
            Busy::Writing(_) => Error::new(ErrorCode::UploadUrlUsed, "this part is being received by another request"),
        })
    }

    /// Marks upload `upload_id` as being completed, so that no part of it is written until the
    /// returned guard is dropped. While parts are being written or another request completes
    /// it, waits for them to end (at most [`CLAIM_WAIT`]; then `upload_incomplete`, or
    /// `upload_url_used` for the other completion).
    pub async fn completing(&self, upload_id: &str) -> Result<Completing> {
        let started = waiting(&self.writes, || {
            let mut writes = lock(&self.writes);
            let upload = writes.entry(upload_id.to_owned()).or_default();
            if upload.completing {
                return Err(Busy::Completing);
            }
            if !upload.parts.is_empty() {
                return Err(Busy::Writing(upload.parts.len()));
            }
            upload.completing = true;
            Ok(Completing { writes: self.writes.clone(), upload_id: upload_id.to_owned() })
        })
        .await;
        started.map_err(|busy| match busy {
            Busy::Completing => Error::new(ErrorCode::UploadUrlUsed, "the upload is being completed by another request"),
            Busy::Writing(parts) => Error::new(
                ErrorCode::UploadIncomplete,
                format!("{parts} part(s) are still being received; complete once they are in"),
            ),
        })
    }

    /// Streams `body` into the `claim`ed part (filesystem store) at `range` of the upload's
    /// file, then fsyncs it. The body must be exactly the range's length; a body that is cut or
    /// of the wrong length leaves the part not received (its bytes are overwritten when it is
    /// sent again).
    pub async fn write_part(&self, claim: &Arc<PartClaim>, range: Range<u64>, body: Body) -> Result<()> {
        use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
        let Some(dir) = &self.dir else { return Err(Error::internal("parts of an S3 upload go to the store")) };
        let upload_dir = dir.join("uploads").join(&claim.upload_id);
        let file = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&upload_dir)?;
            std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(upload_dir.join("data"))
        })
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)?;
        let file = Arc::new(file);
        let len = range.end - range.start;
        let mut stream = body.into_data_stream();
        let mut buffer = bytes::BytesMut::new();
        let mut received = 0u64;
        let mut offset = range.start;
        // One write in flight while the next buffer fills; each holds the claim until it landed.
        let mut writing: Option<tokio::task::JoinHandle<std::io::Result<()>>> = None;
        let outcome = loop {
            let end = match stream.next().await {
                None if received == len => true,
                None => break Err(Error::new(ErrorCode::BadRequest, format!("the part is {len} bytes, {received} were sent"))),
                Some(Err(error)) => break Err(Error::new(ErrorCode::BadRequest, format!("reading the part failed: {error}"))),
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if received > len {
                        break Err(Error::new(ErrorCode::BadRequest, format!("the part is {len} bytes; more were sent")));
                    }
                    buffer.extend_from_slice(&chunk);
                    false
                }
            };
            if buffer.len() >= CHUNK_BYTES || (end && !buffer.is_empty()) {
                if let Some(previous) = writing.take() {
                    if let Err(error) = joined(previous.await) {
                        break Err(error);
                    }
                }
                let chunk = buffer.split().freeze();
                let at = offset;
                offset += chunk.len() as u64;
                let (file, claim) = (file.clone(), claim.clone());
                writing = Some(tokio::task::spawn_blocking(move || {
                    let _claim = claim;
                    file.write_all_at(&chunk, at)
                }));
            }
            if end {
                break Ok(());
            }
        };
        let last = match writing.take() {
            Some(last) => joined(last.await),
            None => Ok(()),
        };
        outcome?;
        last?;
        joined(tokio::task::spawn_blocking(move || file.sync_data()).await)
    }

    /// Reads the file of `upload` (filesystem store) through SHA-256: whether it has the
    /// declared size and hash. Call with the upload [`completing`](Self::completing).
    pub async fn verify(&self, upload: &UploadRow) -> Result<bool> {
        let found = match self.store.get(&data_path(&upload.id)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(error) => return Err(internal(error)),
        };
        if found.meta.size != upload.size {
            return Ok(false);
        }
        is_declared(found, upload).await
    }

    /// Publishes a verified upload as its file and records it (the uploader's reference);
    /// when the file was stored meanwhile by another upload, this copy is dropped. Call with
    /// the upload [`completing`](Self::completing).
    pub async fn publish(&self, store: &Store, upload: &UploadRow) -> Result<()> {
        let staged = match self.s3 {
            Some(_) => upload_object(&upload.id),
            None => data_path(&upload.id),
        };
        let _lifecycle = self.lifecycle.lock().await;
        if store.media_size(&upload.sha256).await?.is_some() {
            self.store.delete(&staged).await.map_err(internal)?;
        } else {
            self.store.rename(&staged, &object_path(&upload.sha256)).await.map_err(internal)?;
        }
        store.finish_upload(upload, self.config.retention_ms).await?;
        Ok(())
    }

    /// Aborts the S3 multipart upload behind an upload, if any (its parts go with it).
    pub async fn abort(&self, upload_id: &str, multipart: Option<&str>) {
        if let (Some(s3), Some(multipart)) = (&self.s3, multipart) {
            let multipart = multipart.to_owned();
            if let Err(error) =
                object_store::multipart::MultipartStore::abort_multipart(s3.as_ref(), &upload_object(upload_id), &multipart).await
            {
                tracing::warn!(%error, upload_id, "aborting an S3 multipart upload failed");
            }
        }
    }

    /// Deletes what is stored of upload `upload_id` (its file of parts).
    pub async fn discard(&self, upload_id: &str) {
        let prefix = upload_dir(upload_id);
        let paths = self.store.list(Some(&prefix)).map(|meta| meta.map(|m| m.location)).boxed();
        let mut deleted = self.store.delete_stream(paths);
        while let Some(result) = deleted.next().await {
            if let Err(error) = result {
                tracing::warn!(%error, upload_id, "deleting an upload's parts failed");
            }
        }
    }

    /// Makes sure the file `sha256` of `server` is here: fetched once over federation (a
    /// concurrent download of the same file waits for that fetch), streamed through SHA-256
    /// into the store, and kept for `retention_ms` only when its bytes are the ones the media
    /// id names.
    pub async fn fetch_remote(
        &self,
        store: &Store,
        client: &parley_federation::transport::FederationClient,
        server: &ServerName,
        sha256: &[u8; 32],
    ) -> Result<()> {
        let gate = self.fetching.lock().unwrap_or_else(|e| e.into_inner()).entry(*sha256).or_default().clone();
        let turn = gate.lock().await;
        let outcome = match store.media_size(sha256).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => self.fetch_once(store, client, server, sha256).await,
            Err(error) => Err(error.into()),
        };
        drop(turn);
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        // The map's and ours: no one else waits on this gate.
        if Arc::strong_count(&gate) <= 2 {
            fetching.remove(sha256);
        }
        outcome
    }

    async fn fetch_once(
        &self,
        store: &Store,
        client: &parley_federation::transport::FederationClient,
        server: &ServerName,
        sha256: &[u8; 32],
    ) -> Result<()> {
        let id = media_id(sha256);
        let timeout = std::time::Duration::from_millis(self.config.fetch_timeout_ms);
        let bad = |what: &'static str| Error::Remote { server: server.clone(), failure: RemoteFailure::BadAnswer(what) };
        let mut response = client
            .get_stream::<parley_spec::federation::v1::media::GetMedia>(server, &[&id], timeout)
            .await
            .map_err(|e| crate::federation::remote::remote_error(server, e))?;
        if response.content_length().is_some_and(|len| len > self.config.max_file_bytes) {
            return Err(bad("sent a file larger than this server accepts"));
        }
        let staged = Path::from_iter(["fetching", &format!("{id}.{}", new_upload_id())]);
        let chunk = if self.s3.is_some() { S3_CHUNK_BYTES } else { CHUNK_BYTES };
        let mut writer = WriteMultipart::new_with_chunk_size(self.store.put_multipart(&staged).await.map_err(internal)?, chunk);
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let failure = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    total += chunk.len() as u64;
                    if total > self.config.max_file_bytes {
                        break Some(bad("sent a file larger than this server accepts"));
                    }
                    hasher.update(&chunk);
                    writer.put(chunk);
                    if let Err(error) = writer.wait_for_capacity(2).await {
                        break Some(internal(error));
                    }
                }
                Ok(None) if hasher.clone().finalize().as_slice() == sha256 => break None,
                Ok(None) => break Some(bad("sent bytes that do not hash to the media id")),
                Err(error) => {
                    let error = parley_federation::transport::FederationError::Transport(error.to_string());
                    break Some(Error::Remote { server: server.clone(), failure: RemoteFailure::Unreachable(Box::new(error)) });
                }
            }
        };
        if let Some(error) = failure {
            let _ = writer.abort().await;
            return Err(error);
        }
        writer.finish().await.map_err(internal)?;
        let _lifecycle = self.lifecycle.lock().await;
        if store.media_size(sha256).await?.is_some() {
            self.store.delete(&staged).await.map_err(internal)?;
        } else {
            self.store.rename(&staged, &object_path(sha256)).await.map_err(internal)?;
        }
        store.cache_media(sha256, total, self.config.retention_ms).await?;
        self.metrics.media_fetches.inc();
        Ok(())
    }

    /// Opens the stored file `sha256` at `range` (the whole file when `None`): in the main
    /// store, or else in the cold one (a file moving is copied there before it leaves the main
    /// store, so one of the two has it).
    pub async fn read(&self, sha256: &[u8; 32], range: Option<Range<u64>>) -> Result<GetResult> {
        let options = || GetOptions { range: range.clone().map(GetRange::Bounded), ..GetOptions::default() };
        let path = object_path(sha256);
        let mut found = self.store.get_opts(&path, options()).await;
        if let (Err(object_store::Error::NotFound { .. }), Some(cold)) = (&found, &self.cold) {
            found = cold.get_opts(&path, options()).await;
        }
        match found {
            Ok(result) => Ok(result),
            Err(object_store::Error::NotFound { .. }) => Err(Error::new(ErrorCode::NotFound, "no such media")),
            Err(error) => Err(internal(error)),
        }
    }

    /// Moves files stored longer than `[media.cold] after_ms` to the cold store, a batch at a
    /// time: copied (streamed), recorded, then removed from the main store.
    async fn cool(&self, store: &Store) -> std::result::Result<(), Error> {
        let (Some(cold), Some(config)) = (&self.cold, &self.config.cold) else { return Ok(()) };
        let cutoff = parley_spec::Timestamp::now().as_millis().saturating_sub(config.after_ms);
        for sha256 in store.media_to_cool(cutoff, COOL_BATCH).await? {
            let path = object_path(&sha256);
            let source = match self.store.get(&path).await {
                Ok(source) => source,
                // Deleted meanwhile, or moved before a crash that kept the row from saying so.
                Err(object_store::Error::NotFound { .. }) => {
                    let _ = store.mark_cold(&sha256).await?;
                    continue;
                }
                Err(error) => return Err(internal(error)),
            };
            let chunk = if config.s3.is_some() { S3_CHUNK_BYTES } else { CHUNK_BYTES };
            let mut writer = WriteMultipart::new_with_chunk_size(cold.put_multipart(&path).await.map_err(internal)?, chunk);
            let mut stream = into_stream(source);
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => writer.write(&chunk),
                    Err(error) => {
                        let _ = writer.abort().await;
                        return Err(internal(error));
                    }
                }
            }
            writer.finish().await.map_err(internal)?;
            // The file is in both stores now: record it, then free the main store. If the sweep
            // deleted it meanwhile, the copy just made goes too.
            let lifecycle = self.lifecycle.lock().await;
            let kept = store.mark_cold(&sha256).await?;
            let stale = if kept { &self.store } else { cold };
            match stale.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => tracing::warn!(%error, media_id = media_id(&sha256), "removing a moved file failed"),
            }
            drop(lifecycle);
            self.metrics.media_cooled.inc();
        }
        Ok(())
    }

    /// Drops expired uploads with their parts, expired references, and the files no one has
    /// referenced for `grace_ms`; then what unfinished fetches and uploads that are gone left
    /// behind.
    pub async fn sweep(&self, store: &Store) -> std::result::Result<(), Error> {
        for (upload_id, multipart) in store.expired_uploads().await? {
            self.abort(&upload_id, multipart.as_deref()).await;
            self.discard(&upload_id).await;
            store.drop_upload(&upload_id).await?;
        }
        let lifecycle = self.lifecycle.lock().await;
        for sha256 in store.sweep_media(self.config.grace_ms, self.config.retention_ms).await? {
            for target in std::iter::once(&self.store).chain(self.cold.as_ref()) {
                match target.delete(&object_path(&sha256)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(error) => tracing::warn!(%error, media_id = media_id(&sha256), "deleting an unreferenced file failed"),
                }
            }
        }
        drop(lifecycle);
        self.cool(store).await?;
        // Copies of other servers' files left by a fetch that never finished (the server
        // stopped during it): older than twice the longest fetch.
        let stale_before =
            i64::try_from(parley_spec::Timestamp::now().as_millis().saturating_sub(2 * self.config.fetch_timeout_ms))
                .unwrap_or(i64::MAX);
        let mut fetching = self.store.list(Some(&Path::from("fetching")));
        while let Some(meta) = fetching.next().await {
            match meta {
                Ok(meta) if meta.last_modified.timestamp_millis() < stale_before => {
                    if let Err(error) = self.store.delete(&meta.location).await {
                        tracing::warn!(%error, "deleting an abandoned fetch failed");
                    }
                }
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(error) => return Err(internal(error)),
            }
        }
        drop(fetching);
        let listed = self.store.list_with_delimiter(Some(&Path::from("uploads"))).await.map_err(internal)?;
        for object in listed.objects {
            // An S3 upload completed but never published (the server stopped in between).
            let Some(upload_id) = object.location.filename().and_then(|name| name.strip_suffix(".upload")) else { continue };
            if store.upload(upload_id).await?.is_none() {
                if let Err(error) = self.store.delete(&object.location).await {
                    tracing::warn!(%error, upload_id, "deleting a left-over upload failed");
                }
            }
        }
        for dir in listed.common_prefixes {
            // An upload whose row is gone (completed, or dropped while a part was still being
            // written) left these behind.
            let Some(upload_id) = dir.filename() else { continue };
            if store.upload(upload_id).await?.is_none() {
                self.discard(upload_id).await;
            }
        }
        Ok(())
    }
}

/// Files moved to the cold store per sweep.
const COOL_BATCH: u32 = 64;

/// An S3-compatible store, its HTTP going through the server's own client.
pub fn s3_store(s3: &crate::config::S3Config) -> std::result::Result<object_store::aws::AmazonS3, MediaError> {
    let connector = s3::Connector::new().map_err(|e| MediaError::Http(e.to_string()))?;
    Ok(object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&s3.endpoint)
        .with_region(&s3.region)
        .with_bucket_name(&s3.bucket)
        .with_access_key_id(&s3.access_key_id)
        .with_secret_access_key(&s3.secret_access_key)
        .with_allow_http(s3.allow_http)
        .with_virtual_hosted_style_request(s3.virtual_hosted_style)
        .with_http_connector(connector)
        .build()?)
}

/// The filesystem store under `dir` (created owner-only), with fsync: a part or file is on disk
/// before the server says it is stored.
fn fs_store(dir: &std::path::Path) -> std::result::Result<Arc<dyn ObjectStore>, MediaError> {
    crate::storage::create_data_dir(dir).map_err(|e| MediaError::Dir(dir.to_path_buf(), e))?;
    Ok(Arc::new(LocalFileSystem::new_with_prefix(dir)?.with_fsync(true).with_automatic_cleanup(true)))
}

/// A `Range` header's single byte range resolved against a file of `size` bytes: `None` for
/// no header or one this server ignores (several ranges, other units: the whole file is
/// sent), `Some(Err(()))` when it cannot be satisfied.
pub fn resolve_range(header: Option<&str>, size: u64) -> Option<std::result::Result<Range<u64>, ()>> {
    let spec = header?.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 {
            return Some(Err(()));
        }
        size.saturating_sub(suffix)..size
    } else {
        let start: u64 = first.parse().ok()?;
        let end = match last {
            "" => size,
            last => last.parse::<u64>().ok()?.checked_add(1)?.min(size),
        };
        if end <= start && !(last.is_empty() && start < size) {
            return Some(Err(()));
        }
        start..end
    };
    if range.start >= size || range.is_empty() {
        return Some(Err(()));
    }
    Some(Ok(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_resolve_like_rfc_9110() {
        assert_eq!(resolve_range(None, 100), None);
        assert_eq!(resolve_range(Some("bytes=0-9"), 100), Some(Ok(0..10)));
        assert_eq!(resolve_range(Some("bytes=90-"), 100), Some(Ok(90..100)));
        assert_eq!(resolve_range(Some("bytes=-10"), 100), Some(Ok(90..100)));
        assert_eq!(resolve_range(Some("bytes=-1000"), 100), Some(Ok(0..100)));
        assert_eq!(resolve_range(Some("bytes=50-1000"), 100), Some(Ok(50..100)));
        assert_eq!(resolve_range(Some("bytes=100-"), 100), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=10-5"), 100), Some(Err(())));
        assert_eq!(resolve_range(Some("bytes=-0"), 100), Some(Err(())));
        // Ignored: several ranges, other units, garbage (the whole file is sent).
        assert_eq!(resolve_range(Some("bytes=0-1,5-6"), 100), None);
        assert_eq!(resolve_range(Some("items=0-1"), 100), None);
        assert_eq!(resolve_range(Some("bytes=a-b"), 100), None);
    }

    #[test]
    fn parts_cover_the_file_exactly() {
        let upload = |size| UploadRow {
            id: "u".repeat(16),
            user: 1,
            sha256: [0; 32],
            size,
            part_bytes: 10,
            expires_ts: 0,
            received: Vec::new(),
            store_upload_id: None,
        };
        assert_eq!(part_count(25, 10), 3);
        assert_eq!(part_range(&upload(25), 1), Some(0..10));
        assert_eq!(part_range(&upload(25), 3), Some(20..25));
        assert_eq!(part_range(&upload(25), 4), None);
        assert_eq!(part_range(&upload(25), 0), None);
        assert_eq!(part_range(&upload(20), 2), Some(10..20));
        assert_eq!(part_count(20, 10), 2);
    }

    #[test]
    fn upload_ids_are_checked_before_they_become_paths() {
        assert!(valid_upload_id(&new_upload_id()));
        assert!(!valid_upload_id("../../etc/passwd.."));
        assert!(!valid_upload_id("short"));
        assert!(!valid_upload_id(&"a".repeat(65)));
    }
}
