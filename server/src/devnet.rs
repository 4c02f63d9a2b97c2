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
const LISTENING: &str = "parleyd listening on ";

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
    /// Print a docker-compose.yml for that many servers (parley1, parley2, ...) and exit.
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
}

/// One server of the devnet.
#[derive(Debug, Clone)]
pub struct Node {
    /// 0-based.
    pub index: usize,
    /// `localhost:<federation port>`.
    pub server_name: String,
    /// Client API address.
    pub client: SocketAddr,
    /// Federation listener address.
    pub federation: SocketAddr,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its certificate and key.
    pub tls_cert: PathBuf,
    /// Its private key.
    pub tls_key: PathBuf,
}

/// Runs `parleyd devnet`: prints the compose file, or runs the servers until Ctrl-C.
pub fn main(args: DevnetArgs) -> anyhow::Result<()> {
    if args.emit_compose {
        print!("{}", compose_file(usize::from(args.servers)));
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
    Ok(())
}

/// The servers for `args`: names, ports and paths (nothing is written).
pub fn plan(args: &DevnetArgs) -> anyhow::Result<Vec<Node>> {
    let n = usize::from(args.servers);
    if n == 0 {
        bail!("--servers must be at least 1");
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
    let nodes = (0..args.servers)
        .map(|i| {
            let federation_port = args.base_port + i;
            let server_name = format!("localhost:{federation_port}");
            let stem = certs::file_stem(&server_name);
            Node {
                index: usize::from(i),
                client: SocketAddr::from((Ipv4Addr::LOCALHOST, args.client_base_port + i)),
                federation: SocketAddr::from((Ipv4Addr::LOCALHOST, federation_port)),
                config: dir.join(format!("server{i}.toml")),
                log: dir.join(format!("server{i}.log")),
                data_dir: dir.join(i.to_string()),
                tls_cert: dir.join(format!("{stem}.pem")),
                tls_key: dir.join(format!("{stem}.key")),
                server_name,
            }
        })
        .collect();
    Ok(nodes)
}

/// [`plan`], then writes what the servers need: the PKI (when missing), the configurations and
/// the data directories. Refuses to give an existing data directory a different server name.
pub fn prepare(args: &DevnetArgs) -> anyhow::Result<Vec<Node>> {
    let nodes = plan(args)?;
    let dir = nodes[0].config.parent().context("the devnet directory")?.to_owned(); // invariant: plan made it absolute
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
        check_same_name(node)?;
        std::fs::create_dir_all(&node.data_dir).with_context(|| format!("creating {}", node.data_dir.display()))?;
        std::fs::write(&node.config, config_toml(node, &ca)?).with_context(|| format!("writing {}", node.config.display()))?;
    }
    Ok(nodes)
}

/// A data directory holds users of one server name: an earlier run with other ports would
/// leave `@alice:localhost:8448` on a server now called something else.
fn check_same_name(node: &Node) -> anyhow::Result<()> {
    let Ok(previous) = std::fs::read_to_string(&node.config) else { return Ok(()) };
    let previous_name = toml::from_str::<toml::Table>(&previous)
        .ok()
        .and_then(|table| table.get("server_name").and_then(|v| v.as_str()).map(str::to_owned));
    match previous_name {
        Some(name) if name != node.server_name && node.data_dir.exists() => bail!(
            "{} holds the data of {name}, not {}: use the same --base-port as before, or another --dir",
            node.data_dir.display(),
            node.server_name
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
    registration: crate::config::RegistrationConfig,
    federation: NodeFederation<'a>,
}

#[derive(Serialize)]
struct NodeFederation<'a> {
    enabled: bool,
    listen: SocketAddr,
    tls_cert: &'a Path,
    tls_key: &'a Path,
    extra_ca_file: &'a Path,
}

/// Server `node`'s configuration file.
pub fn config_toml(node: &Node, ca: &Path) -> anyhow::Result<String> {
    let config = NodeConfig {
        server_name: &node.server_name,
        listen: node.client,
        data_dir: &node.data_dir,
        registration: crate::config::RegistrationConfig { mode: crate::config::RegistrationMode::Open },
        federation: NodeFederation {
            enabled: true,
            listen: node.federation,
            tls_cert: &node.tls_cert,
            tls_key: &node.tls_key,
            extra_ca_file: ca,
        },
    };
    let body = toml::to_string(&config).context("paths must be UTF-8")?;
    Ok(format!("# generated by `parleyd devnet` at every start: change its flags, not this file\n\n{body}"))
}

/// A running server.
struct Running {
    node: Node,
    child: Child,
    /// Resolves when the server has printed its client listening line.
    listening: Option<tokio::sync::oneshot::Receiver<()>>,
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
    let exe = std::env::current_exe().context("finding the parleyd executable")?;
    let mut running = Vec::with_capacity(nodes.len());
    for node in nodes {
        match spawn(&exe, &node) {
            Ok((child, listening)) => running.push(Running { node, child, listening: Some(listening) }),
            Err(error) => {
                stop(&mut running).await;
                return Err(error);
            }
        }
    }
    let started = tokio::select! {
        started = wait_until_listening(&mut running) => started,
        () = crate::cli::shutdown_signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(error) = started {
        stop(&mut running).await;
        return Err(error);
    }
    print!("{}", instructions(args, &running.iter().map(|r| r.node.clone()).collect::<Vec<_>>()));
    let outcome = tokio::select! {
        () = crate::cli::shutdown_signal() => Ok(()),
        exited = first_exit(&mut running) => exited,
    };
    println!("stopping {} servers...", running.len());
    stop(&mut running).await;
    println!("stopped");
    outcome
}

/// Starts one server: stderr goes to its log, stdout (the listening lines) is copied there too
/// by a task that reports the client listening line.
fn spawn(exe: &Path, node: &Node) -> anyhow::Result<(Child, tokio::sync::oneshot::Receiver<()>)> {
    let log = std::fs::File::create(&node.log).with_context(|| format!("creating {}", node.log.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .arg("--config")
        .arg(&node.config)
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
    let mut child = command.spawn().with_context(|| format!("starting {} serve for server {}", exe.display(), node.index))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (ready, listening) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use std::io::Write as _;
        use tokio::io::AsyncBufReadExt as _;
        let mut log = log;
        let mut ready = Some(ready);
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = writeln!(log, "{line}");
            if line.starts_with(LISTENING) {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
        }
    });
    Ok((child, listening))
}

/// Waits until every server has printed its listening line; fails if one exits or is slow.
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
        let log = || tail(&read_log(&server.node.log));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(status)) => bail!(
                "server {} exited during startup ({}); end of {}:\n{}",
                server.node.index,
                status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string()),
                server.node.log.display(),
                log()
            ),
            Err(_) => bail!(
                "server {} did not start within {} s; end of {}:\n{}",
                server.node.index,
                STARTUP_TIMEOUT.as_secs(),
                server.node.log.display(),
                log()
            ),
        }
    }
    Ok(())
}

