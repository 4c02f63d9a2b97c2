//! `parleyd devnet`: one command starts federating homeservers on loopback (fresh CA, names
//! `localhost:<port>`), and users on different servers chat through them.

use crate::support::{self, Device};
use anyhow::Context as _;
use parley_sdk::UserId;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Child;

/// `count` consecutive free loopback ports. The devnet names servers by port, so the ports must
/// be known before it starts. They are drawn at random below the kernel's ephemeral range
/// (`ip_local_port_range`), from which port-0 binds and outgoing connections take theirs: a
/// port that was free when checked here could otherwise be taken by another test's connection
/// before the devnet binds it (seen once in CI: the devnet exited at start). Only another
/// fixed-port user can still race it.
fn free_ports(count: u16) -> anyhow::Result<u16> {
    use rand::Rng as _;
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    anyhow::ensure!(ephemeral > LOWEST + count, "the ephemeral port range starts at {ephemeral}");
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let first = rng.gen_range(LOWEST..ephemeral - count);
        let held: Result<Vec<_>, _> = (first..first + count).map(|p| std::net::TcpListener::bind(("127.0.0.1", p))).collect();
        if held.is_ok() {
            return Ok(first);
        }
    }
    anyhow::bail!("no {count} consecutive free ports below {ephemeral}")
}

/// Starts `parleyd devnet` with `args` in `dir` and waits for its instructions (returned).
async fn start_devnet(args: &[String], dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = tokio::process::Command::new(parley_tests::parleyd_path())
        .arg("devnet")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut printed = String::new();
    // Whether it came up (false: its output ended first).
    let up = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(line) = lines.next_line().await? {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops the servers") {
                return anyhow::Ok(true);
            }
        }
        anyhow::Ok(false)
    })
    .await
    .context("devnet did not come up within 90 s")??;
    if !up {
        let mut errors = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors).await?;
        }
        anyhow::bail!("devnet exited early:\n{printed}\n{errors}");
    }
    // Keep reading: devnet prints on its way out, and a closed pipe would fail it.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, printed))
}

/// SIGTERM to the devnet: it stops its servers and exits successfully.
async fn stop_devnet(mut child: Child) -> anyhow::Result<()> {
    let pid = child.id().context("pid")?;
    tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait()).await.context("devnet did not stop")??;
    assert!(status.success(), "devnet exited with {status}");
    Ok(())
}

#[tokio::test]
async fn devnet_starts_federating_servers_that_users_chat_across() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let federation = free_ports(2)?;
    let client = free_ports(2)?;
    let args =
        ["--servers", "2", "--base-port", &federation.to_string(), "--client-base-port", &client.to_string()].map(str::to_owned);
    let (child, printed) = start_devnet(&args, &dir.path().join("net")).await?;
    assert!(printed.contains(&format!("localhost:{}", federation + 1)), "{printed}");

    let alice = support::register(&format!("http://127.0.0.1:{client}"), "alice").await?;
    let bob = support::register(&format!("http://127.0.0.1:{}", client + 1), "bob").await?;
    assert_eq!(bob.user_id.to_string(), format!("@bob:localhost:{}", federation + 1));
    let alice = Device::connect(&alice).await?;
    let mut bob = Device::connect(&bob).await?;
    let bob_id: UserId = bob.session.user_id.clone();
    alice.send_text(&bob_id, "hello across the devnet").await?;
    let message = bob.next_message().await?;
    assert_eq!(support::text(&message), "hello across the devnet");
    assert_eq!(message.sender, alice.session.user_id);
    stop_devnet(child).await
}

/// The client API address a worker printed in its log.
fn worker_address(log: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let line = text.lines().find_map(|l| l.strip_prefix("parleyd listening on http://")).context("no listening line")?;
    Ok(line.split(' ').next().context("address")?.to_owned())
}

/// Drops the devnet's databases (`parley_devnet_<port>`) when the test ends, passed or not.
struct DropDatabases {
    admin: String,
    names: Vec<String>,
}

impl Drop for DropDatabases {
    fn drop(&mut self) {
        if let Err(error) = parley_tests::postgres::drop_databases(&self.admin, &self.names) {
            eprintln!("dropping {:?} failed: {error}", self.names);
        }
    }
}

/// `parleyd devnet --workers 2 --postgres URL --nats URL`: two servers of two workers each,
/// a proxy on each server's ports. Users on different workers of one server chat over NATS,
/// users of the other server reach them through the proxies, federation included.
#[tokio::test]
async fn devnet_with_two_workers_per_server_on_postgres_and_nats() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let net = dir.path().join("net");
    let nats = parley_tests::nats::NatsServer::start().await?;
    let admin = parley_tests::postgres::server_url().await?;
    let federation = free_ports(2)?;
    let client = free_ports(2)?;
    let _databases =
        DropDatabases { admin: admin.clone(), names: (0..2).map(|i| format!("parley_devnet_{}", federation + i)).collect() };
    let args = [
        "--servers",
        "2",
        "--workers",
        "2",
        "--base-port",
        &federation.to_string(),
        "--client-base-port",
        &client.to_string(),
        "--postgres",
        &admin,
        "--nats",
        &nats.url(),
    ]
    .map(str::to_owned);
    let (child, printed) = start_devnet(&args, &net).await?;
    assert!(printed.contains("Each server runs 2 workers on PostgreSQL and NATS"), "{printed}");

    // Alice on worker 0 and bob on worker 1 of server 0 (straight to each worker); carol on
    // server 1 through its proxy; dave on server 0 through its proxy.
    let worker = |w: usize| worker_address(&net.join(format!("server0-{w}.log")));
    let (worker0, worker1) = (worker(0)?, worker(1)?);
    assert_ne!(worker0, worker1);
    let alice = support::register(&format!("http://{worker0}"), "alice").await?;
    let bob = support::register(&format!("http://{worker1}"), "bob").await?;
    let carol = support::register(&format!("http://127.0.0.1:{}", client + 1), "carol").await?;
    let dave = support::register(&format!("http://127.0.0.1:{client}"), "dave").await?;
    assert_eq!(alice.user_id.to_string(), format!("@alice:localhost:{federation}"), "one server name for both workers");
    let mut alice = Device::connect(&alice).await?;
    let mut bob = Device::connect(&bob).await?;
    let mut carol = Device::connect(&carol).await?;
    let dave = Device::connect(&dave).await?;
    let (alice_id, bob_id, carol_id) =
        (alice.session.user_id.clone(), bob.session.user_id.clone(), carol.session.user_id.clone());

    // Across workers of one server (NATS).
    let sent = alice.send_text(&bob_id, "across workers").await?;
    let got = bob.next_message().await?;
    assert_eq!((got.id, support::text(&got)), (sent.server_msg_id, "across workers".to_owned()));
    // Through the proxy.
    dave.send_text(&alice_id, "through the proxy").await?;
    assert_eq!(support::text(&alice.next_message().await?), "through the proxy");
    // Across servers, both ways: federation leaves from whichever worker holds the lease and
    // arrives at whichever worker the other server's proxy picks.
    alice.send_text(&carol_id, "to the other server").await?;
    let got = carol.next_message().await?;
    assert_eq!((support::text(&got), &got.sender), ("to the other server".to_owned(), &alice_id));
    carol.send_text(&bob_id, "back to worker 1").await?;
    let got = bob.next_message().await?;
    assert_eq!((support::text(&got), &got.sender), ("back to worker 1".to_owned(), &carol_id));
    stop_devnet(child).await
}
