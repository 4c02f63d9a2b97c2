//! The delivery window of one device connection: which inbox events go out next, from where,
//! and when the backlog counts as delivered. Pure bookkeeping, no I/O: the connection
//! (`Conn` in `ws.rs`) reads the inbox, reserves bytes, writes to the socket and tells the window
//! what happened; the window answers what to do next.
//!
//! Invariants:
//! - events go out strictly in sequence order, each at most once per connection: the
//!   [cursor](DeliveryWindow::cursor) is the highest seq sent (or the client's `since`), and
//!   an event at or below it is a duplicate and dropped;
//! - a live event is sent only if it is exactly `cursor + 1`, the window is not
//!   [behind](DeliveryWindow::is_behind) and fewer than `max_unacked` events await an ack;
//!   any other newer event makes the window behind, and the next events come from the inbox
//!   (a catch-up) until a read finds its end;
//! - at most `max_unacked` events are sent and not acknowledged; beyond that the window waits
//!   for an ack (or, for the byte budget, for room) and is behind meanwhile;
//! - `caught_up` is announced once, the first time the window is not behind, which is after
//!   the backlog that existed at connection time has been sent completely.

use parley_spec::Seq;
use std::collections::VecDeque;

/// What the window of one connection knows. `O` is what an acknowledgement needs of each sent
/// event (for messages: who sent it, for the delivered receipt).
#[derive(Debug)]
pub(crate) struct DeliveryWindow<O> {
    /// Highest seq sent on this connection (or the client's `since`).
    cursor: Seq,
    /// Sent, not yet acknowledged, in seq order.
    pending: VecDeque<(Seq, O)>,
    /// Events newer than the cursor were not sent live: read the inbox before sending more.
    behind: bool,
    /// `caught_up` was announced.
    caught_up_sent: bool,
    /// Most events sent but not yet acknowledged.
    max_unacked: usize,
}

/// What an acknowledgement settled.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Acked<O> {
    /// The acknowledged seq, at most the cursor (an ack cannot cover what was not sent here).
    pub(crate) seq: Seq,
    /// What the events sent on this connection and now acknowledged carried, in seq order.
    pub(crate) origins: Vec<O>,
}

impl<O> DeliveryWindow<O> {
    /// A window after `since` (what the client already has); it starts behind, as the inbox
    /// after `since` has not been read yet.
    pub(crate) fn new(since: Seq, max_unacked: usize) -> Self {
        Self { cursor: since, pending: VecDeque::new(), behind: true, caught_up_sent: false, max_unacked }
    }

    /// Highest seq sent on this connection, or the client's `since`.
    pub(crate) fn cursor(&self) -> Seq {
        self.cursor
    }

    /// Whether events newer than the cursor are waiting in the inbox.
    pub(crate) fn is_behind(&self) -> bool {
        self.behind
    }

    /// The inbox ends at `end` (a `since` beyond it was clamped when recorded): resume from
    /// there, or the next events would be skipped.
    pub(crate) fn resume_at_most(&mut self, end: Seq) {
        self.cursor = self.cursor.min(end);
    }

    /// Live events were dropped before reaching the connection (its buffer lagged).
    pub(crate) fn lagged(&mut self) {
        self.behind = true;
    }

    /// Whether to read the inbox now: behind, and there is room for unacknowledged events.
    pub(crate) fn wants_catch_up(&self) -> bool {
        self.behind && self.pending.len() < self.max_unacked
    }

    /// The next inbox read of a catch-up: how many events after the [cursor](Self::cursor) to
    /// read (at most `page`). `None` when the unacknowledged window is full or the byte budget
    /// has no room (`budget_has_room`): the window stays behind until an ack or room.
    pub(crate) fn next_read(&mut self, page: u32, budget_has_room: bool) -> Option<u32> {
        let room = self.max_unacked.saturating_sub(self.pending.len()).min(page as usize) as u32;
        if room == 0 || !budget_has_room {
            self.behind = true;
            return None;
        }
        Some(room)
    }

    /// An inbox read ended the catch-up: it found the end of the inbox, so live events may
    /// follow directly.
    pub(crate) fn inbox_exhausted(&mut self) {
        self.behind = false;
    }

