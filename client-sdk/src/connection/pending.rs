//! Sends that have not been answered yet. They survive reconnects: after each `hello` every
//! pending send is written again, in the original order, with the same `client_msg_id` (the
//! server deduplicates), and `rate_limited` / `unavailable` answers schedule a retry.

use crate::error::Error;
use parley_spec::{
    v1::messages::{SendRequest, SentResponse},
    ErrorBody, ErrorCode,
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};
use tokio::{sync::oneshot, time::Instant};
use uuid::Uuid;

/// Where a send's result goes.
pub(crate) type Reply = oneshot::Sender<Result<SentResponse, Error>>;

#[derive(Debug)]
struct Pending {
    req: SendRequest,
    /// Usually one; more when the application sent the same `client_msg_id` again meanwhile.
    waiters: Vec<Reply>,
    /// Retries so far after `rate_limited` / `unavailable`.
    attempts: u32,
    /// Set while waiting to retry.
    retry_at: Option<Instant>,
    /// The connection (generation) it was last written on, 0 if never.
    written_on: u64,
    /// Size of the frame as last written, in bytes.
    frame_len: usize,
}

/// What an `error` frame for a pending send led to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ErrorOutcome {
    /// No such pending send (already answered, or cancelled).
    Unknown,
    /// The send will be written again at this time.
    Retry(Instant),
    /// The send failed; its waiters got the error.
    Failed,
}

/// Pending sends in submission order.
#[derive(Debug, Default)]
pub(crate) struct PendingSends {
    next_order: u64,
    by_order: BTreeMap<u64, Pending>,
    by_id: HashMap<Uuid, u64>,
    retries: BTreeSet<(Instant, u64)>,
}

impl PendingSends {
    /// Registers a send. Returns its frame when it should be written now, or `None` when the
    /// same `client_msg_id` is already pending (the new waiter joins the existing send).
    pub(crate) fn insert(&mut self, req: SendRequest, reply: Reply) -> Option<SendRequest> {
        if let Some(order) = self.by_id.get(&req.client_msg_id) {
            if let Some(p) = self.by_order.get_mut(order) {
                p.waiters.push(reply);
                return None;
            }
        }
        let order = self.next_order;
        self.next_order += 1;
        self.by_id.insert(req.client_msg_id, order);
        let frame = req.clone();
        self.by_order
            .insert(order, Pending { req, waiters: vec![reply], attempts: 0, retry_at: None, written_on: 0, frame_len: 0 });
        Some(frame)
    }

    /// A `sent` answer: resolves every waiter of that send.
    pub(crate) fn resolve(&mut self, resp: SentResponse) -> bool {
        let Some(p) = self.remove(resp.client_msg_id) else { return false };
        for w in p.waiters {
            let _ = w.send(Ok(resp));
        }
        true
    }

    /// An `error` answer. `rate_limited` and `unavailable` schedule a retry after the server's
    /// `retry_after_ms`, or after `backoff(attempt)`; anything else fails the send.
    pub(crate) fn on_error(
        &mut self,
        id: Uuid,
        body: ErrorBody,
        now: Instant,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> ErrorOutcome {
        let Some(&order) = self.by_id.get(&id) else { return ErrorOutcome::Unknown };
        if matches!(body.code, ErrorCode::RateLimited | ErrorCode::Unavailable) {
            if let Some(p) = self.by_order.get_mut(&order) {
                let delay = body.retry_after_ms.map(Duration::from_millis).unwrap_or_else(|| backoff(p.attempts));
                p.attempts = p.attempts.saturating_add(1);
                let at = now + delay;
                if let Some(old) = p.retry_at.replace(at) {
                    self.retries.remove(&(old, order));
                }
                self.retries.insert((at, order));
                return ErrorOutcome::Retry(at);
            }
        }
        let Some(p) = self.remove(id) else { return ErrorOutcome::Unknown };
        let err = Error::from_body(body);
        for w in p.waiters {
            let _ = w.send(Err(err.for_waiter()));
        }
        ErrorOutcome::Failed
    }

    /// Drops waiters that gave up (timed out or dropped their future); a send with none left is
    /// forgotten and will not be written again.
    pub(crate) fn prune(&mut self, id: Uuid) {
        let Some(&order) = self.by_id.get(&id) else { return };
        let empty = self.by_order.get_mut(&order).is_none_or(|p| {
            p.waiters.retain(|w| !w.is_closed());
            p.waiters.is_empty()
        });
        if empty {
            self.remove(id);
        }
    }

    /// Records that the send went out on connection `generation` as a frame of `len` bytes.
    pub(crate) fn written(&mut self, id: Uuid, generation: u64, len: usize) {
        if let Some(p) = self.by_id.get(&id).and_then(|order| self.by_order.get_mut(order)) {
            p.written_on = generation;
            p.frame_len = len;
        }
    }

    /// The server closed connection `generation` with 1009 (a frame over its size limit): the
    /// culprit is taken to be the largest unanswered send written on it, which fails with
    /// `too_large` instead of being re-sent forever. Returns its id.
    pub(crate) fn fail_largest_written(&mut self, generation: u64) -> Option<Uuid> {
        let id = self.by_order.values().filter(|p| p.written_on == generation).max_by_key(|p| p.frame_len)?.req.client_msg_id;
        let p = self.remove(id)?;
        let body = ErrorBody::new(ErrorCode::TooLarge, "the send frame exceeded the server's size limit");
        let err = Error::from_body(body);
        for w in p.waiters {
            let _ = w.send(Err(err.for_waiter()));
        }
        Some(id)
    }

    /// When the earliest scheduled retry is due.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.retries.first().map(|(at, _)| *at)
    }

    /// Sends whose retry time has come, in submission order; they count as written.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<SendRequest> {
        let mut due = Vec::new();
        while let Some(&(at, order)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            if let Some(p) = self.by_order.get_mut(&order) {
                p.retry_at = None;
                due.push(order);
            }
        }
        due.sort_unstable();
        due.iter().filter_map(|o| self.by_order.get(o)).map(|p| p.req.clone()).collect()
    }

    /// Everything to write on a fresh connection, in submission order: every send not waiting
    /// for a future retry. Sends nobody waits for any more are dropped first.
    pub(crate) fn take_resend(&mut self, now: Instant) -> Vec<SendRequest> {
        let abandoned: Vec<Uuid> = self
            .by_order
            .values_mut()
            .filter_map(|p| {
                p.waiters.retain(|w| !w.is_closed());
                p.waiters.is_empty().then_some(p.req.client_msg_id)
            })
            .collect();
        for id in abandoned {
            self.remove(id);
        }
        self.take_due(now);
        self.by_order.values().filter(|p| p.retry_at.is_none()).map(|p| p.req.clone()).collect()
    }

    /// Fails every pending send (the connection is closing for good).
    pub(crate) fn fail_all(&mut self, err: &Error) {
        self.by_id.clear();
        self.retries.clear();
        for (_, p) in std::mem::take(&mut self.by_order) {
            for w in p.waiters {
                let _ = w.send(Err(err.for_waiter()));
            }
        }
    }

    /// How many sends are pending.
    pub(crate) fn len(&self) -> usize {
        self.by_order.len()
    }

    fn remove(&mut self, id: Uuid) -> Option<Pending> {
        let order = self.by_id.remove(&id)?;
        let p = self.by_order.remove(&order)?;
        if let Some(at) = p.retry_at {
            self.retries.remove(&(at, order));
        }
        Some(p)
    }
}

#[cfg(test)]
#[path = "pending_tests.rs"]
mod tests;
