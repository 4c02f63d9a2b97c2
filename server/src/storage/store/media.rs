//! Media bookkeeping (migration 0009): stored files by ciphertext SHA-256, the users who hold a
//! reference to each, and uploads in progress with their received parts. The bytes themselves
//! are in the object store (`crate::media`); these rows say what exists and who pays for it.
//! Quota checks and the rows they admit are written in one write-locked transaction, so two
//! concurrent uploads cannot both squeeze under a quota.

use crate::storage::BeginWrite as _;
use crate::storage::{stored_now, DevicePk, Store, StoreError, UserPk};
use sqlx::Row as _;

/// An upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    /// Its id.
    pub id: String,
    /// The uploading user.
    pub user: UserPk,
    /// The declared SHA-256 of the whole ciphertext.
    pub sha256: [u8; 32],
    /// The declared ciphertext size.
    pub size: u64,
    /// Size of every part but the last.
    pub part_bytes: u64,
    /// When it is dropped if not completed (ms).
    pub expires_ts: i64,
    /// Part numbers received, ascending (filesystem store; an S3 store receives parts itself).
    pub received: Vec<u32>,
    /// The S3 multipart upload behind it (S3 store).
    pub store_upload_id: Option<String>,
}

/// What asking to upload a file led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admitted {
    /// The file is stored already; the user now holds a reference to it. Its size.
    Stored(u64),
    /// An upload, new or the user's earlier one of the same ciphertext.
    Upload(UploadRow),
}

/// Limits an upload request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// The user's quota in bytes.
    pub quota_bytes: u64,
    /// Uploads a user may have in progress.
    pub max_pending: u32,
    /// Lifetime of a new upload (ms).
    pub upload_ttl_ms: u64,
    /// Lifetime of a reference from now (ms).
    pub retention_ms: u64,
    /// Part size of a new upload.
    pub part_bytes: u64,
}

/// Why an upload was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The user's quota would be exceeded: (used, quota).
    #[error("quota exceeded: {0} of {1} bytes used")]
    Quota(u64, u64),
    /// The user has too many uploads in progress.
    #[error("too many uploads in progress")]
    TooManyUploads,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn to_u64(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative media size {value}")))
}

fn to_i64(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Corrupt(format!("media size {value} out of range")))
}

fn hash_of(bytes: Vec<u8>) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt("a media hash is not 32 bytes".into()))
}

