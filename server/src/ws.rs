//! The device WebSocket (`GET /v1/ws`): one task per connection that sends the backlog after
//! the client's cursor, then live events, answers frames, and tracks heartbeats.
//!
//! Delivery is at-least-once on the wire and in order: every event is sent from the
//! database or from the hub strictly in sequence order; a gap (a lagged buffer, or a burst
//! beyond the unacknowledged window) falls back to reading the inbox. The SDK removes the
//! duplicates a reconnect can cause.

use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::ApiError;
use crate::hub::{CloseReason, Push};
use crate::messaging;
use crate::presence;
use crate::storage::{now_ms, InboxRow, MessageOutcome, Origin, StoreError};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt as _, StreamExt as _};
use parley_spec::v1::events::ReceiptKind;
use parley_spec::v1::ws::{CaughtUpFrame, ClientFrame, ErrorFrame, HelloFrame, PingFrame, PrekeysLowFrame, ServerFrame, WsQuery};
use parley_spec::{ErrorBody, ErrorCode};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Close codes.
mod close {
    pub const GOING_AWAY: u16 = 1001;
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
        Err(e) => return ApiError::new(ErrorCode::BadRequest, e.body_text()).into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => return ApiError::new(ErrorCode::BadRequest, e.body_text()).into_response(),
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
}

impl From<axum::Error> for Stop {
    fn from(_: axum::Error) -> Self {
        Stop::Gone
    }
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        tracing::warn!(%error, "storage error on a connection");
        Stop::Close(close::GOING_AWAY, "unavailable")
    }
}

