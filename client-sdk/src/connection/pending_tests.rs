//! Tests for the pending-send bookkeeping.

use super::*;
use parley_spec::{ServerMsgId, Timestamp, UserId};

fn req(n: u128) -> SendRequest {
    SendRequest::new(Uuid::from_u128(n), UserId::parse("@bob:x.org").unwrap(), Vec::new())
}

fn sent(n: u128) -> SentResponse {
    SentResponse::new(Uuid::from_u128(n), ServerMsgId::new(n as u64), Timestamp::EPOCH, false)
}

fn no_backoff(_: u32) -> Duration {
    Duration::from_millis(100)
}

#[test]
fn resolve_answers_every_waiter_once() {
    let mut p = PendingSends::default();
    let (tx1, mut rx1) = oneshot::channel();
    let (tx2, mut rx2) = oneshot::channel();
    assert!(p.insert(req(1), tx1).is_some());
    assert!(p.insert(req(1), tx2).is_none(), "same id joins the pending send");
    assert_eq!(p.len(), 1);
    assert!(p.resolve(sent(1)));
    assert!(!p.resolve(sent(1)), "answered already");
    assert_eq!(rx1.try_recv().unwrap().unwrap().server_msg_id, ServerMsgId::new(1));
    assert_eq!(rx2.try_recv().unwrap().unwrap().server_msg_id, ServerMsgId::new(1));
    assert_eq!(p.len(), 0);
}

#[test]
fn resend_keeps_order_and_skips_abandoned() {
    let mut p = PendingSends::default();
    let mut keep = Vec::new();
    for n in 1..=5 {
        let (tx, rx) = oneshot::channel();
        p.insert(req(n), tx);
        if n != 3 {
            keep.push(rx);
        }
    }
    p.resolve(sent(2));
    let now = Instant::now();
    let ids: Vec<u128> = p.take_resend(now).iter().map(|r| r.client_msg_id.as_u128()).collect();
    assert_eq!(ids, vec![1, 4, 5], "3 was abandoned, 2 answered");
    assert_eq!(p.len(), 3);
}

#[test]
fn rate_limited_sends_retry_later() {
    let mut p = PendingSends::default();
    let (tx, mut rx) = oneshot::channel();
    p.insert(req(1), tx);
    let (tx2, _rx2) = oneshot::channel();
    p.insert(req(2), tx2);
    let now = Instant::now();
    let mut body = ErrorBody::new(ErrorCode::RateLimited, "slow down");
    body.retry_after_ms = Some(250);
    let at = now + Duration::from_millis(250);
    assert_eq!(p.on_error(Uuid::from_u128(1), body, now, no_backoff), ErrorOutcome::Retry(at));
    assert_eq!(p.next_retry(), Some(at));
    assert!(rx.try_recv().is_err(), "still pending");

    // A reconnect before the retry time resends only the other one.
    let ids: Vec<u128> = p.take_resend(now).iter().map(|r| r.client_msg_id.as_u128()).collect();
    assert_eq!(ids, vec![2]);

    assert!(p.take_due(now + Duration::from_millis(100)).is_empty());
    let due = p.take_due(at);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].client_msg_id, Uuid::from_u128(1));
    assert_eq!(p.next_retry(), None);

    // Without retry_after_ms the backoff decides.
    let body = ErrorBody::new(ErrorCode::Unavailable, "restarting");
    let outcome = p.on_error(Uuid::from_u128(1), body, now, |attempt| Duration::from_secs(u64::from(attempt) + 7));
    assert_eq!(outcome, ErrorOutcome::Retry(now + Duration::from_secs(8)), "second attempt");
}

#[test]
fn other_errors_fail_the_send() {
    let mut p = PendingSends::default();
    let (tx, mut rx) = oneshot::channel();
    p.insert(req(1), tx);
    let body = ErrorBody::new(ErrorCode::DevicesMismatch, "missing devices");
    assert_eq!(p.on_error(Uuid::from_u128(1), body.clone(), Instant::now(), no_backoff), ErrorOutcome::Failed);
    let err = rx.try_recv().unwrap().unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.server_code(), Some(ErrorCode::DevicesMismatch));
    assert_eq!(p.on_error(Uuid::from_u128(1), body, Instant::now(), no_backoff), ErrorOutcome::Unknown);
}

#[test]
fn prune_and_fail_all() {
    let mut p = PendingSends::default();
    let (tx, rx) = oneshot::channel();
    p.insert(req(1), tx);
    let (tx2, mut rx2) = oneshot::channel();
    p.insert(req(2), tx2);
    drop(rx);
    p.prune(Uuid::from_u128(1));
    p.prune(Uuid::from_u128(2));
    assert_eq!(p.len(), 1, "2 still has a waiter");
    p.fail_all(&Error::Closed);
    assert!(matches!(rx2.try_recv().unwrap(), Err(Error::Closed)));
    assert_eq!(p.len(), 0);
}

#[test]
fn too_large_fails_the_largest_send_of_that_connection() {
    let mut p = PendingSends::default();
    let mut rxs = Vec::new();
    for n in 1..=3 {
        let (tx, rx) = oneshot::channel();
        p.insert(req(n), tx);
        rxs.push(rx);
    }
    p.written(Uuid::from_u128(1), 1, 500);
    p.written(Uuid::from_u128(2), 2, 100);
    p.written(Uuid::from_u128(3), 2, 300);
    assert_eq!(p.fail_largest_written(2), Some(Uuid::from_u128(3)));
    let err = rxs[2].try_recv().unwrap().unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::TooLarge));
    assert_eq!(err.status(), Some(413));
    assert!(rxs[0].try_recv().is_err() && rxs[1].try_recv().is_err());
    assert_eq!(p.fail_largest_written(7), None);
    assert_eq!(p.len(), 2);
}
