//! Pure bookkeeping for the connection task: reconnect backoff, the dedupe window, when to
//! acknowledge, and when to ping. No I/O here, so all of it is unit-tested.

use parley_spec::{Seq, ServerMsgId, UserId};
use rand::Rng;
use std::{
    collections::{HashSet, VecDeque},
    time::Duration,
};
use tokio::time::Instant;

/// Exponential backoff with jitter: attempt `n` waits between half of and the full
/// `min * 2^n`, capped at `max`, and never less than `min`. `jitter` is in `0.0..=1.0`.
pub(crate) fn backoff_delay(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let max = max.max(min);
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let full = min.saturating_mul(factor).min(max);
    let lower = (full / 2).max(min).min(full);
    lower + (full - lower).mul_f64(jitter.clamp(0.0, 1.0))
}

/// Reconnect attempts since the last successful `hello`.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, attempt: 0 }
    }

    /// The delay before the next attempt (randomized), counting the attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = backoff_delay(self.min, self.max, self.attempt, rand::thread_rng().gen_range(0.0..=1.0));
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// The delay for retry number `attempt` of one operation (randomized).
    pub(crate) fn delay_for(&self, attempt: u32) -> Duration {
        backoff_delay(self.min, self.max, attempt, rand::thread_rng().gen_range(0.0..=1.0))
    }

    /// Called after a successful `hello`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Remembers the `(sender, id)` of the last `capacity` messages forwarded to the application.
#[derive(Debug)]
pub(crate) struct DedupeWindow {
    capacity: usize,
    seen: HashSet<(UserId, ServerMsgId)>,
    order: VecDeque<(UserId, ServerMsgId)>,
}

