//! Server-name discovery: where to connect for a [`ServerName`], and with which TLS name.
//!
//! The steps, first match wins:
//! 1. an IP literal (`10.0.0.1`, `[::1]:8448`) is used as is, on its port or the default port;
//! 2. a name with an explicit port (`chat.example.org:8448`) is resolved with A/AAAA;
//! 3. `https://<name>/.well-known/parley/server` may delegate to another `host[:port]`, which is
//!    then resolved like 2, or with SRV and A/AAAA like 4 and 5 (TLS name: the delegated host);
//! 4. an SRV record `_parley._tcp.<name>` gives target and port (TLS name: still `<name>`);
//! 5. otherwise A/AAAA of `<name>` on the default port.
//!
//! Results are cached (DNS TTLs, well-known for a day, failures for 30 s). [`Discovery::client_builder`]
//! gives an HTTPS client whose DNS resolver connects each resolved `host` to the addresses found
//! here, so that a URL from [`Destination::base_url`] reaches the right machine while the
//! certificate is checked against `host`.

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Hosts, TokioResolver};
use parley_spec::ServerName;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::debug;

/// Shortest time a resolved destination is cached, whatever the DNS TTLs say.
const MIN_CACHE: Duration = Duration::from_secs(60);
/// Longest time a resolved destination is cached.
const MAX_CACHE: Duration = Duration::from_secs(24 * 3600);
/// How long a failed resolution is remembered, so a dead name is not queried for every message.
const FAILURE_CACHE: Duration = Duration::from_secs(30);
/// How long a well-known answer is cached without a `Cache-Control: max-age`.
const WELL_KNOWN_CACHE: Duration = Duration::from_secs(24 * 3600);
/// Longest time a well-known answer is cached, whatever `max-age` says.
const WELL_KNOWN_MAX_CACHE: Duration = Duration::from_secs(48 * 3600);
/// How long "no delegation" is remembered when the server answered (404, bad JSON, ...).
const WELL_KNOWN_MISS_CACHE: Duration = Duration::from_secs(3600);
/// How long "no delegation" is remembered when the server could not be reached.
const WELL_KNOWN_DOWN_CACHE: Duration = Duration::from_secs(120);
/// Largest well-known body accepted.
const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;
/// Most entries in each cache.
const MAX_ENTRIES: usize = 10_000;
/// The well-known path.
const WELL_KNOWN_PATH: &str = "/.well-known/parley/server";

/// Why a server name could not be resolved. [`NotFound`](Self::NotFound) and
/// [`NoService`](Self::NoService) are the peer's DNS saying no; [`Dns`](Self::Dns) and
/// [`Timeout`](Self::Timeout) are transient; [`Config`](Self::Config) is a local setup problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The resolver or HTTP client could not be set up (unreadable `resolv.conf`, TLS roots).
    #[error("discovery configuration: {0}")]
    Config(String),
    /// The name has no usable address records.
    #[error("{name}: no address records")]
    NotFound {
        /// The DNS name that has no addresses.
        name: String,
    },
    /// The SRV record says the service is decidedly not available (target `.`).
    #[error("{name}: SRV record says there is no federation service")]
    NoService {
        /// The SRV name.
        name: String,
    },
    /// The lookup failed: server failure, network error, malformed name.
    #[error("DNS lookup of {name} failed: {reason}")]
    Dns {
        /// The DNS name looked up.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// The lookup took longer than [`DiscoveryConfig::timeout`].
    #[error("DNS lookup of {name} timed out")]
    Timeout {
        /// The DNS name looked up.
        name: String,
    },
}

/// How discovery talks to DNS and to well-known servers.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// DNS servers to ask (UDP, then TCP). Empty: the system's (`/etc/resolv.conf`). The hosts
    /// file and `localhost` are honoured either way.
    pub nameservers: Vec<SocketAddr>,
    /// Port of the HTTPS server answering `/.well-known/parley/server` (443; tests change it).
    pub well_known_port: u16,
    /// Port used when neither the name, the well-known delegation nor SRV gives one.
    pub default_port: u16,
    /// Limit for each network step (one DNS lookup, the well-known request) and for requests
    /// of [`Discovery::client_builder`] clients.
    pub timeout: Duration,
    /// Trust roots added to the built-in ones (private federations, tests).
    pub extra_roots: Vec<reqwest::Certificate>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            well_known_port: 443,
            default_port: 8448,
            timeout: Duration::from_secs(10),
            extra_roots: Vec::new(),
        }
    }
}

