//! Several workers of one homeserver (`[cluster] nats_url`): they share the PostgreSQL
//! database, and each hands the live traffic for devices connected to another worker over
//! NATS. The database stays the source of truth: an event is relayed only after its commit,
//! and a worker that missed relayed events (a NATS outage, a subscription still being set up)
//! has its connections read their inboxes again, which is what a lagged connection does
//! anyway (`hub::Mailbox`).
//!
//! Subjects: `<prefix>.dev.<device pk>`, one per device; a worker subscribes to those of the
//! devices connected to it, for as long as they are. What goes there (headers, then the body):
//! - `Parley-Kind: event`, `Parley-Seq`, and for messages `Parley-Sender` / `Parley-Msg-Id`:
//!   a durable inbox event, the body its JSON;
//! - `Parley-Kind: frame`: an ephemeral frame (typing, presence), the body the frame;
//! - `Parley-Kind: group`, `Parley-Group`, `Parley-Group-Seq`, `Parley-Wakes`: a group
//!   message (the body its frame, or empty when the device reads it from the database);
//! - `Parley-Kind: close`, `Parley-Reason: replaced | revoked`.
//!
//! What would wake a device by push (a message, a group message that wakes) is sent as a NATS
//! request: the worker holding the device's connection answers, and when none does NATS says
//! at once that nobody listens, and this worker sends the push.
//!
//! Inbox events for a device whose worker is known (its last answer named it, `Parley-Worker`)
//! go in batches instead: `<prefix>.worker.<worker id>`, one NATS request per worker for what
//! the relay task found queued (many events of many commits), the body [`encode_events`]'s.
//! That worker hands each event to its device's connection and answers with the positions of
//! those it had no connection for (its device moved or left); these, like every event of a
//! batch nobody answered, go the per-device way again (and so wake their devices by push).
//!
//! Presence: a worker holding a connection of a user listens on `<prefix>.online.<user pk>`
//! and answers requests there. A user comes online when a worker's first connection of them
//! finds no other worker answering, and goes offline when the last one closes and, once this
//! worker stopped listening, no other answers (of two workers losing a user's last
//! connections at once, the later to ask sees the other gone, so one of them announces it).

use crate::hub::{CloseReason, GroupPush, Hub};
use crate::storage::{DevicePk, InboxRow};
use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures_util::StreamExt as _;
use parley_spec::{GroupId, GroupSeq, Seq, ServerMsgId};
use std::collections::HashMap;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Items waiting for the relay task; past this many, new ones are dropped (their devices read
/// their inboxes when NATS is back: see [`Cluster::connect`]).
const RELAY_QUEUE: usize = 65_536;

/// Items the relay task takes from its queue at a time (their events for known workers go out
/// as one batch per worker).
const RELAY_ROUND: usize = 4_096;

/// Body bytes past which a batch for one worker is sent and another begun (NATS refuses
/// messages over its `max_payload`, 1 MiB by default).
const BATCH_BYTES: usize = 256 * 1024;

/// How long a worker that asked whether a device is connected somewhere waits for the answer
/// before it gives up (without a push: a worker that holds the connection is only slow).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection's opening or closing waits on NATS for presence (asking the other
/// workers, or making sure its own subscription stands or is gone): bounded, so a NATS outage
/// slows connections down by at most this, never stops them.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the cluster link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// NATS does not answer.
    #[error("NATS at {url}: {source}")]
    Connect {
        /// The configured URL.
        url: String,
        /// What failed.
        source: async_nats::ConnectError,
    },
}

