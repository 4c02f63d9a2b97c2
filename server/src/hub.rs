//! Live delivery: the registry of connected devices. The hub subscribes to the writer's
//! commits ([`LiveEvents`]): right after a commit, in the writer task, it hands each durable
//! inbox event to the device's connection task, if it is connected. A
//! connection whose buffer is full (in events, or in unsent bytes: see [`crate::outgoing`]) is
//! marked lagged, woken, and reads its inbox from the database instead, so a slow device never
//! blocks anyone, never misses anything and never holds more memory than its budget.

use crate::outgoing::Unsent;
use crate::storage::writer::Committed;
use crate::storage::{DevicePk, InboxRow, LiveEvents};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Notify;

/// Bytes an event takes on the wire: its payload and the frame around it.
pub fn event_bytes(row: &InboxRow) -> usize {
    row.payload.len() + 48
}

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection of the same device took over.
    Replaced,
    /// The device was removed or logged out.
    Revoked,
}

/// What a connection task receives.
#[derive(Debug)]
pub enum Push {
    /// A durable inbox event.
    Event(Arc<InboxRow>),
    /// An ephemeral, already serialized server frame (typing, presence).
    Frame(Bytes),
    /// A new message of one of the device's groups.
    Group(Arc<GroupPush>),
    /// Close the connection.
    Close(CloseReason),
}

/// A group message for a connected member device: its `group_event` frame, serialized once for
/// every member, or `None` when the device must read it from the database (its Welcome).
#[derive(Debug)]
pub struct GroupPush {
    /// The group.
    pub group_id: parley_spec::GroupId,
    /// The message's position.
    pub seq: parley_spec::GroupSeq,
    /// The frame, if it is the same for every member.
    pub frame: Option<Bytes>,
    /// Whether it wakes a member device that has no connection (an application message, a
    /// Welcome); commits and proposals do not.
    pub wakes: bool,
}

/// A connection's queue of pushes, filled by the hub (from any thread) and emptied by the
/// connection task at each wake-up, all at once, so a burst costs the task one wake-up and the
/// socket one write. An empty mailbox holds no memory: most connections are idle, and a
/// channel would keep a block of slots for each of them.
pub struct Mailbox {
    queue: Mutex<VecDeque<Push>>,
    /// Most pushes queued; past it live events are dropped and the connection marked lagged.
    capacity: usize,
    /// Set when live events were dropped (queue or byte budget full): the connection reads
    /// its inbox instead.
    lagged: AtomicBool,
    /// Woken when something was queued or `lagged` was set.
    wake: Notify,
    unsent: Arc<Unsent>,
}

impl Mailbox {
    /// A mailbox of at most `capacity` pushes, its events within `unsent`.
    pub fn new(capacity: usize, unsent: Arc<Unsent>) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), capacity, lagged: AtomicBool::new(false), wake: Notify::new(), unsent }
    }

    /// Queues `push` unless the mailbox is full.
    fn try_push(&self, push: Push) -> bool {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= self.capacity {
                return false;
            }
            queue.push_back(push);
        }
        self.wake.notify_one();
        true
    }

    /// Queues a close, full or not.
    fn close(&self, reason: CloseReason) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(Push::Close(reason));
        self.wake.notify_one();
    }

    /// Queues a live event within the connection's budgets, or marks it lagged and wakes it
    /// (it then reads the event from its inbox).
    fn push_event(&self, row: InboxRow) {
        let bytes = event_bytes(&row);
        if self.unsent.try_reserve(bytes) {
            if self.try_push(Push::Event(Arc::new(row))) {
                return;
            }
            self.unsent.release(bytes);
        }
        self.mark_lagged();
    }

    fn mark_lagged(&self) {
        self.lagged.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Waits until something was queued or the connection was marked lagged since the last
    /// wait (a wake-up that came while nobody waited is kept).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Everything queued, in order; the mailbox is left empty (and without memory).
    pub fn take(&self) -> VecDeque<Push> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether live events were dropped since the last call.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }
}

