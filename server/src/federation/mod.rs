//! Federation inside the homeserver: the HTTPS listener's router and request authentication
//! ([`inbound`]), the durable per-destination outbound queue ([`sender`]), and users of other
//! servers as seen from here ([`remote`]).
//!
//! Trust: a request is accepted only when signed by its origin's current (or, for signatures
//! made before it was retired, old) server key, fetched over HTTPS from the origin itself and
//! cached until the key document's `valid_until_ts`. Messages carry their origin's signature.

pub mod claim_limits;
pub mod inbound;
pub mod remote;
pub mod sender;

use crate::config::FederationConfig;
use crate::error::{Error, Result};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use parley_crypto::PublicKey;
use parley_federation::transport::FederationClient;
use parley_spec::federation::v1::transaction::UserDevices;
use parley_spec::v1::presence::PresenceInfo;
use parley_spec::{ErrorCode, ServerName, Timestamp, UserId};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

/// Remote users whose devices are kept in memory (beyond it the cache starts over).
const MAX_CACHED_USERS: usize = 100_000;
use std::time::{Duration, Instant};

/// Federation state shared by handlers and the sender.
pub struct Federation {
    /// Signs and sends requests.
    pub client: FederationClient,
    /// Origins' keys.
    pub keys: KeyCache,
    /// Signatures seen within the clock skew window.
    pub replays: ReplayCache,
    /// Outbound queues.
    pub sender: sender::Sender,
    /// One-time prekey claims by other servers and their users.
    pub claim_limits: claim_limits::ClaimLimits,
    /// One-time KeyPackage claims by other servers and their users (the same limits, counted
    /// apart from prekeys).
    pub keypackage_claim_limits: claim_limits::ClaimLimits,
    config: FederationConfig,
    origin_limits: DefaultKeyedRateLimiter<ServerName>,
    failed_auth: DefaultKeyedRateLimiter<IpAddr>,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
    presence: Mutex<HashMap<UserId, PresenceInfo>>,
    /// Remote users' devices as last fetched (mirrors the `remote_devices` table, so a send to
    /// a remote user costs no database read).
    remote_devices: Mutex<HashMap<UserId, Arc<UserDevices>>>,
}

