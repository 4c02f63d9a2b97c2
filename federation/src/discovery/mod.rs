//! Server-name discovery: where to connect for a [`ServerName`], and with which TLS name.
//!
//! The steps, first match wins:
//! 1. an IP literal (`10.0.0.1`, `[::1]:8448`) is used as is, on its port or the default port;
//! 2. a name with an explicit port (`chat.example.org:8448`) is resolved with A/AAAA;
//! 3. `https://<name>/.well-known/parley/server` may delegate to another `host[:port]`, which is
//!    then resolved like 1 or 2, or with SRV and A/AAAA like 4 and 5 (TLS name: the delegated
//!    host); an error resolving the delegated name is the result (no fall-through to 4);
//! 4. an SRV record `_parley._tcp.<name>` gives target and port (TLS name: still `<name>`);
//!    records are tried by priority, then weight, a target `.` is skipped, and an unusable
//!    target passes to the next;
//! 5. otherwise A/AAAA of `<name>` on the default port.
//!
//! Results are cached: a destination as long as the DNS and well-known answers it used (at
//! least a minute, at most a day), a failure for 30 s; a well-known delegation for its
//! `max-age` (a day without one, at most two), "no delegation" for an hour when the server
//! said so and two minutes when it could not be reached. [`Discovery::client_builder`] gives
//! an HTTPS client whose DNS resolver connects each resolved `host` to the addresses found
//! here, so that a URL from [`Destination::base_url`] reaches the right machine while the
//! certificate is checked against `host`.
//!
//! Layout: this file holds the public types and the decision tree, `Resolver`, written
//! against the `Lookup` trait (A/AAAA, SRV, well-known) and a `Clock`, so every rule and
//! every TTL is unit-tested with a fake (`tests.rs`). The real lookups are `dns.rs` (hickory)
//! and `well_known.rs` (reqwest); `client.rs` is the resolver of the HTTPS clients; `cache.rs`
//! the clock and the expiring map.

mod cache;
mod client;
mod dns;
#[cfg(test)]
mod tests;
mod well_known;

pub use well_known::{parse_well_known, WellKnownError};

use cache::{lock, Cache, Clock, SystemClock};
use client::{http_client, ClientResolver, HostMap};
use dns::Dns;
use parley_spec::ServerName;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::debug;
use well_known::{WellKnown, WellKnownClient, WellKnownMiss};

/// Shortest time a resolved destination is cached, whatever the DNS TTLs say.
const MIN_CACHE: Duration = Duration::from_secs(60);
/// Longest time a resolved destination is cached.
pub(crate) const MAX_CACHE: Duration = Duration::from_secs(24 * 3600);
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
    /// delegated host, or the address of an IP literal (`::1`, without brackets; never an SRV
    /// target).
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
        if self.host.parse::<std::net::Ipv6Addr>().is_ok() {
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
    /// The decision tree and its caches, over the network.
    resolver: Resolver<Network>,
    /// Host name → addresses, for the resolver of [`Discovery::client_builder`] clients.
    host_map: Arc<HostMap>,
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
        let client = http_client(&config, ClientResolver { dns: dns.clone(), map: None })
            .build()
            .map_err(|e| DiscoveryError::Config(format!("HTTP client: {e}")))?;
        let well_known = WellKnownClient { client, port: config.well_known_port, timeout: config.timeout };
        let resolver = Resolver::new(Network { dns, well_known }, Arc::new(SystemClock), config.default_port);
        Ok(Self { inner: Arc::new(Inner { config, resolver, host_map: Arc::new(HostMap::default()) }) })
    }

    /// Where to connect for `name`: from the cache, or by running discovery (IP literal,
    /// explicit port, well-known, SRV, A/AAAA). Failures are cached for 30 s too; call
    /// [`forget`](Self::forget) to retry earlier.
    #[tracing::instrument(level = "debug", skip(self, name), fields(server_name = %name))]
    pub async fn resolve(&self, name: &ServerName) -> Result<Arc<Destination>, DiscoveryError> {
        let (result, expires) = self.inner.resolver.resolve(name).await;
        if let Ok(destination) = &result {
            self.inner.host_map.insert(destination, expires);
        }
        result
    }

    /// Drops what is cached for `name` (destination or failure, well-known answer, and the DNS
    /// answers used), so the next [`resolve`](Self::resolve) starts afresh. Call it after
    /// connections to the destination failed.
    pub fn forget(&self, name: &ServerName) {
        if let Some(Ok(destination)) = self.inner.resolver.forget(name) {
            self.inner.host_map.remove(&destination.host);
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
        let resolver = ClientResolver { dns: self.inner.resolver.lookup.dns.clone(), map: Some(self.inner.host_map.clone()) };
        http_client(&self.inner.config, resolver)
    }
}

/// Addresses of a name, and how long they may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addresses {
    /// Never empty.
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) ttl: Duration,
}

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrvRecord {
    pub(crate) priority: u16,
    pub(crate) weight: u16,
    pub(crate) port: u16,
    /// `None` for the target `.`: "decidedly no service".
    pub(crate) target: Option<String>,
}

