//! Federation between real `parleyd` processes: discovery through a real DNS server (SRV) and
//! `.well-known`, HTTPS with a private CA, E2EE chat across servers with receipts, typing and
//! presence; and the durable queue under faults (destination down, sender killed, cut
//! connections).

use crate::e2ee::next;
use crate::support::{self, Device};
use anyhow::Context as _;
use parley_sdk::messenger::{Messenger, MessengerEvent, MessengerEvents};
use parley_sdk::{Event, ServerMsgId};
use parley_tests::fednet::{Discovery, FedNet};
use parley_tests::TestServer;
use std::time::Duration;

async fn next_text(events: &mut MessengerEvents) -> anyhow::Result<(String, String, ServerMsgId)> {
    next(events, |e| match e {
        MessengerEvent::Message(m) => Some((m.sender.to_string(), m.body, m.server_msg_id.unwrap_or(ServerMsgId::new(0)))),
        _ => None,
    })
    .await
}

async fn messenger(server: &TestServer, dir: &std::path::Path, name: &str) -> anyhow::Result<(Messenger, MessengerEvents)> {
    let (messenger, events, _recovery) =
        Messenger::register(&server.base_url, &dir.join(format!("{name}.db")), name, support::PASSWORD).await?;
    Ok((messenger, events))
}

#[tokio::test]
async fn users_on_three_servers_chat_end_to_end_with_receipts_typing_and_presence() -> anyhow::Result<()> {
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::WellKnown)], "").await?;
    let dir = tempfile::tempdir()?;
    let (alice, mut alice_events) = messenger(net.server("a.test"), dir.path(), "alice").await?;
    let (bob, mut bob_events) = messenger(net.server("b.test"), dir.path(), "bob").await?;
    let (carol, mut carol_events) = messenger(net.server("c.test"), dir.path(), "carol").await?;
    let alice_id = alice.session().user_id.clone();
    let bob_id = bob.session().user_id.clone();
    let carol_id = carol.session().user_id.clone();
    assert_eq!(alice_id.to_string(), "@alice:a.test");

    // a → b (SRV), then b answers.
    alice.send_text(&bob_id, "hello bob, from a.test").await?;
    let (sender, body, id) = next_text(&mut bob_events).await?;
    assert_eq!((sender.as_str(), body.as_str()), ("@alice:a.test", "hello bob, from a.test"));
    let delivered = next(&mut alice_events, |e| match e {
        MessengerEvent::Delivered { by, message_ids } => Some((by, message_ids)),
        _ => None,
    })
    .await?;
    assert_eq!(delivered, (bob_id.clone(), vec![id]));
    bob.mark_read(&alice_id, vec![id]).await?;
    let read = next(&mut alice_events, |e| match e {
        MessengerEvent::Read { by, message_ids } => Some((by, message_ids)),
        _ => None,
    })
    .await?;
    assert_eq!(read, (bob_id.clone(), vec![id]));
    bob.send_text(&alice_id, "hi alice").await?;
    assert_eq!(next_text(&mut alice_events).await?.1, "hi alice");

    // a → c (.well-known delegation) and back.
    alice.send_text(&carol_id, "carol, via well-known").await?;
    assert_eq!(next_text(&mut carol_events).await?.1, "carol, via well-known");
    carol.send_text(&alice_id, "got it").await?;
    assert_eq!(next_text(&mut alice_events).await?.1, "got it");
    // b ↔ c, neither being a.
    carol.send_text(&bob_id, "bob, it's carol").await?;
    assert_eq!(next_text(&mut bob_events).await?.1, "bob, it's carol");

    // Typing crosses servers.
    bob.typing(&alice_id, true).await?;
    let typing = next(&mut alice_events, |e| match e {
        MessengerEvent::Typing(t) => Some(t),
        _ => None,
    })
    .await?;
    assert!(typing.typing && typing.from == bob_id);

    // Presence: alice follows bob; bob goes offline, then alice hears it.
    alice.subscribe_presence(vec![bob_id.clone()]).await?;
    let online = next(&mut alice_events, |e| match e {
        MessengerEvent::Presence(p) if p.user == bob_id => Some(p),
        _ => None,
    })
    .await?;
    assert_eq!(online.status, parley_sdk::PresenceStatus::Online);
    bob.close().await;
    let offline = next(&mut alice_events, |e| match e {
        MessengerEvent::Presence(p) if p.user == bob_id && p.status == parley_sdk::PresenceStatus::Offline => Some(p),
        _ => None,
    })
    .await?;
    assert!(offline.last_seen_ts.is_some());

    // Discovery went through the DNS server: SRV for b, the delegated host's A record for c.
    let queries = net.dns.queries();
    assert!(queries.iter().any(|(name, kind)| name.starts_with("_parley._tcp.b.test") && kind.to_string() == "SRV"));
    assert!(queries.iter().any(|(name, _)| name.starts_with("c-fed.test")));
    Ok(())
}

