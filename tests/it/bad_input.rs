//! Bad input: every kind gets its typed error, and the server keeps serving everyone else.

use crate::raw::{self, connect, get, next_close, next_json, next_of, post, register, send_json, send_text};
use base64::Engine as _;
use parley_tests::TestServer;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(10);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The server still answers a healthy client: register, connect and ping.
async fn still_serving(server: &TestServer) -> anyhow::Result<()> {
    let name = format!("healthy{}", uuid::Uuid::new_v4().simple().to_string()[..8].to_owned());
    let session = register(&server.base_url, &name).await?;
    let mut socket = connect(&server.base_url, &session.token, 0).await.map_err(|s| anyhow::anyhow!("upgrade {s}"))?;
    send_json(&mut socket, &json!({"type": "ping", "nonce": 7})).await?;
    let pong = next_of(&mut socket, "pong", T).await?;
    anyhow::ensure!(pong["nonce"] == 7);
    Ok(())
}

#[tokio::test]
async fn malformed_unknown_and_binary_frames_get_typed_errors() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.unwrap();
    assert_eq!(next_json(&mut socket, T).await?["type"], "hello");

    send_text(&mut socket, "this is not json").await?;
    let error = next_of(&mut socket, "error", T).await?;
    assert_eq!(error["code"], "bad_frame");

    send_json(&mut socket, &json!({"type": "launch_missiles"})).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "unknown_frame");

    send_json(&mut socket, &json!({"type": "ack"})).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "bad_frame");

    socket.send(Message::Binary(vec![0, 1, 2].into())).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "bad_frame");

    // Deeply nested garbage must not blow the stack.
    send_text(&mut socket, &"[".repeat(100_000)).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "bad_frame");

    // The connection is still usable after all of that.
    send_json(&mut socket, &json!({"type": "ping", "nonce": 1})).await?;
    assert_eq!(next_of(&mut socket, "pong", T).await?["nonce"], 1);
    still_serving(&server).await
}

use futures_util::SinkExt as _;

#[tokio::test]
async fn oversized_frames_and_envelopes_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start_with("[limits]\nmax_envelope_bytes = 1000\nmax_devices_per_user = 2\n").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.unwrap();
    next_of(&mut socket, "caught_up", T).await?;

    // An envelope over the limit, in a frame under the frame limit: a typed error for that send.
    let id = uuid::Uuid::new_v4();
    let send = json!({"type": "send", "client_msg_id": id, "to": bob.user_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(&[7u8; 1001])}]});
    send_json(&mut socket, &send).await?;
    let error = next_of(&mut socket, "error", T).await?;
    assert_eq!(error["code"], "too_large");
    assert_eq!(error["client_msg_id"], id.to_string());

    // The same over HTTP: 413 with the code.
    let (status, body) = post(&server.base_url, "/v1/send", Some(&alice.token), &send).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_json")), "a frame is not a request body: {body}");
    let request = json!({"client_msg_id": id, "to": bob.user_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(&[7u8; 1001])}]});
    let (status, body) = post(&server.base_url, "/v1/send", Some(&alice.token), &request).await?;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));

    // A frame over the frame limit closes the socket with 1009.
    send_text(&mut socket, &"x".repeat(64 * 1024)).await?;
    let (code, reason) = next_close(&mut socket, T).await?;
    assert_eq!((code, reason.as_str()), (1009, "too_large"));

    // An HTTP body over the limit.
    let huge = json!({"username": "x".repeat(100_000), "password": "correct horse"});
    let (status, body) = post(&server.base_url, "/v1/register", None, &huge).await?;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
    still_serving(&server).await
}