    /// The byte budget refused an event read from the inbox: stop the catch-up there and
    /// continue when there is room.
    pub(crate) fn budget_full(&mut self) {
        self.behind = true;
    }

    /// Whether a live event with `seq` may be sent now (then [`deliver`](Self::deliver) it).
    /// If not, and it is newer than the cursor, the window is behind: the event will be read
    /// from the inbox. An event at or below the cursor is a duplicate.
    pub(crate) fn accept_live(&mut self, seq: Seq) -> bool {
        if self.behind || seq != self.cursor.next() || self.pending.len() >= self.max_unacked {
            if seq > self.cursor {
                self.behind = true;
            }
            return false;
        }
        true
    }

    /// Records event `seq` as sent. `false` (nothing recorded) for a duplicate, `seq` at or
    /// below the cursor: do not send it.
    pub(crate) fn deliver(&mut self, seq: Seq, origin: O) -> bool {
        if seq <= self.cursor {
            return false;
        }
        self.cursor = seq;
        self.pending.push_back((seq, origin));
        true
    }

    /// The client acknowledged up to `seq`. An ack beyond the cursor covers only what was
    /// sent; one below the oldest unacknowledged event settles nothing here (its seq is still
    /// passed on: the store ignores an ack that goes backwards).
    pub(crate) fn ack(&mut self, seq: Seq) -> Acked<O> {
        let seq = seq.min(self.cursor);
        let mut origins = Vec::new();
        while self.pending.front().is_some_and(|(sent, _)| *sent <= seq) {
            if let Some((_, origin)) = self.pending.pop_front() {
                origins.push(origin);
            }
        }
        Acked { seq, origins }
    }

    /// `Some(cursor)` once: the first time the window is not behind, announce `caught_up`
    /// with this seq.
    pub(crate) fn take_caught_up(&mut self) -> Option<Seq> {
        if self.caught_up_sent || self.behind {
            return None;
        }
        self.caught_up_sent = true;
        Some(self.cursor)
    }

