//! The outbound transaction queue of one destination, sans I/O: [`DestinationQueue`] decides
//! what to read, what to record, what to send and how long to wait; its driver (the server's
//! federation sender) reads and writes the durable queue, sends over HTTPS and reports back.
//! No clock, no randomness and no I/O in here: `now` is an argument, jitter and ephemeral
//! transaction ids come from the RNG it is given.
//!
//! The driver's loop: [`poll`](DestinationQueue::poll) returns an [`Action`]; the driver does
//! it and reports with the matching `on_*` method before polling again:
//! - [`Action::Load`] → [`on_inflight`](DestinationQueue::on_inflight) or
//!   [`on_items`](DestinationQueue::on_items) (or [`on_store_error`](DestinationQueue::on_store_error));
//! - [`Action::Write`] → [`on_written`](DestinationQueue::on_written) (or `on_store_error`);
//! - [`Action::Send`] → [`on_result`](DestinationQueue::on_result);
//! - [`Action::SleepUntil`] and [`Action::Idle`]: wait for the time or for a notification
//!   ([`on_new_items`](DestinationQueue::on_new_items),
//!   [`push_ephemeral`](DestinationQueue::push_ephemeral),
//!   [`on_contact`](DestinationQueue::on_contact)), then poll again.
//!
//! Invariants:
//! - Durable items (rows of the destination's queue, identified by their increasing `seq`)
//!   leave in order, in transactions of at most `max_txn_items` items and `max_txn_bytes`
//!   bytes, one transaction in flight at a time. Before a new transaction is sent its id and
//!   last item are recorded ([`Write::Inflight`]); a queue rebuilt from the store (after a
//!   crash, or a store error) resends exactly that transaction, same id and same items, and the
//!   destination's `(origin, txn_id)` check drops it if it had arrived. Items are dropped only
//!   once the destination accepted them, in the same write that records the next transaction
//!   ([`Write::Inflight::done_up_to`]) or alone when there is none ([`Write::Done`]).
//! - Failures back off exponentially with jitter ([`crate::backoff`]). New items do not cut a
//!   backoff short; the destination contacting us does (a contact seen while no backoff is
//!   running is kept for the next one, as it always was). Success, or finding nothing to send,
//!   resets the failure count.
//! - Typing and presence ("ephemeral" items) live only in memory, coalesced (newest presence
//!   per user), at most `max_txn_items` of them (oldest dropped first). They ride along with
//!   durable items, go back to the queue when a transaction fails, and are dropped once the
//!   destination has been failing for `drop_ephemeral_after`.
//! - A transaction carrying only presence leaves at most once per `presence_interval`; until
//!   the interval is over the queue sleeps (changes in between are coalesced and go together).

use crate::backoff::backoff;
use parley_spec::federation::v1::transaction::Item;
use rand::{Rng as _, RngCore};
use std::time::{Duration, Instant};

/// The limits and delays of a destination queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most items in one transaction (and most ephemeral items kept in memory).
    pub max_txn_items: usize,
    /// Largest transaction body, in bytes (a single larger item still goes, alone).
    pub max_txn_bytes: usize,
    /// First retry delay; doubles per failure.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Ephemeral items for a destination failing this long are dropped.
    pub drop_ephemeral_after: Duration,
    /// Shortest time between two presence-only transactions.
    pub presence_interval: Duration,
}

/// The transaction recorded as in flight to the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InflightRecord {
    /// Its transaction id.
    pub txn_id: String,
    /// The `seq` of its last durable item.
    pub last_seq: i64,
}

/// A durable item as stored in the destination's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedItem {
    /// Position in the queue (increasing).
    pub seq: i64,
    /// The item's JSON.
    pub payload: Vec<u8>,
}

/// A read of the durable queue the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// Read the in-flight record (report it with [`DestinationQueue::on_inflight`]).
    Inflight,
    /// Read queued items with `after < seq ≤ up_to`, oldest first, at most `limit` of them
    /// (`None`: no bound), and report them with [`DestinationQueue::on_items`].
    Items {
        /// Exclusive lower bound (`None`: from the start).
        after: Option<i64>,
        /// Inclusive upper bound (`None`: to the end).
        up_to: Option<i64>,
        /// Most items to read (`None`: all).
        limit: Option<usize>,
    },
}

/// A write to the durable queue the driver must commit (then report
/// [`DestinationQueue::on_written`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Record `txn_id` (ending at `last_seq`) as in flight, replacing any earlier record, and
    /// in the same commit drop the items up to `done_up_to`, which the destination accepted.
    Inflight {
        /// The transaction about to be sent.
        txn_id: String,
        /// The `seq` of its last item.
        last_seq: i64,
        /// The destination accepted everything up to here.
        done_up_to: Option<i64>,
    },
    /// The destination accepted everything up to `up_to`: drop those items and the record.
    Done {
        /// Last accepted `seq`.
        up_to: i64,
    },
}

