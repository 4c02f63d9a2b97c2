//! `parleyd devnet`: several federating homeservers on one machine, for trying and testing
//! federation by hand. Server `i` is named `localhost:<base_port + i>` (an explicit port, so no
//! DNS discovery), serves federation on `127.0.0.1:<base_port + i>` with a certificate from a
//! devnet CA that every server trusts (`federation.extra_ca_file`), and its client API on
//! `127.0.0.1:<client_base_port + i>`. Everything lives in one directory that is kept between
//! runs:
//!
//! ```text
//! <dir>/ca.pem, ca.key                 the devnet CA (made once)
//! <dir>/localhost_<port>.pem, .key     server certificates (made when missing)
//! <dir>/server<i>.toml                 server i's configuration (rewritten at every start)
//! <dir>/server<i>.log                  its stdout and stderr (truncated at every start)
//! <dir>/<i>/                           its data directory
//! <dir>/clients/                       suggested PARLEY_HOME for `parley` profiles
//! ```
//!
//! The servers are child processes of `parleyd devnet` (`parleyd serve --config ...`); Ctrl-C
//! or SIGTERM stops them gracefully. `--emit-compose` prints the equivalent
//! `docker-compose.yml` instead ([`compose_file`]), whose servers are named `parley1`, ... and
//! find each other through Docker's DNS on the default port 8448.

use crate::certs;
use anyhow::{bail, Context as _};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// How long a server may take to print its listening line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to shut down after SIGTERM before it is killed.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// The line `parleyd serve` prints once it accepts connections.
const LISTENING: &str = "parleyd listening on http://";
/// The line before it, when federation is enabled.
const FEDERATION_LISTENING: &str = "parleyd federation listening on https://";

/// `parleyd devnet`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevnetArgs {
    /// How many homeservers to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=99))]
    pub servers: u16,
    /// Directory for certificates, configurations, logs and data (kept between runs).
    #[arg(long, default_value = "devnet")]
    pub dir: PathBuf,
    /// Federation port of server 0; server i uses base-port + i (and is named localhost:<that>).
    #[arg(long, default_value_t = 8448)]
    pub base_port: u16,
    /// Client API port of server 0; server i uses client-base-port + i.
    #[arg(long, default_value_t = 8008)]
    pub client_base_port: u16,
    /// Workers per homeserver. More than one needs --postgres and --nats; a proxy on the
    /// server's two ports then spreads connections over its workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub workers: u16,
    /// PostgreSQL for the servers' state instead of SQLite: server i gets the database
    /// parley_devnet_<its federation port> there (created when missing), e.g.
    /// postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, value_name = "URL")]
    pub postgres: Option<String>,
    /// NATS between the workers of each server, e.g. nats://127.0.0.1:4222.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// Print a docker-compose.yml and exit: that many federating servers (parley1, ...), or
    /// with --workers N (and --servers 1) one server of N workers on PostgreSQL, NATS and S3.
    #[arg(long)]
    pub emit_compose: bool,
}

/// `parleyd devnet-certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct DevnetCertsArgs {
    /// Where to write ca.pem, ca.key and <name>.pem/<name>.key (a name's ':' becomes '_').
    #[arg(long)]
    pub dir: PathBuf,
    /// Server names, comma-separated; each gets a certificate for its host part.
    #[arg(long, value_delimiter = ',', required = true)]
    pub names: Vec<String>,
    /// Also make a server signing key in this file unless it exists (for workers that share one).
    #[arg(long, value_name = "FILE")]
    pub server_key: Option<PathBuf>,
}

/// One homeserver of the devnet.
#[derive(Debug, Clone)]
pub struct Node {
    /// 0-based.
    pub index: usize,
    /// `localhost:<federation port>`.
    pub server_name: String,
    /// Client API address (the proxy's, with several workers).
    pub client: SocketAddr,
    /// Federation listener address (the proxy's, with several workers).
    pub federation: SocketAddr,
    /// Its certificate and key.
    pub tls_cert: PathBuf,
    /// Its private key.
    pub tls_key: PathBuf,
    /// Its PostgreSQL database (with --postgres).
    pub database_url: Option<String>,
    /// The server key its workers share (several workers only; one worker keeps it in its
    /// data directory).
    pub server_key: Option<PathBuf>,
    /// The media directory its workers share (several workers only).
    pub media_dir: Option<PathBuf>,
    /// Its processes: one, or one per worker.
    pub workers: Vec<Worker>,
}

impl Node {
    /// Whether a proxy stands in front of several workers.
    pub fn proxied(&self) -> bool {
        self.workers.len() > 1
    }
}

