//! `parley-group-bench`: one MLS group across two real `parleyd` processes (release builds,
//! durable SQLite, HTTPS federation with a test CA and a real DNS server), its hub on `a.test`,
//! its members spread evenly over `a.test` and `b.test`. Every member is a real MLS member with
//! its own client state and its own WebSocket; they share this process (and the machine's two
//! cores with both servers). Prints a Markdown table.
//!
//! ```sh
//! cargo run --release -p parley-tests --bin parley-group-bench -- --members 1000 --rate 10 --seconds 10
//! ```
//!
//! Phases: (1) the creator adds every other member in one commit; each joins from its Welcome
//! and the ratchet tree; (2) at `--rate` group messages per second from members on both servers,
//! send → every member's WebSocket received it (the last member's receipt counts), and the
//! federation transactions and bytes the hub sent per message; (3) one remove and (4) one add at
//! that size: the commit's cost and size, and when every member had processed it; (5) every
//! member decrypts one last message (end to end).

use anyhow::{bail, Context as _};
use clap::Parser;
use futures_util::stream::{self, SplitSink, StreamExt as _};
use futures_util::SinkExt as _;
use parley_crypto::identity::DeviceIdentity;
use parley_crypto::mls::{Group, Incoming, KeyPackage, Lifetime, MemoryStorage, MlsClient};
use parley_sdk::spec::error::DeviceRef;
use parley_sdk::spec::v1::groups::{CreateGroupRequest, GroupEvent, GroupEventKind, GroupSendRequest, GroupSentResponse};
use parley_sdk::spec::v1::keypackages::{ClaimKeyPackagesRequest, UploadKeyPackagesRequest};
use parley_sdk::spec::v1::keys::UploadKeysRequest;
use parley_sdk::spec::{DeviceId, GroupId, UserId};
use parley_sdk::{Api, Session};
use parley_tests::fednet::{Discovery, FedNet};
use rand::rngs::OsRng;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

#[derive(Parser)]
struct Args {
    /// Members of the group (half on each server).
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Group messages per second in the latency phase.
    #[arg(long, default_value_t = 10)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Extra TOML for both servers' configuration (for example `[limits]` overrides).
    #[arg(long, default_value = "")]
    config: String,
}

const BENCH_CONFIG: &str = "[storage]\nsynchronous = \"full\"\n[log]\nfilter = \"warn\"\n";

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a member reports to the collector.
enum Report {
    /// A group event reached the member's WebSocket.
    Received { client_msg_id: Uuid, at: Instant },
    /// The member processed a commit (or joined) in this long, reaching `epoch`.
    Processed { epoch: u64, took: Duration, at: Instant },
    /// The member decrypted an application message.
    Decrypted { text: String },
}

/// What the bench asks a member to do.
enum Command {
    /// Encrypt and submit a text; answer with the hub's answer.
    Send { text: String, done: oneshot::Sender<anyhow::Result<GroupSentResponse>> },
    /// Decrypt application messages from now on (off: only timestamp them).
    Decrypt(bool),
    /// Commit a membership change; answer with its cost.
    Commit { change: Change, done: oneshot::Sender<anyhow::Result<CommitStats>> },
}

enum Change {
    Remove(DeviceRef),
    Add(Box<KeyPackage>),
}

/// What one commit cost its committer.
struct CommitStats {
    /// The commit's `client_msg_id` (its Welcome's too).
    id: Uuid,
    build: Duration,
    hub: Duration,
    commit_bytes: usize,
    welcome_bytes: usize,
}

struct Member {
    session: Session,
    identity: DeviceIdentity,
    client: MlsClient<MemoryStorage>,
}

impl Member {
    fn device(&self) -> DeviceRef {
        DeviceRef::new(self.session.user_id.clone(), self.session.device_id.clone())
    }
}

