//! What the server and the CLI leave on disk: owner-only files and directories whatever the
//! umask and an existing directory's mode (they hold password hashes, the federation queue,
//! identity secrets, ratchet states and plaintext history), and a checkpointed WAL after a
//! clean shutdown.

use crate::support::{register, Device, PASSWORD, T};
use anyhow::{ensure, Context as _};
use parley_tests::{Backend, TestServer};
use sqlx::ConnectOptions as _;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Stdio;

/// `path`'s permission bits.
fn mode(path: &Path) -> anyhow::Result<u32> {
    Ok(std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.permissions().mode() & 0o777)
}

/// Every entry of `dir` with its mode; fails unless `expected` names are among them.
fn modes(dir: &Path, expected: &[&str]) -> anyhow::Result<Vec<(String, u32)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        found.push((entry.file_name().to_string_lossy().into_owned(), mode(&entry.path())?));
    }
    for name in expected {
        ensure!(found.iter().any(|(f, _)| f == name), "{name} missing from {}: {found:?}", dir.display());
    }
    Ok(found)
}

/// A directory made with mode 0755 (as an operator or an older version might have left it).
fn wide_dir(path: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new().mode(0o755).create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[tokio::test]
async fn database_files_are_owner_only_under_umask_022() -> anyhow::Result<()> {
    // An existing 0755 data directory: the files in it are still private.
    let mut server = TestServer::prepare("")?.with_umask(0o022).with_backend(Backend::Sqlite);
    wide_dir(&server.data_dir())?;
    server.restart().await?;
    let alice = register(&server.base_url, "alice").await?;
    let a1 = Device::connect(&alice).await?;
    a1.send_text(&alice.user_id, "note to self").await?;
    let files = modes(&server.data_dir(), &["parley.db", "parley.db-wal", "parley.db-shm", "server.key"])?;
    for (name, mode) in &files {
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}: readable by others ({files:?})");
    }

    // A data directory the server creates is private too.
    let mut fresh = TestServer::prepare("")?.with_umask(0o022).with_backend(Backend::Sqlite);
    fresh.restart().await?;
    register(&fresh.base_url, "bob").await?;
    assert_eq!(mode(&fresh.data_dir())?, 0o700, "the data directory");
    for (name, mode) in modes(&fresh.data_dir(), &["parley.db"])? {
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}");
    }
    Ok(())
}

#[tokio::test]
async fn cli_profile_is_owner_only_in_an_existing_0755_directory() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let data_dir = tempfile::tempdir()?;
    let profile = data_dir.path().join("alice");
    wide_dir(&profile)?;
    // `parley register` under umask 022, the password on stdin.
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(crate::cli::parley_path()?)
        .arg("--data-dir")
        .arg(data_dir.path())
        .args(["--profile", "alice", "--json", "--server", &server.base_url, "register", "alice"])
        .env_remove("PARLEY_HOME")
        .env_remove("PARLEY_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, format!("{PASSWORD}\n").as_bytes()).await?;
    drop(stdin);
    let output = tokio::time::timeout(T, child.wait_with_output()).await??;
    ensure!(output.status.success(), "parley register: {}", String::from_utf8_lossy(&output.stderr));

    assert_eq!(mode(&profile)?, 0o700, "the profile directory");
    let files = modes(&profile, &["store.db", "lock.db"])?;
    for (name, mode) in &files {
        assert_eq!(mode & 0o077, 0, "{name} is {mode:o}: readable by others ({files:?})");
    }
    Ok(())
}

#[tokio::test]
async fn a_clean_shutdown_checkpoints_the_wal() -> anyhow::Result<()> {
    let mut server = TestServer::start_on(Backend::Sqlite, "").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    a1.send_text(&bob.user_id, "kept in the database file").await?;
    let status = server.stop().await?;
    assert!(status.success(), "graceful exit: {status}");

    let database = server.data_dir().join("parley.db");
    let wal = server.data_dir().join("parley.db-wal");
    let wal_bytes = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(wal_bytes, 0, "{} is left with {wal_bytes} bytes", wal.display());

    // Everything is in the database file itself.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new().filename(&database).connect().await?;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users").fetch_one(&mut conn).await?;
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut conn).await?;
    assert_eq!((users, messages), (2, 1));
    Ok(())
}