/// One `parleyd serve` process of a devnet server.
#[derive(Debug, Clone)]
pub struct Worker {
    /// 0-based, within its server.
    pub index: usize,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// Runs `parleyd devnet`: prints the compose file, or runs the servers until Ctrl-C.
pub fn main(args: DevnetArgs) -> anyhow::Result<()> {
    if args.emit_compose {
        if args.workers > 1 {
            if args.servers != 1 {
                bail!("--emit-compose with --workers {} describes one homeserver: add --servers 1", args.workers);
            }
            print!("{}", cluster_compose_file(usize::from(args.workers)));
        } else {
            print!("{}", compose_file(usize::from(args.servers)));
        }
        return Ok(());
    }
    let nodes = prepare(&args)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(run(&args, nodes))
}

/// Runs `parleyd devnet-certs`: a CA and a certificate per name, unless they exist.
pub fn certs_main(args: DevnetCertsArgs) -> anyhow::Result<()> {
    certs::write_pki(&args.dir, &args.names)?;
    println!("devnet certificates for {} in {} (CA: ca.pem)", args.names.join(", "), args.dir.display());
    if let Some(path) = &args.server_key {
        let key = parley_federation::ServerKey::load_or_create(path)?;
        println!("server key {} in {}", key.key_id, path.display());
    }
    Ok(())
}

/// The servers for `args`: names, ports and paths (nothing is written).
pub fn plan(args: &DevnetArgs) -> anyhow::Result<Vec<Node>> {
    let n = usize::from(args.servers);
    if n == 0 {
        bail!("--servers must be at least 1");
    }
    if args.workers > 1 && (args.postgres.is_none() || args.nats.is_none()) {
        bail!(
            "--workers {} needs --postgres and --nats: the workers of a server share its database and talk over NATS",
            args.workers
        );
    }
    if args.nats.is_some() && args.postgres.is_none() {
        bail!("--nats needs --postgres");
    }
    let last = |base: u16| u32::from(base) + u32::from(args.servers) - 1;
    for (flag, base) in [("--base-port", args.base_port), ("--client-base-port", args.client_base_port)] {
        if base == 0 || last(base) > u32::from(u16::MAX) {
            bail!("{flag} {base}: ports {base}..={} must be between 1 and 65535", last(base));
        }
    }
    if u32::from(args.base_port) <= last(args.client_base_port) && u32::from(args.client_base_port) <= last(args.base_port) {
        bail!("the federation ports (from --base-port) and client ports (from --client-base-port) overlap");
    }
    let dir = std::path::absolute(&args.dir).with_context(|| format!("resolving {}", args.dir.display()))?;
    let several = args.workers > 1;
    (0..args.servers)
        .map(|i| {
            let federation_port = args.base_port + i;
            let server_name = format!("localhost:{federation_port}");
            let stem = certs::file_stem(&server_name);
            let database_url = args.postgres.as_deref().map(|url| database_url(url, federation_port)).transpose()?;
            let workers = (0..usize::from(args.workers))
                .map(|w| {
                    let (name, data_dir) = if several {
                        (format!("server{i}-{w}"), dir.join(i.to_string()).join(format!("worker{w}")))
                    } else {
                        (format!("server{i}"), dir.join(i.to_string()))
                    };
                    Worker { index: w, config: dir.join(format!("{name}.toml")), log: dir.join(format!("{name}.log")), data_dir }
                })
                .collect();
            Ok(Node {
                index: usize::from(i),
                client: SocketAddr::from((Ipv4Addr::LOCALHOST, args.client_base_port + i)),
                federation: SocketAddr::from((Ipv4Addr::LOCALHOST, federation_port)),
                tls_cert: dir.join(format!("{stem}.pem")),
                tls_key: dir.join(format!("{stem}.key")),
                database_url,
                server_key: several.then(|| dir.join(i.to_string()).join("server.key")),
                media_dir: several.then(|| dir.join(i.to_string()).join("media")),
                workers,
                server_name,
            })
        })
        .collect()
}

/// The database of the server whose federation port is `port`, on the PostgreSQL at `url`.
fn database_url(url: &str, port: u16) -> anyhow::Result<String> {
    let mut parsed = url::Url::parse(url).with_context(|| format!("--postgres {url:?} is not a URL"))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        bail!("--postgres {url:?} is not a postgres:// URL");
    }
    parsed.set_path(&format!("/parley_devnet_{port}"));
    Ok(parsed.to_string())
}

/// [`plan`], then writes what the servers need: the PKI (when missing), the server keys that
/// workers share, the configurations and the data directories. Refuses to give an existing
/// data directory a different server name.
pub fn prepare(args: &DevnetArgs) -> anyhow::Result<Vec<Node>> {
    let nodes = plan(args)?;
    let dir = nodes[0].workers[0].config.parent().context("the devnet directory")?.to_owned(); // invariant: plan made it absolute
    let leaves: Vec<certs::Leaf> = nodes
        .iter()
        .map(|node| certs::Leaf {
            file_stem: certs::file_stem(&node.server_name),
            names: vec!["localhost".to_owned(), Ipv4Addr::LOCALHOST.to_string()],
        })
        .collect();
    certs::ensure_pki(&dir, &leaves)?;
    let ca = dir.join("ca.pem");
    for node in &nodes {
        for worker in &node.workers {
            check_same_name(&node.server_name, worker)?;
        }
        if let Some(key) = &node.server_key {
            std::fs::create_dir_all(key.parent().context("key directory")?)?;
            // Made here, before the workers start, so that they all read the same key.
            parley_federation::ServerKey::load_or_create(key)?;
        }
        for worker in &node.workers {
            std::fs::create_dir_all(&worker.data_dir).with_context(|| format!("creating {}", worker.data_dir.display()))?;
            std::fs::write(&worker.config, config_toml(node, worker, &ca, args.nats.as_deref())?)
                .with_context(|| format!("writing {}", worker.config.display()))?;
        }
    }
    Ok(nodes)
}

/// A data directory holds users of one server name: an earlier run with other ports would
/// leave `@alice:localhost:8448` on a server now called something else.
fn check_same_name(server_name: &str, worker: &Worker) -> anyhow::Result<()> {
    let Ok(previous) = std::fs::read_to_string(&worker.config) else { return Ok(()) };
    let previous_name = toml::from_str::<toml::Table>(&previous)
        .ok()
        .and_then(|table| table.get("server_name").and_then(|v| v.as_str()).map(str::to_owned));
    match previous_name {
        Some(name) if name != server_name && worker.data_dir.exists() => bail!(
            "{} holds the data of {name}, not {server_name}: use the same --base-port as before, or another --dir",
            worker.data_dir.display(),
        ),
        _ => Ok(()),
    }
}

/// The keys of [`crate::config::Config`] a devnet server sets; the rest are defaults.
#[derive(Serialize)]
struct NodeConfig<'a> {
    server_name: &'a str,
    listen: SocketAddr,
    data_dir: &'a Path,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_key_file: Option<&'a Path>,
    registration: crate::config::RegistrationConfig,
    federation: NodeFederation<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    storage: Option<NodeStorage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<NodeCluster<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    media: Option<NodeMedia<'a>>,
}

#[derive(Serialize)]
struct NodeFederation<'a> {
    enabled: bool,
    listen: SocketAddr,
    tls_cert: &'a Path,
    tls_key: &'a Path,
    extra_ca_file: &'a Path,
}

