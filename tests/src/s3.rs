//! An S3-compatible server for tests: `s3s-fs`, which checks SigV4 signatures (presigned URLs
//! included: a tampered or expired one is refused) and multipart uploads. It is installed
//! with `cargo install` into `~/.cache/parley-tools` the first time a test needs it (about
//! three minutes on two cores), or taken from `PARLEY_S3S_FS`. Each [`S3Server`] is its own
//! process on a loopback port, with its own directory.

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The version installed (0.14.1 builds with Rust 1.95; later ones need newer compilers).
const VERSION: &str = "0.14.1";
/// The bucket every server has.
pub const BUCKET: &str = "media";
/// Credentials the server accepts.
pub const ACCESS_KEY: &str = "parley-test";
/// Secret of [`ACCESS_KEY`].
pub const SECRET_KEY: &str = "parley-test-secret";

/// A running `s3s-fs`.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its port.
    pub port: u16,
    /// Where it keeps objects (`<root>/<bucket>/<key>`).
    pub root: tempfile::TempDir,
    child: Child,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `s3s-fs` binary, installed if missing (once, whatever the number of tests asking).
pub fn s3s_fs() -> anyhow::Result<PathBuf> {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(path) = std::env::var_os("PARLEY_S3S_FS") {
        return Ok(PathBuf::from(path));
    }
    let root = PathBuf::from(std::env::var_os("HOME").context("HOME")?).join(".cache/parley-tools");
    let binary = root.join("bin/s3s-fs");
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&root)?;
    // Another test process may be installing too: one at a time, through a lock file.
    let lock = std::fs::File::create(root.join("install.lock"))?;
    lock.lock()?;
    if !binary.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["install", "s3s-fs", "--version", VERSION, "--features", "binary", "--locked", "--root"])
            .arg(&root)
            .env("CARGO_TARGET_DIR", root.join("target"))
            .stdout(Stdio::null())
            .status()
            .context("running cargo install s3s-fs")?;
        if !status.success() || !binary.exists() {
            bail!("cargo install s3s-fs {VERSION} failed ({status})");
        }
    }
    Ok(binary)
}

impl S3Server {
    /// Starts a server with an empty bucket [`BUCKET`].
    pub async fn start() -> anyhow::Result<Self> {
        let binary = tokio::task::spawn_blocking(s3s_fs).await??;
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join(BUCKET))?;
        // The port is picked by the OS and released for s3s-fs: another process could take it
        // in between, so a failed start is retried on a new port.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut child = Command::new(&binary)
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--access-key",
                    ACCESS_KEY,
                    "--secret-key",
                    SECRET_KEY,
                ])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            if wait_for_port(port, &mut child).await? {
                return Ok(Self { endpoint: format!("http://127.0.0.1:{port}"), port, root, child });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        bail!("s3s-fs did not start")
    }

    /// The `[media.s3]` table of a server using this store.
    pub fn config(&self) -> String {
        format!(
            "[media.s3]\nendpoint = \"{}\"\nbucket = \"{BUCKET}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\nallow_http = true\n",
            self.endpoint
        )
    }

    /// The directory holding the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(BUCKET)
    }
}

/// Waits until `port` accepts connections; false when the process exited first.
async fn wait_for_port(port: u16, child: &mut Child) -> anyhow::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(true);
        }
        if child.try_wait()?.is_some() {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("s3s-fs did not listen on {port} within 20 s")
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}
