//! The decision tree and its caches against a fake [`Lookup`] and a [`ManualClock`]: every rule
//! of the module header, which lookups each makes (and does not make), and every TTL, observed
//! by moving the clock. The real hickory/reqwest path is tested in `tests/it/discovery.rs`.

use super::cache::ManualClock;
use super::*;
use std::collections::BTreeMap;

const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

/// Answers from tables; records every call. A name without an entry has no addresses, no SRV
/// records and no reachable well-known server.
#[derive(Default)]
struct Fake {
    ips: Mutex<BTreeMap<String, Result<Addresses, DiscoveryError>>>,
    srv: Mutex<BTreeMap<String, Result<Option<SrvAnswer>, DiscoveryError>>>,
    well_known: Mutex<BTreeMap<String, Result<WellKnown, WellKnownMiss>>>,
    calls: Mutex<Vec<String>>,
    forgotten: Mutex<Vec<Query>>,
}

impl Lookup for Fake {
    async fn ip(&self, host: &str) -> Result<Addresses, DiscoveryError> {
        lock(&self.calls).push(format!("ip {host}"));
        lock(&self.ips).get(host).cloned().unwrap_or_else(|| Err(DiscoveryError::NotFound { name: host.to_owned() }))
    }

    async fn srv(&self, name: &str) -> Result<Option<SrvAnswer>, DiscoveryError> {
        lock(&self.calls).push(format!("srv {name}"));
        lock(&self.srv).get(name).cloned().unwrap_or(Ok(None))
    }

    async fn well_known(&self, host: &str) -> Result<WellKnown, WellKnownMiss> {
        lock(&self.calls).push(format!("well-known {host}"));
        lock(&self.well_known).get(host).cloned().unwrap_or_else(|| Err(WellKnownMiss::down("connection refused")))
    }

    fn forget(&self, queries: &[Query]) {
        lock(&self.forgotten).extend_from_slice(queries);
    }
}

struct World {
    resolver: Resolver<Fake>,
    clock: Arc<ManualClock>,
}

fn name(s: &str) -> ServerName {
    ServerName::parse(s).unwrap()
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn addrs(ips: &[&str], port: u16) -> Vec<SocketAddr> {
    ips.iter().map(|ip| SocketAddr::new(ip.parse().unwrap(), port)).collect()
}

impl World {
    fn new() -> Self {
        let clock = Arc::new(ManualClock::new());
        Self { resolver: Resolver::new(Fake::default(), clock.clone(), 8448), clock }
    }

    fn fake(&self) -> &Fake {
        &self.resolver.lookup
    }

    fn ip(&self, host: &str, ips: &[&str], ttl: u64) {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        lock(&self.fake().ips).insert(host.into(), Ok(Addresses { ips, ttl: secs(ttl) }));
    }

    fn ip_error(&self, host: &str, error: DiscoveryError) {
        lock(&self.fake().ips).insert(host.into(), Err(error));
    }

    /// SRV records of `_parley._tcp.<host>`: (priority, weight, port, target; `None` for `.`).
    fn srv(&self, host: &str, records: &[(u16, u16, u16, Option<&str>)], ttl: u64) {
        let records = records
            .iter()
            .map(|&(priority, weight, port, target)| SrvRecord { priority, weight, port, target: target.map(str::to_owned) })
            .collect();
        lock(&self.fake().srv).insert(format!("_parley._tcp.{host}"), Ok(Some(SrvAnswer { records, ttl: secs(ttl) })));
    }

    fn srv_error(&self, host: &str, error: DiscoveryError) {
        lock(&self.fake().srv).insert(format!("_parley._tcp.{host}"), Err(error));
    }

    fn delegate(&self, host: &str, to: &str, max_age: Option<u64>) {
        let answer = WellKnown { server: name(to), max_age: max_age.map(secs) };
        lock(&self.fake().well_known).insert(host.into(), Ok(answer));
    }

    fn well_known_miss(&self, host: &str, miss: WellKnownMiss) {
        lock(&self.fake().well_known).insert(host.into(), Err(miss));
    }

    /// The lookups made since the last call.
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.fake().calls))
    }

    fn advance(&self, by: u64) {
        self.clock.advance(secs(by));
    }

    async fn resolve(&self, server: &str) -> Result<Arc<Destination>, DiscoveryError> {
        self.resolve_ttl(server).await.0
    }

    /// The result and how long from now it is cached.
    async fn resolve_ttl(&self, server: &str) -> (Result<Arc<Destination>, DiscoveryError>, Duration) {
        let (result, expires) = self.resolver.resolve(&name(server)).await;
        (result, expires.saturating_duration_since(self.clock.now()))
    }
}