/// What the relay task sends for the hub.
#[derive(Debug)]
enum Outgoing {
    /// A durable inbox event for one device.
    Event { device: DevicePk, row: InboxRow },
    /// An item for one device; `wake` asks first whether any worker holds its connection.
    Device { device: DevicePk, headers: HeaderMap, body: Bytes, wake: bool },
    /// News for every other worker, on `<prefix>.<topic>`.
    Broadcast { topic: &'static str, headers: HeaderMap, body: Bytes },
}

/// The task answering for a user, and how to stop it.
type Holder = (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>);

/// This worker's link to the others.
pub struct Cluster {
    client: async_nats::Client,
    prefix: String,
    /// Marks what this worker sends (`Parley-Worker`), so it ignores its own.
    worker: String,
    hub: Weak<Hub>,
    queue: mpsc::Sender<Outgoing>,
    /// The subscription task of every device connected here.
    watches: Mutex<HashMap<DevicePk, tokio::task::AbortHandle>>,
    /// The task answering for every user with a connection here.
    online: Mutex<HashMap<crate::storage::UserPk, Holder>>,
    /// The worker that last answered for a device (its events go there in batches).
    located: Mutex<HashMap<DevicePk, Arc<str>>>,
}

impl Cluster {
    /// Connects to NATS (`nats_url`, comma-separated servers) for `hub`, and starts the relay
    /// task. After every reconnection every connection here reads its inbox again: events
    /// relayed meanwhile may be lost, the database has them.
    pub async fn connect(nats_url: &str, prefix: String, hub: &Arc<Hub>) -> Result<Arc<Self>, ClusterError> {
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let on_event = reconnected.clone();
        let client = async_nats::ConnectOptions::new()
            .name("parleyd")
            .max_reconnects(None)
            .event_callback(move |event| {
                let on_event = on_event.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => on_event.notify_one(),
                        async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            .connect(nats_url.split(',').map(str::trim).collect::<Vec<_>>().as_slice())
            .await
            .map_err(|source| ClusterError::Connect { url: nats_url.to_owned(), source })?;
        let (queue, items) = mpsc::channel(RELAY_QUEUE);
        let cluster = Arc::new(Self {
            client,
            prefix,
            worker: format!("{:016x}", rand::random::<u64>()),
            hub: Arc::downgrade(hub),
            queue,
            watches: Mutex::new(HashMap::new()),
            online: Mutex::new(HashMap::new()),
            located: Mutex::new(HashMap::new()),
        });
        tokio::spawn(cluster.clone().relay(items));
        tokio::spawn(cluster.clone().take_batches());
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(async move {
            loop {
                reconnected.notified().await;
                let Some(cluster) = weak.upgrade() else { return };
                tracing::info!("NATS connected; connections read their inboxes");
                if let Some(hub) = cluster.hub.upgrade() {
                    hub.mark_all_lagged();
                }
            }
        });
        tracing::info!(url = nats_url, prefix = %cluster.prefix, "cluster: connected to NATS");
        Ok(cluster)
    }

    fn subject(&self, device: DevicePk) -> String {
        format!("{}.dev.{device}", self.prefix)
    }

    /// Listens for `device`'s traffic from the other workers while it is connected here. Once
    /// the subscription stands, the connection reads its inbox again: what was relayed before
    /// did not reach it.
    pub fn watch(self: &Arc<Self>, device: DevicePk) {
        let cluster = self.clone();
        let task = tokio::spawn(async move {
            let mut subscription = match cluster.client.subscribe(cluster.subject(device)).await {
                Ok(subscription) => subscription,
                Err(error) => {
                    tracing::warn!(%error, device, "cluster: subscribing failed");
                    return;
                }
            };
            if cluster.client.flush().await.is_ok() {
                if let Some(hub) = cluster.hub.upgrade() {
                    hub.mark_lagged(device);
                }
            }
            while let Some(message) = subscription.next().await {
                cluster.received(device, message).await;
            }
        });
        let old = self.watches.lock().unwrap_or_else(|e| e.into_inner()).insert(device, task.abort_handle());
        if let Some(old) = old {
            old.abort();
        }
    }

    /// Stops listening for `device` (its connection here is gone).
    pub fn unwatch(&self, device: DevicePk) {
        if let Some(task) = self.watches.lock().unwrap_or_else(|e| e.into_inner()).remove(&device) {
            task.abort();
        }
    }

    /// Whether another worker holds a connection of `user`.
    pub async fn online_elsewhere(&self, user: crate::storage::UserPk) -> bool {
        let mut headers = HeaderMap::new();
        headers.insert("Parley-Worker", self.worker.as_str());
        let request = async_nats::Request::new().headers(headers).timeout(Some(PRESENCE_TIMEOUT));
        match self.client.send_request(format!("{}.online.{user}", self.prefix), request).await {
            Ok(_) => true,
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => false,
            // Unknown (NATS is down, or a worker is too slow to answer): say online, so no
            // one is announced offline who may not be; the next change corrects it.
            Err(error) => {
                tracing::debug!(%error, user, "cluster: no answer about a user");
                true
            }
        }
    }

    /// Answers for `user` while a connection of theirs is here (the subscription stands when
    /// this returns).
    pub async fn hold_user(self: &Arc<Self>, user: crate::storage::UserPk) {
        let mut subscription = match self.client.subscribe(format!("{}.online.{user}", self.prefix)).await {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(%error, user, "cluster: subscribing failed");
                return;
            }
        };
        let _ = tokio::time::timeout(PRESENCE_TIMEOUT, self.client.flush()).await;
        let cluster = self.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    message = subscription.next() => {
                        let Some(message) = message else { return };
                        let own = message.headers.as_ref().and_then(|h| h.get("Parley-Worker")).map(|w| w.as_str().to_owned());
                        if let (Some(reply), false) = (message.reply, own.as_deref() == Some(cluster.worker.as_str())) {
                            let _ = cluster.client.publish(reply, Bytes::new()).await;
                        }
                    }
                    _ = &mut stopped => {
                        let _ = subscription.unsubscribe().await;
                        return;
                    }
                }
            }
        });
        let old = self.online.lock().unwrap_or_else(|e| e.into_inner()).insert(user, (stop, task));
        if let Some((_, old)) = old {
            old.abort();
        }
    }

    /// Stops answering for `user` (no connection of theirs is left here); once this returns
    /// NATS has dropped the subscription.
    pub async fn release_user(&self, user: crate::storage::UserPk) {
        let held = self.online.lock().unwrap_or_else(|e| e.into_inner()).remove(&user);
        if let Some((stop, task)) = held {
            let _ = stop.send(());
            let _ = task.await;
        }
        // The server handles commands in order: after the flush's answer, the UNSUB is done.
        let _ = tokio::time::timeout(PRESENCE_TIMEOUT, self.client.flush()).await;
    }

    /// A committed inbox event for a device not connected here.
    pub fn event(&self, device: DevicePk, row: &InboxRow) {
        self.enqueue(Outgoing::Event { device, row: row.clone() });
    }

    /// The per-device form of an inbox event (a request when it may wake the device).
    fn device_event(&self, device: DevicePk, row: &InboxRow) -> Outgoing {
        let mut headers = HeaderMap::new();
        headers.insert("Parley-Kind", "event");
        headers.insert("Parley-Seq", row.seq.get().to_string());
        if let Some((sender, id)) = &row.origin {
            headers.insert("Parley-Sender", sender.as_ref());
            headers.insert("Parley-Msg-Id", id.get().to_string());
        }
        headers.insert("Parley-Worker", self.worker.as_str());
        Outgoing::Device { device, headers, body: row.payload.clone(), wake: row.origin.is_some() }
    }

    /// An ephemeral frame for a device not connected here.
    pub fn frame(&self, device: DevicePk, frame: Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert("Parley-Kind", "frame");
        self.enqueue(Outgoing::Device { device, headers, body: frame, wake: false });
    }

    /// A group message for a member device not connected here.
    pub fn group(&self, device: DevicePk, push: &GroupPush) {
        let mut headers = HeaderMap::new();
        headers.insert("Parley-Kind", "group");
        headers.insert("Parley-Group", push.group_id.as_str());
        headers.insert("Parley-Group-Seq", push.seq.get().to_string());
        headers.insert("Parley-Wakes", if push.wakes { "1" } else { "0" });
        let body = push.frame.clone().unwrap_or_default();
        if push.frame.is_none() {
            headers.insert("Parley-Frame", "none");
        }
        self.enqueue(Outgoing::Device { device, headers, body, wake: push.wakes });
    }

    /// Closes `device`'s connection wherever it is.
    pub fn close(&self, device: DevicePk, reason: CloseReason) {
        let mut headers = HeaderMap::new();
        headers.insert("Parley-Kind", "close");
        headers.insert(
            "Parley-Reason",
            match reason {
                CloseReason::Replaced => "replaced",
                CloseReason::Revoked => "revoked",
            },
        );
        self.enqueue(Outgoing::Device { device, headers, body: Bytes::new(), wake: false });
    }

    /// Tells the other workers that a commit here grew these federation queues (the holder of
    /// a destination's lease sends them).
    pub fn fed_wake(&self, destinations: &[parley_spec::ServerName]) {
        let body: Vec<&str> = destinations.iter().map(|d| d.as_str()).collect();
        self.enqueue(Outgoing::Broadcast { topic: "fed", headers: HeaderMap::new(), body: Bytes::from(body.join("\n")) });
    }

    /// Calls `wake` for every destination another worker's commit grew.
    pub fn on_fed_wake(self: &Arc<Self>, wake: impl Fn(parley_spec::ServerName) + Send + Sync + 'static) {
        self.on_broadcast("fed", move |body| {
            for name in String::from_utf8_lossy(body).lines() {
                if let Ok(destination) = parley_spec::ServerName::parse(name) {
                    wake(destination);
                }
            }
        });
    }

    /// Tells the other workers that `device`'s push registration changed here (each keeps
    /// the registrations in memory, read at start).
    pub fn pusher_changed(&self, device: DevicePk) {
        self.enqueue(Outgoing::Broadcast {
            topic: "pusher",
            headers: HeaderMap::new(),
            body: Bytes::copy_from_slice(&device.to_be_bytes()),
        });
    }

    /// Calls `reload` for every device whose push registration another worker changed.
    pub fn on_pusher_changed(self: &Arc<Self>, reload: impl Fn(DevicePk) + Send + Sync + 'static) {
        self.on_broadcast("pusher", move |body| {
            if let Ok(device) = body.try_into() {
                reload(DevicePk::from_be_bytes(device));
            }
        });
    }

    /// Calls `handle` with the body of every message another worker publishes on
    /// `<prefix>.<topic>`.
    fn on_broadcast(self: &Arc<Self>, topic: &'static str, handle: impl Fn(&[u8]) + Send + Sync + 'static) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut subscription = match cluster.client.subscribe(format!("{}.{topic}", cluster.prefix)).await {
                Ok(subscription) => subscription,
                Err(error) => {
                    tracing::warn!(%error, topic, "cluster: subscribing failed");
                    return;
                }
            };
            while let Some(message) = subscription.next().await {
                let own = message.headers.as_ref().and_then(|h| h.get("Parley-Worker")).map(|w| w.as_str().to_owned());
                if own.as_deref() != Some(cluster.worker.as_str()) {
                    handle(&message.payload);
                }
            }
        });
    }

    fn enqueue(&self, mut item: Outgoing) {
        if let Outgoing::Device { headers, .. } | Outgoing::Broadcast { headers, .. } = &mut item {
            headers.insert("Parley-Worker", self.worker.as_str());
        }
        if self.queue.try_send(item).is_err() {
            tracing::warn!("cluster: relay queue full; the devices concerned will read their inboxes");
        }
    }

    /// Sends queued items in order, taking what is queued in rounds: the round's inbox events
    /// for devices whose worker is known go out as one batch per worker, after the round's
    /// other items. A request (a batch, or what may wake a device by push) is answered on a
    /// task of its own, so the queue never waits for a round trip.
    async fn relay(self: Arc<Self>, mut items: mpsc::Receiver<Outgoing>) {
        let mut round = Vec::with_capacity(RELAY_ROUND);
        while items.recv_many(&mut round, RELAY_ROUND).await > 0 {
            let mut batches: HashMap<Arc<str>, Vec<(DevicePk, InboxRow)>> = HashMap::new();
            for item in round.drain(..) {
                let item = match item {
                    Outgoing::Event { device, row } => {
                        let worker = self.located.lock().unwrap_or_else(|e| e.into_inner()).get(&device).cloned();
                        if let Some(worker) = worker {
                            batches.entry(worker).or_default().push((device, row));
                            continue;
                        }
                        self.device_event(device, &row)
                    }
                    other => other,
                };
                self.send(item).await;
            }
            for (worker, mut events) in batches {
                while !events.is_empty() {
                    let (body, taken) = encode_events(&events, BATCH_BYTES);
                    let rest = events.split_off(taken);
                    tokio::spawn(self.clone().send_batch(worker.clone(), events, body));
                    events = rest;
                }
            }
        }
    }

    /// Sends one item on its own (`relay` turns inbox events into their per-device form first).
    async fn send(self: &Arc<Self>, item: Outgoing) {
        let (device, headers, body, wake) = match item {
            Outgoing::Device { device, headers, body, wake } => (device, headers, body, wake),
            Outgoing::Event { .. } => return,
            Outgoing::Broadcast { topic, headers, body } => {
                if let Err(error) = self.client.publish_with_headers(format!("{}.{topic}", self.prefix), headers, body).await {
                    tracing::debug!(%error, "cluster: publish failed");
                }
                return;
            }
        };
        let subject = self.subject(device);
        if !wake {
            if let Err(error) = self.client.publish_with_headers(subject, headers, body).await {
                tracing::debug!(%error, device, "cluster: publish failed");
            }
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let request = async_nats::Request::new().headers(headers).payload(body).timeout(Some(REQUEST_TIMEOUT));
            match cluster.client.send_request(subject, request).await {
                Ok(answer) => {
                    // That worker holds the connection: the device's next events go there in batches.
                    let worker = answer.headers.as_ref().and_then(|h| h.get("Parley-Worker")).map(|w| Arc::from(w.as_str()));
                    if let Some(worker) = worker {
                        cluster.located.lock().unwrap_or_else(|e| e.into_inner()).insert(device, worker);
                    }
                }
                Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                    if let Some(hub) = cluster.hub.upgrade() {
                        hub.wake(device);
                    }
                }
                Err(error) => tracing::debug!(%error, device, "cluster: no answer about a device"),
            }
        });
    }

    /// Sends a batch of events to `worker`; those it did not take (or all, when it does not
    /// answer) are forgotten there and go the per-device way.
    async fn send_batch(self: Arc<Self>, worker: Arc<str>, events: Vec<(DevicePk, InboxRow)>, body: Bytes) {
        let request = async_nats::Request::new().payload(body).timeout(Some(REQUEST_TIMEOUT));
        let missed: Vec<usize> = match self.client.send_request(format!("{}.worker.{worker}", self.prefix), request).await {
            Ok(answer) => decode_positions(&answer.payload).into_iter().filter(|i| *i < events.len()).collect(),
            Err(error) => {
                tracing::debug!(%error, %worker, events = events.len(), "cluster: a worker did not take a batch");
                (0..events.len()).collect()
            }
        };
        if missed.is_empty() {
            return;
        }
        {
            let mut located = self.located.lock().unwrap_or_else(|e| e.into_inner());
            for i in &missed {
                let device = events[*i].0;
                if located.get(&device).is_some_and(|w| *w == worker) {
                    located.remove(&device);
                }
            }
        }
        for i in missed {
            let (device, row) = &events[i];
            self.enqueue(self.device_event(*device, row));
        }
    }

    /// Answers the batches other workers send here: each event goes to its device's
    /// connection; the answer lists the positions of those whose device has none here.
    async fn take_batches(self: Arc<Self>) {
        let mut subscription = match self.client.subscribe(format!("{}.worker.{}", self.prefix, self.worker)).await {
            Ok(subscription) => subscription,
            Err(error) => {
                tracing::warn!(%error, "cluster: subscribing to batches failed");
                return;
            }
        };
        while let Some(message) = subscription.next().await {
            let Some(hub) = self.hub.upgrade() else { return };
            let Some(events) = decode_events(&message.payload) else {
                tracing::warn!("cluster: a batch that does not decode was dropped");
                continue;
            };
            let missed: Vec<usize> = events
                .into_iter()
                .enumerate()
                .filter_map(|(i, (device, row))| (!hub.local_event(device, row)).then_some(i))
                .collect();
            if let Some(reply) = message.reply {
                let _ = self.client.publish(reply, encode_positions(&missed)).await;
            }
        }
    }

    /// Hands what another worker relayed for `device` to its connection here; a request is
    /// answered when the connection took it (that worker then sends no push).
    async fn received(&self, device: DevicePk, message: Message) {
        let Some(hub) = self.hub.upgrade() else { return };
        let Some(headers) = &message.headers else { return };
        let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        if header("Parley-Worker").as_deref() == Some(self.worker.as_str()) {
            return;
        }
        let number = |name: &str| header(name).and_then(|v| u64::from_str(&v).ok());
        let taken = match header("Parley-Kind").as_deref() {
            Some("event") => {
                let Some(seq) = number("Parley-Seq") else { return };
                let origin = header("Parley-Sender")
                    .zip(number("Parley-Msg-Id"))
                    .map(|(sender, id)| (Arc::from(sender), ServerMsgId::new(id)));
                let row = InboxRow { seq: Seq::new(seq), origin, payload: message.payload.clone(), committed_at: None };
                hub.local_event(device, row)
            }
            Some("frame") => hub.local_frame(device, message.payload.clone()),
            Some("group") => {
                let (Some(group), Some(seq)) = (header("Parley-Group"), number("Parley-Group-Seq")) else { return };
                let Ok(group_id) = GroupId::parse(&group) else { return };
                let frame = (header("Parley-Frame").as_deref() != Some("none")).then(|| message.payload.clone());
                let wakes = header("Parley-Wakes").as_deref() == Some("1");
                hub.local_group(device, Arc::new(GroupPush { group_id, seq: GroupSeq::new(seq), frame, wakes }))
            }
            Some("close") => {
                let reason = match header("Parley-Reason").as_deref() {
                    Some("replaced") => CloseReason::Replaced,
                    _ => CloseReason::Revoked,
                };
                hub.local_close(device, reason)
            }
            _ => false,
        };
        if let (true, Some(reply)) = (taken, message.reply) {
            let mut headers = HeaderMap::new();
            headers.insert("Parley-Worker", self.worker.as_str());
            let _ = self.client.publish_with_headers(reply, headers, Bytes::new()).await;
        }
    }
}