#[tokio::test]
async fn wrong_missing_and_revoked_tokens_are_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let (status, body) = get(&server.base_url, "/v1/whoami", None).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("missing_token")));
    let (status, body) = get(&server.base_url, "/v1/whoami", Some("pt_not-a-real-token")).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("unknown_token")));
    assert_eq!(connect(&server.base_url, "pt_wrong", 0).await.err(), Some(401));

    // Revoke the second device: its token stops working at once and its socket is closed.
    let second = raw::login(&server.base_url, "alice").await?;
    let mut socket = connect(&server.base_url, &second.token, 0).await.unwrap();
    next_of(&mut socket, "caught_up", T).await?;
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/devices/{}", server.base_url, second.device_id))
        .bearer_auth(&alice.token)
        .json(&json!({"password": "wrong password"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 401, "wrong password must not remove a device");
    let response = reqwest::Client::new()
        .delete(format!("{}/v1/devices/{}", server.base_url, second.device_id))
        .bearer_auth(&alice.token)
        .json(&json!({"password": "correct horse"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 204);
    let (code, reason) = next_close(&mut socket, T).await?;
    assert_eq!((code, reason.as_str()), (1008, "device removed"));
    let (status, body) = get(&server.base_url, "/v1/whoami", Some(&second.token)).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("unknown_token")));
    assert_eq!(connect(&server.base_url, &second.token, 0).await.err(), Some(401));

    // Logout revokes the caller's own token.
    let (status, _) = post(&server.base_url, "/v1/logout", Some(&alice.token), &json!({})).await?;
    assert_eq!(status, 204);
    let (status, _) = get(&server.base_url, "/v1/whoami", Some(&alice.token)).await?;
    assert_eq!(status, 401);
    still_serving(&server).await
}

#[tokio::test]
async fn sending_as_another_device_or_to_wrong_devices_is_refused() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let alice2 = raw::login(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut bob_socket = connect(&server.base_url, &bob.token, 0).await.unwrap();
    next_of(&mut bob_socket, "caught_up", T).await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.unwrap();
    next_of(&mut socket, "caught_up", T).await?;

    // A frame that claims another sender device is malformed: there is no such field.
    let spoof = json!({"type": "send", "client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id, "sender_device": alice2.device_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(b"x")},
                      {"user": alice.user_id, "device": alice2.device_id, "ciphertext": b64(b"x")}]});
    send_json(&mut socket, &spoof).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "bad_frame");

    // Targeting the sending device itself, leaving out the sender's other device, or a device
    // that does not exist: devices_mismatch naming each.
    let id = uuid::Uuid::new_v4();
    let wrong = json!({"type": "send", "client_msg_id": id, "to": bob.user_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(b"x")},
                      {"user": alice.user_id, "device": alice.device_id, "ciphertext": b64(b"x")},
                      {"user": bob.user_id, "device": "NOSUCHDEVICE", "ciphertext": b64(b"x")}]});
    send_json(&mut socket, &wrong).await?;
    let error = next_of(&mut socket, "error", T).await?;
    assert_eq!(error["code"], "devices_mismatch");
    assert_eq!(error["client_msg_id"], id.to_string());
    assert_eq!(error["devices"]["missing"], json!([{"user": alice.user_id, "device": alice2.device_id}]));
    let extra = error["devices"]["extra"].as_array().unwrap();
    assert_eq!(extra.len(), 2, "{error}");

    // Unknown recipient.
    let nobody = json!({"type": "send", "client_msg_id": uuid::Uuid::new_v4(), "to": "@nobody:localhost", "envelopes": []});
    send_json(&mut socket, &nobody).await?;
    assert_eq!(next_of(&mut socket, "error", T).await?["code"], "unknown_user");

    // Over HTTP the same checks give 409.
    let request = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(b"x")}]});
    let (status, body) = post(&server.base_url, "/v1/send", Some(&alice.token), &request).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("devices_mismatch")));

    // Nothing reached bob: his next frame is the pong to this ping.
    send_json(&mut bob_socket, &json!({"type": "ping", "nonce": 3})).await?;
    let frame = next_json(&mut bob_socket, T).await?;
    assert_eq!(frame["type"], "pong", "bob must have received nothing: {frame}");
    still_serving(&server).await
}