/// Alice's device on `a.test`, and bob on `b.test` registered but not connected: his id and
/// session.
async fn alice_and_offline_bob(net: &mut FedNet) -> anyhow::Result<(Device, parley_sdk::UserId, parley_sdk::Session)> {
    let (alice, bob) = pair(net).await?;
    Ok((alice, bob.session.user_id.clone(), bob.session.clone()))
}

/// Raw devices (no E2EE) on `a.test` and `b.test`.
async fn pair(net: &mut FedNet) -> anyhow::Result<(Device, Device)> {
    let a = support::register(&net.server("a.test").base_url, "alice").await?;
    let b = support::register(&net.server("b.test").base_url, "bob").await?;
    Ok((Device::connect(&a).await?, Device::connect(&b).await?))
}

async fn receive_in_order(device: &mut Device, count: usize) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while texts.len() < count {
        let event = tokio::time::timeout_at(deadline, device.next(Some)).await.context("timed out")??;
        if let Event::Message(m) = event {
            texts.push(support::text(&m));
        }
    }
    Ok(texts)
}

fn numbered(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("message {i:04}")).collect()
}

/// A burst of requests to one server waits its turn on a few connections: 40 concurrent
/// device lookups with `max_requests_per_destination = 2` all succeed, over at most 2 new
/// connections (without the limit, each opened its own: a TLS handshake on both servers).
#[tokio::test]
async fn a_burst_of_requests_to_one_server_shares_a_bounded_number_of_connections() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("b.test", Discovery::Srv)], "").await?;
    net.add("a.test", Discovery::Srv, "[federation]\nmax_requests_per_destination = 2\n").await?;
    let alice = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob = support::register(&net.server("b.test").base_url, "bob").await?;
    let api = parley_sdk::Api::new(&alice)?;
    let before = net.server("b.test").counter("federation_connections_accepted").await?;
    let lookups = (0..40).map(|_| api.user_devices(&bob.user_id));
    for answer in futures_util::future::join_all(lookups).await {
        assert_eq!(answer?.devices, vec![bob.device_id.clone()]);
    }
    let opened = net.server("b.test").counter("federation_connections_accepted").await? - before;
    assert!((1..=2).contains(&opened), "40 lookups opened {opened} connections to b.test");
    Ok(())
}

/// Waits until `server`'s queue-wait histogram counts more than `count` transactions; its
/// count and sum then.
async fn next_queue_wait(server: &TestServer, count: u64) -> anyhow::Result<(u64, f64)> {
    let wait = || server.histogram("federation_queue_wait_seconds");
    crate::media::eventually("a transaction accepted", || async { Ok(wait().await?.0 > count) }).await?;
    wait().await
}