#[derive(Serialize)]
struct NodeStorage<'a> {
    database_url: &'a str,
}

#[derive(Serialize)]
struct NodeCluster<'a> {
    nats_url: &'a str,
}

#[derive(Serialize)]
struct NodeMedia<'a> {
    dir: &'a Path,
}

/// The configuration file of `worker` of server `node`. A lone worker listens on the
/// server's ports; several listen on ports the OS picks, behind the devnet's proxy.
pub fn config_toml(node: &Node, worker: &Worker, ca: &Path, nats: Option<&str>) -> anyhow::Result<String> {
    let any_port = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let config = NodeConfig {
        server_name: &node.server_name,
        listen: if node.proxied() { any_port } else { node.client },
        data_dir: &worker.data_dir,
        server_key_file: node.server_key.as_deref(),
        registration: crate::config::RegistrationConfig { mode: crate::config::RegistrationMode::Open },
        federation: NodeFederation {
            enabled: true,
            listen: if node.proxied() { any_port } else { node.federation },
            tls_cert: &node.tls_cert,
            tls_key: &node.tls_key,
            extra_ca_file: ca,
        },
        storage: node.database_url.as_deref().map(|database_url| NodeStorage { database_url }),
        cluster: nats.filter(|_| node.database_url.is_some()).map(|nats_url| NodeCluster { nats_url }),
        media: node.media_dir.as_deref().map(|dir| NodeMedia { dir }),
    };
    let body = toml::to_string(&config).context("paths must be UTF-8")?;
    Ok(format!("# generated by `parleyd devnet` at every start: change its flags, not this file\n\n{body}"))
}

/// Creates the servers' PostgreSQL databases that do not exist yet.
async fn create_databases(admin_url: &str, nodes: &[Node]) -> anyhow::Result<()> {
    use sqlx::Connection as _;
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at --postgres {admin_url}"))?;
    for node in nodes {
        let Some(url) = &node.database_url else { continue };
        let name = url::Url::parse(url)?.path().trim_start_matches('/').to_owned();
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1").bind(&name).fetch_optional(&mut admin).await?;
        if exists.is_none() {
            // The name is ours (parley_devnet_<port>): no quoting issue.
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await
                .with_context(|| format!("creating database {name}"))?;
        }
    }
    admin.close().await?;
    Ok(())
}

/// Where a worker listens, as it printed.
#[derive(Debug, Clone, Copy)]
struct Listening {
    client: SocketAddr,
    federation: Option<SocketAddr>,
}

/// A running worker.
struct Running {
    /// Its server's index.
    node: usize,
    worker: Worker,
    child: Child,
    /// Resolves when the worker has printed its client listening line.
    listening: Option<tokio::sync::oneshot::Receiver<Listening>>,
    /// Where it listens, once known.
    addresses: Option<Listening>,
}

impl Running {
    fn name(&self) -> String {
        format!("server {} worker {}", self.node, self.worker.index)
    }
}

async fn run(args: &DevnetArgs, nodes: Vec<Node>) -> anyhow::Result<()> {
    for node in &nodes {
        for (what, address) in [("client API", node.client), ("federation listener", node.federation)] {
            if let Err(error) = std::net::TcpListener::bind(address) {
                bail!(
                    "{address} ({what} of server {}) is not free: {error}. Another devnet? Choose other ports with \
                     --base-port and --client-base-port",
                    node.index
                );
            }
        }
    }
    if let Some(admin) = &args.postgres {
        create_databases(admin, &nodes).await?;
    }
    let exe = std::env::current_exe().context("finding the parleyd executable")?;
    let mut running = Vec::new();
    for node in &nodes {
        for worker in &node.workers {
            match spawn(&exe, worker) {
                Ok((child, listening)) => running.push(Running {
                    node: node.index,
                    worker: worker.clone(),
                    child,
                    listening: Some(listening),
                    addresses: None,
                }),
                Err(error) => {
                    stop(&mut running).await;
                    return Err(error);
                }
            }
        }
    }
    let started = tokio::select! {
        started = wait_until_listening(&mut running) => started,
        () = crate::cli::shutdown_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    let proxied = match started {
        Ok(()) => start_proxies(&nodes, &running).await,
        Err(error) => Err(error),
    };
    let mut proxies = match proxied {
        Ok(proxies) => proxies,
        Err(error) => {
            stop(&mut running).await;
            return Err(error);
        }
    };
    print!("{}", instructions(args, &nodes));
    let outcome = tokio::select! {
        () = crate::cli::shutdown_signal() => Ok(()),
        exited = first_exit(&mut running) => exited,
    };
    proxies.abort_all();
    println!("stopping {} servers...", running.len());
    stop(&mut running).await;
    println!("stopped");
    outcome
}

/// Puts a proxy on the two ports of every server with several workers.
async fn start_proxies(nodes: &[Node], running: &[Running]) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let mut proxies = tokio::task::JoinSet::new();
    for node in nodes.iter().filter(|node| node.proxied()) {
        let workers: Vec<Listening> = running.iter().filter(|r| r.node == node.index).filter_map(|r| r.addresses).collect();
        let clients = workers.iter().map(|w| w.client.to_string()).collect();
        let federations = workers.iter().filter_map(|w| w.federation).map(|a| a.to_string()).collect();
        for (address, backends) in [(node.client, clients), (node.federation, federations)] {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding {address} (proxy of server {})", node.index))?;
            proxies.spawn(crate::proxy::serve(listener, backends));
        }
    }
    Ok(proxies)
}

