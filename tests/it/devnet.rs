//! `parleyd devnet`: one command starts federating homeservers on loopback (fresh CA, names
//! `localhost:<port>`), and users on different servers chat through them.

use crate::support::{self, Device};
use anyhow::Context as _;
use parley_sdk::UserId;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// `count` consecutive free loopback ports. The devnet names servers by port, so the ports must
/// be known before it starts: the OS picks the first, the rest are checked free (a small race
/// with other processes remains, as with any fixed port).
fn free_ports(count: u16) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if first.checked_add(count).is_none() {
            continue;
        }
        let held: Result<Vec<_>, _> = (first..first + count).map(|p| std::net::TcpListener::bind(("127.0.0.1", p))).collect();
        if held.is_ok() {
            return Ok(first);
        }
    }
    anyhow::bail!("no {count} consecutive free ports")
}

#[tokio::test]
async fn devnet_starts_federating_servers_that_users_chat_across() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let federation = free_ports(2)?;
    let client = free_ports(2)?;
    let mut child = tokio::process::Command::new(parley_tests::parleyd_path())
        .args(["devnet", "--servers", "2", "--base-port", &federation.to_string(), "--client-base-port", &client.to_string()])
        .arg("--dir")
        .arg(dir.path().join("net"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut printed = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            printed.push_str(&line);
            printed.push('\n');
            if line.contains("Ctrl-C stops the servers") {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("devnet exited early:\n{printed}")
    })
    .await
    .context("devnet did not come up within 60 s")??;
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

    let pid = child.id().context("pid")?;
    tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await?;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.context("devnet did not stop")??;
    assert!(status.success(), "devnet exited with {status}");
    Ok(())
}
