//! A federation of real `parleyd` processes for tests: a test CA, a real DNS server
//! ([`TestDns`]) that every server uses for discovery, and a `.well-known` HTTPS server.
//! Each server is found one of two ways:
//! - [`Discovery::Srv`]: `_parley._tcp.<name>` SRV → `<name>:<federation port>`, A → 127.0.0.1;
//!   the certificate is for `<name>`.
//! - [`Discovery::WellKnown`]: A `<name>` → 127.0.0.2, where the well-known server answers
//!   `{"server": "<host>-fed.test:<port>"}`; that host's A record is 127.0.0.1 and the
//!   certificate is for it.
//!
//! Federation ports are chosen by the OS and kept across restarts.

use crate::dns::TestDns;
use crate::{Mode, TestServer};
use anyhow::Context as _;
use parley_server::certs::Ca;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How the other servers find a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovery {
    /// A DNS SRV record.
    Srv,
    /// `/.well-known/parley/server` delegation.
    WellKnown,
}

/// Where the well-known server listens (the A record of well-known names points here).
pub const WELL_KNOWN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Federation settings for tests: quick retries.
pub const FED_TEST_CONFIG: &str = r#"
[federation]
retry_min_ms = 50
retry_max_ms = 1000
"#;

/// A server of the federation.
pub struct FedServer {
    /// Its server name (`a.test`).
    pub name: String,
    /// The process.
    pub server: TestServer,
    /// How it is discovered.
    pub discovery: Discovery,
}

/// The federation.
pub struct FedNet {
    /// How its servers run.
    mode: Mode,
    /// The DNS server.
    pub dns: TestDns,
    /// The CA every server trusts.
    pub ca: Ca,
    /// The servers, in the order given.
    pub servers: Vec<FedServer>,
    dir: tempfile::TempDir,
    well_known: Arc<Mutex<BTreeMap<String, String>>>,
    well_known_port: u16,
    _well_known_task: tokio::task::JoinHandle<()>,
}

impl FedNet {
    /// Starts one in-process server per `(name, discovery)` with `extra` TOML added to each
    /// config.
    pub async fn start(specs: &[(&str, Discovery)], extra: &str) -> anyhow::Result<Self> {
        Self::start_as(Mode::InProcess, specs, extra).await
    }

