//! Attachments (`spec/media.md`): [`upload_file`] encrypts a file on the fly into a local
//! ciphertext (`parley-crypto::media`, a fresh key per file), uploads it in parallel parts to
//! the URLs the server hands out (its own, or an S3 store's presigned ones) and completes it;
//! [`download_file`] fetches a file through the user's homeserver, checks its SHA-256 and
//! decrypts it chunk by chunk. Memory stays flat whatever the size (a part at a time per
//! parallel upload).
//!
//! Both resume: an upload keeps its state (key, ciphertext file, upload id, parts the store
//! acknowledged) in a small JSON file in the caller's work directory, so a later call for the
//! same unchanged file, after a cut connection, a cancel or a restart, sends only what is
//! missing; a download keeps the ciphertext received so far next to the destination and
//! asks for the rest with a `Range`. The progress callback may cancel either
//! ([`ControlFlow::Break`]); the state stays for the next call.

use crate::{error::Error, Api};
use futures_util::StreamExt as _;
use parley_crypto::media::{
    CiphertextHasher, MediaDecryptor, MediaEncryptor, MediaRef, MediaRefExt as _, CHUNK_SIZE, CIPHERTEXT_CHUNK_SIZE,
};
use parley_spec::v1::media::{CompleteUploadRequest, CreateUploadRequest, UploadStatus, UploadedPart};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The server (or the store) refused, or could not be reached.
    #[error(transparent)]
    Api(#[from] Error),
    /// A local file could not be read or written.
    #[error("{0}: {1}")]
    File(PathBuf, std::io::Error),
    /// The downloaded bytes are not the file the reference names, or do not decrypt.
    #[error("the downloaded file does not match its reference: {0}")]
    Corrupt(#[from] parley_crypto::media::MediaError),
    /// The progress callback cancelled; a later call resumes.
    #[error("cancelled")]
    Cancelled,
    /// The file is no longer stored on its server (a forward of an expired file).
    #[error("the file is no longer stored on its server")]
    Gone,
    /// The server answered something the protocol does not allow.
    #[error("unexpected answer: {0}")]
    Protocol(&'static str),
}

/// An uploaded file: where it is, and what decrypts it (to send inside an encrypted message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedFile {
    /// The server that stores it.
    pub server: String,
    /// Its media id.
    pub media_id: String,
    /// Key, hash, size and type.
    pub media: MediaRef,
}

/// The media ids a message asks its sender's server to hold until the recipients' devices have
/// it (`spec/media.md` §5): its file's, when the file is on the server of `sender`.
pub(crate) fn held_media(file: Option<&parley_spec::v1::content::Attachment>, sender: &parley_spec::UserId) -> Vec<String> {
    file.filter(|f| f.server == sender.server()).map(|f| vec![f.media_id.clone()]).unwrap_or_default()
}

/// What an upload in progress keeps on disk.
#[derive(Debug, Serialize, Deserialize)]
struct UploadJournal {
    /// The source's length and modification time: a changed file starts over.
    source_len: u64,
    source_modified_ms: u64,
    media: MediaRef,
    ciphertext: PathBuf,
    upload_id: Option<String>,
    /// Parts the store acknowledged with an ETag (S3 stores; the server's own store tracks
    /// its parts itself).
    etags: BTreeMap<u32, String>,
}

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |e| MediaError::File(path.to_path_buf(), e)
}

fn modified_ms(metadata: &std::fs::Metadata) -> u64 {
    metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the journal of an upload of `source` lives in `work_dir`.
fn journal_path(source: &Path, work_dir: &Path) -> PathBuf {
    let name = parley_spec::v1::media::media_id(&parley_crypto::media::sha256(source.as_os_str().as_encoded_bytes()));
    work_dir.join(format!("upload-{}.json", &name[..32]))
}

async fn save(path: &Path, journal: &UploadJournal) -> Result<(), MediaError> {
    let json = serde_json::to_vec(journal).map_err(|e| MediaError::Api(e.into()))?;
    let temporary = path.with_extension("json.tmp");
    tokio::fs::write(&temporary, json).await.map_err(file_error(&temporary))?;
    tokio::fs::rename(&temporary, path).await.map_err(file_error(path))
}

/// Encrypts `source` into `ciphertext`, 64 KiB at a time; the reference.
async fn encrypt_file(source: &Path, ciphertext: &Path, mime: &str) -> Result<MediaRef, MediaError> {
    let mut input = tokio::fs::File::open(source).await.map_err(file_error(source))?;
    let mut output = tokio::fs::File::create(ciphertext).await.map_err(file_error(ciphertext))?;
    let (mut encryptor, key) = MediaEncryptor::new(&mut rand::thread_rng());
    let mut hasher = CiphertextHasher::new();
    let mut size = 0u64;
    // A chunk is sealed as the last one only when nothing follows it: read one ahead.
    let mut current = read_chunk(&mut input, source).await?;
    loop {
        let next = read_chunk(&mut input, source).await?;
        size += current.len() as u64;
        if next.is_empty() {
            let sealed = encryptor.finish(&current)?;
            hasher.update(&sealed);
            output.write_all(&sealed).await.map_err(file_error(ciphertext))?;
            break;
        }
        let sealed = encryptor.encrypt_chunk(&current)?;
        hasher.update(&sealed);
        output.write_all(&sealed).await.map_err(file_error(ciphertext))?;
        current = next;
    }
    output.sync_all().await.map_err(file_error(ciphertext))?;
    Ok(MediaRef::new(&key, hasher.finish(), size, mime))
}

/// Up to [`CHUNK_SIZE`] bytes (fewer only at the end of the file).
async fn read_chunk(input: &mut tokio::fs::File, path: &Path) -> Result<Vec<u8>, MediaError> {
    let mut chunk = vec![0u8; CHUNK_SIZE];
    let mut filled = 0;
    while filled < CHUNK_SIZE {
        let n = input.read(&mut chunk[filled..]).await.map_err(file_error(path))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    chunk.truncate(filled);
    Ok(chunk)
}

async fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, MediaError> {
    let mut file = tokio::fs::File::open(path).await.map_err(file_error(path))?;
    file.seek(std::io::SeekFrom::Start(offset)).await.map_err(file_error(path))?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| MediaError::Protocol("a part larger than memory"))?];
    file.read_exact(&mut bytes).await.map_err(file_error(path))?;
    Ok(bytes)
}