/// Resolves when the first server exits on its own: an error unless it exited successfully.
async fn first_exit(running: &mut [Running]) -> anyhow::Result<()> {
    if running.is_empty() {
        return std::future::pending().await;
    }
    let waits = running.iter_mut().map(|server| Box::pin(async move { (server.child.wait().await, &server.node) }));
    let ((status, node), _, _) = futures_util::future::select_all(waits).await;
    let status = status?;
    if status.success() {
        println!("server {} stopped", node.index);
        return Ok(());
    }
    bail!("server {} exited ({status}); end of {}:\n{}", node.index, node.log.display(), tail(&read_log(&node.log)))
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
            Ok(Ok(status)) => eprintln!("server {} exited with {status}; see {}", server.node.index, server.node.log.display()),
            Ok(Err(error)) => eprintln!("server {}: {error}", server.node.index),
            Err(_) => {
                eprintln!("server {} did not stop within {} s: killing it", server.node.index, SHUTDOWN_TIMEOUT.as_secs());
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
    let dir = nodes.first().and_then(|node| node.config.parent()).unwrap_or(&args.dir);
    let rows: Vec<[String; 4]> = nodes
        .iter()
        .map(|node| {
            [
                node.server_name.clone(),
                format!("http://{}", node.client),
                format!("https://{}", node.server_name),
                node.log.display().to_string(),
            ]
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
    let _ = writeln!(out, "\nCA: {}  configs: {}", dir.join("ca.pem").display(), dir.join("server<i>.toml").display());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn args(dir: &Path, servers: u16) -> DevnetArgs {
        DevnetArgs { servers, dir: dir.to_owned(), base_port: 8448, client_base_port: 8008, emit_compose: false }
    }

    #[test]
    fn checked_in_compose_file_is_current() {
        assert!(
            include_str!("../../docker-compose.yml") == compose_file(3),
            "docker-compose.yml is stale; regenerate it with\n  \
             cargo run -p parley-server --bin parleyd -- devnet --servers 3 --emit-compose > docker-compose.yml"
        );
    }

    #[test]
    fn compose_file_is_structurally_sane() {
        let yaml = compose_file(3);
        assert!(yaml.starts_with("# generated by `parleyd devnet --servers 3 --emit-compose`; do not edit\n"));
        assert!(!yaml.contains('\t'), "YAML indents with spaces only");
        let top: Vec<&str> = yaml.lines().filter(|l| !l.starts_with([' ', '#']) && !l.is_empty()).collect();
        assert_eq!(top, ["services:", "volumes:"]);
        let services: Vec<&str> =
            yaml.lines().filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.ends_with(':')).map(str::trim).collect();
        assert_eq!(
            services,
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

    /// The compose servers' environment, turned into the TOML it stands for, is a valid
    /// [`Config`]: every key exists (deny_unknown_fields) and the values pass the checks.
    #[test]
    fn compose_environment_is_a_valid_config() {
        for k in 1..=3 {
            let mut root = toml::Table::new();
            for (key, value) in compose_env(k) {
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
            let config: Config = toml::Value::Table(root).try_into().unwrap_or_else(|e| panic!("parley{k}: {e}"));
            config.check().unwrap();
            assert_eq!(config.server_name.as_str(), format!("parley{k}"));
            assert!(config.federation.enabled);
            assert_eq!(config.federation.listen.port(), config.federation.default_port, "found by A record on the default port");
            assert_eq!(config.federation.tls_key, Some(PathBuf::from(format!("/certs/parley{k}.key"))));
            assert_eq!(config.federation.extra_ca_file, Some(PathBuf::from("/certs/ca.pem")));
        }
    }

    #[test]
    fn devnet_configs_load_and_certificates_verify() {
        let dir = tempfile::tempdir().unwrap();
        let nodes = prepare(&args(dir.path(), 2)).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let ca = certs::Ca::from_pem(certs::DEVNET_CA_NAME, &read(&dir.path().join("ca.pem")), &read(&dir.path().join("ca.key")))
            .unwrap();
        for (i, node) in nodes.iter().enumerate() {
            let config = Config::load(Some(&node.config), serde_json::json!({})).unwrap();
            assert_eq!(config.server_name.as_str(), format!("localhost:{}", 8448 + i));
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
        assert_eq!(nodes[2].data_dir, dir.join("2"));
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
