//! The durable federation queue under faults: the sending server SIGKILLed with a full queue,
//! and connections cut in the middle of a transaction by a TCP proxy between the servers.
//!
//! Receivers here see what the server really sends: the SDK's dedupe window is off (a repeat
//! would show up as a second message) and they never acknowledge, so every inbox row stays in
//! the destination's database and can be counted there too.

use crate::support::{self, Device};
use anyhow::{bail, ensure, Context as _};
use parley_sdk::{ConnectOptions, Envelope, Event, Session, UserId};
use parley_tests::fednet::{Discovery, FedNet};
use parley_tests::TestServer;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for a batch of messages to arrive.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A device that sees every message event the server sends: no SDK dedupe, no acks (so the
/// server keeps every inbox row and sends no delivered receipts back).
pub(crate) async fn raw_receiver(session: &Session) -> anyhow::Result<Device> {
    let options = ConnectOptions { dedupe_window: 0, manual_ack: true, ..ConnectOptions::default() };
    Device::connect_with(session, options).await
}

/// The texts of the next `count` messages, in arrival order.
pub(crate) async fn receive_texts(device: &mut Device, count: usize) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while texts.len() < count {
        let event = tokio::time::timeout_at(deadline, device.next(Some))
            .await
            .with_context(|| format!("timed out after {} of {count} messages", texts.len()))??;
        if let Event::Message(m) = event {
            texts.push(support::text(&m));
        }
    }
    Ok(texts)
}

/// Sends each text as one message from `sender` to `to`, addressed like `template` (the
/// recipient's devices as `support::envelopes` found them), waiting for each `sent`.
pub(crate) async fn send_texts(sender: &Device, to: &UserId, template: &[Envelope], texts: &[String]) -> anyhow::Result<()> {
    for text in texts {
        let envelopes =
            template.iter().map(|e| Envelope::new(e.user.clone(), e.device.clone(), text.as_bytes().to_vec())).collect();
        sender.conn.send(to.clone(), envelopes).await.with_context(|| format!("sending {:.20}", text))?;
    }
    Ok(())
}

/// The server's database, read-only, while it runs.
pub(crate) async fn server_db(server: &TestServer) -> anyhow::Result<sqlx::SqlitePool> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.data_dir().join("parley.db"))
        .read_only(true)
        .busy_timeout(Duration::from_secs(10));
    Ok(sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await?)
}

/// Inbox rows of messages from `sender` on `server`: (rows, distinct message ids).
pub(crate) async fn inbox_rows_from(server: &TestServer, sender: &UserId) -> anyhow::Result<(i64, i64)> {
    let db = server_db(server).await?;
    let row: (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT msg_id) FROM inbox WHERE sender = ?")
        .bind(sender.as_str())
        .fetch_one(&db)
        .await?;
    db.close().await;
    Ok(row)
}

async fn queued_for(server: &TestServer, destination: &str) -> anyhow::Result<i64> {
    let db = server_db(server).await?;
    let count =
        sqlx::query_scalar("SELECT count(*) FROM fed_outbound WHERE destination = ?").bind(destination).fetch_one(&db).await?;
    db.close().await;
    Ok(count)
}

/// A counter of the server's Prometheus metrics (`parley_<name>_total`).
async fn counter(server: &TestServer, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::get(format!("{}/metrics", server.base_url)).await?.text().await?;
    let metric = format!("parley_{name}_total ");
    let line = text.lines().find(|l| l.starts_with(&metric)).with_context(|| format!("no {metric} in /metrics"))?;
    Ok(line[metric.len()..].trim().parse::<f64>()? as u64)
}

fn numbered(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("message {i:04}")).collect()
}

