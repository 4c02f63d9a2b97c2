//! The acknowledgements of one device connection on their way to the writer
//! (`limits.ack_interval_ms`). An `ack` that comes when none was written for an interval is
//! written at once; those that follow within the interval are gathered and written together
//! when it ends: one writer operation, one inbox deletion and one `delivered` receipt per
//! sender device for all of them. A conversation at a human pace thus gets its receipts at
//! once, and a device acknowledging many events a second costs one write per interval.
//!
//! Gathered acknowledgements live only in memory: a crash forgets at most an interval of
//! them, and the device then gets those events again (clients process events idempotently),
//! as with group acknowledgements (`limits.group_ack_interval_ms`). Pure bookkeeping, no I/O:
//! the connection (`Conn` in `ws.rs`) writes what [`AckBatch::take`] hands it.

use parley_spec::Seq;
use std::time::Duration;
use tokio::time::Instant;

/// Origins gathered past which the batch is written at once, interval or not (the window
/// holds at most `limits.max_unacked_events` of them anyway).
const MAX_GATHERED: usize = 1024;

/// What a connection acknowledged and has not handed to the writer yet.
#[derive(Debug)]
pub(crate) struct AckBatch<O> {
    interval: Duration,
    /// Highest acknowledged seq not yet written.
    pending: Option<Seq>,
    /// What the events it covers carried (for the receipts), in seq order.
    origins: Vec<O>,
    /// Highest seq written.
    written: Seq,
    /// When the last batch was handed to the writer.
    last_write: Option<Instant>,
}

impl<O> AckBatch<O> {
    /// Batches of at most one per `interval` (zero: every ack at once).
    pub(crate) fn new(interval: Duration) -> Self {
        Self { interval, pending: None, origins: Vec::new(), written: Seq::ZERO, last_write: None }
    }

    /// Adds an acknowledgement up to `seq`; `true` when the batch should be written now (the
    /// interval since the last write has passed, or the batch is full).
    pub(crate) fn add(&mut self, seq: Seq, origins: Vec<O>, now: Instant) -> bool {
        self.pending = Some(self.pending.map_or(seq, |pending| pending.max(seq)));
        self.origins.extend(origins);
        self.interval.is_zero()
            || self.origins.len() >= MAX_GATHERED
            || self.last_write.is_none_or(|last| now >= last + self.interval)
    }

    /// When the gathered acknowledgements are due, if there are any.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.pending?;
        Some(self.last_write.map_or_else(Instant::now, |last| last + self.interval))
    }

    /// The batch to write, if it acknowledges anything new: the highest seq and the origins.
    pub(crate) fn take(&mut self, now: Instant) -> Option<(Seq, Vec<O>)> {
        let seq = self.pending.take()?;
        let origins = std::mem::take(&mut self.origins);
        if seq <= self.written && origins.is_empty() {
            return None;
        }
        self.written = self.written.max(seq);
        self.last_write = Some(now);
        Some((seq, origins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> Seq {
        Seq::new(n)
    }

    #[test]
    fn the_first_ack_is_written_at_once_and_those_within_the_interval_together_at_its_end() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut batch = AckBatch::new(Duration::from_millis(200));
        assert!(batch.add(seq(1), vec!['a'], ms(0)), "nothing written yet: at once");
        assert_eq!(batch.take(ms(0)), Some((seq(1), vec!['a'])));
        assert_eq!(batch.due(), None);

        assert!(!batch.add(seq(2), vec!['b'], ms(50)));
        assert!(!batch.add(seq(4), vec!['c', 'd'], ms(120)));
        assert_eq!(batch.due(), Some(ms(200)), "an interval after the last write");
        assert_eq!(batch.take(ms(200)), Some((seq(4), vec!['b', 'c', 'd'])), "one write for both, in order");

        assert!(!batch.add(seq(5), vec!['e'], ms(250)), "the interval restarts at each write");
        assert_eq!(batch.due(), Some(ms(400)));
        assert_eq!(batch.take(ms(400)), Some((seq(5), vec!['e'])));

        assert!(batch.add(seq(6), vec!['f'], ms(700)), "quiet for an interval: at once again");
    }

    #[test]
    fn an_ack_that_moves_nothing_is_not_written() {
        let now = Instant::now();
        let mut batch = AckBatch::<char>::new(Duration::ZERO);
        assert!(batch.add(seq(3), vec![], now));
        assert_eq!(batch.take(now), Some((seq(3), vec![])), "a cursor move without receipts is written");
        assert!(batch.add(seq(2), vec![], now), "zero interval: every ack at once");
        assert_eq!(batch.take(now), None, "below what was written: nothing to write");
        assert_eq!(batch.take(now), None, "nothing pending");
    }

    #[test]
    fn a_full_batch_is_written_before_the_interval_ends() {
        let now = Instant::now();
        let mut batch = AckBatch::new(Duration::from_secs(60));
        assert!(batch.add(seq(1), vec![0], now));
        batch.take(now);
        assert!(!batch.add(seq(2), vec![1; MAX_GATHERED - 1], now));
        assert!(batch.add(seq(3), vec![2], now), "full");
        assert_eq!(batch.take(now).map(|(seq, origins)| (seq, origins.len())), Some((seq(3), MAX_GATHERED)));
    }
}
