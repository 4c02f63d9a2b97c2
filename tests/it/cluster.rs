//! Several workers of one homeserver: one PostgreSQL database, NATS between them. Users
//! connected to different workers chat as on one server.

use crate::support::{login, register, Device};
use anyhow::Context as _;
use parley_sdk::{Api, Event, PresenceStatus, ReceiptKind};
use parley_tests::nats::NatsServer;
use parley_tests::{Backend, Mode, TestServer};

/// Two in-process workers on one fresh PostgreSQL database and `nats`.
async fn two_workers(nats: &NatsServer, extra: &str) -> anyhow::Result<(TestServer, TestServer)> {
    let config = format!("{extra}\n[cluster]\nnats_url = \"{}\"\n", nats.url());
    let first = TestServer::start_on(Backend::Postgres, &config).await?;
    let mut second = TestServer::prepare_as(Mode::InProcess, &config)?.worker_of(&first)?;
    second.restart().await?;
    Ok((first, second))
}

/// Waits until the closed connection of device `device_id` was handled (its last-seen time,
/// written when it goes, is stored).
async fn disconnection_handled(server: &TestServer, device_id: &str) -> anyhow::Result<()> {
    let db = server.db().await?;
    crate::media::eventually("the disconnection is handled", || async {
        let seen: Option<i64> =
            sqlx::query_scalar("SELECT last_seen_ts FROM devices WHERE device_id = $1").bind(device_id).fetch_one(&db).await?;
        Ok(seen.is_some())
    })
    .await?;
    db.close().await;
    Ok(())
}

#[tokio::test]
async fn users_on_different_workers_chat_with_receipts_typing_and_presence() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let (one, two) = two_workers(&nats, "").await?;
    // Accounts made on either worker are everyone's.
    let alice = register(&one.base_url, "alice").await?;
    let bob = register(&two.base_url, "bob").await?;
    let bob_on_one = login(&one.base_url, "bob").await?;
    Api::new(&alice)?.subscribe_presence(vec![bob.user_id.clone()]).await?;
    let mut a1 = Device::connect(&alice).await?; // on worker one
    let mut b1 = Device::connect(&bob).await?; // on worker two
    let mut b2 = Device::connect(&bob_on_one).await?; // bob's second device, on worker one

    // A message from worker one reaches bob's device on worker two, live, and his other device.
    let sent = a1.send_text(&bob.user_id, "across workers").await?;
    let got = b1.next_message().await?;
    assert_eq!((got.id, crate::support::text(&got)), (sent.server_msg_id, "across workers".to_owned()));
    assert_eq!(b2.next_message().await?.id, sent.server_msg_id);
    // b1's acknowledgement (on worker two) becomes a delivered receipt on worker one.
    let delivered = a1.next_receipt(ReceiptKind::Delivered).await?;
    assert!(delivered.message_ids.contains(&sent.server_msg_id));
    // Bob reads it on worker two: a read receipt for alice on worker one.
    b1.conn.read(alice.user_id.clone(), vec![sent.server_msg_id]).await?;
    let read = a1.next_receipt(ReceiptKind::Read).await?;
    assert_eq!((read.message_ids.as_slice(), &read.by), (&[sent.server_msg_id][..], &bob.user_id));

    // And back: bob on worker two to alice on worker one, typing first.
    b1.conn.typing(alice.user_id.clone(), true).await?;
    let typing = a1
        .next(|e| match e {
            Event::Typing(t) => Some(t),
            _ => None,
        })
        .await?;
    assert!(typing.typing && typing.from == bob.user_id);
    let reply = b1.send_text(&alice.user_id, "got it").await?;
    assert_eq!(a1.next_message().await?.id, reply.server_msg_id);
    // Bob's own device on worker one gets its copy.
    assert_eq!(b2.next_message().await?.id, reply.server_msg_id);

    // Presence follows bob's devices on both workers: his device on worker one goes, and he
    // stays online (worker two holds b1); then b1 goes too, and he is offline.
    b2.conn.close().await;
    disconnection_handled(&one, bob_on_one.device_id.as_str()).await?;
    assert_eq!(Api::new(&alice)?.presence(&bob.user_id).await?.status, PresenceStatus::Online, "b1 holds on");
    let marker = b1.send_text(&alice.user_id, "still here").await?;
    let arrived = a1
        .next(|e| match e {
            Event::Message(m) => Some(Ok(m.id)),
            Event::Presence(p) if p.user == bob.user_id && p.status == PresenceStatus::Offline => Some(Err(p)),
            _ => None,
        })
        .await?;
    assert_eq!(arrived.map_err(|p| anyhow::anyhow!("offline while b1 is connected: {p:?}"))?, marker.server_msg_id);
    b1.conn.close().await;
    let offline = a1
        .next(|e| match e {
            Event::Presence(p) if p.user == bob.user_id && p.status == PresenceStatus::Offline => Some(p),
            _ => None,
        })
        .await?;
    assert!(offline.last_seen_ts.is_some());
    assert_eq!(Api::new(&alice)?.presence(&bob.user_id).await?.status, PresenceStatus::Offline);
    Ok(())
}

