//! Push wake-ups against a local HTTPS push service (spec/push.md): one content-free push per
//! burst for an offline device, none for an online one, a gone endpoint dropped, and pushes
//! that wait out a push service outage and a server restart.

use crate::media::{b64, eventually};
use crate::support::{self, Device};
use anyhow::Context as _;
use parley_crypto::push::PushReceiver;
use parley_tests::push::PushService;
use parley_tests::TestServer;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// A server whose pushes go to `service` (trusting its CA), with short delays.
async fn server_for(service: &PushService, dir: &std::path::Path) -> anyhow::Result<TestServer> {
    let ca = dir.join("push-ca.pem");
    std::fs::write(&ca, &service.ca_pem)?;
    TestServer::start_with(&format!(
        "[push]\ndelay_ms = 300\nmin_interval_ms = 0\nretry_min_ms = 100\nretry_max_ms = 400\nallow_private_addresses = true\nextra_ca_file = \"{}\"\n",
        ca.display()
    ))
    .await
}

async fn set_pusher(base: &str, token: &str, body: &Value) -> anyhow::Result<u16> {
    let response = reqwest::Client::new().put(format!("{base}/v1/push")).bearer_auth(token).json(body).send().await?;
    Ok(response.status().as_u16())
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn an_offline_device_gets_one_content_free_push_per_burst_and_an_online_one_none() -> anyhow::Result<()> {
    let service = PushService::start().await?;
    let dir = tempfile::tempdir()?;
    let server = server_for(&service, dir.path()).await?;
    let base = &server.base_url;
    let alice = Device::connect(&support::register(base, "alice").await?).await?;
    let bob = support::register(base, "bob").await?;
    let carol_session = support::register(base, "carol").await?;
    let mut carol = Device::connect(&carol_session).await?;

    // Bob's device registers an endpoint with RFC 8291 keys; carol's without.
    let keys = PushReceiver::generate(&mut rand::thread_rng());
    let pusher =
        json!({"endpoint": service.endpoint("bob"), "keys": {"p256dh": b64(&keys.public_key()), "auth": b64(&keys.auth())}});
    assert_eq!(set_pusher(base, bob.access_token(), &pusher).await?, 204);
    assert_eq!(set_pusher(base, carol_session.access_token(), &json!({"endpoint": service.endpoint("carol")})).await?, 204);
    let (status, stored) = crate::raw::get(base, "/v1/push", Some(bob.access_token())).await?;
    assert_eq!((status, stored["endpoint"].as_str()), (200, Some(service.endpoint("bob").as_str())));
    // Refused: not an https URL, keys that are not a P-256 point (private addresses are
    // allowed on this test server; the unit tests of `push` check that they are refused).
    assert_eq!(set_pusher(base, bob.access_token(), &json!({"endpoint": "ftp://x.example/"})).await?, 400);
    assert_eq!(
        set_pusher(
            base,
            bob.access_token(),
            &json!({"endpoint": service.endpoint("bob"), "keys": {"p256dh": b64(&[4; 65]), "auth": b64(&[0; 16])}})
        )
        .await?,
        400
    );
    assert_eq!(set_pusher(base, bob.access_token(), &pusher).await?, 204);

    // Carol is online: her message is delivered live, no push.
    alice.send_text(&carol_session.user_id, "hello carol").await?;
    assert_eq!(support::text(&carol.next_message().await?), "hello carol");

    // A burst of five to offline bob: one push.
    for i in 0..5 {
        alice.send_text(&bob.user_id, &format!("secret text {i}")).await?;
    }
    let pushes = service.wait_for("bob", 1, WAIT).await?;
    let push = &pushes[0];
    assert_eq!(push.headers.get("content-encoding").map(String::as_str), Some("aes128gcm"));
    assert_eq!(push.headers.get("urgency").map(String::as_str), Some("high"));
    assert!(push.headers.contains_key("ttl"));
    // Signed with the server's VAPID key (RFC 8292), which the app can ask for.
    let (vapid_key, claims) =
        parley_crypto::push::verify_vapid(push.headers.get("authorization").map(String::as_str).unwrap_or_default())
            .context("a valid VAPID authorization")?;
    let (_, published) = crate::raw::get(base, "/v1/push/vapid", Some(bob.access_token())).await?;
    assert_eq!(published["public_key"].as_str(), Some(b64url(&vapid_key).as_str()));
    assert_eq!(claims.aud, format!("https://localhost:{}", service.port));
    assert_eq!(claims.sub, "https://localhost");
    assert!(claims.exp > parley_spec::Timestamp::now().as_millis() / 1000);
    let plaintext = keys.decrypt(&push.body)?;
    assert_eq!(plaintext, b"{\"v\":1}", "a wake-up and nothing else");
    for secret in ["secret", "alice"] {
        assert!(!push.body.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!push.headers.values().any(|v| v.contains(secret)), "no sender or text in headers");
    }

    // A later message is a new burst: one more push, and only one for the first burst.
    alice.send_text(&bob.user_id, "later").await?;
    service.wait_for("bob", 2, WAIT).await?;
    // Carol's device, online all along, got none (her messages came before bob's bursts).
    assert!(service.received_for("carol").is_empty(), "no push for an online device");
    // Once bob connects, his messages are there; a message while he is online pushes nothing.
    let mut bob_device = Device::connect(&bob).await?;
    alice.send_text(&bob.user_id, "while online").await?;
    loop {
        if support::text(&bob_device.next_message().await?) == "while online" {
            break;
        }
    }
    // Carol goes offline and is messaged: her push arrives; bob's count is still two.
    drop(carol);
    eventually("carol is offline", || async {
        let (_, presence) =
            crate::raw::get(base, &format!("/v1/presence/{}", carol_session.user_id), Some(bob.access_token())).await?;
        Ok(presence["status"] == "offline")
    })
    .await?;
    alice.send_text(&carol_session.user_id, "carol, are you there?").await?;
    let carol_pushes = service.wait_for("carol", 1, WAIT).await?;
    assert!(carol_pushes[0].body.is_empty(), "without keys the wake-up is empty");
    assert_eq!(service.received_for("bob").len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_gone_endpoint_is_dropped_and_pushes_wait_out_an_outage_and_a_restart() -> anyhow::Result<()> {
    let mut service = PushService::start().await?;
    let dir = tempfile::tempdir()?;
    let mut server = server_for(&service, dir.path()).await?;
    let base = server.base_url.clone();
    let alice = Device::connect(&support::register(&base, "alice").await?).await?;
    let bob = support::register(&base, "bob").await?;
    let carol = support::register(&base, "carol").await?;
    assert_eq!(set_pusher(&base, bob.access_token(), &json!({"endpoint": service.endpoint("bob")})).await?, 204);
    assert_eq!(set_pusher(&base, carol.access_token(), &json!({"endpoint": service.endpoint("carol")})).await?, 204);

    // The service says bob's endpoint is gone: the registration goes.
    service.answer(410);
    alice.send_text(&bob.user_id, "one").await?;
    service.wait_for("bob", 1, WAIT).await?;
    eventually("bob's registration is dropped", || async {
        Ok(crate::raw::get(&base, "/v1/push", Some(bob.access_token())).await?.0 == 404)
    })
    .await?;
    service.answer(201);

    // The service is down: carol's push is retried until it is back.
    service.stop();
    alice.send_text(&carol.user_id, "during the outage").await?;
    alice.send_text(&bob.user_id, "two").await?;
    eventually("a push failed", || async { Ok(server.counter("push_failures").await? >= 1) }).await?;
    service.restart().await?;
    service.wait_for("carol", 1, WAIT).await?;

    // Down again, with a pending push, across a server restart: it arrives after both are back.
    service.stop();
    alice.send_text(&carol.user_id, "before the restart").await?;
    let failures = server.counter("push_failures").await?;
    eventually("the new push failed", || async { Ok(server.counter("push_failures").await? > failures) }).await?;
    drop(alice);
    server.stop().await?;
    server.restart().await?;
    service.restart().await?;
    service.wait_for("carol", 2, WAIT).await?;
    assert!(service.received_for("bob").len() == 1, "no push after the registration was dropped");
    Ok(())
}

#[tokio::test]
async fn an_offline_group_member_is_woken_by_a_group_message() -> anyhow::Result<()> {
    use parley_sdk::messenger::{Messenger, MessengerEvent};
    let service = PushService::start().await?;
    let dir = tempfile::tempdir()?;
    let server = server_for(&service, dir.path()).await?;
    let base = &server.base_url;
    let (alice, _alice_events, _) = Messenger::register(base, &dir.path().join("alice.db"), "alice", support::PASSWORD).await?;
    let (bob, mut bob_events, _) = Messenger::register(base, &dir.path().join("bob.db"), "bob", support::PASSWORD).await?;
    let bob_session = bob.session().clone();
    let (group, _) = alice.create_group("Team", std::slice::from_ref(&bob_session.user_id)).await?;
    crate::e2ee::next(&mut bob_events, |e| matches!(e, MessengerEvent::GroupJoined { .. }).then_some(())).await?;
    assert_eq!(set_pusher(base, bob_session.access_token(), &json!({"endpoint": service.endpoint("bob")})).await?, 204);

    // Bob's app closes; a group text wakes his device.
    bob.close().await;
    drop(bob_events);
    drop(bob);
    eventually("bob is offline", || async {
        let (_, presence) =
            crate::raw::get(base, &format!("/v1/presence/{}", bob_session.user_id), Some(bob_session.access_token())).await?;
        Ok(presence["status"] == "offline")
    })
    .await?;
    alice.send_group_text(&group, "team meeting at ten").await?;
    let pushes = service.wait_for("bob", 1, WAIT).await?;
    assert!(pushes[0].body.is_empty(), "no content");
    Ok(())
}

#[tokio::test]
async fn a_push_service_that_asks_to_wait_is_not_retried_before_it_said() -> anyhow::Result<()> {
    let service = PushService::start().await?;
    let dir = tempfile::tempdir()?;
    let server = server_for(&service, dir.path()).await?;
    let base = server.base_url.clone();
    let alice = Device::connect(&support::register(&base, "alice").await?).await?;
    let bob = support::register(&base, "bob").await?;
    assert_eq!(set_pusher(&base, bob.access_token(), &json!({"endpoint": service.endpoint("bob")})).await?, 204);

    // 429 with Retry-After: 2. The backoff alone (100–400 ms here) would try again sooner.
    service.answer_retry_after(429, Some(2));
    alice.send_text(&bob.user_id, "one").await?;
    service.wait_for("bob", 1, WAIT).await?;
    let refused_at = std::time::Instant::now();
    service.answer(201);
    service.wait_for("bob", 2, WAIT).await?;
    let waited = refused_at.elapsed();
    assert!(waited >= Duration::from_millis(1500), "retried after {waited:?}, before the 2 s the service asked for");
    eventually("the retried push is counted as sent", || async { Ok(server.counter("pushes_sent").await? == 1) }).await?;
    Ok(())
}
