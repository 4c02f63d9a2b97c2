//! A PostgreSQL for tests: `scripts/postgres.sh` finds one (the server on 127.0.0.1:5432, or
//! `PARLEY_TEST_POSTGRES`) or installs and starts a private cluster, once per test process;
//! each [`TestDb`] is a fresh database on it, dropped with it.

use anyhow::{bail, Context as _};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::path::PathBuf;
use tokio::sync::OnceCell;

/// The server's URL (a superuser, no password), as `scripts/postgres.sh` printed it.
pub async fn server_url() -> anyhow::Result<String> {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_try_init(|| async {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/postgres.sh");
        let output = tokio::process::Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .await
            .with_context(|| format!("running {}", script.display()))?;
        if !output.status.success() {
            bail!("{} failed ({}): no PostgreSQL for the tests", script.display(), output.status);
        }
        let url = String::from_utf8(output.stdout)?.trim().to_owned();
        if !url.starts_with("postgres://") {
            bail!("{} printed {url:?}, not a postgres:// URL", script.display());
        }
        Ok(url)
    })
    .await
    .cloned()
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).with_context(|| format!("parsing {url}"))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.to_string())
}

/// A fresh, empty database, dropped (connections and all) when this is.
pub struct TestDb {
    /// Its name (`parley_test_<random>`).
    pub name: String,
    /// Its URL.
    pub url: String,
    server: String,
}

impl TestDb {
    /// Creates a database of its own on the tests' PostgreSQL.
    pub async fn create() -> anyhow::Result<Self> {
        let server = server_url().await?;
        let name = format!("parley_test_{:016x}", rand::random::<u64>());
        let admin = PgPoolOptions::new().max_connections(1).connect(&server).await.context("connecting to PostgreSQL")?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await?;
        admin.close().await;
        Ok(Self { url: with_database(&server, &name)?, name, server })
    }

    /// A pool on this database.
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        Ok(PgPoolOptions::new().max_connections(4).connect(&self.url).await?)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if drop_databases(&self.server, std::slice::from_ref(&self.name)).is_err() {
            eprintln!("dropping test database {} failed", self.name);
        }
    }
}

/// Drops the databases `names` on the PostgreSQL at `server` (connections and all). Callable
/// from `Drop` inside a runtime, even a current-thread one: the drops run on a thread of their
/// own, with a runtime of their own.
pub fn drop_databases(server: &str, names: &[String]) -> anyhow::Result<()> {
    let (server, names) = (server.to_owned(), names.to_vec());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let admin = PgPoolOptions::new().max_connections(1).connect(&server).await?;
            for name in names {
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await?;
            }
            admin.close().await;
            anyhow::Ok(())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the drop thread panicked"))?
}
