//! The durable federation queue under faults: the sending server SIGKILLed with a full queue,
//! and connections cut in the middle of a transaction by a TCP proxy between the servers.
//!
//! Receivers here see what the server really sends: the SDK's dedupe window is off (a repeat
//! would show up as a second message) and they never acknowledge, so every inbox row stays in
//! the destination's database and can be counted there too.

use crate::support::{self, raw_receiver, receive_texts, send_texts, Device};
use anyhow::{bail, ensure, Context as _};
use parley_tests::fednet::{Discovery, FedNet};
use parley_tests::proxy::{CuttingProxy, Fault};
use parley_tests::Mode;
use std::sync::atomic::Ordering;

fn numbered(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("message {i:04}")).collect()
}

#[tokio::test]
async fn sender_killed_with_a_full_queue_delivers_everything_after_restart() -> anyhow::Result<()> {
    // Processes: a.test is SIGKILLed.
    let mut net = FedNet::start_as(Mode::Process, &[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
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
    assert_eq!(net.server("a.test").queued_for("b.test").await?, 300, "a.test's queue after 300 sends");
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
    assert_eq!(
        net.server("b.test").inbox_rows_from(alice_id.as_str()).await?,
        (301, 301),
        "(inbox rows, distinct ids) on b.test"
    );
    Ok(())
}

/// Padding making every message (so every transaction) larger than
/// [`parley_tests::proxy::REQUEST_CUT_AT`].
const PADDING: usize = 3_000;

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
    assert_eq!(
        net.server("b.test").inbox_rows_from(alice_id.as_str()).await?,
        (201, 201),
        "(inbox rows, distinct ids) on b.test"
    );

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
    let failures = net.server("a.test").counter("federation_txn_failures").await?;
    assert!(failures >= 4, "a.test counted only {failures} failed transactions");
    Ok(())
}
