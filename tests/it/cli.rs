//! The `parley` command-line client against a real server: two profiles register, message each
//! other, read their histories back, compare safety numbers and chat interactively; a send to
//! a user who does not exist fails cleanly; profiles on two federated servers do the same.
//!
//! The binary belongs to another package (`parley-sdk`), so cargo gives these tests no
//! `CARGO_BIN_EXE_parley`; it is looked up next to the test executable. `cargo test
//! --workspace` builds it; with `-p parley-tests` alone, run `cargo build -p parley-sdk --bins`
//! first.

use anyhow::{ensure, Context as _};
use parley_tests::TestServer;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};
use tokio::process::{ChildStdout, Command};

/// How long one `parley` command may take.
const T: Duration = Duration::from_secs(60);
const PASSWORD: &str = "correct horse battery";

/// `target/<profile>/parley`, next to the test executable (`target/<profile>/deps/it-*`).
pub(crate) fn parley_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable directory")?.to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("parley{}", std::env::consts::EXE_SUFFIX));
    ensure!(path.exists(), "{} not found: build it with `cargo build -p parley-sdk --bins`", path.display());
    Ok(path)
}

/// What a finished command printed.
#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Output {
    /// Every stdout line, parsed as JSON.
    fn json_lines(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l:?}")))
            .collect()
    }
}

/// Runs `parley` with one data directory, as a user would.
struct Parley {
    bin: PathBuf,
    data_dir: tempfile::TempDir,
    server: String,
}

impl Parley {
    fn new(server: &TestServer) -> anyhow::Result<Self> {
        Ok(Self { bin: parley_path()?, data_dir: tempfile::tempdir()?, server: server.base_url.clone() })
    }

    /// `parley --data-dir DIR --profile PROFILE --json ARGS...`, isolated from the caller's
    /// environment.
    fn command(&self, profile: &str, args: &[&str]) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .arg("--data-dir")
            .arg(self.data_dir.path())
            .args(["--profile", profile, "--json"])
            .args(args)
            .env_remove("PARLEY_HOME")
            .env_remove("PARLEY_PROFILE")
            .env_remove("PARLEY_PASSWORD")
            .env_remove("PARLEY_RECOVERY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs a command to completion, feeding it `stdin`.
    async fn run(&self, profile: &str, args: &[&str], stdin: &str) -> anyhow::Result<Output> {
        let mut child = self.command(profile, args).stdin(Stdio::piped()).spawn().context("spawning parley")?;
        let mut pipe = child.stdin.take().context("stdin")?;
        pipe.write_all(stdin.as_bytes()).await?;
        drop(pipe);
        let output = tokio::time::timeout(T, child.wait_with_output())
            .await
            .with_context(|| format!("parley {args:?} did not finish within {T:?}"))??;
        Ok(Output { status: output.status, stdout: String::from_utf8(output.stdout)?, stderr: String::from_utf8(output.stderr)? })
    }

    /// Runs a command that must succeed; returns its JSON lines.
    async fn ok(&self, profile: &str, args: &[&str], stdin: &str) -> anyhow::Result<Vec<Value>> {
        let output = self.run(profile, args, stdin).await?;
        ensure!(output.status.success(), "parley {args:?} failed ({}): {}{}", output.status, output.stderr, output.stdout);
        output.json_lines()
    }

    /// Registers `name` in the profile of the same name (password on stdin); returns the
    /// register line.
    async fn register(&self, name: &str) -> anyhow::Result<Value> {
        let lines = self.ok(name, &["--server", &self.server, "register", name], &format!("{PASSWORD}\n")).await?;
        ensure!(lines.len() == 1, "one line: {lines:?}");
        Ok(lines[0].clone())
    }

    /// Sends and returns (client_msg_id, server_msg_id).
    async fn send(&self, profile: &str, to: &str, text: &str) -> anyhow::Result<(String, u64)> {
        let lines = self.ok(profile, &["send", to, text], "").await?;
        ensure!(lines.len() == 1, "one line: {lines:?}");
        let client_msg_id = lines[0]["client_msg_id"].as_str().context("client_msg_id")?.to_owned();
        let server_msg_id = lines[0]["server_msg_id"].as_u64().context("server_msg_id")?;
        Ok((client_msg_id, server_msg_id))
    }

    /// The conversation as (sender, body, client_msg_id, outgoing), oldest first.
    async fn history(&self, profile: &str, peer: &str) -> anyhow::Result<Vec<(String, String, String, bool)>> {
        let lines = self.ok(profile, &["history", peer], "").await?;
        lines
            .iter()
            .map(|m| {
                Ok((
                    m["sender"].as_str().context("sender")?.to_owned(),
                    m["body"].as_str().context("body")?.to_owned(),
                    m["client_msg_id"].as_str().context("client_msg_id")?.to_owned(),
                    m["outgoing"].as_bool().context("outgoing")?,
                ))
            })
            .collect()
    }

    /// The 60 digits `verify` shows.
    async fn safety_number(&self, profile: &str, peer: &str) -> anyhow::Result<String> {
        let lines = self.ok(profile, &["verify", peer], "").await?;
        ensure!(lines.len() == 1, "one line: {lines:?}");
        let digits = lines[0]["safety_number"].as_str().context("safety_number")?.to_owned();
        let display = lines[0]["display"].as_str().context("display")?;
        ensure!(display.split(' ').count() == 12 && display.replace(' ', "") == digits, "12 blocks of 5: {display}");
        Ok(digits)
    }
}

#[tokio::test]
async fn two_profiles_message_each_other_and_agree_on_the_safety_number() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let parley = Parley::new(&server)?;
    let (alice, bob) = ("@alice:localhost", "@bob:localhost");