/// How a destination was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The server name is an IP literal.
    Literal,
    /// The server name has an explicit port.
    ExplicitPort,
    /// The server delegated with `/.well-known/parley/server`.
    WellKnown,
    /// An SRV record `_parley._tcp.<name>`.
    Srv,
    /// A/AAAA of the name on the default port.
    Default,
}

/// Where to connect for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The server name that was resolved.
    pub server_name: ServerName,
    /// The name the certificate must match, also sent as `Host`: the server name's host, the
    /// delegated host, or an IP literal (never an SRV target).
    pub host: String,
    /// The port to connect to.
    pub port: u16,
    /// The addresses to connect to (all with `port`), in preference order; never empty.
    pub addrs: Vec<SocketAddr>,
    /// How it was found.
    pub method: Method,
}

impl Destination {
    /// `https://host:port`, with an IPv6 host in brackets: the base of request URLs for clients
    /// from [`Discovery::client_builder`].
    pub fn base_url(&self) -> String {
        if self.host.parse::<Ipv6Addr>().is_ok() {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

/// Resolves server names to [`Destination`]s, with a cache. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    config: DiscoveryConfig,
    dns: Dns,
    /// Host name → addresses, for the resolver of [`Discovery::client_builder`] clients.
    host_map: Arc<HostMap>,
    /// Fetches well-known documents; resolves with plain DNS, not `host_map`.
    well_known_client: reqwest::Client,
    destinations: Mutex<Cache<ServerName, Resolved>>,
    well_known: Mutex<Cache<String, Option<ServerName>>>,
}

/// A cached resolution and the DNS queries it made (cleared from the DNS cache by `forget`).
#[derive(Clone)]
struct Resolved {
    result: Result<Arc<Destination>, DiscoveryError>,
    queried: Vec<(Name, RecordType)>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery").field("config", &self.inner.config).finish_non_exhaustive()
    }
}

impl Discovery {
    /// Sets up the DNS resolver (the system's when `config.nameservers` is empty) and the
    /// well-known HTTP client.
    pub fn new(config: DiscoveryConfig) -> Result<Self, DiscoveryError> {
        let dns = Dns::new(&config)?;
        let well_known_client = http_client(&config, ClientResolver { dns: dns.clone(), map: None })
            .build()
            .map_err(|e| DiscoveryError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                dns,
                host_map: Arc::new(HostMap::default()),
                well_known_client,
                destinations: Mutex::new(Cache::default()),
                well_known: Mutex::new(Cache::default()),
            }),
        })
    }

    /// Where to connect for `name`: from the cache, or by running discovery (IP literal,
    /// explicit port, well-known, SRV, A/AAAA). Failures are cached for 30 s too; call
    /// [`forget`](Self::forget) to retry earlier.
    #[tracing::instrument(level = "debug", skip(self, name), fields(server_name = %name))]
    pub async fn resolve(&self, name: &ServerName) -> Result<Arc<Destination>, DiscoveryError> {
        let inner = &self.inner;
        let now = Instant::now();
        let cached = lock(&inner.destinations).get(name, now).map(|(resolved, expires)| (resolved.result.clone(), expires));
        if let Some((result, expires)) = cached {
            if let Ok(destination) = &result {
                inner.host_map.insert(destination, expires, now);
            }
            return result;
        }

        let mut queried = Vec::new();
        let result = inner.discover(name, &mut queried).await;
        let now = Instant::now();
        let (result, expires) = match result {
            Ok((destination, valid_until)) => {
                let ttl = valid_until.saturating_duration_since(now).clamp(MIN_CACHE, MAX_CACHE);
                debug!(host = %destination.host, port = destination.port, method = ?destination.method, "resolved");
                (Ok(Arc::new(destination)), now + ttl)
            }
            Err(error) => {
                debug!(%error, "discovery failed");
                (Err(error), now + FAILURE_CACHE)
            }
        };
        if let Ok(destination) = &result {
            inner.host_map.insert(destination, expires, now);
        }
        lock(&inner.destinations).insert(name.clone(), Resolved { result: result.clone(), queried }, expires, now);
        result
    }

    /// Drops what is cached for `name` (destination or failure, well-known answer, and the DNS
    /// answers used), so the next [`resolve`](Self::resolve) starts afresh. Call it after
    /// connections to the destination failed.
    pub fn forget(&self, name: &ServerName) {
        let inner = &self.inner;
        let removed = lock(&inner.destinations).remove(name);
        if let Some((host, _)) = split_server_name(name.as_str()) {
            lock(&inner.well_known).remove(&host.to_string());
        }
        if let Some(resolved) = removed {
            if let Ok(destination) = &resolved.result {
                inner.host_map.remove(&destination.host);
            }
            for (name, record_type) in resolved.queried {
                inner.dns.resolver.clear_lookup_cache(name, record_type);
            }
        }
    }

    /// A builder for HTTPS clients that reach resolved destinations: HTTPS only, no redirects,
    /// no proxy, [`DiscoveryConfig::timeout`], the extra trust roots, and a DNS resolver that
    /// maps the `host` of every destination resolved so far to its `addrs` (other names: plain
    /// DNS with the configured servers and hosts file). Put the port in the URL
    /// ([`Destination::base_url`]); resolvers cannot choose ports.
    ///
    /// Two server names with the same host but different addresses (`a.example` with SRV and
    /// `a.example:8448`) share one map entry: the most recent [`resolve`](Self::resolve) wins.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let resolver = ClientResolver { dns: self.inner.dns.clone(), map: Some(self.inner.host_map.clone()) };
        http_client(&self.inner.config, resolver)
    }
}