/// Encodes events for a batch, from the first, until the body would pass `limit` bytes (at
/// least one event); the body and how many it holds. Per event, big-endian: device pk (8),
/// seq (8), 1 and the message id (8) and sender's length (2) and bytes for a message or 0
/// for another event, the payload's length (4) and bytes.
fn encode_events(events: &[(DevicePk, InboxRow)], limit: usize) -> (Bytes, usize) {
    let mut body = Vec::new();
    let mut taken = 0;
    for (device, row) in events {
        let size = 8 + 8 + 1 + row.origin.as_ref().map_or(0, |(sender, _)| 8 + 2 + sender.len()) + 4 + row.payload.len();
        if taken > 0 && body.len() + size > limit {
            break;
        }
        body.extend_from_slice(&device.to_be_bytes());
        body.extend_from_slice(&row.seq.get().to_be_bytes());
        match &row.origin {
            // Sender ids are user ids, far below 64 KiB; a longer one is cut (never seen).
            Some((sender, id)) => {
                let sender = &sender.as_bytes()[..sender.len().min(usize::from(u16::MAX))];
                body.push(1);
                body.extend_from_slice(&id.get().to_be_bytes());
                body.extend_from_slice(&(sender.len() as u16).to_be_bytes());
                body.extend_from_slice(sender);
            }
            None => body.push(0),
        }
        body.extend_from_slice(&u32::try_from(row.payload.len()).unwrap_or(u32::MAX).to_be_bytes());
        body.extend_from_slice(&row.payload[..row.payload.len().min(u32::MAX as usize)]);
        taken += 1;
    }
    (Bytes::from(body), taken)
}