    let registered = parley.register("alice").await?;
    assert_eq!(registered["user_id"], alice);
    assert!(registered["device_id"].as_str().is_some_and(|d| !d.is_empty()), "{registered}");
    let recovery = registered["recovery_secret"].as_str().context("recovery_secret")?.to_owned();
    assert!(recovery.len() == 64 && recovery.bytes().all(|b| b.is_ascii_hexdigit()), "{recovery}");
    assert_eq!(parley.register("bob").await?["user_id"], bob);

    // Later commands find the server in the profile.
    let first = parley.send("alice", bob, "hello bob").await?;
    let second = parley.send("bob", alice, "hi alice, got it").await?;
    let third = parley.send("alice", "bob", "how are you?").await?;
    assert!(first.1 < third.1, "server ids grow: {first:?} {third:?}");

    let expected = vec![
        (alice.to_owned(), "hello bob".to_owned(), first.0.clone()),
        (bob.to_owned(), "hi alice, got it".to_owned(), second.0.clone()),
        (alice.to_owned(), "how are you?".to_owned(), third.0.clone()),
    ];
    for (profile, peer, me) in [("bob", alice, bob), ("alice", bob, alice)] {
        let history = parley.history(profile, peer).await?;
        let seen: Vec<_> = history.iter().map(|(sender, body, id, _)| (sender.clone(), body.clone(), id.clone())).collect();
        assert_eq!(seen, expected, "history of {profile}");
        for (sender, _, _, outgoing) in &history {
            assert_eq!(*outgoing, sender == me, "outgoing flag in the history of {profile}");
        }
    }

    let alice_sees = parley.safety_number("alice", bob).await?;
    let bob_sees = parley.safety_number("bob", alice).await?;
    assert_eq!(alice_sees.len(), 60);
    assert!(alice_sees.bytes().all(|b| b.is_ascii_digit()), "{alice_sees}");
    assert_eq!(alice_sees, bob_sees, "both sides show the same safety number");

