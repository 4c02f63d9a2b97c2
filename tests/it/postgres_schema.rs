//! The PostgreSQL schema (`server/migrations/postgres/`) stays the SQLite schema's twin: every
//! table, column (in order, with its type and nullability) and named index that SQLite's
//! migrations make, PostgreSQL's make too. A SQLite migration without its PostgreSQL half fails
//! here. Both are applied for real: SQLite in memory, PostgreSQL in a fresh database. The
//! only tables PostgreSQL has on its own are those [`POSTGRES_ONLY`] names.

use parley_tests::postgres::TestDb;
use sqlx::Row as _;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Tables for several workers on one database, which SQLite (one process) has no use for.
const POSTGRES_ONLY: &[&str] = &["inbox_heads"];

/// `(column, type, not null)` in order, per table.
type Tables = BTreeMap<String, Vec<(String, String, bool)>>;

/// The `.sql` files of a migrations directory, in order.
fn migrations(dir: &str) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/migrations").join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "sql"));
    files.sort();
    files.into_iter().map(|p| Ok((p.clone(), std::fs::read_to_string(&p)?))).collect()
}

async fn sqlite_schema() -> anyhow::Result<(Tables, BTreeSet<String>)> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
    for (path, sql) in migrations("sqlite")? {
        sqlx::raw_sql(&sql).execute(&pool).await.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
            .fetch_all(&pool)
            .await?;
    let mut tables = Tables::new();
    for name in names {
        let columns = sqlx::query("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?) ORDER BY cid")
            .bind(&name)
            .fetch_all(&pool)
            .await?
            .into_iter()
            .map(|row| {
                let sqlite_type: String = row.get(1);
                let pg_type = match sqlite_type.to_ascii_uppercase().as_str() {
                    "INTEGER" => "bigint",
                    "BLOB" => "bytea",
                    "TEXT" => "text",
                    other => panic!("{name}: a column of type {other}: map it here and in the PostgreSQL schema"),
                };
                // A primary key column is NOT NULL in PostgreSQL whatever SQLite allowed.
                let not_null = row.get::<i64, _>(2) != 0 || row.get::<i64, _>(3) != 0;
                (row.get::<String, _>(0), pg_type.to_owned(), not_null)
            })
            .collect();
        tables.insert(name, columns);
    }
    let indexes =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL").fetch_all(&pool).await?;
    Ok((tables, indexes.into_iter().collect()))
}

async fn postgres_schema(db: &TestDb) -> anyhow::Result<(Tables, BTreeSet<String>)> {
    let pool = db.pool().await?;
    for (path, sql) in migrations("postgres")? {
        sqlx::raw_sql(&sql).execute(&pool).await.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let mut tables = Tables::new();
    let rows = sqlx::query(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'NO' FROM information_schema.columns \
         WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&pool)
    .await?;
    for row in rows {
        tables.entry(row.get(0)).or_default().push((row.get(1), row.get(2), row.get(3)));
    }
    let indexes =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'").fetch_all(&pool).await?;
    pool.close().await;
    Ok((tables, indexes.into_iter().collect()))
}

#[tokio::test]
async fn the_postgresql_schema_has_every_table_column_and_index_of_the_sqlite_one() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let (sqlite_tables, sqlite_indexes) = sqlite_schema().await?;
    let (pg_tables, pg_indexes) = postgres_schema(&db).await?;
    assert!(sqlite_tables.len() > 20, "the SQLite migrations made {} tables", sqlite_tables.len());
    let only_sqlite: Vec<_> = sqlite_tables.keys().filter(|t| !pg_tables.contains_key(*t)).collect();
    let only_pg: Vec<_> =
        pg_tables.keys().filter(|t| !sqlite_tables.contains_key(*t) && !POSTGRES_ONLY.contains(&t.as_str())).collect();
    assert!(
        only_sqlite.is_empty() && only_pg.is_empty(),
        "tables only in SQLite: {only_sqlite:?}; only in PostgreSQL: {only_pg:?}"
    );
    for (table, columns) in &sqlite_tables {
        assert_eq!(&pg_tables[table], columns, "{table}: columns (name, type, not null) in order");
    }
    let missing: Vec<_> = sqlite_indexes.difference(&pg_indexes).collect();
    assert!(missing.is_empty(), "indexes of the SQLite schema missing in PostgreSQL: {missing:?}");
    Ok(())
}