fn check(destination: &Destination, method: Method, host: &str, port: u16, addrs: &[SocketAddr]) {
    assert_eq!((destination.method, destination.host.as_str(), destination.port), (method, host, port));
    assert_eq!(destination.addrs, addrs);
}

#[tokio::test]
async fn ip_literals_need_no_lookup_and_keep_for_a_day() {
    let world = World::new();
    let cases = [
        ("127.0.0.1", "127.0.0.1", 8448, "https://127.0.0.1:8448"),
        ("10.1.2.3:8008", "10.1.2.3", 8008, "https://10.1.2.3:8008"),
        ("[::1]", "::1", 8448, "https://[::1]:8448"),
        ("[2001:db8::1]:443", "2001:db8::1", 443, "https://[2001:db8::1]:443"),
    ];
    for (server, host, port, url) in cases {
        let (destination, ttl) = world.resolve_ttl(server).await;
        let destination = destination.unwrap();
        check(&destination, Method::Literal, host, port, &addrs(&[host], port));
        assert_eq!(destination.base_url(), url);
        assert_eq!(destination.server_name, name(server));
        assert_eq!(ttl, MAX_CACHE);
    }
    assert!(world.calls().is_empty());
}

#[tokio::test]
async fn explicit_port_asks_address_records_only() {
    let world = World::new();
    world.ip("a.test", &["10.0.0.1", "fd00::1"], HOUR);
    // Decoys that must not be consulted.
    world.delegate("a.test", "elsewhere.test:1", None);
    world.srv("a.test", &[(0, 0, 1, Some("elsewhere.test."))], HOUR);
    let destination = world.resolve("a.test:9000").await.unwrap();
    check(&destination, Method::ExplicitPort, "a.test", 9000, &addrs(&["10.0.0.1", "fd00::1"], 9000));
    assert_eq!(destination.base_url(), "https://a.test:9000");
    assert_eq!(world.calls(), ["ip a.test"]);
}

#[tokio::test]
async fn explicit_port_errors_are_the_result() {
    let world = World::new();
    assert_eq!(world.resolve("b.test:9000").await.unwrap_err(), DiscoveryError::NotFound { name: "b.test".into() });
    world.ip_error("c.test", DiscoveryError::Timeout { name: "c.test".into() });
    assert_eq!(world.resolve("c.test:9000").await.unwrap_err(), DiscoveryError::Timeout { name: "c.test".into() });
    assert_eq!(world.calls(), ["ip b.test", "ip c.test"], "no well-known, no SRV");
}

#[tokio::test]
async fn well_known_delegation_with_a_port_uses_address_records_of_the_delegated_host() {
    let world = World::new();
    world.delegate("a.test", "b.test:7000", None);
    world.ip("b.test", &["10.0.0.2"], HOUR);
    world.srv("b.test", &[(0, 0, 1, Some("decoy.test."))], HOUR);
    world.srv("a.test", &[(0, 0, 1, Some("decoy.test."))], HOUR);
    let destination = world.resolve("a.test").await.unwrap();
    check(&destination, Method::WellKnown, "b.test", 7000, &addrs(&["10.0.0.2"], 7000));
    assert_eq!(destination.server_name, name("a.test"));
    assert_eq!(world.calls(), ["well-known a.test", "ip b.test"]);
}

#[tokio::test]
async fn well_known_delegation_without_a_port_follows_the_delegated_hosts_srv_then_address_records() {
    let world = World::new();
    world.delegate("a.test", "b.test", None);
    world.srv("b.test", &[(0, 0, 7001, Some("t.test."))], HOUR);
    world.ip("t.test.", &["10.0.0.3"], HOUR);
    world.srv("a.test", &[(0, 0, 1, Some("decoy.test."))], HOUR);
    let destination = world.resolve("a.test").await.unwrap();
    // TLS name: the delegated host, not the SRV target.
    check(&destination, Method::WellKnown, "b.test", 7001, &addrs(&["10.0.0.3"], 7001));
    assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.b.test", "ip t.test."]);

    world.delegate("c.test", "d.test", None);
    world.ip("d.test", &["10.0.0.4"], HOUR);
    let destination = world.resolve("c.test").await.unwrap();
    check(&destination, Method::WellKnown, "d.test", 8448, &addrs(&["10.0.0.4"], 8448));
    assert_eq!(world.calls(), ["well-known c.test", "srv _parley._tcp.d.test", "ip d.test"]);
}

