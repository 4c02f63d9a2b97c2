//! Drives [`Connection`] against a scripted fake WebSocket server: hello, backlog, acks,
//! dedupe, reconnect with resume, re-sent sends, rate-limit retries, heartbeats and a refused
//! token. The real server is tested end to end elsewhere.

// The handshake callback's error type is fixed by tungstenite.
#![allow(clippy::result_large_err)]

use futures_util::{SinkExt, StreamExt};
use parley_sdk::{ConnectOptions, Connection, DeviceId, Error, ErrorCode, Event, Events, Seq, ServerMsgId, Session, UserId};
use parley_spec::v1::ws::ClientFrame;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    tungstenite::{
        handshake::server::{ErrorResponse, Request, Response},
        http::StatusCode,
        protocol::{frame::coding::CloseCode, CloseFrame},
        Message,
    },
    WebSocketStream,
};

const WAIT: Duration = Duration::from_secs(5);

struct FakeServer {
    listener: TcpListener,
}

struct FakeConn {
    ws: WebSocketStream<TcpStream>,
    since: u64,
    auth: Option<String>,
}

impl FakeServer {
    async fn start() -> Self {
        Self { listener: TcpListener::bind("127.0.0.1:0").await.unwrap() }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.listener.local_addr().unwrap())
    }

    fn session(&self) -> Session {
        Session::new(self.base_url(), alice(), DeviceId::parse("ADEV").unwrap(), "tok")
    }

    async fn accept(&self) -> FakeConn {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept()).await.unwrap().unwrap();
        let mut seen = (0, None);
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            assert_eq!(req.uri().path(), "/v1/ws");
            let query = req.uri().query().unwrap_or_default();
            seen.0 = query.strip_prefix("since=").and_then(|s| s.parse().ok()).unwrap();
            seen.1 = req.headers().get("authorization").map(|v| v.to_str().unwrap().to_owned());
            Ok(resp)
        })
        .await
        .unwrap();
        FakeConn { ws, since: seen.0, auth: seen.1 }
    }

    async fn reject(&self, status: u16, body: Value) {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept()).await.unwrap().unwrap();
        let _ = tokio_tungstenite::accept_hdr_async(tcp, move |_: &Request, _: Response| {
            let mut err = ErrorResponse::new(Some(body.to_string()));
            *err.status_mut() = StatusCode::from_u16(status).unwrap();
            Err(err)
        })
        .await;
    }
}

impl FakeConn {
    async fn send(&mut self, frame: Value) {
        self.ws.send(Message::text(frame.to_string())).await.unwrap();
    }

    async fn hello(&mut self, interval_ms: u64) {
        let hello = json!({"type": "hello", "user_id": "@alice:x.org", "device_id": "ADEV",
            "heartbeat_interval_ms": interval_ms, "heartbeat_timeout_ms": interval_ms * 3});
        self.send(hello).await;
    }

    async fn message(&mut self, seq: u64, id: u64) {
        let event = json!({"type": "event", "seq": seq, "event": {"type": "message", "id": id,
            "sender": "@bob:x.org", "sender_device": "BDEV", "to": "@alice:x.org", "ts": 1,
            "ciphertext": "aGk="}});
        self.send(event).await;
    }

    /// The next client frame that is not a ping.
    async fn recv(&mut self) -> ClientFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.unwrap().unwrap().unwrap();
            if let Message::Text(text) = msg {
                let frame: ClientFrame = serde_json::from_str(text.as_str()).unwrap();
                if !matches!(frame, ClientFrame::Ping(_)) {
                    return frame;
                }
            }
        }
    }
}

fn alice() -> UserId {
    UserId::parse("@alice:x.org").unwrap()
}

fn bob() -> UserId {
    UserId::parse("@bob:x.org").unwrap()
}

fn sent(id: impl std::fmt::Display, server_msg_id: u64) -> Value {
    json!({"type": "sent", "client_msg_id": id.to_string(), "server_msg_id": server_msg_id, "ts": 5})
}

async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap()
}

fn fast() -> ConnectOptions {
    ConnectOptions { min_backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(50), ..Default::default() }
}

/// Opens a connection and answers its upgrade with a hello.
async fn open(server: &FakeServer, interval_ms: u64) -> (Connection, Events, FakeConn) {
    let session = server.session();
    let (opened, c) = tokio::join!(Connection::open(&session, fast()), async {
        let mut c = server.accept().await;
        c.hello(interval_ms).await;
        c
    });
    let (conn, events) = opened.unwrap();
    (conn, events, c)
}