    /// Events sent and not yet acknowledged.
    #[cfg(test)]
    fn unacked(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> Seq {
        Seq::new(n)
    }

    /// A connection's catch-up as `Conn::catch_up` runs it, against an inbox of `seqs` (one
    /// byte each) and a byte budget of `budget` unsent bytes; `sent` collects what went out.
    struct Harness {
        window: DeliveryWindow<u64>,
        inbox: Vec<u64>,
        page: u32,
        budget: usize,
        unsent: usize,
        sent: Vec<u64>,
        caught_up: Vec<u64>,
    }

    impl Harness {
        fn new(since: u64, max_unacked: usize, inbox: impl IntoIterator<Item = u64>) -> Self {
            Self {
                window: DeliveryWindow::new(seq(since), max_unacked),
                inbox: inbox.into_iter().collect(),
                page: 100,
                budget: usize::MAX,
                unsent: 0,
                sent: Vec::new(),
                caught_up: Vec::new(),
            }
        }

        /// One step of the connection loop: catch up if the window wants to, then announce.
        fn step(&mut self) {
            if self.window.wants_catch_up() {
                self.catch_up();
            }
            self.announce();
        }

        fn announce(&mut self) {
            if let Some(cursor) = self.window.take_caught_up() {
                self.caught_up.push(cursor.get());
            }
        }

        fn catch_up(&mut self) {
            loop {
                let Some(limit) = self.window.next_read(self.page, self.unsent < self.budget) else { return };
                let cursor = self.window.cursor().get();
                let rows: Vec<u64> = self.inbox.iter().copied().filter(|s| *s > cursor).take(limit as usize).collect();
                let exhausted = rows.len() < limit as usize;
                for seq in rows {
                    if self.unsent + 1 > self.budget {
                        self.window.budget_full();
                        return;
                    }
                    self.unsent += 1;
                    if self.window.deliver(Seq::new(seq), seq) {
                        self.sent.push(seq);
                    } else {
                        self.unsent -= 1;
                    }
                }
                if exhausted {
                    self.window.inbox_exhausted();
                    return;
                }
            }
        }

        /// The writer stored `seq` and pushed it live.
        fn push(&mut self, seq: u64) {
            self.inbox.push(seq);
            if self.window.accept_live(Seq::new(seq)) {
                assert!(self.window.deliver(Seq::new(seq), seq));
                self.sent.push(seq);
            }
            self.step();
        }

        fn ack(&mut self, seq: u64) -> Acked<u64> {
            let acked = self.window.ack(Seq::new(seq));
            self.step();
            acked
        }
    }

    #[test]
    fn backlog_then_live_in_order_and_caught_up_once_after_the_backlog() {
        let mut h = Harness::new(2, 100, 1..=5);
        h.step();
        assert_eq!(h.sent, [3, 4, 5], "only what follows `since`");
        assert_eq!(h.caught_up, [5], "caught_up carries the cursor after the backlog");
        h.push(6);
        h.push(7);
        h.step();
        assert_eq!(h.sent, [3, 4, 5, 6, 7]);
        assert_eq!(h.caught_up, [5], "announced exactly once");
    }

    #[test]
    fn empty_inbox_is_caught_up_at_since() {
        let mut h = Harness::new(0, 10, []);
        assert!(h.window.is_behind(), "nothing is read before the first catch-up");
        assert_eq!(h.window.take_caught_up(), None);
        h.step();
        assert_eq!((h.sent.len(), h.caught_up.as_slice()), (0, &[0][..]));
    }

    #[test]
    fn a_live_event_after_a_gap_makes_the_window_catch_up_from_the_inbox() {
        let mut h = Harness::new(0, 100, 1..=2);
        h.step();
        // Event 3 was stored but its push was lost; 4 arrives live.
        h.inbox.push(3);
        assert!(!h.window.accept_live(seq(4)), "4 is not cursor + 1");
        assert!(h.window.is_behind());
        h.inbox.push(4);
        h.step();
        assert_eq!(h.sent, [1, 2, 3, 4], "the gap was filled from the inbox, in order");
        assert!(!h.window.is_behind());
        h.push(5);
        assert_eq!(h.sent, [1, 2, 3, 4, 5], "live again once the inbox is exhausted");
    }

    #[test]
    fn lagged_hub_buffer_makes_the_window_read_the_inbox() {
        let mut h = Harness::new(0, 100, []);
        h.step();
        // 1 and 2 were dropped by the hub, which set the lagged flag.
        h.inbox.extend([1, 2]);
        h.window.lagged();
        assert!(h.window.wants_catch_up());
        h.step();
        assert_eq!(h.sent, [1, 2]);
        assert!(!h.window.is_behind());
    }

    #[test]
    fn a_behind_window_refuses_even_the_next_live_event_until_the_inbox_is_read() {
        let mut h = Harness::new(0, 100, []);
        h.step();
        h.window.lagged();
        assert!(!h.window.accept_live(seq(1)), "live events wait while behind, whatever their seq");
        h.inbox.push(1);
        h.step();
        assert_eq!(h.sent, [1]);
    }

    #[test]
    fn pauses_at_max_unacked_and_resumes_on_ack() {
        let mut h = Harness::new(0, 3, 1..=5);
        h.step();
        assert_eq!(h.sent, [1, 2, 3], "the window holds 3 unacknowledged events");
        assert!(h.window.is_behind());
        assert!(!h.window.wants_catch_up(), "no inbox read while the window is full");
        assert_eq!(h.caught_up, [0u64; 0], "caught_up waits for the whole backlog");
        // A live event while full is left in the inbox.
        h.push(6);
        assert_eq!(h.sent, [1, 2, 3]);
        let acked = h.ack(2);
        assert_eq!(acked, Acked { seq: seq(2), origins: vec![1, 2] });
        assert_eq!(h.sent, [1, 2, 3, 4, 5], "two slots freed, two more sent");
        assert_eq!(h.window.unacked(), 3);
        h.ack(5);
        assert_eq!(h.sent, [1, 2, 3, 4, 5, 6]);
        assert_eq!(h.caught_up, [6], "announced once the backlog (including 6) went out");
    }

    #[test]
    fn live_events_beyond_the_window_wait_for_an_ack() {
        let mut h = Harness::new(0, 2, []);
        h.step();
        h.push(1);
        h.push(2);
        h.push(3);
        assert_eq!(h.sent, [1, 2]);
        assert!(h.window.is_behind(), "3 is in the inbox, not sent");
        h.ack(1);
        assert_eq!(h.sent, [1, 2, 3]);
        assert!(h.window.is_behind(), "the window is full again, so the end of the inbox is not known yet");
        h.ack(3);
        assert!(!h.window.is_behind(), "an empty read found the end");
        h.push(4);
        assert_eq!(h.sent, [1, 2, 3, 4], "live again");
    }

    #[test]
    fn the_byte_budget_pauses_the_catch_up_until_there_is_room() {
        let mut h = Harness::new(0, 100, 1..=5);
        h.budget = 2;
        h.step();
        assert_eq!(h.sent, [1, 2]);
        assert!(h.window.is_behind());
        assert!(h.window.wants_catch_up(), "the window has room; the bytes do not");
        assert_eq!(h.caught_up, [0u64; 0]);
        // The writer flushed; the room watch wakes the connection.
        h.unsent = 0;
        h.step();
        assert_eq!(h.sent, [1, 2, 3, 4]);
        h.unsent = 0;
        h.step();
        assert_eq!(h.sent, [1, 2, 3, 4, 5]);
        assert_eq!(h.caught_up, [5]);
    }

    #[test]
    fn a_catch_up_reads_page_by_page() {
        let mut h = Harness::new(0, 100, 1..=25);
        h.page = 10;
        assert_eq!(h.window.next_read(10, true), Some(10));
        h.step();
        assert_eq!(h.sent, (1..=25).collect::<Vec<_>>());
        assert_eq!(h.caught_up, [25]);
        let mut small = DeliveryWindow::<()>::new(seq(0), 4);
        assert_eq!(small.next_read(10, true), Some(4), "at most the free part of the window");
        assert_eq!(small.next_read(10, false), None, "nothing without byte room");
        assert!(small.is_behind());
    }

    #[test]
    fn acks_are_clamped_to_the_cursor_and_old_ones_settle_nothing() {
        let mut window = DeliveryWindow::new(seq(10), 100);
        for n in 11..=13 {
            assert!(window.deliver(seq(n), n));
        }
        assert_eq!(window.ack(seq(1_000)), Acked { seq: seq(13), origins: vec![11, 12, 13] }, "beyond the cursor: clamped");
        assert_eq!(window.ack(seq(5)), Acked { seq: seq(5), origins: vec![] }, "below: passed on, nothing settled");
        assert!(window.deliver(seq(14), 14));
        assert_eq!(window.ack(seq(12)), Acked { seq: seq(12), origins: vec![] });
        assert_eq!(window.unacked(), 1);
        assert_eq!(window.ack(seq(14)), Acked { seq: seq(14), origins: vec![14] });
    }

    #[test]
    fn duplicates_are_ignored() {
        let mut window = DeliveryWindow::new(seq(5), 100);
        window.inbox_exhausted();
        assert!(!window.deliver(seq(5), ()), "at the cursor: the client has it");
        assert!(!window.deliver(seq(3), ()));
        assert!(!window.accept_live(seq(4)), "an old live event");
        assert!(!window.is_behind(), "an old live event is no gap");
        assert!(window.accept_live(seq(6)));
        assert!(window.deliver(seq(6), ()));
        assert!(!window.deliver(seq(6), ()), "sent once per connection");
        assert_eq!((window.cursor(), window.unacked()), (seq(6), 1));
    }

    #[test]
    fn since_beyond_the_inbox_resumes_from_its_end() {
        let mut h = Harness::new(50, 100, 1..=3);
        h.window.resume_at_most(seq(3));
        assert_eq!(h.window.cursor(), seq(3));
        h.step();
        h.push(4);
        assert_eq!(h.sent, [4], "the next event is not skipped");
        h.window.resume_at_most(seq(10));
        assert_eq!(h.window.cursor(), seq(4), "only ever lowered");
    }
}