/// The SRV records of a name (never empty), and how long they may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SrvAnswer {
    pub(crate) records: Vec<SrvRecord>,
    pub(crate) ttl: Duration,
}

/// A lookup a resolution made, so that [`Lookup::forget`] can drop its cached answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Query {
    /// A/AAAA of a host (also made by the well-known request).
    Ip(String),
    /// SRV of a name.
    Srv(String),
}

/// The network as the decision tree sees it: single lookups, each with its TTL. Which lookup
/// to make next is the tree's decision, never the lookup's.
pub(crate) trait Lookup: Send + Sync {
    /// A/AAAA of `host`, a DNS name: never an empty list ([`DiscoveryError::NotFound`]).
    fn ip(&self, host: &str) -> impl Future<Output = Result<Addresses, DiscoveryError>> + Send;
    /// The SRV records of `name`; `None` when there are none (or the DNS server will not say).
    fn srv(&self, name: &str) -> impl Future<Output = Result<Option<SrvAnswer>, DiscoveryError>> + Send;
    /// The delegation at `https://<host>/.well-known/parley/server`, or why there is none.
    fn well_known(&self, host: &str) -> impl Future<Output = Result<WellKnown, WellKnownMiss>> + Send;
    /// Drops whatever the lookup layer cached for `queries`.
    fn forget(&self, queries: &[Query]);
}

/// The real network: hickory and the well-known HTTPS client.
struct Network {
    dns: Dns,
    well_known: WellKnownClient,
}

impl Lookup for Network {
    async fn ip(&self, host: &str) -> Result<Addresses, DiscoveryError> {
        self.dns.ip(host).await
    }

    async fn srv(&self, name: &str) -> Result<Option<SrvAnswer>, DiscoveryError> {
        self.dns.srv(name).await
    }

    async fn well_known(&self, host: &str) -> Result<WellKnown, WellKnownMiss> {
        self.well_known.fetch(host).await
    }

    fn forget(&self, queries: &[Query]) {
        self.dns.forget(queries);
    }
}

/// A cached resolution and the lookups it made (dropped from the lookup layer by `forget`).
#[derive(Clone)]
struct Resolved {
    result: Result<Arc<Destination>, DiscoveryError>,
    queried: Vec<Query>,
}

/// What SRV or A/AAAA gave.
struct Found {
    port: u16,
    addrs: Vec<SocketAddr>,
    valid_until: Instant,
    srv: bool,
}

/// The decision tree over a [`Lookup`], with the destination and well-known caches; times
/// come from the [`Clock`].
pub(crate) struct Resolver<L> {
    lookup: L,
    clock: Arc<dyn Clock>,
    /// Port used when neither the name, the delegation nor SRV gives one.
    default_port: u16,
    destinations: Mutex<Cache<ServerName, Resolved>>,
    /// Host → delegated server name, or `None` for "no delegation".
    well_known: Mutex<Cache<String, Option<ServerName>>>,
}

impl<L: Lookup> Resolver<L> {
    fn new(lookup: L, clock: Arc<dyn Clock>, default_port: u16) -> Self {
        Self { lookup, clock, default_port, destinations: Mutex::new(Cache::default()), well_known: Mutex::new(Cache::default()) }
    }

    /// The destination of `name` (or why there is none) and until when it is cached.
    async fn resolve(&self, name: &ServerName) -> (Result<Arc<Destination>, DiscoveryError>, Instant) {
        let now = self.clock.now();
        let cached = lock(&self.destinations).get(name, now).map(|(resolved, expires)| (resolved.result.clone(), expires));
        if let Some(cached) = cached {
            return cached;
        }

        let mut queried = Vec::new();
        let result = self.discover(name, &mut queried).await;
        let now = self.clock.now();
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
        lock(&self.destinations).insert(name.clone(), Resolved { result: result.clone(), queried }, expires, now);
        (result, expires)
    }

    /// Drops the cached destination (or failure) of `name`, its well-known answer and the
    /// lookups it made; gives back the dropped result.
    fn forget(&self, name: &ServerName) -> Option<Result<Arc<Destination>, DiscoveryError>> {
        let removed = lock(&self.destinations).remove(name);
        lock(&self.well_known).remove(&name.host().to_owned());
        let removed = removed?;
        self.lookup.forget(&removed.queried);
        Some(removed.result)
    }

