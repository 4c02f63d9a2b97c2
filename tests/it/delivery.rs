//! Real-time delivery, offline inboxes, receipts, idempotency and crash safety, driven through
//! the SDK against real `parleyd` processes.

use crate::support::{envelopes, login, register, text, Device, T};
use parley_sdk::{Api, ConnectOptions, Event, ReceiptKind, SendRequest, Seq, ServerMsgId};
use parley_tests::TestServer;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[tokio::test]
async fn two_users_with_two_devices_each_exchange_messages_live() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let alice2 = login(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let bob2 = login(base, "bob").await?;
    let mut a1 = Device::connect(&alice).await?;
    let mut a2 = Device::connect(&alice2).await?;
    let mut b1 = Device::connect(&bob).await?;
    let mut b2 = Device::connect(&bob2).await?;

    let sent = a1.send_text(&bob.user_id, "hello bob").await?;
    assert!(!sent.duplicate);
    for device in [&mut b1, &mut b2, &mut a2] {
        let message = device.next_message().await?;
        assert_eq!((message.id, text(&message).as_str()), (sent.server_msg_id, "hello bob"));
        assert_eq!((&message.sender, &message.sender_device, &message.to), (&alice.user_id, &alice.device_id, &bob.user_id));
    }

    let reply = b2.send_text(&alice.user_id, "hi alice").await?;
    for device in [&mut a1, &mut a2, &mut b1] {
        let message = device.next_message().await?;
        assert_eq!((message.id, text(&message).as_str()), (reply.server_msg_id, "hi alice"));
        assert_eq!(message.sender_device, bob2.device_id);
    }

    // A 100,000-character text (200,000 bytes of UTF-8) fits in the default envelope limit.
    let long: String = "é".repeat(100_000);
    a2.send_text(&bob.user_id, &long).await?;
    assert_eq!(text(&b1.next_message().await?), long);
    assert_eq!(text(&b2.next_message().await?), long);
    Ok(())
}

#[tokio::test]
async fn a_device_offline_during_1000_messages_gets_all_in_order() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let bob_offline = login(base, "bob").await?; // never connected yet
    let mut b1 = Device::connect(&bob).await?;
    let a1 = Device::connect(&alice).await?;

    let envelopes = envelopes(&alice, &bob.user_id, b"").await?;
    let mut ids = Vec::new();
    for chunk in (0..1000).collect::<Vec<_>>().chunks(50) {
        // Pipelined: 50 sends in flight on one connection.
        let sends = chunk.iter().map(|i| {
            let mut envelopes = envelopes.clone();
            for e in &mut envelopes {
                e.ciphertext.0 = format!("m{i}").into_bytes();
            }
            a1.conn.send(bob.user_id.clone(), envelopes)
        });
        for sent in futures_util::future::join_all(sends).await {
            ids.push(sent?.server_msg_id);
        }
    }
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 1000);

    // The online device saw them live, in id order.
    let mut live = Vec::new();
    for _ in 0..1000 {
        live.push(b1.next_message().await?.id);
    }
    assert!(live.windows(2).all(|w| w[0] < w[1]), "live order");

    // Device::connect waits for caught_up, so the backlog is already in the event buffer.
    let mut b2 = Device::connect(&bob_offline).await?;
    let mut received = Vec::new();
    let mut contents = BTreeSet::new();
    for _ in 0..1000 {
        let message = b2.next_message().await?;
        received.push(message.id);
        contents.insert(text(&message));
    }
    assert_eq!(received, live, "the offline device gets everything, in the same order");
    assert_eq!(contents.len(), 1000, "no message twice");
    // Nothing more is pending for it.
    b2.conn.close().await;
    Ok(())
}

#[tokio::test]
async fn delivered_and_read_receipts_reach_every_sender_device_live_or_later() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let alice2 = login(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let mut a1 = Device::connect(&alice).await?;
    let mut a2 = Device::connect(&alice2).await?;
    let mut b1 = Device::connect(&bob).await?;

    let sent = a1.send_text(&bob.user_id, "did you get this?").await?;
    let message = b1.next_message().await?;
    assert_eq!(message.id, sent.server_msg_id);
    assert_eq!(a2.next_message().await?.id, sent.server_msg_id, "a2 gets its copy");
    // b1's SDK acknowledged it: delivered receipts reach both of alice's devices.
    for device in [&mut a1, &mut a2] {
        let receipt = device.next_receipt(ReceiptKind::Delivered).await?;
        assert_eq!((&receipt.by, &receipt.by_device, &receipt.sender), (&bob.user_id, &bob.device_id, &alice.user_id));
        assert!(receipt.message_ids.contains(&sent.server_msg_id));
    }

    // a2 goes offline; bob reads the message; a1 sees the read receipt live, a2 on reconnect.
    let cursor = a2.conn.cursor();
    a2.conn.close().await;
    b1.conn.read(alice.user_id.clone(), vec![sent.server_msg_id]).await?;
    let receipt = a1.next_receipt(ReceiptKind::Read).await?;
    assert_eq!((receipt.message_ids.as_slice(), &receipt.by), (&[sent.server_msg_id][..], &bob.user_id));
    let mut a2 = Device::connect_with(&alice2, ConnectOptions::since(cursor)).await?;
    let receipt = a2.next_receipt(ReceiptKind::Read).await?;
    assert_eq!(receipt.message_ids, vec![sent.server_msg_id]);

    // Typing is live only.
    b1.conn.typing(alice.user_id.clone(), true).await?;
    let typing = a1
        .next(|e| match e {
            Event::Typing(t) => Some(t),
            _ => None,
        })
        .await?;
    assert!(typing.typing && typing.from == bob.user_id);
    Ok(())
}

