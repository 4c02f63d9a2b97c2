//! The background task that owns the WebSocket: a connected phase (frames, commands, timers)
//! and a reconnecting phase (backoff, commands queued), until closed.

mod frames;

use super::{
    pending::{PendingSends, Reply},
    socket::{self, Link},
    state::{AckTracker, Backoff, DedupeWindow},
    ConnectOptions, Event, Shared,
};
use crate::error::Error;
use futures_util::StreamExt;
use parley_spec::v1::{
    messages::{ReadRequest, SendRequest},
    ws::{AckFrame, ClientFrame, FrameId, GroupAckFrame, HelloFrame, PingFrame, ReadFrame, ServerFrame, TypingFrame},
};
use parley_spec::Seq;
use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use url::Url;
use uuid::Uuid;

/// A request from a [`Connection`](super::Connection) handle to the task.
pub(crate) enum Command {
    Send {
        req: SendRequest,
        reply: Reply,
    },
    /// The waiter of this send gave up (timeout); forget the send if nobody else waits.
    Prune(Uuid),
    Read {
        req: ReadRequest,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Typing {
        frame: TypingFrame,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
    /// The application stored everything up to this position (manual acks).
    Confirm(Seq),
    /// A group's stream is handled up to a position.
    GroupAck(GroupAckFrame),
}

/// Why a phase ended.
enum Exit {
    /// The socket is gone; reconnect.
    Lost(String),
    /// A newer connection of the same device took over (close 1008 "replaced"): stop rather
    /// than fight it.
    Replaced(String),
    /// Closing on request (with someone to tell), or because every handle was dropped.
    Shutdown(Option<oneshot::Sender<()>>),
    /// Reconnecting is pointless (the token was refused).
    Fatal(Error),
}

/// Why the connected phase must end early.
enum Stop {
    Lost(String),
    Replaced(String),
}

impl From<String> for Stop {
    fn from(reason: String) -> Self {
        Stop::Lost(reason)
    }
}

type Step = Result<(), Stop>;

impl From<Stop> for Exit {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Lost(reason) => Exit::Lost(reason),
            Stop::Replaced(reason) => Exit::Replaced(reason),
        }
    }
}

pub(crate) struct Task {
    base: Url,
    token: String,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    pending: PendingSends,
    reads: VecDeque<(ReadRequest, oneshot::Sender<Result<(), Error>>)>,
    dedupe: DedupeWindow,
    acks: AckTracker,
    backoff: Backoff,
    cursor: Seq,
    /// With manual acks: the position the application confirmed as stored.
    confirmed: Option<Seq>,
    ping_nonce: u64,
    /// Counts connections, to tell which one a send was written on.
    generation: u64,
    /// The last frame id given to a frame other than `send` (the server echoes it in errors).
    frame_id: FrameId,
    /// The id of the last `ack` written: acks are cumulative, so only its failure matters.
    last_ack: Option<FrameId>,
}

