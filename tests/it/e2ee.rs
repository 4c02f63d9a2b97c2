//! End-to-end encryption through a real server: devices chat, histories agree, an offline
//! device catches up, the server holds no plaintext, and a malicious server is detected.

use anyhow::{bail, Context as _};
use parley_sdk::messenger::{Messenger, MessengerEvent, MessengerEvents};
use parley_sdk::{ServerMsgId, Timestamp, UserId};
use parley_tests::TestServer;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
const PASSWORD: &str = "correct horse";

/// Waits for an event `pick` accepts, skipping others.
pub(crate) async fn next<T>(
    events: &mut MessengerEvents,
    mut pick: impl FnMut(MessengerEvent) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next()).await.context("timed out waiting for a messenger event")?;
        let Some(event) = event else { bail!("messenger stopped") };
        if let Some(found) = pick(event) {
            return Ok(found);
        }
    }
}

async fn next_text(events: &mut MessengerEvents) -> anyhow::Result<(String, String)> {
    next(events, |e| match e {
        MessengerEvent::Message(m) => Some((m.sender.to_string(), m.body)),
        _ => None,
    })
    .await
}

struct Account {
    messenger: Messenger,
    events: MessengerEvents,
}

async fn register(server: &TestServer, dir: &Path, name: &str) -> anyhow::Result<(Account, zeroize::Zeroizing<[u8; 32]>)> {
    let (messenger, events, recovery) =
        Messenger::register(&server.base_url, &dir.join(format!("{name}-1.db")), name, PASSWORD).await?;
    Ok((Account { messenger, events }, recovery))
}

async fn add_device(server: &TestServer, dir: &Path, name: &str, recovery: &[u8; 32]) -> anyhow::Result<Account> {
    let (messenger, events) =
        Messenger::add_device(&server.base_url, &dir.join(format!("{name}-2.db")), name, PASSWORD, recovery).await?;
    Ok(Account { messenger, events })
}

fn user(account: &Account) -> UserId {
    account.messenger.session().user_id.clone()
}

#[tokio::test]
async fn two_users_with_two_devices_chat_end_to_end_and_the_server_sees_no_plaintext() -> anyhow::Result<()> {
    let server = TestServer::start_with("[log]\nfilter = \"debug\"\n").await?;
    let dir = tempfile::tempdir()?;
    let (mut a1, alice_recovery) = register(&server, dir.path(), "alice").await?;
    let (mut b1, bob_recovery) = register(&server, dir.path(), "bob").await?;
    let mut a2 = add_device(&server, dir.path(), "alice", &alice_recovery).await?;
    let mut b2 = add_device(&server, dir.path(), "bob", &bob_recovery).await?;
    let (alice, bob) = (user(&a1), user(&b1));

    let secrets = ["the eagle lands at midnight", "bring the blue folder", "réponse: oui 👍", "last one from a2"];
    a1.messenger.send_text(&bob, secrets[0]).await?;
    for device in [&mut b1, &mut b2, &mut a2] {
        assert_eq!(next_text(&mut device.events).await?, (alice.to_string(), secrets[0].to_owned()));
    }
    b2.messenger.send_text(&alice, secrets[1]).await?;
    for device in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(next_text(&mut device.events).await?, (bob.to_string(), secrets[1].to_owned()));
    }
    b1.messenger.send_text(&alice, secrets[2]).await?;
    for device in [&mut a1, &mut a2, &mut b2] {
        assert_eq!(next_text(&mut device.events).await?.1, secrets[2]);
    }
    a2.messenger.send_text(&bob, secrets[3]).await?;
    for device in [&mut a1, &mut b1, &mut b2] {
        assert_eq!(next_text(&mut device.events).await?.1, secrets[3]);
    }
    // Receipts, typing and presence come through the same typed stream.
    let read_id = next_stored_id(&a1, &bob, secrets[1]).await?;
    a1.messenger.mark_read(&bob, vec![read_id]).await?;
    let read = next(&mut b2.events, |e| match e {
        MessengerEvent::Read { by, message_ids } => Some((by, message_ids)),
        _ => None,
    })
    .await?;
    assert_eq!(read, (alice.clone(), vec![read_id]));
    b1.messenger.typing(&alice, true).await?;
    let typing = next(&mut a1.events, |e| match e {
        MessengerEvent::Typing(t) => Some(t),
        _ => None,
    })
    .await?;
    assert!(typing.typing && typing.from == bob);
    let presence = a1.messenger.subscribe_presence(vec![bob.clone()]).await?;
    assert_eq!(presence[0].status, parley_sdk::PresenceStatus::Online);
    b1.messenger.close().await;
    b2.messenger.close().await;
    let offline = next(&mut a1.events, |e| match e {
        MessengerEvent::Presence(p) if p.status == parley_sdk::PresenceStatus::Offline => Some(p),
        _ => None,
    })
    .await?;
    assert_eq!(offline.user, bob);

    // A note to self reaches the other own device only.
    a1.messenger.send_text(&alice, "note to self").await?;
    assert_eq!(next_text(&mut a2.events).await?, (alice.to_string(), "note to self".to_owned()));

    // Every device shows the same conversation, in the same order.
    let history = |account: &Account, peer: &UserId| {
        let store = account.messenger.store().clone();
        let peer = peer.clone();
        async move {
            let messages = store.history(&peer, 100).await?;
            anyhow::Ok(messages.into_iter().map(|m| (m.sender, m.client_msg_id, m.body)).collect::<Vec<_>>())
        }
    };
    assert_eq!(history(&a1, &alice).await?, history(&a2, &alice).await?, "both devices file the note under alice");
    let reference = history(&a1, &bob).await?;
    assert_eq!(reference.len(), 4);
    assert_eq!(history(&a2, &bob).await?, reference);
    assert_eq!(history(&b1, &alice).await?, reference);
    assert_eq!(history(&b2, &alice).await?, reference);

    // The server's database (and its write-ahead log) and its logs hold none of the plaintexts.
    let raw = server.stored_bytes().await?;
    assert!(raw.len() > 10_000, "read the database");
    let logs = server.logs();
    for secret in secrets {
        assert!(!contains(&raw, secret.as_bytes()), "plaintext {secret:?} found in the server database");
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!contains(&raw, hex.as_bytes()), "plaintext {secret:?} found in the server database (hex)");
        assert!(!logs.contains(secret), "plaintext {secret:?} found in the server log");
    }
    Ok(())
}