impl DedupeWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity, seen: HashSet::new(), order: VecDeque::new() }
    }

    /// Records a message; false when it is already in the window (a repeat to drop).
    /// A capacity of 0 disables deduplication.
    pub(crate) fn insert(&mut self, sender: &UserId, id: ServerMsgId) -> bool {
        if self.capacity == 0 {
            return true;
        }
        let key = (sender.clone(), id);
        if self.seen.contains(&key) {
            return false;
        }
        self.seen.insert(key.clone());
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

/// When to send the next cumulative `ack`.
#[derive(Debug)]
pub(crate) struct AckTracker {
    batch: usize,
    delay: Duration,
    acked: Seq,
    unacked: usize,
    first_unacked_at: Option<Instant>,
    /// Set when an `ack` may have been refused (`rate_limited`): send it again then.
    resend_at: Option<Instant>,
}

impl AckTracker {
    pub(crate) fn new(batch: usize, delay: Duration, acked: Seq) -> Self {
        Self { batch: batch.max(1), delay, acked, unacked: 0, first_unacked_at: None, resend_at: None }
    }

    /// Everything up to `cursor` is acknowledged (sent an `ack`, or connected with `since`).
    pub(crate) fn acked(&mut self, cursor: Seq) {
        self.acked = self.acked.max(cursor);
        self.unacked = 0;
        self.first_unacked_at = None;
        self.resend_at = None;
    }

    /// The last `ack` may have been refused: repeat it at `at` (acks are cumulative, so a
    /// repeat is harmless).
    pub(crate) fn resend_at(&mut self, at: Instant) {
        if self.acked > Seq::ZERO {
            self.resend_at = Some(at);
        }
    }

    /// One more event was handled; true when a batch is full and the ack should go now.
    pub(crate) fn record(&mut self, now: Instant) -> bool {
        self.unacked += 1;
        self.first_unacked_at.get_or_insert(now);
        self.unacked >= self.batch
    }

    /// Whether `cursor` is ahead of the last acknowledgement.
    pub(crate) fn needs_ack(&self, cursor: Seq) -> bool {
        cursor > self.acked || (self.resend_at.is_some() && cursor > Seq::ZERO)
    }

    /// When the ack delay of the oldest unacknowledged event (or a repeat) is due.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let batch = self.first_unacked_at.map(|t| t + self.delay);
        match (batch, self.resend_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Ping scheduling and dead-connection detection for one connection.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    /// Ping period: 80% of the server's `heartbeat_interval_ms`.
    period: Duration,
    /// Silence from the server after which the connection counts as dead.
    dead_after: Duration,
    last_sent: Instant,
    last_recv: Instant,
    last_ping: Instant,
}

impl Heartbeat {
    /// Shortest ping period honoured, whatever the server says.
    const MIN_PERIOD: Duration = Duration::from_millis(50);

    pub(crate) fn new(interval_ms: u64, timeout_ms: u64, now: Instant) -> Self {
        let interval = Duration::from_millis(interval_ms).max(Self::MIN_PERIOD);
        let period = interval.mul_f64(0.8).max(Self::MIN_PERIOD);
        let dead_after = Duration::from_millis(timeout_ms).max(interval * 2);
        Self { period, dead_after, last_sent: now, last_recv: now, last_ping: now }
    }

    pub(crate) fn sent(&mut self, now: Instant) {
        self.last_sent = now;
    }

    pub(crate) fn pinged(&mut self, now: Instant) {
        self.last_sent = now;
        self.last_ping = now;
    }

    pub(crate) fn received(&mut self, now: Instant) {
        self.last_recv = now;
    }

    /// When to ping: a period after the later of the last ping and the older of the last
    /// frame sent and received. So an idle link pings every period, and a link that only
    /// sends (acks, typing) still pings to get a `pong` back and prove the server is there.
    pub(crate) fn ping_at(&self) -> Instant {
        self.last_sent.min(self.last_recv).max(self.last_ping) + self.period
    }

    /// When the connection counts as dead if nothing more arrives.
    pub(crate) fn dead_at(&self) -> Instant {
        self.last_recv + self.dead_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn id(n: u64) -> ServerMsgId {
        ServerMsgId::new(n)
    }

    #[test]
    fn backoff_grows_and_caps() {
        let (min, max) = (MS(100), MS(5000));
        assert_eq!(backoff_delay(min, max, 0, 0.0), MS(100));
        assert_eq!(backoff_delay(min, max, 0, 1.0), MS(100));
        assert_eq!(backoff_delay(min, max, 1, 1.0), MS(200));
        assert_eq!(backoff_delay(min, max, 1, 0.0), MS(100));
        assert_eq!(backoff_delay(min, max, 3, 1.0), MS(800));
        assert_eq!(backoff_delay(min, max, 3, 0.0), MS(400));
        assert_eq!(backoff_delay(min, max, 10, 1.0), MS(5000));
        assert_eq!(backoff_delay(min, max, 10, 0.0), MS(2500));
        assert_eq!(backoff_delay(min, max, u32::MAX, 0.5), MS(3750));
        // Out-of-range jitter is clamped; max below min means min.
        assert_eq!(backoff_delay(min, max, 10, 7.0), MS(5000));
        assert_eq!(backoff_delay(MS(300), MS(10), 5, 1.0), MS(300));
    }

    #[test]
    fn backoff_randomized_stays_in_bounds_and_resets() {
        let mut b = Backoff::new(MS(100), MS(5000));
        let mut prev_cap = MS(100);
        for attempt in 0..12 {
            let d = b.next_delay();
            let cap = backoff_delay(MS(100), MS(5000), attempt, 1.0);
            assert!(d >= backoff_delay(MS(100), MS(5000), attempt, 0.0) && d <= cap, "{attempt}: {d:?}");
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        b.reset();
        assert_eq!(b.next_delay(), MS(100));
    }

    #[test]
    fn dedupe_window_forgets_oldest() {
        let alice = UserId::parse("@alice:x.org").unwrap();
        let bob = UserId::parse("@bob:x.org").unwrap();
        let mut w = DedupeWindow::new(3);
        assert!(w.insert(&alice, id(1)));
        assert!(!w.insert(&alice, id(1)));
        assert!(w.insert(&bob, id(1)), "same id, other sender");
        assert!(w.insert(&alice, id(2)));
        assert!(w.insert(&alice, id(3)), "evicts (alice, 1)");
        assert_eq!(w.len(), 3);
        assert!(!w.insert(&bob, id(1)));
        assert!(w.insert(&alice, id(1)), "forgotten after eviction");
        let mut off = DedupeWindow::new(0);
        assert!(off.insert(&alice, id(1)) && off.insert(&alice, id(1)));
    }

    #[test]
    fn ack_batches_and_deadlines() {
        let t0 = Instant::now();
        let mut a = AckTracker::new(3, MS(20), Seq::new(5));
        assert!(!a.needs_ack(Seq::new(5)));
        assert_eq!(a.deadline(), None);
        assert!(!a.record(t0));
        assert!(!a.record(t0 + MS(5)));
        assert_eq!(a.deadline(), Some(t0 + MS(20)), "from the first unacked event");
        assert!(a.record(t0 + MS(6)), "batch full");
        assert!(a.needs_ack(Seq::new(8)));
        a.acked(Seq::new(8));
        assert!(!a.needs_ack(Seq::new(8)));
        assert_eq!(a.deadline(), None);
        a.acked(Seq::new(3));
        assert!(!a.needs_ack(Seq::new(8)), "acks never go backwards");
        assert!(AckTracker::new(0, MS(1), Seq::new(0)).record(t0), "batch 0 means every event");
        a.resend_at(t0 + MS(50));
        assert!(a.needs_ack(Seq::new(8)), "a refused ack is repeated");
        assert_eq!(a.deadline(), Some(t0 + MS(50)));
        a.acked(Seq::new(8));
        assert!(!a.needs_ack(Seq::new(8)));
        assert_eq!(a.deadline(), None);
    }

    #[test]
    fn heartbeat_schedule() {
        let t0 = Instant::now();
        let mut h = Heartbeat::new(10_000, 30_000, t0);
        assert_eq!(h.ping_at(), t0 + MS(8000));
        assert_eq!(h.dead_at(), t0 + MS(30_000));
        h.sent(t0 + MS(5000));
        h.received(t0 + MS(6000));
        assert_eq!(h.ping_at(), t0 + MS(13_000), "traffic both ways postpones the ping");
        h.sent(t0 + MS(12_000));
        assert_eq!(h.ping_at(), t0 + MS(14_000), "only sending does not");
        h.pinged(t0 + MS(14_000));
        assert_eq!(h.ping_at(), t0 + MS(22_000), "stale receive: ping once per period");
        assert_eq!(h.dead_at(), t0 + MS(36_000));
        let tiny = Heartbeat::new(0, 0, t0);
        assert_eq!(tiny.ping_at(), t0 + MS(50));
        assert_eq!(tiny.dead_at(), t0 + MS(100));
    }
}