    // A send to a user who does not exist fails: exit status 1, `error:` on stderr, a JSON
    // error line on stdout, and nothing left in the outbox or the history.
    let failed = parley.run("alice", &["send", "@nobody:localhost", "anyone there?"], "").await?;
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(failed.stderr.starts_with("error: ") && failed.stderr.contains("@nobody:localhost"), "{failed:?}");
    let error = failed.json_lines()?;
    assert_eq!(error.len(), 1, "{failed:?}");
    assert!(error[0]["error"].as_str().is_some_and(|e| e.contains("no such user")), "{failed:?}");
    assert_eq!(error[0]["code"], "unknown_user", "{failed:?}");
    assert_eq!(parley.history("alice", bob).await?.len(), 3, "the failed send left no trace");

    // The recovery secret was shown once, at registration, and never again.
    let whoami = parley.run("alice", &["whoami"], "").await?;
    assert!(whoami.status.success() && whoami.stdout.contains(alice), "{whoami:?}");
    assert!(!whoami.stdout.contains(&recovery) && !failed.stdout.contains(&recovery) && !failed.stderr.contains(&recovery));
    Ok(())
}

/// The next line a running `parley --json chat` prints.
async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> anyhow::Result<Value> {
    let line = tokio::time::timeout(T, lines.next_line()).await.context("no output from parley chat")??;
    let line = line.context("parley chat ended early")?;
    serde_json::from_str(&line).with_context(|| format!("not a JSON line: {line:?}"))
}

#[tokio::test]
async fn chat_shows_incoming_messages_live_and_sends_typed_lines() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let parley = Parley::new(&server)?;
    parley.register("alice").await?;
    parley.register("bob").await?;

    let mut chat = parley.command("bob", &["chat", "@alice:localhost"]).stdin(Stdio::piped()).spawn()?;
    let mut input = chat.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(chat.stdout.take().context("stdout")?).lines();

    // Whether it arrives before or after the chat connected, the message is shown.
    parley.send("alice", "@bob:localhost", "ping").await?;
    loop {
        let line = next_json(&mut lines).await?;
        if line["event"] == "message" {
            assert_eq!((line["sender"].as_str(), line["body"].as_str()), (Some("@alice:localhost"), Some("ping")), "{line}");
            break;
        }
    }
    input.write_all(b"pong\n").await?;
    loop {
        let line = next_json(&mut lines).await?;
        if line["event"] == "sent" {
            assert!(line["server_msg_id"].as_u64().is_some(), "{line}");
            break;
        }
    }
    // End of input leaves the chat.
    drop(input);
    let status = tokio::time::timeout(T, chat.wait()).await.context("parley chat did not exit at end of input")??;
    assert!(status.success(), "{status}");

    let history = parley.history("alice", "@bob:localhost").await?;
    let bodies: Vec<_> = history.iter().map(|(sender, body, _, _)| (sender.as_str(), body.as_str())).collect();
    assert_eq!(bodies, [("@alice:localhost", "ping"), ("@bob:localhost", "pong")]);
    Ok(())
}

/// Runs `parley chat` for `profile` with `peer` until a message from `peer` is shown,
/// typing `reply` (if any) once it is and waiting for its `sent`; returns the message's body.
async fn chat_until_message(parley: &Parley, profile: &str, peer: &str, reply: Option<&str>) -> anyhow::Result<String> {
    let mut chat = parley.command(profile, &["chat", peer]).stdin(Stdio::piped()).spawn()?;
    let mut input = chat.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(chat.stdout.take().context("stdout")?).lines();
    let body = loop {
        let line = next_json(&mut lines).await?;
        if line["event"] == "message" && line["sender"] == peer {
            break line["body"].as_str().context("body")?.to_owned();
        }
    };
    if let Some(reply) = reply {
        input.write_all(format!("{reply}\n").as_bytes()).await?;
        while next_json(&mut lines).await?["event"] != "sent" {}
    }
    drop(input);
    let status = tokio::time::timeout(T, chat.wait()).await.context("parley chat did not exit at end of input")??;
    ensure!(status.success(), "parley chat exited with {status}");
    Ok(body)
}