impl Task {
    pub(crate) fn new(
        base: Url,
        token: String,
        opts: ConnectOptions,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            base,
            token,
            shared,
            commands,
            events,
            pending: PendingSends::default(),
            reads: VecDeque::new(),
            dedupe: DedupeWindow::new(opts.dedupe_window),
            acks: AckTracker::new(opts.ack_batch, opts.ack_delay, opts.since),
            backoff: Backoff::new(opts.min_backoff, opts.max_backoff),
            cursor: opts.since,
            confirmed: opts.manual_ack.then_some(opts.since),
            ping_nonce: 0,
            generation: 0,
            frame_id: 0,
            last_ack: None,
        }
    }

    /// Runs until closed, starting with an already open socket.
    pub(crate) async fn run(mut self, ws: socket::Ws, hello: HelloFrame) {
        let mut link = Some(Link::new(ws, &hello));
        loop {
            let current = match link.take() {
                Some(l) => l,
                None => match self.reconnect().await {
                    Ok(l) => l,
                    Err(exit) => return self.finish(exit),
                },
            };
            match self.drive(current).await {
                Exit::Lost(reason) => {
                    self.shared.connected.store(false, Ordering::Release);
                    tracing::info!(%reason, cursor = self.cursor.get(), pending = self.pending.len(), "connection lost");
                    self.emit(Event::Disconnected { reason });
                }
                exit => return self.finish(exit),
            }
        }
    }

    /// The connected phase.
    async fn drive(&mut self, mut link: Link) -> Exit {
        self.generation += 1;
        self.backoff.reset();
        self.acks.acked(self.ack_position()); // connecting with `since` acknowledged it
        self.shared.connected.store(true, Ordering::Release);
        tracing::debug!(cursor = self.cursor.get(), "connected");
        self.emit(Event::Connected { cursor: self.cursor });
        if let Err(stop) = self.after_hello(&mut link) {
            return stop.into();
        }
        let timer = tokio::time::sleep_until(self.next_deadline(&link));
        tokio::pin!(timer);
        loop {
            timer.as_mut().reset(self.next_deadline(&link));
            let step = tokio::select! {
                msg = link.stream.next() => self.on_socket(&mut link, msg),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Close { done }) => {
                        self.close_link(link).await;
                        return Exit::Shutdown(Some(done));
                    }
                    None => {
                        self.close_link(link).await;
                        return Exit::Shutdown(None);
                    }
                    Some(cmd) => self.on_command(&mut link, cmd),
                },
                () = &mut timer => self.on_timer(&mut link),
                failure = &mut link.writer_failed => {
                    Err(Stop::Lost(failure.unwrap_or_else(|_| "writer stopped".to_owned())))
                }
            };
            if let Err(stop) = step {
                return stop.into();
            }
        }
    }

    /// Re-sends pending sends (original order, same ids) and queued read markers.
    fn after_hello(&mut self, link: &mut Link) -> Step {
        let resend = self.pending.take_resend(Instant::now());
        if !resend.is_empty() {
            tracing::debug!(count = resend.len(), "re-sending pending sends");
        }
        for req in resend {
            self.write_send(link, req)?;
        }
        while let Some((req, reply)) = self.reads.pop_front() {
            let id = self.next_frame_id();
            if let Err(reason) = link.send(&ClientFrame::Read(ReadFrame::new(req.clone(), Some(id)))) {
                self.reads.push_front((req, reply));
                return Err(reason.into());
            }
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    fn write_send(&mut self, link: &mut Link, req: SendRequest) -> Step {
        let id = req.client_msg_id;
        let len = link.send(&ClientFrame::Send(req))?;
        self.pending.written(id, self.generation, len);
        Ok(())
    }

    fn next_deadline(&self, link: &Link) -> Instant {
        [self.acks.deadline(), self.pending.next_retry()]
            .into_iter()
            .flatten()
            .fold(link.hb.ping_at().min(link.hb.dead_at()), Instant::min)
    }

    fn on_timer(&mut self, link: &mut Link) -> Step {
        let now = Instant::now();
        if now >= link.hb.dead_at() {
            return Err(Stop::Lost("heartbeat timeout: the server went silent".into()));
        }
        if self.acks.deadline().is_some_and(|t| t <= now) {
            self.send_ack(link)?;
        }
        for req in self.pending.take_due(now) {
            tracing::debug!(client_msg_id = %req.client_msg_id, "retrying send");
            self.write_send(link, req)?;
        }
        if link.hb.ping_at() <= now {
            self.ping_nonce = self.ping_nonce.wrapping_add(1);
            link.send(&ClientFrame::Ping(PingFrame::new(self.ping_nonce)))?;
        }
        Ok(())
    }

    fn send_ack(&mut self, link: &mut Link) -> Step {
        let position = self.ack_position();
        if self.acks.needs_ack(position) {
            let id = self.next_frame_id();
            link.send(&ClientFrame::Ack(AckFrame::new(position).with_id(id)))?;
            self.last_ack = Some(id);
            tracing::trace!(seq = position.get(), "acked");
        }
        self.acks.acked(position);
        Ok(())
    }

    fn next_frame_id(&mut self) -> FrameId {
        self.frame_id = self.frame_id.wrapping_add(1);
        self.frame_id
    }

    fn on_command(&mut self, link: &mut Link, cmd: Command) -> Step {
        match cmd {
            Command::Send { req, reply } => {
                if let Some(req) = self.pending.insert(req, reply) {
                    self.write_send(link, req)?;
                }
            }
            Command::Prune(id) => self.pending.prune(id),
            Command::Read { req, reply } => {
                let id = self.next_frame_id();
                if let Err(reason) = link.send(&ClientFrame::Read(ReadFrame::new(req.clone(), Some(id)))) {
                    self.reads.push_front((req, reply));
                    return Err(reason.into());
                }
                let _ = reply.send(Ok(()));
            }
            Command::Typing { frame, reply } => {
                let written = link.send(&ClientFrame::Typing(frame.with_id(self.next_frame_id())));
                let _ = reply.send(written.as_ref().map(drop).map_err(|_| Error::NotConnected));
                written?;
            }
            Command::Close { done } => {
                // Handled by `drive`; kept for exhaustiveness.
                let _ = done.send(());
            }
            Command::Confirm(seq) => self.confirm(seq),
            Command::GroupAck(mut frame) => {
                frame.id = Some(self.next_frame_id());
                link.send(&ClientFrame::GroupAck(frame))?;
            }
        }
        Ok(())
    }

    /// Handles a command while reconnecting; `Some` when the task should stop.
    fn on_command_offline(&mut self, cmd: Option<Command>) -> Option<Exit> {
        match cmd? {
            Command::Send { req, reply } => drop(self.pending.insert(req, reply)),
            Command::Prune(id) => self.pending.prune(id),
            Command::Read { req, reply } => self.reads.push_back((req, reply)),
            Command::Typing { reply, .. } => drop(reply.send(Err(Error::NotConnected))),
            Command::Close { done } => return Some(Exit::Shutdown(Some(done))),
            Command::Confirm(seq) => self.confirm(seq),
            // The server sends the group's events again from the cursor it has.
            Command::GroupAck(_) => {}
        }
        None
    }

    /// The position acknowledgements may cover: everything handed over, or (manual acks) what
    /// the application confirmed.
    fn ack_position(&self) -> Seq {
        self.confirmed.map_or(self.cursor, |confirmed| confirmed.min(self.cursor))
    }

    fn confirm(&mut self, seq: Seq) {
        if let Some(confirmed) = self.confirmed.as_mut() {
            if seq > *confirmed {
                *confirmed = seq.min(self.cursor);
                self.acks.record(Instant::now());
            }
        }
    }

    /// The reconnecting phase: waits (backoff), tries, repeats until a `hello`.
    async fn reconnect(&mut self) -> Result<Link, Exit> {
        let mut retry_after: Option<Duration> = None;
        loop {
            let delay = self.backoff.next_delay().max(retry_after.take().unwrap_or_default());
            tracing::debug!(delay_ms = delay.as_millis() as u64, cursor = self.cursor.get(), "reconnecting");
            let wake = Instant::now() + delay;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => break,
                    cmd = self.commands.recv() => match cmd {
                        None => return Err(Exit::Shutdown(None)),
                        cmd => if let Some(exit) = self.on_command_offline(cmd) { return Err(exit) },
                    },
                }
            }
            // With manual acks, resume from what the application stored: later events are
            // delivered again (repeated messages are still dropped by the dedupe window).
            if let Some(confirmed) = self.confirmed {
                self.cursor = confirmed;
                self.shared.cursor.store(confirmed.get(), Ordering::Release);
            }
            let attempt = socket::connect(self.base.clone(), self.token.clone(), self.cursor);
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    cmd = self.commands.recv() => match cmd {
                        None => return Err(Exit::Shutdown(None)),
                        cmd => if let Some(exit) = self.on_command_offline(cmd) { return Err(exit) },
                    },
                }
            };
            match result {
                Ok((ws, hello)) => return Ok(Link::new(ws, &hello)),
                Err(e) if e.is_fatal_for_reconnect() => return Err(Exit::Fatal(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "reconnect attempt failed");
                    retry_after = e.retry_after();
                }
            }
        }
    }

    /// Graceful close: final ack, close frame, late `sent` answers still resolve sends.
    async fn close_link(&mut self, mut link: Link) {
        let position = self.ack_position();
        if self.acks.needs_ack(position) {
            let _ = link.send(&ClientFrame::Ack(AckFrame::new(position)));
            self.acks.acked(position);
        }
        let pending = &mut self.pending;
        link.close(|text| {
            if let Ok(ServerFrame::Sent(resp)) = serde_json::from_str::<ServerFrame>(text) {
                pending.resolve(resp);
            }
        })
        .await;
        tracing::debug!(cursor = self.cursor.get(), "closed");
    }

    /// Stops for good: fails what is still waiting and ends the event stream.
    fn finish(mut self, exit: Exit) {
        self.shared.connected.store(false, Ordering::Release);
        let (err, done) = match exit {
            Exit::Fatal(e) => {
                tracing::warn!(error = %e, "cannot reconnect; connection closed");
                self.emit(Event::Disconnected { reason: format!("cannot reconnect: {e}") });
                (e.for_waiter(), None)
            }
            Exit::Replaced(reason) => {
                tracing::info!(%reason, "replaced by a newer connection of this device; not reconnecting");
                self.emit(Event::Disconnected { reason });
                (Error::Closed, None)
            }
            Exit::Shutdown(done) => (Error::Closed, done),
            Exit::Lost(_) => (Error::Closed, None),
        };
        self.pending.fail_all(&err);
        for (_, reply) in self.reads.drain(..) {
            let _ = reply.send(Err(err.for_waiter()));
        }
        drop(self); // ends `Events` before `close` returns
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }
}