/// One transaction to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Its id (the same on every resend).
    pub txn_id: String,
    /// Durable items' JSON, in queue order.
    pub durable: Vec<Vec<u8>>,
    /// Typing and presence items, after the durable ones.
    pub ephemeral: Vec<Item>,
    /// The `seq` of the last durable item (`None`: ephemeral items only).
    pub last_seq: Option<i64>,
}

impl Batch {
    /// Items in the transaction.
    pub fn len(&self) -> usize {
        self.durable.len() + self.ephemeral.len()
    }

    /// Whether the transaction carries nothing (never true of a batch the queue hands out).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read from the durable queue.
    Load(Load),
    /// Commit a write to the durable queue.
    Write(Write),
    /// Send this transaction and report the answer with [`DestinationQueue::on_result`].
    Send(Batch),
    /// Nothing before this time (backoff, or presence throttling); poll again then, or sooner
    /// when notified.
    SleepUntil(Instant),
    /// Nothing to do until notified.
    Idle,
}

/// How the destination answered a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnResult {
    /// It answered 200: the transaction is accepted (items it refused are its business).
    Accepted,
    /// No answer, or an error: retry later.
    Failed,
}

/// What the queue knows of the in-flight record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Known {
    /// Not read yet (at start, and after a store error).
    Unknown,
    /// As stored.
    Is(Option<InflightRecord>),
}

#[derive(Debug)]
enum Step {
    /// Nothing to do until notified.
    Idle,
    /// A round starts: wait out a backoff or a throttle, then read the durable queue.
    Start,
    /// Waiting for [`Load::Inflight`].
    AwaitInflight,
    /// Waiting for [`Load::Items`].
    AwaitItems,
    /// Items read: decide what to write or send.
    Loaded(Vec<QueuedItem>),
    /// Waiting for a [`Write`]; then send this batch (`None`: decide again, nothing loaded).
    AwaitWrite(Option<Batch>),
    /// Recorded: send it.
    Ready(Batch),
    /// Waiting for the answer to a transaction.
    AwaitSend {
        /// Its last durable item.
        last_seq: Option<i64>,
        /// Its ephemeral items, requeued if it fails.
        ephemeral: Vec<Item>,
    },
}

/// The outbound transaction queue of one destination (see the module documentation).
pub struct DestinationQueue<R> {
    config: QueueConfig,
    /// Prefix of transaction ids, unique to the sending server's database.
    txn_prefix: String,
    rng: R,
    step: Step,
    inflight: Known,
    /// The last item of the transaction just accepted, not yet dropped from the store.
    accepted: Option<i64>,
    ephemeral: Vec<Item>,
    /// Something was queued since the durable queue was last read.
    dirty: bool,
    failures: u32,
    failing_since: Option<Instant>,
    retry_at: Option<Instant>,
    /// The destination contacted us: end the current (or next) backoff at once.
    contacted: bool,
    last_presence_only: Option<Instant>,
    throttled_until: Option<Instant>,
    dropped: usize,
}

impl<R: RngCore> DestinationQueue<R> {
    /// A queue that knows nothing yet: its first poll reads the store, so a queue built after
    /// a restart picks up exactly where the last one stopped. `txn_prefix` makes transaction
    /// ids unique to this server's database; `rng` draws backoff jitter and ephemeral
    /// transaction ids.
    pub fn new(config: QueueConfig, txn_prefix: String, rng: R) -> Self {
        Self {
            config,
            txn_prefix,
            rng,
            step: Step::Start,
            inflight: Known::Unknown,
            accepted: None,
            ephemeral: Vec::new(),
            dirty: false,
            failures: 0,
            failing_since: None,
            retry_at: None,
            contacted: false,
            last_presence_only: None,
            throttled_until: None,
            dropped: 0,
        }
    }

    /// What to do next. Load, write and send actions are handed out once; report their
    /// outcome before polling again (a poll while one is outstanding returns [`Action::Idle`]).
    pub fn poll(&mut self, now: Instant) -> Action {
        loop {
            match std::mem::replace(&mut self.step, Step::Idle) {
                Step::Idle => {
                    if !self.dirty {
                        return Action::Idle;
                    }
                    self.step = Step::Start;
                }
                Step::Start => {
                    if let Some(at) = self.retry_at {
                        if self.contacted {
                            self.contacted = false;
                        } else if now < at {
                            self.step = Step::Start;
                            return Action::SleepUntil(at);
                        }
                        self.retry_at = None;
                    }
                    if let Some(until) = self.throttled_until {
                        if now < until {
                            self.step = Step::Start;
                            return Action::SleepUntil(until);
                        }
                        self.throttled_until = None;
                    }
                    return self.load();
                }
                Step::Loaded(items) => {
                    if let Some(action) = self.decide(items, now) {
                        return action;
                    }
                }
                Step::Ready(batch) => return self.send(batch),
                waiting @ (Step::AwaitInflight | Step::AwaitItems | Step::AwaitWrite(_) | Step::AwaitSend { .. }) => {
                    self.step = waiting;
                    return Action::Idle;
                }
            }
        }
    }

