//! `parleyd admin …`: operations on the database of a (running or stopped) server.

use crate::auth::{generate_token, hash_token, Passwords};
use crate::config::Config;
use crate::storage::{Store, StoreError};
use parley_spec::ids::validate_localpart;
use parley_spec::UserId;
use zeroize::Zeroizing;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad arguments.
    #[error("{0}")]
    Invalid(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing the password failed.
    #[error("hashing the password failed: {0}")]
    Password(#[source] crate::error::Error),
}

async fn open(config: &Config) -> Result<(Store, tokio::task::JoinHandle<()>), AdminError> {
    crate::storage::create_data_dir(&config.data_dir).map_err(|e| AdminError::Invalid(format!("data dir: {e}")))?;
    Ok(Store::open(config, crate::metrics::Metrics::new(), Default::default()).await?)
}

/// Creates a user with a password; returns its user id.
pub async fn create_user(
    config: &Config,
    username: &str,
    password: Zeroizing<String>,
    admin: bool,
) -> Result<UserId, AdminError> {
    validate_localpart(username).map_err(|e| AdminError::Invalid(e.to_string()))?;
    if password.len() < config.auth.min_password_bytes {
        return Err(AdminError::Invalid(format!("password must be at least {} bytes", config.auth.min_password_bytes)));
    }
    let hash = Passwords::new(&config.auth).hash(password).await.map_err(AdminError::Password)?;
    let (store, writer) = open(config).await?;
    match store.create_user(username, &hash, admin).await {
        Ok(_) => {}
        Err(StoreError::Conflict) => return Err(AdminError::Invalid(format!("user {username} already exists"))),
        Err(e) => return Err(e.into()),
    }
    store.close(writer).await;
    UserId::new(username, &config.server_name).map_err(|e| AdminError::Invalid(e.to_string()))
}

/// Creates a registration token usable `uses` times (unlimited when None) until `expires_in`.
pub async fn create_registration_token(
    config: &Config,
    uses: Option<u32>,
    expires_in: Option<std::time::Duration>,
) -> Result<Zeroizing<String>, AdminError> {
    let (store, writer) = open(config).await?;
    let token = generate_token();
    let expires = expires_in.map(|d| parley_spec::Timestamp::now().saturating_add(d));
    store.create_registration_token(&hash_token(&token), uses, expires).await?;
    store.close(writer).await;
    Ok(token)
}