/// Decodes [`encode_events`]' body; `None` if it is cut short or malformed.
fn decode_events(body: &Bytes) -> Option<Vec<(DevicePk, InboxRow)>> {
    let mut events = Vec::new();
    let mut at = 0usize;
    let take = |at: &mut usize, n: usize| -> Option<std::ops::Range<usize>> {
        let range = *at..at.checked_add(n).filter(|end| *end <= body.len())?;
        *at = range.end;
        Some(range)
    };
    let u64_at = |at: &mut usize| -> Option<u64> { Some(u64::from_be_bytes(body[take(at, 8)?].try_into().ok()?)) };
    while at < body.len() {
        let device = DevicePk::from_be_bytes(body[take(&mut at, 8)?].try_into().ok()?);
        let seq = Seq::new(u64_at(&mut at)?);
        let origin = match body[take(&mut at, 1)?][0] {
            0 => None,
            1 => {
                let id = ServerMsgId::new(u64_at(&mut at)?);
                let len = u16::from_be_bytes(body[take(&mut at, 2)?].try_into().ok()?);
                let sender = std::str::from_utf8(&body[take(&mut at, usize::from(len))?]).ok()?;
                Some((Arc::from(sender), id))
            }
            _ => return None,
        };
        let len = u32::from_be_bytes(body[take(&mut at, 4)?].try_into().ok()?);
        let payload = body.slice(take(&mut at, usize::try_from(len).ok()?)?);
        events.push((device, InboxRow { seq, origin, payload, committed_at: None }));
    }
    Some(events)
}

