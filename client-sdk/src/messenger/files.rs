//! Files in messages (`spec/media.md`): [`Messenger::send_file`] uploads a file encrypted under
//! a fresh key ([`crate::media::upload_file`]), makes a small JPEG thumbnail of an image on
//! this device, and sends the attachment (where the ciphertext is, key, hash, size, type,
//! name, thumbnail) inside an end-to-end encrypted message, 1:1 or to a group;
//! [`Messenger::download`] fetches an attachment through this user's homeserver and decrypts
//! it. Both resume after a cut connection or a restart: the upload's journal lives in the
//! profile's media work directory, a download's ciphertext so far next to its destination.

use super::groups::Application;
use super::{Messenger, MessengerError};
use crate::groups::GroupError;
use crate::media::{download_file, upload_file, MediaError};
use image::ImageDecoder as _;
use parley_crypto::media::ciphertext_len;
use parley_spec::v1::content::{Attachment, Thumbnail};
use parley_spec::v1::media::{media_id, CreateUploadRequest, UploadStatus};
use parley_spec::{GroupId, GroupSeq, ServerName, Timestamp, UserId};
use std::io::Cursor;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Parts uploaded at once.
const PARALLEL_PARTS: usize = 4;
/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIDE: u32 = 320;
/// The largest encoded thumbnail sent (a larger one is sent at lower quality, or not at all).
pub const MAX_THUMBNAIL_BYTES: usize = 48 * 1024;
/// The largest image file a thumbnail is made of.
const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;
/// The most memory decoding it may take (a 48-megapixel photo decodes to 144 MiB of RGB).
const MAX_DECODED_BYTES: u64 = 256 * 1024 * 1024;

/// What a progress callback may do: it is called with (bytes done, bytes in all) and may
/// cancel the transfer ([`ControlFlow::Break`]); a later call resumes it.
pub trait TransferProgress: FnMut(u64, u64) -> ControlFlow<()> + Send {}
impl<F: FnMut(u64, u64) -> ControlFlow<()> + Send> TransferProgress for F {}

impl Messenger {
    /// Where uploads in progress keep their journals and ciphertexts.
    fn media_work_dir(&self) -> PathBuf {
        self.inner.media_dir.clone()
    }

    /// Encrypts and uploads `path` to this user's homeserver (resuming an earlier upload of the
    /// same unchanged file) and describes it for a message: its type from the file name, its
    /// name, and for an image its dimensions and a thumbnail.
    pub async fn upload(&self, path: &Path, progress: impl TransferProgress) -> Result<Attachment, MessengerError> {
        let mime = mime_guess::from_path(path).first_or_octet_stream().essence_str().to_owned();
        let uploaded = upload_file(self.api(), path, &mime, &self.media_work_dir(), PARALLEL_PARTS, progress).await?;
        let mut attachment = Attachment::new(uploaded.server, uploaded.media_id, uploaded.media.clone());
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            attachment = attachment.with_name(name);
        }
        if mime.starts_with("image/") {
            let source = path.to_path_buf();
            match tokio::task::spawn_blocking(move || thumbnail(&source)).await {
                Ok(Ok((dimensions, thumbnail))) => attachment = attachment.with_image(dimensions, thumbnail),
                Ok(Err(error)) => tracing::debug!(%error, "no thumbnail"),
                Err(error) => tracing::warn!(%error, "thumbnail task failed"),
            }
        }
        Ok(attachment)
    }

    /// Uploads `path` ([`Messenger::upload`]) and sends it to `to` with `caption`, as
    /// [`Messenger::send_text`] sends a text (history and outbox first, exactly once). An
    /// interrupted upload resumes on the next call for the same file.
    pub async fn send_file(
        &self,
        to: &UserId,
        path: &Path,
        caption: &str,
        progress: impl TransferProgress,
    ) -> Result<Uuid, MessengerError> {
        let file = self.upload(path, progress).await?;
        self.send_uploaded_file(to, file, caption, false).await
    }

    /// [`Messenger::send_file`] for a temporary chat: the server deletes the file once every
    /// device it went to (the recipient's and this user's other devices) downloaded it, rather
    /// than when its retention ends (`spec/media.md` §5; for a user of this server only: for
    /// another server's user the usual retention applies).
    pub async fn send_temporary_file(
        &self,
        to: &UserId,
        path: &Path,
        caption: &str,
        progress: impl TransferProgress,
    ) -> Result<Uuid, MessengerError> {
        let file = self.upload(path, progress).await?;
        self.send_uploaded_file(to, file, caption, true).await
    }

    /// Sends a file uploaded before, again: a forward sends the same attachment, and the
    /// server keeps the file once. A file on this user's server gets this user's reference
    /// renewed first (it then lives on for its retention from now); one that is gone from there
    /// fails with [`MediaError::Gone`] rather than sending a dead reference.
    pub async fn send_attachment(&self, to: &UserId, file: Attachment, caption: &str) -> Result<Uuid, MessengerError> {
        self.renew(&file).await?;
        self.send_uploaded_file(to, file, caption, false).await
    }

    /// Sends a file this device just uploaded ([`Messenger::upload`]); with `temporary`, as
    /// [`Messenger::send_temporary_file`] does.
    pub async fn send_uploaded_file(
        &self,
        to: &UserId,
        file: Attachment,
        caption: &str,
        temporary: bool,
    ) -> Result<Uuid, MessengerError> {
        let client_msg_id =
            self.inner.driver.machine().await.enqueue_file(to, file, caption, temporary, Timestamp::now()).await?;
        self.flush(Some(client_msg_id)).await?;
        Ok(client_msg_id)
    }

    /// Uploads `path` and sends it to a group with `caption`, as
    /// [`Messenger::send_group_text`] sends a text.
    pub async fn send_group_file(
        &self,
        group_id: &GroupId,
        path: &Path,
        caption: &str,
        progress: impl TransferProgress,
    ) -> Result<(Uuid, GroupSeq), MessengerError> {
        let file = self.upload(path, progress).await?;
        self.send_group_uploaded(group_id, &file, caption).await
    }

    /// Sends a file uploaded before to a group, as [`Messenger::send_attachment`] does 1:1.
    pub async fn send_group_attachment(
        &self,
        group_id: &GroupId,
        file: &Attachment,
        caption: &str,
    ) -> Result<(Uuid, GroupSeq), MessengerError> {
        self.renew(file).await?;
        self.send_group_uploaded(group_id, file, caption).await
    }

    async fn send_group_uploaded(
        &self,
        group_id: &GroupId,
        file: &Attachment,
        caption: &str,
    ) -> Result<(Uuid, GroupSeq), MessengerError> {
        let client_msg_id = Uuid::new_v4();
        let what = Application::Text { client_msg_id, body: caption, file: Some(file) };
        let sent = self.send_application(group_id, what).await?;
        let sent = sent.ok_or_else(|| GroupError::InvalidRequest("nothing sent".into()))?;
        self.group_machine().await.message_sent(group_id, &sent).await?;
        Ok((client_msg_id, sent.group_seq))
    }

    /// Renews this user's reference to a file on its own server (`spec/media.md` §3.1: an
    /// upload of a stored ciphertext answers `complete` at once).
    async fn renew(&self, file: &Attachment) -> Result<(), MessengerError> {
        if file.server != self.session().user_id.server() {
            return Ok(());
        }
        let sha256 = <[u8; 32]>::try_from(file.media.sha256.0.as_slice())
            .map_err(|_| MessengerError::InvalidRequest("the attachment's hash is not 32 bytes".into()))?;
        let request = CreateUploadRequest::new(ciphertext_len(file.media.size), sha256);
        match self.api().create_upload(&request).await?.status {
            UploadStatus::Complete => Ok(()),
            _ => Err(MessengerError::Media(MediaError::Gone)),
        }
    }

    /// Downloads a received file into `dest` through this user's homeserver (which fetches it
    /// from the sender's server once), checks it against the attachment and decrypts it;
    /// `dest` appears only once the whole file checked out. An interrupted download resumes
    /// on the next call with the same `dest`.
    pub async fn download(&self, file: &Attachment, dest: &Path, progress: impl TransferProgress) -> Result<(), MessengerError> {
        let server = ServerName::parse(&file.server)
            .map_err(|_| MessengerError::InvalidRequest(format!("the attachment names no server: {:?}", file.server)))?;
        let sha256 = <[u8; 32]>::try_from(file.media.sha256.0.as_slice()).ok();
        if sha256.is_none_or(|sha256| media_id(&sha256) != file.media_id) {
            return Err(MessengerError::InvalidRequest("the attachment's media id is not its hash".into()));
        }
        download_file(self.api(), server.as_str(), &file.media_id, &file.media, dest, progress).await?;
        Ok(())
    }
}

