//! Several workers of one homeserver: one PostgreSQL database, NATS between them. Users
//! connected to different workers chat as on one server.

use crate::support::{login, register, Device};
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
    let db = one.db().await?;
    crate::media::eventually("b2's disconnection is handled", || async {
        let seen: Option<i64> = sqlx::query_scalar("SELECT last_seen_ts FROM devices WHERE device_id = $1")
            .bind(bob_on_one.device_id.as_str())
            .fetch_one(&db)
            .await?;
        Ok(seen.is_some())
    })
    .await?;
    db.close().await;
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
