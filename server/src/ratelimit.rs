//! Rate limits (governor token buckets): per device, a separate generous one per device for
//! acks, pings and read markers (so a throttled device can still drain its inbox), per client
//! IP, and a stricter one per IP for register and login (each costs an argon2 hash).

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::storage::DevicePk;
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
            clock: DefaultClock::default(),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: &DefaultKeyedRateLimiter<K>,
        key: &K,
        metrics: &Metrics,
    ) -> Result<(), ApiError> {
        limiter.check_key(key).map_err(|not_until| {
            metrics.rate_limited.inc();
            ApiError::rate_limited(not_until.wait_time_from(self.clock.now()).max(Duration::from_millis(1)))
        })
    }

    /// One frame or request of a device.
    pub fn check_device(&self, device: DevicePk, metrics: &Metrics) -> Result<(), ApiError> {
        self.check(&self.device, &device, metrics)
    }

    /// One ack, ping or read marker of a device (not counted against [`Self::check_device`]).
    pub fn check_control(&self, device: DevicePk, metrics: &Metrics) -> Result<(), ApiError> {
        self.check(&self.control, &device, metrics)
    }

    /// One HTTP request from an IP.
    pub fn check_ip(&self, ip: IpAddr, metrics: &Metrics) -> Result<(), ApiError> {
        self.check(&self.ip, &ip, metrics)
    }

    /// One register or login attempt from an IP.
    pub fn check_auth(&self, ip: IpAddr, metrics: &Metrics) -> Result<(), ApiError> {
        self.check(&self.auth, &ip, metrics)
    }

    /// Forgets idle keys (called periodically so the maps do not grow without bound).
    pub fn shrink(&self) {
        self.device.retain_recent();
        self.control.retain_recent();
        self.ip.retain_recent();
        self.auth.retain_recent();
    }
}