/// The registry of live connections, one per device.
#[derive(Default)]
pub struct Hub {
    conns: RwLock<HashMap<DevicePk, Registration>>,
    next_id: AtomicU64,
    /// Long-poll sync requests waiting for a device's next event.
    waiters: RwLock<HashMap<DevicePk, Arc<Notify>>>,
    /// Wakes devices that have no connection when a message reaches them (set once at start).
    push: std::sync::OnceLock<Arc<crate::push::Push>>,
    /// The other workers of this homeserver, if it has several (set once at start): what is
    /// for a device not connected here goes to them.
    relay: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// A registered connection: the hub's entry, and the connection's handle on it.
#[derive(Clone)]
pub struct Registration {
    /// Identifies this connection (a device may reconnect and replace it).
    pub conn_id: u64,
    /// What the hub queued for it.
    pub mailbox: Arc<Mailbox>,
}

impl Hub {
    /// Registers the connection of `device`, closing any older one. At most `capacity` pushes
    /// are queued for it, live events and notices only within `unsent`.
    pub fn register(&self, device: DevicePk, capacity: usize, unsent: Arc<Unsent>) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registration = Registration { conn_id, mailbox: Arc::new(Mailbox::new(capacity, unsent)) };
        let old = self.conns.write().unwrap_or_else(|e| e.into_inner()).insert(device, registration.clone());
        if let Some(push) = self.push.get() {
            push.connected(device);
        }
        if let Some(old) = old {
            old.mailbox.close(CloseReason::Replaced);
        }
        if let Some(relay) = self.relay.get() {
            // An older connection of this device on another worker gives way too.
            relay.close(device, CloseReason::Replaced);
            relay.watch(device);
        }
        registration
    }

    /// Removes a connection, unless a newer one of the same device replaced it.
    pub fn unregister(&self, device: DevicePk, conn_id: u64) {
        let mut conns = self.conns.write().unwrap_or_else(|e| e.into_inner());
        if conns.get(&device).is_some_and(|e| e.conn_id == conn_id) {
            conns.remove(&device);
            if let Some(relay) = self.relay.get() {
                relay.unwatch(device);
            }
        }
    }

    /// The wake-up of long-poll syncs of `device`.
    pub fn waiter(&self, device: DevicePk) -> Arc<Notify> {
        if let Some(notify) = self.waiters.read().unwrap_or_else(|e| e.into_inner()).get(&device) {
            return notify.clone();
        }
        self.waiters.write().unwrap_or_else(|e| e.into_inner()).entry(device).or_default().clone()
    }

    /// Hands durable events to the connected devices and wakes long-polling syncs.
    pub fn deliver(&self, committed: Vec<Committed>) {
        {
            let waiters = self.waiters.read().unwrap_or_else(|e| e.into_inner());
            if !waiters.is_empty() {
                for event in &committed {
                    if let Some(notify) = waiters.get(&event.device) {
                        notify.notify_waiters();
                    }
                }
            }
        }
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let (push, relay) = (self.push.get(), self.relay.get());
        for event in committed {
            match conns.get(&event.device) {
                Some(entry) => entry.mailbox.push_event(event.row),
                None => match relay {
                    // Perhaps connected to another worker (which then answers: no push).
                    Some(relay) => relay.event(event.device, &event.row),
                    // Messages wake an offline device; receipts and notices wait for it.
                    None if event.row.origin.is_some() => {
                        if let Some(push) = push {
                            push.wake(event.device);
                        }
                    }
                    None => {}
                },
            }
        }
    }

    /// Hands the hub the push service (once, at start).
    pub fn set_push(&self, push: Arc<crate::push::Push>) {
        let _ = self.push.set(push);
    }

    /// Hands the hub the link to the other workers (once, at start).
    pub fn set_relay(&self, relay: Arc<crate::cluster::Cluster>) {
        let _ = self.relay.set(relay);
    }

    /// The link to the other workers, if this homeserver has several.
    pub fn relay(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.relay.get()
    }

    /// Wakes `device` by push (no worker holds a connection of it).
    pub fn wake(&self, device: DevicePk) {
        if let Some(push) = self.push.get() {
            push.wake(device);
        }
    }

    /// Makes `device`'s connection here, if any, read its inbox and group streams again.
    pub fn mark_lagged(&self, device: DevicePk) {
        if let Some(entry) = self.conns.read().unwrap_or_else(|e| e.into_inner()).get(&device) {
            entry.mailbox.mark_lagged();
        }
    }

    /// Makes every connection here read its inbox and group streams again (after relayed
    /// traffic may have been lost).
    pub fn mark_all_lagged(&self) {
        for entry in self.conns.read().unwrap_or_else(|e| e.into_inner()).values() {
            entry.mailbox.mark_lagged();
        }
    }

    /// An event another worker committed, for `device`'s connection here; whether it has one.
    pub fn local_event(&self, device: DevicePk, row: InboxRow) -> bool {
        if let Some(notify) = self.waiters.read().unwrap_or_else(|e| e.into_inner()).get(&device) {
            notify.notify_waiters();
        }
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = conns.get(&device) else { return false };
        entry.mailbox.push_event(row);
        true
    }

    /// An ephemeral frame from another worker; whether `device` has a connection here.
    pub fn local_frame(&self, device: DevicePk, frame: Bytes) -> bool {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = conns.get(&device) else { return false };
        let bytes = frame.len();
        if entry.mailbox.unsent.try_reserve(bytes) && !entry.mailbox.try_push(Push::Frame(frame)) {
            entry.mailbox.unsent.release(bytes);
        }
        true
    }