#[tokio::test]
async fn a_retried_send_is_deduplicated() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    let mut b1 = Device::connect(&bob).await?;
    let envelopes = envelopes(&alice, &bob.user_id, b"once").await?;
    let request = SendRequest::new(uuid::Uuid::new_v4(), bob.user_id.clone(), envelopes.clone());

    let first = a1.conn.send_request(request.clone()).await?;
    let again = a1.conn.send_request(request.clone()).await?;
    let over_http = Api::new(&alice)?.send(request.clone()).await?;
    assert!(!first.duplicate);
    assert!(again.duplicate && over_http.duplicate);
    assert_eq!((again.server_msg_id, again.ts), (first.server_msg_id, first.ts));
    assert_eq!(over_http.server_msg_id, first.server_msg_id);

    let marker = a1.send_text(&bob.user_id, "after").await?;
    assert_eq!(b1.next_message().await?.id, first.server_msg_id);
    assert_eq!(b1.next_message().await?.id, marker.server_msg_id, "the retry made no second message");
    Ok(())
}

#[tokio::test]
async fn sigkill_during_a_stream_loses_nothing_that_was_sent_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut server = TestServer::process().await?;
    let base = server.base_url.clone();
    let alice = register(&base, "alice").await?;
    let bob = register(&base, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    let envelopes = envelopes(&alice, &bob.user_id, b"").await?;

    // Alice streams 600 messages, 20 in flight; we collect every `sent` answer.
    let (answers_tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    let conn = a1.conn.clone();
    let to = bob.user_id.clone();
    let stream = tokio::spawn(async move {
        use futures_util::StreamExt as _;
        futures_util::stream::iter(0..600)
            .map(|i| {
                let mut envelopes = envelopes.clone();
                for e in &mut envelopes {
                    e.ciphertext.0 = format!("m{i}").into_bytes();
                }
                let conn = conn.clone();
                let to = to.clone();
                async move { (i, conn.send(to, envelopes).await) }
            })
            .buffer_unordered(20)
            .for_each(|(i, result)| {
                let _ = answers_tx.send((i, result));
                async {}
            })
            .await;
    });

    let mut sent: BTreeMap<ServerMsgId, String> = BTreeMap::new();
    while sent.len() < 200 {
        let (i, result) = tokio::time::timeout(T, answers.recv()).await?.expect("stream running");
        sent.insert(result?.server_msg_id, format!("m{i}"));
    }
    server.kill().await?; // SIGKILL mid-stream: sends are in flight
    let answered_before_kill = sent.len();
    server.restart().await?; // same port, same data; the SDK reconnects and re-sends
    while let Some((i, result)) = tokio::time::timeout(Duration::from_secs(60), answers.recv()).await? {
        let answer = result?;
        if let Some(previous) = sent.insert(answer.server_msg_id, format!("m{i}")) {
            anyhow::ensure!(previous == format!("m{i}"), "two messages share id {}", answer.server_msg_id);
        }
    }
    stream.await?;
    assert_eq!(sent.len(), 600, "every send was eventually answered ({answered_before_kill} before the kill)");

    let mut b1 = Device::connect(&bob).await?;
    let mut received = Vec::new();
    let mut contents = BTreeSet::new();
    for _ in 0..600 {
        let message = b1.next_message().await?;
        assert_eq!(sent.get(&message.id), Some(&text(&message)), "delivered exactly what was answered");
        assert!(contents.insert(text(&message)), "{} delivered twice", text(&message));
        received.push(message.id);
    }
    assert!(received.windows(2).all(|w| w[0] < w[1]), "in order");
    Ok(())
}

#[tokio::test]
async fn caught_up_comes_after_the_whole_backlog_even_beyond_the_unacknowledged_window() -> anyhow::Result<()> {
    // A window of 10 unacknowledged events and a backlog of 35.
    let server = TestServer::start_with("[limits]\nmax_unacked_events = 10\n").await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    let envelopes = envelopes(&alice, &bob.user_id, b"").await?;
    let mut ids = Vec::new();
    for i in 0..35 {
        let mut envelopes = envelopes.clone();
        for e in &mut envelopes {
            e.ciphertext.0 = format!("m{i}").into_bytes();
        }
        ids.push(a1.conn.send(bob.user_id.clone(), envelopes).await?.server_msg_id);
    }
    // Device::connect returns at caught_up; the SDK acknowledges as it goes, so the server can
    // deliver past the window. Every message must already be in the backlog buffer then.
    let mut b1 = Device::connect_with(&bob, ConnectOptions { ack_batch: 5, ..ConnectOptions::default() }).await?;
    let mut received = Vec::new();
    while let Some(event) = b1.try_next() {
        if let Event::Message(m) = event {
            received.push(m.id);
        }
    }
    assert_eq!(received, ids, "caught_up arrived only after all 35 messages");
    Ok(())
}

/// The position of the next checkpoint a manually acknowledging device is told of.
async fn next_checkpoint(device: &mut Device) -> anyhow::Result<Seq> {
    device.next(|e| if let Event::Checkpoint { seq } = e { Some(seq) } else { None }).await
}

/// The next message of a manually acknowledging device, acknowledged: its id.
async fn confirm_next(device: &mut Device) -> anyhow::Result<ServerMsgId> {
    let id = device.next_message().await?.id;
    let seq = next_checkpoint(device).await?;
    device.conn.confirm(seq);
    Ok(id)
}

#[tokio::test]
async fn acks_within_the_interval_make_one_receipt_and_a_quiet_ack_is_written_at_once() -> anyhow::Result<()> {
    // An interval far longer than the test: what is gathered can only leave when bob's
    // connection closes.
    let server = TestServer::start_with("[limits]\nack_interval_ms = 60000\n").await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let mut a1 = Device::connect(&alice).await?;
    let manual = ConnectOptions { manual_ack: true, ..ConnectOptions::default() };
    let mut b1 = Device::connect_with(&bob, manual).await?;

    // The first ack of the connection: written at once, its receipt arrives while bob is on.
    let first = a1.send_text(&bob.user_id, "one").await?.server_msg_id;
    assert_eq!(confirm_next(&mut b1).await?, first);
    let receipt = a1.next_receipt(ReceiptKind::Delivered).await?;
    assert_eq!(receipt.message_ids, vec![first]);

    // Two more, each acknowledged on its own within the interval: gathered, and written as
    // one receipt for both when the connection closes.
    let second = a1.send_text(&bob.user_id, "two").await?.server_msg_id;
    assert_eq!(confirm_next(&mut b1).await?, second);
    let third = a1.send_text(&bob.user_id, "three").await?.server_msg_id;
    assert_eq!(confirm_next(&mut b1).await?, third);
    b1.conn.close().await;
    let receipt = a1.next_receipt(ReceiptKind::Delivered).await?;
    assert_eq!(receipt.message_ids, vec![second, third], "one receipt for both acks");

    // Written: a new connection from bob's last position gets nothing again.
    let replay = Api::new(&bob)?.sync(Seq::ZERO, 0, None).await?;
    assert!(replay.events.is_empty(), "acknowledged entries released: {:?}", replay.events);
    Ok(())
}

#[tokio::test]
async fn with_manual_acks_nothing_is_released_until_the_application_confirms() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let mut a1 = Device::connect(&alice).await?;
    let sent = a1.send_text(&bob.user_id, "keep me until stored").await?;
    let manual = || ConnectOptions { manual_ack: true, ..ConnectOptions::default() };

    // Received but never confirmed (the application "crashed" before storing it).
    let mut b1 = Device::connect_with(&bob, manual()).await?;
    assert_eq!(b1.next_message().await?.id, sent.server_msg_id);
    let seq = next_checkpoint(&mut b1).await?;
    b1.conn.close().await;

    // A new connection from the start gets it again; this time it is confirmed.
    let mut b1 = Device::connect_with(&bob, manual()).await?;
    assert_eq!(b1.next_message().await?.id, sent.server_msg_id, "redelivered: it was never acknowledged");
    b1.conn.confirm(seq);
    // Confirmed means acknowledged: the delivered receipt (committed with the ack) reaches alice.
    let receipt = a1.next_receipt(ReceiptKind::Delivered).await?;
    assert_eq!(receipt.message_ids, vec![sent.server_msg_id]);
    b1.conn.close().await;
    // And the inbox entry is gone (default retention deletes acknowledged entries).
    let replay = Api::new(&bob)?.sync(Seq::ZERO, 0, None).await?;
    assert!(replay.events.is_empty(), "released after the confirmation: {:?}", replay.events);
    Ok(())
}
