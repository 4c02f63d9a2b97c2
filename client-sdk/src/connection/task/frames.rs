//! Handling what the server sends on a live connection: inbox events (cursor, dedupe,
//! acks), answers to sends, ephemeral frames, and close frames.

use super::{Step, Stop, Task};
use crate::connection::{
    pending::ErrorOutcome,
    socket::{describe_close, Link},
    Event,
};
use parley_spec::{
    v1::{
        events::InboxEvent,
        ws::{ErrorFrame, ServerFrame},
    },
    ErrorCode, Seq,
};
use std::{sync::atomic::Ordering, time::Duration};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, protocol::CloseFrame, Message};

impl Task {
    /// Handles what the socket yielded: a frame, an error, or its end.
    pub(super) fn on_socket(&mut self, link: &mut Link, msg: Option<Result<Message, tungstenite::Error>>) -> Step {
        let msg = match msg {
            None => return Err(Stop::Lost("closed by the server".into())),
            Some(Err(e)) => return Err(Stop::Lost(format!("read failed: {e}"))),
            Some(Ok(msg)) => msg,
        };
        link.hb.received(Instant::now());
        match msg {
            Message::Text(text) => self.on_frame(link, text.as_str()),
            Message::Close(frame) => Err(self.on_close(frame.as_ref())),
            _ => Ok(()),
        }
    }

    /// The server closed the socket. 1008 "replaced": stop; 1009: a send was too large, fail it
    /// rather than re-send it forever; anything else: reconnect.
    fn on_close(&mut self, frame: Option<&CloseFrame>) -> Stop {
        let reason = format!("closed by the server ({})", describe_close(frame));
        match frame.map(|f| (u16::from(f.code), f.reason.as_str())) {
            Some((1008, text)) if text.contains("replaced") => Stop::Replaced(reason),
            Some((1009, _)) => {
                if let Some(id) = self.pending.fail_largest_written(self.generation) {
                    tracing::warn!(client_msg_id = %id, "send too large for the server; failed");
                }
                Stop::Lost(reason)
            }
            _ => Stop::Lost(reason),
        }
    }

    /// Handles one text frame; undecodable or unknown frames are ignored.
    fn on_frame(&mut self, link: &mut Link, text: &str) -> Step {
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(len = text.len(), error = %e, "ignoring undecodable frame");
                return Ok(());
            }
        };
        match frame {
            ServerFrame::Event(ev) => {
                if self.on_event(ev.seq, ev.event) {
                    self.send_ack(link)?;
                }
            }
            ServerFrame::CaughtUp(c) => {
                tracing::debug!(cursor = self.cursor.get(), server_cursor = c.cursor.get(), "caught up");
                self.emit(Event::CaughtUp { cursor: self.cursor });
            }
            ServerFrame::Sent(resp) => {
                if !self.pending.resolve(resp) {
                    tracing::debug!(client_msg_id = %resp.client_msg_id, "sent answer for no pending send");
                }
            }
            ServerFrame::Error(e) => self.on_error_frame(e),
            ServerFrame::Typing(notice) => self.emit(Event::Typing(notice)),
            ServerFrame::Presence(info) => self.emit(Event::Presence(info)),
            ServerFrame::PrekeysLow(low) => self.emit(Event::PrekeysLow { one_time_prekey_count: low.one_time_prekey_count }),
            ServerFrame::KeyPackagesLow(low) => self.emit(Event::KeyPackagesLow { count: low.count }),
            ServerFrame::GroupEvent(event) => self.emit(Event::GroupEvent(event)),
            ServerFrame::Pong(_) | ServerFrame::Hello(_) => {}
            _ => tracing::debug!("ignoring unknown frame type"),
        }
        Ok(())
    }

    /// Handles one inbox event; true when an ack should go out now.
    fn on_event(&mut self, seq: Seq, event: InboxEvent) -> bool {
        if seq <= self.cursor {
            tracing::trace!(seq = seq.get(), cursor = self.cursor.get(), "dropping old event");
            return false;
        }
        match event {
            InboxEvent::Message(m) => {
                if self.dedupe.insert(&m.sender, m.id) {
                    self.emit(Event::Message(m));
                } else {
                    tracing::debug!(seq = seq.get(), sender = %m.sender, id = m.id.get(), "dropping repeated message");
                }
            }
            InboxEvent::Receipt(r) => self.emit(Event::Receipt(r)),
            _ => tracing::debug!(seq = seq.get(), "skipping unknown event kind"),
        }
        self.cursor = seq;
        self.shared.cursor.store(seq.get(), Ordering::Release);
        if self.confirmed.is_some() {
            self.emit(Event::Checkpoint { seq });
            return false;
        }
        self.acks.record(Instant::now())
    }

    /// An `error` frame: resolves or schedules a retry of the send it answers.
    fn on_error_frame(&mut self, frame: ErrorFrame) {
        let code = frame.error.code;
        let Some(id) = frame.client_msg_id else {
            tracing::warn!(%code, id = ?frame.id, message = %frame.error.message, "server reported an error");
            // The last ack was refused (a server without frame ids leaves it open which frame
            // was): repeat the (cumulative) ack later.
            let ack_refused = frame.id.is_none_or(|id| Some(id) == self.last_ack);
            if code == ErrorCode::RateLimited && ack_refused {
                let wait = frame.error.retry_after_ms.map_or(self.backoff.delay_for(0), Duration::from_millis);
                self.acks.resend_at(Instant::now() + wait);
            }
            return;
        };
        let backoff = &self.backoff;
        match self.pending.on_error(id, frame.error, Instant::now(), |n| backoff.delay_for(n)) {
            ErrorOutcome::Retry(at) => {
                let in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64;
                tracing::debug!(client_msg_id = %id, %code, in_ms, "send will be retried");
            }
            ErrorOutcome::Failed => tracing::debug!(client_msg_id = %id, %code, "send failed"),
            ErrorOutcome::Unknown => tracing::debug!(client_msg_id = %id, %code, "error for no pending send"),
        }
    }
}
