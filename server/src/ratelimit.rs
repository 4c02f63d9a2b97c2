//! Rate limits (governor token buckets): per account and per device first, then per client IP
//! (generous: an office behind one NAT address shares it), and for register and login (each
//! costs an argon2 hash) per IP and per account. Acks, pings and read markers have a budget of
//! their own per device, so a device throttled for sending can still drain its inbox.
//!
//! Requests that carry a token are counted for their account and device before their IP (see
//! [`crate::auth::AuthDevice`]): an account refused by its own limits does not use up the
//! budget of the address it shares with others.

use crate::config::RateLimitConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::storage::{DevicePk, UserPk};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// All rate limiters of the server.
pub struct RateLimits {
    device: DefaultKeyedRateLimiter<DevicePk>,
    control: DefaultKeyedRateLimiter<DevicePk>,
    ip: DefaultKeyedRateLimiter<IpAddr>,
    auth: DefaultKeyedRateLimiter<IpAddr>,
    user: DefaultKeyedRateLimiter<UserPk>,
    login: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    /// Builds the limiters from config (values were checked to be positive).
    pub fn new(config: &RateLimitConfig) -> Self {
        Self {
            device: governor::RateLimiter::keyed(
                Quota::per_second(nz(config.device_per_second)).allow_burst(nz(config.device_burst)),
            ),
            control: governor::RateLimiter::keyed(
                Quota::per_second(nz(config.control_per_second)).allow_burst(nz(config.control_burst)),
            ),
            ip: governor::RateLimiter::keyed(Quota::per_second(nz(config.ip_per_second)).allow_burst(nz(config.ip_burst))),
            auth: governor::RateLimiter::keyed(Quota::per_minute(nz(config.auth_per_minute)).allow_burst(nz(config.auth_burst))),
            user: governor::RateLimiter::keyed(
                Quota::per_second(nz(config.account_per_second)).allow_burst(nz(config.account_burst)),
            ),
            login: governor::RateLimiter::keyed(
                Quota::per_minute(nz(config.login_per_account_per_minute)).allow_burst(nz(config.login_per_account_burst)),
            ),
            clock: DefaultClock::default(),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        metrics: &Metrics,
    ) -> Result<(), Error> {
        limiter.check_key(key).map_err(|not_until| {
            metrics.rate_limited.inc();
            Error::RateLimited { wait: not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)) }
        })
    }

    /// One ack, ping or read marker of a device (not counted against [`Self::check_account`]).
    pub fn check_control(&self, device: DevicePk, metrics: &Metrics) -> Result<(), Error> {
        self.check(&self.control, &device, metrics)
    }

    /// One authenticated request, WebSocket upgrade or frame of `device` of `user`: the
    /// account's limit, then the device's.
    pub fn check_account(&self, user: UserPk, device: DevicePk, metrics: &Metrics) -> Result<(), Error> {
        self.check(&self.user, &user, metrics)?;
        self.check(&self.device, &device, metrics)
    }

    /// One login attempt for the account `localpart` (from any address).
    pub fn check_login(&self, localpart: &str, metrics: &Metrics) -> Result<(), Error> {
        self.check(&self.login, &localpart.to_owned(), metrics)
    }

    /// One HTTP request from an IP.
    pub fn check_ip(&self, ip: IpAddr, metrics: &Metrics) -> Result<(), Error> {
        self.check(&self.ip, &ip, metrics)
    }

    /// One register or login attempt from an IP.
    pub fn check_auth(&self, ip: IpAddr, metrics: &Metrics) -> Result<(), Error> {
        self.check(&self.auth, &ip, metrics)
    }

    /// Forgets idle keys (called periodically so the maps do not grow without bound).
    pub fn shrink(&self) {
        self.device.retain_recent();
        self.control.retain_recent();
        self.ip.retain_recent();
        self.auth.retain_recent();
        self.user.retain_recent();
        self.login.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(account_burst: u32, device_burst: u32) -> RateLimits {
        RateLimits::new(&RateLimitConfig {
            account_per_second: 1,
            account_burst,
            device_per_second: 1,
            device_burst,
            ..RateLimitConfig::default()
        })
    }

    #[test]
    fn an_account_is_limited_across_its_devices() {
        let metrics = Metrics::new();
        let limits = limits(6, 4);
        // Three devices of user 1, two requests each: within every device's burst, and the
        // account's burst of six is used up.
        for device in [10, 11, 12] {
            for _ in 0..2 {
                limits.check_account(1, device, &metrics).unwrap();
            }
        }
        let refused = limits.check_account(1, 13, &metrics).unwrap_err();
        assert!(matches!(refused, Error::RateLimited { .. }), "{refused:?}");
        // Another device of the account is refused too, another account is not.
        assert!(limits.check_account(1, 10, &metrics).is_err());
        limits.check_account(2, 20, &metrics).unwrap();
    }

    #[test]
    fn a_device_is_limited_within_its_account() {
        let metrics = Metrics::new();
        let limits = limits(100, 3);
        for _ in 0..3 {
            limits.check_account(1, 10, &metrics).unwrap();
        }
        assert!(limits.check_account(1, 10, &metrics).is_err(), "the device's burst is used up");
        limits.check_account(1, 11, &metrics).unwrap();
    }

    #[test]
    fn logins_are_limited_per_account() {
        let metrics = Metrics::new();
        let limits = RateLimits::new(&RateLimitConfig { login_per_account_burst: 2, ..RateLimitConfig::default() });
        limits.check_login("alice", &metrics).unwrap();
        limits.check_login("alice", &metrics).unwrap();
        assert!(limits.check_login("alice", &metrics).is_err());
        limits.check_login("bob", &metrics).unwrap();
    }
}
