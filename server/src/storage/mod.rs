//! Storage: the one place that talks to the database. Services call [`Store`] and never see
//! SQL, so a PostgreSQL backend can be added behind the same methods.
//!
//! Hot-path writes (messages, inbox events, acks) go through one writer task that commits
//! whatever has queued up in a single transaction ([`writer`], group commit): throughput does
//! not stop at one fsync per message, and an answer is given only after its commit.

/// Runs `$body` once per backend, with `$p` bound to that backend's pool (`&SqlitePool` or
/// `&PgPool`): the same query text, compiled for each driver. The second form also names, as
/// `$fns`, that backend's half of the calling module's `dual!` items.
macro_rules! on_pool {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            $crate::storage::Pool::Sqlite($p) => $body,
            $crate::storage::Pool::Postgres($p) => $body,
        }
    };
    ($pool:expr, |$p:ident, $fns:ident| $body:expr) => {
        match $pool {
            $crate::storage::Pool::Sqlite($p) => {
                use on_sqlite as $fns;
                $body
            }
            $crate::storage::Pool::Postgres($p) => {
                use on_postgres as $fns;
                $body
            }
        }
    };
}

/// Compiles `$item`s once per backend, as modules `on_sqlite` and `on_postgres` of the calling
/// module; in each, `Db` is the driver, `Conn` its connection and `PG` whether it is
/// PostgreSQL (for the few texts that differ, see the PostgreSQL schema's header, B list).
macro_rules! dual {
    ($($item:item)*) => {
        #[allow(dead_code, unused_imports)]
        pub(super) mod on_sqlite {
            use super::*;
            pub(super) use $crate::storage::writer::on_sqlite as writer_steps;
            type DbRow = <Db as sqlx::Database>::Row;
            type Db = sqlx::Sqlite;
            type Conn = sqlx::SqliteConnection;
            const PG: bool = false;
            $($item)*
        }
        #[allow(dead_code, unused_imports)]
        pub(super) mod on_postgres {
            use super::*;
            pub(super) use $crate::storage::writer::on_postgres as writer_steps;
            type DbRow = <Db as sqlx::Database>::Row;
            type Db = sqlx::Postgres;
            type Conn = sqlx::PgConnection;
            const PG: bool = true;
            $($item)*
        }
    };
}

pub mod migrate;
mod store;
pub mod writer;

pub use store::{AdmitError, Admitted, DestinationLeases, PushRow, UploadLimits, UploadRow};
pub use store::{GroupDeviceRow, GroupMessageRow, HubUpdate, KeyPackageUpload, KeyUpload, MessageRoutes, NewKeyPackage, Store};
pub use writer::{Effects, InboundItem, LiveEvents, MessageOutcome, NewEvent, NewMessage, Outbound, RemoteMessage, Subscribers};

use bytes::Bytes;
use parley_spec::{Seq, ServerMsgId, ServerName, Timestamp, UserId};
use std::sync::Arc;

/// Internal key of a user row.
pub type UserPk = i64;
/// Internal key of a device row (never reused, unlike device ids which are per user).
pub type DevicePk = i64;

/// The sender and id of a message, kept with each inbox entry to produce delivered receipts.
pub type Origin = (Arc<str>, ServerMsgId);

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint rejected the write (a taken username, for example).
    #[error("already exists")]
    Conflict,
    /// A registration token is unknown, used up or expired.
    #[error("registration token rejected")]
    TokenRejected,
    /// A count limit was reached (devices per user).
    #[error("limit reached")]
    TooMany,
    /// The writer's queue is full or the writer stopped (shutting down).
    #[error("storage unavailable")]
    Unavailable,
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The database failed under the writer's own SQLite connection.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database was migrated by a newer parleyd: this one would misread it.
    #[error(
        "the database's schema is version {found}, newer than this parleyd knows (up to {known}); \
         run the parleyd release that migrated it, or a newer one"
    )]
    SchemaTooNew {
        /// The newest migration applied to the database.
        found: i64,
        /// The newest migration this build has.
        known: i64,
    },
    /// A stored value does not parse as the type it was written from.
    #[error("corrupt value in the database: {0}")]
    Corrupt(String),
    /// The database file cannot be created or its permissions cannot be set.
    #[error("database file: {0}")]
    File(#[from] std::io::Error),
    /// The writer's thread or its runtime could not be started.
    #[error("starting the storage writer: {0}")]
    WriterStart(std::io::Error),
    /// A number does not fit its column (a stored `i64` below 0, or a `u64` above `i64::MAX`).
    #[error("stored integer: {0}")]
    OutOfRange(#[from] parley_spec::OutOfRange),
}

/// A user account.
#[derive(Debug, Clone)]
pub struct UserRow {
    /// Internal key.
    pub pk: UserPk,
    /// Localpart.
    pub localpart: String,
    /// PHC string of the argon2id hash.
    pub password_hash: String,
    /// Presence privacy setting (stored form).
    pub visibility: String,
    /// When the user was last online.
    pub last_seen_ts: Option<Timestamp>,
}

/// The device an access token belongs to.
#[derive(Debug, Clone)]
pub struct AuthRow {
    /// User key.
    pub user_pk: UserPk,
    /// User localpart.
    pub localpart: String,
    /// Device key.
    pub device_pk: DevicePk,
    /// Device id.
    pub device_id: String,
}

/// A device as listed to its owner.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// Internal key.
    pub pk: DevicePk,
    /// Device id.
    pub device_id: String,
    /// Human name.
    pub display_name: Option<String>,
    /// Creation time.
    pub created_ts: Timestamp,
    /// Last connection time.
    pub last_seen_ts: Option<Timestamp>,
}

