//! The real-time connection: one WebSocket per device, owned by a background task that
//! reconnects with backoff, resumes from the last handled inbox position, acknowledges
//! automatically, heartbeats, drops duplicate messages and re-sends unanswered sends.
//!
//! [`Connection`] is the handle for sending; [`Events`] is the stream of everything received.

mod pending;
mod socket;
mod state;
mod task;

use crate::{error::Error, Session};
use futures_util::Stream;
use parley_spec::{
    v1::{
        events::{MessageEvent, ReceiptEvent},
        groups::GroupEvent,
        messages::{Envelope, ReadRequest, SendRequest, SentResponse},
        presence::PresenceInfo,
        ws::{GroupAckFrame, TypingFrame, TypingNotice},
    },
    DeviceId, GroupId, GroupSeq, Seq, ServerMsgId, UserId,
};
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};
use task::Command;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// How a [`Connection`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Resume after this inbox position (acknowledges everything up to it). Default 0.
    pub since: Seq,
    /// First reconnect delay. Default 100 ms.
    pub min_backoff: Duration,
    /// Longest reconnect delay. Default 5 s.
    pub max_backoff: Duration,
    /// Acknowledge as soon as this many handled events are unacknowledged. Default 64.
    pub ack_batch: usize,
    /// Acknowledge at the latest this long after the first unacknowledged event. Default 20 ms.
    pub ack_delay: Duration,
    /// How many recent `(sender, id)` message keys to remember for dropping repeats
    /// (0 disables). Default 10,000.
    pub dedupe_window: usize,
    /// Fail a send with [`Error::Timeout`] if it is not answered in this time (it is then not
    /// re-sent any more, though it may already have been stored). Default: no timeout; sends
    /// wait across reconnects until answered.
    pub send_timeout: Option<Duration>,
    /// Acknowledge only what the application confirmed with [`Connection::confirm`] (after
    /// storing it), instead of what was handed to it. The stream then carries
    /// [`Event::Checkpoint`]s, and a reconnect resumes from the last confirmed position, so
    /// nothing is lost if the application stops between receiving and storing. Default false.
    pub manual_ack: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            since: Seq::ZERO,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            ack_batch: 64,
            ack_delay: Duration::from_millis(20),
            dedupe_window: 10_000,
            send_timeout: None,
            manual_ack: false,
        }
    }
}

impl ConnectOptions {
    /// The defaults, resuming after `since`.
    pub fn since(since: Seq) -> Self {
        Self { since, ..Self::default() }
    }
}

/// Something that happened on the connection, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A `hello` was received (at open and after every reconnect); `cursor` is where it resumed.
    Connected {
        /// The last handled inbox position.
        cursor: Seq,
    },
    /// The backlog is delivered; what follows is live.
    CaughtUp {
        /// The last handled inbox position.
        cursor: Seq,
    },
    /// A message for this device (each `(sender, id)` at most once within the dedupe window).
    Message(MessageEvent),
    /// A delivered or read receipt.
    Receipt(ReceiptEvent),
    /// A contact's presence.
    Presence(PresenceInfo),
    /// Someone is typing to this user (or stopped).
    Typing(TypingNotice),
    /// The server holds few one-time prekeys for this device: upload more.
    PrekeysLow {
        /// How many are left.
        one_time_prekey_count: u32,
    },
    /// The server holds few one-time MLS KeyPackages for this device: upload more.
    KeyPackagesLow {
        /// How many are left.
        count: u32,
    },
    /// A message of one of the device's groups, in the group's order (the backlog from the
    /// device's group cursor before [`Event::CaughtUp`], then live). Acknowledge it with
    /// [`Connection::group_ack`] once what it derived is stored: group events are never
    /// acknowledged automatically.
    GroupEvent(GroupEvent),
    /// With [`ConnectOptions::manual_ack`]: every event before this one is from inbox
    /// positions up to `seq`; once they are stored, call [`Connection::confirm`] with it.
    Checkpoint {
        /// Inbox position.
        seq: Seq,
    },
    /// The WebSocket was lost; the task is reconnecting (unless the stream ends next, which
    /// means the server refused the token and the connection is closed for good).
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
}

/// State shared between the handles and the background task.
#[derive(Debug)]
struct Shared {
    cursor: AtomicU64,
    connected: AtomicBool,
}

/// A handle on a device's real-time connection. Cheap to clone; the background task stops
/// when [`close`](Connection::close) is called or every handle is dropped.
#[derive(Debug, Clone)]
pub struct Connection {
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    send_timeout: Option<Duration>,
    user_id: UserId,
    device_id: DeviceId,
}

