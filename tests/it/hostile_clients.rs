//! Clients that misbehave on the WebSocket: stop reading, flood control frames, send frames the
//! server must answer by id, send invalid UTF-8. Each test failed on the code before its fix.

use crate::raw::{self, connect, next_close, next_of, post, register, send_json, RawSession, Socket};
use anyhow::Context as _;
use base64::Engine as _;
use futures_util::SinkExt as _;
use parley_tests::TestServer;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

/// A WebSocket client with a tiny receive buffer that reads `hello` … `caught_up` and then
/// never reads (nor writes) again: the server's writes to it stall.
async fn stalled_reader(server: &TestServer, session: &RawSession) -> anyhow::Result<Socket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let stream = socket.connect(server.addr).await?;
    let url = format!("{}/v1/ws?since=0", server.base_url.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", session.token).parse()?);
    let (mut ws, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream)).await.context("upgrade")?;
    next_of(&mut ws, "caught_up", T).await?;
    Ok(ws)
}

/// Sends `count` messages of `size` ciphertext bytes from `from` to `to` (one device each) over
/// HTTP, `parallel` at a time; returns their server ids in order of sending.
async fn send_many(
    server: &TestServer,
    from: &RawSession,
    to: &RawSession,
    count: usize,
    size: usize,
) -> anyhow::Result<Vec<u64>> {
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(vec![7u8; size]);
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let request = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": to.user_id,
            "envelopes": [{"user": to.user_id, "device": to.device_id, "ciphertext": ciphertext}]});
        let (status, body) = post(&server.base_url, "/v1/send", Some(&from.token), &request).await?;
        anyhow::ensure!(status == 200, "send: {status} {body}");
        ids.push(body["server_msg_id"].as_u64().context("server_msg_id")?);
    }
    Ok(ids)
}

/// Reads events on a fresh connection until `ids` all arrived; fails on a duplicate, on an
/// event out of order, or on anything but these messages.
async fn receive_exactly(socket: &mut Socket, ids: &[u64]) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    let mut last_seq = 0;
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let frame = next_of(socket, "event", T).await?;
        let seq = frame["seq"].as_u64().context("seq")?;
        anyhow::ensure!(seq > last_seq, "event {seq} after {last_seq}");
        last_seq = seq;
        let id = frame["event"]["id"].as_u64().context("message id")?;
        anyhow::ensure!(seen.insert(id), "message {id} delivered twice");
        got.push(id);
    }
    anyhow::ensure!(got == ids, "messages out of order or unexpected");
    Ok(())
}

