//! The MLS KeyPackage directory (`keypackages` table, migration 0006). The store keeps the bytes
//! a device uploaded and never parses them: the handlers validate KeyPackages before they come
//! here. Claims run in one write-locked transaction, so no two claimers ever get the same
//! one-time KeyPackage.

use crate::storage::BeginWrite as _;
use crate::storage::{stored_now, DevicePk, Store, StoreError};
use parley_spec::Timestamp;
use sqlx::Row as _;

/// A validated KeyPackage to store.
#[derive(Debug, Clone)]
pub struct NewKeyPackage {
    /// Its `KeyPackageRef` (unique: a KeyPackage uploaded twice is kept once).
    pub reference: Vec<u8>,
    /// The TLS-serialized `MLSMessage`, as uploaded.
    pub bytes: Vec<u8>,
    /// The end of its lifetime: it is never handed out after.
    pub expires: Timestamp,
}

/// KeyPackages uploaded by a device (each part optional).
#[derive(Debug, Default)]
pub struct KeyPackageUpload {
    /// One-time KeyPackages, added to the pool.
    pub one_time: Vec<NewKeyPackage>,
    /// The last-resort KeyPackage; replaces the previous one.
    pub last_resort: Option<NewKeyPackage>,
}

/// What a claim took from the directory for one device.
#[derive(Debug)]
pub struct ClaimedKeyPackage {
    /// The KeyPackage as uploaded.
    pub bytes: Vec<u8>,
    /// Whether it is the device's last-resort KeyPackage (kept; a one-time one was deleted).
    pub last_resort: bool,
    /// Unexpired one-time KeyPackages left after this claim.
    pub remaining: u32,
}

/// Counts of a device's unexpired KeyPackages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPackageCount {
    /// One-time KeyPackages.
    pub one_time: u32,
    /// Whether it has an unexpired last-resort KeyPackage.
    pub last_resort: bool,
}

impl KeyPackageCount {
    /// Whether the device holds any KeyPackage.
    pub fn any(self) -> bool {
        self.one_time > 0 || self.last_resort
    }
}

impl Store {
    /// Stores `device`'s KeyPackages in one transaction: the last-resort one replaces the
    /// previous; one-time ones are added (one already held is kept once). `TooMany`, and nothing
    /// stored, when the device would then hold more than `max_held` one-time KeyPackages.
    /// Returns the number of unexpired one-time KeyPackages held.
    pub async fn upload_keypackages(&self, device: DevicePk, upload: KeyPackageUpload, max_held: u32) -> Result<u32, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await?;
            let rows = upload.last_resort.iter().map(|kp| (kp, true)).chain(upload.one_time.iter().map(|kp| (kp, false)));
            if upload.last_resort.is_some() {
                sqlx::query("DELETE FROM keypackages WHERE device = $1 AND is_last_resort = 1")
                    .bind(device)
                    .execute(&mut *tx)
                    .await?;
            }
            for (key_package, last_resort) in rows {
                sqlx::query(
                "INSERT INTO keypackages (device, is_last_resort, reference, bytes, expires) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(device)
            .bind(i64::from(last_resort))
            .bind(&key_package.reference)
            .bind(&key_package.bytes)
            .bind(i64::try_from(key_package.expires)?)
            .execute(&mut *tx)
            .await?;
            }
            fns::delete_expired(&mut tx, device, now).await?;
            let count = fns::one_time_count(&mut tx, device).await?;
            if count > max_held {
                return Err(StoreError::TooMany); // the transaction rolls back when dropped
            }
            tx.commit().await?;
            Ok(count)
        })
    }

    /// Unexpired KeyPackages of a device.
    pub async fn keypackage_count(&self, device: DevicePk) -> Result<KeyPackageCount, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row = sqlx::query(
                "SELECT (SELECT count(*) FROM keypackages WHERE device = $1 AND is_last_resort = 0 AND expires >= $2), \
             EXISTS (SELECT 1 FROM keypackages WHERE device = $1 AND is_last_resort = 1 AND expires >= $2)",
            )
            .bind(device)
            .bind(stored_now()?)
            .fetch_one(pool)
            .await?;
            let one_time: i64 = row.try_get(0)?;
            Ok(KeyPackageCount {
                one_time: u32::try_from(one_time).map_err(|_| StoreError::Corrupt(format!("KeyPackage count {one_time}")))?,
                last_resort: row.try_get(1)?,
            })
        })
    }

    /// Claims one KeyPackage of `device`, in one write-locked transaction: when `one_time`, the
    /// oldest unexpired one-time KeyPackage, deleted so that it is handed out at most once; when
    /// none is left (or not `one_time`), the unexpired last-resort KeyPackage, which stays.
    /// `None` when there is neither.
    pub async fn claim_keypackage(&self, device: DevicePk, one_time: bool) -> Result<Option<ClaimedKeyPackage>, StoreError> {
        on_pool!(&self.pool, |pool, fns| {
            let now = stored_now()?;
            let mut tx = pool.begin_write().await?;
            fns::delete_expired(&mut tx, device, now).await?;
            let one_time: Option<Vec<u8>> = match one_time {
                true => {
                    sqlx::query_scalar(
                        "DELETE FROM keypackages WHERE id = \
                     (SELECT id FROM keypackages WHERE device = $1 AND is_last_resort = 0 ORDER BY id LIMIT 1) RETURNING bytes",
                    )
                    .bind(device)
                    .fetch_optional(&mut *tx)
                    .await?
                }
                false => None,
            };
            let claimed = match one_time {
                Some(bytes) => Some((bytes, false)),
                None => sqlx::query_scalar("SELECT bytes FROM keypackages WHERE device = $1 AND is_last_resort = 1")
                    .bind(device)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|bytes| (bytes, true)),
            };
            let remaining = fns::one_time_count(&mut tx, device).await?;
            tx.commit().await?;
            Ok(claimed.map(|(bytes, last_resort)| ClaimedKeyPackage { bytes, last_resort, remaining }))
        })
    }
}