#[tokio::test]
async fn well_known_delegation_to_an_ip_literal_needs_no_dns() {
    let world = World::new();
    world.delegate("a.test", "[::1]:7002", Some(10 * MINUTE));
    world.delegate("b.test", "10.0.0.5", None);
    let (destination, ttl) = world.resolve_ttl("a.test").await;
    check(&destination.unwrap(), Method::WellKnown, "::1", 7002, &addrs(&["::1"], 7002));
    assert_eq!(ttl, secs(10 * MINUTE), "as long as the delegation");
    let (destination, ttl) = world.resolve_ttl("b.test").await;
    check(&destination.unwrap(), Method::WellKnown, "10.0.0.5", 8448, &addrs(&["10.0.0.5"], 8448));
    assert_eq!(ttl, MAX_CACHE);
    assert_eq!(world.calls(), ["well-known a.test", "well-known b.test"]);
}

#[tokio::test]
async fn a_delegated_name_that_does_not_resolve_is_the_result() {
    let world = World::new();
    world.delegate("a.test", "gone.test:1", None);
    world.ip("a.test", &["10.0.0.1"], HOUR);
    assert_eq!(world.resolve("a.test").await.unwrap_err(), DiscoveryError::NotFound { name: "gone.test".into() });
    assert_eq!(world.calls(), ["well-known a.test", "ip gone.test"], "no fall-through to a.test's own records");

    world.delegate("b.test", "nosrv.test", None);
    world.srv_error("nosrv.test", DiscoveryError::Dns { name: "_parley._tcp.nosrv.test".into(), reason: "SERVFAIL".into() });
    assert!(matches!(world.resolve("b.test").await.unwrap_err(), DiscoveryError::Dns { .. }));
}

#[tokio::test]
async fn without_delegation_srv_gives_target_and_port_and_the_tls_name_stays() {
    let world = World::new();
    world.srv("a.test", &[(20, 100, 1, Some("x.test.")), (10, 1, 2, Some("y.test.")), (10, 5, 3, Some("z.test."))], HOUR);
    for target in ["x.test.", "y.test.", "z.test."] {
        world.ip(target, &["10.0.0.6"], HOUR);
    }
    let destination = world.resolve("a.test").await.unwrap();
    // Priority 10 beats 20; at equal priority the heavier record wins.
    check(&destination, Method::Srv, "a.test", 3, &addrs(&["10.0.0.6"], 3));
    assert_eq!(destination.base_url(), "https://a.test:3");
    assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.a.test", "ip z.test."]);
}

#[tokio::test]
async fn srv_targets_that_do_not_resolve_pass_to_the_next_and_dot_means_no_service() {
    let world = World::new();
    world.srv("a.test", &[(10, 0, 1, Some("dead.test.")), (15, 0, 0, None), (20, 0, 2, Some("live.test."))], HOUR);
    world.ip("live.test.", &["10.0.0.7"], HOUR);
    let destination = world.resolve("a.test").await.unwrap();
    check(&destination, Method::Srv, "a.test", 2, &addrs(&["10.0.0.7"], 2));
    assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.a.test", "ip dead.test.", "ip live.test."]);

    // Every target fails: the last error, and no fallback to A/AAAA of the name.
    world.srv("b.test", &[(10, 0, 1, Some("dead.test.")), (20, 0, 2, Some("timeout.test."))], HOUR);
    world.ip_error("timeout.test.", DiscoveryError::Timeout { name: "timeout.test.".into() });
    world.ip("b.test", &["10.0.0.8"], HOUR);
    assert_eq!(world.resolve("b.test").await.unwrap_err(), DiscoveryError::Timeout { name: "timeout.test.".into() });

    // Only `.`: the service is decidedly not there.
    world.srv("c.test", &[(0, 0, 0, None)], HOUR);
    world.ip("c.test", &["10.0.0.9"], HOUR);
    assert_eq!(world.resolve("c.test").await.unwrap_err(), DiscoveryError::NoService { name: "_parley._tcp.c.test".into() });
    assert!(!world.calls().contains(&"ip c.test".to_owned()));
}