#[tokio::test]
async fn registration_rejects_taken_and_invalid_names_and_respects_mode() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    register(&server.base_url, "alice").await?;
    let attempt = |name: String, password: &'static str| {
        let base = server.base_url.clone();
        async move { post(&base, "/v1/register", None, &json!({"username": name, "password": password})).await }
    };
    let (status, body) = attempt("alice".into(), "correct horse").await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("user_taken")));
    for bad in ["Alice", "al ice", "", "a:b", "@alice", "ünïcode", &"a".repeat(65)] {
        let (status, body) = attempt(bad.to_owned(), "correct horse").await?;
        assert_eq!((status, body["code"].as_str()), (400, Some("invalid_username")), "{bad:?}");
    }
    let (status, body) = attempt("carol".into(), "short").await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_password")));
    for name in ["phone\u{0}", "two\nlines"] {
        let (status, body) = post(
            &server.base_url,
            "/v1/register",
            None,
            &json!({"username": "carol", "password": "correct horse", "device_name": name}),
        )
        .await?;
        assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")), "a device name {name:?}: {body}");
    }
    let (status, body) = post(&server.base_url, "/v1/register", None, &json!({"username": "dave"})).await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_json")));
    let (status, body) =
        post(&server.base_url, "/v1/login", None, &json!({"username": "alice", "password": "wrong password"})).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("wrong_credentials")));
    let (status, body) =
        post(&server.base_url, "/v1/login", None, &json!({"username": "nobody", "password": "wrong password"})).await?;
    assert_eq!((status, body["code"].as_str()), (401, Some("wrong_credentials")));
    still_serving(&server).await?;

    let closed = TestServer::start_with("[registration]\nmode = \"closed\"\n").await?;
    let (status, body) =
        post(&closed.base_url, "/v1/register", None, &json!({"username": "erin", "password": "correct horse"})).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("registration_closed")));
    Ok(())
}

#[tokio::test]
async fn floods_hit_the_rate_limits_and_others_are_unaffected() -> anyhow::Result<()> {
    let server = TestServer::start_with(
        "[rate_limits]\ndevice_per_second = 5\ndevice_burst = 10\ncontrol_per_second = 5\ncontrol_burst = 10\n\
             auth_per_minute = 5\nauth_burst = 20\n",
    )
    .await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.unwrap();
    next_of(&mut socket, "caught_up", T).await?;
    for nonce in 0..50 {
        send_json(&mut socket, &json!({"type": "ping", "nonce": nonce})).await?;
    }
    let mut limited = 0;
    let mut pongs = 0;
    while pongs + limited < 50 {
        let frame = next_json(&mut socket, T).await?;
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited");
                assert!(frame["retry_after_ms"].as_u64().unwrap() > 0);
                limited += 1;
            }
            _ => {}
        }
    }
    assert!(limited >= 30, "{limited} of 50 frames limited");
    // Pings have their own budget (the WebSocket upgrade request used one of the device's).
    assert!(pongs >= 9, "the burst is allowed: {pongs}");

    // Bob, another device, is not affected by alice's flood.
    let (status, _) = get(&server.base_url, "/v1/whoami", Some(&bob.token)).await?;
    assert_eq!(status, 200);

    // Login attempts per IP: a 429 with Retry-After.
    let mut saw_429 = false;
    for _ in 0..40 {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/login", server.base_url))
            .json(&json!({"username": "alice", "password": "wrong password"}))
            .send()
            .await?;
        if response.status().as_u16() == 429 {
            let retry: u64 = response.headers()["retry-after"].to_str()?.parse()?;
            assert!(retry >= 1);
            let body: serde_json::Value = response.json().await?;
            assert_eq!(body["code"], "rate_limited");
            saw_429 = true;
            break;
        }
    }
    assert!(saw_429, "login flood was never limited");
    let (status, _) = get(&server.base_url, "/v1/whoami", Some(&bob.token)).await?;
    assert_eq!(status, 200, "other requests still served");
    Ok(())
}