/// An inbox entry as read back.
#[derive(Debug, Clone)]
pub struct InboxRow {
    /// Position in the device's inbox.
    pub seq: Seq,
    /// For message events: who sent it and its id (to produce delivered receipts).
    pub origin: Option<Origin>,
    /// The event JSON.
    pub payload: Bytes,
    /// When the commit that stored it finished (live events only; for the delivery metric).
    pub committed_at: Option<std::time::Instant>,
}

/// The connections of one backend: the embedded SQLite file, or a PostgreSQL server.
#[derive(Clone, Debug)]
pub enum Pool {
    /// SQLite (WAL).
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
}

impl Pool {
    /// Whether it is PostgreSQL (for the few query texts that differ).
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }
}

/// The advisory lock every PostgreSQL write transaction holds to its commit: the pool's
/// read-check-write transactions hold it exclusively, what SQLite's `BEGIN IMMEDIATE` gives,
/// one at a time, so no check is raced and `fed_outbound`'s sequence numbers become visible in
/// order (the PostgreSQL schema's header, B9). The writers' batches (one per worker) hold it
/// shared: they run beside each other, and each locks the queues and inboxes it adds to
/// (`writer::rows::BatchRows::lock_batch`), which orders what they write.
const WRITE_LOCK: i64 = 0x5061_726c_6579; // "Parley"

/// Takes [`WRITE_LOCK`] exclusively for the PostgreSQL transaction `conn` is in (held to its end).
async fn lock_writes(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITE_LOCK).execute(conn).await?;
    Ok(())
}

/// A transaction that may write, taken from a pool as the backend needs (see [`WRITE_LOCK`]).
pub(crate) trait BeginWrite {
    /// The backend.
    type Db: sqlx::Database;
    /// Begins it.
    fn begin_write(&self) -> impl std::future::Future<Output = Result<sqlx::Transaction<'static, Self::Db>, sqlx::Error>> + Send;
}

impl BeginWrite for sqlx::SqlitePool {
    type Db = sqlx::Sqlite;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl BeginWrite for sqlx::PgPool {
    type Db = sqlx::Postgres;
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin().await?;
        lock_writes(&mut tx).await?;
        Ok(tx)
    }
}

/// The same on a connection of its own (the writer's; on PostgreSQL it holds [`WRITE_LOCK`]
/// shared).
pub(crate) trait BeginWriteOn {
    /// The backend.
    type Db: sqlx::Database;
    /// Begins it.
    fn begin_write(&mut self) -> impl std::future::Future<Output = Result<sqlx::Transaction<'_, Self::Db>, sqlx::Error>> + Send;
}

impl BeginWriteOn for sqlx::SqliteConnection {
    type Db = sqlx::Sqlite;
    async fn begin_write(&mut self) -> Result<sqlx::Transaction<'_, sqlx::Sqlite>, sqlx::Error> {
        sqlx::Connection::begin_with(self, "BEGIN IMMEDIATE").await
    }
}

impl BeginWriteOn for sqlx::PgConnection {
    type Db = sqlx::Postgres;
    async fn begin_write(&mut self) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
        let mut tx = sqlx::Connection::begin(self).await?;
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)").bind(WRITE_LOCK).execute(&mut *tx).await?;
        Ok(tx)
    }
}

/// The current time in its stored form (milliseconds since the epoch).
fn stored_now() -> Result<i64, StoreError> {
    Ok(i64::try_from(Timestamp::now())?)
}

