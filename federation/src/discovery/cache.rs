//! The clock discovery reads and the bounded map with expiring entries its caches use.
//!
//! The cache is hand-written rather than `moka`'s: moka reads time from its own clock, which
//! tests cannot move, and every TTL rule of discovery is tested here by advancing a
//! [`ManualClock`]. Eviction is O(log n): an index by expiry gives the entry to drop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

/// Most entries in each cache.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Where discovery reads the time: the system's in production, a hand-moved one in tests.
pub(crate) trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// [`Instant::now`].
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to.
#[cfg(test)]
pub(crate) struct ManualClock(Mutex<Instant>);

#[cfg(test)]
impl ManualClock {
    pub(crate) fn new() -> Self {
        Self(Mutex::new(Instant::now()))
    }

    pub(crate) fn advance(&self, by: std::time::Duration) {
        *lock(&self.0) += by;
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *lock(&self.0)
    }
}

/// A map whose entries expire, bounded to a capacity: when full, expired entries go first,
/// then the ones closest to expiry. An expired entry is invisible to [`get`](Self::get).
pub(crate) struct Cache<K, V> {
    entries: BTreeMap<K, (V, Instant)>,
    /// The keys by expiry, for eviction.
    by_expiry: BTreeSet<(Instant, K)>,
    capacity: usize,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl<K, V> Cache<K, V> {
    /// An empty cache holding at most `capacity` entries (at least one).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self { entries: BTreeMap::new(), by_expiry: BTreeSet::new(), capacity: capacity.max(1) }
    }
}

impl<K: Ord + Clone, V> Cache<K, V> {
    /// The value of `key` and its expiry, unless absent or expired at `now`.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<(&V, Instant)> {
        self.entries.get(key).filter(|(_, expires)| *expires > now).map(|(value, expires)| (value, *expires))
    }

    /// Sets `key` to `value` until `expires`, evicting if the cache is full.
    pub(crate) fn insert(&mut self, key: K, value: V, expires: Instant, now: Instant) {
        if let Some((_, old)) = self.entries.remove(&key) {
            self.by_expiry.remove(&(old, key.clone()));
        } else {
            // The front of the index is both the expired entries and, after them, the ones
            // closest to expiry.
            while let Some((soonest, _)) = self.by_expiry.first() {
                if *soonest > now && self.entries.len() < self.capacity {
                    break;
                }
                if let Some((_, evicted)) = self.by_expiry.pop_first() {
                    self.entries.remove(&evicted);
                }
            }
        }
        self.by_expiry.insert((expires, key.clone()));
        self.entries.insert(key, (value, expires));
    }

    /// Removes `key`, giving back its value (even if expired).
    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (value, expires) = self.entries.remove(key)?;
        self.by_expiry.remove(&(expires, key.clone()));
        Some(value)
    }

    /// Entries held, expired ones included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Locks `mutex`, ignoring poisoning (the caches stay consistent: every update is one call).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn entries_expire() {
        let clock = ManualClock::new();
        let mut cache = Cache::with_capacity(4);
        let now = clock.now();
        cache.insert("a", 1, now + Duration::from_secs(10), now);
        assert_eq!(cache.get(&"a", now), Some((&1, now + Duration::from_secs(10))));
        clock.advance(Duration::from_secs(9));
        assert!(cache.get(&"a", clock.now()).is_some());
        clock.advance(Duration::from_secs(1));
        assert!(cache.get(&"a", clock.now()).is_none(), "gone at its expiry");
        // Replacing an entry moves its expiry.
        cache.insert("a", 2, clock.now() + Duration::from_secs(5), clock.now());
        assert_eq!(cache.get(&"a", clock.now()).map(|(v, _)| *v), Some(2));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.remove(&"a"), Some(2));
        assert_eq!(cache.remove(&"a"), None);
    }

    #[test]
    fn full_cache_drops_expired_entries_then_the_soonest_to_expire() {
        let now = Instant::now();
        let at = |s: u64| now + Duration::from_secs(s);
        let mut cache = Cache::with_capacity(3);
        cache.insert(1, (), at(1), now);
        cache.insert(2, (), at(30), now);
        cache.insert(3, (), at(20), now);
        // Full, nothing expired: the one expiring soonest goes.
        cache.insert(4, (), at(40), now);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&1, now).is_none());
        // At 25 s entry 3 has expired: it goes, and 2 (expiring at 30 s) stays.
        cache.insert(5, (), at(50), at(25));
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&3, now).is_none());
        assert!(cache.get(&2, now).is_some());
        // Replacing a present key evicts nothing.
        cache.insert(2, (), at(60), at(25));
        assert!([2, 4, 5].iter().all(|k| cache.get(k, at(25)).is_some()));
    }

    #[test]
    fn cache_is_bounded() {
        let now = Instant::now();
        let mut cache = Cache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.insert(i, i, now + Duration::from_secs(i as u64 + 1), now);
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
        assert_eq!(cache.by_expiry.len(), MAX_ENTRIES);
        assert!(cache.get(&0, now).is_none(), "the entry closest to expiry went first");
        assert!(cache.get(&(MAX_ENTRIES + 9), now).is_some());
        assert!(cache.get(&(MAX_ENTRIES + 9), now + Duration::from_secs(1_000_000)).is_none());
    }
}