impl Federation {
    /// Builds the federation state.
    pub fn new(config: FederationConfig, client: FederationClient, sender: sender::Sender) -> Self {
        let quota = Quota::per_second(NonZeroU32::new(config.origin_per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(config.origin_burst).unwrap_or(NonZeroU32::MIN));
        Self {
            client,
            keys: KeyCache::default(),
            replays: ReplayCache::default(),
            sender,
            claim_limits: claim_limits::ClaimLimits::new(
                config.one_time_claims_per_server,
                config.one_time_claims_per_user,
                Duration::from_millis(config.one_time_claim_window_ms),
            ),
            keypackage_claim_limits: claim_limits::ClaimLimits::new(
                config.one_time_claims_per_server,
                config.one_time_claims_per_user,
                Duration::from_millis(config.one_time_claim_window_ms),
            ),
            origin_limits: governor::RateLimiter::keyed(quota),
            failed_auth: governor::RateLimiter::keyed(
                Quota::per_minute(NonZeroU32::new(config.failed_auth_per_minute).unwrap_or(NonZeroU32::MIN))
                    .allow_burst(NonZeroU32::new(config.failed_auth_burst).unwrap_or(NonZeroU32::MIN)),
            ),
            blocked: Mutex::default(),
            clock: DefaultClock::default(),
            presence: Mutex::default(),
            remote_devices: Mutex::default(),
            config,
        }
    }

    /// The cached devices of a remote user.
    pub fn cached_devices(&self, user: &UserId) -> Option<Arc<UserDevices>> {
        self.remote_devices.lock().unwrap_or_else(|e| e.into_inner()).get(user).cloned()
    }

    /// Caches the devices of a remote user (`None` forgets them).
    pub fn cache_devices(&self, user: &UserId, devices: Option<Arc<UserDevices>>) {
        let mut cache = self.remote_devices.lock().unwrap_or_else(|e| e.into_inner());
        match devices {
            Some(devices) => {
                if cache.len() >= MAX_CACHED_USERS && !cache.contains_key(user) {
                    cache.clear();
                }
                cache.insert(user.clone(), devices);
            }
            None => {
                cache.remove(user);
            }
        }
    }

    /// Remembers the latest presence of a remote user.
    pub fn remember_presence(&self, info: PresenceInfo) {
        let mut presence = self.presence.lock().unwrap_or_else(|e| e.into_inner());
        if presence.len() >= 100_000 && !presence.contains_key(&info.user) {
            presence.clear();
        }
        presence.insert(info.user.clone(), info);
    }

    /// The latest presence heard of a remote user.
    pub fn remote_presence(&self, user: &UserId) -> Option<PresenceInfo> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner()).get(user).cloned()
    }

    /// The federation settings.
    pub fn config(&self) -> &FederationConfig {
        &self.config
    }

    /// Whether this server federates with `server` (allow and deny lists). An entry without a
    /// port covers the host on every port (whoever controls `a.example` controls
    /// `a.example:1234` too); an entry with a port covers exactly that name.
    pub fn allowed(&self, server: &ServerName) -> bool {
        let listed = |list: &[ServerName]| list.iter().any(|entry| covers(entry, server));
        !listed(&self.config.deny) && (self.config.allow.is_empty() || listed(&self.config.allow))
    }

    /// `Ok` if `server` may federate with us, `server_denied` otherwise.
    pub fn check_allowed(&self, server: &ServerName) -> Result<()> {
        if self.allowed(server) {
            Ok(())
        } else {
            Err(Error::new(ErrorCode::ServerDenied, format!("this server does not federate with {server}")))
        }
    }

    /// One request from `origin` (per-origin rate limit).
    pub fn check_rate(&self, origin: &ServerName, metrics: &crate::metrics::Metrics) -> Result<()> {
        self.origin_limits.check_key(origin).map_err(|not_until| {
            metrics.rate_limited.inc();
            Error::RateLimited { wait: not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)) }
        })
    }

    /// `rate_limited` while `ip` is refused for failing authentication too often (checked
    /// before any work, in particular before fetching the claimed origin's keys).
    pub fn check_not_blocked(&self, ip: IpAddr) -> Result<()> {
        let blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        match blocked.get(&ip) {
            Some(until) if *until > Instant::now() => {
                Err(Error::RateLimited { wait: until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)) })
            }
            _ => Ok(()),
        }
    }

    /// A request from `ip` failed authentication; past the allowance, `ip` is refused until
    /// the allowance refills.
    pub fn auth_failed(&self, ip: IpAddr, metrics: &crate::metrics::Metrics) {
        if let Err(not_until) = self.failed_auth.check_key(&ip) {
            metrics.rate_limited.inc();
            let wait = not_until.wait_time_from(self.clock.now());
            let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
            if blocked.len() >= 100_000 {
                let now = Instant::now();
                blocked.retain(|_, until| *until > now);
            }
            blocked.insert(ip, Instant::now() + wait);
        }
    }

    /// Periodic cleanup of the limiter and caches.
    pub fn shrink(&self) {
        self.origin_limits.retain_recent();
        self.failed_auth.retain_recent();
        let now = Instant::now();
        self.blocked.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, until| *until > now);
        self.claim_limits.purge(now);
        self.keypackage_claim_limits.purge(now);
        self.replays.purge(Timestamp::now());
    }

    /// The key `key_id` of `origin`, valid for a signature made at `ts` (fetched when needed).
    pub async fn origin_key(&self, origin: &ServerName, key_id: &str, ts: Timestamp) -> Result<PublicKey> {
        if let Some(key) = self.keys.lookup(origin, key_id, ts, false) {
            return Ok(key);
        }
        if !self.keys.may_fetch(origin) {
            return Err(Error::new(ErrorCode::UnknownServerKey, format!("no key {key_id} for {origin}")));
        }
        let document = self.client.server_keys(origin).await.map_err(|error| {
            self.keys.fetch_failed(origin);
            Error::new(ErrorCode::UnknownServerKey, format!("could not fetch the keys of {origin}: {error}"))
        })?;
        let verified = parley_federation::verify_server_keys(&document, origin, Timestamp::now()).map_err(|error| {
            self.keys.fetch_failed(origin);
            Error::new(ErrorCode::UnknownServerKey, format!("the key document of {origin} is invalid: {error}"))
        })?;
        self.keys.store(origin, verified, document.valid_until_ts);
        self.keys
            .lookup(origin, key_id, ts, true)
            .ok_or_else(|| Error::new(ErrorCode::UnknownServerKey, format!("{origin} publishes no key {key_id}")))
    }
}

