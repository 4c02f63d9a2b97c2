//! Test harness: starts homeservers on loopback ports chosen by the OS, each with its own
//! temporary data directory, and can stop and restart them on the same port. Used by the
//! integration tests (`tests/it`) and the `parley-bench` binary.
//!
//! Two tiers, one API ([`TestServer`]):
//! - **in-process** ([`TestServer::start`]): the server's own `Server::open` + `Server::run`
//!   on its own multi-threaded runtime inside the test process, its log captured apart from
//!   every other server's (a thread-local tracing dispatcher on the runtime's threads). Starts
//!   in milliseconds; for every test that needs no crash;
//! - **process** ([`TestServer::process`]): a real `parleyd` child process, for what only a
//!   process has: SIGKILL ([`TestServer::kill`]), its own memory to measure
//!   ([`TestServer::pid`]), its own file mode creation mask, the benchmarks.

pub mod dns;
pub mod fednet;
pub mod nats;
pub mod postgres;
pub mod proxy;
pub mod push;
pub mod s3;

use anyhow::{bail, Context as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

/// Configuration every test server gets unless the test overrides it: cheap password hashing
/// (tests register many users) and rate limits high enough not to disturb ordinary tests.
pub const TEST_CONFIG: &str = r#"
[auth]
argon2_memory_kib = 64
argon2_iterations = 1
argon2_parallelism = 1

[rate_limits]
device_per_second = 100000
device_burst = 100000
control_per_second = 100000
control_burst = 100000
account_per_second = 100000
account_burst = 100000
ip_per_second = 100000
ip_burst = 100000
auth_per_minute = 1000000
auth_burst = 100000
login_per_account_per_minute = 1000000
login_per_account_burst = 100000
"#;

/// The `parleyd` binary under test: `parleyd-it` (the same entry point as `parleyd`, built by
/// cargo with this package's tests and binaries), found next to the running executable.
pub fn parleyd_path() -> &'static Path {
    static PARLEYD: OnceLock<PathBuf> = OnceLock::new();
    PARLEYD.get_or_init(|| {
        let exe = std::env::current_exe().expect("current executable path");
        let mut dir = exe.parent().expect("executable directory").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        dir.join("parleyd-it")
    })
}

/// Where test servers keep their state: `PARLEY_TEST_BACKEND=postgres` puts every
/// [`TestServer`] on a fresh PostgreSQL database of its own ([`postgres::TestDb`]); unset or
/// `sqlite`, on the SQLite file in its data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// The backend this test run uses (see [`Backend`]).
pub fn backend() -> Backend {
    match std::env::var("PARLEY_TEST_BACKEND").as_deref() {
        Ok("postgres") => Backend::Postgres,
        Ok("sqlite") | Ok("") | Err(_) => Backend::Sqlite,
        Ok(other) => panic!("PARLEY_TEST_BACKEND={other}: expected sqlite or postgres"),
    }
}

/// How a [`TestServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside the test process, on a runtime of its own.
    InProcess,
    /// A `parleyd` child process.
    Process,
}

/// What runs while a [`TestServer`] is up.
enum Running {
    Process(Child),
    InProcess(InProcess),
}

/// A server running inside the test process.
struct InProcess {
    /// Its runtime: dropped in the background, since a test's own runtime may not block.
    runtime: Option<tokio::runtime::Runtime>,
    /// Starts the graceful shutdown (dropping it does too).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// `Server::run`'s result, once it returned.
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A running homeserver: in-process or a `parleyd` process (see the crate documentation).
pub struct TestServer {
    mode: Mode,
    running: Option<Running>,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The bound address (kept across restarts).
    pub addr: SocketAddr,
    /// The federation listener's address when federation is enabled (kept across restarts).
    pub federation_addr: Option<SocketAddr>,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
    /// Notified after every log line.
    logged: Arc<tokio::sync::Notify>,
    /// File mode creation mask the process starts with (None: inherited).
    umask: Option<u32>,
    /// Environment variables the process starts with, besides the inherited ones.
    env: Vec<(String, String)>,
    /// Where it keeps its state ([`backend`] unless set with [`with_backend`](Self::with_backend)).
    backend: Backend,
    /// Its PostgreSQL database (with [`Backend::Postgres`]), made at the first start.
    postgres: Option<postgres::TestDb>,
    /// Another server's PostgreSQL database it works on too (a second worker).
    shared_database: Option<String>,
}

impl TestServer {
    /// Starts an in-process server with [`TEST_CONFIG`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("").await
    }

