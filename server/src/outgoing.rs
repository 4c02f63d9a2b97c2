//! Budgets for bytes on their way to WebSocket clients: per connection and server-wide.
//!
//! Every byte queued for a connection (a live event in its hub buffer, a frame waiting for
//! or inside the socket writer) is reserved here first and released once the socket has
//! flushed it (or the connection dropped it). Durable events that do not fit wait in the
//! inbox and are read from the database when the connection has drained; notices that do not
//! fit are dropped; answers always go out, but a connection whose unsent bytes pass
//! `ws_max_unsent_bytes` is closed. So a client that stops reading holds at most its own
//! budget, and all of them together at most the server-wide one.

use crate::config::LimitsConfig;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// The server-wide budget of unsent bytes.
#[derive(Debug)]
pub struct OutgoingBudget {
    used: AtomicUsize,
    limit: usize,
    /// Set when a reservation was refused; cleared (and `room` bumped) once usage falls to
    /// half the limit, which wakes the connections that were told to wait.
    exhausted: AtomicBool,
    room: watch::Sender<u64>,
}

impl OutgoingBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { used: AtomicUsize::new(0), limit, exhausted: AtomicBool::new(false), room: watch::Sender::new(0) }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Changes each time room came back after the budget was exhausted.
    pub fn room(&self) -> watch::Receiver<u64> {
        self.room.subscribe()
    }

    /// Whether anything fits now; when not, the connection asking is woken by [`Self::room`].
    fn has_room(&self) -> bool {
        let room = self.used() < self.limit;
        if !room {
            self.exhausted.store(true, Ordering::Release);
        }
        room
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        let reserved = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.limit || used == 0).then_some(used + bytes)
            })
            .is_ok();
        if !reserved {
            self.exhausted.store(true, Ordering::Release);
        }
        reserved
    }

    fn force_reserve(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        if before - bytes <= self.limit / 2 && self.exhausted.swap(false, Ordering::AcqRel) {
            self.room.send_modify(|generation| *generation += 1);
        }
    }
}

/// One connection's unsent bytes, shared by the hub (which reserves for live events) and the
/// connection task (which reserves for what it sends and releases after each flush).
#[derive(Debug)]
pub struct Unsent {
    bytes: AtomicUsize,
    soft: usize,
    hard: usize,
    budget: Arc<OutgoingBudget>,
}

/// The connection holds more unsent bytes than `ws_max_unsent_bytes`.
#[derive(Debug)]
pub struct OverBudget;

impl Unsent {
    /// A new connection's account against the server-wide `budget`.
    pub fn new(limits: &LimitsConfig, budget: Arc<OutgoingBudget>) -> Self {
        Self { bytes: AtomicUsize::new(0), soft: limits.ws_unsent_bytes, hard: limits.ws_max_unsent_bytes, budget }
    }

    /// Bytes reserved now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether an event could be reserved now (it may still be refused by a race). When the
    /// server-wide budget is full, the caller is woken by [`OutgoingBudget::room`] later.
    pub fn has_room(&self) -> bool {
        self.bytes() < self.soft && self.budget.has_room()
    }

    /// Reserves room for something that may wait or be dropped (a durable event, a notice):
    /// refused when it does not fit in this connection's budget (unless nothing is queued, so
    /// one large event always fits) or in the server-wide one.
    pub fn try_reserve(&self, bytes: usize) -> bool {
        let reserved = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used + bytes <= self.soft).then_some(used + bytes)
            })
            .is_ok();
        if !reserved {
            return false;
        }
        if !self.budget.try_reserve(bytes) {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Reserves room for something that must go out (an answer): always taken, but past the
    /// hard limit the connection has to be closed.
    pub fn reserve(&self, bytes: usize) -> Result<(), OverBudget> {
        self.budget.force_reserve(bytes);
        let used = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if used > self.hard {
            Err(OverBudget)
        } else {
            Ok(())
        }
    }

    /// Gives back `bytes` that were written or dropped.
    pub fn release(&self, bytes: usize) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.budget.release(bytes);
    }
}

impl Drop for Unsent {
    /// Whatever a closed connection still held (queued events, an unfinished write) goes
    /// back to the server-wide budget.
    fn drop(&mut self) {
        let left = *self.bytes.get_mut();
        if left > 0 {
            self.budget.release(left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(soft: usize, hard: usize) -> LimitsConfig {
        LimitsConfig { ws_unsent_bytes: soft, ws_max_unsent_bytes: hard, ..LimitsConfig::default() }
    }

    #[test]
    fn events_wait_beyond_the_connection_budget_but_one_always_fits() {
        let budget = Arc::new(OutgoingBudget::new(1 << 20));
        let unsent = Unsent::new(&limits(100, 1000), budget.clone());
        assert!(unsent.try_reserve(500), "the first event fits even when larger than the budget");
        assert!(!unsent.try_reserve(1));
        unsent.release(500);
        assert!(unsent.try_reserve(60));
        assert!(unsent.try_reserve(40));
        assert!(!unsent.try_reserve(1));
        assert_eq!((unsent.bytes(), budget.used()), (100, 100));
    }

    #[test]
    fn answers_always_go_but_past_the_hard_limit_the_connection_must_close() {
        let budget = Arc::new(OutgoingBudget::new(1 << 20));
        let unsent = Unsent::new(&limits(100, 300), budget);
        assert!(unsent.reserve(200).is_ok());
        assert!(unsent.reserve(100).is_ok());
        assert!(unsent.reserve(1).is_err());
        assert_eq!(unsent.bytes(), 301);
    }

    #[test]
    fn the_server_wide_budget_caps_all_connections_and_signals_room() {
        let budget = Arc::new(OutgoingBudget::new(1000));
        let mut room = budget.room();
        let a = Unsent::new(&limits(800, 800), budget.clone());
        let b = Unsent::new(&limits(800, 800), budget.clone());
        assert!(a.try_reserve(700));
        assert!(!b.try_reserve(400), "over the server-wide budget");
        assert_eq!(b.bytes(), 0, "a refused reservation leaves nothing behind");
        assert!(!room.has_changed().unwrap());
        a.release(100);
        assert!(!room.has_changed().unwrap(), "600 used: not yet down to half");
        a.release(200);
        assert!(room.has_changed().unwrap(), "half the budget free again: waiting connections wake");
        room.mark_unchanged();
        assert!(b.try_reserve(400));
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0, "dropped connections give their bytes back");
    }
}