#[tokio::test]
async fn nats_restarted_under_load_delivery_resumes_and_nothing_is_lost_or_repeated() -> anyhow::Result<()> {
    let mut nats = NatsServer::start().await?;
    let (one, two) = two_workers(&nats, "").await?;
    let alice = register(&one.base_url, "alice").await?;
    let bob = register(&two.base_url, "bob").await?;
    let a1 = Device::connect(&alice).await?; // on worker one
    let mut b1 = Device::connect(&bob).await?; // on worker two

    // Alice keeps sending; NATS dies after the first 20 and comes back after 40.
    let mut sent = Vec::new();
    for i in 0..60 {
        if i == 20 {
            nats.stop().await?;
        }
        if i == 40 {
            nats.restart().await?;
        }
        sent.push(a1.send_text(&bob.user_id, &format!("m{i}")).await?.server_msg_id);
    }
    // Bob gets every message, once each, in order: those relayed, and those the outage lost
    // from the relay, which his connection reread from the inbox once NATS was back.
    let mut got = Vec::new();
    while got.len() < sent.len() {
        got.push(b1.next_message().await?.id);
    }
    assert_eq!(got, sent);
    // Live delivery works again, and nothing else was waiting.
    let after = a1.send_text(&bob.user_id, "after the restart").await?;
    assert_eq!(b1.next_message().await?.id, after.server_msg_id);
    Ok(())
}

#[tokio::test]
async fn a_worker_killed_under_load_its_devices_go_on_at_the_other_and_lose_nothing() -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    use std::collections::BTreeSet;
    let nats = NatsServer::start().await?;
    let config = format!("[cluster]\nnats_url = \"{}\"\n", nats.url());
    // Worker one is a process, to be SIGKILLed; worker two runs in this process.
    let mut one = TestServer::prepare_as(Mode::Process, &config)?.with_backend(Backend::Postgres);
    one.restart().await?;
    let mut two = TestServer::prepare_as(Mode::InProcess, &config)?.worker_of(&one)?;
    two.restart().await?;
    let alice = register(&two.base_url, "alice").await?;
    let bob = register(&one.base_url, "bob").await?;
    let a1 = Device::connect(&alice).await?; // on worker two
    let mut b1 = Device::connect(&bob).await?; // on worker one

    // Alice sends 300 messages, 20 at a time; worker one, where bob is, dies after 100.
    let envelopes = crate::support::envelopes(&alice, &bob.user_id, b"").await?;
    let (answers_tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let conn = a1.conn.clone();
    let to = bob.user_id.clone();
    let stream = tokio::spawn(async move {
        futures_util::stream::iter(0..300)
            .map(|i| {
                let mut envelopes = envelopes.clone();
                for e in &mut envelopes {
                    e.ciphertext.0 = format!("m{i}").into_bytes();
                }
                let (conn, to) = (conn.clone(), to.clone());
                async move { conn.send(to, envelopes).await }
            })
            .buffer_unordered(20)
            .for_each(|result| {
                let _ = answers_tx.send(result);
                async {}
            })
            .await;
    });
    let mut sent = BTreeSet::new();
    while sent.len() < 100 {
        sent.insert(answers.recv().await.expect("sending")?.server_msg_id);
    }
    one.kill().await?;
    while let Some(answer) = answers.recv().await {
        sent.insert(answer?.server_msg_id);
    }
    stream.await?;
    assert_eq!(sent.len(), 300, "every send answered once");

    // What bob's device had from worker one before it died, then the same device on worker
    // two from its cursor: together every message, and nothing twice on the new connection.
    let mut received = BTreeSet::new();
    while let Some(event) = b1.try_next() {
        if let Event::Message(m) = event {
            received.insert(m.id);
        }
    }
    let cursor = b1.conn.cursor();
    drop(b1);
    let on_two = parley_sdk::Session::new(&two.base_url, bob.user_id.clone(), bob.device_id.clone(), bob.access_token());
    let mut b2 = Device::connect_with(&on_two, parley_sdk::ConnectOptions::since(cursor)).await?;
    let mut again = BTreeSet::new();
    while received.len() < sent.len() {
        let id = b2.next_message().await?.id;
        assert!(sent.contains(&id), "only what was sent");
        assert!(again.insert(id), "{id} twice on the new connection");
        received.insert(id);
    }
    assert_eq!(received, sent);
    // Stored once each, on the shared database.
    let db = two.db().await?;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT client_msg_id) FROM messages").fetch_one(&db).await?;
    assert_eq!((rows, distinct), (300, 300));
    db.close().await;
    Ok(())
}

