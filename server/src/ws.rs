//! The device WebSocket (`GET /v1/ws`): one task per connection that sends the backlog after
//! the client's cursor, then live events, answers frames, and tracks heartbeats.
//!
//! Delivery is at-least-once on the wire and in order: every event is sent from the
//! database or from the hub strictly in sequence order; a gap (a lagged buffer, or a burst
//! beyond the unacknowledged window) falls back to reading the inbox. The SDK removes the
//! duplicates a reconnect can cause. What to send next is decided by the connection's
//! `DeliveryWindow` (`ws/window.rs`, no I/O); this file does the reading, the byte budgets
//! and the writing.

mod acks;
mod groups;
mod window;

use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::Error;
use crate::hub::{event_bytes, CloseReason, Push, Registration};
use crate::messaging;
use crate::outgoing::{OverBudget, Unsent};
use crate::presence;
use crate::storage::{InboxRow, MessageOutcome, Origin, StoreError};
use acks::AckBatch;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{FuturesOrdered, SplitSink, SplitStream};
use futures_util::{FutureExt as _, SinkExt as _, StreamExt as _};
use parley_spec::v1::events::ReceiptKind;
use parley_spec::v1::ws::{
    CaughtUpFrame, ClientFrame, ErrorFrame, FrameId, HelloFrame, KeyPackagesLowFrame, PingFrame, PrekeysLowFrame, RawEventFrame,
    ServerFrame, WsQuery,
};
use parley_spec::{ErrorCode, Seq, Timestamp};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use uuid::Uuid;
use window::DeliveryWindow;

/// Close codes.
mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// GET /v1/ws
pub async fn upgrade(
    State(state): State<AppState>,
    auth: AuthDevice,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return Error::new(ErrorCode::BadRequest, e.body_text()).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return Error::new(ErrorCode::BadRequest, e.body_text()).into_response(),
    };
    let limits = &state.config.limits;
    let max = limits.max_send_bytes();
    ws.read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_write_buffer_size(max.max(limits.ws_write_buffer_bytes * 2) * 2)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| connection(state, auth, query.since, socket))
}

enum Stop {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The socket is gone; nothing to send.
    Gone,
    /// The socket writer stopped: the peer stopped reading (or the socket failed).
    WriterStopped(WriteEnd),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "storage error on a connection");
        Stop::Close(close::GOING_AWAY, "unavailable")
    }
}

impl From<Error> for Stop {
    fn from(error: Error) -> Self {
        match &error {
            Error::Internal(_) => tracing::error!(%error, "internal error on a connection"),
            _ => tracing::warn!(%error, "error on a connection"),
        }
        Stop::Close(close::GOING_AWAY, "unavailable")
    }
}

impl From<OverBudget> for Stop {
    fn from(_: OverBudget) -> Self {
        Stop::Close(close::POLICY, "too much unsent data")
    }
}

type SendResult = (Uuid, Instant, Result<Result<MessageOutcome, StoreError>, oneshot::error::RecvError>);
type SendFuture = std::pin::Pin<Box<dyn std::future::Future<Output = SendResult> + Send>>;

async fn await_sent(
    client_msg_id: Uuid,
    started: Instant,
    rx: oneshot::Receiver<Result<MessageOutcome, StoreError>>,
) -> SendResult {
    (client_msg_id, started, rx.await)
}

/// Why writing to the socket stopped.
#[derive(Debug, Clone, Copy)]
enum WriteEnd {
    /// A write made no progress within `ws_write_timeout_ms`.
    Stalled,
    /// The socket failed.
    Failed,
}

/// Most bytes fed to the socket before a flush.
const WRITE_BATCH: usize = 64 * 1024;

type Sink = SplitSink<WebSocket, Message>;
type WriteFuture = std::pin::Pin<Box<dyn std::future::Future<Output = (Sink, Result<(), WriteEnd>)> + Send>>;

