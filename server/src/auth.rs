//! Passwords (argon2id), access tokens (random, stored only as SHA-256 hashes) and the
//! [`AuthDevice`] extractor that authenticates a request.

use crate::app::AppState;
use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::storage::{DevicePk, UserPk};
use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use parley_spec::{DeviceId, ErrorCode, UserId};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

/// A new random access token: `pt_` and 32 random bytes in URL-safe base64.
pub fn generate_token() -> Zeroizing<String> {
    let bytes: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
    Zeroizing::new(format!("pt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..])))
}

/// The stored form of a token. Tokens carry 256 random bits, so a fast hash is enough, and
/// lookups go by hash (an index probe), so no secret is ever compared byte by byte.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new device id: ten random upper-case letters.
pub fn generate_device_id() -> DeviceId {
    let mut rng = rand::thread_rng();
    let id: String = (0..10).map(|_| char::from(b'A' + rng.gen_range(0..26))).collect();
    DeviceId::parse(&id).unwrap_or_else(|_| unreachable!("ten letters are a valid device id"))
}

fn argon2(config: &AuthConfig) -> Result<Argon2<'static>, ApiError> {
    let params = Params::new(config.argon2_memory_kib, config.argon2_iterations, config.argon2_parallelism, None)
        .map_err(ApiError::internal)?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password with argon2id on the blocking pool.
pub async fn hash_password(config: &AuthConfig, password: Zeroizing<String>) -> Result<String, ApiError> {
    let argon2 = argon2(config)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        argon2.hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(ApiError::internal)
    })
    .await
    .map_err(ApiError::internal)?
}

/// Checks a password against a stored hash on the blocking pool. With no hash (unknown user)
/// it still spends the same work, so timing does not reveal which usernames exist.
pub async fn verify_password(config: &AuthConfig, hash: Option<String>, password: Zeroizing<String>) -> Result<bool, ApiError> {
    let argon2 = argon2(config)?;
    tokio::task::spawn_blocking(move || match hash {
        Some(hash) => {
            let parsed = PasswordHash::new(&hash).map_err(ApiError::internal)?;
            Ok(argon2.verify_password(password.as_bytes(), &parsed).is_ok())
        }
        None => {
            let salt = SaltString::generate(&mut OsRng);
            let _ = argon2.hash_password(password.as_bytes(), &salt);
            Ok(false)
        }
    })
    .await
    .map_err(ApiError::internal)?
}

/// The authenticated device of a request.
#[derive(Debug, Clone)]
pub struct AuthDevice {
    /// User key.
    pub user_pk: UserPk,
    /// User id.
    pub user_id: UserId,
    /// Device key.
    pub device_pk: DevicePk,
    /// Device id.
    pub device_id: DeviceId,
}

impl AuthDevice {
    /// Authenticates a bearer token.
    pub async fn from_token(state: &AppState, token: &str) -> Result<Self, ApiError> {
        let row = state
            .store
            .auth_by_token(&hash_token(token))
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::UnknownToken, "unknown or revoked access token"))?;
        let user_id = UserId::new(&row.localpart, &state.server_name).map_err(ApiError::internal)?;
        let device_id = DeviceId::parse(&row.device_id).map_err(ApiError::internal)?;
        Ok(Self { user_pk: row.user_pk, user_id, device_pk: row.device_pk, device_id })
    }
}

/// The bearer token of a request: the `Authorization` header, or (for browsers opening a
/// WebSocket, which cannot set headers) the `access_token` query parameter.
pub fn bearer_token(parts: &Parts) -> Option<Zeroizing<String>> {
    if let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?;
        return Some(Zeroizing::new(token.trim().to_owned()));
    }
    let query = parts.uri.query()?;
    query.split('&').find_map(|pair| pair.strip_prefix("access_token=").map(|t| Zeroizing::new(t.to_owned())))
}

async fn authenticate(parts: &Parts, state: &AppState) -> Result<AuthDevice, ApiError> {
    let token = bearer_token(parts).ok_or_else(|| ApiError::new(ErrorCode::MissingToken, "missing access token"))?;
    AuthDevice::from_token(state, &token).await
}

impl FromRequestParts<AppState> for AuthDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let auth = authenticate(parts, state).await?;
        state.limits.check_device(auth.device_pk, &state.metrics)?;
        Ok(auth)
    }
}

/// The authenticated device of an acknowledgement or read marker (`GET /v1/sync`,
/// `POST /v1/read`): counted against the device's control budget, not its request budget, so
/// a device throttled for sending can still drain its inbox.
#[derive(Debug, Clone)]
pub struct ControlDevice(pub AuthDevice);

impl FromRequestParts<AppState> for ControlDevice {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let auth = authenticate(parts, state).await?;
        state.limits.check_control(auth.device_pk, &state.metrics)?;
        Ok(Self(auth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(*a, *b);
        assert!(a.starts_with("pt_") && a.len() > 40);
        assert_eq!(hash_token(&a), hash_token(&a.clone()));
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    #[tokio::test]
    async fn passwords_verify() {
        let config = AuthConfig { argon2_memory_kib: 64, argon2_iterations: 1, argon2_parallelism: 1, min_password_bytes: 8 };
        let hash = hash_password(&config, Zeroizing::new("correct horse".into())).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&config, Some(hash.clone()), Zeroizing::new("correct horse".into())).await.unwrap());
        assert!(!verify_password(&config, Some(hash), Zeroizing::new("wrong horse".into())).await.unwrap());
        assert!(!verify_password(&config, None, Zeroizing::new("x".into())).await.unwrap());
    }
}