#[tokio::test]
async fn a_killed_workers_federation_destination_is_taken_over_and_its_queue_delivered_once() -> anyhow::Result<()> {
    use crate::support::{raw_receiver, receive_texts, send_texts};
    use parley_tests::fednet::{Discovery, FedNet};
    let nats = NatsServer::start().await?;
    let mut net = FedNet::start_as(Mode::Process, &[("b.test", Discovery::Srv)], "").await?;
    let config = net.config_for("a.test", Discovery::Srv, &format!("[cluster]\nnats_url = \"{}\"\n", nats.url()))?;
    // Worker one of a.test, a process to be SIGKILLed, sends to b.test first: it holds the lease.
    let one = TestServer::prepare_as(Mode::Process, &config)?.with_backend(Backend::Postgres);
    net.add_server("a.test", Discovery::Srv, one).await?;
    let alice = register(&net.server("a.test").base_url, "alice").await?;
    let bob = register(&net.server("b.test").base_url, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    let template = crate::support::envelopes(&alice, &bob.user_id, b"x").await?;
    send_texts(&a1, &bob.user_id, &template, &["first".to_owned()]).await?;
    let mut b1 = raw_receiver(&bob).await?;
    assert_eq!(receive_texts(&mut b1, 1).await?, ["first"]);
    drop(b1);
    drop(a1);

    // Worker two; b.test goes down, and alice queues 100 messages there through worker two.
    let mut two = TestServer::prepare_as(Mode::InProcess, &config)?.worker_of(net.server("a.test"))?;
    two.restart().await?;
    net.server("b.test").stop().await?;
    let on_two = parley_sdk::Session::new(&two.base_url, alice.user_id.clone(), alice.device_id.clone(), alice.access_token());
    let a2 = Device::connect(&on_two).await?;
    let texts: Vec<String> = (0..100).map(|i| format!("queued {i:03}")).collect();
    send_texts(&a2, &bob.user_id, &template, &texts).await?;
    assert_eq!(two.queued_for("b.test").await?, 100);

    // Worker one dies holding the lease; b.test comes back: worker two takes b.test over and
    // delivers the queue, each message once. (a.test's address now leads to worker two, as a
    // load balancer in front of the workers would: b.test fetches a.test's key from there.)
    net.server("a.test").kill().await?;
    let port = two.federation_addr.context("worker two's federation listener")?.port();
    net.dns.remove("_parley._tcp.a.test").await?;
    net.dns.add_srv("_parley._tcp.a.test", 10, 10, port, "a.test").await?;
    net.server("b.test").restart().await?;
    let mut b1 = raw_receiver(&bob).await?;
    let mut expected = vec!["first".to_owned()];
    expected.extend(texts);
    assert_eq!(receive_texts(&mut b1, 101).await?, expected);
    two.wait_for_log(&["took the destination over", "b.test"], std::time::Duration::from_secs(5)).await?;
    assert_eq!(net.server("b.test").inbox_rows_from(alice.user_id.as_str()).await?, (101, 101));
    Ok(())
}

#[tokio::test]
async fn a_group_spread_over_two_workers_gets_every_message() -> anyhow::Result<()> {
    use crate::e2ee::next;
    use parley_sdk::messenger::{Messenger, MessengerEvent, MessengerEvents};
    let nats = NatsServer::start().await?;
    let (one, two) = two_workers(&nats, "").await?;
    let dir = tempfile::tempdir()?;
    let join = |base: String, name: &'static str| {
        let path = dir.path().join(format!("{name}.db"));
        async move { Messenger::register(&base, &path, name, crate::support::PASSWORD).await }
    };
    let (alice, mut alice_events, _) = join(one.base_url.clone(), "alice").await?; // worker one
    let (bob, mut bob_events, _) = join(two.base_url.clone(), "bob").await?; // worker two
    let (carol, mut carol_events, _) = join(two.base_url.clone(), "carol").await?; // worker two
    async fn text(events: &mut MessengerEvents) -> anyhow::Result<(String, String)> {
        next(events, |e| match e {
            MessengerEvent::GroupMessage(m) => Some((m.sender.to_string(), m.body)),
            _ => None,
        })
        .await
    }
    let (group, _) = alice.create_group("spread", &[bob.session().user_id.clone(), carol.session().user_id.clone()]).await?;
    for events in [&mut bob_events, &mut carol_events] {
        next(events, |e| matches!(e, MessengerEvent::GroupJoined { .. }).then_some(())).await?;
    }
    alice.send_group_text(&group, "from worker one").await?;
    let from_one = ("@alice:localhost".to_owned(), "from worker one".to_owned());
    assert_eq!(text(&mut bob_events).await?, from_one);
    assert_eq!(text(&mut carol_events).await?, from_one);
    bob.send_group_text(&group, "from worker two").await?;
    assert_eq!(text(&mut carol_events).await?, ("@bob:localhost".to_owned(), "from worker two".to_owned()));
    assert_eq!(text(&mut alice_events).await?, ("@bob:localhost".to_owned(), "from worker two".to_owned()));
    Ok(())
}

