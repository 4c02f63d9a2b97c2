//! Overload with the shipped costs and limits: a burst of registrations (each an argon2id hash
//! of 19 MiB) neither exhausts memory nor fails with anything but success or a typed refusal;
//! an office of devices behind one address reconnects at once while an abusive account is
//! throttled.

use crate::support::{login, next_matching, register, PASSWORD};
use anyhow::Context as _;
use parley_sdk::{ConnectOptions, Connection, Event};
use parley_tests::TestServer;
use serde_json::{json, Value};
use std::time::Duration;

/// A line of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in {status}"))?;
    line.split_whitespace().nth(1).context("value")?.parse().context("KiB")
}

#[tokio::test]
async fn two_hundred_concurrent_registrations_leave_memory_at_baseline() -> anyhow::Result<()> {
    // The shipped argon2 cost and hashing queue (tests otherwise use a cheap cost); the test's
    // generous rate limits, so that only the hashing bound can refuse. Two hash slots (the
    // default on a two-core machine; it is one per core) whatever the machine: hashing memory
    // is slots × cost.
    let cost = parley_server::config::AuthConfig::default();
    // A process: its memory is measured.
    let server = TestServer::process_with(&format!(
        "[auth]\nargon2_memory_kib = {}\nargon2_iterations = {}\nargon2_parallelism = {}\nhash_concurrency = 2\n",
        cost.argon2_memory_kib, cost.argon2_iterations, cost.argon2_parallelism
    ))
    .await?;
    let pid = server.pid().context("pid")?;
    let baseline = status_kib(pid, "VmRSS")?;

    let client = reqwest::Client::new();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..200 {
        let request = client
            .post(format!("{}/v1/register", server.base_url))
            .json(&json!({ "username": format!("user{i}"), "password": PASSWORD }));
        requests.spawn(async move {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").is_some();
            let body: Value = response.json().await?;
            anyhow::Ok((status, retry_after, body))
        });
    }
    let (mut registered, mut busy) = (0, 0);
    while let Some(result) = requests.join_next().await {
        let (status, retry_after, body) = result??;
        match (status, body["code"].as_str()) {
            (200, _) => registered += 1,
            (503, Some("server_busy")) | (429, Some("rate_limited")) => {
                assert!(retry_after && body["retry_after_ms"].as_u64().is_some(), "a refusal says when to retry: {body}");
                busy += 1;
            }
            _ => panic!("registration failed with {status}: {body}"),
        }
    }
    assert!(registered > 0, "some registrations succeed");

    let after = status_kib(pid, "VmRSS")?;
    let peak = status_kib(pid, "VmHWM")?;
    eprintln!("registered {registered}, refused {busy}; RSS baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
    assert!(
        after <= baseline + 64 * 1024,
        "RSS {after} KiB after the burst, baseline {baseline} KiB (peak {peak} KiB): more than 64 MiB retained"
    );
    Ok(())
}

/// Runs `work` for each of `items`, at most `parallel` at a time; the results in order.
async fn in_parallel<I, T, F>(items: Vec<I>, parallel: usize, work: impl Fn(I) -> F) -> anyhow::Result<Vec<T>>
where
    I: Send + 'static,
    T: Send + 'static,
    F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(items.len());
    for item in items {
        let permit = permits.clone().acquire_owned().await?;
        let future = work(item);
        tasks.push(tokio::spawn(async move {
            let result = future.await;
            drop(permit);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await??);
    }
    Ok(results)
}

/// 2,000 devices behind one address (an office's NAT) lose their connections at once (the
/// server restarts) and must all be back within 30 s with the shipped rate limits, while one
/// account flooding requests from the same address is throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_office_behind_one_address_reconnects_within_30_s() -> anyhow::Result<()> {
    let mut server = TestServer::start().await?;
    let result = office(&mut server).await;
    if result.is_err() {
        for line in server.logs().lines().filter(|l| l.contains("ERROR") || l.contains("WARN")).take(20) {
            eprintln!("server: {line}");
        }
    }
    result
}

async fn office(server: &mut TestServer) -> anyhow::Result<()> {
    const DEVICES: usize = 2000;
    const WITHIN: Duration = Duration::from_secs(30);
    rlimit::increase_nofile_limit(u64::MAX)?;
    // Set-up with the tests' generous limits.
    let base = server.base_url.clone();
    // As many at once as the server's database pool has connections.
    let sessions = in_parallel((0..DEVICES).collect(), 4, move |i| {
        let base = base.clone();
        async move { register(&base, &format!("office{i}")).await }
    })
    .await?;
    let devices =
        in_parallel(sessions, 32, |session| async move { Ok(Connection::open(&session, ConnectOptions::default()).await?) })
            .await?;
    let abuser = register(&server.base_url, "abuser").await?;
    let abuser_tokens = vec![
        abuser.access_token().to_owned(),
        login(&server.base_url, "abuser").await?.access_token().to_owned(),
        login(&server.base_url, "abuser").await?.access_token().to_owned(),
    ];

    // Each device reports when it is connected again after losing its connection.
    let (back_tx, mut back_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connections = Vec::with_capacity(DEVICES);
    for (conn, mut events) in devices {
        connections.push(conn);
        let back_tx = back_tx.clone();
        tokio::spawn(async move {
            let lost =
                next_matching(&mut events, Duration::from_secs(600), |e| matches!(e, Event::Disconnected { .. }).then_some(()));
            if lost.await.is_ok() {
                let again = next_matching(&mut events, Duration::from_secs(600), |e| match e {
                    Event::Connected { .. } => Some(()),
                    _ => None,
                });
                if again.await.is_ok() {
                    let _ = back_tx.send(());
                }
            }
        });
    }
    drop(back_tx);

    // The shipped rate limits (cheap hashing still: nobody logs in), and the blip.
    server.replace_config("[auth]\nargon2_memory_kib = 64\nargon2_iterations = 1\nargon2_parallelism = 1\n")?;
    server.stop().await?;
    server.restart().await?;
    let started = tokio::time::Instant::now();

    // Meanwhile one account floods requests from its three devices (each until it has been
    // refused at least once).
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut flood = tokio::task::JoinSet::new();
    for token in abuser_tokens {
        let (base, flooding) = (server.base_url.clone(), flooding.clone());
        flood.spawn(async move {
            let client = reqwest::Client::new();
            let (mut accepted, mut limited) = (0u64, 0u64);
            while flooding.load(std::sync::atomic::Ordering::Relaxed) || limited == 0 {
                let response = client.get(format!("{base}/v1/whoami")).bearer_auth(&token).send().await?;
                match response.status().as_u16() {
                    200 => accepted += 1,
                    429 => limited += 1,
                    status => anyhow::bail!("flood request answered {status}"),
                }
            }
            anyhow::Ok((accepted, limited))
        });
    }

    let mut back = 0;
    while back < DEVICES {
        match tokio::time::timeout_at(started + WITHIN, back_rx.recv()).await {
            Ok(Some(())) => back += 1,
            Ok(None) => break,
            Err(_) => break,
        }
    }
    let took = started.elapsed();
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let (mut accepted, mut limited) = (0, 0);
    while let Some(counts) = tokio::time::timeout(WITHIN, flood.join_next()).await.context("the flood never stops")? {
        let (a, l) = counts??;
        accepted += a;
        limited += l;
    }
    eprintln!("{back} of {DEVICES} devices back in {took:?}; the flood: {accepted} accepted, {limited} rate-limited");
    assert_eq!(back, DEVICES, "devices back within {WITHIN:?}");
    assert!(limited > 0, "the flooding account is throttled ({accepted} accepted)");
    drop(connections);
    Ok(())
}
