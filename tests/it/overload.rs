//! Overload with the shipped costs and limits: a burst of registrations (each an argon2id hash
//! of 19 MiB) neither exhausts memory nor fails with anything but success or a typed refusal.

use crate::support::PASSWORD;
use anyhow::Context as _;
use parley_tests::TestServer;
use serde_json::{json, Value};

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
    let server = TestServer::start_with(&format!(
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
