//! Operations: health and metrics, graceful shutdown, the admin CLI, registration tokens,
//! retention, the long-poll fallback, and logs that never contain secrets or bodies.

use crate::raw;
use crate::support::{envelopes, register, text, Device, PASSWORD, T};
use parley_sdk::{Api, Client, ErrorCode, InboxEvent, RegisterRequest, Seq};
use parley_tests::{parleyd_path, TestServer};
use std::process::Stdio;

#[tokio::test]
async fn health_and_metrics() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let a1 = Device::connect(&alice).await?;
    a1.send_text(&alice.user_id, "note to self").await?;
    let (status, _) = raw::get(&server.base_url, "/healthz", None).await?;
    assert_eq!(status, 200);
    let metrics = reqwest::get(format!("{}/metrics", server.base_url)).await?.text().await?;
    for name in [
        "parley_ws_connections 1",
        "parley_messages_stored_total 1",
        "parley_send_latency_seconds_bucket",
        "parley_store_queue_depth",
    ] {
        assert!(metrics.contains(name), "missing {name} in:\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_keeps_every_sent_message() -> anyhow::Result<()> {
    let mut server = TestServer::process().await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut socket = raw::connect(&server.base_url, bob.access_token(), 0).await.expect("bob");
    raw::next_of(&mut socket, "caught_up", T).await?;
    let a1 = Device::connect(&alice).await?;
    let sent = a1.send_text(&bob.user_id, "before shutdown").await?;
    raw::next_of(&mut socket, "event", T).await?; // not acknowledged
    let status = server.stop().await?;
    assert!(status.success(), "graceful exit: {status}");
    let (code, _) = raw::next_close(&mut socket, T).await?;
    assert_eq!(code, 1001);
    server.restart().await?;
    let mut b1 = Device::connect(&bob).await?;
    assert_eq!(b1.next_message().await?.id, sent.server_msg_id, "the unacknowledged message is still there");
    Ok(())
}

async fn parleyd(server: &TestServer, args: &[&str], stdin: Option<&str>) -> anyhow::Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt as _;
    let mut command = tokio::process::Command::new(parleyd_path());
    if let Some(url) = server.database_url() {
        command.env("PARLEY__STORAGE__DATABASE_URL", url);
    }
    let mut child = command
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).await?;
    drop(input);
    let output = child.wait_with_output().await?;
    Ok((output.status.success(), String::from_utf8(output.stdout)?, String::from_utf8(output.stderr)?))
}

#[tokio::test]
async fn admin_cli_creates_users_and_registration_tokens() -> anyhow::Result<()> {
    let server = TestServer::start_with("[registration]\nmode = \"token\"\n[auth]\nargon2_memory_kib = 64\n").await?;
    // While the server runs, against the same database.
    let (ok, out, err) = parleyd(&server, &["admin", "create-user", "carol"], Some("a long password\n")).await?;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "@carol:localhost");
    let login = Client::new(&server.base_url)?.login(parley_sdk::LoginRequest::new("carol", "a long password")).await?;
    assert_eq!(login.user_id.as_str(), "@carol:localhost");
    let (ok, _, err) = parleyd(&server, &["admin", "create-user", "carol"], Some("a long password\n")).await?;
    assert!(!ok && err.contains("already exists"), "{err}");

    // Token-gated registration: none, wrong, then a token with one use.
    let client = Client::new(&server.base_url)?;
    let code = |r: Result<_, parley_sdk::Error>| r.err().and_then(|e| e.server_code());
    assert_eq!(code(client.register(RegisterRequest::new("dave", PASSWORD)).await), Some(ErrorCode::InvalidRegistrationToken));
    let (ok, token, err) = parleyd(&server, &["admin", "create-registration-token", "--uses", "1"], None).await?;
    assert!(ok, "{err}");
    let token = token.trim().to_owned();
    let mut request = RegisterRequest::new("dave", PASSWORD);
    request.registration_token = Some("pt_wrong".into());
    assert_eq!(code(client.register(request.clone()).await), Some(ErrorCode::InvalidRegistrationToken));
    request.registration_token = Some(token.clone());
    client.register(request.clone()).await?;
    let mut again = RegisterRequest::new("erin", PASSWORD);
    again.registration_token = Some(token);
    assert_eq!(code(client.register(again).await), Some(ErrorCode::InvalidRegistrationToken), "the token is used up");

    // The example configuration is what the binary prints, and it parses as the defaults.
    let (ok, example, _) = parleyd(&server, &["config-example"], None).await?;
    assert!(ok && example.contains("[storage]") && example.contains("keep_history = false"));
    let (ok, help, _) = parleyd(&server, &["--help"], None).await?;
    assert!(ok && help.contains("admin") && help.contains("--config"));
    Ok(())
}