    /// The read that starts a round.
    fn load(&mut self) -> Action {
        let record = match (&self.accepted, &self.inflight) {
            // The accepted transaction's record is about to be replaced: read past it.
            (Some(_), _) => None,
            (None, Known::Unknown) => {
                self.step = Step::AwaitInflight;
                return Action::Load(Load::Inflight);
            }
            (None, Known::Is(record)) => record.as_ref(),
        };
        let load = match record {
            Some(record) => Load::Items { after: None, up_to: Some(record.last_seq), limit: None },
            None => Load::Items { after: self.accepted, up_to: None, limit: Some(self.config.max_txn_items) },
        };
        self.dirty = false;
        self.step = Step::AwaitItems;
        Action::Load(load)
    }

    /// Builds the round's transaction from the items read; `None` to go on deciding.
    fn decide(&mut self, items: Vec<QueuedItem>, now: Instant) -> Option<Action> {
        // A recorded transaction is resent exactly (same id, same items), unless it is the one
        // just accepted, whose record the next one replaces.
        let record = match (&self.accepted, &self.inflight) {
            (None, Known::Is(Some(record))) => Some(record.clone()),
            _ => None,
        };
        let mut durable = Vec::with_capacity(items.len());
        let mut size = 256;
        let mut first_seq = None;
        let mut last_seq = None;
        for item in items {
            if record.is_none() && !durable.is_empty() && size + item.payload.len() + 1 > self.config.max_txn_bytes {
                break;
            }
            size += item.payload.len() + 1;
            first_seq.get_or_insert(item.seq);
            last_seq = Some(item.seq);
            durable.push(item.payload);
        }
        if durable.is_empty() {
            // Nothing durable to send: settle the accepted transaction (or a stale record).
            if let Some(up_to) = self.accepted.or(record.as_ref().map(|record| record.last_seq)) {
                self.step = Step::AwaitWrite(None);
                return Some(Action::Write(Write::Done { up_to }));
            }
        }
        let ephemeral = self.take_ephemeral(now);
        let Some(last) = last_seq else {
            if ephemeral.is_empty() {
                // Nothing at all: the round is over.
                self.failures = 0;
                self.failing_since = None;
                self.step = Step::Idle;
                return None;
            }
            if ephemeral.iter().all(|item| matches!(item, Item::Presence(_))) {
                if let Some(until) =
                    self.last_presence_only.map(|last| last + self.config.presence_interval).filter(|until| now < *until)
                {
                    self.requeue(ephemeral);
                    self.throttled_until = Some(until);
                    self.step = Step::Start;
                    return Some(Action::SleepUntil(until));
                }
                self.last_presence_only = Some(now);
            }
            let txn_id = format!("{}.e{:032x}", self.txn_prefix, self.rng.gen::<u128>());
            return Some(self.send(Batch { txn_id, durable, ephemeral, last_seq: None }));
        };
        match record {
            Some(record) => Some(self.send(Batch { txn_id: record.txn_id, durable, ephemeral, last_seq })),
            None => {
                let first = first_seq.unwrap_or(last);
                let txn_id = format!("{}.{first}-{last}", self.txn_prefix);
                let write = Write::Inflight { txn_id: txn_id.clone(), last_seq: last, done_up_to: self.accepted };
                self.step = Step::AwaitWrite(Some(Batch { txn_id, durable, ephemeral, last_seq }));
                Some(Action::Write(write))
            }
        }
    }

    fn send(&mut self, batch: Batch) -> Action {
        self.step = Step::AwaitSend { last_seq: batch.last_seq, ephemeral: batch.ephemeral.clone() };
        Action::Send(batch)
    }

    /// Takes the ephemeral items, or drops them if the destination has been failing too long.
    fn take_ephemeral(&mut self, now: Instant) -> Vec<Item> {
        let mut items = std::mem::take(&mut self.ephemeral);
        let failing_too_long =
            self.failing_since.is_some_and(|since| now.saturating_duration_since(since) >= self.config.drop_ephemeral_after);
        if failing_too_long && !items.is_empty() {
            self.dropped += items.len();
            items.clear();
        }
        items
    }

    /// Puts back ephemeral items that were taken but not delivered, ahead of newer ones (a
    /// newer presence of the same user still replaces an older one).
    fn requeue(&mut self, items: Vec<Item>) {
        let newer = std::mem::replace(&mut self.ephemeral, items);
        for item in newer {
            push_coalesced(&mut self.ephemeral, item);
        }
    }