impl Connection {
    /// Opens the WebSocket for `session` and waits for `hello`, then hands the socket to a
    /// background task (which needs a Tokio runtime). Fails if this first attempt fails (the
    /// server is unreachable, or refuses the token); later losses reconnect automatically.
    pub async fn open(session: &Session, opts: ConnectOptions) -> Result<(Connection, Events), Error> {
        let base = session.base()?;
        let (ws, hello) = socket::connect(base.clone(), session.access_token().to_owned(), opts.since).await?;
        if hello.user_id != session.user_id || hello.device_id != session.device_id {
            tracing::warn!(user_id = %hello.user_id, device_id = %hello.device_id, "hello names another device");
        }
        let shared = Arc::new(Shared { cursor: AtomicU64::new(opts.since.get()), connected: AtomicBool::new(true) });
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let conn = Connection {
            commands,
            shared: shared.clone(),
            send_timeout: opts.send_timeout,
            user_id: session.user_id.clone(),
            device_id: session.device_id.clone(),
        };
        let task = task::Task::new(base, session.access_token().to_owned(), opts, shared, command_rx, event_tx);
        tokio::spawn(task.run(ws, hello));
        Ok((conn, Events { rx: event_rx }))
    }

    /// Sends `envelopes` to `to` with a fresh `client_msg_id`, waiting for the `sent` answer.
    /// Survives reconnects; `rate_limited` and `unavailable` are retried automatically.
    pub async fn send(&self, to: UserId, envelopes: Vec<Envelope>) -> Result<SentResponse, Error> {
        self.send_request(SendRequest::new(Uuid::new_v4(), to, envelopes)).await
    }

    /// Like [`send`](Self::send) with a caller-chosen `client_msg_id` (retrying with the same
    /// id never makes a second message).
    pub async fn send_request(&self, req: SendRequest) -> Result<SentResponse, Error> {
        let id = req.client_msg_id;
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Send { req, reply }).map_err(|_| Error::Closed)?;
        let answer = match self.send_timeout {
            None => rx.await,
            Some(limit) => match tokio::time::timeout(limit, rx).await {
                Ok(answer) => answer,
                Err(_) => {
                    let _ = self.commands.send(Command::Prune(id));
                    return Err(Error::Timeout);
                }
            },
        };
        answer.unwrap_or(Err(Error::Closed))
    }

    /// Marks messages from `peer` as read. Queued while reconnecting; resolves once written to
    /// the socket (the server does not answer `read` frames, so errors such as `unknown_user`
    /// are only logged; use [`Api::read`](crate::Api::read) to see them).
    pub async fn read(&self, peer: UserId, message_ids: Vec<ServerMsgId>) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Read { req: ReadRequest::new(peer, message_ids), reply }).map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// Tells `to` this user is typing (or stopped). Not queued: fails with
    /// [`Error::NotConnected`] while reconnecting.
    pub async fn typing(&self, to: UserId, typing: bool) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Typing { frame: TypingFrame::new(to, typing), reply }).map_err(|_| Error::Closed)?;
        rx.await.unwrap_or(Err(Error::Closed))
    }

    /// The highest inbox position handled (forwarded to [`Events`], or dropped as a repeat).
    /// Pass it as [`ConnectOptions::since`] to resume later.
    pub fn cursor(&self) -> Seq {
        Seq::new(self.shared.cursor.load(Ordering::Acquire))
    }

    /// With [`ConnectOptions::manual_ack`]: everything up to inbox position `seq` is stored by
    /// the application and may be acknowledged (and deleted on the server).
    pub fn confirm(&self, seq: Seq) {
        let _ = self.commands.send(Command::Confirm(seq));
    }

    /// Acknowledges a group's stream up to `group_seq` (cumulative): the server moves the
    /// device's group cursor. Not queued: while reconnecting it is dropped, and the server
    /// sends the events again after the cursor it has.
    pub fn group_ack(&self, group_id: GroupId, group_seq: GroupSeq) {
        let _ = self.commands.send(Command::GroupAck(GroupAckFrame::new(group_id, group_seq)));
    }

    /// Whether a WebSocket is up right now (false while reconnecting and after close).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The connected user.
    pub fn user_id(&self) -> &UserId {
        &self.user_id
    }

    /// The connected device.
    pub fn device_id(&self) -> &DeviceId {
        &self.device_id
    }

    /// Closes gracefully: acknowledges what was handled, sends a close frame and stops the
    /// task. Unanswered sends fail with [`Error::Closed`]; [`Events`] ends. Other clones of
    /// this handle stop working too.
    pub async fn close(self) {
        let (done, rx) = oneshot::channel();
        if self.commands.send(Command::Close { done }).is_ok() {
            let _ = rx.await;
        }
    }
}

/// The stream of [`Event`]s. Ends (`None`) when the connection is closed for good.
///
/// Events are buffered without limit, so the connection never waits for the application; an
/// event counts as handled (and is acknowledged) once it is in this buffer. Dropping `Events`
/// discards later events: they are still acknowledged, so a send-only client does not leave
/// its receipts piling up on the server.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event; `None` once the connection is closed and everything was consumed.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is buffered, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// How many events are buffered.
    pub fn buffered(&self) -> usize {
        self.rx.len()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