/// Feeds `batch` to the socket and flushes it, each write bounded by `timeout`; gives the sink
/// back.
async fn write_batch(mut sink: Sink, batch: Vec<Message>, timeout: Duration) -> (Sink, Result<(), WriteEnd>) {
    async fn bounded(
        timeout: Duration,
        write: impl std::future::Future<Output = Result<(), axum::Error>>,
    ) -> Result<(), WriteEnd> {
        match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(WriteEnd::Failed),
            Err(_) => Err(WriteEnd::Stalled),
        }
    }
    for message in batch {
        if let Err(end) = bounded(timeout, sink.feed(message)).await {
            return (sink, Err(end));
        }
    }
    let flushed = bounded(timeout, sink.flush()).await;
    (sink, flushed)
}

/// The sending half of the socket: frames queued by the connection (their bytes reserved in
/// [`Unsent`]) and at most one write in flight, a future the connection polls next to
/// everything else. The connection never awaits a write, so a peer that stops reading cannot
/// stop it from reading frames, timing out or being replaced; a write that makes no progress
/// within the deadline ends the connection.
struct Out {
    /// The sink, while no write is in flight.
    sink: Option<Sink>,
    queue: VecDeque<(Message, usize)>,
    writing: Option<WriteFuture>,
    /// Reserved bytes of the write in flight.
    writing_bytes: usize,
    timeout: Duration,
}

impl Out {
    fn new(sink: Sink, timeout: Duration) -> Self {
        Self { sink: Some(sink), queue: VecDeque::new(), writing: None, writing_bytes: 0, timeout }
    }

    /// Starts writing what is queued (up to a batch) if no write is in flight.
    fn start(&mut self) {
        if self.writing.is_some() || self.queue.is_empty() {
            return;
        }
        let Some(sink) = self.sink.take() else { return };
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((message, reserved)) = self.queue.pop_front() {
            let closing = matches!(message, Message::Close(_));
            batch.push(message);
            bytes += reserved;
            if closing || bytes >= WRITE_BATCH {
                break;
            }
        }
        if self.queue.is_empty() && self.queue.capacity() > 64 {
            self.queue = VecDeque::new();
        }
        self.writing_bytes = bytes;
        self.writing = Some(Box::pin(write_batch(sink, batch, self.timeout)));
    }

    /// The write in flight finished: the sink is back; answers the reserved bytes to release.
    fn finished(&mut self, (sink, result): (Sink, Result<(), WriteEnd>)) -> Result<usize, WriteEnd> {
        self.writing = None;
        result?;
        self.sink = Some(sink);
        Ok(std::mem::take(&mut self.writing_bytes))
    }