#[tokio::test]
async fn sender_killed_with_a_full_queue_delivers_everything_after_restart() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let alice_id = alice_session.user_id.clone();
    let bob_id = bob_session.user_id.clone();
    let alice = Device::connect(&alice_session).await?;
    let bob = raw_receiver(&bob_session).await?;
    // a.test learns bob's devices while b.test is up, and keeps them.
    let template = support::envelopes(&alice_session, &bob_id, b"x").await?;
    ensure!(template.len() == 1, "expected bob's one device, got {template:?}");
    drop(bob);
    net.server("b.test").stop().await?;

    // Every `sent` means durably queued at a.test; b.test is down, so all 300 are still queued.
    let texts = numbered(300);
    send_texts(&alice, &bob_id, &template, &texts).await?;
    assert_eq!(queued_for(net.server("a.test"), "b.test").await?, 300, "a.test's queue after 300 sends");
    drop(alice);
    net.server("a.test").kill().await?;
    net.server("b.test").restart().await?;
    net.server("a.test").restart().await?;

    let mut bob = raw_receiver(&bob_session).await?;
    assert_eq!(receive_texts(&mut bob, 300).await?, texts);
    // Nothing twice: the next message after the 300 is a fresh marker.
    let alice = Device::connect(&alice_session).await?;
    send_texts(&alice, &bob_id, &template, &["marker".to_owned()]).await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["marker"]);
    // And b.test stored each message once (bob never acknowledged: every row is still there).
    assert_eq!(inbox_rows_from(net.server("b.test"), &alice_id).await?, (301, 301), "(inbox rows, distinct ids) on b.test");
    Ok(())
}

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Forwards the client's first [`REQUEST_CUT_AT`] bytes, then closes both sides: the
    /// request in progress never arrives complete.
    CutRequest,
    /// Forwards everything until the upstream's first response bytes reach the proxy, then
    /// closes both sides without forwarding them: the upstream committed, the client never
    /// hears it.
    CutResponse,
    /// Forwards everything.
    Pass,
}

/// Client bytes forwarded on a [`Fault::CutRequest`] connection: more than a TLS handshake and
/// a small GET, less than any transaction of this test (each item is larger than this).
const REQUEST_CUT_AT: usize = 2_500;
/// Padding making every message (so every transaction) larger than [`REQUEST_CUT_AT`].
const PADDING: usize = 3_000;

/// Counts of what the proxy did.
#[derive(Default)]
struct ProxyStats {
    connections: AtomicUsize,
    request_cuts: AtomicUsize,
    response_cuts: AtomicUsize,
}

/// A TCP proxy to `upstream` that cuts connections according to `schedule` (by connection
/// number, from 1). TLS passes through untouched: the proxy only reads the TLS record headers
/// (type and length) of the upstream's bytes to tell the handshake from the responses.
struct CuttingProxy {
    port: u16,
    stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CuttingProxy {
    async fn start(upstream: SocketAddr, schedule: fn(usize) -> Fault) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(ProxyStats::default());
        let counts = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let number = counts.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let counts = counts.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        match relay(client, server, schedule(number)).await {
                            Some(Fault::CutRequest) => counts.request_cuts.fetch_add(1, Ordering::SeqCst),
                            Some(Fault::CutResponse) => counts.response_cuts.fetch_add(1, Ordering::SeqCst),
                            _ => 0,
                        };
                    }
                });
            }
        });
        Ok(Self { port, stats, task })
    }
}

