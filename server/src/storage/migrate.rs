//! `parleyd migrate --to postgres://…`: copies a stopped server's SQLite database into an empty
//! PostgreSQL database (schema `server/migrations/postgres/`), table by table in one
//! PostgreSQL transaction, sets the identity sequences where SQLite's counters were, and
//! commits only when every table holds as many rows as in SQLite.
//!
//! The PostgreSQL schema's columns are SQLite's, in the same order and with mapped types
//! (`tests/it/postgres_schema.rs` holds them to that), so a row copies column by column:
//! INTEGER as `i64`, BLOB as bytes, TEXT as text.

use super::StoreError;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions as _, Connection as _, Row as _};
use std::borrow::Cow;

/// The PostgreSQL migrations: `(version, description, SQL)`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
    (2, "message id blocks", include_str!("../../migrations/postgres/0002_message_id_blocks.sql")),
    (3, "inbox heads", include_str!("../../migrations/postgres/0003_inbox_heads.sql")),
];

/// The newest PostgreSQL migration this build has.
pub const POSTGRES_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The SQLite schema version PostgreSQL's newest migration equals (0001 = SQLite 0001–0014;
/// 0002 and 0003 add only what several workers need).
pub const SQLITE_EQUIVALENT: i64 = 14;

/// Most bind parameters in one PostgreSQL statement (its limit is 65,535).
const MAX_PARAMETERS: usize = 60_000;

/// Most rows in one `INSERT`.
const MAX_ROWS: usize = 1_000;

/// Why a migration was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// There is no SQLite database to copy.
    #[error("no database at {0}")]
    NoDatabase(std::path::PathBuf),
    /// The SQLite database is not at the version the PostgreSQL schema equals.
    #[error(
        "the SQLite database is at schema version {found}; this parleyd copies version {SQLITE_EQUIVALENT} \
         (start this parleyd on it once to migrate it, then stop it and copy)"
    )]
    Version {
        /// Its newest migration.
        found: i64,
    },
    /// The target already has tables.
    #[error("the PostgreSQL database is not empty ({0} tables in its public schema); give an empty one")]
    NotEmpty(i64),
    /// A table's row count differs after the copy (nothing was committed).
    #[error("{table}: {sqlite} rows in SQLite, {postgres} in PostgreSQL after the copy; nothing was committed")]
    Count {
        /// The table.
        table: String,
        /// Rows in SQLite.
        sqlite: i64,
        /// Rows copied.
        postgres: i64,
    },
    /// A value of a column cannot be copied.
    #[error("{table}.{column}: {reason}")]
    Value {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Either database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for MigrateError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The PostgreSQL schema's migrator.
pub fn postgres_migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(*version, Cow::Borrowed(*description), MigrationType::Simple, Cow::Borrowed(*sql), false)
        })
        .collect();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

/// How a column's values are read from SQLite and bound for PostgreSQL.
#[derive(Clone, Copy)]
enum Kind {
    Integer,
    Blob,
    Text,
}

/// One value read from SQLite.
enum Value {
    Integer(Option<i64>),
    Blob(Option<Vec<u8>>),
    Text(Option<String>),
}

/// Rows copied per table, in copy order.
pub type Counts = Vec<(String, i64)>;

/// Copies the SQLite database at `sqlite` into the empty PostgreSQL database at `url`.
/// The caller makes sure no server uses `sqlite` meanwhile.
pub async fn sqlite_to_postgres(sqlite: &std::path::Path, url: &str) -> Result<Counts, MigrateError> {
    if !sqlite.is_file() {
        return Err(MigrateError::NoDatabase(sqlite.to_path_buf()));
    }
    let mut source = SqliteConnectOptions::new().filename(sqlite).read_only(true).connect().await?;
    // One read transaction: the copy sees one state of the database.
    sqlx::query("BEGIN").execute(&mut source).await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations").fetch_one(&mut source).await?;
    let found = found.unwrap_or(0);
    if found != SQLITE_EQUIVALENT {
        return Err(MigrateError::Version { found });
    }
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        .fetch_one(&pool)
        .await?;
    if tables > 0 {
        return Err(MigrateError::NotEmpty(tables));
    }
    postgres_migrator().run(&pool).await.map_err(StoreError::from)?;
    let mut target = pool.acquire().await?.detach();
    let mut txn = target.begin().await?;
    let counts = copy_tables(&mut source, &mut txn).await?;
    set_sequences(&mut source, &mut txn).await?;
    fill_inbox_heads(&mut txn).await?;
    txn.commit().await?;
    target.close().await?;
    sqlx::query("COMMIT").execute(&mut source).await?;
    source.close().await?;
    Ok(counts)
}