impl Inner {
    /// Runs discovery; returns the destination and until when the answers used are valid.
    async fn discover(
        &self,
        name: &ServerName,
        queried: &mut Vec<(Name, RecordType)>,
    ) -> Result<(Destination, Instant), DiscoveryError> {
        let (host, port) = split_server_name(name.as_str())
            .ok_or_else(|| DiscoveryError::Dns { name: name.to_string(), reason: "not a valid server name".into() })?;
        let destination = |host: String, port: u16, addrs: Vec<SocketAddr>, method: Method| Destination {
            server_name: name.clone(),
            host,
            port,
            addrs,
            method,
        };
        let hostname = match host {
            Host::Ip(ip) => {
                let port = port.unwrap_or(self.config.default_port);
                let addrs = vec![SocketAddr::new(ip, port)];
                return Ok((destination(ip.to_string(), port, addrs, Method::Literal), Instant::now() + MAX_CACHE));
            }
            Host::Dns(hostname) => hostname,
        };
        if let Some(port) = port {
            let (ips, valid_until) = self.dns.lookup_ip(&hostname, queried).await?;
            let addrs = with_port(&ips, port);
            return Ok((destination(hostname, port, addrs, Method::ExplicitPort), valid_until));
        }

        if let Some((delegated, well_known_until)) = self.well_known(&hostname, queried).await {
            let (host, port, addrs, valid_until) = match split_server_name(delegated.as_str()) {
                Some((Host::Ip(ip), port)) => {
                    let port = port.unwrap_or(self.config.default_port);
                    (ip.to_string(), port, vec![SocketAddr::new(ip, port)], well_known_until)
                }
                Some((Host::Dns(host), Some(port))) => {
                    let (ips, valid_until) = self.dns.lookup_ip(&host, queried).await?;
                    (host, port, with_port(&ips, port), valid_until)
                }
                Some((Host::Dns(host), None)) => {
                    let found = self.srv_or_default(&host, queried).await?;
                    (host, found.port, found.addrs, found.valid_until)
                }
                None => {
                    return Err(DiscoveryError::Dns { name: delegated.to_string(), reason: "not a valid server name".into() })
                }
            };
            let valid_until = valid_until.min(well_known_until);
            return Ok((destination(host, port, addrs, Method::WellKnown), valid_until));
        }

        let found = self.srv_or_default(&hostname, queried).await?;
        let method = if found.srv { Method::Srv } else { Method::Default };
        Ok((destination(hostname, found.port, found.addrs, method), found.valid_until))
    }