impl From<ApiError> for Stop {
    fn from(error: ApiError) -> Self {
        tracing::warn!(code = %error.code(), "error on a connection");
        Stop::Close(close::GOING_AWAY, "unavailable")
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

struct Conn {
    state: AppState,
    auth: AuthDevice,
    socket: WebSocket,
    /// Highest seq sent on this connection (or the client's `since`).
    cursor: u64,
    /// Sent, not yet acknowledged: seq and, for messages, (sender, id) for receipts.
    pending: VecDeque<(u64, Option<Origin>)>,
    /// Live events were skipped; read the inbox before sending more.
    behind: bool,
    /// `caught_up` was sent (once the backlog was fully delivered).
    caught_up_sent: bool,
    /// Most events sent but not yet acknowledged; beyond it the server waits for an `ack`.
    max_unacked: usize,
    last_activity: Instant,
}

async fn connection(state: AppState, auth: AuthDevice, since: u64, socket: WebSocket) {
    let (tx, mut rx) = mpsc::channel(state.config.limits.connection_buffer);
    let registration = state.hub.register(auth.device_pk, tx);
    state.metrics.connections.inc();
    let user_entry = state.directory.local(auth.user_id.localpart()).await.ok().flatten();
    if state.presence.connected(auth.user_pk) {
        if let Some(entry) = &user_entry {
            presence::announce(&state, entry.clone(), true, None);
        }
    }
    tracing::debug!(user = %auth.user_id, device = %auth.device_id, since, "connected");
    let mut conn = Conn {
        state: state.clone(),
        auth: auth.clone(),
        socket,
        cursor: since,
        pending: VecDeque::new(),
        behind: false,
        caught_up_sent: false,
        max_unacked: state.config.limits.max_unacked_events,
        last_activity: Instant::now(),
    };
    let stop = conn.run(&mut rx, &registration.lagged).await;
    if let Stop::Close(code, reason) = stop {
        let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
        let _ = conn.socket.send(Message::Close(Some(frame))).await;
    }
    drop(conn);
    state.hub.unregister(auth.device_pk, registration.conn_id);
    state.metrics.connections.dec();
    let ts = now_ms();
    if let Err(error) = state.store.record_last_seen(auth.user_pk, auth.device_pk, ts).await {
        tracing::warn!(%error, "last-seen not recorded");
    }
    if state.presence.disconnected(auth.user_pk) {
        if let Some(entry) = user_entry {
            presence::announce(&state, entry, false, Some(ts));
        }
    }
    tracing::debug!(user = %auth.user_id, device = %auth.device_id, "disconnected");
}

impl Conn {
    async fn run(&mut self, rx: &mut mpsc::Receiver<Push>, lagged: &std::sync::atomic::AtomicBool) -> Stop {
        match self.start().await {
            Ok(()) => {}
            Err(stop) => return stop,
        }
        let presence_config = &self.state.config.presence;
        let timeout = Duration::from_millis(presence_config.heartbeat_timeout_ms);
        let period =
            Duration::from_millis(presence_config.heartbeat_interval_ms.min(presence_config.heartbeat_timeout_ms / 3).max(10));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.state.shutdown.clone();
        let mut sends: FuturesOrdered<SendFuture> = FuturesOrdered::new();
        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.changed() => Err(Stop::Close(close::GOING_AWAY, "server shutting down")),
                Some(done) = sends.next(), if !sends.is_empty() => self.answer_send(done).await,
                push = rx.recv() => match push {
                    Some(push) => self.on_push(push).await,
                    None => Err(Stop::Close(close::GOING_AWAY, "server shutting down")),
                },
                frame = self.socket.recv() => match frame {
                    Some(Ok(message)) => self.on_message(message, &mut sends).await,
                    Some(Err(error)) => Err(classify(error)),
                    None => Err(Stop::Gone),
                },
                _ = heartbeat.tick() => {
                    if self.last_activity.elapsed() > timeout {
                        Err(Stop::Close(close::POLICY, "heartbeat timeout"))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(stop) = step {
                return stop;
            }
            if lagged.swap(false, Ordering::AcqRel) {
                self.behind = true;
            }
            if self.behind && self.pending.len() < self.max_unacked {
                if let Err(stop) = self.catch_up().await {
                    return stop;
                }
            }
            if let Err(stop) = self.announce_caught_up().await {
                return stop;
            }
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
        self.send_frame(&hello).await?;
        // `since` acknowledges everything up to it.
        let acked = self.state.store.acked_seq(self.auth.device_pk).await?;
        if self.cursor > acked {
            messaging::ack_from_store(&self.state, &self.auth, acked, self.cursor).await?;
            // A `since` beyond the end of the inbox was clamped when recorded: resume from
            // there, or this connection would skip the next events.
            self.cursor = self.cursor.min(self.state.store.acked_seq(self.auth.device_pk).await?);
        }
        for info in crate::api::presence::contacts_presence(&self.state, &self.auth.user_id).await? {
            self.send_frame(&ServerFrame::Presence(info)).await?;
        }
        let (has_keys, prekeys) = self.state.store.prekey_count(self.auth.device_pk).await?;
        if has_keys && prekeys < self.state.config.limits.prekey_low_watermark {
            self.send_frame(&ServerFrame::PrekeysLow(PrekeysLowFrame::new(prekeys))).await?;
        }
        self.catch_up().await?;
        self.announce_caught_up().await
    }

    /// Sends `caught_up` once, when the backlog has been delivered completely (a full
    /// unacknowledged window pauses it until the client acknowledges).
    async fn announce_caught_up(&mut self) -> Result<(), Stop> {
        if self.caught_up_sent || self.behind {
            return Ok(());
        }
        self.caught_up_sent = true;
        self.send_frame(&ServerFrame::CaughtUp(CaughtUpFrame::new(self.cursor))).await
    }

    /// Sends inbox entries after the cursor from the database, page by page, until the inbox
    /// is exhausted or the unacknowledged window is full.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        let page = self.state.config.limits.sync_page;
        loop {
            let room = (self.max_unacked.saturating_sub(self.pending.len())).min(page as usize) as u32;
            if room == 0 {
                self.behind = true;
                return Ok(());
            }
            let rows = self.state.store.inbox_after(self.auth.device_pk, self.cursor, room).await?;
            let count = rows.len();
            for row in rows {
                self.feed_event(&row).await?;
            }
            self.socket.flush().await?;
            if count < room as usize {
                self.behind = false;
                return Ok(());
            }
        }
    }

    async fn feed_event(&mut self, row: &InboxRow) -> Result<(), Stop> {
        if row.seq <= self.cursor {
            return Ok(());
        }
        let payload = std::str::from_utf8(&row.payload).map_err(|_| ApiError::internal("inbox payload is not UTF-8"))?;
        let mut text = String::with_capacity(payload.len() + 40);
        text.push_str("{\"type\":\"event\",\"seq\":");
        text.push_str(&row.seq.to_string());
        text.push_str(",\"event\":");
        text.push_str(payload);
        text.push('}');
        self.socket.feed(Message::Text(Utf8Bytes::from(text))).await?;
        self.cursor = row.seq;
        if let Some(at) = row.committed_at {
            self.state.metrics.delivery_delay.observe(at.elapsed().as_secs_f64());
        }
        self.pending.push_back((row.seq, row.origin.clone()));
        self.state.metrics.events_delivered.inc();
        Ok(())
    }

    async fn on_push(&mut self, push: Push) -> Result<(), Stop> {
        match push {
            Push::Event(row) => {
                if row.seq <= self.cursor {
                    return Ok(());
                }
                if self.behind || row.seq != self.cursor + 1 || self.pending.len() >= self.max_unacked {
                    self.behind = true;
                    return Ok(());
                }
                self.feed_event(&row).await?;
                self.socket.flush().await?;
                Ok(())
            }
            Push::Frame(bytes) => {
                // Serialized by serde_json, so UTF-8; sent without copying.
                let text = Utf8Bytes::try_from(bytes).map_err(|_| ApiError::internal("frame is not UTF-8"))?;
                self.socket.send(Message::Text(text)).await?;
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
                    .error(None, ApiError::new(ErrorCode::BadFrame, "binary frames are not supported; send JSON text"))
                    .await
            }
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Close(_) => return Err(Stop::Gone),
        };
        let frame: ClientFrame = match serde_json::from_str(text.as_str()) {
            Ok(frame) => frame,
            Err(error) => return self.error(None, frame_error(text.as_str(), &error)).await,
        };
        if let Err(error) = self.state.limits.check_device(self.auth.device_pk, &self.state.metrics) {
            let id = match &frame {
                ClientFrame::Send(send) => Some(send.client_msg_id),
                _ => None,
            };
            return self.error(id, error).await;
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
                    Err(error) => self.error(Some(client_msg_id), error).await,
                }
            }
            ClientFrame::Ack(ack) => {
                self.ack(ack.seq).await;
                Ok(())
            }
            ClientFrame::Read(request) => match messaging::mark_read(&self.state, &self.auth, request).await {
                Ok(()) => Ok(()),
                Err(error) => self.error(None, error).await,
            },
            ClientFrame::Typing(typing) => match messaging::typing(&self.state, &self.auth, &typing.to, typing.typing).await {
                Ok(()) => Ok(()),
                Err(error) => self.error(None, error).await,
            },
            ClientFrame::Ping(ping) => self.send_frame(&ServerFrame::Pong(PingFrame::new(ping.nonce))).await,
            _ => self.error(None, ApiError::new(ErrorCode::UnknownFrame, "unsupported frame")).await,
        }
    }

    /// Acknowledges up to `seq` (at most what this connection sent): delivered receipts go to
    /// the senders, and the inbox entries are released, in the background.
    async fn ack(&mut self, seq: u64) {
        let seq = seq.min(self.cursor);
        let mut origins = Vec::new();
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, Some(origin))) = self.pending.pop_front() {
                origins.push(origin);
            }
        }
        let state = self.state.clone();
        let auth = self.auth.clone();
        tokio::spawn(async move {
            let result = async {
                let receipts = messaging::receipts(&state, &auth, ReceiptKind::Delivered, origins).await?;
                state.store.ack(auth.device_pk, seq, receipts).await.map_err(ApiError::from)
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(code = %error.code(), "ack not recorded; the events will be redelivered");
            }
        });
    }

    async fn answer_send(&mut self, (client_msg_id, started, result): SendResult) -> Result<(), Stop> {
        match result {
            Ok(Ok(outcome)) => {
                self.state.metrics.send_latency.observe(started.elapsed().as_secs_f64());
                if matches!(outcome, MessageOutcome::Stored { .. }) {
                    self.state.metrics.messages_stored.inc();
                }
                self.send_frame(&ServerFrame::Sent(messaging::sent_response(client_msg_id, outcome))).await
            }
            Ok(Err(error)) => self.error(Some(client_msg_id), error.into()).await,
            Err(_) => self.error(Some(client_msg_id), StoreError::Unavailable.into()).await,
        }
    }

    async fn error(&mut self, client_msg_id: Option<Uuid>, error: ApiError) -> Result<(), Stop> {
        self.send_frame(&ServerFrame::Error(ErrorFrame::new(client_msg_id, error.body))).await
    }

    async fn send_frame(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        let text = serde_json::to_string(frame).map_err(ApiError::internal)?;
        self.socket.send(Message::Text(Utf8Bytes::from(text))).await?;
        Ok(())
    }
}