/// Starts one worker: stderr goes to its log, stdout (the listening lines) is copied there too
/// by a task that reports where the worker listens.
fn spawn(exe: &Path, worker: &Worker) -> anyhow::Result<(Child, tokio::sync::oneshot::Receiver<Listening>)> {
    let log = std::fs::File::create(&worker.log).with_context(|| format!("creating {}", worker.log.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .arg("--config")
        .arg(&worker.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone()?)
        .kill_on_drop(true);
    // The parent's PARLEY__* settings (or PARLEY_CONFIG) would override every server's file.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PARLEY_") {
            command.env_remove(key);
        }
    }
    let mut child =
        command.spawn().with_context(|| format!("starting {} serve --config {}", exe.display(), worker.config.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (ready, listening) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use std::io::Write as _;
        use tokio::io::AsyncBufReadExt as _;
        let mut log = log;
        let mut ready = Some(ready);
        let mut federation = None;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(log, "{line}");
            let address =
                |prefix: &str| line.strip_prefix(prefix).and_then(|rest| rest.split(' ').next()?.parse::<SocketAddr>().ok());
            if let Some(address) = address(FEDERATION_LISTENING) {
                federation = Some(address);
            } else if let Some(client) = address(LISTENING) {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Listening { client, federation });
                }
            }
        }
    });
    Ok((child, listening))
}

/// Waits until every worker has printed its listening line; fails if one exits or is slow.
async fn wait_until_listening(running: &mut [Running]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
    for server in running.iter_mut() {
        let Some(listening) = server.listening.take() else { continue };
        let outcome = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                ready = listening => ready.map_err(|_| None),
                status = server.child.wait() => Err(status.ok()),
            }
        })
        .await;
        let log = || tail(&read_log(&server.worker.log));
        match outcome {
            Ok(Ok(addresses)) => server.addresses = Some(addresses),
            Ok(Err(status)) => bail!(
                "{} exited during startup ({}); end of {}:\n{}",
                server.name(),
                status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string()),
                server.worker.log.display(),
                log()
            ),
            Err(_) => bail!(
                "{} did not start within {} s; end of {}:\n{}",
                server.name(),
                STARTUP_TIMEOUT.as_secs(),
                server.worker.log.display(),
                log()
            ),
        }
    }
    Ok(())
}

/// Resolves when the first worker exits on its own: an error unless it exited successfully.
async fn first_exit(running: &mut [Running]) -> anyhow::Result<()> {
    if running.is_empty() {
        return std::future::pending().await;
    }
    let waits = running.iter_mut().map(|server| {
        Box::pin(async move {
            let status = server.child.wait().await;
            (status, server.name(), server.worker.log.clone())
        })
    });
    let ((status, name, log), _, _) = futures_util::future::select_all(waits).await;
    let status = status?;
    if status.success() {
        println!("{name} stopped");
        return Ok(());
    }
    bail!("{name} exited ({status}); end of {}:\n{}", log.display(), tail(&read_log(&log)))
}

async fn stop(running: &mut [Running]) {
    for server in running.iter_mut() {
        if let (Ok(None), Some(pid)) = (server.child.try_wait(), server.child.id()) {
            // No signal API without unsafe code; kill(1) is everywhere parleyd runs.
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).stderr(Stdio::null()).status().await;
        }
    }
    for server in running.iter_mut() {
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, server.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("{} exited with {status}; see {}", server.name(), server.worker.log.display()),
            Ok(Err(error)) => eprintln!("{}: {error}", server.name()),
            Err(_) => {
                eprintln!("{} did not stop within {} s: killing it", server.name(), SHUTDOWN_TIMEOUT.as_secs());
                let _ = server.child.kill().await;
            }
        }
    }
}