    /// Starts an in-process server with [`TEST_CONFIG`] followed by `extra` TOML (which may
    /// override it; later tables with the same name are merged by hand below).
    pub async fn start_with(extra: &str) -> anyhow::Result<Self> {
        Self::start_as(Mode::InProcess, extra).await
    }

    /// Starts a `parleyd` process with [`TEST_CONFIG`].
    pub async fn process() -> anyhow::Result<Self> {
        Self::start_as(Mode::Process, "").await
    }

    /// Starts a `parleyd` process with [`TEST_CONFIG`] followed by `extra` TOML.
    pub async fn process_with(extra: &str) -> anyhow::Result<Self> {
        Self::start_as(Mode::Process, extra).await
    }

    /// Starts an in-process server on `backend`, whatever the run's, with [`TEST_CONFIG`]
    /// followed by `extra` TOML (see [`with_backend`](Self::with_backend)).
    pub async fn start_on(backend: Backend, extra: &str) -> anyhow::Result<Self> {
        let mut server = Self::prepare_as(Mode::InProcess, extra)?.with_backend(backend);
        server.spawn().await?;
        Ok(server)
    }

    /// Starts a server of `mode` with [`TEST_CONFIG`] followed by `extra` TOML.
    pub async fn start_as(mode: Mode, extra: &str) -> anyhow::Result<Self> {
        let mut server = Self::prepare_as(mode, extra)?;
        server.spawn().await?;
        Ok(server)
    }

    /// A `parleyd` process with [`TEST_CONFIG`] and `extra` that is not running yet: the test
    /// can set things up (the data directory, [`with_umask`](Self::with_umask)) and then
    /// [`restart`](Self::restart) it.
    pub fn prepare(extra: &str) -> anyhow::Result<Self> {
        Self::prepare_as(Mode::Process, extra)
    }

    /// A server of `mode` with [`TEST_CONFIG`] and `extra` that is not running yet.
    pub fn prepare_as(mode: Mode, extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = merge_toml(TEST_CONFIG, extra)?;
        std::fs::write(dir.path().join("parleyd.toml"), config)?;
        let logs = Arc::new(Mutex::new(String::new()));
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let logged = Arc::default();
        Ok(Self {
            mode,
            running: None,
            base_url: String::new(),
            addr,
            federation_addr: None,
            dir,
            logs,
            logged,
            umask: None,
            env: Vec::new(),
            backend: backend(),
            postgres: None,
            shared_database: None,
        })
    }