fn rss_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).context("no such field")?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_resumes_from_its_cursor() -> anyhow::Result<()> {
    let server = TestServer::start_with(
        "[presence]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 3000\n\
         [limits]\nws_write_timeout_ms = 2000\nws_unsent_bytes = 262144\n",
    )
    .await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let stalled = stalled_reader(&server, &bob).await?;
    // Far more than the socket buffers hold: the server's writes to bob stall.
    let ids = send_many(&server, &alice, &bob, 200, 64 * 1024).await?;
    // Closed within heartbeat timeout + write deadline (3 s + 2 s), with room for a slow machine.
    server.wait_for_log(&["closed the connection", &bob.device_id], Duration::from_secs(15)).await?;
    drop(stalled);
    // Nothing was acknowledged: the device gets every message once, in order.
    let mut socket = connect(&server.base_url, &bob.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    receive_exactly(&mut socket, &ids).await
}

#[tokio::test]
async fn a_stalled_connection_is_replaced_by_the_same_device() -> anyhow::Result<()> {
    // Heartbeats would take a minute: only the replacement can end the stalled connection.
    let server = TestServer::start_with(
        "[presence]\nheartbeat_interval_ms = 20000\nheartbeat_timeout_ms = 60000\n\
         [limits]\nws_write_timeout_ms = 2000\nws_unsent_bytes = 262144\n",
    )
    .await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let _stalled = stalled_reader(&server, &bob).await?;
    let ids = send_many(&server, &alice, &bob, 100, 64 * 1024).await?;
    let mut socket = connect(&server.base_url, &bob.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    receive_exactly(&mut socket, &ids).await?;
    server.wait_for_log(&["closed the connection", &bob.device_id, "replaced"], Duration::from_secs(15)).await?;
    Ok(())
}

/// Clients stop reading while each is sent far more than its budget and than the kernel's
/// socket buffers hold (~4 MiB here): the server's memory grows by less than the server-wide
/// budget of unsent bytes, and every client, once back, gets every event once and in order.
/// CI runs 10 clients × 200 events of 64 KiB (12.5 MiB each); the full scale is
/// `PARLEY_SLOW_READERS=100 PARLEY_SLOW_READER_EVENTS=1000`.
#[tokio::test]
async fn slow_readers_hold_no_more_memory_than_the_outgoing_budget() -> anyhow::Result<()> {
    let clients: usize = std::env::var("PARLEY_SLOW_READERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let events: usize = std::env::var("PARLEY_SLOW_READER_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let budget_mib = 32;
    // A process: its memory is measured. Without transparent huge pages, which mimalloc asks
    // for on its arenas: with them the first touch of an arena's 2 MiB region counts 2 MiB,
    // and the growth measured was 26-35 MiB for ~5 MiB of data (AnonHugePages 32 MiB), the
    // allocator's rounding rather than what the connections hold.
    let mut server = TestServer::prepare(&format!(
        "[presence]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 3000\n\
         [limits]\nws_write_timeout_ms = 2000\nws_unsent_bytes = 65536\nws_max_unsent_bytes = 262144\n\
         ws_unsent_bytes_total = {}\n",
        budget_mib * 1024 * 1024
    ))?
    .with_env("MIMALLOC_ALLOW_THP", "0");
    server.restart().await?;
    let pid = server.pid().context("pid")?;
    let alice = register(&server.base_url, "alice").await?;
    let mut readers = Vec::new();
    for i in 0..clients {
        let session = register(&server.base_url, &format!("reader{i}")).await?;
        let socket = stalled_reader(&server, &session).await?;
        readers.push((session, socket));
    }
    // The memory the process allocated (anonymous RSS: heap, buffers), sampled while the
    // events are sent; file and shared mappings (SQLite's WAL index grows with the WAL) are
    // reported but not counted.
    let baseline = rss_kib(pid, "RssAnon:")?;
    let baseline_total = rss_kib(pid, "VmRSS:")?;
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?; // VmHWM := VmRSS
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            tokio::select! {
                _ = &mut stopped => return peak,
                _ = every.tick() => peak = peak.max(rss_kib(pid, "RssAnon:").unwrap_or(0)),
            }
        }
    });
    let mut sent = Vec::new();
    for chunk in readers.chunks(10) {
        let sends = chunk.iter().map(|(to, _)| send_many(&server, &alice, to, events, 64 * 1024));
        sent.extend(futures_util::future::try_join_all(sends).await?);
    }
    let _ = stop.send(());
    let peak = sampler.await?.max(rss_kib(pid, "RssAnon:")?);
    let peak_total = rss_kib(pid, "VmHWM:")?;
    let growth_mib = peak.saturating_sub(baseline) as f64 / 1024.0;
    eprintln!(
        "{clients} stalled clients × {events} events of 64 KiB: anonymous RSS {} → peak {} MiB (+{growth_mib:.1} MiB; \
         budget {budget_mib} MiB); whole RSS {} → peak {} MiB",
        baseline / 1024,
        peak / 1024,
        baseline_total / 1024,
        peak_total / 1024,
    );
    assert!(growth_mib < budget_mib as f64, "RSS grew by {growth_mib:.1} MiB, more than the {budget_mib} MiB budget");
    for ((session, stalled), ids) in readers.into_iter().zip(sent) {
        drop(stalled);
        let mut socket = connect(&server.base_url, &session.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
        receive_exactly(&mut socket, &ids).await?;
        socket.close(None).await?;
    }
    Ok(())
}

#[tokio::test]
async fn acks_and_pings_pass_when_the_device_is_throttled() -> anyhow::Result<()> {
    let server = TestServer::start_with("[rate_limits]\ndevice_per_second = 1\ndevice_burst = 8\n").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut alice_socket = connect(&server.base_url, &alice.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    next_of(&mut alice_socket, "caught_up", T).await?;
    let mut bob_socket = connect(&server.base_url, &bob.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    next_of(&mut bob_socket, "caught_up", T).await?;
    let ids = send_many(&server, &alice, &bob, 3, 16).await?;
    let mut last = 0;
    for _ in &ids {
        last = next_of(&mut bob_socket, "event", T).await?["seq"].as_u64().context("seq")?;
    }
    // Bob exhausts his device budget with typing notices (the accepted ones get no answer).
    for _ in 0..20 {
        send_json(&mut bob_socket, &json!({"type": "typing", "to": alice.user_id, "typing": true})).await?;
    }
    let frame = next_of(&mut bob_socket, "error", T).await?;
    assert_eq!(frame["code"], "rate_limited", "{frame}");
    // His ack and ping still go through: the ping is answered, and the ack produces alice's
    // delivered receipt. (The typing flood's other refusals come first.)
    send_json(&mut bob_socket, &json!({"type": "ack", "seq": last})).await?;
    send_json(&mut bob_socket, &json!({"type": "ping", "nonce": 5})).await?;
    let pong = next_of(&mut bob_socket, "pong", T).await?;
    assert_eq!(pong["nonce"], 5);
    let receipt = next_of(&mut alice_socket, "event", T).await?;
    assert_eq!(receipt["event"]["type"], "receipt", "{receipt}");
    assert_eq!(receipt["event"]["kind"], "delivered");
    Ok(())
}

#[tokio::test]
async fn errors_echo_the_id_of_the_frame_they_answer() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    next_of(&mut socket, "caught_up", T).await?;
    let frames = [
        (json!({"type": "read", "peer": "@nobody:localhost", "message_ids": [1], "id": 11}), "unknown_user"),
        (json!({"type": "read", "peer": "@nobody:localhost", "message_ids": [], "id": 12}), "bad_request"),
        (json!({"type": "typing", "to": "@nobody:localhost", "typing": true, "id": 13}), "unknown_user"),
        (json!({"type": "ack", "id": 14}), "bad_frame"),
        (json!({"type": "ping", "nonce": "x", "id": 15}), "bad_frame"),
    ];
    for (frame, code) in &frames {
        send_json(&mut socket, frame).await?;
        let error = next_of(&mut socket, "error", T).await?;
        assert_eq!((&error["id"], error["code"].as_str()), (&frame["id"], Some(*code)), "answer to {frame}: {error}");
    }
    // A send's error still carries its client_msg_id, even when the frame is malformed.
    let id = uuid::Uuid::new_v4();
    send_json(&mut socket, &json!({"type": "send", "client_msg_id": id, "to": "not a user"})).await?;
    let error = next_of(&mut socket, "error", T).await?;
    assert_eq!((error["client_msg_id"].as_str(), error["code"].as_str()), (Some(id.to_string().as_str()), Some("bad_frame")));
    Ok(())
}

#[tokio::test]
async fn a_text_frame_with_invalid_utf8_is_closed_with_1007() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    next_of(&mut socket, "caught_up", T).await?;
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    socket.send(Message::Frame(frame)).await?;
    let (code, _) = next_close(&mut socket, T).await?;
    assert_eq!(code, 1007);
    // Others are served as before.
    let bob = raw::register(&server.base_url, "bob").await?;
    let mut other = connect(&server.base_url, &bob.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    next_of(&mut other, "caught_up", T).await?;
    send_json(&mut other, &json!({"type": "ping", "nonce": 1})).await?;
    assert_eq!(next_of(&mut other, "pong", T).await?["nonce"], 1);
    Ok(())
}