/// Relays one connection; returns the cut it made, if any (both sockets are dropped then).
async fn relay(client: TcpStream, server: TcpStream, fault: Fault) -> Option<Fault> {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let sent_up = AtomicUsize::new(0);
    let up = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = server_write.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            };
            let total = sent_up.load(Ordering::SeqCst);
            if fault == Fault::CutRequest && total + n > REQUEST_CUT_AT {
                let _ = server_write.write_all(&buf[..REQUEST_CUT_AT - total]).await;
                let _ = server_write.flush().await;
                return Some(Fault::CutRequest);
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return None;
            }
            sent_up.store(total + n, Ordering::SeqCst);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 16 * 1024];
        // TLS record framing of the upstream's bytes: header bytes seen of the current record,
        // body bytes left in it, and how many application-data records (type 23) began so far.
        let mut header: Vec<u8> = Vec::with_capacity(5);
        let mut body_left = 0usize;
        let mut app_records = 0usize;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = client_write.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            };
            let mut i = 0;
            let mut record_start = 0;
            let mut cut_at = None;
            while i < n {
                if body_left > 0 {
                    let take = body_left.min(n - i);
                    body_left -= take;
                    i += take;
                    continue;
                }
                if header.is_empty() {
                    record_start = i;
                }
                header.push(buf[i]);
                i += 1;
                if header.len() == 5 {
                    body_left = u16::from_be_bytes([header[3], header[4]]) as usize;
                    if header[0] == 23 {
                        app_records += 1;
                        // TLS 1.3: the 1st encrypted record is the server's handshake flight, the
                        // 2nd its session tickets; what follows answers requests. Only cut after a
                        // transaction-sized request went up.
                        if fault == Fault::CutResponse && app_records >= 3 && sent_up.load(Ordering::SeqCst) > REQUEST_CUT_AT {
                            cut_at = Some(record_start);
                            break;
                        }
                    }
                    header.clear();
                }
            }
            let forward = cut_at.unwrap_or(n);
            if client_write.write_all(&buf[..forward]).await.is_err() {
                return None;
            }
            if cut_at.is_some() {
                return Some(Fault::CutResponse);
            }
        }
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            cut = &mut up, if !up_done => match cut {
                Some(cut) => return Some(cut),
                None => up_done = true,
            },
            cut = &mut down, if !down_done => match cut {
                Some(cut) => return Some(cut),
                None => down_done = true,
            },
            else => return None,
        }
    }
}

#[tokio::test]
async fn a_connection_cut_mid_transaction_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let b_federation = net.server("b.test").federation_addr.context("b.test federation address")?;
    // Connections 1 and 3 are cut mid-request, 2 and 4 after b.test answered; the rest pass.
    let proxy = CuttingProxy::start(b_federation, |number| match number {
        1 | 3 => Fault::CutRequest,
        2 | 4 => Fault::CutResponse,
        _ => Fault::Pass,
    })
    .await?;
    // Before any a → b traffic: b.test is found at the proxy.
    net.dns.remove("_parley._tcp.b.test").await?;
    net.dns.add_srv("_parley._tcp.b.test", 10, 10, proxy.port, "b.test").await?;

    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let alice_id = alice_session.user_id.clone();
    let bob_id = bob_session.user_id.clone();
    let alice = Device::connect(&alice_session).await?;
    // Bob never acknowledges: b.test sends nothing back to a.test, so the only traffic through
    // the proxy is this device lookup (a small GET, on connection 1) and transactions.
    let mut bob = raw_receiver(&bob_session).await?;
    let template = support::envelopes(&alice_session, &bob_id, b"x").await?;
    ensure!(template.len() == 1, "expected bob's one device, got {template:?}");

    let padding = "x".repeat(PADDING);
    let texts: Vec<String> = (0..200).map(|i| format!("message {i:04} {padding}")).collect();
    // In bursts, each received before the next is sent: at least one transaction per burst.
    for (number, burst) in texts.chunks(40).enumerate() {
        send_texts(&alice, &bob_id, &template, burst).await?;
        let received = receive_texts(&mut bob, burst.len()).await?;
        if received != burst {
            let short: Vec<&str> = received.iter().map(|t| &t[..12.min(t.len())]).collect();
            bail!("burst {number}: received {short:?}");
        }
    }
    send_texts(&alice, &bob_id, &template, &["marker".to_owned()]).await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["marker"]);
    assert_eq!(inbox_rows_from(net.server("b.test"), &alice_id).await?, (201, 201), "(inbox rows, distinct ids) on b.test");

    // The faults really happened.
    let stats = &proxy.stats;
    let (connections, request_cuts, response_cuts) = (
        stats.connections.load(Ordering::SeqCst),
        stats.request_cuts.load(Ordering::SeqCst),
        stats.response_cuts.load(Ordering::SeqCst),
    );
    assert!(connections >= 5, "only {connections} connections through the proxy");
    assert!(request_cuts >= 2, "only {request_cuts} connections cut mid-request");
    assert!(response_cuts >= 2, "only {response_cuts} connections cut after b.test answered");
    let failures = counter(net.server("a.test"), "federation_txn_failures").await?;
    assert!(failures >= 4, "a.test counted only {failures} failed transactions");
    Ok(())
}
