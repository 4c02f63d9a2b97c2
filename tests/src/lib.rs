//! Test harness: starts real `parleyd` processes on loopback ports chosen by the OS, each with
//! its own temporary data directory, and can kill (SIGKILL), stop (SIGTERM) and restart them on
//! the same port. Used by the integration tests (`tests/it`) and the `parley-bench` binary.

pub mod dns;
pub mod fednet;

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

/// A running `parleyd`.
pub struct TestServer {
    child: Option<Child>,
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
}

impl TestServer {
    /// Starts a server with [`TEST_CONFIG`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("").await
    }

    /// Starts a server with [`TEST_CONFIG`] followed by `extra` TOML (which may override it;
    /// later tables with the same name are merged by hand below).
    pub async fn start_with(extra: &str) -> anyhow::Result<Self> {
        let mut server = Self::prepare(extra)?;
        server.spawn().await?;
        Ok(server)
    }

    /// A server with [`TEST_CONFIG`] and `extra` that is not running yet: the test can set
    /// things up (the data directory, [`with_umask`](Self::with_umask)) and then
    /// [`restart`](Self::restart) it.
    pub fn prepare(extra: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = merge_toml(TEST_CONFIG, extra)?;
        std::fs::write(dir.path().join("parleyd.toml"), config)?;
        let logs = Arc::new(Mutex::new(String::new()));
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let logged = Arc::default();
        Ok(Self { child: None, base_url: String::new(), addr, federation_addr: None, dir, logs, logged, umask: None })
    }

    /// Starts the process (at every later start too) with this file mode creation mask.
    pub fn with_umask(mut self, umask: u32) -> Self {
        self.umask = Some(umask);
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

    /// Everything the server logged so far (stderr).
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

    /// The OS process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
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
        if let Some(addr) = self.federation_addr {
            command.env("PARLEY__FEDERATION__LISTEN", addr.to_string());
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
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL (no chance to flush anything) and waits for it to die.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Stops the process with SIGTERM (graceful shutdown) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("not running") };
        let pid = child.id().context("pid")?;
        let status = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), child.wait()).await.context("parleyd did not stop within 30 s")??)
    }

    /// Starts the server again on the same port with the same data (or for the first time,
    /// after [`prepare`](Self::prepare)).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("still running");
        }
        self.spawn().await
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