    /// SRV `_parley._tcp.<host>` if there is one, else A/AAAA of `host` on the default port.
    async fn srv_or_default(&self, host: &str, queried: &mut Vec<(Name, RecordType)>) -> Result<Found, DiscoveryError> {
        if let Some(found) = self.dns.lookup_srv(host, queried).await? {
            return Ok(found);
        }
        let (ips, valid_until) = self.dns.lookup_ip(host, queried).await?;
        let port = self.config.default_port;
        Ok(Found { port, addrs: with_port(&ips, port), valid_until, srv: false })
    }

    /// The delegation from `https://<host>/.well-known/parley/server`, cached, with its expiry;
    /// `None` when there is none or it could not be fetched.
    async fn well_known(&self, host: &str, queried: &mut Vec<(Name, RecordType)>) -> Option<(ServerName, Instant)> {
        let now = Instant::now();
        if let Some((answer, expires)) = lock(&self.well_known).get(&host.to_owned(), now) {
            return answer.clone().map(|name| (name, expires));
        }
        if let Ok(name) = fqdn(host) {
            queried.push((name.clone(), RecordType::A));
            queried.push((name, RecordType::AAAA));
        }
        let (answer, ttl) = match self.fetch_well_known(host).await {
            Ok((delegated, ttl)) => {
                debug!(host, %delegated, "well-known delegation");
                (Some(delegated), ttl)
            }
            Err(miss) => {
                debug!(host, reason = %miss.reason, "no well-known delegation");
                (None, if miss.answered { WELL_KNOWN_MISS_CACHE } else { WELL_KNOWN_DOWN_CACHE })
            }
        };
        let now = Instant::now();
        let expires = now + ttl;
        lock(&self.well_known).insert(host.to_owned(), answer.clone(), expires, now);
        answer.map(|name| (name, expires))
    }

    async fn fetch_well_known(&self, host: &str) -> Result<(ServerName, Duration), WellKnownMiss> {
        let url = format!("https://{host}:{}{WELL_KNOWN_PATH}", self.config.well_known_port);
        let request = async {
            let mut response = self.well_known_client.get(&url).send().await.map_err(WellKnownMiss::down)?;
            let status = response.status();
            if !status.is_success() {
                let reason = format!("HTTP status {status}");
                return Err(if status.is_server_error() { WellKnownMiss::down(reason) } else { WellKnownMiss::answered(reason) });
            }
            if response.content_length().is_some_and(|n| n > WELL_KNOWN_MAX_BYTES as u64) {
                return Err(WellKnownMiss::answered("body too large"));
            }
            let ttl = max_age(response.headers()).map_or(WELL_KNOWN_CACHE, |age| age.clamp(MIN_CACHE, WELL_KNOWN_MAX_CACHE));
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(WellKnownMiss::down)? {
                if body.len() + chunk.len() > WELL_KNOWN_MAX_BYTES {
                    return Err(WellKnownMiss::answered("body too large"));
                }
                body.extend_from_slice(&chunk);
            }
            let delegated = parse_well_known(&body).map_err(WellKnownMiss::answered)?;
            Ok((delegated, ttl))
        };
        tokio::time::timeout(self.config.timeout, request).await.map_err(|_| WellKnownMiss::down("timed out"))?
    }
}

/// Why there is no well-known delegation; `answered` if the server said so (rather than being
/// unreachable), which is cached longer.
struct WellKnownMiss {
    answered: bool,
    reason: String,
}

impl WellKnownMiss {
    fn answered(reason: impl ToString) -> Self {
        Self { answered: true, reason: reason.to_string() }
    }

    fn down(reason: impl ToString) -> Self {
        Self { answered: false, reason: reason.to_string() }
    }
}

/// Why a well-known document was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WellKnownError {
    /// Not a JSON object with a string `server`.
    #[error("not a well-known document: {0}")]
    Json(String),
    /// `server` is not a valid server name.
    #[error("invalid delegated server name: {0}")]
    ServerName(#[from] parley_spec::IdError),
}