/// The server id of the message `body` in `account`'s conversation with `peer`.
async fn next_stored_id(account: &Account, peer: &UserId, body: &str) -> anyhow::Result<ServerMsgId> {
    let history = account.messenger.store().history(peer, 100).await?;
    history.into_iter().find(|m| m.body == body).and_then(|m| m.server_msg_id).context("stored with its server id")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_device_offline_for_500_messages_catches_up_decrypted() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (a1, _) = register(&server, dir.path(), "alice").await?;
    let (mut b1, _) = register(&server, dir.path(), "bob").await?;
    let bob = user(&b1);
    // A first message establishes the session, then bob goes offline.
    a1.messenger.send_text(&bob, "hello").await?;
    assert_eq!(next_text(&mut b1.events).await?.1, "hello");
    b1.messenger.close().await;
    drop(b1);
    for i in 0..500 {
        a1.messenger.send_text(&bob, &format!("message {i}")).await?;
    }
    let (messenger, mut events) = Messenger::open(&dir.path().join("bob-1.db")).await?;
    for i in 0..500 {
        assert_eq!(next_text(&mut events).await?.1, format!("message {i}"));
    }
    assert_eq!(messenger.store().history(&user(&a1), 1000).await?.len(), 501);
    Ok(())
}

/// Stops the server (gracefully), lets `tamper` edit its database as a malicious server would,
/// and starts it again (its caches start empty); connected SDKs reconnect by themselves.
async fn tamper<F, Fut>(server: &mut TestServer, tamper: F) -> anyhow::Result<()>
where
    F: FnOnce(sqlx::AnyPool) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    server.stop().await?;
    let db = server.db_writable().await?;
    tamper(db.clone()).await?;
    if server.backend() == parley_tests::Backend::Postgres {
        // Rows written by hand: their devices' inbox heads move past them as a batch's would
        // (PostgreSQL migration 0003), or the server's next row would take a seq again.
        sqlx::query(
            "UPDATE inbox_heads SET last_seq = m.s FROM (SELECT device, max(seq) AS s FROM inbox GROUP BY device) AS m \
             WHERE m.device = inbox_heads.device AND m.s > inbox_heads.last_seq",
        )
        .execute(&db)
        .await?;
    }
    db.close().await;
    server.restart().await
}