/// A batch's answer: positions, each four bytes big-endian.
fn encode_positions(positions: &[usize]) -> Bytes {
    positions.iter().flat_map(|i| u32::try_from(*i).unwrap_or(u32::MAX).to_be_bytes()).collect::<Vec<u8>>().into()
}

/// Decodes [`encode_positions`]' body (a cut-off tail is ignored).
fn decode_positions(body: &[u8]) -> Vec<usize> {
    body.chunks_exact(4).filter_map(|b| usize::try_from(u32::from_be_bytes(b.try_into().ok()?)).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, origin: Option<(&str, u64)>, payload: &'static [u8]) -> InboxRow {
        InboxRow {
            seq: Seq::new(seq),
            origin: origin.map(|(sender, id)| (Arc::from(sender), ServerMsgId::new(id))),
            payload: Bytes::from_static(payload),
            committed_at: None,
        }
    }

    fn same(a: &[(DevicePk, InboxRow)], b: &[(DevicePk, InboxRow)]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((da, ra), (db, rb))| da == db && ra.seq == rb.seq && ra.origin == rb.origin && ra.payload == rb.payload)
    }

    #[test]
    fn a_batch_decodes_to_the_events_it_was_made_of() {
        let events = vec![
            (7, row(1, Some(("@alice:a.test", 42)), b"{\"type\":\"message\"}")),
            (-3, row(u64::MAX, None, b"")),
            (8, row(2, Some(("", 0)), b"x")),
        ];
        let (body, taken) = encode_events(&events, usize::MAX);
        assert_eq!(taken, 3);
        assert!(same(&decode_events(&body).expect("decodes"), &events));
        assert!(same(&decode_events(&Bytes::new()).expect("an empty batch"), &[]));
    }

    #[test]
    fn a_batch_stops_at_its_byte_limit_but_holds_at_least_one_event() {
        let events: Vec<_> = (0..10).map(|i| (i, row(i as u64, None, b"0123456789"))).collect();
        let one = 8 + 8 + 1 + 4 + 10;
        let (body, taken) = encode_events(&events, 3 * one + 5);
        assert_eq!((taken, body.len()), (3, 3 * one));
        assert!(same(&decode_events(&body).expect("decodes"), &events[..3]));
        let (_, taken) = encode_events(&events, 1);
        assert_eq!(taken, 1, "an event bigger than the limit goes alone");
    }

    #[test]
    fn a_cut_or_malformed_batch_is_refused() {
        let events = vec![(7, row(1, Some(("@alice:a.test", 42)), b"payload"))];
        let (body, _) = encode_events(&events, usize::MAX);
        for end in 1..body.len() {
            assert!(decode_events(&body.slice(..end)).is_none(), "cut at {end}");
        }
        let mut bad = body.to_vec();
        bad[16] = 2;
        assert!(decode_events(&Bytes::from(bad)).is_none(), "an unknown origin flag");
        assert_eq!(decode_positions(&encode_positions(&[0, 5, 70_000])), [0, 5, 70_000]);
    }
}
