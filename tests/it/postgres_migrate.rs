//! `parleyd migrate --to postgres://…` (issue 13): a stopped server's SQLite database moves
//! into an empty PostgreSQL database, every row, with its counters; refused while the server
//! runs or into a database that is not empty; the SQLite database is left as it was.

use crate::media::b64;
use crate::raw;
use crate::support::T;
use anyhow::Context as _;
use parley_tests::postgres::TestDb;
use parley_tests::{Backend, TestServer};
use serde_json::json;
use sqlx::Row as _;

#[tokio::test]
async fn a_stopped_servers_database_moves_to_postgresql_with_every_row_and_its_counters() -> anyhow::Result<()> {
    let mut server = TestServer::start_on(Backend::Sqlite, "").await?;
    let base = server.base_url.clone();
    let alice = raw::register(&base, "alice").await?;
    let bob = raw::register(&base, "bob").await?;
    for i in 0..30u8 {
        let send = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id,
            "envelopes": [{"user": bob.user_id, "device": bob.device_id, "ciphertext": b64(&[i; 50])}]});
        let (status, body) = raw::post(&base, "/v1/send", Some(&alice.token), &send).await?;
        assert_eq!(status, 200, "{body}");
    }
    // Bob reads and acknowledges the first ten: a cursor and receipts to carry over.
    let mut socket = raw::connect(&base, &bob.token, 0).await.map_err(|s| anyhow::anyhow!("connect: {s}"))?;
    let mut seq = 0;
    for _ in 0..10 {
        seq = raw::next_of(&mut socket, "event", T).await?["seq"].as_u64().context("seq")?;
    }
    raw::send_json(&mut socket, &json!({"type": "ack", "seq": seq})).await?;
    let watched = server.db().await?;
    crate::media::eventually("bob's acknowledgement is stored", || async {
        let acked: i64 = sqlx::query_scalar("SELECT max(acked_seq) FROM devices").fetch_one(&watched).await?;
        Ok(acked == seq as i64)
    })
    .await?;
    watched.close().await;
    drop(socket);

    let db = TestDb::create().await?;
    let config = parley_server::config::Config { data_dir: server.data_dir(), ..Default::default() };
    let refused = parley_server::cli::migrate(&config, &db.url).await.expect_err("refused while the server runs");
    assert!(refused.to_string().contains("another parleyd uses the data directory"), "{refused}");

    server.stop().await?;
    let counts = parley_server::cli::migrate(&config, &db.url).await?;
    let count = |table: &str| counts.iter().find(|(t, _)| t == table).map(|(_, rows)| *rows);
    assert_eq!(count("users"), Some(2));
    assert_eq!(count("messages"), Some(30));

    // Every table holds what SQLite holds: counts, and the inbox byte for byte.
    let sqlite = server.db().await?;
    let pg = db.pool().await?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(&sqlite)
    .await?;
    assert_eq!(counts.len(), tables.len(), "every table is copied");
    for table in &tables {
        let in_sqlite: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&sqlite).await?;
        let in_pg: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}")).fetch_one(&pg).await?;
        assert_eq!((table, in_pg), (table, in_sqlite));
    }
    let inbox = "SELECT device, seq, payload FROM inbox ORDER BY device, seq";
    let from_sqlite: Vec<(i64, i64, Vec<u8>)> =
        sqlx::query(inbox).fetch_all(&sqlite).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let from_pg: Vec<(i64, i64, Vec<u8>)> =
        sqlx::query(inbox).fetch_all(&pg).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert!(from_sqlite.len() >= 20, "bob's inbox holds the unacknowledged messages: {}", from_sqlite.len());
    assert_eq!(from_pg, from_sqlite);
    let acked = "SELECT id, acked_seq FROM devices ORDER BY id";
    let cursors_sqlite: Vec<(i64, i64)> = sqlx::query_as(acked).fetch_all(&sqlite).await?;
    let cursors_pg: Vec<(i64, i64)> = sqlx::query_as(acked).fetch_all(&pg).await?;
    assert_eq!(cursors_pg, cursors_sqlite);

    // New rows get ids after the copied ones.
    let largest: i64 = sqlx::query_scalar("SELECT max(id) FROM users").fetch_one(&sqlite).await?;
    let next: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('users', 'id'))").fetch_one(&pg).await?;
    assert!(next > largest, "the users sequence goes on after {largest}: {next}");

    // Not twice into the same database.
    let again = parley_server::cli::migrate(&config, &db.url).await.expect_err("the target is not empty");
    assert!(again.to_string().contains("not empty"), "{again}");
    let bob_device: i64 =
        sqlx::query_scalar("SELECT d.id FROM devices d JOIN users u ON u.id = d.user_id WHERE u.localpart = 'bob'")
            .fetch_one(&sqlite)
            .await?;
    pg.close().await;
    sqlite.close().await;

    // The SQLite server starts again on its database, unchanged.
    server.restart().await?;
    let session = raw::login(&base, "alice").await?;
    assert!(!session.token.is_empty());

    // The same server (data directory: its key, its files) now runs on PostgreSQL.
    server.stop().await?;
    server.move_to_postgres(db)?;
    server.restart().await?;
    // Every session still holds, and bob reads on from his cursor the messages he had not
    // acknowledged, the same events in the same order.
    let unread: Vec<&Vec<u8>> =
        from_sqlite.iter().filter(|(device, at, _)| *device == bob_device && *at > seq as i64).map(|(_, _, p)| p).collect();
    assert_eq!(unread.len(), 20);
    let mut socket = raw::connect(&base, &bob.token, seq).await.map_err(|s| anyhow::anyhow!("connect on PostgreSQL: {s}"))?;
    let mut last = seq;
    for (i, payload) in unread.iter().enumerate() {
        let event = raw::next_of(&mut socket, "event", T).await?;
        last = event["seq"].as_u64().context("seq")?;
        let stored: serde_json::Value = serde_json::from_slice(payload)?;
        assert_eq!(event["event"], stored, "event {i} after the cursor");
        assert_eq!(event["event"]["ciphertext"], json!(b64(&[10 + i as u8; 50])));
    }
    raw::send_json(&mut socket, &json!({"type": "ack", "seq": last})).await?;
    // And they keep chatting, both ways: alice's first device (its session held) to bob and
    // to her device logged in on PostgreSQL with her password (the login on SQLite after the
    // copy is not in PostgreSQL), and back.
    let alice_again = raw::login(&base, "alice").await?;
    let alice_devices = [&alice.device_id, &alice_again.device_id];
    let envelope = |user: &str, device: &str, text: &[u8]| json!({"user": user, "device": device, "ciphertext": b64(text)});
    let mut envelopes = vec![envelope(&bob.user_id, &bob.device_id, b"after the move")];
    envelopes.extend(alice_devices[1..].iter().map(|d| envelope(&alice.user_id, d, b"after the move")));
    let send = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": bob.user_id, "envelopes": envelopes});
    let (status, body) = raw::post(&base, "/v1/send", Some(&alice.token), &send).await?;
    assert_eq!(status, 200, "{body}");
    let event = raw::next_of(&mut socket, "event", T).await?;
    assert_eq!(event["seq"].as_u64(), Some(last + 1), "bob's inbox goes on where it was");
    assert_eq!(event["event"]["ciphertext"], json!(b64(b"after the move")));
    let envelopes: Vec<_> = alice_devices.iter().map(|d| envelope(&alice.user_id, d, b"got it")).collect();
    let reply = json!({"client_msg_id": uuid::Uuid::new_v4(), "to": alice.user_id, "envelopes": envelopes});
    let (status, body) = raw::post(&base, "/v1/send", Some(&bob.token), &reply).await?;
    assert_eq!(status, 200, "{body}");
    let mut alice_socket = raw::connect(&base, &alice.token, 0).await.map_err(|s| anyhow::anyhow!("connect: {s}"))?;
    loop {
        let event = raw::next_of(&mut alice_socket, "event", T).await?;
        if event["event"]["ciphertext"] == json!(b64(b"got it")) {
            break;
        }
    }
    Ok(())
}