    /// Reports [`Load::Inflight`]: the record as stored.
    pub fn on_inflight(&mut self, record: Option<InflightRecord>) {
        if matches!(self.step, Step::AwaitInflight) {
            self.inflight = Known::Is(record);
            self.step = Step::Start;
        }
    }

    /// Reports [`Load::Items`]: the items read, oldest first.
    pub fn on_items(&mut self, items: Vec<QueuedItem>) {
        if matches!(self.step, Step::AwaitItems) {
            self.step = Step::Loaded(items);
        }
    }

    /// Reports that the last [`Write`] is committed.
    pub fn on_written(&mut self) {
        match std::mem::replace(&mut self.step, Step::Idle) {
            Step::AwaitWrite(Some(batch)) => {
                if let Some(last_seq) = batch.last_seq {
                    self.inflight = Known::Is(Some(InflightRecord { txn_id: batch.txn_id.clone(), last_seq }));
                }
                self.accepted = None;
                self.step = Step::Ready(batch);
            }
            Step::AwaitWrite(None) => {
                self.inflight = Known::Is(None);
                self.accepted = None;
                self.step = Step::Loaded(Vec::new());
            }
            other => self.step = other,
        }
    }

    /// Reports the answer to the transaction last handed out by [`Action::Send`].
    pub fn on_result(&mut self, result: TxnResult, now: Instant) {
        let Step::AwaitSend { last_seq, ephemeral } = std::mem::replace(&mut self.step, Step::Start) else {
            return;
        };
        match result {
            TxnResult::Accepted => {
                // Dropped from the store with the next transaction's record (one commit), or
                // alone when there is none.
                if last_seq.is_some() {
                    self.accepted = last_seq;
                }
                self.failures = 0;
                self.failing_since = None;
            }
            TxnResult::Failed => {
                self.failing_since.get_or_insert(now);
                self.back_off(now);
                self.requeue(ephemeral);
            }
        }
    }

    /// Reports that a [`Load`] or [`Write`] failed: back off, then start over from the store.
    pub fn on_store_error(&mut self, now: Instant) {
        if let Step::AwaitWrite(Some(batch)) = std::mem::replace(&mut self.step, Step::Start) {
            self.requeue(batch.ephemeral);
        }
        self.inflight = Known::Unknown;
        self.accepted = None;
        self.back_off(now);
    }

    fn back_off(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let jitter = self.rng.gen_range(0.0..=1.0);
        self.retry_at = Some(now + backoff(self.config.retry_min, self.config.retry_max, self.failures, jitter));
    }

    /// New durable items were committed to the destination's queue.
    pub fn on_new_items(&mut self) {
        self.dirty = true;
    }

    /// The destination sent us a valid request: it is up, so stop backing off.
    pub fn on_contact(&mut self) {
        self.contacted = true;
    }

    /// Queues a typing or presence item in memory (coalesced: a newer presence of the same
    /// user replaces the older one; past `max_txn_items` the oldest item goes).
    pub fn push_ephemeral(&mut self, item: Item) {
        push_coalesced(&mut self.ephemeral, item);
        if self.ephemeral.len() > self.config.max_txn_items {
            self.ephemeral.remove(0);
        }
        self.dirty = true;
    }

    /// Failed attempts since the last success (or since the queue was last found empty).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// When the current backoff ends, if one is running.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Ephemeral items dropped (the destination failing too long) since the last call.
    pub fn take_dropped(&mut self) -> usize {
        std::mem::take(&mut self.dropped)
    }
}