#[tokio::test]
async fn a_device_that_left_the_worker_its_events_went_to_is_woken_by_push_and_reads_them_at_the_other() -> anyhow::Result<()> {
    let service = parley_tests::push::PushService::start().await?;
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("push-ca.pem");
    std::fs::write(&ca, &service.ca_pem)?;
    let push = format!(
        "[push]\ndelay_ms = 100\nmin_interval_ms = 0\nallow_private_addresses = true\nextra_ca_file = \"{}\"\n",
        ca.display()
    );
    let nats = NatsServer::start().await?;
    let (one, two) = two_workers(&nats, &push).await?;
    let alice = register(&one.base_url, "alice").await?;
    let bob = register(&two.base_url, "bob").await?;
    let endpoint = serde_json::json!({ "endpoint": service.endpoint("bob") });
    let status = reqwest::Client::new()
        .put(format!("{}/v1/push", two.base_url))
        .bearer_auth(bob.access_token())
        .json(&endpoint)
        .send()
        .await?
        .status();
    assert_eq!(status, 204);
    let a1 = Device::connect(&alice).await?; // on worker one
    let mut b1 = Device::connect(&bob).await?; // on worker two

    // Worker two answers for bob's device: worker one learns where it is, and what follows
    // goes there in batches.
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(a1.send_text(&bob.user_id, &format!("m{i}")).await?.server_msg_id);
        assert_eq!(b1.next_message().await?.id, sent[i]);
    }
    assert!(service.received_for("bob").is_empty(), "online: no push");

    // Bob's device goes. The next message goes to worker two, which no longer has it: worker one
    // then finds nobody holds it, and wakes it by push.
    let cursor = b1.conn.cursor();
    b1.conn.close().await;
    disconnection_handled(&one, bob.device_id.as_str()).await?;
    let after = a1.send_text(&bob.user_id, "are you there?").await?;
    service.wait_for("bob", 1, std::time::Duration::from_secs(20)).await?;

    // It comes back on worker one and finds the message there; a next one arrives live.
    let on_one = parley_sdk::Session::new(&one.base_url, bob.user_id.clone(), bob.device_id.clone(), bob.access_token());
    let mut b2 = Device::connect_with(&on_one, parley_sdk::ConnectOptions::since(cursor)).await?;
    assert_eq!(b2.next_message().await?.id, after.server_msg_id);
    let live = a1.send_text(&bob.user_id, "welcome back").await?;
    assert_eq!(b2.next_message().await?.id, live.server_msg_id);
    Ok(())
}
