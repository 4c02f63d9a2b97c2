//! `parley-bench`: 1:1 relay through one real `parleyd` (release build, durable SQLite with
//! `synchronous = full`) on loopback. Prints a Markdown table.
//!
//! ```sh
//! cargo run --release -p parley-tests --bin parley-bench -- --devices 1000 --seconds 10
//! cargo run --release -p parley-tests --bin parley-bench -- --federation --devices 1000 --seconds 10
//! ```
//!
//! The database is the tests' backend: SQLite, or with `PARLEY_TEST_BACKEND=postgres` a fresh
//! PostgreSQL database (`scripts/postgres.sh`). `--workers 2` runs two workers of one
//! homeserver on one PostgreSQL database with NATS between them (`scripts/nats.sh`), devices
//! alternating between them, so every message is sent at one worker and delivered at the other.
//!
//! With `--federation`, two servers (`a.test`, `b.test`, HTTPS with a test CA, found through a
//! real DNS server's SRV records) each host half of the devices, and every device sends to a
//! device on the other server: each message crosses the federation queue and transactions.
//!
//! Phases: (1) saturation — every device keeps a window of sends in flight to the next
//! device, and we count messages delivered to recipients per second; (2) latency — a fixed
//! offered load (default 5,000 msgs/s spread over all devices), send→receive latency measured
//! with a timestamp inside the ciphertext; (3) idle — a fresh server, N idle WebSockets, and
//! the server's RSS growth per connection. The load generator is a lean raw WebSocket client
//! (no SDK) so that it costs the shared two cores as little as possible.

use anyhow::{bail, Context as _};
use base64::Engine as _;
use clap::Parser;
use futures_util::stream::{self, StreamExt as _};
use futures_util::SinkExt as _;
use parley_tests::TestServer;
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
struct Args {
    /// Connected devices in the saturation and latency phases.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Sends in flight per device in the saturation phase.
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Offered load of the latency phase, messages per second (all devices together).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Idle connections for the memory phase (at least 1).
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    idle: usize,
    /// Ciphertext bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Two federating servers, every message crossing from one to the other.
    #[arg(long)]
    federation: bool,
    /// Skip the saturation phase (measure only the offered load of --rate).
    #[arg(long)]
    no_saturation: bool,
    /// Workers of the homeserver: 2 puts both on PostgreSQL with NATS between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    workers: u8,
    /// Also print each phase's send→receive latency by when the message was sent, in 500 ms
    /// buckets from the start of its warm-up: where in the phase the tail comes from.
    #[arg(long)]
    timeline: bool,
}

const BENCH_CONFIG: &str = "[storage]\nsynchronous = \"full\"\n[log]\nfilter = \"warn\"\n";

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Account {
    base: String,
    user_id: String,
    device_id: String,
    token: String,
}

#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<u64>,
    event: Option<Event>,
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "type")]
    kind: String,
    ciphertext: Option<String>,
}

