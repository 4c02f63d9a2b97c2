//! Push registrations and pending wake-ups (migration 0010). Written through the pool, off the
//! hot path: the pusher task records a pending wake-up once per device and burst.

use crate::storage::BeginWrite as _;
use crate::storage::{stored_now, DevicePk, Store, StoreError};

/// A `push_registrations` row: device, endpoint, p256dh, auth.
type StoredPusher = (DevicePk, String, Option<Vec<u8>>, Option<Vec<u8>>);

fn pusher_of((device, endpoint, p256dh, auth): StoredPusher) -> PushRow {
    PushRow { device, endpoint, keys: p256dh.zip(auth) }
}

/// A device's push endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRow {
    /// The device.
    pub device: DevicePk,
    /// The push resource URL.
    pub endpoint: String,
    /// RFC 8291 keys (p256dh, auth), when registered.
    pub keys: Option<(Vec<u8>, Vec<u8>)>,
}

impl Store {
    /// Sets `device`'s push endpoint (replacing any).
    pub async fn set_pusher(&self, row: &PushRow) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let (p256dh, auth) = row.keys.clone().unzip();
            sqlx::query(
                "INSERT INTO push_registrations (device, endpoint, p256dh, auth, created_ts) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (device) DO UPDATE SET endpoint = excluded.endpoint, p256dh = excluded.p256dh, auth = excluded.auth, \
             created_ts = excluded.created_ts",
            )
            .bind(row.device)
            .bind(&row.endpoint)
            .bind(p256dh)
            .bind(auth)
            .bind(stored_now()?)
            .execute(pool)
            .await?;
            Ok(())
        })
    }

    /// Removes `device`'s push endpoint and its pending wake-up.
    pub async fn delete_pusher(&self, device: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            let mut tx = pool.begin_write().await?;
            sqlx::query("DELETE FROM push_registrations WHERE device = $1").bind(device).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM push_pending WHERE device = $1").bind(device).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// `device`'s push registration.
    pub async fn pushers_of(&self, device: DevicePk) -> Result<Option<PushRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let row: Option<StoredPusher> =
                sqlx::query_as("SELECT device, endpoint, p256dh, auth FROM push_registrations WHERE device = $1")
                    .bind(device)
                    .fetch_optional(pool)
                    .await?;
            Ok(row.map(pusher_of))
        })
    }

    /// Every push registration (loaded once at start).
    pub async fn pushers(&self) -> Result<Vec<PushRow>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows: Vec<StoredPusher> =
                sqlx::query_as("SELECT device, endpoint, p256dh, auth FROM push_registrations").fetch_all(pool).await?;
            Ok(rows.into_iter().map(pusher_of).collect())
        })
    }

    /// Records that `device` has a wake-up to get (once: a pending one stays as it is).
    pub async fn add_pending_push(&self, device: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("INSERT INTO push_pending (device, attempts, since_ts) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING")
                .bind(device)
                .bind(stored_now()?)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Records a failed attempt at `device`'s wake-up.
    pub async fn push_failed(&self, device: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("UPDATE push_pending SET attempts = attempts + 1 WHERE device = $1").bind(device).execute(pool).await?;
            Ok(())
        })
    }

    /// Forgets `device`'s pending wake-up (sent, or given up).
    pub async fn push_done(&self, device: DevicePk) -> Result<(), StoreError> {
        on_pool!(&self.pool, |pool| {
            sqlx::query("DELETE FROM push_pending WHERE device = $1").bind(device).execute(pool).await?;
            Ok(())
        })
    }

    /// Pending wake-ups with their failed attempts (loaded at start).
    pub async fn pending_pushes(&self) -> Result<Vec<(DevicePk, u32)>, StoreError> {
        on_pool!(&self.pool, |pool| {
            let rows: Vec<(DevicePk, i64)> = sqlx::query_as("SELECT device, attempts FROM push_pending").fetch_all(pool).await?;
            Ok(rows.into_iter().map(|(device, attempts)| (device, u32::try_from(attempts).unwrap_or(u32::MAX))).collect())
        })
    }
}
