//! Live delivery: the registry of connected devices. After a commit, the writer's callback
//! hands each durable inbox event to the device's connection task, if it is connected. A
//! connection whose buffer is full is marked lagged and reads its inbox from the database
//! instead, so a slow device never blocks anyone and never misses anything.

use crate::storage::writer::Committed;
use crate::storage::{DevicePk, InboxRow};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, Notify};

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
    /// Close the connection.
    Close(CloseReason),
}

struct Entry {
    conn_id: u64,
    tx: mpsc::Sender<Push>,
    lagged: Arc<AtomicBool>,
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
}

impl Hub {
    /// Registers the connection of `device`, closing any older one.
    pub fn register(&self, device: DevicePk, tx: mpsc::Sender<Push>) -> Registration {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(AtomicBool::new(false));
        let entry = Entry { conn_id, tx, lagged: lagged.clone() };
        let old = self.conns.write().unwrap_or_else(|e| e.into_inner()).insert(device, entry);
        if let Some(old) = old {
            let _ = old.tx.try_send(Push::Close(CloseReason::Replaced));
        }
        Registration { conn_id, lagged }
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
                if entry.tx.try_send(Push::Event(Arc::new(event.row))).is_err() {
                    entry.lagged.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Sends an ephemeral frame to a device if it is connected (dropped when its buffer is full).
    pub fn send_ephemeral(&self, device: DevicePk, frame: Bytes) {
        let conns = self.conns.read().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = conns.get(&device) {
            let _ = entry.tx.try_send(Push::Frame(frame));
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