/// Parses a `/.well-known/parley/server` document, `{"server": "<host>[:<port>]"}` (other
/// fields are ignored), into the delegated server name.
pub fn parse_well_known(body: &[u8]) -> Result<ServerName, WellKnownError> {
    #[derive(serde::Deserialize)]
    struct WellKnown {
        server: String,
    }
    let document: WellKnown = serde_json::from_slice(body).map_err(|e| WellKnownError::Json(e.to_string()))?;
    Ok(ServerName::parse(&document.server)?)
}

/// `max-age` from a `Cache-Control` header.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers.get_all(reqwest::header::CACHE_CONTROL).iter().filter_map(|value| value.to_str().ok()).find_map(|value| {
        value.split(',').find_map(|directive| {
            let (key, seconds) = directive.trim().split_once('=')?;
            if !key.eq_ignore_ascii_case("max-age") {
                return None;
            }
            seconds.trim_matches('"').parse::<u64>().ok().map(Duration::from_secs)
        })
    })
}

/// The host part of a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    /// A DNS name, lower case, without trailing dot.
    Dns(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Dns(name) => f.write_str(name),
        }
    }
}

/// Splits `host[:port]` / `[v6]:port`; `None` if malformed (a parsed [`ServerName`] never is).
fn split_server_name(name: &str) -> Option<(Host, Option<u16>)> {
    let parse_port = |port: &str| match port.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(port) => Some(port),
    };
    if let Some(rest) = name.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let ip = ip.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            after => Some(parse_port(after.strip_prefix(':')?)?),
        };
        return Some((Host::Ip(IpAddr::V6(ip)), port));
    }
    let (host, port) = match name.rsplit_once(':') {
        Some((host, port)) => (host, Some(parse_port(port)?)),
        None => (name, None),
    };
    if host.is_empty() {
        return None;
    }
    let host = match host.parse::<Ipv4Addr>() {
        Ok(ip) => Host::Ip(IpAddr::V4(ip)),
        Err(_) => Host::Dns(host.trim_end_matches('.').to_ascii_lowercase()),
    };
    Some((host, port))
}

fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}

