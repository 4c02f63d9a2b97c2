//! Passwords (argon2id, bounded by [`Passwords`]), access tokens (random, stored only as SHA-256 hashes) and the
//! [`AuthDevice`] extractor that authenticates a request.

use crate::app::AppState;
use crate::config::AuthConfig;
use crate::error::Error;
use crate::storage::{DevicePk, UserPk};
use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, Salt, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use parley_spec::{DeviceId, ErrorCode, UserId};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::{Zeroize, Zeroizing};

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

fn argon2(config: &AuthConfig) -> Result<Argon2<'static>, Error> {
    let params = Params::new(config.argon2_memory_kib, config.argon2_iterations, config.argon2_parallelism, None)
        .map_err(Error::internal)?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// How long a request refused with `server_busy` is asked to wait.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Password hashing (argon2id, on the blocking pool) with bounded memory and CPU. Each hash
/// needs `argon2_memory_kib` of working memory while it runs, so at most
/// [`AuthConfig::hash_slots`] run at once; at most `hash_queue` requests wait for a slot, none
/// longer than `hash_queue_timeout_ms`, and the others get `server_busy`. Per-IP limits cannot
/// do this: a burst may come from many addresses.
///
/// The working memory is allocated once per slot and reused (zeroized after each hash), never
/// freed: the system allocator keeps freed blocks of this size in per-thread arenas, so
/// allocating one per hash on changing blocking threads left hundreds of MiB behind after a
/// burst. Memory for hashing stays at `hash_slots × argon2_memory_kib`.
pub struct Passwords {
    config: AuthConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    memory: Arc<Mutex<Vec<Memory>>>,
}

/// argon2 working memory of one slot.
type Memory = Vec<Block>;

/// Counts a request waiting for a hash slot while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Passwords {
    /// Hashing with the cost and bounds of `config`.
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            config: config.clone(),
            slots: Arc::new(Semaphore::new(config.hash_slots())),
            waiting: AtomicUsize::new(0),
            memory: Arc::default(),
        }
    }

    /// A hash slot: a free one, or one freed while this request waits in the queue.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let waiting = Waiting(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.config.hash_queue {
            drop(waiting);
            tracing::debug!("password hash queue full");
            return Err(Error::Busy { wait: BUSY_RETRY_AFTER });
        }
        let timeout = Duration::from_millis(self.config.hash_queue_timeout_ms);
        match tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(closed)) => Err(Error::internal(closed)),
            Err(_) => {
                tracing::debug!("no password hash slot within the queue timeout");
                Err(Error::Busy { wait: BUSY_RETRY_AFTER })
            }
        }
    }

    /// Runs `work` with a slot's working memory on the blocking pool. The slot goes with the
    /// work, so a request dropped by its client still counts until its hash is done.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Memory) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let slot = self.slot().await?;
        let pool = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            let take = || pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
            let mut memory = take().unwrap_or_default();
            let result = work(&mut memory);
            memory.iter_mut().for_each(Zeroize::zeroize);
            pool.lock().unwrap_or_else(PoisonError::into_inner).push(memory);
            drop(slot);
            result
        })
        .await
        .map_err(Error::internal)?
    }

    /// Hashes a password (a PHC string with its salt and parameters).
    pub async fn hash(&self, password: Zeroizing<String>) -> Result<String, Error> {
        let argon2 = argon2(&self.config)?;
        self.run(move |memory| hash_with(&argon2, password.as_bytes(), memory)).await
    }

    /// Checks a password against a stored hash. With no hash (unknown user) it still spends the
    /// same work, so timing does not reveal which usernames exist.
    pub async fn verify(&self, hash: Option<String>, password: Zeroizing<String>) -> Result<bool, Error> {
        let argon2 = argon2(&self.config)?;
        self.run(move |memory| match hash {
            Some(hash) => verify_with(&hash, password.as_bytes(), memory),
            None => hash_with(&argon2, password.as_bytes(), memory).map(|_| false),
        })
        .await
    }
}