    /// How this server runs.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Keeps its state on `backend` whatever the run's (for tests of one backend's own
    /// behaviour: SQLite's files, a migration from SQLite). Before the first start.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        assert!(self.running.is_none() && self.postgres.is_none(), "set the backend before the first start");
        self.backend = backend;
        self
    }

    /// Runs on `db` from the next [`restart`](Self::restart) on (a server whose SQLite
    /// database was migrated there). While stopped.
    pub fn move_to_postgres(&mut self, db: postgres::TestDb) -> anyhow::Result<()> {
        if self.running.is_some() {
            bail!("stop the server before moving it");
        }
        self.backend = Backend::Postgres;
        self.postgres = Some(db);
        Ok(())
    }

    /// Makes this (not yet started) server another worker of `first`, which runs: the same
    /// PostgreSQL database and the same server key (copied into this one's data directory).
    /// Both need the same `[cluster]` configuration.
    pub fn worker_of(mut self, first: &TestServer) -> anyhow::Result<Self> {
        let url = first.database_url().context("the first worker runs on PostgreSQL")?.to_owned();
        if self.running.is_some() {
            bail!("make it a worker before it starts");
        }
        std::fs::create_dir_all(self.data_dir())?;
        std::fs::copy(first.data_dir().join("server.key"), self.data_dir().join("server.key"))?;
        self.backend = Backend::Postgres;
        self.shared_database = Some(url);
        Ok(self)
    }

    /// Where it keeps its state.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Its PostgreSQL database's URL (with [`Backend::Postgres`], once started): what a
    /// `parleyd` command run beside it needs as `PARLEY__STORAGE__DATABASE_URL`.
    pub fn database_url(&self) -> Option<&str> {
        self.postgres.as_ref().map(|db| db.url.as_str()).or(self.shared_database.as_deref())
    }

    /// Everything the database holds, as bytes to search for what must not be there: with
    /// SQLite its files (the database, its write-ahead log); with PostgreSQL every row of every
    /// table as text (`bytea` values in hex, `\x…`).
    pub async fn stored_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut raw = Vec::new();
        if self.database_url().is_none() {
            for entry in std::fs::read_dir(self.data_dir())? {
                let path = entry?.path();
                if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("parley.db")) {
                    raw.extend(std::fs::read(&path)?);
                }
            }
            return Ok(raw);
        }
        let db = self.db().await?;
        let tables: Vec<String> =
            sqlx::query_scalar("SELECT tablename::TEXT FROM pg_tables WHERE schemaname = 'public'").fetch_all(&db).await?;
        for table in tables {
            let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::TEXT FROM \"{table}\" t")).fetch_all(&db).await?;
            for row in rows {
                raw.extend(row.into_bytes());
            }
        }
        db.close().await;
        Ok(raw)
    }

    /// Starts the process (at every later start too) with this file mode creation mask (the
    /// mask belongs to a process: a `parleyd` process only).
    pub fn with_umask(mut self, umask: u32) -> Self {
        assert_eq!(self.mode, Mode::Process, "a file mode creation mask needs a parleyd process");
        self.umask = Some(umask);
        self
    }

    /// Starts the process (at every later start too) with `key` set to `value` in its
    /// environment (a `parleyd` process only).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        assert_eq!(self.mode, Mode::Process, "an environment needs a parleyd process");
        self.env.push((key.into(), value.into()));
        self
    }

    /// Replaces the whole configuration file (not merged with [`TEST_CONFIG`]); it takes
    /// effect at the next [`restart`](Self::restart).
    pub fn replace_config(&self, config: &str) -> anyhow::Result<()> {
        toml::from_str::<toml::Table>(config).context("the configuration is not TOML")?;
        Ok(std::fs::write(self.dir.path().join("parleyd.toml"), config)?)
    }

    /// The data directory (database file lives here).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Everything the server logged so far (a process: its stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (up to `timeout`) until the server logged a line containing every one of `parts`;
    /// returns that line.
    pub async fn wait_for_log(&self, parts: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let logged = self.logged.notified();
            tokio::pin!(logged);
            // Registered before looking, so a line written in between still wakes us.
            logged.as_mut().enable();
            if let Some(line) = self.logs().lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return Ok(line.to_owned());
            }
            tokio::time::timeout_at(deadline, logged)
                .await
                .with_context(|| format!("no log line with {parts:?} within {timeout:?}"))?;
        }
    }

    /// The server's database while it runs, whichever the backend (tests look at what it
    /// stored, which couples them to the schema: keep such reads here). Queries use `$N`
    /// placeholders, which both backends read.
    pub async fn db(&self) -> anyhow::Result<sqlx::AnyPool> {
        sqlx::any::install_default_drivers();
        let url = match self.database_url() {
            Some(url) => url.to_owned(),
            None => format!("sqlite://{}?mode=ro", self.data_dir().join("parley.db").display()),
        };
        Ok(sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await?)
    }

    /// The server's database, writable: for tests that play a malicious server (best done
    /// while it is stopped).
    pub async fn db_writable(&self) -> anyhow::Result<sqlx::AnyPool> {
        sqlx::any::install_default_drivers();
        let url = match self.database_url() {
            Some(url) => url.to_owned(),
            None => format!("sqlite://{}?mode=rw", self.data_dir().join("parley.db").display()),
        };
        Ok(sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await?)
    }

    /// Inbox rows of messages from `sender` (a user id): (rows, distinct message ids).
    pub async fn inbox_rows_from(&self, sender: &str) -> anyhow::Result<(i64, i64)> {
        let db = self.db().await?;
        let row: (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT msg_id) FROM inbox WHERE sender = $1")
            .bind(sender)
            .fetch_one(&db)
            .await?;
        db.close().await;
        Ok(row)
    }

    /// Federation items queued for `destination` and not yet delivered.
    pub async fn queued_for(&self, destination: &str) -> anyhow::Result<i64> {
        let db = self.db().await?;
        let count = sqlx::query_scalar("SELECT count(*) FROM fed_outbound WHERE destination = $1")
            .bind(destination)
            .fetch_one(&db)
            .await?;
        db.close().await;
        Ok(count)
    }

    /// The `(origin, txn_id)` rows of `fed_inbound_txns` (inbound transactions applied).
    pub async fn inbound_txns(&self) -> anyhow::Result<Vec<(String, String)>> {
        let db = self.db().await?;
        let rows = sqlx::query_as("SELECT origin, txn_id FROM fed_inbound_txns ORDER BY origin, txn_id").fetch_all(&db).await?;
        db.close().await;
        Ok(rows)
    }

    /// A counter of the server's Prometheus metrics (`parley_<name>_total`).
    pub async fn counter(&self, name: &str) -> anyhow::Result<u64> {
        let [total] = self.metric_values(name, ["total"]).await?;
        Ok(total as u64)
    }

    /// A histogram of the server's Prometheus metrics (`parley_<name>`): its count and sum.
    pub async fn histogram(&self, name: &str) -> anyhow::Result<(u64, f64)> {
        let [count, sum] = self.metric_values(name, ["count", "sum"]).await?;
        Ok((count as u64, sum))
    }

    /// The values of `parley_<name>_<suffix>` for each suffix, from one read of `/metrics`.
    async fn metric_values<const N: usize>(&self, name: &str, suffixes: [&str; N]) -> anyhow::Result<[f64; N]> {
        let text = reqwest::get(format!("{}/metrics", self.base_url)).await?.text().await?;
        let mut values = [0.0; N];
        for (value, suffix) in values.iter_mut().zip(suffixes) {
            let metric = format!("parley_{name}_{suffix} ");
            let line = text.lines().find(|l| l.starts_with(&metric)).with_context(|| format!("no {metric} in /metrics"))?;
            *value = line[metric.len()..].trim().parse::<f64>()?;
        }
        Ok(values)
    }

    /// The OS process id (a `parleyd` process only; `None` in-process).
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Some(Running::Process(child)) => child.id(),
            _ => None,
        }
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        if self.backend == Backend::Postgres && self.postgres.is_none() && self.shared_database.is_none() {
            self.postgres = Some(postgres::TestDb::create().await?);
        }
        match self.mode {
            Mode::Process => self.spawn_process().await,
            Mode::InProcess => self.spawn_in_process().await,
        }
    }

    /// Opens the server on a runtime of its own and serves until [`stop`](Self::stop) (or
    /// until dropped). The configuration is loaded as `parleyd` loads it: the file, then the
    /// data directory and listen address as flags.
    async fn spawn_in_process(&mut self) -> anyhow::Result<()> {
        #[derive(serde::Serialize)]
        struct Flags {
            data_dir: PathBuf,
            listen: SocketAddr,
            #[serde(skip_serializing_if = "Option::is_none")]
            storage: Option<Storage>,
        }
        #[derive(serde::Serialize)]
        struct Storage {
            database_url: String,
        }
        // A test process holds both ends of every connection.
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let storage = self.database_url().map(|url| Storage { database_url: url.to_owned() });
        let flags = Flags { data_dir: self.data_dir(), listen: self.addr, storage };
        let mut config = parley_server::config::Config::load(Some(&self.dir.path().join("parleyd.toml")), flags)?;
        // Bound here, so the addresses are known before the server runs (and kept on restart).
        let listener = std::net::TcpListener::bind(self.addr).with_context(|| format!("binding {}", self.addr))?;
        listener.set_nonblocking(true)?;
        let federation_listener = if config.federation.enabled {
            let bind = self.federation_addr.unwrap_or(config.federation.listen);
            let federation = std::net::TcpListener::bind(bind).with_context(|| format!("binding {bind} (federation)"))?;
            federation.set_nonblocking(true)?;
            config.federation.listen = federation.local_addr()?;
            self.federation_addr = Some(config.federation.listen);
            Some(federation)
        } else {
            None
        };
        self.addr = listener.local_addr()?;
        config.listen = self.addr;
        self.base_url = format!("http://{}", self.addr);

        let filter = std::env::var("PARLEY_TEST_LOG").unwrap_or_else(|_| "info".into());
        let log = CapturedLog { logs: self.logs.clone(), logged: self.logged.clone() };
        let dispatch = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter)?)
                .with_writer(log)
                .with_ansi(false)
                .finish(),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("parleyd-in-process")
            .enable_all()
            .on_thread_start(move || {
                // This runtime's threads log to this server's capture for as long as they live.
                std::mem::forget(tracing::dispatcher::set_default(&dispatch));
            })
            .build()?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let opened = async {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let federation_listener = federation_listener.map(tokio::net::TcpListener::from_std).transpose()?;
                let server = parley_server::app::Server::open(config).await?;
                anyhow::Ok((server, listener, federation_listener))
            };
            match opened.await {
                Ok((server, listener, federation_listener)) => {
                    let _ = ready_tx.send(Ok(()));
                    let result = server
                        .run(listener, federation_listener, async move {
                            let _ = stop_rx.await;
                        })
                        .await;
                    tracing::info!("stopped");
                    let _ = done_tx.send(result);
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                }
            }
        });
        let mut running = InProcess { runtime: Some(runtime), stop: Some(stop_tx), done: done_rx };
        match tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => return Err(error.context(format!("the server did not start; logs:\n{}", self.logs()))),
            Ok(Err(_)) => bail!("the server's start panicked; logs:\n{}", self.logs()),
            Err(_) => {
                drop(running.stop.take());
                bail!("the server did not start within 60 s")
            }
        }
        self.running = Some(Running::InProcess(running));
        Ok(())
    }

    async fn spawn_process(&mut self) -> anyhow::Result<()> {
        let binary = parleyd_path();
        if !binary.exists() {
            bail!("{} not found: build it with `cargo build -p parley-tests --bins`", binary.display());
        }
        let mut command = match self.umask {
            // The shell sets the mask and then becomes parleyd (same pid).
            Some(umask) => {
                let mut command = Command::new("/bin/sh");
                command.arg("-c").arg(format!("umask {umask:03o} && exec \"$0\" \"$@\"")).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        if let Some(addr) = self.federation_addr {
            command.env("PARLEY__FEDERATION__LISTEN", addr.to_string());
        }
        if let Some(url) = self.database_url() {
            command.env("PARLEY__STORAGE__DATABASE_URL", url);
        }
        let mut child = command
            .arg("--config")
            .arg(self.dir.path().join("parleyd.toml"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr.to_string())
            .env("RUST_LOG", std::env::var("PARLEY_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning parleyd")?;
        let stderr = child.stderr.take().context("stderr")?;
        let logs = self.logs.clone();
        let logged = self.logged.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut logs) = logs.lock() {
                    logs.push_str(&line);
                    logs.push('\n');
                }
                logged.notify_waiters();
            }
        });
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let mut line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("parleyd did not start within 60 s")??
            .with_context(|| format!("parleyd exited before listening; logs:\n{}", self.logs()))?;
        if let Some(rest) = line.strip_prefix("parleyd federation listening on https://") {
            self.federation_addr = Some(rest.trim().parse()?);
            line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .context("parleyd did not start within 60 s")??
                .with_context(|| format!("parleyd exited before listening; logs:\n{}", self.logs()))?;
        }
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .with_context(|| format!("unexpected first line: {line}"))?;
        self.addr = addr.parse()?;
        self.base_url = format!("http://{}", self.addr);
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.running = Some(Running::Process(child));
        Ok(())
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and waits for it to die.
    /// Only a `parleyd` process can be killed: an in-process server is an error.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        match self.running.take() {
            Some(Running::Process(mut child)) => {
                child.start_kill()?;
                child.wait().await?;
                Ok(())
            }
            Some(running @ Running::InProcess(_)) => {
                self.running = Some(running);
                bail!("an in-process server cannot be killed: start it with TestServer::process")
            }
            None => Ok(()),
        }
    }

    /// Stops the server gracefully (a process: SIGTERM) and waits until it has finished: its
    /// connections closed, its writes committed. In-process, the status is success when
    /// `Server::run` returned `Ok`.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt as _;
        match self.running.take() {
            None => bail!("not running"),
            Some(Running::Process(mut child)) => {
                let pid = child.id().context("pid")?;
                let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
                if !status.success() {
                    bail!("kill -TERM {pid} failed");
                }
                Ok(tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .context("parleyd did not stop within 30 s")??)
            }
            Some(Running::InProcess(mut running)) => {
                drop(running.stop.take());
                let result = tokio::time::timeout(Duration::from_secs(30), &mut running.done)
                    .await
                    .context("the server did not stop within 30 s")?;
                // The runtime (with whatever tasks are left) goes when `running` drops.
                Ok(match result {
                    Ok(Ok(())) => std::process::ExitStatus::from_raw(0),
                    _ => std::process::ExitStatus::from_raw(1 << 8),
                })
            }
        }
    }

    /// Starts the server again on the same port with the same data (or for the first time,
    /// after [`prepare`](Self::prepare)).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.running.is_some() {
            bail!("still running");
        }
        self.spawn().await
    }
}

/// Where an in-process server's log lines go: the server's buffer, waking
/// [`TestServer::wait_for_log`].
#[derive(Clone)]
struct CapturedLog {
    logs: Arc<Mutex<String>>,
    logged: Arc<tokio::sync::Notify>,
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push_str(&String::from_utf8_lossy(bytes));
        }
        self.logged.notify_waiters();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
    type Writer = CapturedLog;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Appends `extra` to `base`, letting keys of `extra` override those of `base` table by table.
pub(crate) fn merge_toml(base: &str, extra: &str) -> anyhow::Result<String> {
    let mut base: toml::Table = toml::from_str(base)?;
    let extra: toml::Table = toml::from_str(extra)?;
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => into.extend(from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
    Ok(toml::to_string(&base)?)
}