async fn list_json(db: &sqlx::AnyPool, localpart: &str) -> anyhow::Result<Vec<u8>> {
    Ok(sqlx::query_scalar("SELECT l.json FROM device_lists l JOIN users u ON u.id = l.user_id WHERE u.localpart = $1")
        .bind(localpart)
        .fetch_one(db)
        .await?)
}

async fn set_list(db: &sqlx::AnyPool, localpart: &str, version: i64, json: &[u8]) -> anyhow::Result<()> {
    sqlx::query("UPDATE device_lists SET version = $1, json = $2 WHERE user_id = (SELECT id FROM users WHERE localpart = $3)")
        .bind(version)
        .bind(json)
        .bind(localpart)
        .execute(db)
        .await?;
    Ok(())
}

fn is_untrusted(error: &parley_sdk::messenger::MessengerError) -> bool {
    matches!(error, parley_sdk::messenger::MessengerError::Untrusted { .. })
}

#[tokio::test]
async fn a_server_that_replays_an_old_device_list_is_detected() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (mut a1, _) = register(&server, dir.path(), "alice").await?;
    let (mut b1, bob_recovery) = register(&server, dir.path(), "bob").await?;
    let bob = user(&b1);
    let db = server.db_writable().await?;
    let list_v1 = list_json(&db, "bob").await?;
    db.close().await;
    // Bob adds a device (v2) and alice learns it.
    let mut b2 = add_device(&server, dir.path(), "bob", &bob_recovery).await?;
    a1.messenger.send_text(&bob, "hello both").await?;
    assert_eq!(next_text(&mut b1.events).await?.1, "hello both");
    assert_eq!(next_text(&mut b2.events).await?.1, "hello both");
    // The server replays v1 (hiding the device list change): a rollback.
    tamper(&mut server, |db| async move { set_list(&db, "bob", 1, &list_v1).await }).await?;
    let error = a1.messenger.refresh_devices(&bob).await.expect_err("a replayed list is refused");
    assert!(is_untrusted(&error) && error.to_string().contains("older than version 2"), "{error}");
    next(&mut a1.events, |e| matches!(e, MessengerEvent::Untrusted { .. }).then_some(())).await?;
    Ok(())
}

#[tokio::test]
async fn a_server_that_injects_a_device_gets_no_message_for_it() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (a1, _) = register(&server, dir.path(), "alice").await?;
    let (mut c1, _) = register(&server, dir.path(), "carol").await?;
    let carol = user(&c1);
    a1.messenger.send_text(&carol, "hi carol").await?;
    assert_eq!(next_text(&mut c1.events).await?.1, "hi carol");
    // The server adds a device to carol's account and to her device list (it cannot sign it).
    tamper(&mut server, |db| async move {
        let mut list: serde_json::Value = serde_json::from_slice(&list_json(&db, "carol").await?)?;
        let mut evil = list["devices"][0].clone();
        evil["device_id"] = serde_json::json!("ZZZZEVIL");
        list["devices"].as_array_mut().context("devices")?.push(evil);
        list["version"] = serde_json::json!(2);
        set_list(&db, "carol", 2, &serde_json::to_vec(&list)?).await?;
        sqlx::query(
            "INSERT INTO devices (user_id, device_id, token_hash, created_ts) SELECT id, 'ZZZZEVIL', $1, 0 FROM users WHERE localpart = 'carol'",
        )
        .bind(vec![0u8])
        .execute(&db)
        .await?;
        Ok(())
    })
    .await?;
    // The server now insists on an envelope for its device; alice refreshes, the forged list
    // fails verification, and the message is held back.
    let error = a1.messenger.send_text(&carol, "secret for carol only").await.expect_err("nothing for the injected device");
    assert!(is_untrusted(&error), "{error}");
    let db = server.db_writable().await?;
    let injected: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inbox WHERE device = (SELECT id FROM devices WHERE device_id = 'ZZZZEVIL')")
            .fetch_one(&db)
            .await?;
    assert_eq!(injected, 0, "no ciphertext was made for the injected device");
    assert_eq!(a1.messenger.store().outbox().await?.len(), 1, "the message waits in the outbox");
    Ok(())
}