/// Copies every table, then checks its row count on both sides.
async fn copy_tables(source: &mut SqliteConnection, target: &mut PgConnection) -> Result<Counts, MigrateError> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         AND name <> '_sqlx_migrations' ORDER BY name",
    )
    .fetch_all(&mut *source)
    .await?;
    let mut counts = Counts::new();
    for table in parents_first(target, tables).await? {
        let columns: Vec<(String, Kind)> = sqlx::query("SELECT name, type FROM pragma_table_info($1) ORDER BY cid")
            .bind(&table)
            .fetch_all(&mut *source)
            .await?
            .into_iter()
            .map(|row| {
                let (name, declared): (String, String) = (row.get(0), row.get(1));
                let kind = match declared.to_ascii_uppercase().as_str() {
                    "INTEGER" => Kind::Integer,
                    "BLOB" => Kind::Blob,
                    "TEXT" => Kind::Text,
                    other => {
                        return Err(MigrateError::Value {
                            table: table.clone(),
                            column: name,
                            reason: format!("a column of type {other} has no PostgreSQL counterpart"),
                        })
                    }
                };
                Ok((name, kind))
            })
            .collect::<Result<_, _>>()?;
        let copied = copy_table(source, target, &table, &columns).await?;
        let sqlite: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(&mut *source).await?;
        let postgres: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{table}\"")).fetch_one(&mut *target).await?;
        if sqlite != postgres || copied != postgres {
            return Err(MigrateError::Count { table, sqlite, postgres });
        }
        counts.push((table, postgres));
    }
    Ok(counts)
}

/// `tables` ordered so that a table a foreign key refers to is copied before the tables that
/// refer to it (PostgreSQL checks each row as it arrives).
async fn parents_first(target: &mut PgConnection, mut tables: Vec<String>) -> Result<Vec<String>, MigrateError> {
    let references: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint \
         WHERE contype = 'f' AND conrelid <> confrelid",
    )
    .fetch_all(&mut *target)
    .await?;
    let mut ordered = Vec::with_capacity(tables.len());
    while !tables.is_empty() {
        let before = tables.len();
        let ready: Vec<String> = tables
            .iter()
            .filter(|t| {
                references.iter().all(|(child, parent)| child != *t || ordered.contains(parent) || !tables.contains(parent))
            })
            .cloned()
            .collect();
        tables.retain(|t| !ready.contains(t));
        ordered.extend(ready);
        if tables.len() == before {
            // A cycle of foreign keys: copy the rest as they are (the insert then says which).
            ordered.append(&mut tables);
        }
    }
    Ok(ordered)
}

/// Copies the rows of one table in multi-row `INSERT`s; the rows copied.
async fn copy_table(
    source: &mut SqliteConnection,
    target: &mut PgConnection,
    table: &str,
    columns: &[(String, Kind)],
) -> Result<i64, MigrateError> {
    use futures_util::TryStreamExt as _;
    let names = columns.iter().map(|(name, _)| format!("\"{name}\"")).collect::<Vec<_>>().join(", ");
    let per_insert = (MAX_PARAMETERS / columns.len().max(1)).clamp(1, MAX_ROWS);
    let select = format!("SELECT {names} FROM \"{table}\"");
    let mut rows = sqlx::query(&select).fetch(&mut *source);
    let mut chunk = Vec::with_capacity(per_insert);
    let mut copied = 0i64;
    loop {
        let row = rows.try_next().await?;
        let end = row.is_none();
        chunk.extend(row);
        if chunk.len() == per_insert || (end && !chunk.is_empty()) {
            copied += insert_rows(target, table, &names, columns, &chunk).await?;
            chunk.clear();
        }
        if end {
            return Ok(copied);
        }
    }
}