/// A count of at least one (`--idle 0` would measure nothing, and divide by it).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let epoch = Instant::now();
    println!(
        "parley-bench: {} devices, {} s per phase, window {}, latency load {} msg/s, {} idle connections",
        args.devices, args.seconds, args.window, args.rate, args.idle
    );

    if args.federation {
        return federation(&args, epoch).await;
    }
    // Kept until the end: the workers and NATS.
    let mut running = Vec::new();
    let mut nats = None;
    let (accounts, servers) = if args.workers == 2 {
        let server = parley_tests::nats::NatsServer::start().await?;
        let config = format!("{BENCH_CONFIG}[cluster]\nnats_url = \"{}\"\n", server.url());
        nats = Some(server);
        let mut one = TestServer::prepare_as(parley_tests::Mode::Process, &config)?.with_backend(parley_tests::Backend::Postgres);
        one.restart().await?;
        let mut two = TestServer::prepare_as(parley_tests::Mode::Process, &config)?.worker_of(&one)?;
        two.restart().await?;
        let mut accounts = register_all(&one.base_url, args.devices, "u").await?;
        for account in accounts.iter_mut().skip(1).step_by(2) {
            account.base = two.base_url.clone();
        }
        let servers = vec![(one.base_url.clone(), one.pid().context("pid")?), (two.base_url.clone(), two.pid().context("pid")?)];
        running.extend([one, two]);
        (accounts, servers)
    } else {
        let server = TestServer::process_with(BENCH_CONFIG).await?;
        let accounts = register_all(&server.base_url, args.devices, "u").await?;
        let servers = vec![(server.base_url.clone(), server.pid().context("pid")?)];
        running.push(server);
        (accounts, servers)
    };
    let running_backend = running[0].backend();
    println!(
        "backend: {:?}, {} worker(s){}",
        running_backend,
        args.workers,
        if args.workers == 2 { ", devices alternating: every message crosses workers over NATS" } else { "" }
    );
    let n = accounts.len();
    let saturation = relay_phase(&servers, &accounts, |i| (i + 1) % n, &args, Load::Saturate(args.window), epoch).await?;
    let latency = relay_phase(&servers, &accounts, |i| (i + 1) % n, &args, Load::Rate(args.rate), epoch).await?;
    drop(running);
    drop(nats);

    let idle = idle_phase(args.idle).await?;

    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| delivered msgs/s at saturation ({} devices, window {}) | {:.0} |",
        args.devices, args.window, saturation.delivered_per_sec
    );
    println!("| sent answers/s at saturation | {:.0} |", saturation.sent_per_sec);
    println!("| p50 / p99 send→receive latency at saturation | {:.1} ms / {:.1} ms |", saturation.p50_ms, saturation.p99_ms);
    println!("| offered load (latency phase) | {} msgs/s |", args.rate);
    println!("| delivered msgs/s (latency phase) | {:.0} |", latency.delivered_per_sec);
    println!(
        "| p50 / p99 send→`sent` answer at {} msgs/s | {:.2} ms / {:.2} ms |",
        args.rate, latency.sent_p50_ms, latency.sent_p99_ms
    );
    println!("| p50 / p99 send→receive latency at {} msgs/s | {:.2} ms / {:.2} ms |", args.rate, latency.p50_ms, latency.p99_ms);
    for (name, phase) in [("saturation", &saturation), ("latency phase", &latency)] {
        println!(
            "| {name}: server CPU / load generator CPU / mean group commit / ops per commit | {:.2} / {:.2} cores / {:.2} ms / {:.0} |",
            phase.server_cores, phase.client_cores, phase.commit_ms, phase.batch
        );
    }
    // PostgreSQL and NATS: every such process on the machine (on SQLite, whatever else runs).
    for (name, phase) in [("saturation", &saturation), ("latency phase", &latency)] {
        println!(
            "| {name}: PostgreSQL CPU / NATS CPU / server CPU per 1,000 msgs/s / PostgreSQL CPU per 1,000 msgs/s | {:.2} / {:.2} cores / {:.3} / {:.3} cores |",
            phase.postgres_cores,
            phase.nats_cores,
            phase.server_cores / phase.delivered_per_sec * 1000.0,
            phase.postgres_cores / phase.delivered_per_sec * 1000.0
        );
    }
    println!(
        "| server RSS, baseline → {} idle connections | {:.1} MiB → {:.1} MiB |",
        args.idle,
        idle.0 as f64 / 1048576.0,
        idle.1 as f64 / 1048576.0
    );
    println!(
        "| server memory per idle connection | {:.1} KiB |",
        (idle.1.saturating_sub(idle.0)) as f64 / args.idle as f64 / 1024.0
    );
    Ok(())
}