    /// Starts one server of `mode` per `(name, discovery)` with `extra` TOML added to each
    /// config (`Mode::Process` for tests that kill a server, and for benchmarks).
    pub async fn start_as(mode: Mode, specs: &[(&str, Discovery)], extra: &str) -> anyhow::Result<Self> {
        let dns = TestDns::start().await?;
        let ca = Ca::generate("Parley test federation CA")?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem())?;
        let well_known_names: Vec<&str> = specs.iter().filter(|(_, d)| *d == Discovery::WellKnown).map(|(n, _)| *n).collect();
        let well_known = Arc::new(Mutex::new(BTreeMap::new()));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(WELL_KNOWN_IP), 0)).await?;
        let well_known_port = listener.local_addr()?.port();
        let task = if well_known_names.is_empty() {
            tokio::spawn(async {})
        } else {
            let issued = ca.issue(&well_known_names)?;
            let tls = tls_config(&issued.cert_pem, &issued.key_pem)?;
            tokio::spawn(serve_well_known(listener, tls, well_known.clone()))
        };
        let mut net = Self { mode, dns, ca, servers: Vec::new(), dir, well_known, well_known_port, _well_known_task: task };
        for (name, discovery) in specs {
            net.add(name, *discovery, extra).await?;
        }
        Ok(net)
    }

    /// The TLS name (certificate name) of a server.
    pub fn tls_name(name: &str, discovery: Discovery) -> String {
        match discovery {
            Discovery::Srv => name.to_owned(),
            Discovery::WellKnown => format!("{}-fed.test", name.trim_end_matches(".test")),
        }
    }

    /// The config every server of this federation gets (plus `extra`).
    pub fn config_for(&self, name: &str, discovery: Discovery, extra: &str) -> anyhow::Result<String> {
        let tls_name = Self::tls_name(name, discovery);
        let issued = self.ca.issue(&[tls_name.as_str()])?;
        let cert = self.dir.path().join(format!("{name}.pem"));
        let key = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, &issued.cert_pem)?;
        std::fs::write(&key, issued.key_pem.as_bytes())?;
        let base = format!(
            "server_name = \"{name}\"\n[federation]\nenabled = true\nlisten = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
             extra_ca_file = {ca:?}\nnameservers = [\"{dns}\"]\nwell_known_port = {wk}\n",
            cert = path(&cert),
            key = path(&key),
            ca = path(&self.dir.path().join("ca.pem")),
            dns = self.dns.addr,
            wk = self.well_known_port,
        );
        let merged = crate::merge_toml(&base, FED_TEST_CONFIG)?;
        crate::merge_toml(&merged, extra)
    }

    /// Starts one more server `name` in this federation, with `extra` TOML (its own, for
    /// servers configured apart: each its own S3 store, say).
    pub async fn add(&mut self, name: &str, discovery: Discovery, extra: &str) -> anyhow::Result<()> {
        let config = self.config_for(name, discovery, extra)?;
        let server = TestServer::prepare_as(self.mode, &config)?;
        self.add_server(name, discovery, server).await
    }

    /// Starts `server` (prepared with [`config_for`](Self::config_for)`(name, …)`, not yet
    /// running) as the server `name` of this federation.
    pub async fn add_server(&mut self, name: &str, discovery: Discovery, mut server: TestServer) -> anyhow::Result<()> {
        server.restart().await?;
        let port = server.federation_addr.context("federation listener address")?.port();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        match discovery {
            Discovery::Srv => {
                self.dns.add_a(name, localhost).await?;
                self.dns.add_srv(&format!("_parley._tcp.{name}"), 10, 10, port, name).await?;
            }
            Discovery::WellKnown => {
                let tls_name = Self::tls_name(name, discovery);
                self.dns.add_a(name, IpAddr::V4(WELL_KNOWN_IP)).await?;
                self.dns.add_a(&tls_name, localhost).await?;
                let body = format!("{{\"server\": \"{tls_name}:{port}\"}}");
                self.well_known.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned(), body);
            }
        }
        self.servers.push(FedServer { name: name.to_owned(), server, discovery });
        Ok(())
    }

    /// The server named `name`.
    pub fn server(&mut self, name: &str) -> &mut TestServer {
        &mut self.servers.iter_mut().find(|s| s.name == name).expect("no such server").server
    }

    /// The directory holding the CA and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A rustls server config from PEM strings.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A minimal HTTPS server for tests: `respond(host, request line)` gives a JSON body (200) or
/// `None` (404). One request per connection.
pub async fn serve_https<F>(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, respond: F)
where
    F: Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let respond = Arc::new(respond);
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let respond = respond.clone();
        tokio::spawn(async move {
            let Ok(mut stream) = acceptor.accept(tcp).await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head);
            let host = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("host")).map(|(_, v)| v.trim()))
                .map(|h| h.split(':').next().unwrap_or(h).to_owned())
                .unwrap_or_default();
            let response = match respond(&host, head.lines().next().unwrap_or("")) {
                Some(body) => {
                    let mut response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    response.extend_from_slice(&body);
                    response
                }
                None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&response).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// `GET /.well-known/parley/server`, answered by Host header from `bodies`.
async fn serve_well_known(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    bodies: Arc<Mutex<BTreeMap<String, String>>>,
) {
    serve_https(listener, tls, move |host, request| {
        if !request.starts_with("GET /.well-known/parley/server ") {
            return None;
        }
        bodies.lock().unwrap_or_else(|e| e.into_inner()).get(host).map(|b| b.clone().into_bytes())
    })
    .await
}

/// Where a test's temporary files go.
pub fn temp_path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}