#[tokio::test]
async fn without_delegation_or_srv_address_records_on_the_default_port() {
    let world = World::new();
    world.ip("a.test", &["10.0.0.10"], HOUR);
    let destination = world.resolve("a.test").await.unwrap();
    check(&destination, Method::Default, "a.test", 8448, &addrs(&["10.0.0.10"], 8448));
    assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.a.test", "ip a.test"]);

    assert_eq!(world.resolve("none.test").await.unwrap_err(), DiscoveryError::NotFound { name: "none.test".into() });

    // An SRV lookup that fails (rather than finding nothing) is the result.
    world.srv_error("e.test", DiscoveryError::Timeout { name: "_parley._tcp.e.test".into() });
    world.ip("e.test", &["10.0.0.11"], HOUR);
    assert!(matches!(world.resolve("e.test").await, Err(DiscoveryError::Timeout { .. })));
}

#[tokio::test]
async fn a_destination_is_cached_as_long_as_its_shortest_answer() {
    let world = World::new();
    world.well_known_miss("a.test", WellKnownMiss::answered("HTTP status 404 Not Found"));
    world.srv("a.test", &[(0, 0, 1, Some("t.test."))], 10 * MINUTE);
    world.ip("t.test.", &["10.0.0.1"], 5 * MINUTE);
    let (first, ttl) = world.resolve_ttl("a.test").await;
    assert_eq!(ttl, secs(5 * MINUTE));
    world.calls();
    world.advance(5 * MINUTE - 1);
    let (again, ttl) = world.resolve_ttl("a.test").await;
    assert!(Arc::ptr_eq(first.as_ref().unwrap(), again.as_ref().unwrap()), "served from the cache");
    assert_eq!(ttl, secs(1));
    assert!(world.calls().is_empty());
    world.advance(1);
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["srv _parley._tcp.a.test", "ip t.test."], "expired; the 404 is still cached");
}

#[tokio::test]
async fn destination_ttls_are_clamped_to_a_minute_and_a_day() {
    let world = World::new();
    world.ip("short.test", &["10.0.0.1"], 5);
    world.ip("long.test", &["10.0.0.1"], 3 * DAY);
    assert_eq!(world.resolve_ttl("short.test:1").await.1, secs(MINUTE));
    assert_eq!(world.resolve_ttl("long.test:1").await.1, secs(DAY));
    world.calls();
    world.advance(MINUTE - 1);
    world.resolve("short.test:1").await.unwrap();
    assert!(world.calls().is_empty(), "kept a minute although the DNS said 5 s");
    world.advance(1);
    world.resolve("short.test:1").await.unwrap();
    assert_eq!(world.calls(), ["ip short.test"]);
}

#[tokio::test]
async fn failures_are_cached_for_30_seconds() {
    let world = World::new();
    let (error, ttl) = world.resolve_ttl("late.test:1").await;
    assert_eq!(error.unwrap_err(), DiscoveryError::NotFound { name: "late.test".into() });
    assert_eq!(ttl, FAILURE_CACHE);
    world.ip("late.test", &["10.0.0.1"], HOUR);
    world.calls();
    world.advance(29);
    assert!(world.resolve("late.test:1").await.is_err(), "the failure is remembered");
    assert!(world.calls().is_empty());
    world.advance(1);
    assert!(world.resolve("late.test:1").await.is_ok());
    assert_eq!(world.calls(), ["ip late.test"]);
}

#[tokio::test]
async fn a_delegation_is_cached_for_its_max_age_or_a_day() {
    // No max-age: a day. The destination expires with its DNS answer (2 min); the delegation
    // outlives it.
    let world = World::new();
    world.delegate("a.test", "b.test:1", None);
    world.ip("b.test", &["10.0.0.1"], 2 * MINUTE);
    assert_eq!(world.resolve_ttl("a.test").await.1, secs(2 * MINUTE));
    world.calls();
    world.advance(2 * MINUTE);
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["ip b.test"], "delegation from the cache");
    world.advance(DAY - 2 * MINUTE);
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["well-known a.test", "ip b.test"], "a day later: fetched again");

    // max-age shorter than a minute: a minute, and the destination no longer than that.
    let world = World::new();
    world.delegate("a.test", "b.test:1", Some(10));
    world.ip("b.test", &["10.0.0.1"], HOUR);
    assert_eq!(world.resolve_ttl("a.test").await.1, secs(MINUTE));

    // max-age beyond two days: two days.
    let world = World::new();
    world.delegate("a.test", "b.test:1", Some(100 * HOUR));
    world.ip("b.test", &["10.0.0.1"], 3 * DAY);
    assert_eq!(world.resolve_ttl("a.test").await.1, secs(DAY), "destinations: a day at most");
    world.calls();
    world.advance(DAY);
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["ip b.test"], "the delegation outlived a day");
    world.advance(DAY - 1);
    world.resolve("a.test").await.unwrap();
    assert!(world.calls().is_empty());
    world.advance(1);
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["well-known a.test", "ip b.test"], "after 48 h");
}