#[tokio::test]
async fn acknowledged_entries_are_deleted_unless_history_is_kept() -> anyhow::Result<()> {
    for keep_history in [false, true] {
        let server = TestServer::start_with(&format!("[storage]\nkeep_history = {keep_history}\n")).await?;
        let alice = register(&server.base_url, "alice").await?;
        let bob = register(&server.base_url, "bob").await?;
        let a1 = Device::connect(&alice).await?;
        let sent = a1.send_text(&bob.user_id, "ephemeral?").await?;
        // Bob uses the HTTP fallback: the first sync gets the message, the second (since = its
        // cursor) acknowledges it.
        let api = Api::new(&bob)?;
        let first = api.sync(Seq::ZERO, 10_000, None).await?;
        assert_eq!(first.events.len(), 1);
        match &first.events[0].event {
            InboxEvent::Message(m) => assert_eq!((m.id, text(m).as_str()), (sent.server_msg_id, "ephemeral?")),
            other => panic!("unexpected {other:?}"),
        }
        let second = api.sync(first.cursor, 0, None).await?;
        assert!(second.events.is_empty());
        let replay = api.sync(Seq::ZERO, 0, None).await?;
        assert_eq!(replay.events.len(), usize::from(keep_history), "keep_history = {keep_history}");
    }
    Ok(())
}

#[tokio::test]
async fn long_poll_sync_wakes_on_a_new_message_and_acks_into_receipts() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let mut a1 = Device::connect(&alice).await?;
    let api = Api::new(&bob)?;
    // The poll is waiting (60 s timeout) when the message is sent; it returns with it.
    let poll = tokio::spawn(async move { api.sync(Seq::ZERO, 60_000, None).await });
    let body = envelopes(&alice, &bob.user_id, b"wake up").await?;
    // (If the send wins the race with the poll's start, the poll returns it at once.)
    let sent = a1.conn.send(bob.user_id.clone(), body).await?;
    let response = tokio::time::timeout(T, poll).await???;
    assert_eq!(response.events.len(), 1);
    Api::new(&bob)?.sync(response.cursor, 0, None).await?;
    let receipt = a1.next_receipt(parley_sdk::ReceiptKind::Delivered).await?;
    assert_eq!(receipt.message_ids, vec![sent.server_msg_id]);
    Ok(())
}

#[tokio::test]
async fn logs_contain_no_tokens_passwords_or_bodies() -> anyhow::Result<()> {
    let server = TestServer::start_with("[log]\nfilter = \"trace\"\n").await?;
    let alice = register(&server.base_url, "alice").await?;
    let bob = register(&server.base_url, "bob").await?;
    let a1 = Device::connect(&alice).await?;
    let mut b1 = Device::connect(&bob).await?;
    let secret = "the-secret-message-body-42";
    a1.send_text(&bob.user_id, secret).await?;
    b1.next_message().await?;
    let logs = server.logs();
    assert!(logs.contains("registered"), "logs are captured");
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(secret);
    for needle in [alice.access_token(), bob.access_token(), PASSWORD, secret, &encoded] {
        assert!(!logs.contains(needle), "log leaks {needle:?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_server_publishes_a_self_signed_key_document_that_survives_restarts() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let fetch = |base: String| async move {
        let document: parley_sdk::spec::federation::v1::keys::ServerKeys =
            reqwest::get(format!("{base}/_parley/key/v1")).await?.error_for_status()?.json().await?;
        anyhow::Ok(document)
    };
    let name = parley_sdk::spec::ServerName::parse("localhost")?;
    let now = parley_sdk::Timestamp::now();
    let first = fetch(server.base_url.clone()).await?;
    let keys = parley_federation::verify_server_keys(&first, &name, now)?;
    assert_eq!(keys.current.len(), 1);
    assert!(keys.current.keys().all(|id| id.starts_with("ed25519:")));
    server.stop().await?;
    server.restart().await?;
    let second = fetch(server.base_url.clone()).await?;
    let again = parley_federation::verify_server_keys(&second, &name, now)?;
    assert_eq!(keys, again, "the key is kept in the data directory");
    Ok(())
}

#[tokio::test]
async fn a_second_server_on_the_same_data_directory_is_refused_until_the_first_stops() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let config = parley_server::config::Config { data_dir: server.data_dir(), ..Default::default() };
    let second = parley_server::app::Server::open(config.clone()).await.err().map(|e| e.to_string());
    assert!(
        second.as_deref().is_some_and(|e| e.contains("another parleyd uses the data directory")),
        "a second server on the same directory: {second:?}"
    );
    server.stop().await?;
    let after = parley_server::app::Server::open(config).await;
    assert!(after.is_ok(), "once the first stopped, the directory is free: {:?}", after.err().map(|e| e.to_string()));
    Ok(())
}