/// Whether an allow or deny `entry` covers `server`: the same name, or the same host when the
/// entry has no port.
fn covers(entry: &ServerName, server: &ServerName) -> bool {
    entry == server || (entry.port().is_none() && entry.host() == server.host())
}

struct CachedKeys {
    keys: parley_federation::server_keys::VerifiedKeys,
    valid_until_ts: Timestamp,
    fetched: Instant,
}

/// Origins' verified key documents, and when a fetch last failed.
#[derive(Default)]
pub struct KeyCache {
    entries: Mutex<BTreeMap<ServerName, CachedKeys>>,
    failures: Mutex<BTreeMap<ServerName, Instant>>,
}

/// An unknown key id (a rotation) triggers at most one refetch per origin in this time.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// After a failed fetch, the origin's requests are refused this long without a new attempt.
const FAILED_FETCH_BACKOFF: Duration = Duration::from_secs(5);

impl KeyCache {
    fn lookup(&self, origin: &ServerName, key_id: &str, ts: Timestamp, fresh: bool) -> Option<PublicKey> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let cached = entries.get(origin)?;
        if !fresh && cached.valid_until_ts < Timestamp::now() {
            return None;
        }
        cached.keys.key_for(key_id, ts)
    }

    fn may_fetch(&self, origin: &ServerName) -> bool {
        if let Some(failed) = self.failures.lock().unwrap_or_else(|e| e.into_inner()).get(origin) {
            if failed.elapsed() < FAILED_FETCH_BACKOFF {
                return false;
            }
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(origin) {
            Some(cached) => cached.fetched.elapsed() >= REFETCH_INTERVAL || cached.valid_until_ts < Timestamp::now(),
            None => true,
        }
    }

    fn fetch_failed(&self, origin: &ServerName) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).insert(origin.clone(), Instant::now());
    }

    fn store(&self, origin: &ServerName, keys: parley_federation::server_keys::VerifiedKeys, valid_until_ts: Timestamp) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(origin);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.insert(origin.clone(), CachedKeys { keys, valid_until_ts, fetched: Instant::now() });
    }
}

/// Request signatures seen within the clock skew window: a second request with the same
/// signature is a replay. In memory: after a restart, transactions are still idempotent by id.
#[derive(Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<[u8; 32], Timestamp>>,
}

/// Entries beyond which the cache purges expired signatures on insert.
const REPLAY_PURGE_AT: usize = 100_000;

impl ReplayCache {
    /// Records a signature valid until `expires`; false when it was seen before.
    pub fn first_sight(&self, signature: &[u8], expires: Timestamp) -> bool {
        use sha2::Digest as _;
        let digest: [u8; 32] = sha2::Sha256::digest(signature).into();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= REPLAY_PURGE_AT {
            let now = Timestamp::now();
            seen.retain(|_, expiry| *expiry >= now);
        }
        seen.insert(digest, expires).is_none()
    }

    fn purge(&self, now: Timestamp) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, expiry| *expiry >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::covers;
    use parley_spec::ServerName;

    #[test]
    fn an_entry_without_a_port_covers_its_host_on_every_port() {
        let covered = |entry: &str, server: &str| covers(&ServerName::parse(entry).unwrap(), &ServerName::parse(server).unwrap());
        for (entry, server) in [
            ("a.example", "a.example"),
            ("a.example", "a.example:8448"),
            ("A.Example", "a.example:1"),
            ("a.example:8448", "a.example:8448"),
            ("[::1]", "[::1]:8448"),
            ("[::1]:8448", "[::1]:8448"),
            ("127.0.0.1", "127.0.0.1:80"),
        ] {
            assert!(covered(entry, server), "{entry} covers {server}");
        }
        for (entry, server) in [
            ("a.example:8448", "a.example"),
            ("a.example:8448", "a.example:8449"),
            ("a.example", "b.a.example"),
            ("a.example", "example"),
            ("[::1]:8448", "[::1]"),
            ("[::2]", "[::1]:8448"),
            ("127.0.0.1", "127.0.0.2:80"),
        ] {
            assert!(!covered(entry, server), "{entry} does not cover {server}");
        }
    }
}