#[tokio::test]
async fn a_server_that_swaps_a_prekey_bundle_is_detected() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (a1, _) = register(&server, dir.path(), "alice").await?;
    let (_d1, _) = register(&server, dir.path(), "dave").await?;
    let dave = "@dave:localhost".parse::<UserId>()?;
    // The server replaces dave's device keys with keys it made up (self-signed, but not the
    // keys dave's signed device list names).
    tamper(&mut server, |db| async move {
        let forged = parley_crypto::identity::DeviceIdentity::generate(&mut rand::rngs::OsRng);
        let (device, device_id): (i64, String) =
            sqlx::query_as("SELECT d.id, d.device_id FROM devices d JOIN users u ON u.id = d.user_id WHERE u.localpart = 'dave'")
                .fetch_one(&db)
                .await?;
        let keys = forged.device_keys(&"@dave:localhost".parse()?, &device_id.parse()?);
        sqlx::query("UPDATE device_keys SET json = $1 WHERE device = $2")
            .bind(serde_json::to_vec(&keys)?)
            .bind(device)
            .execute(&db)
            .await?;
        Ok(())
    })
    .await?;
    let error = a1.messenger.send_text(&dave, "for dave").await.expect_err("a swapped bundle is refused");
    assert!(is_untrusted(&error) && error.to_string().contains("prekey bundle"), "{error}");
    Ok(())
}

#[tokio::test]
async fn tampered_replayed_and_truncated_ciphertexts_are_rejected() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (a1, _) = register(&server, dir.path(), "alice").await?;
    let (mut b1, _) = register(&server, dir.path(), "bob").await?;
    let bob = user(&b1);
    a1.messenger.send_text(&bob, "session start").await?;
    assert_eq!(next_text(&mut b1.events).await?.1, "session start");
    b1.messenger.close().await;
    drop(b1);
    for text in ["one", "two", "three", "four"] {
        a1.messenger.send_text(&bob, text).await?;
    }
    // While bob is offline the server flips a byte of "two", truncates "three", and replays
    // "one" (a copy with a new inbox position) after "four".
    tamper(&mut server, |db| async move {
        let device: i64 = sqlx::query_scalar("SELECT d.id FROM devices d JOIN users u ON u.id = d.user_id WHERE u.localpart = 'bob'")
            .fetch_one(&db)
            .await?;
        let all: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT seq, payload FROM inbox WHERE device = $1 ORDER BY seq").bind(device).fetch_all(&db).await?;
        // The last four are "one".."four" (the first message may still be there, unacknowledged).
        anyhow::ensure!(all.len() >= 4, "four queued messages, found {}", all.len());
        let rows = &all[all.len() - 4..];
        let edit = |payload: &[u8], change: &dyn Fn(&mut Vec<u8>)| -> anyhow::Result<Vec<u8>> {
            use base64::Engine as _;
            let mut event: serde_json::Value = serde_json::from_slice(payload)?;
            let mut bytes = base64::engine::general_purpose::STANDARD.decode(event["ciphertext"].as_str().context("ciphertext")?)?;
            change(&mut bytes);
            event["ciphertext"] = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            Ok(serde_json::to_vec(&event)?)
        };
        let flipped = edit(&rows[1].1, &|b| {
            let last = b.len() - 20;
            b[last] ^= 1;
        })?;
        let truncated = edit(&rows[2].1, &|b| b.truncate(b.len() / 2))?;
        for (seq, payload) in [(rows[1].0, flipped), (rows[2].0, truncated)] {
            sqlx::query("UPDATE inbox SET payload = $1 WHERE device = $2 AND seq = $3").bind(payload).bind(device).bind(seq).execute(&db).await?;
        }
        sqlx::query("INSERT INTO inbox (device, seq, sender, msg_id, payload) SELECT device, $1 , sender, msg_id, payload FROM inbox WHERE device = $2 AND seq = $3")
            .bind(rows[3].0 + 1)
            .bind(device)
            .bind(rows[0].0)
            .execute(&db)
            .await?;
        Ok(())
    })
    .await?;
    let (messenger, mut events) = Messenger::open(&dir.path().join("bob-1.db")).await?;
    // A marker sent after the replay: everything queued before it has been handled when it arrives.
    a1.messenger.send_text(&bob, "five").await?;
    let mut texts = Vec::new();
    let mut rejected = 0;
    while texts.last().map(String::as_str) != Some("five") {
        match next(&mut events, |e| match e {
            MessengerEvent::Message(m) => Some(Ok(m.body)),
            MessengerEvent::Undecryptable { reason, .. } => Some(Err(reason)),
            _ => None,
        })
        .await?
        {
            Ok(body) => texts.push(body),
            Err(_) => rejected += 1,
        }
    }
    // Only the untouched messages are shown; the replayed copy of "one" never is (the SDK
    // drops repeated message ids, and its message key was used anyway).
    assert_eq!(texts, ["one", "four", "five"]);
    assert!(rejected >= 2, "the flipped and the truncated ones are rejected ({rejected})");
    assert_eq!(messenger.store().history(&user(&a1), 10).await?.len(), 4, "history: session start, one, four, five");
    Ok(())
}