/// Uploads `source` (encrypted on the fly), `parallel` parts at a time, resuming an earlier
/// upload of the same unchanged file whose journal is in `work_dir`. `progress(done, total)`
/// is called with ciphertext bytes after each part (the parts already up count as done) and
/// may cancel.
pub async fn upload_file(
    api: &Api,
    source: &Path,
    mime: &str,
    work_dir: &Path,
    parallel: usize,
    mut progress: impl FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<UploadedFile, MediaError> {
    tokio::fs::create_dir_all(work_dir).await.map_err(file_error(work_dir))?;
    let metadata = tokio::fs::metadata(source).await.map_err(file_error(source))?;
    let journal_path = journal_path(source, work_dir);
    let resumed = match tokio::fs::read(&journal_path).await {
        Ok(bytes) => serde_json::from_slice::<UploadJournal>(&bytes).ok().filter(|j| {
            j.source_len == metadata.len() && j.source_modified_ms == modified_ms(&metadata) && j.ciphertext.exists()
        }),
        Err(_) => None,
    };
    let mut journal = match resumed {
        Some(journal) => journal,
        None => {
            let ciphertext = journal_path.with_extension("ciphertext");
            let media = encrypt_file(source, &ciphertext, mime).await?;
            let journal = UploadJournal {
                source_len: metadata.len(),
                source_modified_ms: modified_ms(&metadata),
                media,
                ciphertext,
                upload_id: None,
                etags: BTreeMap::new(),
            };
            save(&journal_path, &journal).await?;
            journal
        }
    };
    let total = tokio::fs::metadata(&journal.ciphertext).await.map_err(file_error(&journal.ciphertext))?.len();
    let sha256: [u8; 32] = journal.media.sha256.0.as_slice().try_into().map_err(|_| MediaError::Protocol("hash length"))?;
    // Creating again finds the pending upload (or the stored file): the server keys it by user
    // and ciphertext, so a journal without an upload id loses nothing.
    let state = match &journal.upload_id {
        Some(id) => match api.upload_state(id).await {
            Ok(state) => state,
            Err(e) if e.server_code() == Some(parley_spec::ErrorCode::NotFound) => {
                api.create_upload(&CreateUploadRequest::new(total, sha256)).await?
            }
            Err(e) => return Err(e.into()),
        },
        None => api.create_upload(&CreateUploadRequest::new(total, sha256)).await?,
    };
    if state.status == UploadStatus::Complete {
        let info = state.media.ok_or(MediaError::Protocol("complete without media"))?;
        return finished(info.server.to_string(), info.media_id, journal, &journal_path).await;
    }
    let upload_id = state.upload_id.clone().ok_or(MediaError::Protocol("pending without an upload id"))?;
    if journal.upload_id.as_deref() != Some(&upload_id) {
        journal.upload_id = Some(upload_id.clone());
        journal.etags.clear();
        save(&journal_path, &journal).await?;
    }
    let missing: Vec<_> = state.parts.into_iter().filter(|p| !journal.etags.contains_key(&p.part)).collect();
    let mut done = total - missing.iter().map(|p| p.size).sum::<u64>();
    if progress(done, total).is_break() {
        return Err(MediaError::Cancelled);
    }
    let ciphertext = journal.ciphertext.clone();
    let mut puts = futures_util::stream::iter(missing.into_iter().map(|part| {
        let ciphertext = ciphertext.clone();
        async move {
            let bytes = read_range(&ciphertext, part.offset, part.size).await?;
            let etag = match api.put_part(&part.url, bytes).await {
                Ok(etag) => etag,
                // The server got this part meanwhile: a request of an earlier, cancelled call
                // that was still on its way when the upload's state was read. Its bytes are
                // this ciphertext's (completion checks the whole hash), so it is up.
                Err(e) if e.server_code() == Some(parley_spec::ErrorCode::UploadUrlUsed) => None,
                Err(e) => return Err(e.into()),
            };
            Ok::<_, MediaError>((part.part, part.size, etag))
        }
    }))
    .buffer_unordered(parallel.max(1));
    while let Some(result) = puts.next().await {
        let (part, size, etag) = result?;
        if let Some(etag) = etag {
            journal.etags.insert(part, etag);
            save(&journal_path, &journal).await?;
        }
        done += size;
        if progress(done, total).is_break() {
            return Err(MediaError::Cancelled);
        }
    }
    drop(puts);
    let parts = journal.etags.iter().map(|(part, etag)| UploadedPart::new(*part, etag.clone())).collect();
    let info = api.complete_upload(&upload_id, &CompleteUploadRequest::new(parts)).await?;
    finished(info.server.to_string(), info.media_id, journal, &journal_path).await
}

/// Removes an upload's local state; the uploaded file.
async fn finished(server: String, media_id: String, journal: UploadJournal, path: &Path) -> Result<UploadedFile, MediaError> {
    let _ = tokio::fs::remove_file(&journal.ciphertext).await;
    let _ = tokio::fs::remove_file(path).await;
    Ok(UploadedFile { server, media_id, media: journal.media })
}

/// Downloads the file `media_id` of `server` through the user's homeserver into `dest`,
/// resuming from the ciphertext kept by an earlier, interrupted call; checks it against
/// `media` (SHA-256, then each chunk's authentication and the size) before `dest` appears.
/// `progress(done, total)` counts ciphertext bytes and may cancel.
pub async fn download_file(
    api: &Api,
    server: &str,
    media_id: &str,
    media: &MediaRef,
    dest: &Path,
    mut progress: impl FnMut(u64, u64) -> ControlFlow<()>,
) -> Result<(), MediaError> {
    let partial = dest.with_extension("parley-download");
    let mut have = tokio::fs::metadata(&partial).await.map(|m| m.len()).unwrap_or(0);
    let total = parley_crypto::media::ciphertext_len(media.size);
    if have < total {
        let mut response = api.download(server, media_id, have).await?;
        if response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            have = 0; // the whole file came: start over
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(have > 0)
            .write(true)
            .truncate(have == 0)
            .open(&partial)
            .await
            .map_err(file_error(&partial))?;
        while let Some(chunk) = response.chunk().await.map_err(|e| MediaError::Api(e.into()))? {
            file.write_all(&chunk).await.map_err(file_error(&partial))?;
            have += chunk.len() as u64;
            if progress(have, total).is_break() {
                file.flush().await.map_err(file_error(&partial))?;
                return Err(MediaError::Cancelled);
            }
        }
        file.sync_all().await.map_err(file_error(&partial))?;
    }
    let checked = decrypt_file(&partial, media, dest).await;
    if matches!(checked, Err(MediaError::Corrupt(_))) {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    checked?;
    let _ = tokio::fs::remove_file(&partial).await;
    Ok(())
}

/// Checks `ciphertext` against `media` and decrypts it into `dest` (through a temporary file,
/// renamed only once every chunk authenticated).
async fn decrypt_file(ciphertext: &Path, media: &MediaRef, dest: &Path) -> Result<(), MediaError> {
    let mut hasher = CiphertextHasher::new();
    let mut input = tokio::fs::File::open(ciphertext).await.map_err(file_error(ciphertext))?;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = input.read(&mut buffer).await.map_err(file_error(ciphertext))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    media.check_digest(&hasher.finish())?;
    let len = tokio::fs::metadata(ciphertext).await.map_err(file_error(ciphertext))?.len();
    let temporary = dest.with_extension("parley-decrypting");
    let mut output = tokio::fs::File::create(&temporary).await.map_err(file_error(&temporary))?;
    let mut input = tokio::fs::File::open(ciphertext).await.map_err(file_error(ciphertext))?;
    let mut decryptor = MediaDecryptor::new(&media.media_key()?);
    let mut remaining = len;
    let mut written = 0u64;
    let mut piece = vec![0u8; CIPHERTEXT_CHUNK_SIZE];
    loop {
        let size = usize::try_from(remaining.min(CIPHERTEXT_CHUNK_SIZE as u64)).unwrap_or(CIPHERTEXT_CHUNK_SIZE);
        input.read_exact(&mut piece[..size]).await.map_err(file_error(ciphertext))?;
        remaining -= size as u64;
        if remaining == 0 {
            let plaintext = decryptor.decrypt_last(&piece[..size])?;
            written += plaintext.len() as u64;
            output.write_all(&plaintext).await.map_err(file_error(&temporary))?;
            break;
        }
        let plaintext = decryptor.decrypt_chunk(&piece[..size])?;
        written += plaintext.len() as u64;
        output.write_all(&plaintext).await.map_err(file_error(&temporary))?;
    }
    if written != media.size {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(MediaError::Corrupt(parley_crypto::media::MediaError::SizeMismatch));
    }
    output.sync_all().await.map_err(file_error(&temporary))?;
    tokio::fs::rename(&temporary, dest).await.map_err(file_error(dest))
}