/// How far behind the outbound queue runs is measured: a message queued while its
/// destination is down counts its whole wait once the destination accepts it. The queue's
/// reads and writes are timed too.
#[tokio::test]
async fn the_outbound_queue_wait_spans_the_time_a_destination_was_down() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let (alice, bob_id, bob_session) = alice_and_offline_bob(&mut net).await?;
    alice.send_text(&bob_id, "while b.test is up").await?;
    let (count, sum) = next_queue_wait(net.server("a.test"), 0).await?;
    // Each transaction accepted was read from the queue and recorded in flight first.
    for step in ["federation_queue_read_seconds", "federation_queue_write_seconds"] {
        let (steps, _) = net.server("a.test").histogram(step).await?;
        assert!(steps >= count, "{steps} of {step} for {count} transactions");
    }
    let failures = net.server("a.test").counter("federation_txn_failures").await?;
    net.server("b.test").stop().await?;
    alice.send_text(&bob_id, "queued while b.test is down").await?;
    // Queued (committed) by now, so its wait started no later than this.
    let queued = std::time::Instant::now();
    let a = net.server("a.test");
    crate::media::eventually("a transaction failed against the stopped b.test", || async {
        Ok(a.counter("federation_txn_failures").await? > failures)
    })
    .await?;
    net.server("b.test").restart().await?;
    let down = queued.elapsed();
    let mut bob = crate::support::raw_receiver(&bob_session).await?;
    assert_eq!(receive_in_order(&mut bob, 2).await?.last().map(String::as_str), Some("queued while b.test is down"));
    let (after_count, after_sum) = next_queue_wait(net.server("a.test"), count).await?;
    assert_eq!(after_count, count + 1, "one transaction carried the queued message");
    assert!(
        after_sum - sum >= down.as_secs_f64(),
        "waited {:.3} s, b.test was down for at least {:.3} s after it was queued",
        after_sum - sum,
        down.as_secs_f64()
    );
    Ok(())
}

#[tokio::test]
async fn a_destination_that_was_down_gets_all_1000_messages_in_order_exactly_once() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let (alice, bob_id, bob_session) = alice_and_offline_bob(&mut net).await?;
    // Alice's server learns bob's devices while b.test is up, and keeps them.
    support::envelopes(&alice.session, &bob_id, b"x").await?;
    net.server("b.test").stop().await?;
    let texts = numbered(1000);
    for text in &texts {
        alice.send_text(&bob_id, text).await?;
    }
    net.server("b.test").restart().await?;
    // No SDK dedupe: a duplicate would show up here.
    let mut bob = crate::support::raw_receiver(&bob_session).await?;
    assert_eq!(receive_in_order(&mut bob, 1000).await?, texts);
    // Nothing twice: the next message after the 1000 is a fresh marker.
    alice.send_text(&bob_id, "marker").await?;
    assert_eq!(receive_in_order(&mut bob, 1).await?, vec!["marker".to_owned()]);
    Ok(())
}

#[tokio::test]
async fn a_rotated_server_key_is_published_with_the_old_one_and_picked_up_by_other_servers() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let (alice, mut bob) = pair(&mut net).await?;
    let bob_id = bob.session.user_id.clone();
    alice.send_text(&bob_id, "signed with the first key").await?;
    assert_eq!(receive_in_order(&mut bob, 1).await?, vec!["signed with the first key".to_owned()]);
    let keys = |base: String| async move {
        let document: parley_sdk::spec::federation::v1::keys::ServerKeys =
            reqwest::get(format!("{base}/_parley/key/v1")).await?.error_for_status()?.json().await?;
        anyhow::Ok(document)
    };
    let before = keys(net.server("a.test").base_url.clone()).await?;

    net.server("a.test").stop().await?;
    let output = tokio::process::Command::new(parley_tests::parleyd_path())
        .arg("--data-dir")
        .arg(net.server("a.test").data_dir())
        .args(["admin", "rotate-server-key"])
        .output()
        .await?;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    net.server("a.test").restart().await?;

    let after = keys(net.server("a.test").base_url.clone()).await?;
    let old_id = before.verify_keys.keys().next().context("a key")?.clone();
    assert!(!after.verify_keys.contains_key(&old_id), "a new current key");
    assert_eq!(after.old_verify_keys[&old_id].key, before.verify_keys[&old_id].key, "the old key stays published");
    // b.test knows only the old key: it refetches a.test's document for the new key id.
    alice.send_text(&bob_id, "signed with the new key").await?;
    assert_eq!(receive_in_order(&mut bob, 1).await?, vec!["signed with the new key".to_owned()]);
    Ok(())
}