/// Registers `name` on `base`, uploads its device keys and one KeyPackage.
async fn member(base: &str, name: &str) -> anyhow::Result<Member> {
    let http = reqwest::Client::new();
    let body: serde_json::Value = http
        .post(format!("{base}/v1/register"))
        .json(&json!({"username": name, "password": "benchmark password"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let session = Session::new(
        base,
        UserId::parse(body["user_id"].as_str().context("user_id")?)?,
        DeviceId::parse(body["device_id"].as_str().context("device_id")?)?,
        body["access_token"].as_str().context("token")?,
    );
    let identity = DeviceIdentity::generate(&mut OsRng);
    let api = Api::new(&session)?;
    let mut upload = UploadKeysRequest::default();
    upload.device_keys = Some(identity.device_keys(&session.user_id, &session.device_id));
    api.upload_keys(&upload).await?;
    let client = MlsClient::new(MemoryStorage::default(), session.user_id.clone(), session.device_id.clone(), &identity);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let package = client.create_key_package(&identity, Lifetime::starting_at(now, 86_400), false)?.to_bytes().to_vec();
    api.upload_keypackages(&UploadKeyPackagesRequest::new(vec![package], None)).await?;
    Ok(Member { session, identity, client })
}

async fn connect(session: &Session) -> anyhow::Result<Socket> {
    let url = format!("{}/v1/ws", session.base_url.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {}", session.access_token()).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next()).await?.context("closed")??;
        if let Message::Text(text) = message {
            if text.as_str().contains("\"caught_up\"") {
                return Ok(socket);
            }
        }
    }
}

fn path(group: &GroupId) -> String {
    format!("/v1/groups/{}/send", group.as_str().replace('!', "%21").replace(':', "%3A"))
}

async fn submit(
    http: &reqwest::Client,
    session: &Session,
    group: &GroupId,
    request: &GroupSendRequest,
) -> anyhow::Result<GroupSentResponse> {
    let response = http
        .post(format!("{}{}", session.base_url, path(group)))
        .bearer_auth(session.access_token())
        .json(request)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("group send: {status} {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// A member's task: reads its group stream in order, processes commits and Welcomes, and
/// timestamps (and, when asked, decrypts) application messages; acknowledges each event.
async fn run_member(
    member: Member,
    mut group: Option<Group>,
    socket: Socket,
    group_id: GroupId,
    mut commands: mpsc::UnboundedReceiver<Command>,
    reports: mpsc::UnboundedSender<Report>,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let (sink, stream): (SplitSink<Socket, Message>, _) = socket.split();
    // The socket is read and written by tasks of their own, so a member busy with MLS work
    // (or waiting for a core) never stalls the server's writes or misses its heartbeat.
    let (out, out_rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(write_frames(sink, out_rx));
    let (events_tx, mut events) = mpsc::unbounded_channel::<(GroupEvent, Instant)>();
    let reader = tokio::spawn(read_frames(stream, events_tx, reports.clone()));
    let _tasks = AbortOnDrop(vec![writer, reader]);
    let mut decrypt = false;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Decrypt(on)) => decrypt = on,
                Some(Command::Send { text, done }) => {
                    let answer = async {
                        let group = group.as_mut().context("not in the group")?;
                        let message = group.encrypt(&member.client, &member.identity, text.as_bytes())?;
                        submit(&http, &member.session, &group_id, &GroupSendRequest::application(Uuid::new_v4(), message)).await
                    }
                    .await;
                    let _ = done.send(answer);
                }
                Some(Command::Commit { change, done }) => {
                    let answer = async {
                        let group = group.as_mut().context("not in the group")?;
                        let started = Instant::now();
                        let bundle = match change {
                            Change::Add(package) => group.add_members(&member.client, &member.identity, &[*package])?,
                            Change::Remove(device) => {
                                let index = group
                                    .members()?
                                    .into_iter()
                                    .find(|m| m.leaf.user() == &device.user && m.leaf.device() == &device.device)
                                    .context("no such member")?
                                    .index;
                                group.remove_members(&member.client, &member.identity, &[index])?
                            }
                        };
                        let build = started.elapsed();
                        let (commit_bytes, welcome_bytes) = (bundle.commit.len(), bundle.welcome.as_ref().map_or(0, Vec::len));
                        let submitted = Instant::now();
                        let id = Uuid::new_v4();
                        let request = GroupSendRequest::commit(id, bundle.commit, bundle.group_info, bundle.welcome);
                        submit(&http, &member.session, &group_id, &request).await?;
                        Ok(CommitStats { id, build, hub: submitted.elapsed(), commit_bytes, welcome_bytes })
                    }
                    .await;
                    let _ = done.send(answer);
                }
            },
            event = events.recv() => {
                let Some((event, _at)) = event else { return Ok(()) };
                match event.kind {
                    GroupEventKind::Welcome => {
                        let started = Instant::now();
                        let tree = event.ratchet_tree.as_ref().context("tree")?;
                        let joined = tokio::task::block_in_place(|| member.client.join(&event.message.0, &tree.0)?.accept(&member.client))?;
                        let _ = reports.send(Report::Processed { epoch: joined.epoch(), took: started.elapsed(), at: Instant::now() });
                        group = Some(joined);
                    }
                    GroupEventKind::Commit => {
                        let started = Instant::now();
                        let group = group.as_mut().context("a commit before joining")?;
                        match tokio::task::block_in_place(|| group.process(&member.client, &event.message.0))? {
                            Incoming::Commit(commit) => tokio::task::block_in_place(|| group.merge_commit(&member.client, commit))?,
                            Incoming::OwnCommit => group.merge_pending_commit(&member.client)?,
                            other => bail!("expected a commit, got {other:?}"),
                        }
                        let _ = reports.send(Report::Processed { epoch: group.epoch(), took: started.elapsed(), at: Instant::now() });
                    }
                    _ if decrypt => {
                        let group = group.as_mut().context("a message before joining")?;
                        if let Incoming::Application { plaintext, .. } = group.process(&member.client, &event.message.0)? {
                            let _ = reports.send(Report::Decrypted { text: String::from_utf8(plaintext)? });
                        }
                    }
                    _ => {}
                }
                let ack = json!({"type": "group_ack", "group_id": event.group_id, "group_seq": event.group_seq});
                out.send(ack.to_string()).ok().context("writer stopped")?;
            }
        }
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<anyhow::Result<()>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Writes a member's frames, and a ping every 10 s (the server closes a connection silent for
/// its heartbeat timeout).
async fn write_frames(mut sink: SplitSink<Socket, Message>, mut frames: mpsc::UnboundedReceiver<String>) -> anyhow::Result<()> {
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10));
    loop {
        let text = tokio::select! {
            _ = heartbeat.tick() => json!({"type": "ping"}).to_string(),
            frame = frames.recv() => match frame {
                Some(text) => text,
                None => return Ok(()),
            },
        };
        sink.send(Message::Text(text.into())).await?;
    }
}

/// Reads a member's socket: timestamps every group event as it arrives and hands it on.
async fn read_frames(
    mut stream: futures_util::stream::SplitStream<Socket>,
    events: mpsc::UnboundedSender<(GroupEvent, Instant)>,
    reports: mpsc::UnboundedSender<Report>,
) -> anyhow::Result<()> {
    while let Some(frame) = stream.next().await {
        let Message::Text(text) = frame? else { continue };
        if !text.as_str().starts_with("{\"type\":\"group_event\"") {
            continue;
        }
        let at = Instant::now();
        let event: GroupEvent = serde_json::from_str(text.as_str())?;
        let _ = reports.send(Report::Received { client_msg_id: event.client_msg_id, at });
        if events.send((event, at)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Runs a member, printing why it stopped if it failed.
async fn report_errors(member: impl std::future::Future<Output = anyhow::Result<()>>) {
    if let Err(error) = member.await {
        eprintln!("a member stopped: {error:#}");
    }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until `count` members reported reaching `epoch`: (wall time since `since` when the last
/// did, per-member processing times sorted).
/// Waits until `count` members processed a commit into `epoch`. Returns when the last one had,
/// when the commit (`commit`, or its Welcome) had reached the last member's socket, both after
/// `since`, and each member's processing time in ms, sorted.
async fn until_epoch(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    epoch: u64,
    count: usize,
    commit: Uuid,
    since: Instant,
) -> anyhow::Result<(Duration, Duration, Vec<f64>)> {
    let mut took = Vec::with_capacity(count);
    let (mut last, mut delivered) = (since, since);
    while took.len() < count {
        match tokio::time::timeout(Duration::from_secs(600), reports.recv()).await?.context("members stopped")? {
            Report::Processed { epoch: e, took: t, at } if e == epoch => {
                took.push(ms(t));
                last = last.max(at);
            }
            Report::Received { client_msg_id, at } if client_msg_id == commit => delivered = delivered.max(at),
            _ => {}
        }
    }
    took.sort_by(f64::total_cmp);
    Ok((last.duration_since(since), delivered.duration_since(since), took))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let n = args.members.max(3);
    let args = Args { config: format!("[limits]\nmax_group_members = 2000\n{}", args.config), ..args };
    println!("parley-group-bench: {n} members over 2 servers, {} group msgs/s for {} s", args.rate, args.seconds);
    let mut net = FedNet::start_as(
        parley_tests::Mode::Process,
        &[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)],
        &format!("{BENCH_CONFIG}{}\n", args.config.replace("\\n", "\n")),
    )
    .await?;
    let bases = [net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone()];
    let started = Instant::now();
    let members: Vec<Member> = stream::iter(0..n + 1)
        .map(|i| {
            let base = bases[i % 2].clone();
            async move { member(&base, &format!("m{i}")).await }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    eprintln!("{} accounts in {:.1} s", members.len(), started.elapsed().as_secs_f64());
    let mut members = members;
    let newcomer = members.pop().context("newcomer")?;
    let device_ids: Vec<DeviceId> = members.iter().map(|m| m.session.device_id.clone()).collect();
    let creator_session = members[0].session.clone();

    // (1) The creator (on the hub) adds everyone in one commit.
    let group_id = GroupId::parse("!bench:a.test")?;
    let creator = &members[0];
    let mut group = creator.client.create_group(&creator.identity, group_id.mls_group_id())?;
    let http = reqwest::Client::new();
    let create =
        CreateGroupRequest::new(group_id.clone(), group.group_info(&creator.client, &creator.identity)?, group.ratchet_tree()?);
    http.post(format!("{}/v1/groups", bases[0]))
        .bearer_auth(creator.session.access_token())
        .json(&create)
        .send()
        .await?
        .error_for_status()?;
    let api = Api::new(&creator.session)?;
    let mut packages = Vec::new();
    for chunk in members[1..].chunks(parley_sdk::spec::v1::keys::MAX_CLAIM_DEVICES) {
        let claimed = api.claim_keypackages(&ClaimKeyPackagesRequest::new(chunk.iter().map(Member::device).collect())).await?;
        anyhow::ensure!(claimed.missing.is_empty(), "missing KeyPackages: {:?}", claimed.missing);
        for kp in claimed.key_packages {
            packages.push(KeyPackage::from_bytes(&kp.key_package.0)?);
        }
    }
    let built = Instant::now();
    let bundle = group.add_members(&creator.client, &creator.identity, &packages)?;
    let add_all_build = built.elapsed();
    let (add_all_commit, add_all_welcome) = (bundle.commit.len(), bundle.welcome.as_ref().map_or(0, Vec::len));

    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let mut sockets = Vec::with_capacity(n);
    for chunk in members.chunks(64) {
        let connected = futures_util::future::join_all(chunk.iter().map(|m| connect(&m.session))).await;
        for socket in connected {
            sockets.push(socket?);
        }
    }
    let submitted = Instant::now();
    let add_all = Uuid::new_v4();
    submit(
        &http,
        &creator.session,
        &group_id,
        &GroupSendRequest::commit(add_all, bundle.commit, bundle.group_info, bundle.welcome),
    )
    .await?;
    let add_all_hub = submitted.elapsed();
    let mut handles = Vec::with_capacity(n);
    let mut commands = Vec::with_capacity(n);
    let mut initial = Some(group);
    for (member, socket) in members.into_iter().zip(sockets) {
        let (tx, rx) = mpsc::unbounded_channel();
        let group = initial.take();
        handles.push(tokio::spawn(report_errors(run_member(member, group, socket, group_id.clone(), rx, reports_tx.clone()))));
        commands.push(tx);
    }
    let (joined_all, _, join_times) = until_epoch(&mut reports, 1, n, add_all, submitted).await?;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| create: one commit adding {} members: build / hub answer | {:.0} ms / {:.0} ms |",
        n - 1,
        ms(add_all_build),
        ms(add_all_hub)
    );
    println!(
        "| that commit / its Welcome | {:.0} KB / {:.0} KB |",
        add_all_commit as f64 / 1000.0,
        add_all_welcome as f64 / 1000.0
    );
    println!(
        "| join from Welcome + tree, per member p50 / p99; all {n} joined after | {:.0} ms / {:.0} ms; {:.1} s |",
        pct(&join_times, 0.5),
        pct(&join_times, 0.99),
        joined_all.as_secs_f64()
    );

    // (2) Latency at a fixed rate from members on both servers.
    let a_before = (
        net.server("a.test").counter("federation_txns_sent").await?,
        net.server("a.test").counter("federation_bytes_sent").await?,
    );
    let total = (args.rate * args.seconds) as usize;
    let mut sent_at: HashMap<Uuid, Instant> = HashMap::with_capacity(total);
    let mut last_seen: HashMap<Uuid, (usize, Instant)> = HashMap::with_capacity(total);
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let phase = Instant::now();
    let mut answers = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until((phase + interval * i as u32).into()).await;
        let (done, answer) = oneshot::channel();
        let sender = (i * 7919) % n;
        commands[sender].send(Command::Send { text: format!("message {i}"), done }).ok().context("member stopped")?;
        answers.push((Instant::now(), answer));
        while let Ok(report) = reports.try_recv() {
            if let Report::Received { client_msg_id, at } = report {
                let entry = last_seen.entry(client_msg_id).or_insert((0, at));
                *entry = (entry.0 + 1, entry.1.max(at));
            }
        }
    }
    for (at, answer) in answers {
        let sent = answer.await??;
        sent_at.insert(sent.client_msg_id, at);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent_at.keys().any(|id| last_seen.get(id).is_none_or(|(count, _)| *count < n)) && Instant::now() < deadline {
        if let Ok(Some(Report::Received { client_msg_id, at })) =
            tokio::time::timeout(Duration::from_secs(1), reports.recv()).await
        {
            let entry = last_seen.entry(client_msg_id).or_insert((0, at));
            *entry = (entry.0 + 1, entry.1.max(at));
        }
    }
    let mut latencies: Vec<f64> = sent_at
        .iter()
        .filter_map(|(id, at)| last_seen.get(id).filter(|(count, _)| *count >= n).map(|(_, last)| ms(last.duration_since(*at))))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let complete = latencies.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_after = (
        net.server("a.test").counter("federation_txns_sent").await?,
        net.server("a.test").counter("federation_bytes_sent").await?,
    );
    println!(
        "| send → last of {n} members received at {} msgs/s, p50 / p99 ({complete}/{total} complete) | {:.1} ms / {:.1} ms |",
        args.rate,
        pct(&latencies, 0.5),
        pct(&latencies, 0.99)
    );
    println!(
        "| hub → b.test federation requests / bytes per group message | {:.2} / {:.0} B |",
        (a_after.0 - a_before.0) as f64 / total as f64,
        (a_after.1 - a_before.1) as f64 / total as f64
    );

    // (3) One remove at this size: the creator removes the last member.
    let removed = n - 1;
    let (done, answer) = oneshot::channel();
    let victim = DeviceRef::new(
        UserId::parse(&format!("@m{removed}:{}", if removed % 2 == 0 { "a.test" } else { "b.test" }))?,
        device_ids[removed].clone(),
    );
    let started = Instant::now();
    commands[0].send(Command::Commit { change: Change::Remove(victim), done }).ok().context("creator stopped")?;
    let stats = answer.await??;
    let (all, delivered, took) = until_epoch(&mut reports, 2, n, stats.id, started).await?;
    println!(
        "| remove 1 at {n} members: commit build / size / hub answer | {:.0} ms / {:.1} KB / {:.0} ms |",
        ms(stats.build),
        stats.commit_bytes as f64 / 1000.0,
        ms(stats.hub)
    );
    println!(
        "| remove: on every member's socket after; processed per member p50 / p99; every member done after | {:.2} s; {:.1} ms / {:.1} ms; {:.2} s |",
        delivered.as_secs_f64(),
        pct(&took, 0.5),
        pct(&took, 0.99),
        all.as_secs_f64()
    );

    // (4) One add at this size: the newcomer, on b.test.
    let socket = connect(&newcomer.session).await?;
    let claimed = Api::new(&creator_session)?.claim_keypackages(&ClaimKeyPackagesRequest::new(vec![newcomer.device()])).await?;
    let package = KeyPackage::from_bytes(&claimed.key_packages.first().context("newcomer's KeyPackage")?.key_package.0)?;
    let (tx, rx) = mpsc::unbounded_channel();
    handles.push(tokio::spawn(report_errors(run_member(newcomer, None, socket, group_id.clone(), rx, reports_tx.clone()))));
    commands.push(tx);
    let (done, answer) = oneshot::channel();
    let started = Instant::now();
    commands[0].send(Command::Commit { change: Change::Add(Box::new(package)), done }).ok().context("creator stopped")?;
    let stats = answer.await??;
    let (all, delivered, took) = until_epoch(&mut reports, 3, n, stats.id, started).await?;
    println!(
        "| add 1 at {n} members: commit build / size / Welcome / hub answer | {:.0} ms / {:.1} KB / {:.1} KB / {:.0} ms |",
        ms(stats.build),
        stats.commit_bytes as f64 / 1000.0,
        stats.welcome_bytes as f64 / 1000.0,
        ms(stats.hub)
    );
    println!(
        "| add: on every member's socket after; processed (or joined) per member p50 / p99; every member done after | {:.2} s; {:.1} ms / {:.1} ms; {:.2} s |",
        delivered.as_secs_f64(),
        pct(&took, 0.5),
        pct(&took, 0.99),
        all.as_secs_f64()
    );

    // (5) End to end: every member but the sender decrypts one last message.
    for (i, command) in commands.iter().enumerate() {
        if i != removed {
            command.send(Command::Decrypt(true)).ok().context("member stopped")?;
        }
    }
    let (done, answer) = oneshot::channel();
    commands[1].send(Command::Send { text: "the last word".into(), done }).ok().context("member stopped")?;
    answer.await??;
    let mut decrypted = 0;
    while decrypted < n - 1 {
        match tokio::time::timeout(Duration::from_secs(120), reports.recv()).await?.context("members stopped")? {
            Report::Decrypted { text } if text == "the last word" => decrypted += 1,
            _ => {}
        }
    }
    println!("| end to end: members that decrypted the last message | {decrypted} of {} |", n - 1);
    drop(commands);
    for handle in handles {
        handle.abort();
    }
    Ok(())
}