impl Store {
    /// Bytes of media `user` holds (files referenced and uploads in progress).
    pub async fn media_used(&self, user: UserPk) -> Result<u64, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let mut conn = pool.acquire().await?;
            fns::used_bytes(&mut conn, user).await
        })
    }

    /// The size of the stored file `sha256`, if it is stored.
    pub async fn media_size(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let size: Option<i64> =
                sqlx::query_scalar("SELECT size FROM media WHERE sha256 = $1").bind(&sha256[..]).fetch_optional(pool).await?;
            size.map(to_u64).transpose()
        })
    }

    /// Admits `user`'s upload of a `size`-byte ciphertext hashing to `sha256`, in one
    /// write-locked transaction: a stored file gets a reference (and is charged to the user's
    /// quota if they held none); the user's pending upload of the same ciphertext is returned
    /// as it is; otherwise a new upload `new_id` is created within the quota and the limit of
    /// uploads in progress.
    pub async fn admit_upload(
        &self,
        user: UserPk,
        sha256: &[u8; 32],
        size: u64,
        new_id: &str,
        limits: UploadLimits,
    ) -> Result<Admitted, AdmitError> {
        on_pool!(&self.pool, |pool, fns| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await.map_err(StoreError::from)?;
            let expires = now.saturating_add(to_i64(limits.retention_ms)?);
            let stored: Option<i64> = sqlx::query_scalar("SELECT size FROM media WHERE sha256 = $1")
                .bind(&sha256[..])
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            if let Some(stored) = stored {
                let stored = to_u64(stored)?;
                let held: bool =
                    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM media_refs WHERE user_id = $1 AND sha256 = $2)")
                        .bind(user)
                        .bind(&sha256[..])
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StoreError::from)?;
                if !held {
                    let used = fns::used_bytes(&mut tx, user).await?;
                    if used.saturating_add(stored) > limits.quota_bytes {
                        return Err(AdmitError::Quota(used, limits.quota_bytes));
                    }
                }
                fns::reference(&mut tx, user, sha256, expires).await?;
                tx.commit().await.map_err(StoreError::from)?;
                return Ok(Admitted::Stored(stored));
            }
            let pending: Option<String> = sqlx::query_scalar(
                "SELECT id FROM media_uploads WHERE user_id = $1 AND sha256 = $2 AND size = $3 AND expires_ts > $4",
            )
            .bind(user)
            .bind(&sha256[..])
            .bind(to_i64(size)?)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from)?;
            if let Some(id) = pending {
                let row =
                    fns::upload_row(&mut tx, &id, now).await?.ok_or_else(|| StoreError::Corrupt("upload vanished".into()))?;
                return Ok(Admitted::Upload(row));
            }
            let in_progress: i64 = sqlx::query_scalar("SELECT count(*) FROM media_uploads WHERE user_id = $1")
                .bind(user)
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            if in_progress >= i64::from(limits.max_pending) {
                return Err(AdmitError::TooManyUploads);
            }
            let used = fns::used_bytes(&mut tx, user).await?;
            if used.saturating_add(size) > limits.quota_bytes {
                return Err(AdmitError::Quota(used, limits.quota_bytes));
            }
            let expires_ts = now.saturating_add(to_i64(limits.upload_ttl_ms)?);
            sqlx::query(
            "INSERT INTO media_uploads (id, user_id, sha256, size, part_bytes, created_ts, expires_ts) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(new_id)
        .bind(user)
        .bind(&sha256[..])
        .bind(to_i64(size)?)
        .bind(to_i64(limits.part_bytes)?)
        .bind(now)
        .bind(expires_ts)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
            tx.commit().await.map_err(StoreError::from)?;
            Ok(Admitted::Upload(UploadRow {
                id: new_id.to_owned(),
                user,
                sha256: *sha256,
                size,
                part_bytes: limits.part_bytes,
                expires_ts,
                received: Vec::new(),
                store_upload_id: None,
            }))
        })
    }

    /// The unexpired upload `id`, whoever it belongs to.
    pub async fn upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let mut conn = pool.acquire().await?;
            fns::upload_row(&mut conn, id, stored_now()?).await
        })
    }

    /// Records that part `part` of upload `id` was received; false when it was already.
    pub async fn record_part(&self, id: &str, part: u32) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |pool| {
            let done = sqlx::query("INSERT INTO media_upload_parts (upload_id, part) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(id)
                .bind(i64::from(part))
                .execute(pool)
                .await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Turns the upload `id` into the stored file it declared, referenced by its uploader for
    /// `retention_ms`, in one transaction. Returns false when the file was stored already
    /// (another upload of the same ciphertext finished first): the caller's bytes are not
    /// needed.
    pub async fn finish_upload(&self, upload: &UploadRow, retention_ms: u64) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM media_upload_parts WHERE upload_id = $1").bind(&upload.id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM media_uploads WHERE id = $1").bind(&upload.id).execute(&mut *tx).await?;
            let inserted = sqlx::query("INSERT INTO media (sha256, size, created_ts) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(&upload.sha256[..])
                .bind(to_i64(upload.size)?)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
            fns::reference(&mut tx, upload.user, &upload.sha256, now.saturating_add(to_i64(retention_ms)?)).await?;
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// Records a copy of another server's file, kept at least `keep_ms` from now (an existing
    /// row is kept longer, never shorter).
    pub async fn cache_media(&self, sha256: &[u8; 32], size: u64, keep_ms: u64) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let now = stored_now()?;
            sqlx::query(if self.pool.is_postgres() {
            "INSERT INTO media (sha256, size, created_ts, keep_until) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sha256) DO UPDATE SET keep_until = GREATEST(media.keep_until, excluded.keep_until), unreferenced_ts = NULL"
        } else {
            "INSERT INTO media (sha256, size, created_ts, keep_until) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (sha256) DO UPDATE SET keep_until = max(keep_until, excluded.keep_until), unreferenced_ts = NULL"
        })
        .bind(&sha256[..])
        .bind(to_i64(size)?)
        .bind(now)
        .bind(now.saturating_add(to_i64(keep_ms)?))
        .execute(pool)
        .await?;
            Ok(())
        })
    }

    /// Forgets the upload `id` and its parts.
    pub async fn drop_upload(&self, id: &str) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM media_upload_parts WHERE upload_id = $1").bind(id).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM media_uploads WHERE id = $1").bind(id).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records the S3 multipart upload behind upload `id`.
    pub async fn set_store_upload_id(&self, id: &str, store_upload_id: &str) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("UPDATE media_uploads SET store_upload_id = $1 WHERE id = $2")
                .bind(store_upload_id)
                .bind(id)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Uploads that expired, with their S3 multipart ids (their rows stay until
    /// [`Store::drop_upload`], after the caller removed their parts from the object store).
    pub async fn expired_uploads(&self) -> Result<Vec<(String, Option<String>)>, StoreError> {
        on_pool!(&self.pool, |pool| {
            Ok(sqlx::query_as("SELECT id, store_upload_id FROM media_uploads WHERE expires_ts <= $1")
                .bind(stored_now()?)
                .fetch_all(pool)
                .await?)
        })
    }

    /// Holds each file of `media` that `sender` references for the local member devices of
    /// the group that have not received position `group_seq` yet (`media_group_holds`).
    pub async fn hold_group_media(
        &self,
        sender: UserPk,
        group_id: &str,
        group_seq: parley_spec::GroupSeq,
        media: &[[u8; 32]],
    ) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            for sha256 in media {
                let held = sqlx::query(
                    "INSERT INTO media_group_holds (sha256, group_id, group_seq) SELECT $1, $2, $3 \
                 WHERE EXISTS (SELECT 1 FROM media_refs r JOIN media m ON m.sha256 = r.sha256 \
                               WHERE r.user_id = $4 AND r.sha256 = $1) \
                 ON CONFLICT DO NOTHING",
                )
                .bind(sha256.as_slice())
                .bind(group_id)
                .bind(i64::try_from(group_seq)?)
                .bind(sender)
                .execute(&mut *tx)
                .await?;
                if held.rows_affected() == 1 {
                    sqlx::query("UPDATE media SET unreferenced_ts = NULL WHERE sha256 = $1")
                        .bind(sha256.as_slice())
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// `device` downloaded the whole of file `sha256`: temporary chats' holds on it for that
    /// device end at the next sweep.
    pub async fn media_downloaded(&self, sha256: &[u8; 32], device: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("UPDATE media_holds SET fetched = 1 WHERE sha256 = $1 AND device = $2 AND once = 1")
                .bind(sha256.as_slice())
                .bind(device)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Up to `limit` files stored at or before `cutoff` (ms) that are not in the cold store yet.
    pub async fn media_to_cool(&self, cutoff: u64, limit: u32) -> Result<Vec<[u8; 32]>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows: Vec<Vec<u8>> =
                sqlx::query_scalar("SELECT sha256 FROM media WHERE cold = 0 AND created_ts <= $1 ORDER BY created_ts LIMIT $2")
                    .bind(to_i64(cutoff)?)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
            rows.into_iter().map(hash_of).collect()
        })
    }

    /// Records that a file is in the cold store; false if the file is gone (swept meanwhile).
    pub async fn mark_cold(&self, sha256: &[u8; 32]) -> Result<bool, StoreError> {
        on_pool!(&self.pool, |pool| {
            let done = sqlx::query("UPDATE media SET cold = 1 WHERE sha256 = $1").bind(sha256.as_slice()).execute(pool).await?;
            Ok(done.rows_affected() == 1)
        })
    }

    /// Sweeps references: drops those that expired and the holds of messages their devices
    /// acknowledged (a file whose hold ended is kept `retention_ms` from now, for the recipient
    /// to download it), marks files left without any as unreferenced from now, and deletes the
    /// rows of files unreferenced for longer than `grace_ms`, returning their hashes (the caller
    /// deletes their objects).
    pub async fn sweep_media(&self, grace_ms: u64, retention_ms: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM media_refs WHERE expires_ts <= $1").bind(now).execute(&mut *tx).await?;
            // A message's hold ends once its device acknowledged past it (or is gone).
            let mut released: Vec<Vec<u8>> = sqlx::query_scalar(
                "DELETE FROM media_holds WHERE once = 0 AND NOT EXISTS \
             (SELECT 1 FROM devices d WHERE d.id = media_holds.device AND d.acked_seq < media_holds.seq) RETURNING sha256",
            )
            .fetch_all(&mut *tx)
            .await?;
            // A group message's hold ends once no local member device still has to receive it.
            released.extend(
                sqlx::query_scalar::<_, Vec<u8>>(
                    "DELETE FROM media_group_holds AS h WHERE NOT EXISTS (SELECT 1 FROM group_devices g \
                 WHERE g.group_id = h.group_id AND g.acked < h.group_seq AND g.from_seq <= h.group_seq \
                 AND (g.until_seq IS NULL OR g.until_seq >= h.group_seq)) RETURNING sha256",
                )
                .fetch_all(&mut *tx)
                .await?,
            );
            // A temporary chat's hold ends once its device downloaded the file (or is gone); when the
            // last one of a sender's ended, the sender's reference goes too.
            let downloaded: Vec<(Vec<u8>, i64)> = sqlx::query_as(
                "DELETE FROM media_holds WHERE once = 1 AND (fetched = 1 OR NOT EXISTS \
             (SELECT 1 FROM devices d WHERE d.id = media_holds.device)) RETURNING sha256, sender",
            )
            .fetch_all(&mut *tx)
            .await?;
            for (sha256, sender) in downloaded.iter().collect::<std::collections::BTreeSet<_>>() {
                sqlx::query(
                    "DELETE FROM media_refs WHERE user_id = $1 AND sha256 = $2 AND NOT EXISTS \
                 (SELECT 1 FROM media_holds WHERE sha256 = $2 AND sender = $1 AND once = 1)",
                )
                .bind(sender)
                .bind(sha256.as_slice())
                .execute(&mut *tx)
                .await?;
            }
            let keep_until = now.saturating_add(to_i64(retention_ms)?);
            for sha256 in released.iter().collect::<std::collections::BTreeSet<_>>() {
                sqlx::query(if self.pool.is_postgres() {
                    "UPDATE media SET keep_until = GREATEST(keep_until, $1) WHERE sha256 = $2"
                } else {
                    "UPDATE media SET keep_until = max(keep_until, $1) WHERE sha256 = $2"
                })
                .bind(keep_until)
                .bind(sha256.as_slice())
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE media SET unreferenced_ts = $1 WHERE unreferenced_ts IS NULL AND keep_until <= $1 \
             AND NOT EXISTS (SELECT 1 FROM media_refs r WHERE r.sha256 = media.sha256) \
             AND NOT EXISTS (SELECT 1 FROM media_holds h WHERE h.sha256 = media.sha256) \
             AND NOT EXISTS (SELECT 1 FROM media_group_holds h WHERE h.sha256 = media.sha256)",
            )
            .bind(now)
            .execute(&mut *tx)
            .await?;
            let gone: Vec<Vec<u8>> = sqlx::query_scalar("DELETE FROM media WHERE unreferenced_ts <= $1 RETURNING sha256")
                .bind(now.saturating_sub(to_i64(grace_ms)?))
                .fetch_all(&mut *tx)
                .await?;
            tx.commit().await?;
            gone.into_iter().map(hash_of).collect()
        })
    }
}