/// Inserts `rows` (read from SQLite) into `table` in one statement; the rows inserted.
async fn insert_rows(
    target: &mut PgConnection,
    table: &str,
    names: &str,
    columns: &[(String, Kind)],
    rows: &[sqlx::sqlite::SqliteRow],
) -> Result<i64, MigrateError> {
    let mut values = Vec::with_capacity(rows.len() * columns.len());
    for row in rows {
        for (i, (column, kind)) in columns.iter().enumerate() {
            let bad = |reason: String| MigrateError::Value { table: table.to_owned(), column: column.clone(), reason };
            values.push(match kind {
                Kind::Integer => Value::Integer(row.try_get(i).map_err(|e| bad(e.to_string()))?),
                Kind::Blob => Value::Blob(row.try_get(i).map_err(|e| bad(e.to_string()))?),
                Kind::Text => {
                    let text: Option<String> = row.try_get(i).map_err(|e| bad(e.to_string()))?;
                    if text.as_deref().is_some_and(|t| t.contains('\0')) {
                        return Err(bad("a text with a NUL character, which PostgreSQL cannot store".into()));
                    }
                    Value::Text(text)
                }
            });
        }
    }
    let placeholders = (0..rows.len())
        .map(|r| {
            let row = (1..=columns.len()).map(|c| format!("${}", r * columns.len() + c)).collect::<Vec<_>>().join(", ");
            format!("({row})")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("INSERT INTO \"{table}\" ({names}) VALUES {placeholders}");
    let mut insert = sqlx::query(&sql);
    for value in values {
        insert = match value {
            Value::Integer(v) => insert.bind(v),
            Value::Blob(v) => insert.bind(v),
            Value::Text(v) => insert.bind(v),
        };
    }
    Ok(i64::try_from(insert.execute(&mut *target).await?.rows_affected()).unwrap_or(i64::MAX))
}

/// Sets each identity sequence where SQLite would go on: past `sqlite_sequence` for an
/// AUTOINCREMENT table (ids of deleted rows are never handed out again: a federation cursor
/// may name one), past the largest id otherwise.
async fn set_sequences(source: &mut SqliteConnection, target: &mut PgConnection) -> Result<(), MigrateError> {
    let identities: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema = 'public' AND is_identity = 'YES' ORDER BY table_name",
    )
    .fetch_all(&mut *target)
    .await?;
    for (table, column) in identities {
        let counter: Option<i64> = sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = $1")
            .bind(&table)
            .fetch_optional(&mut *source)
            .await?;
        let largest: Option<i64> =
            sqlx::query_scalar(&format!("SELECT max(\"{column}\") FROM \"{table}\"")).fetch_one(&mut *source).await?;
        let last = counter.unwrap_or(0).max(largest.unwrap_or(0));
        // A sequence never used starts at 1; one that handed out `last` goes on after it.
        sqlx::query("SELECT setval(pg_get_serial_sequence($1, $2), $3, $4)")
            .bind(format!("\"{table}\""))
            .bind(&column)
            .bind(last.max(1))
            .bind(last >= 1)
            .execute(&mut *target)
            .await?;
    }
    // Message ids are reserved in blocks (0002): the next block starts past the largest id.
    let largest: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM messages").fetch_one(&mut *source).await?;
    if let Some(largest) = largest.filter(|largest| *largest >= 1) {
        sqlx::query("SELECT setval('message_id_blocks', $1, true)").bind(largest).execute(&mut *target).await?;
    }
    Ok(())
}

/// Gives every copied device its inbox head (0003), which SQLite does not keep: the largest
/// seq its inbox holds, or its `acked_seq` when that is larger (acknowledged rows are gone).
async fn fill_inbox_heads(target: &mut PgConnection) -> Result<(), MigrateError> {
    sqlx::query(
        "INSERT INTO inbox_heads (device, last_seq) \
         SELECT d.id, GREATEST(d.acked_seq, coalesce((SELECT max(seq) FROM inbox WHERE device = d.id), 0)) FROM devices d",
    )
    .execute(&mut *target)
    .await?;
    Ok(())
}