#[tokio::test]
async fn profiles_on_two_federated_servers_message_each_other() -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let parley = Parley::new(net.server("a.test"))?;
    assert_eq!(parley.register("alice").await?["user_id"], "@alice:a.test");
    let b = net.server("b.test").base_url.clone();
    let bob = parley.ok("bob", &["--server", &b, "register", "bob"], &format!("{PASSWORD}\n")).await?;
    assert_eq!(bob[0]["user_id"], "@bob:b.test");

    // Delivery across servers is asynchronous: each side waits in `chat` for the other's message.
    let (hello, _) = parley.send("alice", "@bob:b.test", "hello from a.test").await?;
    let got = chat_until_message(&parley, "bob", "@alice:a.test", Some("hello back from b.test")).await?;
    assert_eq!(got, "hello from a.test");
    assert_eq!(chat_until_message(&parley, "alice", "@bob:b.test", None).await?, "hello back from b.test");
    let parley = &parley;
    let history = |profile: &'static str, peer: &'static str| parley.history(profile, peer);
    let alice_view = history("alice", "@bob:b.test").await?;
    assert_eq!(
        alice_view,
        vec![
            ("@alice:a.test".to_owned(), "hello from a.test".to_owned(), hello, true),
            ("@bob:b.test".to_owned(), "hello back from b.test".to_owned(), alice_view[1].2.clone(), false),
        ]
    );
    let bob_view: Vec<_> = history("bob", "@alice:a.test").await?.into_iter().map(|(s, b, i, o)| (s, b, i, !o)).collect();
    assert_eq!(bob_view, alice_view, "both sides hold the same conversation");
    assert_eq!(parley.safety_number("alice", "@bob:b.test").await?, parley.safety_number("bob", "@alice:a.test").await?);
    Ok(())
}

#[tokio::test]
async fn devices_remove_takes_another_device_off_the_account_but_not_itself() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let parley = Parley::new(&server)?;
    let register = parley.register("alice").await?;
    let first = register["device_id"].as_str().context("device_id")?;
    let secret = register["recovery_secret"].as_str().context("recovery_secret")?;
    let login = parley
        .ok("alice-2", &["--server", &parley.server, "login", "alice", "--recovery", secret], &format!("{PASSWORD}\n"))
        .await?;
    let second = login[0]["device_id"].as_str().context("device_id")?;
    assert_eq!(parley.ok("alice", &["devices"], "").await?.len(), 2);

    // The second device signs the list without the first (it holds the user identity too).
    let removed = parley.ok("alice-2", &["devices", "remove", first], &format!("{PASSWORD}\n")).await?;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0]["device_id"], first);
    assert_eq!(removed[0]["removed_from"], serde_json::json!([]), "in no group");
    let devices = parley.ok("alice-2", &["devices"], "").await?;
    assert_eq!(devices.iter().map(|d| d["device_id"].as_str()).collect::<Vec<_>>(), [Some(second)]);

    let refused = parley.run("alice-2", &["devices", "remove", second], &format!("{PASSWORD}\n")).await?;
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(refused.json_lines()?.last().context("an error line")?["code"], "usage", "{refused:?}");
    Ok(())
}