/// `host` as an absolute DNS name, so that search domains are never appended.
fn fqdn(host: &str) -> Result<Name, DiscoveryError> {
    let mut name = Name::from_ascii(host.trim_end_matches('.'))
        .map_err(|e| DiscoveryError::Dns { name: host.to_owned(), reason: e.to_string() })?;
    name.set_fqdn(true);
    Ok(name)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What SRV or A/AAAA gave.
struct Found {
    port: u16,
    addrs: Vec<SocketAddr>,
    valid_until: Instant,
    srv: bool,
}

/// The DNS side: hickory with the configured servers, the hosts file first.
#[derive(Clone)]
struct Dns {
    resolver: TokioResolver,
    hosts: Arc<Hosts>,
    timeout: Duration,
}

impl Dns {
    fn new(config: &DiscoveryConfig) -> Result<Self, DiscoveryError> {
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| DiscoveryError::Config(format!("system DNS configuration: {e}")))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|server| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = server.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = server.port();
                    NameServerConfig::new(server.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), TokioRuntimeProvider::default())
        };
        let options = builder.options_mut();
        options.timeout = options.timeout.min(config.timeout);
        let resolver = builder.build().map_err(|e| DiscoveryError::Config(format!("DNS resolver: {e}")))?;
        let hosts = Arc::new(Hosts::from_system().unwrap_or_default());
        Ok(Self { resolver, hosts, timeout: config.timeout })
    }

    /// A/AAAA of `host`: from the hosts file if it lists the name (either family), else DNS.
    async fn lookup_ip(
        &self,
        host: &str,
        queried: &mut Vec<(Name, RecordType)>,
    ) -> Result<(Vec<IpAddr>, Instant), DiscoveryError> {
        let name = fqdn(host)?;
        if let Some(found) = self.hosts_file(&name) {
            return Ok(found);
        }
        queried.push((name.clone(), RecordType::A));
        queried.push((name.clone(), RecordType::AAAA));
        let lookup = tokio::time::timeout(self.timeout, self.resolver.lookup_ip(name))
            .await
            .map_err(|_| DiscoveryError::Timeout { name: host.to_owned() })?
            .map_err(|e| dns_error(host, &e))?;
        let ips: Vec<IpAddr> = lookup.iter().collect();
        if ips.is_empty() {
            return Err(DiscoveryError::NotFound { name: host.to_owned() });
        }
        Ok((ips, lookup.valid_until()))
    }

    /// Hickory consults the hosts file per record type, so a name listed only with IPv4 would
    /// still wait for a DNS AAAA answer; like the C library, let a listed name end the search.
    fn hosts_file(&self, name: &Name) -> Option<(Vec<IpAddr>, Instant)> {
        let mut ips = Vec::new();
        for record_type in [RecordType::AAAA, RecordType::A] {
            if let Some(lookup) = self.hosts.lookup_static_host(&Query::query(name.clone(), record_type)) {
                ips.extend(lookup.answers().iter().filter_map(|record| record.data.ip_addr()));
            }
        }
        (!ips.is_empty()).then(|| (ips, Instant::now() + MAX_CACHE))
    }

    /// SRV `_parley._tcp.<host>`: the best record whose target has addresses. `None` if there is
    /// no SRV record (or the DNS server refuses the query type).
    async fn lookup_srv(&self, host: &str, queried: &mut Vec<(Name, RecordType)>) -> Result<Option<Found>, DiscoveryError> {
        let srv_host = format!("_parley._tcp.{host}");
        let name = fqdn(&srv_host)?;
        queried.push((name.clone(), RecordType::SRV));
        let lookup = match tokio::time::timeout(self.timeout, self.resolver.lookup(name, RecordType::SRV)).await {
            // Some resolvers (Docker's, without upstream DNS) never answer SRV for names they
            // only know A records of: treat a timeout as "no SRV" and try the address records.
            Err(_) => {
                debug!(name = %srv_host, "SRV lookup timed out; trying address records");
                return Ok(None);
            }
            Ok(Err(NetError::Dns(e))) => {
                debug!(name = %srv_host, error = %e, "no SRV record");
                return Ok(None);
            }
            Ok(Err(e)) => return Err(dns_error(&srv_host, &e)),
            Ok(Ok(lookup)) => lookup,
        };
        let mut records: Vec<_> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Ok(None);
        }
        // Lowest priority first, then the heaviest: deterministic, and good enough.
        records.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
        let mut last_error = DiscoveryError::NoService { name: srv_host };
        for srv in records.iter().filter(|srv| !srv.target.is_root()) {
            let target = srv.target.to_ascii();
            match self.lookup_ip(&target, queried).await {
                Ok((ips, valid_until)) => {
                    return Ok(Some(Found {
                        port: srv.port,
                        addrs: with_port(&ips, srv.port),
                        valid_until: valid_until.min(lookup.valid_until()),
                        srv: true,
                    }))
                }
                Err(error) => {
                    debug!(%target, %error, "SRV target unusable");
                    last_error = error;
                }
            }
        }
        Err(last_error)
    }
}

fn dns_error(name: &str, error: &NetError) -> DiscoveryError {
    if error.is_no_records_found() {
        DiscoveryError::NotFound { name: name.to_owned() }
    } else if matches!(error, NetError::Timeout) {
        DiscoveryError::Timeout { name: name.to_owned() }
    } else {
        DiscoveryError::Dns { name: name.to_owned(), reason: error.to_string() }
    }
}

/// Host name → addresses of resolved destinations, for [`ClientResolver`].
#[derive(Default)]
struct HostMap {
    entries: Mutex<Cache<String, Vec<SocketAddr>>>,
}

impl HostMap {
    fn insert(&self, destination: &Destination, expires: Instant, now: Instant) {
        lock(&self.entries).insert(destination.host.clone(), destination.addrs.clone(), expires, now);
    }

    fn remove(&self, host: &str) {
        lock(&self.entries).remove(&host.to_owned());
    }

    fn get(&self, host: &str) -> Option<Vec<SocketAddr>> {
        lock(&self.entries).get(&host.to_owned(), Instant::now()).map(|(addrs, _)| addrs.clone())
    }
}

/// reqwest's resolver: the host map first (if any), then DNS.
struct ClientResolver {
    dns: Dns,
    map: Option<Arc<HostMap>>,
}

