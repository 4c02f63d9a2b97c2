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
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, Notify};

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
}

struct Entry {
    conn_id: u64,
    tx: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
    wake: Arc<Notify>,
    unsent: Arc<Unsent>,
}

impl Entry {
    /// Queues a live event within the connection's budgets, or marks it lagged and wakes it
    /// (it then reads the event from its inbox).
    fn push_event(&self, row: InboxRow) {
        let bytes = event_bytes(&row);
        if self.unsent.try_reserve(bytes) {
            if self.tx.try_send(Push::Event(Arc::new(row))).is_ok() {
                return;
            }
            self.unsent.release(bytes);
        }
        self.lagged.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The registry of live connections, one per device.
#[derive(Default)]
pub struct Hub {
    conns: RwLock<HashMap<DevicePk, Entry>>,
    next_id: AtomicU64,
    /// Long-poll sync requests waiting for a device's next event.
    waiters: RwLock<HashMap<DevicePk, Arc<Notify>>>,
}

/// A registered connection's handle on its own registration.
pub struct Registration {
    /// Identifies this connection (a device may reconnect and replace it).
    pub conn_id: u64,
    /// Set when live events were dropped because the buffer was full.
    pub lagged: Arc<AtomicBool>,
    /// Notified when `lagged` was set.
    pub wake: Arc<Notify>,
}

impl Hub {
    /// Registers the connection of `device`, closing any older one. Live events and notices
    /// are queued only within `unsent`.
    pub fn register(&self, device: DevicePk, tx: mpsc::Sender<Push>, unsent: Arc<Unsent>) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Notify::new());
        let entry = Entry { conn_id, tx, lagged: lagged.clone(), wake: wake.clone(), unsent };
        let old = self.conns.write().unwrap_or_else(|e| e.into_inner()).insert(device, entry);
        if let Some(old) = old {
            let _ = old.tx.try_send(Push::Close(CloseReason::Replaced));
        }
        Registration { conn_id, lagged, wake }
    }

    /// Removes a connection, unless a newer one of the same device replaced it.
    pub fn unregister(&self, device: DevicePk, conn_id: u64) {
        let mut conns = self.conns.write().unwrap_or_else(|e| e.into_inner());
        if conns.get(&device).is_some_and(|e| e.conn_id == conn_id) {
            conns.remove(&device);
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
        for event in committed {
            if let Some(entry) = conns.get(&event.device) {
                entry.push_event(event.row);
            }
        }
    }

    /// Sends an ephemeral frame to a device if it is connected (dropped when its buffer or
    /// its budget of unsent bytes is full).
    pub fn send_ephemeral(&self, device: DevicePk, frame: Bytes) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get(&device) {
            let bytes = frame.len();
            if entry.unsent.try_reserve(bytes) && entry.tx.try_send(Push::Frame(frame)).is_err() {
                entry.unsent.release(bytes);
            }
        }
    }

    /// Hands a group message to a device if it is connected; when its buffer is full it is
    /// marked lagged and woken, and reads its group streams from the database.
    pub fn push_group(&self, device: DevicePk, push: Arc<GroupPush>) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get(&device) {
            if entry.tx.try_send(Push::Group(push)).is_err() {
                entry.lagged.store(true, Ordering::Release);
                entry.wake.notify_one();
            }
        }
    }

    /// Closes a device's connection.
    pub fn close(&self, device: DevicePk, reason: CloseReason) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get(&device) {
            let _ = entry.tx.try_send(Push::Close(reason));
        }
    }
}

impl LiveEvents for Hub {
    fn committed(&self, events: Vec<Committed>) {
        self.deliver(events);
    }
}
