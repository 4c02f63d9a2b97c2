//! Profiles: one directory per account-device, `DATA_DIR/NAME/`, holding the local store
//! `store.db` (which also remembers the server URL and the device's session).
//!
//! Two commands must never drive the same device at once (they would fight over its
//! WebSocket and corrupt its ratchet sessions), so commands that connect hold an exclusive
//! [`ProfileLock`] for as long as they run.

use crate::fail;
use anyhow::Context as _;
use parley_sdk::store::Store;
use parley_sdk::Session;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::ConnectOptions as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The store file inside a profile directory.
const STORE_FILE: &str = "store.db";
/// The lock file inside a profile directory.
const LOCK_FILE: &str = "lock.db";

/// A profile: where one device of one account keeps its state.
#[derive(Debug, Clone)]
pub struct Profile {
    name: String,
    dir: PathBuf,
}

impl Profile {
    /// The profile `name` under `data_dir` (default: `~/.parley`). Checks the name only; the
    /// directory may not exist yet.
    pub fn locate(data_dir: Option<PathBuf>, name: &str) -> anyhow::Result<Self> {
        validate_name(name)?;
        let base = match data_dir.filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir,
            None => home_dir()
                .ok_or_else(|| fail("usage", "cannot find the home directory: give --data-dir or set PARLEY_HOME"))?
                .join(".parley"),
        };
        Ok(Self { name: name.to_owned(), dir: base.join(name) })
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The profile's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(STORE_FILE)
    }

    /// Prepares a new profile for `register` or `login`: creates the directory (readable by
    /// its owner only), locks it, and checks that it holds no account yet.
    pub async fn create(&self) -> anyhow::Result<ProfileLock> {
        private_dir(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let lock = ProfileLock::acquire(self).await?;
        if self.store_path().exists() {
            let store = Store::open(&self.store_path()).await?;
            if store.get("session").await?.is_some() {
                return Err(fail(
                    "profile_exists",
                    format!(
                        "profile {:?} ({}) already holds an account; choose another one with --profile NAME",
                        self.name,
                        self.dir.display()
                    ),
                ));
            }
        }
        Ok(lock)
    }

    /// Locks an existing profile for a command that connects (and makes a directory left
    /// readable to others by an older version owner-only).
    pub async fn lock(&self) -> anyhow::Result<ProfileLock> {
        self.require()?;
        private_dir(&self.dir).with_context(|| format!("cannot protect {}", self.dir.display()))?;
        ProfileLock::acquire(self).await
    }

    /// The device's session as stored in the profile (for commands that only make HTTP
    /// requests; no lock needed).
    pub async fn session(&self) -> anyhow::Result<Session> {
        self.require()?;
        let store = Store::open(&self.store_path()).await?;
        let json = store.get("session").await?.ok_or_else(|| self.missing())?;
        serde_json::from_slice(&json).map_err(|_| fail("profile", format!("the session in profile {:?} is damaged", self.name)))
    }

    fn require(&self) -> anyhow::Result<()> {
        if self.store_path().exists() {
            Ok(())
        } else {
            Err(self.missing())
        }
    }

    fn missing(&self) -> anyhow::Error {
        fail(
            "no_profile",
            format!(
                "no account in profile {:?} ({}): run `parley register NAME` or `parley login NAME --recovery SECRET` first",
                self.name,
                self.dir.display()
            ),
        )
    }
}

/// Exclusive use of a profile while it is held: an exclusive SQLite transaction on the
/// profile's lock file, which the OS releases if the process dies.
pub struct ProfileLock {
    _conn: SqliteConnection,
}

impl ProfileLock {
    async fn acquire(profile: &Profile) -> anyhow::Result<Self> {
        let busy = || {
            fail(
                "profile_busy",
                format!(
                    "profile {:?} is in use by another parley command (a running `parley chat`?); wait for it to finish or use another --profile",
                    profile.name
                ),
            )
        };
        let path = profile.dir.join(LOCK_FILE);
        parley_sdk::store::make_private(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let options = SqliteConnectOptions::new().filename(path).create_if_missing(true).busy_timeout(Duration::ZERO);
        let mut conn = match options.connect().await {
            Ok(conn) => conn,
            Err(e) if is_busy(&e) => return Err(busy()),
            Err(e) => return Err(anyhow::Error::new(e).context("cannot open the profile's lock file")),
        };
        match sqlx::query("BEGIN EXCLUSIVE").execute(&mut conn).await {
            Ok(_) => Ok(Self { _conn: conn }),
            Err(e) if is_busy(&e) => Err(busy()),
            Err(e) => Err(anyhow::Error::new(e).context("cannot lock the profile")),
        }
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED, with any extended code.
fn is_busy(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code()).and_then(|c| c.parse::<i32>().ok());
    code.is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

/// A profile name: letters, digits, `.`, `_` and `-`, not starting with `.`, at most 64 bytes
/// (it becomes a directory name).
fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(fail("usage", format!("invalid profile name {name:?}: use letters, digits, '.', '_' and '-'")))
    }
}

/// Creates `dir` (and missing parents) readable by its owner only, whatever the umask, and
/// takes group and other permissions away if it already exists: a profile holds the identity
/// seed, ratchet states and plaintext history.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    Ok(())
}

fn home_dir() -> Option<PathBuf> {
    ["HOME", "USERPROFILE"].into_iter().filter_map(std::env::var_os).find(|v| !v.is_empty()).map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names() {
        for good in ["default", "alice", "work-2", "a.b_c"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a\\b", "naïve", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_profile_is_locked_while_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let profile = Profile::locate(Some(dir.path().to_owned()), "p").unwrap();
        let lock = profile.create().await.unwrap();
        let error = profile.create().await.err().expect("locked");
        assert!(error.to_string().contains("in use"), "{error}");
        drop(lock);
    }
}