#[tokio::test]
async fn a_wrong_recovery_secret_adds_no_device() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (a1, _) = register(&server, dir.path(), "alice").await?;
    let wrong = [7u8; 32];
    let error = Messenger::add_device(&server.base_url, &dir.path().join("alice-2.db"), "alice", PASSWORD, &wrong)
        .await
        .err()
        .context("a wrong recovery secret is refused")?;
    assert!(matches!(error, parley_sdk::messenger::MessengerError::Untrusted { .. }), "{error}");
    let devices = parley_sdk::Api::new(a1.messenger.session())?.devices().await?;
    assert_eq!(devices.devices.len(), 1, "the device created by the login was removed again");
    Ok(())
}

#[tokio::test]
async fn both_sides_starting_a_session_at_once_still_understand_each_other() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    for round in 0..5 {
        let (alice_name, bob_name) = (format!("alice{round}"), format!("bob{round}"));
        let (mut a, _) = register(&server, dir.path(), &alice_name).await?;
        let (mut b, _) = register(&server, dir.path(), &bob_name).await?;
        let (alice, bob) = (user(&a), user(&b));
        // Both send their first message at the same time: each starts its own session.
        let (sent_a, sent_b) =
            tokio::join!(a.messenger.send_text(&bob, "hi from alice"), b.messenger.send_text(&alice, "hi from bob"));
        sent_a?;
        sent_b?;
        assert_eq!(next_text(&mut b.events).await?.1, "hi from alice");
        assert_eq!(next_text(&mut a.events).await?.1, "hi from bob");
        // And the conversation goes on in both directions.
        for i in 0..3 {
            a.messenger.send_text(&bob, &format!("a{i}")).await?;
            assert_eq!(next_text(&mut b.events).await?.1, format!("a{i}"));
            b.messenger.send_text(&alice, &format!("b{i}")).await?;
            assert_eq!(next_text(&mut a.events).await?.1, format!("b{i}"));
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_receipt_by_someone_the_message_did_not_go_to_is_not_applied() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let dir = tempfile::tempdir()?;
    let (mut a1, _) = register(&server, dir.path(), "alice").await?;
    let (mut b1, _) = register(&server, dir.path(), "bob").await?;
    let (alice, bob) = (user(&a1), user(&b1));
    a1.messenger.send_text(&bob, "for bob").await?;
    assert_eq!(next_text(&mut b1.events).await?.1, "for bob");
    let id = next_stored_id(&a1, &bob, "for bob").await?;
    // The server puts a read receipt by mallory for alice's message to bob into alice's inbox.
    let forged = parley_spec::v1::events::InboxEvent::Receipt(parley_spec::v1::events::ReceiptEvent::new(
        parley_spec::v1::events::ReceiptKind::Read,
        "@mallory:localhost".parse()?,
        "EVIL".parse()?,
        alice.clone(),
        vec![id],
        Timestamp::EPOCH,
    ));
    let payload = serde_json::to_vec(&forged)?;
    tamper(&mut server, |db| async move {
        sqlx::query(
            "INSERT INTO inbox (device, seq, payload) SELECT d.id, \
             CASE WHEN d.acked_seq > coalesce((SELECT max(seq) FROM inbox WHERE device = d.id), 0) THEN d.acked_seq \
             ELSE coalesce((SELECT max(seq) FROM inbox WHERE device = d.id), 0) END + 1, $1 \
             FROM devices d JOIN users u ON u.id = d.user_id WHERE u.localpart = 'alice'",
        )
        .bind(payload)
        .execute(&db)
        .await?;
        Ok(())
    })
    .await?;
    // Bob really reads it afterwards: the first read alice's messenger reports is his.
    b1.messenger.mark_read(&alice, vec![id]).await?;
    let read = next(&mut a1.events, |e| match e {
        MessengerEvent::Read { by, message_ids } => Some((by, message_ids)),
        _ => None,
    })
    .await?;
    assert_eq!(read, (bob.clone(), vec![id]));
    Ok(())
}