/// Tells a connected device that its one-time prekeys are running low.
pub fn notify_prekeys_low(state: &AppState, device: crate::storage::DevicePk, remaining: u32) {
    if let Ok(frame) = serde_json::to_vec(&ServerFrame::PrekeysLow(PrekeysLowFrame::new(remaining))) {
        state.hub.send_ephemeral(device, bytes::Bytes::from(frame));
    }
}

/// `unknown_frame` when the `type` is not one we know, `bad_frame` otherwise.
fn frame_error(text: &str, error: &serde_json::Error) -> ApiError {
    #[derive(serde::Deserialize)]
    struct Tag {
        #[serde(rename = "type")]
        kind: String,
    }
    const KNOWN: &[&str] = &["send", "ack", "read", "typing", "ping"];
    match serde_json::from_str::<Tag>(text) {
        Ok(tag) if !KNOWN.contains(&tag.kind.as_str()) => {
            let mut kind = tag.kind;
            kind.truncate(64);
            ApiError::new(ErrorCode::UnknownFrame, format!("unknown frame type {kind:?}"))
        }
        _ => ApiError { body: ErrorBody::new(ErrorCode::BadFrame, format!("malformed frame: {error}")) },
    }
}

fn classify(error: axum::Error) -> Stop {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let inner = error.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => Stop::Close(close::TOO_BIG, "too_large"),
        Some(WsError::Protocol(_)) => Stop::Close(close::POLICY, "protocol error"),
        _ => Stop::Gone,
    }
}