impl reqwest::dns::Resolve for ClientResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        let mapped = self.map.as_ref().and_then(|map| map.get(&host));
        let dns = self.dns.clone();
        Box::pin(async move {
            let addrs = match mapped {
                Some(addrs) => addrs,
                None => {
                    let (ips, _) = dns.lookup_ip(&host, &mut Vec::new()).await?;
                    with_port(&ips, 0)
                }
            };
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

fn http_client(config: &DiscoveryConfig, resolver: ClientResolver) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        .dns_resolver(Arc::new(resolver));
    for root in &config.extra_roots {
        builder = builder.add_root_certificate(root.clone());
    }
    builder
}

/// A map whose entries expire, bounded to [`MAX_ENTRIES`]: expired entries go first, then the
/// ones closest to expiry.
struct Cache<K, V> {
    entries: BTreeMap<K, (V, Instant)>,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self { entries: BTreeMap::new() }
    }
}

impl<K: Ord + Clone, V> Cache<K, V> {
    fn get(&self, key: &K, now: Instant) -> Option<(&V, Instant)> {
        self.entries.get(key).filter(|(_, expires)| *expires > now).map(|(value, expires)| (value, *expires))
    }

    fn insert(&mut self, key: K, value: V, expires: Instant, now: Instant) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (_, expires)| *expires > now);
            while self.entries.len() >= MAX_ENTRIES {
                let soonest = self.entries.iter().min_by_key(|(_, (_, expires))| *expires).map(|(key, _)| key.clone());
                match soonest {
                    Some(soonest) => self.entries.remove(&soonest),
                    None => break,
                };
            }
        }
        self.entries.insert(key, (value, expires));
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key).map(|(value, _)| value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
    }

    /// Nameserver that nothing listens on: any DNS query would fail, so these tests prove that
    /// literals and hosts-file names need none.
    fn offline() -> Discovery {
        Discovery::new(DiscoveryConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_secs(2),
            ..DiscoveryConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn well_known_documents() {
        assert_eq!(parse_well_known(br#"{"server": "chat.example.org:8448"}"#).unwrap(), name("chat.example.org:8448"));
        assert_eq!(parse_well_known(br#"{"server": "Chat.Example.org", "other": [1]}"#).unwrap(), name("chat.example.org"));
        assert_eq!(parse_well_known(br#"{"server": "[::1]:8448"}"#).unwrap(), name("[::1]:8448"));
        for bad in [
            &br#""#[..],
            br#"[]"#,
            br#"{}"#,
            br#"{"server": 5}"#,
            br#"{"server": ""}"#,
            br#"{"server": "a b"}"#,
            br#"{"server": "example.org:0"}"#,
            br#"{"server": "example.org:99999"}"#,
            br#"{"server": "https://example.org"}"#,
            b"\xff\xfe",
        ] {
            assert!(parse_well_known(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn splits_server_names() {
        let dns = |s: &str| Host::Dns(s.into());
        assert_eq!(split_server_name("example.org"), Some((dns("example.org"), None)));
        assert_eq!(split_server_name("example.org:8448"), Some((dns("example.org"), Some(8448))));
        assert_eq!(split_server_name("10.0.0.1"), Some((Host::Ip("10.0.0.1".parse().unwrap()), None)));
        assert_eq!(split_server_name("10.0.0.1:80"), Some((Host::Ip("10.0.0.1".parse().unwrap()), Some(80))));
        assert_eq!(split_server_name("[::1]"), Some((Host::Ip("::1".parse().unwrap()), None)));
        assert_eq!(split_server_name("[::1]:8448"), Some((Host::Ip("::1".parse().unwrap()), Some(8448))));
        for bad in ["", ":80", "[::1", "[::1]80", "[zz]:1", "a:0", "a:65536", "a:", "a:x"] {
            assert_eq!(split_server_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn base_urls() {
        let destination = |host: &str| Destination {
            server_name: name("example.org"),
            host: host.into(),
            port: 8448,
            addrs: vec![],
            method: Method::Default,
        };
        assert_eq!(destination("example.org").base_url(), "https://example.org:8448");
        assert_eq!(destination("10.0.0.1").base_url(), "https://10.0.0.1:8448");
        assert_eq!(destination("::1").base_url(), "https://[::1]:8448");
    }

    #[test]
    fn cache_max_age() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(max_age(&headers), None);
        headers.insert(reqwest::header::CACHE_CONTROL, "public, Max-Age=600".parse().unwrap());
        assert_eq!(max_age(&headers), Some(Duration::from_secs(600)));
        headers.insert(reqwest::header::CACHE_CONTROL, "no-store".parse().unwrap());
        assert_eq!(max_age(&headers), None);
    }

    #[test]
    fn cache_is_bounded() {
        let now = Instant::now();
        let mut cache = Cache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.insert(i, i, now + Duration::from_secs(i as u64 + 1), now);
        }
        assert_eq!(cache.entries.len(), MAX_ENTRIES);
        assert!(cache.get(&0, now).is_none(), "the entry closest to expiry went first");
        assert!(cache.get(&(MAX_ENTRIES + 9), now).is_some());
        assert!(cache.get(&(MAX_ENTRIES + 9), now + Duration::from_secs(1_000_000)).is_none());
    }

    #[tokio::test]
    async fn ip_literals_skip_dns() {
        let discovery = offline();
        let cases = [
            ("127.0.0.1", "127.0.0.1", 8448, "https://127.0.0.1:8448"),
            ("10.1.2.3:8008", "10.1.2.3", 8008, "https://10.1.2.3:8008"),
            ("[::1]", "::1", 8448, "https://[::1]:8448"),
            ("[2001:db8::1]:443", "2001:db8::1", 443, "https://[2001:db8::1]:443"),
        ];
        for (server, host, port, url) in cases {
            let destination = discovery.resolve(&name(server)).await.unwrap();
            assert_eq!(destination.method, Method::Literal, "{server}");
            assert_eq!(destination.host, host);
            assert_eq!(destination.port, port);
            assert_eq!(destination.addrs, vec![SocketAddr::new(host.parse().unwrap(), port)]);
            assert_eq!(destination.base_url(), url);
            assert_eq!(destination.server_name, name(server));
        }
    }

    #[tokio::test]
    async fn explicit_port_uses_hosts_file_and_localhost() {
        let discovery = offline();
        let destination = discovery.resolve(&name("localhost:8008")).await.unwrap();
        assert_eq!(destination.method, Method::ExplicitPort);
        assert_eq!(destination.host, "localhost");
        assert_eq!(destination.port, 8008);
        assert!(destination.addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 8008), "{:?}", destination.addrs);
        assert!(!destination.addrs.is_empty());
        assert_eq!(destination.base_url(), "https://localhost:8008");

        // Without a port: the well-known request is refused, `_parley._tcp.localhost` has no SRV
        // (answered locally, RFC 6761), so A/AAAA on the default port.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let discovery = Discovery::new(DiscoveryConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            well_known_port: closed,
            default_port: 8009,
            timeout: Duration::from_secs(2),
            ..DiscoveryConfig::default()
        })
        .unwrap();
        let destination = discovery.resolve(&name("localhost")).await.unwrap();
        assert_eq!((destination.method, destination.host.as_str(), destination.port), (Method::Default, "localhost", 8009));
        assert!(destination.addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 8009), "{:?}", destination.addrs);
    }

    #[tokio::test]
    async fn failures_are_cached_and_forgotten() {
        // Nothing answers DNS here: the failure comes back fast (timeout 2 s at most) and the
        // second call is served from the cache.
        let discovery = Discovery::new(DiscoveryConfig {
            nameservers: vec!["127.0.0.1:9".parse().unwrap()],
            timeout: Duration::from_millis(300),
            ..DiscoveryConfig::default()
        })
        .unwrap();
        let server = name("nowhere.invalid:8448");
        let first = discovery.resolve(&server).await.unwrap_err();
        let started = Instant::now();
        let second = discovery.resolve(&server).await.unwrap_err();
        assert_eq!(first, second);
        assert!(started.elapsed() < Duration::from_millis(100));
        discovery.forget(&server);
        assert!(discovery.inner.destinations.lock().unwrap().get(&server, Instant::now()).is_none());
    }
}