/// Creates the data directory (and missing parents) readable by its owner only, whatever the
/// umask. An existing directory keeps its mode (the operator chose it; the files in it are
/// private anyway), with a warning when others may list it.
pub fn create_data_dir(path: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        builder.mode(0o700);
        let existed = path.is_dir();
        builder.create(path)?;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if existed && mode & 0o077 != 0 {
            tracing::warn!(dir = %path.display(), mode = format_args!("{mode:o}"), "the data directory is accessible to other users");
        }
        Ok(())
    }
    #[cfg(not(unix))]
    builder.create(path)
}

/// Why the data directory cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another parleyd uses the data directory {0} (it holds {0}/parleyd.lock); stop it first")]
    Held(std::path::PathBuf),
    /// The lock file cannot be opened.
    #[error("lock file in {0}: {1}")]
    File(std::path::PathBuf, std::io::Error),
}

/// Takes the data directory for this process (`<dir>/parleyd.lock`, an exclusive advisory
/// lock held until the returned file is dropped): one server per directory, and no copy of
/// the database while a server runs on it.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, LockError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(dir.join("parleyd.lock")).map_err(|e| LockError::File(dir.to_path_buf(), e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(LockError::File(dir.to_path_buf(), e)),
    }
}

/// Stores for the storage unit tests, on the run's backend: SQLite in the test's directory, or
/// with `PARLEY_TEST_BACKEND=postgres` a fresh database on the server `PARLEY_TEST_POSTGRES`
/// names (`scripts/test.sh` sets both), dropped with the [`TestStore`].
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::config::Config;

    /// One inbox event for `device` whose payload is `text`.
    pub fn event(device: DevicePk, text: &str) -> Effects {
        Effects {
            events: vec![NewEvent { device, origin: None, payload: bytes::Bytes::from(text.to_owned()) }],
            ..Effects::default()
        }
    }

    /// Alice's one device, its inbox holding "one", "two" and "three" at 1–3.
    pub async fn device_with_three_events(store: &Store) -> DevicePk {
        let user = store.create_user("alice", "hash", false).await.unwrap();
        let device = store.create_device(user, "DEV", None, b"token", 10).await.unwrap();
        for text in ["one", "two", "three"] {
            store.append(event(device, text)).await.unwrap();
        }
        device
    }

    /// Whether this run's tests use PostgreSQL.
    pub fn postgres() -> bool {
        std::env::var("PARLEY_TEST_BACKEND").is_ok_and(|b| b == "postgres")
    }

    /// A database of a test's own on the tests' PostgreSQL, dropped with it.
    pub struct TestDatabase {
        server: String,
        name: String,
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            let (server, name) = (self.server.clone(), self.name.clone());
            // Dropped inside a runtime: the DROP runs on a thread with a runtime of its own.
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async {
                    let admin = sqlx::PgPool::connect(&server).await?;
                    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
                    admin.close().await;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })
            });
            if let Ok(Err(error)) = dropped.join() {
                eprintln!("dropping test database {}: {error}", self.name);
            }
        }
    }

    /// The configuration of a store in `dir` on the run's backend (and its database, to be
    /// kept as long as the store).
    pub async fn config(dir: &std::path::Path) -> (Config, Option<TestDatabase>) {
        let mut config = Config { data_dir: dir.to_path_buf(), ..Config::default() };
        if !postgres() {
            return (config, None);
        }
        let server = std::env::var("PARLEY_TEST_POSTGRES")
            .expect("PARLEY_TEST_BACKEND=postgres needs PARLEY_TEST_POSTGRES (scripts/test.sh sets it)");
        let name = format!("parley_unit_{:016x}", rand::random::<u64>());
        let admin = sqlx::PgPool::connect(&server).await.expect("connecting to the tests' PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("CREATE DATABASE");
        admin.close().await;
        let mut url = reqwest::Url::parse(&server).expect("PARLEY_TEST_POSTGRES is a URL");
        url.set_path(&format!("/{name}"));
        config.storage.database_url = Some(url.to_string());
        (config, Some(TestDatabase { server, name }))
    }

    /// An open store and its database.
    pub struct TestStore {
        /// The store.
        pub store: Store,
        _database: Option<TestDatabase>,
    }

    impl std::ops::Deref for TestStore {
        type Target = Store;
        fn deref(&self) -> &Store {
            &self.store
        }
    }

    /// Opens a store in `dir` on the run's backend, with `tweak` applied to its configuration.
    pub async fn open_with(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> TestStore {
        let (mut config, database) = config(dir).await;
        tweak(&mut config);
        let store =
            Store::open(&config, crate::metrics::Metrics::new(), writer::Subscribers::default()).await.expect("store opens").0;
        TestStore { store, _database: database }
    }

    /// Opens a store in `dir` on the run's backend.
    pub async fn open(dir: &std::path::Path) -> TestStore {
        open_with(dir, |_| {}).await
    }
}