impl From<MediaError> for MessengerError {
    fn from(error: MediaError) -> Self {
        match error {
            MediaError::Api(e) => Self::Sdk(e),
            other => Self::Media(other),
        }
    }
}

/// An image's dimensions and, if it can be made small enough, a JPEG thumbnail at most
/// [`THUMBNAIL_SIDE`] pixels on its longest side.
fn thumbnail(path: &Path) -> Result<((u32, u32), Option<Thumbnail>), image::ImageError> {
    let len = std::fs::metadata(path).map_err(image::ImageError::IoError)?.len();
    if len > MAX_IMAGE_BYTES {
        return Err(image::ImageError::Limits(image::error::LimitError::from_kind(image::error::LimitErrorKind::DimensionError)));
    }
    let mut reader = image::ImageReader::open(path)?.with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder()?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut decoded = image::DynamicImage::from_decoder(decoder)?;
    decoded.apply_orientation(orientation);
    let dimensions = (decoded.width(), decoded.height());
    let small = decoded.thumbnail(THUMBNAIL_SIDE, THUMBNAIL_SIDE).into_rgb8();
    for quality in [80, 60, 40] {
        let mut encoded = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut encoded), quality);
        small.write_with_encoder(encoder)?;
        if encoded.len() <= MAX_THUMBNAIL_BYTES {
            return Ok((dimensions, Some(Thumbnail::new("image/jpeg", small.width(), small.height(), encoded))));
        }
    }
    Ok((dimensions, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_keep_the_aspect_ratio_and_stay_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // Noise compresses badly: the quality steps must still bring it under the limit.
        let mut seed = 1u32;
        let image = image::RgbImage::from_fn(1600, 900, |_, _| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            image::Rgb([(seed >> 24) as u8, (seed >> 16) as u8, (seed >> 8) as u8])
        });
        image.save(&path).unwrap();
        let (dimensions, thumbnail) = thumbnail(&path).unwrap();
        assert_eq!(dimensions, (1600, 900));
        let thumbnail = thumbnail.expect("a thumbnail");
        assert_eq!((thumbnail.width, thumbnail.height, thumbnail.mime.as_str()), (320, 180, "image/jpeg"));
        assert!(thumbnail.data.0.len() <= MAX_THUMBNAIL_BYTES, "{} bytes", thumbnail.data.0.len());
        let decoded = image::load_from_memory(&thumbnail.data.0).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 180));
    }

    #[test]
    fn a_file_that_is_not_an_image_has_no_thumbnail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.png");
        std::fs::write(&path, b"not a png at all").unwrap();
        assert!(thumbnail(&path).is_err());
    }
}
