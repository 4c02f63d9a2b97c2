//! The `parleyd` command line: serve, admin subcommands, example config. The binary
//! `parleyd` is just [`main`]; the test harness runs the same entry point.

use crate::app::Server;
use crate::config::{Config, LogFormat};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use zeroize::Zeroizing;

/// The Parley homeserver. With no arguments it serves on 127.0.0.1:8008 with an embedded
/// SQLite database under ./data.
#[derive(Parser)]
#[command(name = "parleyd", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file (see parleyd.example.toml). Optional.
    #[arg(short, long, env = "PARLEY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (database, server key). Overrides the config file.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8008 (port 0 picks a free port).
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Server name (the part after ':' in user ids).
    #[arg(long, global = true)]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver (the default).
    Serve,
    /// Administer users and registration tokens (works while the server runs).
    #[command(subcommand)]
    Admin(Admin),
    /// Print the commented example configuration (all defaults).
    ConfigExample,
    /// Run several federating homeservers on loopback for testing, or print a docker-compose.yml.
    Devnet(crate::devnet::DevnetArgs),
    /// Write a test CA and server certificates into a directory (kept if they exist).
    DevnetCerts(crate::devnet::DevnetCertsArgs),
    /// Spread TCP connections over several workers of one homeserver (round robin).
    Proxy(crate::proxy::ProxyArgs),
    /// Copy this server's SQLite database into an empty PostgreSQL database (the server must
    /// be stopped); prints the rows copied per table once every count matches.
    Migrate {
        /// The PostgreSQL database, e.g. postgres://parley@db.example.org/parley (empty).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

#[derive(Subcommand)]
enum Admin {
    /// Create a user. The password is read from the first line of standard input unless
    /// --password is given.
    CreateUser {
        /// Username (localpart): a-z, 0-9 and . _ = -
        username: String,
        /// Password (visible to other local users in the process list; prefer stdin).
        #[arg(long)]
        password: Option<String>,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
    },
    /// Create a registration token and print it (for registration.mode = "token").
    CreateRegistrationToken {
        /// How many registrations it allows (unlimited if omitted).
        #[arg(long)]
        uses: Option<u32>,
        /// Hours until it expires (never if omitted).
        #[arg(long)]
        expires_in_hours: Option<u64>,
    },
    /// Replace the server's federation signing key. The old key stays published (retired now)
    /// so signatures made with it still verify; restart the server to use the new key.
    RotateServerKey,
}

#[derive(Serialize)]
struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<String>,
}

/// Parses the command line and runs it.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Some(Command::ConfigExample)) {
        print!("{}", include_str!("../parleyd.example.toml"));
        return Ok(());
    }
    match cli.command {
        Some(Command::Devnet(args)) => return crate::devnet::main(args),
        Some(Command::DevnetCerts(args)) => return crate::devnet::certs_main(args),
        Some(Command::Proxy(args)) => return crate::proxy::main(args),
        _ => {}
    }
    let overrides = Overrides { data_dir: cli.data_dir.clone(), listen: cli.listen, server_name: cli.server_name.clone() };
    let config = Config::load(cli.config.as_deref(), overrides)?;
    init_tracing(&config);
    let runtime = match config.runtime.workers() {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        workers => tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?,
    };
    runtime.block_on(async move {
        match cli.command {
            None | Some(Command::Serve) => serve(config).await,
            Some(Command::Admin(Admin::CreateUser { username, password, admin })) => {
                let password = match password {
                    Some(p) => Zeroizing::new(p),
                    None => read_password()?,
                };
                let user = crate::admin::create_user(&config, &username, password, admin).await?;
                println!("{user}");
                Ok(())
            }
            Some(Command::Admin(Admin::CreateRegistrationToken { uses, expires_in_hours })) => {
                let expires = expires_in_hours.map(|h| std::time::Duration::from_secs(h * 3600));
                let token = crate::admin::create_registration_token(&config, uses, expires).await?;
                println!("{}", token.as_str());
                Ok(())
            }
            Some(Command::Admin(Admin::RotateServerKey)) => {
                let now = parley_spec::Timestamp::now();
                let key = parley_federation::ServerKey::rotate(&config.server_key_path(), now)?;
                println!("{} (restart parleyd to sign with it)", key.key_id);
                Ok(())
            }
            Some(Command::Migrate { to }) => {
                let counts = migrate(&config, &to).await?;
                let total: i64 = counts.iter().map(|(_, rows)| rows).sum();
                for (table, rows) in &counts {
                    println!("{table:<28} {rows:>12}");
                }
                println!("{} tables, {total} rows copied; every count matches", counts.len());
                Ok(())
            }
            Some(Command::ConfigExample | Command::Devnet(_) | Command::DevnetCerts(_) | Command::Proxy(_)) => Ok(()),
        }
    })
}

/// `parleyd migrate --to URL`: copies the stopped server's SQLite database (`config`'s) into
/// the empty PostgreSQL database at `to`; the rows copied per table. Refused while a server
/// holds the data directory.
pub async fn migrate(config: &Config, to: &str) -> anyhow::Result<Vec<(String, i64)>> {
    let database = config.database_path();
    if !database.is_file() {
        anyhow::bail!("no database at {}", database.display());
    }
    let _lock = crate::storage::lock_data_dir(&config.data_dir)?;
    Ok(crate::storage::migrate::sqlite_to_postgres(&config.database_path(), to).await?)
}

fn read_password() -> anyhow::Result<Zeroizing<String>> {
    let mut line = Zeroizing::new(String::new());
    std::io::stdin().lock().read_line(&mut line).context("reading the password from stdin")?;
    Ok(Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned()))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Each WebSocket is a file descriptor: raise the soft limit to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open file limit"),
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    let server_name = config.server_name.clone();
    let federation_listener = if config.federation.enabled {
        let bind = config.federation.listen;
        Some(tokio::net::TcpListener::bind(bind).await.with_context(|| format!("binding {bind} (federation)"))?)
    } else {
        None
    };
    let server = Server::open(config).await.context("starting the server")?;
    // Stable lines that scripts and tests wait for (the client line comes last).
    if let Some(federation) = &federation_listener {
        let address = federation.local_addr()?;
        println!("parleyd federation listening on https://{address}");
        tracing::info!(%address, "federation listening");
    }
    println!("parleyd listening on http://{address} (server name {server_name})");
    std::io::stdout().flush()?;
    tracing::info!(%address, "listening");
    server.run(listener, federation_listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