/// The first `params.block_count()` blocks of `memory`, grown if needed (a stored hash may
/// have been made with a higher cost than the configured one).
fn blocks<'a>(memory: &'a mut Memory, params: &Params) -> &'a mut [Block] {
    let count = params.block_count();
    if memory.len() < count {
        memory.resize(count, Block::default());
    }
    &mut memory[..count]
}

/// A new hash of `password` with a random salt, as a PHC string.
fn hash_with(argon2: &Argon2<'_>, password: &[u8], memory: &mut Memory) -> Result<String, Error> {
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; Salt::MAX_LENGTH];
    let raw_salt = salt.as_salt().decode_b64(&mut salt_bytes).map_err(Error::internal)?;
    let mut output = Zeroizing::new([0u8; Params::DEFAULT_OUTPUT_LEN]);
    argon2
        .hash_password_into_with_memory(password, raw_salt, &mut output[..], blocks(memory, argon2.params()))
        .map_err(Error::internal)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon2.params()).map_err(Error::internal)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&output[..]).map_err(Error::internal)?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash` (with the algorithm, version and cost
/// stored in it).
fn verify_with(hash: &str, password: &[u8], memory: &mut Memory) -> Result<bool, Error> {
    let parsed = PasswordHash::new(hash).map_err(Error::internal)?;
    let expected = parsed.hash.ok_or_else(|| Error::internal("a stored password hash has no output"))?;
    let salt = parsed.salt.ok_or_else(|| Error::internal("a stored password hash has no salt"))?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(Error::internal)?;
    let version = parsed.version.map(Version::try_from).transpose().map_err(Error::internal)?.unwrap_or_default();
    let argon2 = Argon2::new(algorithm, version, Params::try_from(&parsed).map_err(Error::internal)?);
    let mut salt_bytes = [0u8; Salt::MAX_LENGTH];
    let raw_salt = salt.decode_b64(&mut salt_bytes).map_err(Error::internal)?;
    let mut output = Zeroizing::new(vec![0u8; expected.len()]);
    argon2
        .hash_password_into_with_memory(password, raw_salt, &mut output[..], blocks(memory, argon2.params()))
        .map_err(Error::internal)?;
    // `Output` compares in constant time.
    Ok(Output::new(&output[..]).map_err(Error::internal)? == expected)
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
    pub async fn from_token(state: &AppState, token: &str) -> Result<Self, Error> {
        let row = state
            .store
            .auth_by_token(&hash_token(token))
            .await?
            .ok_or_else(|| Error::new(ErrorCode::UnknownToken, "unknown or revoked access token"))?;
        let user_id = UserId::new(&row.localpart, &state.server_name).map_err(Error::internal)?;
        let device_id = DeviceId::parse(&row.device_id).map_err(Error::internal)?;
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

/// The client IP of a request that carries a token, to be counted against the per-IP limit by
/// [`AuthDevice`] after the account and device limits (set by the per-IP middleware).
#[derive(Debug, Clone, Copy)]
pub struct PendingIpLimit(pub std::net::IpAddr);

/// Whether a request carries an access token (as [`bearer_token`] would look for it).
pub fn has_token(headers: &axum::http::HeaderMap, uri: &axum::http::Uri) -> bool {
    headers.contains_key(axum::http::header::AUTHORIZATION)
        || uri.query().is_some_and(|q| q.split('&').any(|pair| pair.starts_with("access_token=")))
}

/// Authenticates the request's token, then counts it: against the device's own budgets
/// (`limit`) first and, only if they let it through, against the client's IP (a request that
/// fails to authenticate counts against its IP).
async fn authenticate(
    parts: &mut Parts,
    state: &AppState,
    limit: impl FnOnce(&AuthDevice) -> Result<(), Error>,
) -> Result<AuthDevice, Error> {
    let authenticated = match bearer_token(parts) {
        Some(token) => AuthDevice::from_token(state, &token).await,
        None => Err(Error::new(ErrorCode::MissingToken, "missing access token")),
    };
    let pending_ip = parts.extensions.remove::<PendingIpLimit>();
    let auth = match authenticated {
        Ok(auth) => auth,
        Err(error) => {
            if let Some(PendingIpLimit(ip)) = pending_ip {
                state.limits.check_ip(ip, &state.metrics)?;
            }
            return Err(error);
        }
    };
    limit(&auth)?;
    if let Some(PendingIpLimit(ip)) = pending_ip {
        state.limits.check_ip(ip, &state.metrics)?;
    }
    Ok(auth)
}

impl FromRequestParts<AppState> for AuthDevice {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, |auth| state.limits.check_account(auth.user_pk, auth.device_pk, &state.metrics)).await
    }
}

/// The authenticated device of an acknowledgement or read marker (`GET /v1/sync`,
/// `POST /v1/read`): counted against the device's control budget, not its request budget, so
/// a device throttled for sending can still drain its inbox.
#[derive(Debug, Clone)]
pub struct ControlDevice(pub AuthDevice);

impl FromRequestParts<AppState> for ControlDevice {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let auth = authenticate(parts, state, |auth| state.limits.check_control(auth.device_pk, &state.metrics)).await?;
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

    fn cheap() -> AuthConfig {
        AuthConfig { argon2_memory_kib: 64, argon2_iterations: 1, argon2_parallelism: 1, ..AuthConfig::default() }
    }

    #[tokio::test]
    async fn passwords_verify() {
        let passwords = Passwords::new(&cheap());
        let hash = passwords.hash(Zeroizing::new("correct horse".into())).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(passwords.verify(Some(hash.clone()), Zeroizing::new("correct horse".into())).await.unwrap());
        assert!(!passwords.verify(Some(hash), Zeroizing::new("wrong horse".into())).await.unwrap());
        assert!(!passwords.verify(None, Zeroizing::new("x".into())).await.unwrap());
    }

    #[tokio::test]
    async fn hashes_are_standard_phc_strings() {
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let config = cheap();
        let passwords = Passwords::new(&config);
        let reference = argon2(&config).unwrap();
        // Stored by an earlier version (argon2's own hasher), with another cost: still verifies.
        let other_cost = Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(128, 2, 1, None).unwrap());
        let old = other_cost.hash_password(b"correct horse", &SaltString::generate(&mut OsRng)).unwrap().to_string();
        assert!(passwords.verify(Some(old.clone()), Zeroizing::new("correct horse".into())).await.unwrap());
        assert!(!passwords.verify(Some(old), Zeroizing::new("correct horsf".into())).await.unwrap());
        // A new hash verifies with argon2's own verifier.
        let new = passwords.hash(Zeroizing::new("correct horse".into())).await.unwrap();
        assert!(new.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{new}");
        assert!(reference.verify_password(b"correct horse", &PasswordHash::new(&new).unwrap()).is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_gets_server_busy() {
        let passwords =
            Passwords::new(&AuthConfig { hash_concurrency: 1, hash_queue: 1, hash_queue_timeout_ms: 60_000, ..cheap() });
        let busy = passwords.slot().await.unwrap();
        // One request waits for the slot; the next finds the queue full.
        let mut waiter = Box::pin(passwords.hash(Zeroizing::new("correct horse".into())));
        let pending = std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(waiter.as_mut(), cx))).await;
        assert!(pending.is_pending());
        let refused = passwords.hash(Zeroizing::new("correct horse".into())).await.unwrap_err().into_body();
        assert_eq!(refused.code, ErrorCode::ServerBusy);
        assert_eq!(refused.retry_after_ms, Some(1000));
        drop(busy);
        assert!(waiter.await.unwrap().starts_with("$argon2id$"), "the waiting request gets the slot");
        assert_eq!(passwords.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_long_wait_gets_server_busy() {
        let passwords = Passwords::new(&AuthConfig { hash_concurrency: 1, hash_queue: 10, hash_queue_timeout_ms: 20, ..cheap() });
        let _busy = passwords.slot().await.unwrap();
        let refused = passwords.verify(None, Zeroizing::new("x".into())).await.unwrap_err().into_body();
        assert_eq!(refused.code, ErrorCode::ServerBusy);
        assert_eq!(passwords.waiting.load(Ordering::Relaxed), 0);
    }
}
