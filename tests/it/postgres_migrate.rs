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
    pg.close().await;
    sqlite.close().await;

    // The SQLite server starts again on its database, unchanged.
    server.restart().await?;
    let session = raw::login(&base, "alice").await?;
    assert!(!session.token.is_empty());
    Ok(())
}