dual! {
/// Deletes `device`'s expired KeyPackages (inside the caller's transaction).
pub(super) async fn delete_expired(conn: &mut Conn, device: DevicePk, now: i64) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM keypackages WHERE device = $1 AND expires < $2").bind(device).bind(now).execute(conn).await?;
    Ok(())
}
pub(super) async fn one_time_count(conn: &mut Conn, device: DevicePk) -> Result<u32, StoreError> {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM keypackages WHERE device = $1 AND is_last_resort = 0")
        .bind(device)
        .fetch_one(conn)
        .await?;
    u32::try_from(count).map_err(|_| StoreError::Corrupt(format!("KeyPackage count {count}")))
}}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::storage::testing::open;

    fn key_package(name: &str, expires: Timestamp) -> NewKeyPackage {
        NewKeyPackage { reference: format!("ref {name}").into_bytes(), bytes: name.as_bytes().to_vec(), expires }
    }

    fn in_an_hour() -> Timestamp {
        Timestamp::from_millis(Timestamp::now().as_millis() + 3_600_000)
    }

    fn upload(one_time: &[&str], last_resort: Option<&str>) -> KeyPackageUpload {
        KeyPackageUpload {
            one_time: one_time.iter().map(|name| key_package(name, in_an_hour())).collect(),
            last_resort: last_resort.map(|name| key_package(name, in_an_hour())),
        }
    }

    async fn claim(store: &Store, device: DevicePk) -> Option<(String, bool, u32)> {
        let claimed = store.claim_keypackage(device, true).await.expect("claim")?;
        Some((String::from_utf8(claimed.bytes).expect("utf-8"), claimed.last_resort, claimed.remaining))
    }

    #[tokio::test]
    async fn one_time_keypackages_go_once_in_order_then_the_last_resort_one_again_and_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        assert_eq!(claim(&store, 1).await, None, "nothing uploaded");
        assert_eq!(store.upload_keypackages(1, upload(&["a", "b"], Some("lr1")), 10).await.unwrap(), 2);
        // A repeated upload is kept once; a new last-resort KeyPackage replaces the old one.
        assert_eq!(store.upload_keypackages(1, upload(&["b"], Some("lr2")), 10).await.unwrap(), 2);
        assert_eq!(store.upload_keypackages(2, upload(&["other"], None), 10).await.unwrap(), 1);
        let last_resort_only = store.claim_keypackage(1, false).await.unwrap().expect("the last-resort one");
        assert_eq!((last_resort_only.bytes.as_slice(), last_resort_only.last_resort), (&b"lr2"[..], true), "not one-time");
        assert_eq!(store.keypackage_count(1).await.unwrap(), KeyPackageCount { one_time: 2, last_resort: true });
        assert_eq!(claim(&store, 1).await, Some(("a".to_owned(), false, 1)));
        assert_eq!(claim(&store, 1).await, Some(("b".to_owned(), false, 0)));
        assert_eq!(claim(&store, 1).await, Some(("lr2".to_owned(), true, 0)));
        assert_eq!(claim(&store, 1).await, Some(("lr2".to_owned(), true, 0)));
        assert_eq!(store.keypackage_count(1).await.unwrap(), KeyPackageCount { one_time: 0, last_resort: true });
        assert_eq!(claim(&store, 2).await, Some(("other".to_owned(), false, 0)));
        assert_eq!(claim(&store, 2).await, None, "no last-resort KeyPackage");
    }

    #[tokio::test]
    async fn expired_keypackages_are_never_handed_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        let past = Timestamp::from_millis(Timestamp::now().as_millis() - 1000);
        let upload = KeyPackageUpload {
            one_time: vec![key_package("old", past), key_package("new", in_an_hour())],
            last_resort: Some(key_package("old last resort", past)),
        };
        assert_eq!(store.upload_keypackages(1, upload, 10).await.unwrap(), 1, "the expired one is not counted");
        assert_eq!(store.keypackage_count(1).await.unwrap(), KeyPackageCount { one_time: 1, last_resort: false });
        assert_eq!(claim(&store, 1).await, Some(("new".to_owned(), false, 0)));
        assert_eq!(claim(&store, 1).await, None);
    }

    #[tokio::test]
    async fn an_upload_past_the_limit_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        assert_eq!(store.upload_keypackages(1, upload(&["a", "b"], None), 3).await.unwrap(), 2);
        let refused = store.upload_keypackages(1, upload(&["c", "d"], Some("lr")), 3).await;
        assert!(matches!(refused, Err(StoreError::TooMany)), "{refused:?}");
        assert_eq!(store.keypackage_count(1).await.unwrap(), KeyPackageCount { one_time: 2, last_resort: false });
        assert_eq!(store.upload_keypackages(1, upload(&["c"], Some("lr")), 3).await.unwrap(), 3);
    }
}