/// A log file so far (empty if unreadable; servers log UTF-8, but a torn write is possible).
fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// What `parleyd devnet` prints once the servers run: a table and `parley` commands to try.
pub fn instructions(args: &DevnetArgs, nodes: &[Node]) -> String {
    let dir = nodes.first().and_then(|node| node.workers[0].config.parent()).unwrap_or(&args.dir);
    let rows: Vec<[String; 4]> = nodes
        .iter()
        .map(|node| {
            let log = if node.proxied() {
                dir.join(format!("server{}-*.log", node.index)).display().to_string()
            } else {
                node.workers[0].log.display().to_string()
            };
            [node.server_name.clone(), format!("http://{}", node.client), format!("https://{}", node.server_name), log]
        })
        .collect();
    let header = ["server name", "client API", "federation", "log"].map(str::to_owned);
    let widths: Vec<usize> = (0..4).map(|c| rows.iter().chain([&header]).map(|row| row[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "parleyd devnet: {} homeservers on loopback, state in {}\n", nodes.len(), dir.display());
    for row in [&header].into_iter().chain(&rows) {
        let _ = writeln!(
            out,
            "  {:w0$}  {:w1$}  {:w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    let _ = writeln!(out, "\nCA: {}  configs: {}", dir.join("ca.pem").display(), dir.join("server<i>*.toml").display());
    if let Some(node) = nodes.iter().find(|node| node.proxied()) {
        let _ = writeln!(
            out,
            "Each server runs {} workers on PostgreSQL{}, behind a proxy on its two ports that hands each connection to the \
             next worker; any device may use any worker.",
            node.workers.len(),
            args.nats.as_ref().map(|nats| format!(" and NATS ({nats})")).unwrap_or_default(),
        );
    } else if args.postgres.is_some() {
        let _ = writeln!(out, "The servers keep their state in PostgreSQL (databases parley_devnet_<port>).");
    }
    let alice = &nodes[0];
    let bob = &nodes[nodes.len().min(2) - 1];
    let _ = writeln!(
        out,
        "\nChat across servers with the parley CLI (cargo build --release -p parley-sdk --bin parley):\n\n\
         \x20 export PARLEY_HOME={home}   # devnet profiles, apart from ~/.parley\n\
         \x20 P=./target/release/parley\n\
         \x20 echo 'correct horse' | $P --profile alice --server http://{a_client} register alice\n\
         \x20 echo 'correct horse' | $P --profile bob --server http://{b_client} register bob\n\
         \x20 $P --profile alice send @bob:{b_name} 'hello from {a_name}'\n\
         \x20 $P --profile bob history @alice:{a_name}\n\n\
         Profiles and server data persist: next time, skip the register lines.\n\
         Ctrl-C stops the servers.",
        home = shell_quote(&dir.join("clients").display().to_string()),
        a_client = alice.client,
        b_client = bob.client,
        a_name = alice.server_name,
        b_name = bob.server_name,
    );
    out
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:@=,".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Host port of compose server `k` (1-based): 8001, 8002, ...
fn compose_client_port(k: usize) -> usize {
    8000 + k
}

/// The environment of compose server `k` (1-based): every setting it needs, as `PARLEY__*`.
fn compose_env(k: usize) -> Vec<(&'static str, String)> {
    let name = format!("parley{k}");
    let stem = certs::file_stem(&name);
    vec![
        ("PARLEY__SERVER_NAME", name),
        ("PARLEY__LISTEN", "0.0.0.0:8008".to_owned()),
        ("PARLEY__DATA_DIR", "/data".to_owned()),
        ("PARLEY__FEDERATION__ENABLED", "true".to_owned()),
        ("PARLEY__FEDERATION__LISTEN", "0.0.0.0:8448".to_owned()),
        ("PARLEY__FEDERATION__TLS_CERT", format!("/certs/{stem}.pem")),
        ("PARLEY__FEDERATION__TLS_KEY", format!("/certs/{stem}.key")),
        ("PARLEY__FEDERATION__EXTRA_CA_FILE", "/certs/ca.pem".to_owned()),
    ]
}

/// The `docker-compose.yml` for `n` servers `parley1` to `parley<n>`. The repository's
/// `docker-compose.yml` is `compose_file(3)` (a test checks it).
pub fn compose_file(n: usize) -> String {
    let names: Vec<String> = (1..=n).map(|k| format!("parley{k}")).collect();
    let mut out = String::new();
    let _ = writeln!(out, "# generated by `parleyd devnet --servers {n} --emit-compose`; do not edit");
    let _ = writeln!(
        out,
        "#\n\
         # {n} federating homeservers, {first} to {last}, on one Docker network:\n\
         #   docker compose up --build\n\
         # Client APIs on the host: {first} at http://127.0.0.1:{first_port}, ... {last} at http://127.0.0.1:{last_port}.\n\
         # In the network the servers reach each other at https://<name>:8448 (DNS A record, default\n\
         # port), with certificates from a private CA that the `certs` service makes once in the\n\
         # `certs` volume. State lives in the data-* volumes; `docker compose down -v` resets it.\n",
        first = names[0],
        last = names[n - 1],
        first_port = compose_client_port(1),
        last_port = compose_client_port(n),
    );
    let _ = writeln!(out, "services:");
    let _ = writeln!(out, "  certs:");
    let _ = writeln!(out, "    build: .");
    let _ = writeln!(out, "    image: parley:dev");
    let _ = writeln!(out, "    command: [\"devnet-certs\", \"--dir\", \"/certs\", \"--names\", \"{}\"]", names.join(","));
    let _ = writeln!(out, "    volumes:");
    let _ = writeln!(out, "      - certs:/certs");
    for (k, name) in (1..=n).zip(&names) {
        let _ = writeln!(out);
        let _ = writeln!(out, "  {name}:");
        let _ = writeln!(out, "    build: .");
        let _ = writeln!(out, "    image: parley:dev");
        let _ = writeln!(out, "    command: [\"serve\"]");
        let _ = writeln!(out, "    depends_on:");
        let _ = writeln!(out, "      certs:");
        let _ = writeln!(out, "        condition: service_completed_successfully");
        let _ = writeln!(out, "    environment:");
        for (key, value) in compose_env(k) {
            let _ = writeln!(out, "      {key}: \"{value}\"");
        }
        let _ = writeln!(out, "    ports:");
        let _ = writeln!(out, "      - \"127.0.0.1:{}:8008\"", compose_client_port(k));
        let _ = writeln!(out, "    volumes:");
        let _ = writeln!(out, "      - data-{name}:/data");
        let _ = writeln!(out, "      - certs:/certs:ro");
    }
    let _ = writeln!(out, "\nvolumes:");
    let _ = writeln!(out, "  certs:");
    for name in &names {
        let _ = writeln!(out, "  data-{name}:");
    }
    out
}

/// The environment of every worker of the reference cluster: each setting, as `PARLEY__*`.
fn cluster_env() -> Vec<(&'static str, String)> {
    vec![
        ("PARLEY__SERVER_NAME", "parley".to_owned()),
        ("PARLEY__LISTEN", "0.0.0.0:8008".to_owned()),
        ("PARLEY__DATA_DIR", "/data".to_owned()),
        ("PARLEY__SERVER_KEY_FILE", "/certs/server.key".to_owned()),
        ("PARLEY__STORAGE__DATABASE_URL", "postgres://parley:parley@postgres:5432/parley".to_owned()),
        ("PARLEY__CLUSTER__NATS_URL", "nats://nats:4222".to_owned()),
        ("PARLEY__MEDIA__S3__ENDPOINT", "http://s3:9000".to_owned()),
        ("PARLEY__MEDIA__S3__BUCKET", "parley-media".to_owned()),
        ("PARLEY__MEDIA__S3__ACCESS_KEY_ID", "parley".to_owned()),
        ("PARLEY__MEDIA__S3__SECRET_ACCESS_KEY", "parley-media-secret".to_owned()),
        ("PARLEY__MEDIA__S3__ALLOW_HTTP", "true".to_owned()),
        ("PARLEY__FEDERATION__ENABLED", "true".to_owned()),
        ("PARLEY__FEDERATION__LISTEN", "0.0.0.0:8448".to_owned()),
        ("PARLEY__FEDERATION__TLS_CERT", "/certs/parley.pem".to_owned()),
        ("PARLEY__FEDERATION__TLS_KEY", "/certs/parley.key".to_owned()),
        ("PARLEY__FEDERATION__EXTRA_CA_FILE", "/certs/ca.pem".to_owned()),
    ]
}

/// The reference deployment (`docker-compose.cluster.yml` is `cluster_compose_file(2)`, a
/// test checks it): one homeserver `parley` run by `workers` workers on PostgreSQL, NATS and
/// an S3 store (s3s-fs, the one the tests use), behind `parleyd proxy`.
pub fn cluster_compose_file(workers: usize) -> String {
    let names: Vec<String> = (1..=workers).map(|k| format!("parley-worker{k}")).collect();
    let backends = |port: u16| names.iter().map(|name| format!("{name}:{port}")).collect::<Vec<_>>().join(",");
    let mut out = String::new();
    let _ = writeln!(out, "# generated by `parleyd devnet --servers 1 --workers {workers} --emit-compose`; do not edit");
    let _ = writeln!(
        out,
        "#\n\
         # One homeserver, `parley`, run by {workers} workers ({first} to {last}) that share one PostgreSQL\n\
         # database (postgres), pass live traffic to each other over NATS (nats) and keep media in an\n\
         # S3-compatible store (s3: s3s-fs, built from crates.io):\n\
         #   docker compose -f docker-compose.cluster.yml up --build\n\
         # The `parley` service is `parleyd proxy`: it hands each TCP connection to the next worker that\n\
         # answers (no sticky sessions are needed). On the host: client API at http://127.0.0.1:8008,\n\
         # federation at https://127.0.0.1:8448 (the name `parley` in the network). Clients move media\n\
         # straight to and from the store at http://s3:9000 (presigned URLs): from the host, let the\n\
         # name s3 resolve to 127.0.0.1 (for example in /etc/hosts). Without Docker, the same topology:\n\
         #   parleyd devnet --servers 1 --workers {workers} --postgres URL --nats URL\n\
         # The `certs` service makes the TLS certificate and the server key that all workers share.\n",
        first = names[0],
        last = names[workers - 1],
    );
    let _ = writeln!(out, "services:");
    let _ = writeln!(out, "  certs:");
    let _ = writeln!(out, "    build: .");
    let _ = writeln!(out, "    image: parley:dev");
    let _ = writeln!(
        out,
        "    command: [\"devnet-certs\", \"--dir\", \"/certs\", \"--names\", \"parley\", \"--server-key\", \"/certs/server.key\"]"
    );
    let _ = writeln!(out, "    volumes:");
    let _ = writeln!(out, "      - certs:/certs");
    let _ = writeln!(
        out,
        "\n  postgres:\n    image: postgres:17\n    environment:\n      POSTGRES_USER: \"parley\"\n      \
         POSTGRES_PASSWORD: \"parley\"\n      POSTGRES_DB: \"parley\"\n    healthcheck:\n      \
         test: [\"CMD\", \"pg_isready\", \"-U\", \"parley\", \"-d\", \"parley\"]\n      interval: 2s\n      \
         timeout: 5s\n      retries: 30\n    volumes:\n      - postgres:/var/lib/postgresql/data"
    );
    let _ = writeln!(out, "\n  nats:\n    image: nats:2.11");
    let _ = writeln!(
        out,
        "\n  s3:\n    build:\n      context: .\n      target: s3\n    image: parley-s3:dev\n    \
         entrypoint: [\"sh\", \"-c\", \"mkdir -p /s3/parley-media && exec s3s-fs --host 0.0.0.0 --port 9000 \
         --access-key parley --secret-key parley-media-secret /s3\"]\n    ports:\n      - \"127.0.0.1:9000:9000\"\n    \
         volumes:\n      - s3:/s3"
    );
    for name in &names {
        let _ = writeln!(out, "\n  {name}:");
        let _ = writeln!(out, "    image: parley:dev");
        let _ = writeln!(out, "    command: [\"serve\"]");
        let _ = writeln!(out, "    depends_on:");
        for (service, condition) in [
            ("certs", "service_completed_successfully"),
            ("postgres", "service_healthy"),
            ("nats", "service_started"),
            ("s3", "service_started"),
        ] {
            let _ = writeln!(out, "      {service}:\n        condition: {condition}");
        }
        let _ = writeln!(out, "    environment:");
        for (key, value) in cluster_env() {
            let _ = writeln!(out, "      {key}: \"{value}\"");
        }
        let _ = writeln!(out, "    volumes:");
        let _ = writeln!(out, "      - certs:/certs:ro");
    }
    let _ = writeln!(out, "\n  parley:");
    let _ = writeln!(out, "    image: parley:dev");
    let _ = writeln!(
        out,
        "    command: [\"proxy\", \"--route\", \"0.0.0.0:8008={}\", \"--route\", \"0.0.0.0:8448={}\"]",
        backends(8008),
        backends(8448)
    );
    let _ = writeln!(out, "    depends_on:");
    for name in &names {
        let _ = writeln!(out, "      - {name}");
    }
    let _ = writeln!(out, "    ports:");
    let _ = writeln!(out, "      - \"127.0.0.1:8008:8008\"");
    let _ = writeln!(out, "      - \"127.0.0.1:8448:8448\"");
    let _ = writeln!(out, "\nvolumes:\n  certs:\n  postgres:\n  s3:");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn args(dir: &Path, servers: u16) -> DevnetArgs {
        DevnetArgs {
            servers,
            dir: dir.to_owned(),
            base_port: 8448,
            client_base_port: 8008,
            workers: 1,
            postgres: None,
            nats: None,
            emit_compose: false,
        }
    }

    /// `env` (`PARLEY__*` pairs), turned into the TOML it stands for, as a checked [`Config`]:
    /// every key exists (deny_unknown_fields) and the values pass the checks.
    fn config_of_env(env: Vec<(&'static str, String)>) -> Config {
        let mut root = toml::Table::new();
        for (key, value) in env {
            let path: Vec<String> = key.strip_prefix("PARLEY__").unwrap().split("__").map(str::to_lowercase).collect();
            let (last, sections) = path.split_last().unwrap();
            let mut table = &mut root;
            for section in sections {
                table = table.entry(section.clone()).or_insert_with(|| toml::Table::new().into()).as_table_mut().unwrap();
            }
            // figment reads "true" from the environment as a boolean, anything else here as a string.
            let value = match value.as_str() {
                "true" => toml::Value::Boolean(true),
                _ => toml::Value::String(value),
            };
            table.insert(last.clone(), value);
        }
        let config: Config = toml::Value::Table(root).try_into().unwrap_or_else(|e| panic!("{e}"));
        config.check().unwrap();
        config
    }

    #[test]
    fn checked_in_compose_file_is_current() {
        assert!(
            include_str!("../../docker-compose.yml") == compose_file(3),
            "docker-compose.yml is stale; regenerate it with\n  \
             cargo run -p parley-server --bin parleyd -- devnet --servers 3 --emit-compose > docker-compose.yml"
        );
    }

    /// The services and then the volumes a compose file declares, after checking that it indents
    /// with spaces and has exactly those two top-level keys.
    fn compose_entries(yaml: &str) -> Vec<&str> {
        assert!(!yaml.contains('\t'), "YAML indents with spaces only");
        let top: Vec<&str> = yaml.lines().filter(|l| !l.starts_with([' ', '#']) && !l.is_empty()).collect();
        assert_eq!(top, ["services:", "volumes:"]);
        yaml.lines().filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.ends_with(':')).map(str::trim).collect()
    }

    #[test]
    fn compose_file_is_structurally_sane() {
        let yaml = compose_file(3);
        assert!(yaml.starts_with("# generated by `parleyd devnet --servers 3 --emit-compose`; do not edit\n"));
        assert_eq!(
            compose_entries(&yaml),
            ["certs:", "parley1:", "parley2:", "parley3:", "certs:", "data-parley1:", "data-parley2:", "data-parley3:"]
        );
        for k in 1..=3 {
            for line in [
                format!("      - \"127.0.0.1:800{k}:8008\""),
                format!("      - data-parley{k}:/data"),
                format!("      PARLEY__SERVER_NAME: \"parley{k}\""),
                format!("      PARLEY__FEDERATION__TLS_CERT: \"/certs/parley{k}.pem\""),
            ] {
                assert!(yaml.lines().any(|l| l == line), "missing {line:?}");
            }
        }
        assert_eq!(yaml.matches("      - certs:/certs:ro\n").count(), 3);
        assert_eq!(yaml.matches("        condition: service_completed_successfully\n").count(), 3);
        assert!(yaml.contains("\"--names\", \"parley1,parley2,parley3\"]"));
    }

    /// The compose servers' environment is a valid [`Config`].
    #[test]
    fn compose_environment_is_a_valid_config() {
        for k in 1..=3 {
            let config = config_of_env(compose_env(k));
            assert_eq!(config.server_name.as_str(), format!("parley{k}"));
            assert!(config.federation.enabled);
            assert_eq!(config.federation.listen.port(), config.federation.default_port, "found by A record on the default port");
            assert_eq!(config.federation.tls_key, Some(PathBuf::from(format!("/certs/parley{k}.key"))));
            assert_eq!(config.federation.extra_ca_file, Some(PathBuf::from("/certs/ca.pem")));
        }
    }

    #[test]
    fn checked_in_cluster_compose_file_is_current() {
        assert!(
            include_str!("../../docker-compose.cluster.yml") == cluster_compose_file(2),
            "docker-compose.cluster.yml is stale; regenerate it with\n  \
             cargo run -p parley-server --bin parleyd -- devnet --servers 1 --workers 2 --emit-compose > docker-compose.cluster.yml"
        );
    }

    #[test]
    fn cluster_compose_file_is_structurally_sane() {
        let yaml = cluster_compose_file(2);
        assert_eq!(
            compose_entries(&yaml),
            [
                "certs:",
                "postgres:",
                "nats:",
                "s3:",
                "parley-worker1:",
                "parley-worker2:",
                "parley:",
                "certs:",
                "postgres:",
                "s3:"
            ]
        );
        // Every worker waits for what it needs and shares the certificate volume read-only.
        assert_eq!(yaml.matches("      - certs:/certs:ro\n").count(), 2);
        assert_eq!(yaml.matches("        condition: service_healthy\n").count(), 2);
        assert!(yaml.contains(
            "command: [\"proxy\", \"--route\", \"0.0.0.0:8008=parley-worker1:8008,parley-worker2:8008\", \"--route\", \
             \"0.0.0.0:8448=parley-worker1:8448,parley-worker2:8448\"]"
        ));
        // The proxy's routes parse as `parleyd proxy` will parse them.
        for route in
            ["0.0.0.0:8008=parley-worker1:8008,parley-worker2:8008", "0.0.0.0:8448=parley-worker1:8448,parley-worker2:8448"]
        {
            crate::proxy::Route::parse(route).unwrap();
        }
        // The store's credentials and bucket are the workers'.
        assert!(yaml.contains("mkdir -p /s3/parley-media && exec s3s-fs --host 0.0.0.0 --port 9000 --access-key parley --secret-key parley-media-secret /s3"));
        assert!(yaml.contains("      POSTGRES_PASSWORD: \"parley\"\n"));
        let two_servers = DevnetArgs { workers: 2, emit_compose: true, ..args(Path::new("/nonexistent"), 2) };
        assert!(main(two_servers).unwrap_err().to_string().contains("add --servers 1"));
    }

    /// Every worker of the reference cluster reads one valid configuration: PostgreSQL, NATS,
    /// S3, the shared server key, federation on the default port under the proxy's name.
    #[test]
    fn cluster_environment_is_a_valid_config() {
        let config = config_of_env(cluster_env());
        assert_eq!(config.server_name.as_str(), "parley");
        assert_eq!(config.server_key_path(), PathBuf::from("/certs/server.key"));
        assert_eq!(config.storage.database_url.as_deref(), Some("postgres://parley:parley@postgres:5432/parley"));
        assert_eq!(config.cluster.nats_url.as_deref(), Some("nats://nats:4222"));
        let s3 = config.media.s3.as_ref().unwrap();
        assert_eq!((s3.endpoint.as_str(), s3.bucket.as_str(), s3.allow_http), ("http://s3:9000", "parley-media", true));
        assert_eq!(config.federation.listen.port(), config.federation.default_port);
        assert_eq!(config.federation.tls_cert, Some(PathBuf::from("/certs/parley.pem")));
    }

    #[test]
    fn workers_share_a_database_a_key_and_media_and_listen_behind_the_proxy() {
        let dir = tempfile::tempdir().unwrap();
        let several = DevnetArgs { workers: 2, ..args(dir.path(), 2) };
        assert!(plan(&several).unwrap_err().to_string().contains("needs --postgres and --nats"));
        let nats_alone = DevnetArgs { nats: Some("nats://127.0.0.1:4222".into()), ..args(dir.path(), 2) };
        assert!(plan(&nats_alone).unwrap_err().to_string().contains("--nats needs --postgres"));
        let bad_url = DevnetArgs { postgres: Some("mysql://x/y".into()), ..args(dir.path(), 2) };
        assert!(plan(&bad_url).is_err());

        let several = DevnetArgs {
            postgres: Some("postgres://postgres@127.0.0.1:5432/postgres".into()),
            nats: Some("nats://127.0.0.1:4222".into()),
            ..several
        };
        let nodes = prepare(&several).unwrap();
        for node in &nodes {
            assert!(node.proxied());
            let port = 8448 + node.index;
            let configs: Vec<Config> =
                node.workers.iter().map(|w| Config::load(Some(&w.config), serde_json::json!({})).unwrap()).collect();
            assert_eq!(configs.len(), 2);
            let key = dir.path().join(node.index.to_string()).join("server.key");
            assert!(key.is_file(), "made before the workers start");
            for (w, config) in configs.iter().enumerate() {
                assert_eq!(config.server_name.as_str(), format!("localhost:{port}"));
                assert_eq!(config.listen.port(), 0, "the proxy holds the server's ports");
                assert_eq!(config.federation.listen.port(), 0);
                assert_eq!(config.data_dir, dir.path().join(node.index.to_string()).join(format!("worker{w}")));
                assert_eq!(config.server_key_path(), key);
                assert_eq!(config.media.dir, dir.path().join(node.index.to_string()).join("media"));
                assert_eq!(
                    config.storage.database_url.as_deref(),
                    Some(format!("postgres://postgres@127.0.0.1:5432/parley_devnet_{port}").as_str())
                );
                assert_eq!(config.cluster.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
            }
        }
        let text = instructions(&several, &nodes);
        assert!(text.contains("Each server runs 2 workers on PostgreSQL and NATS"), "{text}");
        assert!(text.contains("server1-*.log"), "{text}");
    }

    #[test]
    fn devnet_configs_load_and_certificates_verify() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = prepare(&args(dir.path(), 2)).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let ca = certs::Ca::from_pem(certs::DEVNET_CA_NAME, &read(&dir.path().join("ca.pem")), &read(&dir.path().join("ca.key")))
            .unwrap();
        for (i, node) in nodes.iter().enumerate() {
            assert!(!node.proxied() && node.server_key.is_none() && node.database_url.is_none());
            let config = Config::load(Some(&node.workers[0].config), serde_json::json!({})).unwrap();
            assert_eq!(config.server_name.as_str(), format!("localhost:{}", 8448 + i));
            assert_eq!(config.server_key_path(), dir.path().join(i.to_string()).join("server.key"));
            assert!(config.storage.database_url.is_none() && config.cluster.nats_url.is_none());
            assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8008 + i as u16)));
            assert_eq!(config.data_dir, dir.path().join(i.to_string()));
            assert_eq!(config.registration.mode, crate::config::RegistrationMode::Open);
            let fed = &config.federation;
            assert!(fed.enabled);
            assert_eq!(fed.listen, SocketAddr::from(([127, 0, 0, 1], 8448 + i as u16)));
            assert_eq!(fed.extra_ca_file.as_deref(), Some(dir.path().join("ca.pem").as_path()));
            let (cert, key) = (fed.tls_cert.clone().unwrap(), fed.tls_key.clone().unwrap());
            assert_eq!(cert, dir.path().join(format!("localhost_{}.pem", 8448 + i)));
            ca.verify(&read(&cert), "localhost").unwrap();
            ca.verify(&read(&cert), "127.0.0.1").unwrap();
            parley_federation::tls::server_config(&cert, &key).expect("the listener accepts the certificate and key");
        }

        // Again: certificates are kept. With other ports the names change: refused.
        let cert = read(&nodes[1].tls_cert);
        prepare(&args(dir.path(), 2)).unwrap();
        assert_eq!(cert, read(&nodes[1].tls_cert));
        let moved = DevnetArgs { base_port: 9448, ..args(dir.path(), 2) };
        assert!(prepare(&moved).unwrap_err().to_string().contains("holds the data of localhost:8448"));
    }

    #[test]
    fn ports_are_checked() {
        let dir = Path::new("/nonexistent");
        assert!(plan(&DevnetArgs { base_port: 65535, ..args(dir, 2) }).is_err());
        assert!(plan(&DevnetArgs { base_port: 8009, ..args(dir, 2) }).is_err(), "overlaps 8008..=8009");
        assert!(plan(&DevnetArgs { base_port: 8010, ..args(dir, 2) }).is_ok());
        let nodes = plan(&args(dir, 3)).unwrap();
        assert_eq!(nodes[2].server_name, "localhost:8450");
        assert_eq!(nodes[2].client.port(), 8010);
        assert_eq!(nodes[2].workers[0].data_dir, dir.join("2"));
    }

    #[test]
    fn instructions_name_the_servers() {
        let nodes = plan(&args(Path::new("/tmp/my devnet"), 2)).unwrap();
        let text = instructions(&args(Path::new("/tmp/my devnet"), 2), &nodes);
        assert!(text.contains("--server http://127.0.0.1:8009 register bob"));
        assert!(text.contains("send @bob:localhost:8449 'hello from localhost:8448'"));
        assert!(text.contains("export PARLEY_HOME='/tmp/my devnet/clients'"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