#[tokio::test]
async fn backlog_acks_reconnect_resend_and_dedupe() {
    let server = FakeServer::start().await;
    let (conn, mut events, mut c1) = open(&server, 10_000).await;
    assert_eq!(c1.since, 0);
    assert_eq!(c1.auth.as_deref(), Some("Bearer tok"));
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });

    c1.message(1, 100).await;
    c1.message(2, 101).await;
    c1.send(json!({"type": "caught_up", "cursor": 2})).await;
    assert!(matches!(next(&mut events).await, Event::Message(m) if m.id == ServerMsgId::new(100)));
    assert!(matches!(next(&mut events).await, Event::Message(m) if m.id == ServerMsgId::new(101) && m.ciphertext.0 == b"hi"));
    assert_eq!(next(&mut events).await, Event::CaughtUp { cursor: Seq::new(2) });
    assert_eq!(ack_seq(c1.recv().await), 2, "ack after ack_delay");
    assert_eq!(conn.cursor(), Seq::new(2));

    // A send is written, then the connection drops before the answer.
    let sender = conn.clone();
    let send = tokio::spawn(async move { sender.send(bob(), Vec::new()).await });
    let ClientFrame::Send(first) = c1.recv().await else { panic!("expected send") };
    drop(c1);
    assert!(matches!(next(&mut events).await, Event::Disconnected { .. }));

    // The reconnect resumes after 2 and re-sends with the same id.
    let mut c2 = server.accept().await;
    assert_eq!(c2.since, 2);
    c2.hello(10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(2) });
    assert!(conn.is_connected());
    let ClientFrame::Send(again) = c2.recv().await else { panic!("expected re-send") };
    assert_eq!(again.client_msg_id, first.client_msg_id);
    c2.send(sent(again.client_msg_id, 77)).await;
    let answer = tokio::time::timeout(WAIT, send).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.server_msg_id, ServerMsgId::new(77));

    // Old and repeated events are dropped, but still acknowledged.
    c2.message(2, 101).await;
    c2.message(3, 101).await;
    c2.message(4, 102).await;
    assert!(matches!(next(&mut events).await, Event::Message(m) if m.id == ServerMsgId::new(102)));
    assert_eq!(ack_seq(c2.recv().await), 4);
    assert_eq!(conn.cursor(), Seq::new(4));

    // Graceful close: the stream ends, later sends fail.
    let other = conn.clone();
    c2.message(5, 103).await;
    assert!(matches!(next(&mut events).await, Event::Message(m) if m.id == ServerMsgId::new(103)));
    let closing = tokio::spawn(conn.close());
    assert_eq!(ack_seq(c2.recv().await), 5, "final ack");
    let close = tokio::time::timeout(WAIT, c2.ws.next()).await.unwrap();
    assert!(matches!(close, Some(Ok(Message::Close(_))) | None));
    drop(c2);
    tokio::time::timeout(WAIT, closing).await.unwrap().unwrap();
    assert!(tokio::time::timeout(WAIT, events.next()).await.unwrap().is_none());
    assert!(!other.is_connected());
    assert!(matches!(other.send(bob(), Vec::new()).await, Err(Error::Closed)));
}

#[tokio::test]
async fn rate_limited_send_is_retried_and_other_errors_fail() {
    let server = FakeServer::start().await;
    let (conn, _events, mut c) = open(&server, 10_000).await;
    let sender = conn.clone();
    let send = tokio::spawn(async move { sender.send(bob(), Vec::new()).await });
    let ClientFrame::Send(req) = c.recv().await else { panic!("expected send") };
    c.send(json!({"type": "error", "client_msg_id": req.client_msg_id.to_string(),
        "code": "rate_limited", "message": "slow down", "retry_after_ms": 30}))
        .await;
    let ClientFrame::Send(retry) = c.recv().await else { panic!("expected retry") };
    assert_eq!(retry.client_msg_id, req.client_msg_id);
    c.send(sent(retry.client_msg_id, 9)).await;
    assert_eq!(tokio::time::timeout(WAIT, send).await.unwrap().unwrap().unwrap().server_msg_id, ServerMsgId::new(9));

    let sender = conn.clone();
    let send = tokio::spawn(async move { sender.send(bob(), Vec::new()).await });
    let ClientFrame::Send(req) = c.recv().await else { panic!("expected send") };
    c.send(json!({"type": "error", "client_msg_id": req.client_msg_id.to_string(),
        "code": "devices_mismatch", "message": "no", "devices": {"missing": [{"user": "@bob:x.org", "device": "BDEV"}], "extra": []}}))
        .await;
    let err = tokio::time::timeout(WAIT, send).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::DevicesMismatch));
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.body().unwrap().devices.as_ref().unwrap().missing.len(), 1);
}