/// Two federating servers; device i on a.test talks to device i on b.test and back.
async fn federation(args: &Args, epoch: Instant) -> anyhow::Result<()> {
    use parley_tests::fednet::{Discovery, FedNet};
    let mut net =
        FedNet::start_as(parley_tests::Mode::Process, &[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], BENCH_CONFIG)
            .await?;
    let half = args.devices.div_ceil(2);
    let a = net.server("a.test");
    let mut accounts = register_all(&a.base_url, half, "u").await?;
    let mut servers = vec![(a.base_url.clone(), a.pid().context("pid")?)];
    let b = net.server("b.test");
    accounts.extend(register_all(&b.base_url, half, "u").await?);
    servers.push((b.base_url.clone(), b.pid().context("pid")?));
    let n = accounts.len();
    let peer = |i: usize| (i + half) % n;
    // The offered-load phase first: a saturation phase leaves a backlog behind it.
    let latency = relay_phase(&servers, &accounts, peer, args, Load::Rate(args.rate), epoch).await?;
    let saturation = if args.no_saturation {
        None
    } else {
        Some(relay_phase(&servers, &accounts, peer, args, Load::Saturate(args.window), epoch).await?)
    };
    println!();
    println!("| measure (two federating servers, every message crosses) | value |");
    println!("|---|---|");
    println!("| offered load (latency phase) | {} msgs/s |", args.rate);
    println!("| delivered msgs/s (latency phase) | {:.0} |", latency.delivered_per_sec);
    println!("| p50 / p99 send→receive latency at {} msgs/s | {:.2} ms / {:.2} ms |", args.rate, latency.p50_ms, latency.p99_ms);
    println!(
        "| p50 / p99 send→`sent` answer at {} msgs/s | {:.2} ms / {:.2} ms |",
        args.rate, latency.sent_p50_ms, latency.sent_p99_ms
    );
    if let Some(saturation) = &saturation {
        println!(
            "| delivered msgs/s at saturation ({} devices, window {}) | {:.0} |",
            n, args.window, saturation.delivered_per_sec
        );
        println!("| p50 / p99 send→receive latency at saturation | {:.1} ms / {:.1} ms |", saturation.p50_ms, saturation.p99_ms);
    }
    for (name, phase) in [("latency phase", &latency)].into_iter().chain(saturation.iter().map(|s| ("saturation", s))) {
        println!(
            "| {name}: both servers' CPU / load generator CPU / mean group commit / ops per commit | {:.2} / {:.2} cores / {:.2} ms / {:.0} |",
            phase.server_cores, phase.client_cores, phase.commit_ms, phase.batch
        );
    }
    Ok(())
}

async fn register_all(base: &str, n: usize, prefix: &str) -> anyhow::Result<Vec<Account>> {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let accounts: Vec<anyhow::Result<Account>> = stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let base = base.to_owned();
            let name = format!("{prefix}{i}");
            async move {
                let response = http
                    .post(format!("{base}/v1/register"))
                    .json(&json!({"username": name, "password": "benchmark password"}))
                    .send()
                    .await?;
                let status = response.status();
                let body: serde_json::Value = response.json().await?;
                if !status.is_success() {
                    bail!("register: {status} {body}");
                }
                Ok(Account {
                    base: base.clone(),
                    user_id: body["user_id"].as_str().context("user_id")?.to_owned(),
                    device_id: body["device_id"].as_str().context("device_id")?.to_owned(),
                    token: body["access_token"].as_str().context("token")?.to_owned(),
                })
            }
        })
        .buffered(32)
        .collect()
        .await;
    let accounts = accounts.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("registered {n} users in {:.1} s", started.elapsed().as_secs_f64());
    Ok(accounts)
}

async fn connect(base: &str, token: &str, small: bool) -> anyhow::Result<Socket> {
    let url = format!("{}/v1/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    // tungstenite zeroes the free part of its read buffer before every read: a 64 KiB buffer
    // (its default) made memset the generator's largest cost at 10,000 msgs/s. Frames here are
    // small; a larger one grows the buffer as it needs.
    let config = if small {
        WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
    } else {
        WebSocketConfig::default().read_buffer_size(8 * 1024)
    };
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    Ok(socket)
}

/// Reads frames until `caught_up`.
async fn until_caught_up(socket: &mut Socket) -> anyhow::Result<()> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next()).await?.context("closed")??;
        if let Message::Text(text) = message {
            let frame: Frame = serde_json::from_str(text.as_str())?;
            if frame.kind == "caught_up" {
                return Ok(());
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Load {
    Saturate(usize),
    Rate(u64),
}

struct PhaseResult {
    delivered_per_sec: f64,
    sent_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Send → `sent` answer.
    sent_p50_ms: f64,
    sent_p99_ms: f64,
    /// Mean group-commit duration (ms) and operations per commit, from the server's metrics.
    commit_ms: f64,
    batch: f64,
    /// Server CPU used, in cores.
    server_cores: f64,
    /// Load generator CPU used, in cores.
    client_cores: f64,
    /// PostgreSQL's and NATS's CPU, in cores (every such process on the machine).
    postgres_cores: f64,
    nats_cores: f64,
}

/// Sums and counts of the writer's histograms, and the server's CPU time, at one moment.
#[derive(Default, Clone, Copy)]
struct ServerSample {
    commit_sum: f64,
    commit_count: f64,
    batch_sum: f64,
    cpu_secs: f64,
    /// CPU seconds of every `postgres` and every `nats-server` process on the machine.
    postgres_secs: f64,
    nats_secs: f64,
}

/// The sum over `servers` (base URL, pid).
async fn sample(servers: &[(String, u32)]) -> anyhow::Result<ServerSample> {
    let mut total = ServerSample::default();
    for (base, pid) in servers {
        let text = reqwest::get(format!("{base}/metrics")).await?.text().await?;
        let value = |name: &str| {
            text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok())).unwrap_or(0.0)
        };
        total.commit_sum += value("parley_store_commit_seconds_sum");
        total.commit_count += value("parley_store_commit_seconds_count");
        total.batch_sum += value("parley_store_batch_operations_sum");
        total.cpu_secs += sample_cpu(*pid)?;
    }
    (total.postgres_secs, total.nats_secs) = (cpu_of_command("postgres"), cpu_of_command("nats-server"));
    Ok(total)
}