    /// Runs discovery; returns the destination and until when the answers used are valid.
    async fn discover(&self, name: &ServerName, queried: &mut Vec<Query>) -> Result<(Destination, Instant), DiscoveryError> {
        let destination = |host: String, port: u16, addrs: Vec<SocketAddr>, method: Method| Destination {
            server_name: name.clone(),
            host,
            port,
            addrs,
            method,
        };
        if let Some(ip) = name.ip() {
            let port = name.port().unwrap_or(self.default_port);
            let addrs = vec![SocketAddr::new(ip, port)];
            return Ok((destination(ip.to_string(), port, addrs, Method::Literal), self.clock.now() + MAX_CACHE));
        }
        let hostname = name.host();
        if let Some(port) = name.port() {
            let (ips, valid_until) = self.ip(hostname, queried).await?;
            let addrs = with_port(&ips, port);
            return Ok((destination(hostname.to_owned(), port, addrs, Method::ExplicitPort), valid_until));
        }

        if let Some((delegated, well_known_until)) = self.well_known(hostname, queried).await {
            let (host, port, addrs, valid_until) = match (delegated.ip(), delegated.port()) {
                (Some(ip), port) => {
                    let port = port.unwrap_or(self.default_port);
                    (ip.to_string(), port, vec![SocketAddr::new(ip, port)], well_known_until)
                }
                (None, Some(port)) => {
                    let (ips, valid_until) = self.ip(delegated.host(), queried).await?;
                    (delegated.host().to_owned(), port, with_port(&ips, port), valid_until)
                }
                (None, None) => {
                    let found = self.srv_or_default(delegated.host(), queried).await?;
                    (delegated.host().to_owned(), found.port, found.addrs, found.valid_until)
                }
            };
            let valid_until = valid_until.min(well_known_until);
            return Ok((destination(host, port, addrs, Method::WellKnown), valid_until));
        }

        let found = self.srv_or_default(hostname, queried).await?;
        let method = if found.srv { Method::Srv } else { Method::Default };
        Ok((destination(hostname.to_owned(), found.port, found.addrs, method), found.valid_until))
    }

    /// A/AAAA of `host`, and until when they are valid.
    async fn ip(&self, host: &str, queried: &mut Vec<Query>) -> Result<(Vec<IpAddr>, Instant), DiscoveryError> {
        queried.push(Query::Ip(host.to_owned()));
        let answer = self.lookup.ip(host).await?;
        Ok((answer.ips, self.clock.now() + answer.ttl))
    }

    /// SRV `_parley._tcp.<host>` if there is one, else A/AAAA of `host` on the default port.
    async fn srv_or_default(&self, host: &str, queried: &mut Vec<Query>) -> Result<Found, DiscoveryError> {
        if let Some(found) = self.srv(host, queried).await? {
            return Ok(found);
        }
        let (ips, valid_until) = self.ip(host, queried).await?;
        let port = self.default_port;
        Ok(Found { port, addrs: with_port(&ips, port), valid_until, srv: false })
    }

    /// SRV `_parley._tcp.<host>`: the best record whose target has addresses. `None` if there is
    /// no SRV record; [`DiscoveryError::NoService`] if every target is `.`; else the error of
    /// the last target tried.
    async fn srv(&self, host: &str, queried: &mut Vec<Query>) -> Result<Option<Found>, DiscoveryError> {
        let srv_name = format!("_parley._tcp.{host}");
        queried.push(Query::Srv(srv_name.clone()));
        let Some(answer) = self.lookup.srv(&srv_name).await? else { return Ok(None) };
        let srv_until = self.clock.now() + answer.ttl;
        let mut records = answer.records;
        // Lowest priority first, then the heaviest: deterministic, and good enough.
        records.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
        let mut last_error = DiscoveryError::NoService { name: srv_name };
        for srv in &records {
            let Some(target) = &srv.target else { continue };
            match self.ip(target, queried).await {
                Ok((ips, valid_until)) => {
                    return Ok(Some(Found {
                        port: srv.port,
                        addrs: with_port(&ips, srv.port),
                        valid_until: valid_until.min(srv_until),
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

    /// The delegation from `https://<host>/.well-known/parley/server`, cached, with its expiry;
    /// `None` when there is none or it could not be fetched.
    async fn well_known(&self, host: &str, queried: &mut Vec<Query>) -> Option<(ServerName, Instant)> {
        let now = self.clock.now();
        let cached = lock(&self.well_known).get(&host.to_owned(), now).map(|(answer, expires)| (answer.clone(), expires));
        if let Some((answer, expires)) = cached {
            return answer.map(|name| (name, expires));
        }
        // The request resolves `host` through the DNS cache too.
        queried.push(Query::Ip(host.to_owned()));
        let (answer, ttl) = match self.lookup.well_known(host).await {
            Ok(WellKnown { server, max_age }) => {
                debug!(host, delegated = %server, "well-known delegation");
                (Some(server), max_age.map_or(WELL_KNOWN_CACHE, |age| age.clamp(MIN_CACHE, WELL_KNOWN_MAX_CACHE)))
            }
            Err(miss) => {
                debug!(host, reason = %miss.reason, "no well-known delegation");
                (None, if miss.answered { WELL_KNOWN_MISS_CACHE } else { WELL_KNOWN_DOWN_CACHE })
            }
        };
        let now = self.clock.now();
        let expires = now + ttl;
        lock(&self.well_known).insert(host.to_owned(), answer.clone(), expires, now);
        answer.map(|name| (name, expires))
    }
}

fn with_port(ips: &[IpAddr], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()
}