#[tokio::test]
async fn a_cursor_beyond_the_inbox_end_does_not_silence_the_device() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut socket = connect(&server.base_url, &bob.token, 1_000_000_000).await.unwrap();
    let caught_up = next_of(&mut socket, "caught_up", T).await?;
    assert_eq!(caught_up["cursor"], 0, "clamped to the real end of the inbox");
    let send = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id,
        "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(b"still here")}]});
    let (status, _) = post(&server.base_url, "/v1/send", Some(&alice.token), &send).await?;
    assert_eq!(status, 200);
    let event = next_of(&mut socket, "event", T).await?;
    assert_eq!(event["event"]["ciphertext"], b64(b"still here"));
    // The same over long-poll sync.
    let (status, body) = get(&server.base_url, "/v1/sync?since=999999999&timeout_ms=0", Some(&bob.token)).await?;
    assert_eq!(status, 200);
    assert!(body["cursor"].as_u64().unwrap() < 1000, "{body}");
    Ok(())
}

#[tokio::test]
async fn device_count_is_limited_and_http_floods_get_429() -> anyhow::Result<()> {
    let server =
        TestServer::start_with("[limits]\nmax_devices_per_user = 2\n[rate_limits]\nip_per_second = 5\nip_burst = 20\n").await?;
    register(&server.base_url, "alice").await?;
    raw::login(&server.base_url, "alice").await?;
    let (status, body) =
        post(&server.base_url, "/v1/login", None, &json!({"username": "alice", "password": "correct horse"})).await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("too_many_devices")));
    let mut limited = None;
    for _ in 0..100 {
        let response = reqwest::Client::new().get(format!("{}/v1/whoami", server.base_url)).send().await?;
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("an HTTP flood from one IP is limited");
    assert!(response.headers()["retry-after"].to_str()?.parse::<u64>()? >= 1);
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["code"], "rate_limited");
    // Health checks are not rate limited, so monitoring keeps working during a flood.
    let (status, _) = get(&server.base_url, "/healthz", None).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn a_barrage_of_mutated_and_random_frames_never_breaks_the_server() -> anyhow::Result<()> {
    use rand::{Rng as _, SeedableRng as _};
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut socket = connect(&server.base_url, &alice.token, 0).await.unwrap();
    next_of(&mut socket, "caught_up", T).await?;
    let valid = [
        json!({"type": "send", "client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id,
            "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(b"hello")}]})
        .to_string(),
        json!({"type": "ack", "seq": 3}).to_string(),
        json!({"type": "read", "peer": bob.user_id, "message_ids": [1, 2]}).to_string(),
        json!({"type": "typing", "to": bob.user_id, "typing": true}).to_string(),
        json!({"type": "ping", "nonce": 1}).to_string(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..400 {
        let frame = if rng.gen_bool(0.7) {
            // A valid frame with a few bytes changed (kept valid UTF-8 for a text frame).
            let mut bytes = valid[rng.gen_range(0..valid.len())].clone().into_bytes();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen_range(0x20..0x7f);
            }
            String::from_utf8(bytes)?
        } else {
            (0..rng.gen_range(0..200)).map(|_| char::from(rng.gen_range(0x20u8..0x7f))).collect()
        };
        send_text(&mut socket, &frame).await?;
    }
    // The connection still answers, and the server still serves everyone else.
    send_json(&mut socket, &json!({"type": "ping", "nonce": 424242})).await?;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let frame = next_json(&mut socket, deadline.saturating_duration_since(tokio::time::Instant::now())).await?;
        if frame["type"] == "pong" && frame["nonce"] == 424242 {
            break;
        }
    }
    still_serving(&server).await
}
