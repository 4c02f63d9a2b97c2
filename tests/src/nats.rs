//! A NATS server for tests: a `nats-server` process of the test's own (the binary
//! `scripts/nats.sh` finds or installs), on a loopback port the OS chose, which the test can
//! stop and start again on the same port.

use anyhow::{bail, Context as _};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

/// The `nats-server` binary, as `scripts/nats.sh` printed it.
pub async fn binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceCell<PathBuf> = OnceCell::const_new();
    BINARY
        .get_or_try_init(|| async {
            let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/nats.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .await
                .with_context(|| format!("running {}", script.display()))?;
            if !output.status.success() {
                bail!("{} failed ({}): no nats-server for the tests", script.display(), output.status);
            }
            Ok(PathBuf::from(String::from_utf8(output.stdout)?.trim()))
        })
        .await
        .cloned()
}

/// A running (or stopped) `nats-server`.
pub struct NatsServer {
    port: u16,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Self { port, child: None };
        server.restart().await?;
        Ok(server)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills it (as a crash would).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it (again) on its port; returns once it accepts clients.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        let mut child = Command::new(binary().await?)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning nats-server")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let mut seen = String::new();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("Server is ready") {
                    return Ok(true);
                }
                seen.push_str(&line);
                seen.push('\n');
            }
            anyhow::Ok(false)
        })
        .await
        .context("nats-server did not get ready within 30 s")??;
        if !ready {
            bail!("nats-server exited:\n{seen}");
        }
        // Keep reading its log, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }
}