    /// Writes everything queued (the close frame last), within one write deadline in all.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let _ = tokio::time::timeout_at(deadline, async {
            loop {
                self.start();
                let Some(writing) = self.writing.as_mut() else { return };
                let done = writing.await;
                if self.finished(done).is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

/// Completes with the write in flight; never, when there is none.
async fn write_done(writing: &mut Option<WriteFuture>) -> (Sink, Result<(), WriteEnd>) {
    match writing {
        Some(write) => write.await,
        None => std::future::pending().await,
    }
}

struct Conn {
    state: AppState,
    auth: AuthDevice,
    /// The sending half of the socket.
    out: Out,
    /// Bytes queued for this connection and not yet flushed.
    unsent: Arc<Unsent>,
    /// What to send next; for each event sent and not acknowledged, for messages, (sender,
    /// id) for the delivered receipt.
    window: DeliveryWindow<Option<Origin>>,
    /// Acknowledgements on their way to the writer.
    acks: AckBatch<Origin>,
    /// The device's group streams.
    groups: groups::GroupStreams,
    last_activity: Instant,
}

async fn connection(state: AppState, auth: AuthDevice, since: Seq, socket: WebSocket) {
    let limits = &state.config.limits;
    let unsent = Arc::new(Unsent::new(limits, state.outgoing.clone()));
    let (sink, mut stream) = socket.split();
    let out = Out::new(sink, Duration::from_millis(limits.ws_write_timeout_ms));
    let registration = state.hub.register(auth.device_pk, limits.connection_buffer, unsent.clone());
    state.metrics.connections.inc();
    // The lookups below (and presence's at the end) are boxed: awaited inline, their futures
    // would be part of the connection's task for its whole life, idle or not.
    let user_entry = Box::pin(state.directory.local(auth.user_id.localpart())).await.ok().flatten();
    if Box::pin(presence::connected(&state, auth.user_pk)).await {
        if let Some(entry) = &user_entry {
            presence::announce(&state, entry.clone(), true, None);
        }
    }
    tracing::debug!(user = %auth.user_id, device = %auth.device_id, since = since.get(), "connected");
    let mut conn = Conn {
        state: state.clone(),
        auth: auth.clone(),
        out,
        unsent,
        window: DeliveryWindow::new(since, limits.max_unacked_events),
        acks: AckBatch::new(Duration::from_millis(limits.ack_interval_ms)),
        groups: groups::GroupStreams::new(),
        last_activity: Instant::now(),
    };
    // Boxed, as every path taken once or rarely (the backlog, closing): an idle connection's
    // task then holds only the loop's state.
    let stop = Box::pin(conn.run(&mut stream, &registration)).await;
    // What was acknowledged here, written whatever ended the connection.
    conn.write_acks();
    let reason = match stop {
        Stop::Close(code, reason) => {
            // The close frame goes after what is queued, within the write deadline; a peer
            // that does not read it is dropped.
            let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
            conn.out.queue.push_back((Message::Close(Some(frame)), 0));
            Box::pin(conn.out.drain()).await;
            reason
        }
        Stop::Gone => "gone",
        Stop::WriterStopped(WriteEnd::Stalled) => "writes stalled",
        Stop::WriterStopped(WriteEnd::Failed) => "gone",
    };
    drop(conn);
    drop(stream);
    state.hub.unregister(auth.device_pk, registration.conn_id);
    state.metrics.connections.dec();
    let ts = Timestamp::now();
    if let Err(error) = Box::pin(state.store.record_last_seen(auth.user_pk, auth.device_pk, ts)).await {
        tracing::warn!(%error, "last-seen not recorded");
    }
    if Box::pin(presence::disconnected(&state, auth.user_pk)).await {
        if let Some(entry) = user_entry {
            presence::announce(&state, entry, false, Some(ts));
        }
    }
    match reason {
        "gone" | "server shutting down" => {
            tracing::debug!(user = %auth.user_id, device = %auth.device_id, reason, "disconnected")
        }
        _ => tracing::info!(user = %auth.user_id, device = %auth.device_id, reason, "closed the connection"),
    }
}

impl Conn {
    async fn run(&mut self, stream: &mut SplitStream<WebSocket>, registration: &Registration) -> Stop {
        if let Err(stop) = Box::pin(self.start()).await {
            return stop;
        }
        let presence_config = &self.state.config.presence;
        let timeout = Duration::from_millis(presence_config.heartbeat_timeout_ms);
        let period =
            Duration::from_millis(presence_config.heartbeat_interval_ms.min(presence_config.heartbeat_timeout_ms / 3).max(10));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.state.shutdown.clone();
        let mut room = self.state.outgoing.room();
        let mut sends: FuturesOrdered<SendFuture> = FuturesOrdered::new();
        // Waited on across turns of the loop rather than made anew in each (each new one would
        // join and leave its `Notify`'s waiters, under a lock, on every frame).
        let mut shutting_down = std::pin::pin!(shutdown.changed());
        let mut woken = std::pin::pin!(registration.mailbox.woken());
        // Armed while acknowledgements are gathered (see `acks`).
        let mut acks_due = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut acks_armed = None;
        loop {
            let due = self.acks.due();
            if due != acks_armed {
                if let Some(at) = due {
                    acks_due.as_mut().reset(at);
                }
                acks_armed = due;
            }
            let step = tokio::select! {
                biased;
                _ = &mut shutting_down => Err(Stop::Close(close::GOING_AWAY, "server shutting down")),
                done = write_done(&mut self.out.writing) => match self.out.finished(done) {
                    Ok(bytes) => {
                        self.unsent.release(bytes);
                        Ok(())
                    }
                    Err(end) => Err(Stop::WriterStopped(end)),
                },
                Some(done) = sends.next(), if !sends.is_empty() => self.answer_send(done),
                // Pushes queued (taken below, with whatever else is ready), or live events
                // left in the inbox.
                () = &mut woken => {
                    woken.set(registration.mailbox.woken());
                    Ok(())
                }
                frame = stream.next() => match frame {
                    Some(Ok(message)) => Box::pin(self.on_message(message, &mut sends)).await,
                    Some(Err(error)) => Err(classify(error)),
                    None => Err(Stop::Gone),
                },
                // The writer made room for live events left in the inbox.
                _ = room.changed(), if self.window.is_behind() => Ok(()),
                () = &mut acks_due, if acks_armed.is_some() => {
                    self.write_acks();
                    Ok(())
                }
                _ = heartbeat.tick() => {
                    if self.last_activity.elapsed() > timeout {
                        Err(Stop::Close(close::POLICY, "heartbeat timeout"))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(stop) = step.and_then(|()| self.take_ready(&mut sends, registration)) {
                return stop;
            }
            if registration.mailbox.take_lagged() {
                self.window.lagged();
                self.groups.lagged();
            }
            if self.groups.wants_read() {
                if let Err(stop) = Box::pin(self.group_catch_up()).await {
                    return stop;
                }
            }
            if self.window.wants_catch_up() {
                if let Err(stop) = Box::pin(self.catch_up()).await {
                    return stop;
                }
            }
            if let Err(stop) = self.announce_caught_up() {
                return stop;
            }
            self.out.start();
        }
    }

    async fn start(&mut self) -> Result<(), Stop> {
        let presence_config = &self.state.config.presence;
        let hello = ServerFrame::Hello(HelloFrame::new(
            self.auth.user_id.clone(),
            self.auth.device_id.clone(),
            presence_config.heartbeat_interval_ms,
            presence_config.heartbeat_timeout_ms,
        ));
        self.send_frame(&hello)?;
        // `since` acknowledges everything up to it.
        let acked = self.state.store.acked_seq(self.auth.device_pk).await?;
        let since = self.window.cursor();
        if since > acked {
            messaging::ack_from_store(&self.state, &self.auth, acked, since).await?;
            // A `since` beyond the end of the inbox was clamped when recorded: resume from
            // there, or this connection would skip the next events.
            self.window.resume_at_most(self.state.store.acked_seq(self.auth.device_pk).await?);
        }
        for info in crate::api::presence::contacts_presence(&self.state, &self.auth.user_id).await? {
            self.send_frame(&ServerFrame::Presence(info))?;
        }
        let (has_keys, prekeys) = self.state.store.prekey_count(self.auth.device_pk).await?;
        if has_keys && prekeys < self.state.config.limits.prekey_low_watermark {
            self.send_frame(&ServerFrame::PrekeysLow(PrekeysLowFrame::new(prekeys)))?;
        }
        let keypackages = self.state.store.keypackage_count(self.auth.device_pk).await?;
        if keypackages.any() && keypackages.one_time < self.state.config.limits.keypackages_low_watermark {
            self.send_frame(&ServerFrame::KeyPackagesLow(KeyPackagesLowFrame::new(keypackages.one_time)))?;
        }
        self.catch_up().await?;
        self.group_catch_up().await?;
        self.announce_caught_up()?;
        self.out.start();
        Ok(())
    }

    /// Sends group messages after each behind stream's position from the database, page by
    /// page, while the unsent bytes stay within the budget (then later, when there is room).
    async fn group_catch_up(&mut self) -> Result<(), Stop> {
        if self.groups.wants_reload() {
            let rows = self.state.store.groups_of_device(self.auth.device_pk).await?;
            self.groups.load(rows);
        }
        let page = self.state.config.limits.sync_page;
        for read in self.groups.reads() {
            let mut after = read.after;
            loop {
                if !self.unsent.has_room() {
                    return Ok(());
                }
                let rows = self.state.store.group_messages_after(&read.group_id, after, read.until, page).await?;
                let exhausted = rows.len() < page as usize;
                for row in rows {
                    after = row.seq;
                    let Some(event) = crate::groups::event(&row, row.seq == read.from) else { continue };
                    let text = serde_json::to_string(&ServerFrame::GroupEvent(event)).map_err(Error::internal)?;
                    let bytes = text.len();
                    if !self.unsent.try_reserve(bytes) {
                        return Ok(());
                    }
                    self.queue(Message::Text(Utf8Bytes::from(text)), bytes);
                    self.groups.sent(&read.group_id, row.seq);
                }
                if exhausted {
                    self.groups.read_all(&read.group_id);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Sends `caught_up` once, when the backlog has been delivered completely (a full
    /// unacknowledged window or byte budget pauses it until there is room again).
    fn announce_caught_up(&mut self) -> Result<(), Stop> {
        match self.window.take_caught_up() {
            Some(seq) => self.send_frame(&ServerFrame::CaughtUp(CaughtUpFrame::new(seq))),
            None => Ok(()),
        }
    }

    /// Sends inbox entries after the cursor from the database, page by page, until the inbox
    /// is exhausted, the unacknowledged window is full or the unsent bytes reach the budget.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        let (page, budget) = (self.state.config.limits.sync_page, self.state.config.limits.ws_unsent_bytes);
        loop {
            let Some(room) = self.window.next_read(page, self.unsent.has_room()) else { return Ok(()) };
            let max_bytes = budget.saturating_sub(self.unsent.bytes()).max(1);
            let rows = self.state.store.inbox_after(self.auth.device_pk, self.window.cursor(), room, max_bytes).await?;
            let exhausted = rows.len() < room as usize && rows.iter().map(|r| r.payload.len()).sum::<usize>() < max_bytes;
            for row in rows {
                let bytes = event_bytes(&row);
                if !self.unsent.try_reserve(bytes) {
                    self.window.budget_full();
                    return Ok(());
                }
                self.feed_event(&row, bytes)?;
            }
            if exhausted {
                self.window.inbox_exhausted();
                return Ok(());
            }
        }
    }

    /// Queues an event for which `bytes` are reserved (releasing them for a duplicate).
    fn feed_event(&mut self, row: &InboxRow, bytes: usize) -> Result<(), Stop> {
        if !self.window.deliver(row.seq, row.origin.clone()) {
            self.unsent.release(bytes);
            return Ok(());
        }
        // An event that cannot be sent ends the connection, so the window's record of it
        // does not matter.
        let event = serde_json::from_slice(&row.payload).map_err(|_| Error::internal("inbox payload is not JSON"))?;
        let text = serde_json::to_string(&RawEventFrame { seq: row.seq, event })
            .map_err(|_| Error::internal("event frame does not serialize"))?;
        self.queue(Message::Text(Utf8Bytes::from(text)), bytes);
        if let Some(at) = row.committed_at {
            self.state.metrics.delivery_delay.observe(at.elapsed().as_secs_f64());
        }
        self.state.metrics.events_delivered.inc();
        Ok(())
    }

    /// Queues a message for the socket (its bytes are reserved already).
    fn queue(&mut self, message: Message, bytes: usize) {
        self.out.queue.push_back((message, bytes));
    }

    /// Takes the answers and pushes that are ready without waiting, so that what one commit
    /// brought this connection (answers to its sends, events, receipts) leaves in one write.
    fn take_ready(&mut self, sends: &mut FuturesOrdered<SendFuture>, registration: &Registration) -> Result<(), Stop> {
        while let Some(Some(done)) = sends.next().now_or_never() {
            self.answer_send(done)?;
        }
        self.on_pushes(registration.mailbox.take())
    }

    /// Everything the hub queued since the last wake-up, in order.
    fn on_pushes(&mut self, pushes: VecDeque<Push>) -> Result<(), Stop> {
        pushes.into_iter().try_for_each(|push| self.on_push(push))
    }

    fn on_push(&mut self, push: Push) -> Result<(), Stop> {
        match push {
            Push::Event(row) => {
                let bytes = event_bytes(&row);
                if !self.window.accept_live(row.seq) {
                    self.unsent.release(bytes);
                    return Ok(());
                }
                self.feed_event(&row, bytes)
            }
            Push::Frame(bytes) => {
                let len = bytes.len();
                // Serialized by serde_json, so UTF-8; sent without copying.
                let text = Utf8Bytes::try_from(bytes).map_err(|_| Error::internal("frame is not UTF-8"))?;
                self.queue(Message::Text(text), len);
                Ok(())
            }
            Push::Group(push) => {
                if let Some(frame) = self.groups.on_push(&push) {
                    let len = frame.len();
                    if !self.unsent.try_reserve(len) {
                        // Read from the database when there is room again.
                        self.groups.lagged();
                        return Ok(());
                    }
                    let text = Utf8Bytes::try_from(frame).map_err(|_| Error::internal("frame is not UTF-8"))?;
                    self.queue(Message::Text(text), len);
                }
                Ok(())
            }
            Push::Close(CloseReason::Replaced) => Err(Stop::Close(close::POLICY, "replaced by a newer connection")),
            Push::Close(CloseReason::Revoked) => Err(Stop::Close(close::POLICY, "device removed")),
        }
    }

    async fn on_message(&mut self, message: Message, sends: &mut FuturesOrdered<SendFuture>) -> Result<(), Stop> {
        self.last_activity = Instant::now();
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self
                    .error(FrameRef::None, Error::new(ErrorCode::BadFrame, "binary frames are not supported; send JSON text"))
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Stop::Gone),
        };
        let frame = match ClientFrame::from_json(text.as_str()) {
            Ok(frame) => frame,
            Err(error) => return self.error(FrameRef::of_malformed(text.as_str()), frame_error(text.as_str(), &error)),
        };
        let reference = FrameRef::of(&frame);
        // Acks, pings and read markers have a budget of their own: a device throttled for
        // sending can still drain its inbox.
        let limited = match &frame {
            ClientFrame::Ack(_)
            | ClientFrame::Ping(_)
            | ClientFrame::Read(_)
            | ClientFrame::GroupAck(_)
            | ClientFrame::GroupRead(_) => self.state.limits.check_control(self.auth.device_pk, &self.state.metrics),
            _ => self.state.limits.check_account(self.auth.user_pk, self.auth.device_pk, &self.state.metrics),
        };
        if let Err(error) = limited {
            return self.error(reference, error);
        }
        match frame {
            ClientFrame::Send(request) => {
                let client_msg_id = request.client_msg_id;
                let started = Instant::now();
                match messaging::prepare_send(&self.state, &self.auth, request).await {
                    Ok(message) => {
                        let rx = self.state.store.queue_message(message).await?;
                        sends.push_back(Box::pin(await_sent(client_msg_id, started, rx)));
                        Ok(())
                    }
                    Err(error) => self.error(reference, error),
                }
            }
            ClientFrame::Ack(ack) => {
                self.ack(ack.seq);
                Ok(())
            }
            ClientFrame::Read(frame) => match messaging::mark_read(&self.state, &self.auth, frame.into_request()).await {
                Ok(()) => Ok(()),
                Err(error) => self.error(reference, error),
            },
            ClientFrame::Typing(typing) => match messaging::typing(&self.state, &self.auth, &typing.to, typing.typing).await {
                Ok(()) => Ok(()),
                Err(error) => self.error(reference, error),
            },
            ClientFrame::Ping(ping) => self.send_frame(&ServerFrame::Pong(PingFrame::new(ping.nonce))),
            ClientFrame::GroupAck(ack) => match self.groups.ack(&ack.group_id, ack.group_seq) {
                Some(seq) => {
                    self.state.groups.ack(self.auth.device_pk, &self.auth.user_id, ack.group_id, seq);
                    Ok(())
                }
                None => self.error(
                    reference,
                    Error::new(ErrorCode::NotAMember, format!("this device has no stream of {}", ack.group_id)),
                ),
            },
            ClientFrame::GroupRead(read) => match self.groups.sent_up_to(&read.group_id, read.group_seq) {
                Some(seq) => {
                    self.state.groups.read(&self.auth.user_id, &read.group_id, seq);
                    Ok(())
                }
                None => self.error(
                    reference,
                    Error::new(ErrorCode::NotAMember, format!("this device has no stream of {}", read.group_id)),
                ),
            },
            _ => self.error(reference, Error::new(ErrorCode::UnknownFrame, "unsupported frame")),
        }
    }

    /// Acknowledges up to `seq` (at most what this connection sent), now or with the next
    /// batch (see `acks`).
    fn ack(&mut self, seq: Seq) {
        let acked = self.window.ack(seq);
        let origins = acked.origins.into_iter().flatten().collect();
        if self.acks.add(acked.seq, origins, tokio::time::Instant::now()) {
            self.write_acks();
        }
    }

    /// Hands the gathered acknowledgements to the writer: delivered receipts go to the
    /// senders, and the inbox entries are released, without waiting for the commit. The
    /// receipts are made here when every sender's devices are in the directory's cache (the
    /// usual case), in a task of their own when one must be read.
    fn write_acks(&mut self) {
        let Some((seq, origins)) = self.acks.take(tokio::time::Instant::now()) else { return };
        let cached = messaging::receipts(&self.state, &self.auth, ReceiptKind::Delivered, origins.iter().cloned());
        match cached.now_or_never() {
            Some(Ok(receipts)) => {
                self.state.store.ack_later(self.auth.device_pk, seq, receipts);
                return;
            }
            // Dropped while it reads the directory (it has no other effect): again, waiting.
            None => {}
            Some(Err(error)) => {
                tracing::warn!(%error, "ack not recorded; the events will be redelivered");
                return;
            }
        }
        let state = self.state.clone();
        let auth = self.auth.clone();
        tokio::spawn(async move {
            let result = async {
                let receipts = messaging::receipts(&state, &auth, ReceiptKind::Delivered, origins).await?;
                state.store.ack(auth.device_pk, seq, receipts).await.map_err(Error::from)
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%error, "ack not recorded; the events will be redelivered");
            }
        });
    }

    fn answer_send(&mut self, (client_msg_id, started, result): SendResult) -> Result<(), Stop> {
        match result {
            Ok(Ok(outcome)) => {
                self.state.metrics.send_latency.observe(started.elapsed().as_secs_f64());
                if matches!(outcome, MessageOutcome::Stored { .. }) {
                    self.state.metrics.messages_stored.inc();
                }
                self.send_frame(&ServerFrame::Sent(messaging::sent_response(client_msg_id, outcome)))
            }
            Ok(Err(error)) => self.error(FrameRef::Send(client_msg_id), error.into()),
            Err(_) => self.error(FrameRef::Send(client_msg_id), StoreError::Unavailable.into()),
        }
    }

    /// Answers a frame with an `error` frame (the wire form of `error`, see [`Error::into_body`]).
    fn error(&mut self, frame: FrameRef, error: Error) -> Result<(), Stop> {
        let body = error.into_body();
        let answer = match frame {
            FrameRef::Send(client_msg_id) => ErrorFrame::new(Some(client_msg_id), body),
            FrameRef::Id(id) => ErrorFrame::for_frame(Some(id), body),
            FrameRef::None => ErrorFrame::new(None, body),
        };
        self.send_frame(&ServerFrame::Error(answer))
    }

    /// Queues a frame that must go out (answers): past `ws_max_unsent_bytes` the connection
    /// is closed instead.
    fn send_frame(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        let text = serde_json::to_string(frame).map_err(Error::internal)?;
        let bytes = text.len();
        self.unsent.reserve(bytes)?;
        self.queue(Message::Text(Utf8Bytes::from(text)), bytes);
        Ok(())
    }
}

/// Which client frame an error answers: a send by its `client_msg_id`, other frames by their
/// optional `id`.
#[derive(Debug, Clone, Copy)]
enum FrameRef {
    Send(Uuid),
    Id(FrameId),
    None,
}

impl FrameRef {
    fn of(frame: &ClientFrame) -> Self {
        let id = match frame {
            ClientFrame::Send(send) => return Self::Send(send.client_msg_id),
            ClientFrame::Ack(ack) => ack.id,
            ClientFrame::Read(read) => read.id,
            ClientFrame::Typing(typing) => typing.id,
            ClientFrame::Ping(ping) => ping.id,
            ClientFrame::GroupAck(ack) | ClientFrame::GroupRead(ack) => ack.id,
            _ => None,
        };
        id.map_or(Self::None, Self::Id)
    }

    /// The ids of a frame that did not parse, if it is a JSON object that has them.
    fn of_malformed(text: &str) -> Self {
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(text) else { return Self::None };
        if let Some(id) = fields.get("client_msg_id").and_then(|v| v.as_str()).and_then(|v| Uuid::parse_str(v).ok()) {
            return Self::Send(id);
        }
        fields.get("id").and_then(|v| v.as_u64()).map_or(Self::None, Self::Id)
    }
}

/// Tells a connected device that its one-time prekeys are running low.
pub fn notify_prekeys_low(state: &AppState, device: crate::storage::DevicePk, remaining: u32) {
    if let Ok(frame) = serde_json::to_vec(&ServerFrame::PrekeysLow(PrekeysLowFrame::new(remaining))) {
        state.hub.send_ephemeral(device, bytes::Bytes::from(frame));
    }
}

/// Tells a connected device that its one-time KeyPackages are running low.
pub fn notify_keypackages_low(state: &AppState, device: crate::storage::DevicePk, remaining: u32) {
    if let Ok(frame) = serde_json::to_vec(&ServerFrame::KeyPackagesLow(KeyPackagesLowFrame::new(remaining))) {
        state.hub.send_ephemeral(device, bytes::Bytes::from(frame));
    }
}

/// `unknown_frame` when the `type` is not one we know, `bad_frame` otherwise.
fn frame_error(text: &str, error: &serde_json::Error) -> Error {
    #[derive(serde::Deserialize)]
    struct Tag {
        #[serde(rename = "type")]
        kind: String,
    }
    match serde_json::from_str::<Tag>(text) {
        Ok(tag) if !ClientFrame::TYPES.contains(&tag.kind.as_str()) => {
            // Cut by characters: a byte count could fall inside one (a panic).
            let kind: String = tag.kind.chars().take(64).collect();
            Error::new(ErrorCode::UnknownFrame, format!("unknown frame type {kind:?}"))
        }
        _ => Error::new(ErrorCode::BadFrame, format!("malformed frame: {error}")),
    }
}

fn classify(error: axum::Error) -> Stop {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = error.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => Stop::Close(close::TOO_BIG, "too_large"),
        Some(WsError::Protocol(_)) => Stop::Close(close::POLICY, "protocol error"),
        Some(WsError::Utf8(_)) => Stop::Close(close::INVALID_DATA, "invalid UTF-8"),
        _ => Stop::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_frame_type_is_answered_cut_to_64_characters_whatever_they_are() {
        // Its 64th byte falls inside a two-byte character.
        let kind = format!("a{}", "é".repeat(100));
        let text = format!(r#"{{"type":"{kind}"}}"#);
        let error = ClientFrame::from_json(&text).unwrap_err();
        let body = frame_error(&text, &error).into_body();
        assert_eq!(body.code, ErrorCode::UnknownFrame);
        let shown: String = kind.chars().take(64).collect();
        assert_eq!(body.message, format!("unknown frame type {shown:?}"));
    }
}