#[tokio::test]
async fn idle_connection_pings() {
    let server = FakeServer::start().await;
    let (_conn, _events, mut c) = open(&server, 200).await;
    let started = tokio::time::Instant::now();
    let msg = tokio::time::timeout(WAIT, c.ws.next()).await.unwrap().unwrap().unwrap();
    let frame: ClientFrame = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert!(matches!(frame, ClientFrame::Ping(_)));
    assert!(started.elapsed() < Duration::from_millis(400), "{:?}", started.elapsed());
}

#[tokio::test]
async fn refused_token_fails_open_and_stops_reconnecting() {
    let server = FakeServer::start().await;
    let body = json!({"code": "unknown_token", "message": "who are you"});
    let session = server.session();
    let (opened, ()) = tokio::join!(Connection::open(&session, fast()), server.reject(401, body.clone()));
    let err = opened.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert_eq!(err.server_code(), Some(ErrorCode::UnknownToken));

    // Token revoked while connected: one Disconnected for the loss, one saying it is final.
    let (conn, mut events, mut c) = open(&server, 10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });
    c.ws.close(None).await.unwrap();
    assert!(matches!(next(&mut events).await, Event::Disconnected { .. }));
    server.reject(401, body).await;
    assert!(matches!(next(&mut events).await, Event::Disconnected { reason } if reason.contains("unknown_token")));
    assert!(tokio::time::timeout(WAIT, events.next()).await.unwrap().is_none());
    assert!(matches!(conn.typing(bob(), true).await, Err(Error::Closed)));
}

#[tokio::test]
async fn reconnects_after_connection_refused() {
    let server = FakeServer::start().await;
    let addr = server.listener.local_addr().unwrap();
    let (conn, mut events, c) = open(&server, 10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });
    drop(server);
    drop(c);
    assert!(matches!(next(&mut events).await, Event::Disconnected { .. }));
    assert!(matches!(conn.typing(bob(), true).await, Err(Error::NotConnected)));
    // Two reconnect attempts fail (accepted and dropped at once), then the server is back.
    let failing = TcpListener::bind(addr).await.unwrap();
    for _ in 0..2 {
        let (socket, _) = tokio::time::timeout(WAIT, failing.accept()).await.expect("a reconnect attempt").unwrap();
        drop(socket);
    }
    drop(failing);
    let server = FakeServer { listener: TcpListener::bind(addr).await.unwrap() };
    let mut c = server.accept().await;
    c.hello(10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });
    let ids = vec![ServerMsgId::new(1), ServerMsgId::new(2)];
    conn.read(bob(), ids.clone()).await.unwrap();
    assert!(matches!(c.recv().await, ClientFrame::Read(r) if r.message_ids == ids));
}

#[tokio::test]
async fn replaced_connection_does_not_fight_back() {
    let server = FakeServer::start().await;
    let (conn, mut events, mut c) = open(&server, 10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });
    let close = CloseFrame { code: CloseCode::Policy, reason: "replaced by a newer connection".into() };
    c.ws.close(Some(close)).await.unwrap();
    assert!(matches!(next(&mut events).await, Event::Disconnected { reason } if reason.contains("replaced")));
    assert!(tokio::time::timeout(WAIT, events.next()).await.unwrap().is_none());
    assert!(!conn.is_connected());
    assert!(tokio::time::timeout(Duration::from_millis(200), server.listener.accept()).await.is_err(), "no reconnect");
}