/// Appends `item`; a presence item replaces the queued presence of the same user.
fn push_coalesced(queue: &mut Vec<Item>, item: Item) {
    if let Item::Presence(new) = &item {
        queue.retain(|old| !matches!(old, Item::Presence(old) if old.presence.user == new.presence.user));
    }
    queue.push(item);
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_spec::federation::v1::transaction::{PresenceItem, TypingItem};
    use parley_spec::v1::presence::{PresenceInfo, PresenceStatus};
    use parley_spec::UserId;
    use rand::rngs::mock::StepRng;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn config() -> QueueConfig {
        QueueConfig {
            max_txn_items: 3,
            max_txn_bytes: 64 * 1024,
            retry_min: MS(100),
            retry_max: MS(1_000),
            drop_ephemeral_after: MS(5_000),
            presence_interval: MS(500),
        }
    }

    fn new_queue() -> DestinationQueue<StdRng> {
        DestinationQueue::new(config(), "p".to_owned(), StdRng::seed_from_u64(7))
    }

    /// The durable queue of one destination, as the server's tables keep it.
    #[derive(Debug, Default, Clone)]
    struct Store {
        items: Vec<QueuedItem>,
        inflight: Option<InflightRecord>,
        next_seq: i64,
        /// Fail the next write.
        fail_write: bool,
    }

    impl Store {
        fn with_items(count: usize) -> Self {
            let mut store = Self::default();
            store.push(count);
            store
        }

        fn push(&mut self, count: usize) {
            for _ in 0..count {
                self.next_seq += 1;
                self.items.push(QueuedItem { seq: self.next_seq, payload: format!("{{\"n\":{}}}", self.next_seq).into_bytes() });
            }
        }

        fn seqs(&self) -> Vec<i64> {
            self.items.iter().map(|item| item.seq).collect()
        }

        fn drop_up_to(&mut self, up_to: i64) {
            self.items.retain(|item| item.seq > up_to);
        }
    }

    /// Does the loads and writes the queue asks for against `store` and returns the first other
    /// action (a send, a sleep or idle).
    fn drive<R: RngCore>(queue: &mut DestinationQueue<R>, store: &mut Store, now: Instant) -> Action {
        for _ in 0..100 {
            let action = queue.poll(now);
            if matches!(action, Action::Write(_)) && std::mem::take(&mut store.fail_write) {
                queue.on_store_error(now);
                continue;
            }
            match action {
                Action::Load(Load::Inflight) => queue.on_inflight(store.inflight.clone()),
                Action::Load(Load::Items { after, up_to, limit }) => {
                    let items = store
                        .items
                        .iter()
                        .filter(|item| item.seq > after.unwrap_or(0) && item.seq <= up_to.unwrap_or(i64::MAX))
                        .take(limit.unwrap_or(usize::MAX))
                        .cloned()
                        .collect();
                    queue.on_items(items);
                }
                Action::Write(Write::Inflight { txn_id, last_seq, done_up_to }) => {
                    if let Some(done) = done_up_to {
                        store.drop_up_to(done);
                    }
                    store.inflight = Some(InflightRecord { txn_id, last_seq });
                    queue.on_written();
                }
                Action::Write(Write::Done { up_to }) => {
                    store.drop_up_to(up_to);
                    store.inflight = None;
                    queue.on_written();
                }
                other => return other,
            }
        }
        panic!("the queue keeps asking for loads and writes");
    }

    fn sent(action: Action) -> Batch {
        match action {
            Action::Send(batch) => batch,
            other => panic!("expected a transaction, got {other:?}"),
        }
    }

    fn sleep(action: Action) -> Instant {
        match action {
            Action::SleepUntil(at) => at,
            other => panic!("expected a sleep, got {other:?}"),
        }
    }

    fn payloads(seqs: std::ops::RangeInclusive<i64>) -> Vec<Vec<u8>> {
        seqs.map(|n| format!("{{\"n\":{n}}}").into_bytes()).collect()
    }

    fn user(name: &str) -> UserId {
        UserId::parse(&format!("@{name}:a.test")).unwrap()
    }

    fn presence(name: &str, status: PresenceStatus) -> Item {
        Item::Presence(PresenceItem::new(PresenceInfo::new(user(name), status, None), vec![user("bob")]))
    }

    fn typing(name: &str) -> Item {
        Item::Typing(TypingItem::new(user(name), user("bob"), true))
    }

    #[test]
    fn durable_items_leave_in_order_in_bounded_transactions_each_recorded_before_it_is_sent() {
        let t0 = Instant::now();
        let mut store = Store::with_items(5);
        let mut queue = new_queue();
        assert_eq!(queue.poll(t0), Action::Load(Load::Inflight), "a new queue reads the record first");
        queue.on_inflight(None);
        assert_eq!(queue.poll(t0), Action::Load(Load::Items { after: None, up_to: None, limit: Some(3) }));
        queue.on_items(store.items[..3].to_vec());
        assert_eq!(
            queue.poll(t0),
            Action::Write(Write::Inflight { txn_id: "p.1-3".into(), last_seq: 3, done_up_to: None }),
            "recorded before it is sent"
        );
        assert_eq!(queue.poll(t0), Action::Idle, "nothing more until the write is reported");
        store.inflight = Some(InflightRecord { txn_id: "p.1-3".into(), last_seq: 3 });
        queue.on_written();
        let batch = sent(queue.poll(t0));
        assert_eq!(batch, Batch { txn_id: "p.1-3".into(), durable: payloads(1..=3), ephemeral: vec![], last_seq: Some(3) });
        queue.on_result(TxnResult::Accepted, t0);

        // The next transaction's record drops the accepted items in the same write.
        assert_eq!(queue.poll(t0), Action::Load(Load::Items { after: Some(3), up_to: None, limit: Some(3) }));
        queue.on_items(store.items[3..].to_vec());
        assert_eq!(queue.poll(t0), Action::Write(Write::Inflight { txn_id: "p.4-5".into(), last_seq: 5, done_up_to: Some(3) }));
        queue.on_written();
        assert_eq!(sent(queue.poll(t0)).durable, payloads(4..=5));
        queue.on_result(TxnResult::Accepted, t0);

        // Nothing left: the last accepted transaction is settled alone, then the queue idles.
        assert_eq!(queue.poll(t0), Action::Load(Load::Items { after: Some(5), up_to: None, limit: Some(3) }));
        queue.on_items(vec![]);
        assert_eq!(queue.poll(t0), Action::Write(Write::Done { up_to: 5 }));
        queue.on_written();
        assert_eq!(queue.poll(t0), Action::Idle);

        // New items start a round; a round reads from the start of the queue once settled.
        queue.on_new_items();
        assert_eq!(queue.poll(t0), Action::Load(Load::Items { after: None, up_to: None, limit: Some(3) }));
    }

    #[test]
    fn the_byte_limit_splits_transactions_but_an_oversized_item_still_goes_alone() {
        let t0 = Instant::now();
        let mut store = Store::default();
        for (seq, size) in [(1, 30_000), (2, 30_000), (3, 30_000), (4, 100_000), (5, 10)] {
            store.items.push(QueuedItem { seq, payload: vec![b'x'; size] });
        }
        let mut queue =
            DestinationQueue::new(QueueConfig { max_txn_items: 10, ..config() }, "p".into(), StdRng::seed_from_u64(1));
        let mut sizes = Vec::new();
        for _ in 0..3 {
            let batch = sent(drive(&mut queue, &mut store, t0));
            sizes.push(batch.durable.iter().map(Vec::len).collect::<Vec<_>>());
            queue.on_result(TxnResult::Accepted, t0);
        }
        assert_eq!(sizes, [vec![30_000, 30_000], vec![30_000], vec![100_000]]);
        assert_eq!(sent(drive(&mut queue, &mut store, t0)).txn_id, "p.5-5");
    }

    #[test]
    fn backoff_doubles_within_its_jitter_bounds_up_to_the_cap() {
        let mut store = Store::with_items(1);
        for seed in 0..20 {
            let mut queue = DestinationQueue::new(config(), "p".into(), StdRng::seed_from_u64(seed));
            let mut now = Instant::now();
            for failures in 1..=8u32 {
                sent(drive(&mut queue, &mut store, now));
                queue.on_result(TxnResult::Failed, now);
                assert_eq!(queue.failures(), failures);
                let ceiling = MS((100u64 << (failures - 1)).min(1_000));
                let at = sleep(drive(&mut queue, &mut store, now));
                let delay = at - now;
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "failure {failures}: {delay:?} not in [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
                // New items do not cut a backoff short.
                queue.on_new_items();
                assert_eq!(drive(&mut queue, &mut store, at - MS(1)), Action::SleepUntil(at));
                now = at;
            }
        }
    }

    #[test]
    fn backoff_bounds_are_reached_with_the_extreme_jitters() {
        let extremes: [(StepRng, [u64; 6]); 2] = [
            (StepRng::new(0, 0), [50, 100, 200, 400, 500, 500]),
            (StepRng::new(u64::MAX, 0), [100, 200, 400, 800, 1_000, 1_000]),
        ];
        for (rng, expected) in extremes {
            let mut store = Store::with_items(1);
            let mut queue = DestinationQueue::new(config(), "p".into(), rng);
            let mut now = Instant::now();
            let mut delays = Vec::new();
            for _ in 0..expected.len() {
                sent(drive(&mut queue, &mut store, now));
                queue.on_result(TxnResult::Failed, now);
                let at = sleep(drive(&mut queue, &mut store, now));
                delays.push((at - now).as_millis() as u64);
                now = at;
            }
            assert_eq!(delays, expected);
        }
    }

    #[test]
    fn contact_ends_a_backoff_at_once_and_success_resets_it() {
        let mut store = Store::with_items(2);
        let mut queue = DestinationQueue::new(config(), "p".into(), StepRng::new(u64::MAX, 0));
        let mut now = Instant::now();
        for delay in [100, 200, 400] {
            sent(drive(&mut queue, &mut store, now));
            queue.on_result(TxnResult::Failed, now);
            let at = sleep(drive(&mut queue, &mut store, now));
            assert_eq!(at, now + MS(delay));
            now = at;
        }
        sent(drive(&mut queue, &mut store, now));
        queue.on_result(TxnResult::Failed, now);
        assert_eq!(sleep(drive(&mut queue, &mut store, now)), now + MS(800));
        queue.on_contact();
        let batch = sent(drive(&mut queue, &mut store, now + MS(1)));
        assert_eq!(batch.txn_id, "p.1-2", "retried at once, the same transaction");
        assert_eq!(queue.failures(), 4, "a contact ends the wait; the count goes on until a success");
        queue.on_result(TxnResult::Accepted, now + MS(2));
        assert_eq!(queue.failures(), 0);
        store.push(1);
        queue.on_new_items();
        assert_eq!(sent(drive(&mut queue, &mut store, now + MS(3))).txn_id, "p.3-3");
        queue.on_result(TxnResult::Failed, now + MS(3));
        assert_eq!(sleep(drive(&mut queue, &mut store, now + MS(3))), now + MS(103), "back to the first delay");
    }

    #[test]
    fn a_contact_while_healthy_is_kept_for_the_next_backoff() {
        let mut store = Store::with_items(1);
        let mut queue = new_queue();
        let t0 = Instant::now();
        queue.on_contact();
        sent(drive(&mut queue, &mut store, t0));
        queue.on_result(TxnResult::Failed, t0);
        assert!(matches!(drive(&mut queue, &mut store, t0), Action::Send(_)), "the kept contact ends the first backoff");
        queue.on_result(TxnResult::Failed, t0);
        assert!(matches!(drive(&mut queue, &mut store, t0), Action::SleepUntil(_)), "and only that one");
    }

    #[test]
    fn a_crash_between_the_record_and_the_answer_resends_the_same_transaction() {
        let t0 = Instant::now();
        let mut store = Store::with_items(3);
        let mut queue = new_queue();
        let first = sent(drive(&mut queue, &mut store, t0));
        assert_eq!(store.inflight, Some(InflightRecord { txn_id: "p.1-3".into(), last_seq: 3 }), "recorded before sending");
        // The process dies while the transaction is on the wire; more items were queued.
        drop(queue);
        store.push(4);

        let mut rebuilt = new_queue();
        assert_eq!(rebuilt.poll(t0), Action::Load(Load::Inflight));
        rebuilt.on_inflight(store.inflight.clone());
        assert_eq!(rebuilt.poll(t0), Action::Load(Load::Items { after: None, up_to: Some(3), limit: None }));
        rebuilt.on_items(store.items[..3].to_vec());
        let again = sent(rebuilt.poll(t0));
        assert_eq!(again, first, "same id, same items, nothing recorded again");
        rebuilt.on_result(TxnResult::Accepted, t0);
        let next = sent(drive(&mut rebuilt, &mut store, t0));
        assert_eq!((next.txn_id.as_str(), next.durable), ("p.4-6", payloads(4..=6)));
        assert_eq!(store.seqs(), [4, 5, 6, 7], "the resent items were dropped with the next record");
    }

    #[test]
    fn a_store_error_backs_off_and_starts_over_from_the_stored_record() {
        let t0 = Instant::now();
        let mut store = Store::with_items(4);
        let mut queue = DestinationQueue::new(config(), "p".into(), StepRng::new(u64::MAX, 0));
        sent(drive(&mut queue, &mut store, t0));
        queue.on_result(TxnResult::Accepted, t0);
        // Recording the next transaction (and dropping 1-3) fails.
        store.fail_write = true;
        assert_eq!(sleep(drive(&mut queue, &mut store, t0)), t0 + MS(100));
        assert_eq!(store.seqs(), [1, 2, 3, 4]);
        // The accepted transaction is read back from its record and resent (the destination
        // drops the repeat), then the queue goes on.
        let resent = sent(drive(&mut queue, &mut store, t0 + MS(100)));
        assert_eq!(resent.txn_id, "p.1-3");
        queue.on_result(TxnResult::Accepted, t0 + MS(100));
        assert_eq!(queue.failures(), 0);
        assert_eq!(sent(drive(&mut queue, &mut store, t0 + MS(100))).txn_id, "p.4-4");
        assert_eq!(store.seqs(), [4]);
    }

    #[test]
    fn ephemeral_items_ride_along_come_back_after_a_failure_and_are_dropped_when_down_too_long() {
        let t0 = Instant::now();
        let mut store = Store::with_items(1);
        let mut queue = DestinationQueue::new(config(), "p".into(), StepRng::new(u64::MAX, 0));
        queue.push_ephemeral(typing("alice"));
        let batch = sent(drive(&mut queue, &mut store, t0));
        assert_eq!((batch.durable.len(), batch.ephemeral.clone()), (1, vec![typing("alice")]));
        queue.on_result(TxnResult::Failed, t0);
        // Still within `drop_ephemeral_after` of the first failure: the typing comes back.
        let mut now = t0;
        loop {
            now = sleep(drive(&mut queue, &mut store, now));
            if now - t0 >= MS(5_000) {
                break;
            }
            let batch = sent(drive(&mut queue, &mut store, now));
            assert_eq!(batch.ephemeral, vec![typing("alice")], "at {:?}", now - t0);
            queue.on_result(TxnResult::Failed, now);
        }
        assert_eq!(queue.take_dropped(), 0);
        let batch = sent(drive(&mut queue, &mut store, now));
        assert_eq!((batch.durable.len(), batch.ephemeral.len()), (1, 0), "durable items stay, typing goes");
        assert_eq!(queue.take_dropped(), 1);
        assert_eq!(queue.take_dropped(), 0);
        queue.on_result(TxnResult::Accepted, now);
        // Once the destination answers, typing flows again.
        queue.push_ephemeral(typing("carol"));
        assert_eq!(sent(drive(&mut queue, &mut store, now)).ephemeral, vec![typing("carol")]);
    }

    #[test]
    fn ephemeral_only_transactions_to_a_dead_destination_end_in_idle() {
        let t0 = Instant::now();
        let mut store = Store::default();
        let mut queue = new_queue();
        queue.push_ephemeral(typing("alice"));
        let mut now = t0;
        let mut ids = Vec::new();
        loop {
            match drive(&mut queue, &mut store, now) {
                Action::Send(batch) => {
                    assert_eq!(batch.last_seq, None);
                    ids.push(batch.txn_id);
                    queue.on_result(TxnResult::Failed, now);
                }
                Action::SleepUntil(at) => now = at,
                Action::Idle => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(now - t0 >= MS(5_000));
        assert_eq!(queue.take_dropped(), 1);
        assert_eq!(queue.failures(), 0, "an empty queue resets the failure count");
        ids.dedup();
        assert!(ids.len() > 1 && ids.iter().all(|id| id.starts_with("p.e") && id.len() == 3 + 32), "fresh ids: {ids:?}");
    }

    #[test]
    fn presence_alone_leaves_at_most_once_per_interval_coalesced() {
        let t0 = Instant::now();
        let mut store = Store::default();
        let mut queue = new_queue();
        queue.push_ephemeral(presence("alice", PresenceStatus::Online));
        assert_eq!(sent(drive(&mut queue, &mut store, t0)).ephemeral, vec![presence("alice", PresenceStatus::Online)]);
        queue.on_result(TxnResult::Accepted, t0 + MS(10));
        queue.push_ephemeral(presence("alice", PresenceStatus::Offline));
        queue.push_ephemeral(presence("carol", PresenceStatus::Online));
        assert_eq!(drive(&mut queue, &mut store, t0 + MS(20)), Action::SleepUntil(t0 + MS(500)));
        queue.push_ephemeral(presence("alice", PresenceStatus::Online));
        assert_eq!(drive(&mut queue, &mut store, t0 + MS(499)), Action::SleepUntil(t0 + MS(500)));
        let batch = sent(drive(&mut queue, &mut store, t0 + MS(500)));
        assert_eq!(
            batch.ephemeral,
            vec![presence("carol", PresenceStatus::Online), presence("alice", PresenceStatus::Online)],
            "newest per user"
        );
        queue.on_result(TxnResult::Accepted, t0 + MS(510));
        // Typing is not presence alone: it leaves at once (and takes queued presence along).
        queue.push_ephemeral(presence("alice", PresenceStatus::Offline));
        queue.push_ephemeral(typing("alice"));
        assert_eq!(sent(drive(&mut queue, &mut store, t0 + MS(520))).ephemeral.len(), 2);
    }

    #[test]
    fn presence_goes_with_durable_items_without_waiting() {
        let t0 = Instant::now();
        let mut store = Store::default();
        let mut queue = new_queue();
        queue.push_ephemeral(presence("alice", PresenceStatus::Online));
        sent(drive(&mut queue, &mut store, t0));
        queue.on_result(TxnResult::Accepted, t0);
        store.push(1);
        queue.on_new_items();
        queue.push_ephemeral(presence("alice", PresenceStatus::Offline));
        let batch = sent(drive(&mut queue, &mut store, t0 + MS(1)));
        assert_eq!((batch.durable.len(), batch.ephemeral.len()), (1, 1));
    }

    #[test]
    fn ephemeral_items_are_capped_oldest_first() {
        let mut queue = new_queue();
        for name in ["a", "b", "c", "d"] {
            queue.push_ephemeral(typing(name));
        }
        queue.push_ephemeral(presence("e", PresenceStatus::Online));
        queue.push_ephemeral(presence("e", PresenceStatus::Offline));
        let batch = sent(drive(&mut queue, &mut Store::default(), Instant::now()));
        assert_eq!(batch.ephemeral, vec![typing("c"), typing("d"), presence("e", PresenceStatus::Offline)]);
    }

    #[test]
    fn a_notification_during_a_round_leads_to_another_round() {
        let t0 = Instant::now();
        let mut store = Store::default();
        let mut queue = new_queue();
        assert_eq!(drive(&mut queue, &mut store, t0), Action::Idle);
        assert_eq!(queue.poll(t0), Action::Idle, "stays idle until notified");
        queue.on_new_items();
        assert_eq!(queue.poll(t0), Action::Load(Load::Items { after: None, up_to: None, limit: Some(3) }));
        // Committed after the read: the round finds nothing, so another one starts.
        store.push(1);
        queue.on_new_items();
        queue.on_items(vec![]);
        assert_eq!(sent(drive(&mut queue, &mut store, t0)).txn_id, "p.1-1");
    }
}