#[tokio::test]
async fn no_delegation_is_remembered_an_hour_if_the_server_said_so_and_two_minutes_if_it_was_down() {
    for (miss, ttl) in [
        (WellKnownMiss::answered("HTTP status 404 Not Found"), WELL_KNOWN_MISS_CACHE),
        (WellKnownMiss::answered("not a well-known document"), WELL_KNOWN_MISS_CACHE),
        (WellKnownMiss::down("HTTP status 503 Service Unavailable"), WELL_KNOWN_DOWN_CACHE),
        (WellKnownMiss::down("connection refused"), WELL_KNOWN_DOWN_CACHE),
        (WellKnownMiss::down("timed out"), WELL_KNOWN_DOWN_CACHE),
    ] {
        let world = World::new();
        world.well_known_miss("a.test", miss.clone());
        world.ip("a.test", &["10.0.0.1"], MINUTE);
        let destination = world.resolve("a.test").await.unwrap();
        assert_eq!(destination.method, Method::Default, "{miss:?}: falls through");
        world.calls();
        // The destination expires every minute; the miss is not fetched again before `ttl`.
        let mut elapsed = Duration::ZERO;
        while elapsed + secs(MINUTE) < ttl {
            world.advance(MINUTE);
            elapsed += secs(MINUTE);
            world.resolve("a.test").await.unwrap();
            assert_eq!(world.calls(), ["srv _parley._tcp.a.test", "ip a.test"], "{miss:?} at {elapsed:?}");
        }
        world.advance((ttl - elapsed).as_secs());
        world.resolve("a.test").await.unwrap();
        assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.a.test", "ip a.test"], "{miss:?} after {ttl:?}");
    }
}

#[tokio::test]
async fn forget_drops_the_destination_the_delegation_and_the_lookups_made() {
    let world = World::new();
    world.delegate("a.test", "b.test", None);
    world.srv("b.test", &[(0, 0, 1, Some("t.test."))], HOUR);
    world.ip("t.test.", &["10.0.0.1"], HOUR);
    let first = world.resolve("a.test").await.unwrap();
    world.calls();
    let forgotten = world.resolver.forget(&name("a.test"));
    assert_eq!(forgotten.map(|result| result.unwrap()), Some(first));
    assert_eq!(
        *lock(&world.fake().forgotten),
        [Query::Ip("a.test".into()), Query::Srv("_parley._tcp.b.test".into()), Query::Ip("t.test.".into())]
    );
    world.resolve("a.test").await.unwrap();
    assert_eq!(world.calls(), ["well-known a.test", "srv _parley._tcp.b.test", "ip t.test."], "all asked again");

    // A cached failure is forgotten too; an unknown name is nothing to forget.
    assert!(world.resolve("gone.test:1").await.is_err());
    assert!(matches!(world.resolver.forget(&name("gone.test:1")), Some(Err(_))));
    assert!(world.resolver.forget(&name("gone.test:1")).is_none());
    world.ip("gone.test", &["10.0.0.2"], HOUR);
    assert!(world.resolve("gone.test:1").await.is_ok());
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

#[tokio::test]
async fn real_lookups_ip_literals_skip_dns() {
    let discovery = offline();
    let destination = discovery.resolve(&name("[2001:db8::1]:443")).await.unwrap();
    assert_eq!(destination.method, Method::Literal);
    assert_eq!(destination.base_url(), "https://[2001:db8::1]:443");
}

#[tokio::test]
async fn real_lookups_explicit_port_uses_hosts_file_and_localhost() {
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
async fn real_lookups_failures_are_cached_and_forgotten() {
    // Nothing answers DNS here: the failure comes back fast (timeout 300 ms at most) and the
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
    assert!(lock(&discovery.inner.resolver.destinations).get(&server, Instant::now()).is_none());
}