#[tokio::test]
async fn oversized_send_fails_instead_of_looping() {
    let server = FakeServer::start().await;
    let (conn, mut events, mut c) = open(&server, 10_000).await;
    assert_eq!(next(&mut events).await, Event::Connected { cursor: Seq::new(0) });
    let (small, big) = (conn.clone(), conn.clone());
    let small = tokio::spawn(async move { small.send(bob(), Vec::new()).await });
    let ClientFrame::Send(first) = c.recv().await else { panic!("expected send") };
    let envelope = parley_sdk::Envelope::new(bob(), DeviceId::parse("BDEV").unwrap(), vec![7; 4096]);
    let big = tokio::spawn(async move { big.send(bob(), vec![envelope]).await });
    let ClientFrame::Send(_) = c.recv().await else { panic!("expected send") };
    c.ws.close(Some(CloseFrame { code: CloseCode::Size, reason: "too_large".into() })).await.unwrap();
    let err = tokio::time::timeout(WAIT, big).await.unwrap().unwrap().unwrap_err();
    assert_eq!(err.server_code(), Some(ErrorCode::TooLarge));
    // The small one is re-sent on the next connection and answered there.
    let mut c2 = server.accept().await;
    c2.hello(10_000).await;
    let ClientFrame::Send(again) = c2.recv().await else { panic!("expected re-send") };
    assert_eq!(again.client_msg_id, first.client_msg_id);
    c2.send(sent(again.client_msg_id, 3)).await;
    assert_eq!(tokio::time::timeout(WAIT, small).await.unwrap().unwrap().unwrap().server_msg_id, ServerMsgId::new(3));
}

#[tokio::test]
async fn pipelined_sends_resolve_out_of_order() {
    let server = FakeServer::start().await;
    let (conn, _events, mut c) = open(&server, 10_000).await;
    let sends: Vec<_> = (0..200)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.send(bob(), Vec::new()).await })
        })
        .collect();
    let mut ids = Vec::new();
    while ids.len() < 200 {
        if let ClientFrame::Send(req) = c.recv().await {
            ids.push(req.client_msg_id);
        }
    }
    for (n, id) in ids.iter().enumerate().rev() {
        c.send(sent(id, n as u64 + 1)).await;
    }
    let mut got: Vec<u64> = Vec::new();
    for send in sends {
        got.push(tokio::time::timeout(WAIT, send).await.unwrap().unwrap().unwrap().server_msg_id.get());
    }
    got.sort_unstable();
    assert_eq!(got, (1..=200).collect::<Vec<u64>>());
}

#[tokio::test]
async fn send_timeout_gives_up() {
    let server = FakeServer::start().await;
    let session = server.session();
    let opts = ConnectOptions { send_timeout: Some(Duration::from_millis(100)), ..fast() };
    let (opened, mut c) = tokio::join!(Connection::open(&session, opts), async {
        let mut c = server.accept().await;
        c.hello(10_000).await;
        c
    });
    let (conn, _events) = opened.unwrap();
    let started = tokio::time::Instant::now();
    assert!(matches!(conn.send(bob(), Vec::new()).await, Err(Error::Timeout)));
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(matches!(c.recv().await, ClientFrame::Send(_)));
}

/// The position of an `ack` frame (whatever its frame id).
fn ack_seq(frame: ClientFrame) -> u64 {
    match frame {
        ClientFrame::Ack(ack) => ack.seq.get(),
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[tokio::test]
async fn group_events_are_surfaced_in_order_and_acknowledged_only_when_asked() {
    let server = FakeServer::start().await;
    let (conn, mut events, mut c) = open(&server, 10_000).await;
    assert!(matches!(next(&mut events).await, Event::Connected { .. }));
    for seq in [1, 2] {
        c.send(json!({"type": "group_event", "group_id": "!g:x.org", "group_seq": seq, "epoch": 0,
            "kind": "application", "sender": "@bob:x.org", "sender_device": "BDEV",
            "client_msg_id": "00000000-0000-0000-0000-000000000001", "message": "aGk=", "ts": 1}))
            .await;
    }
    c.send(json!({"type": "keypackages_low", "count": 3})).await;
    c.send(json!({"type": "caught_up", "cursor": 0})).await;
    for seq in [1, 2] {
        let Event::GroupEvent(event) = next(&mut events).await else { panic!("expected a group event") };
        assert_eq!((event.group_id.as_str(), event.group_seq.get()), ("!g:x.org", seq));
    }
    assert_eq!(next(&mut events).await, Event::KeyPackagesLow { count: 3 });
    assert!(matches!(next(&mut events).await, Event::CaughtUp { .. }));
    // Nothing is acknowledged for groups until the application says so.
    conn.group_ack(parley_sdk::spec::GroupId::parse("!g:x.org").unwrap(), parley_sdk::spec::GroupSeq::new(2));
    let ClientFrame::GroupAck(ack) = c.recv().await else { panic!("expected a group_ack") };
    assert_eq!((ack.group_id.as_str(), ack.group_seq.get()), ("!g:x.org", 2));
}