/// CPU seconds used so far by every process whose command name is `comm` (processes that
/// ended meanwhile are missed: PostgreSQL's backends live as long as the pool's connections).
fn cpu_of_command(comm: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == comm))
        .filter_map(|pid| sample_cpu(pid).ok())
        .sum()
}

/// User + system CPU seconds of a process (Linux, 100 ticks per second).
fn sample_cpu(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((field(11) + field(12)) / 100.0)
}

async fn relay_phase(
    servers: &[(String, u32)],
    accounts: &[Account],
    peer_of: impl Fn(usize) -> usize,
    args: &Args,
    load: Load,
    epoch: Instant,
) -> anyhow::Result<PhaseResult> {
    let n = accounts.len();
    let mut sockets = Vec::with_capacity(n);
    for account in accounts {
        let mut socket = connect(&account.base, &account.token, false).await?;
        until_caught_up(&mut socket).await?;
        sockets.push(socket);
    }
    let delivered = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let phase_start = epoch.elapsed().as_nanos() as u64;
    let stop_at = Instant::now() + Duration::from_secs(1 + args.seconds); // 1 s warm-up
    let mut tasks = Vec::with_capacity(n);
    for (i, socket) in sockets.into_iter().enumerate() {
        let peer = &accounts[peer_of(i)];
        let to = peer.user_id.clone();
        let device = peer.device_id.clone();
        let delivered = delivered.clone();
        let sent = sent.clone();
        let measuring = measuring.clone();
        let payload = args.payload;
        let per_device_interval = match load {
            Load::Rate(rate) => Some(Duration::from_secs_f64(n as f64 / rate as f64)),
            Load::Saturate(_) => None,
        };
        let window = match load {
            Load::Saturate(w) => w,
            Load::Rate(_) => usize::MAX,
        };
        let offset = Duration::from_secs_f64(per_device_interval.map_or(0.0, |d| d.as_secs_f64() * i as f64 / n as f64));
        tasks.push(tokio::spawn(async move {
            device_loop(
                socket,
                to,
                device,
                payload,
                window,
                per_device_interval,
                offset,
                stop_at,
                epoch,
                delivered,
                sent,
                measuring,
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Release);
    let start_delivered = delivered.load(Ordering::Acquire);
    let start_sent = sent.load(Ordering::Acquire);
    let before = sample(servers).await?;
    let own_before = sample_cpu(std::process::id())?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = sample(servers).await?;
    let own_after = sample_cpu(std::process::id())?;
    let commits = (after.commit_count - before.commit_count).max(1.0);
    let delivered_n = delivered.load(Ordering::Acquire) - start_delivered;
    let sent_n = sent.load(Ordering::Acquire) - start_sent;
    measuring.store(false, Ordering::Release);
    let mut latencies = Vec::new();
    let mut sent_latencies = Vec::new();
    for task in tasks {
        let (received, answered) = task.await??;
        latencies.extend(received);
        sent_latencies.extend(answered);
    }
    if args.timeline {
        print_timeline(&latencies, phase_start);
    }
    let mut latencies: Vec<u64> = latencies.into_iter().map(|(_, latency)| latency).collect();
    latencies.sort_unstable();
    sent_latencies.sort_unstable();
    let pct = |p: f64| percentile(&latencies, p);
    Ok(PhaseResult {
        delivered_per_sec: delivered_n as f64 / elapsed,
        sent_per_sec: sent_n as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        sent_p50_ms: percentile(&sent_latencies, 0.5),
        sent_p99_ms: percentile(&sent_latencies, 0.99),
        commit_ms: (after.commit_sum - before.commit_sum) / commits * 1000.0,
        batch: (after.batch_sum - before.batch_sum) / commits,
        server_cores: (after.cpu_secs - before.cpu_secs) / elapsed,
        client_cores: (own_after - own_before) / elapsed,
        postgres_cores: (after.postgres_secs - before.postgres_secs) / elapsed,
        nats_cores: (after.nats_secs - before.nats_secs) / elapsed,
    })
}

/// The `p` quantile of sorted nanoseconds, in milliseconds (0 for none).
fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1e6
}

/// Send→receive latency (`(sent, latency)` in ns since the epoch) by send time, in 500 ms
/// buckets from `start`: count, p50, p99, max.
fn print_timeline(latencies: &[(u64, u64)], start: u64) {
    const BUCKET: u64 = 500_000_000;
    let mut buckets: std::collections::BTreeMap<u64, Vec<u64>> = std::collections::BTreeMap::new();
    for &(sent, latency) in latencies {
        buckets.entry(sent.saturating_sub(start) / BUCKET).or_default().push(latency);
    }
    println!("| sent at (s) | received | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (bucket, mut values) in buckets {
        values.sort_unstable();
        let at = |p: f64| percentile(&values, p);
        println!("| {:.1} | {} | {:.1} | {:.1} | {:.1} |", bucket as f64 * 0.5, values.len(), at(0.5), at(0.99), at(1.0));
    }
}

/// One device: sends (windowed or paced), receives, acks; returns the latencies (ns) it measured.
#[allow(clippy::too_many_arguments)]
async fn device_loop(
    socket: Socket,
    to: String,
    device: String,
    payload: usize,
    window: usize,
    interval: Option<Duration>,
    offset: Duration,
    stop_at: Instant,
    epoch: Instant,
    delivered: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    measuring: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<(Vec<(u64, u64)>, Vec<u64>)> {
    let (mut sink, mut stream) = socket.split();
    let mut latencies = Vec::new();
    let mut sent_latencies = Vec::new();
    let mut send_times = std::collections::VecDeque::new();
    let mut in_flight = 0usize;
    let mut last_seq = 0u64;
    let mut unacked = 0u32;
    let mut pace = interval.map(|d| {
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, d);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    // Like the SDK: acknowledge 20 ms after the first unacknowledged event, or at 64 events.
    let mut ack_deadline: Option<tokio::time::Instant> = None;
    let filler = vec![0x5au8; payload.saturating_sub(8)];
    let frame_for = |now_ns: u64| {
        let mut bytes = now_ns.to_le_bytes().to_vec();
        bytes.extend_from_slice(&filler);
        let ciphertext = base64::engine::general_purpose::STANDARD.encode(&bytes);
        format!(
            r#"{{"type":"send","client_msg_id":"{}","to":"{}","envelopes":[{{"user":"{}","device":"{}","ciphertext":"{}"}}]}}"#,
            uuid::Uuid::new_v4(),
            to,
            to,
            device,
            ciphertext
        )
    };
    loop {
        if Instant::now() >= stop_at {
            break;
        }
        // Saturation: keep the window full.
        if pace.is_none() {
            while in_flight < window {
                let now = epoch.elapsed().as_nanos() as u64;
                send_times.push_back(now);
                sink.feed(Message::Text(frame_for(now).into())).await?;
                in_flight += 1;
            }
            sink.flush().await?;
        }
        tokio::select! {
            _ = async { pace.as_mut().unwrap().tick().await }, if pace.is_some() => {
                let now = epoch.elapsed().as_nanos() as u64;
                send_times.push_back(now);
                sink.send(Message::Text(frame_for(now).into())).await?;
                in_flight += 1;
            }
            _ = async { tokio::time::sleep_until(ack_deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if ack_deadline.is_some() => {
                sink.send(Message::Text(format!(r#"{{"type":"ack","seq":{last_seq}}}"#).into())).await?;
                unacked = 0;
                ack_deadline = None;
            }
            _ = tokio::time::sleep_until(stop_at.into()) => break,
            message = stream.next() => {
                let Some(message) = message else { bail!("socket closed") };
                let Message::Text(text) = message? else { continue };
                let frame: Frame = serde_json::from_str(text.as_str())?;
                match frame.kind.as_str() {
                    "sent" => {
                        in_flight = in_flight.saturating_sub(1);
                        let at = send_times.pop_front().unwrap_or(0);
                        if measuring.load(Ordering::Relaxed) {
                            sent.fetch_add(1, Ordering::Relaxed);
                            sent_latencies.push((epoch.elapsed().as_nanos() as u64).saturating_sub(at));
                        }
                    }
                    "event" => {
                        last_seq = frame.seq.unwrap_or(last_seq);
                        unacked += 1;
                        ack_deadline.get_or_insert_with(|| tokio::time::Instant::now() + Duration::from_millis(20));
                        if let Some(event) = frame.event {
                            if event.kind == "message" {
                                if let Some(ct) = event.ciphertext {
                                    let bytes = base64::engine::general_purpose::STANDARD.decode(ct)?;
                                    let sent_ns = u64::from_le_bytes(bytes[..8].try_into()?);
                                    if measuring.load(Ordering::Relaxed) {
                                        delivered.fetch_add(1, Ordering::Relaxed);
                                        latencies.push((sent_ns, (epoch.elapsed().as_nanos() as u64).saturating_sub(sent_ns)));
                                    }
                                }
                            }
                        }
                        if unacked >= 64 {
                            sink.send(Message::Text(format!(r#"{{"type":"ack","seq":{last_seq}}}"#).into())).await?;
                            unacked = 0;
                            ack_deadline = None;
                        }
                    }
                    "error" => bail!("server error frame: {text}"),
                    _ => {}
                }
            }
        }
    }
    let _ = sink.send(Message::Close(None)).await;
    Ok((latencies, sent_latencies))
}

/// A fresh server, `n` idle connections; returns (baseline RSS, RSS with the connections).
async fn idle_phase(n: usize) -> anyhow::Result<(u64, u64)> {
    let server = TestServer::process_with(BENCH_CONFIG).await?;
    let pid = server.pid().context("pid")?;
    let users = n.div_ceil(10);
    let accounts = register_all(&server.base_url, users, "idle").await?;
    // Ten devices per user: log in nine more times each.
    let http = reqwest::Client::new();
    let mut tokens: Vec<String> = accounts.iter().map(|a| a.token.clone()).collect();
    let more: Vec<anyhow::Result<String>> = stream::iter(accounts.iter().flat_map(|a| std::iter::repeat_n(a.user_id.clone(), 9)))
        .map(|user| {
            let http = http.clone();
            let base = server.base_url.clone();
            async move {
                let response = http
                    .post(format!("{base}/v1/login"))
                    .json(&json!({"username": user, "password": "benchmark password"}))
                    .send()
                    .await?;
                let body: serde_json::Value = response.json().await?;
                Ok(body["access_token"].as_str().with_context(|| format!("login: {body}"))?.to_owned())
            }
        })
        .buffered(32)
        .collect()
        .await;
    for token in more {
        tokens.push(token?);
    }
    tokens.truncate(n);
    // Warm up: one connection opened and closed, so one-off allocations are in the baseline.
    let mut warm = connect(&server.base_url, &tokens[0], true).await?;
    until_caught_up(&mut warm).await?;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = rss(pid)?;
    let started = Instant::now();
    let sockets: Vec<anyhow::Result<Socket>> = stream::iter(tokens.iter())
        .map(|token| {
            let base = server.base_url.clone();
            async move {
                let mut socket = connect(&base, token, true).await?;
                until_caught_up(&mut socket).await?;
                Ok(socket)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let sockets = sockets.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("opened {} idle connections in {:.1} s", sockets.len(), started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = rss(pid)?;
    drop(sockets);
    Ok((baseline, loaded))
}

fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
    Ok(kib * 1024)
}