#[tokio::test]
async fn a_group_through_the_cli_is_created_talked_in_set_up_and_left() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let parley = Parley::new(&server)?;
    let mut ids = Vec::new();
    for name in ["alice", "bob", "carol"] {
        ids.push(parley.register(name).await?["user_id"].as_str().context("user_id")?.to_owned());
    }
    let created = parley.ok("alice", &["group", "create", "Team", "bob", "carol"], "").await?;
    let group = created.last().context("a line")?["group_id"].as_str().context("group_id")?.to_owned();
    let listed = parley.ok("bob", &["group", "list"], "").await?;
    assert!(listed.iter().any(|g| g["group_id"] == group.as_str() && g["name"] == "Team"), "{listed:?}");

    // `send` and `history` take a group id.
    parley.ok("bob", &["send", &group, "hello team"], "").await?;
    let history = parley.ok("carol", &["history", &group], "").await?;
    assert!(history.iter().any(|m| m["body"] == "hello team"), "{history:?}");

    // Only admins change the membership; alice (the creator) makes bob one, with a topic.
    let refused = parley.run("bob", &["group", "remove", &group, "carol"], "").await?;
    assert!(!refused.status.success(), "{refused:?}");
    assert_eq!(refused.json_lines()?.last().context("an error line")?["code"], "not_allowed", "{refused:?}");
    let set = parley.ok("alice", &["group", "set", &group, "--topic", "plans", "--admins", "alice,bob"], "").await?;
    let settings = set.last().context("a line")?;
    assert_eq!((settings["topic"].as_str(), settings["admins"].clone()), (Some("plans"), serde_json::json!([ids[0], ids[1]])));

    // Carol leaves; alice's next send commits it first (no member's CLI stays running).
    let left = parley.ok("carol", &["group", "leave", &group], "").await?;
    assert_eq!(left.last().context("a line")?["leaving"], true);
    parley.ok("alice", &["send", &group, "bye carol"], "").await?;
    let members = parley.ok("alice", &["group", "members", &group], "").await?;
    let users: Vec<&str> = members.iter().filter_map(|m| m["user"].as_str()).collect();
    assert_eq!(users, [ids[0].as_str(), ids[1].as_str()], "{members:?}");
    Ok(())
}

#[tokio::test]
async fn a_file_is_sent_listed_and_downloaded_through_the_cli() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let parley = Parley::new(&server)?;
    parley.register("alice").await?;
    parley.register("bob").await?;
    let files = tempfile::tempdir()?;
    let source = files.path().join("notes.txt");
    let content = "line one\nline two\n".repeat(5000);
    std::fs::write(&source, &content)?;

    let sent = parley.ok("alice", &["send", "bob", "--file", source.to_str().context("path")?, "the", "notes"], "").await?;
    let client_msg_id = sent[0]["client_msg_id"].as_str().context("client_msg_id")?.to_owned();

    let history = parley.ok("bob", &["history", "alice"], "").await?;
    ensure!(history.len() == 1, "one message: {history:?}");
    let message = &history[0];
    assert_eq!((message["client_msg_id"].as_str(), message["body"].as_str()), (Some(client_msg_id.as_str()), Some("the notes")));
    assert_eq!(message["file"]["name"], "notes.txt");
    assert_eq!(message["file"]["mime"], "text/plain");
    assert_eq!(message["file"]["size"], content.len());
    ensure!(message["file"].get("key").is_none() && !history[0].to_string().contains("nonce"), "no key material is printed");

    // By a prefix of the id, into a directory: the sender's file name.
    let prefix = &client_msg_id.replace('-', "")[..8];
    let out = tempfile::tempdir()?;
    let saved = parley.ok("bob", &["download", "alice", prefix, "--out", out.path().to_str().context("path")?], "").await?;
    let path = out.path().join("notes.txt");
    assert_eq!(saved[0]["path"].as_str(), path.to_str());
    assert_eq!(std::fs::read_to_string(&path)?, content);

    // Not over an existing file without --force; with it, again.
    let again = parley.run("bob", &["download", "alice", prefix, "--out", out.path().to_str().context("path")?], "").await?;
    ensure!(!again.status.success() && again.json_lines()?[0]["code"] == "exists", "{again:?}");
    let forced = ["download", "alice", prefix, "--out", path.to_str().context("path")?, "--force"];
    parley.ok("bob", &forced, "").await?;
    assert_eq!(std::fs::read_to_string(&path)?, content);

    // A message without a file is not found.
    let (text_id, _) = parley.send("alice", "bob", "just text").await?;
    let missing = parley.run("bob", &["download", "alice", &text_id], "").await?;
    ensure!(!missing.status.success() && missing.json_lines()?[0]["code"] == "not_found", "{missing:?}");
    Ok(())
}
