//! Limits on one-time prekey claims by other servers: per claimed device, each requesting
//! server and each requesting user of another server may take only a few one-time prekeys per
//! window; past that, the claim is answered with the device's last-resort prekey (session setup
//! keeps working, the device's one-time prekeys stay for others).
//!
//! Token buckets, one per (server, device) and (user, device): `per_*` tokens, refilled evenly
//! over the window. A claim takes a token from both or from neither. Buckets are created only
//! for claims that succeed, and a user's bucket only when its server still had a token, so
//! the memory they take is bounded by what the server limit lets through.

use crate::storage::DevicePk;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// The tokens at `now`, refilled at `capacity` per `window`.
    fn level(&self, capacity: f64, window: Duration, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * capacity / window.as_secs_f64()).min(capacity)
    }
}

type Buckets = HashMap<(String, DevicePk), Bucket>;

/// One-time prekey claims per (requesting server, device) and (requesting user, device).
pub struct ClaimLimits {
    per_server: f64,
    per_user: f64,
    window: Duration,
    buckets: Mutex<(Buckets, Buckets)>,
}

impl ClaimLimits {
    /// At most `per_server` and `per_user` one-time prekeys of one device per `window`.
    pub fn new(per_server: u32, per_user: u32, window: Duration) -> Self {
        Self {
            per_server: f64::from(per_server),
            per_user: f64::from(per_user),
            window: window.max(Duration::from_millis(1)),
            buckets: Mutex::default(),
        }
    }

    /// Takes one one-time prekey claim of `device` for `user` of `server`; `false` (and nothing
    /// taken) when either is over its limit.
    pub fn take(&self, server: &str, user: &str, device: DevicePk, now: Instant) -> bool {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (servers, users) = &mut *guard;
        let (server_key, user_key) = ((server.to_owned(), device), (user.to_owned(), device));
        let server_level = servers.get(&server_key).map_or(self.per_server, |b| b.level(self.per_server, self.window, now));
        let user_level = users.get(&user_key).map_or(self.per_user, |b| b.level(self.per_user, self.window, now));
        if server_level < 1.0 || user_level < 1.0 {
            return false;
        }
        servers.insert(server_key, Bucket { tokens: server_level - 1.0, at: now });
        users.insert(user_key, Bucket { tokens: user_level - 1.0, at: now });
        true
    }

    /// Gives back a claim taken by [`Self::take`] that handed out no one-time prekey (the
    /// device had none left).
    pub fn refund(&self, server: &str, user: &str, device: DevicePk, now: Instant) {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (servers, users) = &mut *guard;
        for (buckets, key, capacity) in [(servers, server, self.per_server), (users, user, self.per_user)] {
            if let Some(bucket) = buckets.get_mut(&(key.to_owned(), device)) {
                *bucket = Bucket { tokens: (bucket.level(capacity, self.window, now) + 1.0).min(capacity), at: now };
            }
        }
    }

    /// Forgets buckets that are full again (a new one would be the same).
    pub fn purge(&self, now: Instant) {
        let mut guard = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (servers, users) = &mut *guard;
        servers.retain(|_, bucket| bucket.level(self.per_server, self.window, now) < self.per_server);
        users.retain(|_, bucket| bucket.level(self.per_user, self.window, now) < self.per_user);
    }
}

#[cfg(test)]
mod tests {
    use super::ClaimLimits;
    use std::time::{Duration, Instant};

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn each_user_and_each_server_get_their_share_then_refill_over_the_window() {
        let limits = ClaimLimits::new(5, 2, HOUR);
        let now = Instant::now();
        let takes = |user: &str, device, n| (0..n).filter(|_| limits.take("a.test", user, device, now)).count();
        assert_eq!(takes("@u1:a.test", 1, 10), 2, "per user");
        assert_eq!(takes("@u2:a.test", 1, 10), 2);
        assert_eq!(takes("@u3:a.test", 1, 10), 1, "the server's 5 are used up");
        assert_eq!(takes("@u4:a.test", 1, 10), 0);
        assert_eq!(takes("@u4:a.test", 2, 10), 2, "another device has its own limits");
        assert!(limits.take("b.test", "@u1:b.test", 1, now), "another server has its own");
        // A claim that handed out nothing is given back.
        limits.refund("a.test", "@u3:a.test", 1, now);
        assert!(limits.take("a.test", "@u3:a.test", 1, now));
        assert!(!limits.take("a.test", "@u3:a.test", 1, now));
        // A fifth of the window later the server has one claim again; after the window, all.
        let later = now + HOUR / 5;
        assert!(limits.take("a.test", "@u5:a.test", 1, later));
        assert!(!limits.take("a.test", "@u6:a.test", 1, later));
        limits.purge(later);
        let next_day = now + 2 * HOUR;
        assert_eq!((0..10).filter(|i| limits.take("a.test", &format!("@n{i}:a.test"), 1, next_day)).count(), 5);
        limits.purge(now + 10 * HOUR);
        let buckets = limits.buckets.lock().unwrap();
        assert!(buckets.0.is_empty() && buckets.1.is_empty(), "full buckets are forgotten");
    }

    #[test]
    fn a_limit_of_zero_hands_out_no_one_time_prekeys() {
        let limits = ClaimLimits::new(0, 3, HOUR);
        assert!(!limits.take("a.test", "@u:a.test", 1, Instant::now()));
    }
}