dual! {
/// Bytes `user` holds: files referenced plus uploads in progress.
pub(super) async fn used_bytes(conn: &mut Conn, user: UserPk) -> Result<u64, StoreError> {
    let used: i64 = sqlx::query_scalar(
        "SELECT CAST(coalesce((SELECT sum(m.size) FROM media_refs r JOIN media m ON m.sha256 = r.sha256 WHERE r.user_id = $1), 0) \
         + coalesce((SELECT sum(size) FROM media_uploads WHERE user_id = $1), 0) AS BIGINT)",
    )
    .bind(user)
    .fetch_one(conn)
    .await?;
    to_u64(used)
}
/// Gives `user` a reference to the stored file `sha256`, lasting until `expires` (an existing
/// one is extended).
pub(super) async fn reference(conn: &mut Conn, user: UserPk, sha256: &[u8], expires: i64) -> Result<(), StoreError> {
    sqlx::query(if PG {
        "INSERT INTO media_refs (user_id, sha256, expires_ts) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, sha256) DO UPDATE SET expires_ts = GREATEST(media_refs.expires_ts, excluded.expires_ts)"
    } else {
        "INSERT INTO media_refs (user_id, sha256, expires_ts) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id, sha256) DO UPDATE SET expires_ts = max(expires_ts, excluded.expires_ts)"
    })
    .bind(user)
    .bind(sha256)
    .bind(expires)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE media SET unreferenced_ts = NULL WHERE sha256 = $1").bind(sha256).execute(conn).await?;
    Ok(())
}
pub(super) async fn received_parts(conn: &mut Conn, id: &str) -> Result<Vec<u32>, StoreError> {
    let parts: Vec<i64> = sqlx::query_scalar("SELECT part FROM media_upload_parts WHERE upload_id = $1 ORDER BY part")
        .bind(id)
        .fetch_all(conn)
        .await?;
    parts.into_iter().map(|p| u32::try_from(p).map_err(|_| StoreError::Corrupt(format!("part number {p}")))).collect()
}
pub(super) async fn upload_row(conn: &mut Conn, id: &str, now: i64) -> Result<Option<UploadRow>, StoreError> {
    let Some(row) =
        sqlx::query("SELECT user_id, sha256, size, part_bytes, expires_ts, store_upload_id FROM media_uploads WHERE id = $1 AND expires_ts > $2")
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    Ok(Some(UploadRow {
        id: id.to_owned(),
        user: row.try_get(0)?,
        sha256: hash_of(row.try_get(1)?)?,
        size: to_u64(row.try_get(2)?)?,
        part_bytes: to_u64(row.try_get(3)?)?,
        expires_ts: row.try_get(4)?,
        store_upload_id: row.try_get(5)?,
        received: received_parts(conn, id).await?,
    }))
}}