    /// A group message from another worker; whether `device` has a connection here.
    pub fn local_group(&self, device: DevicePk, push: Arc<GroupPush>) -> bool {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = conns.get(&device) else { return false };
        if !entry.mailbox.try_push(Push::Group(push)) {
            entry.mailbox.mark_lagged();
        }
        true
    }

    /// Closes `device`'s connection here (asked by another worker); whether it had one.
    pub fn local_close(&self, device: DevicePk, reason: CloseReason) -> bool {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = conns.get(&device) else { return false };
        entry.mailbox.close(reason);
        true
    }

    /// Sends an ephemeral frame to a device if it is connected (dropped when its buffer or
    /// its budget of unsent bytes is full).
    pub fn send_ephemeral(&self, device: DevicePk, frame: Bytes) {
        if !self.local_frame(device, frame.clone()) {
            if let Some(relay) = self.relay.get() {
                relay.frame(device, frame);
            }
        }
    }

    /// Hands a group message to a device if it is connected; when its buffer is full it is
    /// marked lagged and woken, and reads its group streams from the database. A device with no
    /// connection gets a push wake-up when the message [`wakes`](GroupPush::wakes).
    pub fn push_group(&self, device: DevicePk, push: Arc<GroupPush>) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = conns.get(&device) else {
            if let Some(relay) = self.relay.get() {
                // Perhaps connected to another worker (which then answers: no push).
                relay.group(device, &push);
            } else if let (true, Some(waker)) = (push.wakes, self.push.get()) {
                waker.wake(device);
            }
            return;
        };
        if !entry.mailbox.try_push(Push::Group(push)) {
            entry.mailbox.mark_lagged();
        }
    }

    /// Closes a device's connection.
    pub fn close(&self, device: DevicePk, reason: CloseReason) {
        self.local_close(device, reason);
        if let Some(relay) = self.relay.get() {
            relay.close(device, reason);
        }
    }
}

impl LiveEvents for Hub {
    fn committed(&self, events: Vec<Committed>) {
        self.deliver(events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;
    use crate::outgoing::OutgoingBudget;
    use parley_spec::Seq;
    use std::time::Duration;

    fn committed(device: DevicePk, seq: u64) -> Committed {
        let row = InboxRow { seq: Seq::new(seq), origin: None, payload: Bytes::from_static(b"{}"), committed_at: None };
        Committed { device, row }
    }

    fn seqs(pushes: VecDeque<Push>) -> Vec<u64> {
        pushes
            .into_iter()
            .map(|push| match push {
                Push::Event(row) => row.seq.get(),
                other => panic!("not an event: {other:?}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_burst_wakes_the_connection_once_and_is_taken_whole_within_the_capacity() {
        let hub = Hub::default();
        let unsent = Arc::new(Unsent::new(&LimitsConfig::default(), Arc::new(OutgoingBudget::new(1 << 20))));
        let registration = hub.register(7, 2, unsent.clone());
        let mailbox = &registration.mailbox;

        hub.deliver(vec![committed(7, 1), committed(8, 1), committed(7, 2)]);
        tokio::time::timeout(Duration::from_secs(5), mailbox.woken()).await.expect("woken");
        assert_eq!(seqs(mailbox.take()), [1, 2], "in order, only this device's");
        assert!(!mailbox.take_lagged());
        assert!(mailbox.take().is_empty());

        // Past the capacity, events are dropped (their bytes released) and the connection is
        // told to read its inbox; a close is queued even then.
        hub.deliver(vec![committed(7, 3), committed(7, 4), committed(7, 5)]);
        hub.close(7, CloseReason::Revoked);
        assert!(mailbox.take_lagged());
        let pushes: Vec<Push> = mailbox.take().into();
        assert_eq!(pushes.len(), 3);
        assert!(matches!(&pushes[..2], [Push::Event(a), Push::Event(b)] if a.seq.get() == 3 && b.seq.get() == 4));
        assert!(matches!(pushes[2], Push::Close(CloseReason::Revoked)));
        // The connection releases an event's bytes once written; the dropped one holds none.
        assert_eq!(unsent.bytes(), 4 * (2 + 48), "the four events handed over hold their bytes");

        // A newer connection replaces this one: the old one is told, the new one gets events.
        let newer = hub.register(7, 2, unsent.clone());
        assert!(matches!(Vec::from(mailbox.take()).as_slice(), [Push::Close(CloseReason::Replaced)]));
        hub.deliver(vec![committed(7, 6)]);
        assert!(mailbox.take().is_empty());
        assert_eq!(seqs(newer.mailbox.take()), [6]);
    }
}
