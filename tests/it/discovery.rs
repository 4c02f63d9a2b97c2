//! Server-name discovery (`parley_federation::discovery`) against a real DNS server
//! ([`TestDns`]) and small HTTPS servers whose certificates come from a test CA: SRV,
//! well-known delegation, the A/AAAA fallback, certificate checks, literals, failures.

use anyhow::{bail, Context as _};
use hickory_server::proto::rr::RecordType;
use parley_federation::discovery::{Discovery, DiscoveryConfig, DiscoveryError, Method};
use parley_spec::ServerName;
use parley_tests::dns::TestDns;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Upper bound for anything a test waits for.
const T: Duration = Duration::from_secs(20);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A certificate authority whose root the discovery clients trust.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "Parley test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    fn root(&self) -> anyhow::Result<reqwest::Certificate> {
        Ok(reqwest::Certificate::from_pem(self.pem.as_bytes())?)
    }

    /// A rustls server configuration with a certificate for `names` (DNS names or IPs).
    fn server_config(&self, names: &[&str]) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)?;
        Ok(Arc::new(config))
    }
}

/// A tiny HTTPS/1.1 server. `GET /.well-known/parley/server` answers the document configured for
/// the request's Host (without port), else 404; any other path answers `<label> <Host header>`.
struct HttpsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    async fn start(
        bind: &str,
        tls: Arc<rustls::ServerConfig>,
        label: &str,
        well_known: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("binding {bind}"))?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let label = label.to_owned();
        let well_known: Vec<(String, String)> = well_known.iter().map(|(h, d)| (h.to_string(), d.clone())).collect();
        let well_known = Arc::new(well_known);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, label, well_known) = (acceptor.clone(), label.clone(), well_known.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(T, serve(acceptor, stream, &label, &well_known)).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }
}

async fn serve(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    label: &str,
    well_known: &[(String, String)],
) -> anyhow::Result<()> {
    let mut stream = acceptor.accept(stream).await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            bail!("no request head");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let path = lines.next().and_then(|line| line.split(' ').nth(1)).unwrap_or("").to_owned();
    let host = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    let (status, body) = if path == "/.well-known/parley/server" {
        let bare_host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        match well_known.iter().find(|(h, _)| h == bare_host) {
            Some((_, document)) => ("200 OK", document.clone()),
            None => ("404 Not Found", "{}".to_owned()),
        }
    } else {
        ("200 OK", format!("{label} {host}"))
    };
    let response = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

fn config(dns: &TestDns, ca: &Ca, well_known_port: u16, default_port: u16) -> anyhow::Result<DiscoveryConfig> {
    Ok(DiscoveryConfig {
        nameservers: vec![dns.addr],
        well_known_port,
        default_port,
        timeout: Duration::from_secs(5),
        extra_roots: vec![ca.root()?],
    })
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn name(s: &str) -> ServerName {
    ServerName::parse(s).expect("valid server name")
}

/// `GET <base_url>/hello` with a client from `discovery`: the body (`<label> <Host>`).
async fn hello(discovery: &Discovery, base_url: &str) -> anyhow::Result<String> {
    let client = discovery.client_builder().build()?;
    let response = tokio::time::timeout(T, client.get(format!("{base_url}/hello")).send()).await??;
    anyhow::ensure!(response.status().is_success(), "status {}", response.status());
    Ok(response.text().await?)
}

async fn resolve(discovery: &Discovery, server: &str) -> Result<Arc<parley_federation::discovery::Destination>, DiscoveryError> {
    tokio::time::timeout(T, discovery.resolve(&name(server))).await.expect("resolve did not hang")
}

#[tokio::test]
async fn srv_record_is_followed_and_certificate_is_for_the_server_name() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    let server = HttpsServer::start("127.0.0.1:0", ca.server_config(&["a.test"])?, "a", &[]).await?;
    let dead = closed_port()?;
    // Priority 10 beats 20; at equal priority the heavier record wins.
    dns.add_srv("_parley._tcp.a.test", 20, 100, dead, "fed-a.test").await?;
    dns.add_srv("_parley._tcp.a.test", 10, 1, dead, "fed-a.test").await?;
    dns.add_srv("_parley._tcp.a.test", 10, 50, server.port(), "fed-a.test").await?;
    dns.add_a("fed-a.test", LOCALHOST).await?;
    let discovery = Discovery::new(config(&dns, &ca, closed_port()?, dead)?)?;

    let destination = resolve(&discovery, "a.test").await?;
    assert_eq!(destination.method, Method::Srv);
    assert_eq!(destination.host, "a.test");
    assert_eq!(destination.port, server.port());
    assert_eq!(destination.addrs, vec![SocketAddr::new(LOCALHOST, server.port())]);
    assert_eq!(destination.base_url(), format!("https://a.test:{}", server.port()));
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("a a.test:{}", server.port()));
    let queries = dns.queries();
    assert!(queries.iter().any(|(n, t)| n == "_parley._tcp.a.test." && *t == RecordType::SRV), "{queries:?}");

    // Cached: the same destination, no new DNS query.
    let asked = dns.queries().len();
    let again = resolve(&discovery, "a.test").await?;
    assert!(Arc::ptr_eq(&destination, &again));
    assert_eq!(dns.queries().len(), asked);
    Ok(())
}

#[tokio::test]
async fn well_known_delegation_is_followed() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    let c_fed = HttpsServer::start("127.0.0.1:0", ca.server_config(&["c-fed.test"])?, "c", &[]).await?;
    let d_fed = HttpsServer::start("127.0.0.1:0", ca.server_config(&["d-fed.test"])?, "d", &[]).await?;
    let documents = [
        ("b.test", format!(r#"{{"server": "c-fed.test:{}"}}"#, c_fed.port())),
        ("b2.test", r#"{"server": "d-fed.test", "ignored": true}"#.to_owned()),
    ];
    let well_known = HttpsServer::start("127.0.0.2:0", ca.server_config(&["b.test", "b2.test"])?, "wk", &documents).await?;
    dns.add_a("b.test", "127.0.0.2".parse()?).await?;
    dns.add_a("b2.test", "127.0.0.2".parse()?).await?;
    dns.add_a("c-fed.test", LOCALHOST).await?;
    // Without a port, the delegated host's SRV record decides (TLS name: still the delegated host).
    dns.add_srv("_parley._tcp.d-fed.test", 0, 0, d_fed.port(), "machine-d.test").await?;
    dns.add_a("machine-d.test", LOCALHOST).await?;
    // A decoy that must not be used: b.test's own SRV record.
    dns.add_srv("_parley._tcp.b.test", 0, 0, closed_port()?, "b.test").await?;
    let discovery = Discovery::new(config(&dns, &ca, well_known.port(), closed_port()?)?)?;

    let destination = resolve(&discovery, "b.test").await?;
    assert_eq!(destination.method, Method::WellKnown);
    assert_eq!((destination.host.as_str(), destination.port), ("c-fed.test", c_fed.port()));
    assert_eq!(destination.addrs, vec![SocketAddr::new(LOCALHOST, c_fed.port())]);
    assert_eq!(destination.server_name, name("b.test"));
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("c c-fed.test:{}", c_fed.port()));

    let destination = resolve(&discovery, "b2.test").await?;
    assert_eq!(destination.method, Method::WellKnown);
    assert_eq!((destination.host.as_str(), destination.port), ("d-fed.test", d_fed.port()));
    assert_eq!(destination.addrs, vec![SocketAddr::new(LOCALHOST, d_fed.port())]);
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("d d-fed.test:{}", d_fed.port()));
    Ok(())
}

#[tokio::test]
async fn falls_back_to_address_records_on_the_default_port() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    // This server answers 404 for the well-known path, so discovery falls through.
    let server = HttpsServer::start("127.0.0.1:0", ca.server_config(&["e.test"])?, "e", &[]).await?;
    dns.add_a("e.test", LOCALHOST).await?;
    let discovery = Discovery::new(config(&dns, &ca, server.port(), server.port())?)?;

    let destination = resolve(&discovery, "e.test").await?;
    assert_eq!(destination.method, Method::Default);
    assert_eq!((destination.host.as_str(), destination.port), ("e.test", server.port()));
    assert_eq!(destination.addrs, vec![SocketAddr::new(LOCALHOST, server.port())]);
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("e e.test:{}", server.port()));
    let queries = dns.queries();
    assert!(queries.iter().any(|(n, _)| n == "_parley._tcp.e.test."), "SRV was asked first: {queries:?}");

    // After `forget`, discovery asks again and sees the new SRV record.
    let other = HttpsServer::start("127.0.0.1:0", ca.server_config(&["e.test"])?, "e2", &[]).await?;
    dns.add_srv("_parley._tcp.e.test", 0, 0, other.port(), "e.test").await?;
    assert_eq!(resolve(&discovery, "e.test").await?.method, Method::Default, "still cached");
    discovery.forget(&name("e.test"));
    let destination = resolve(&discovery, "e.test").await?;
    assert_eq!((destination.method, destination.port), (Method::Srv, other.port()));
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("e2 e.test:{}", other.port()));
    Ok(())
}

#[tokio::test]
async fn certificate_for_another_name_is_rejected() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    let server = HttpsServer::start("127.0.0.1:0", ca.server_config(&["other.test"])?, "other", &[]).await?;
    dns.add_a("f.test", LOCALHOST).await?;
    // The well-known request meets the wrong certificate too, and falls through.
    let discovery = Discovery::new(config(&dns, &ca, server.port(), server.port())?)?;

    let destination = resolve(&discovery, "f.test").await?;
    assert_eq!(destination.method, Method::Default);
    let client = discovery.client_builder().build()?;
    let error = tokio::time::timeout(T, client.get(format!("{}/hello", destination.base_url())).send())
        .await?
        .expect_err("certificate for other.test accepted for f.test");
    assert!(error.is_connect(), "{error:?}");
    assert!(format!("{error:?}").contains("NotValidForName"), "{error:?}");
    Ok(())
}

#[tokio::test]
async fn explicit_port_and_ip_literals_skip_well_known_and_srv() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    let server = HttpsServer::start("127.0.0.1:0", ca.server_config(&["g.test", "127.0.0.1"])?, "g", &[]).await?;
    dns.add_a("g.test", LOCALHOST).await?;
    dns.add_srv("_parley._tcp.g.test", 0, 0, closed_port()?, "g.test").await?;
    let discovery = Discovery::new(config(&dns, &ca, server.port(), closed_port()?)?)?;

    let destination = resolve(&discovery, &format!("g.test:{}", server.port())).await?;
    assert_eq!(destination.method, Method::ExplicitPort);
    assert_eq!((destination.host.as_str(), destination.port), ("g.test", server.port()));
    assert_eq!(destination.addrs, vec![SocketAddr::new(LOCALHOST, server.port())]);
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("g g.test:{}", server.port()));
    let queries = dns.queries();
    assert!(queries.iter().all(|(n, _)| n == "g.test."), "only g.test's addresses: {queries:?}");

    let asked = dns.queries().len();
    for (literal, ip, port) in
        [("127.0.0.1", "127.0.0.1", 7), ("127.0.0.1:5", "127.0.0.1", 5), ("[::1]", "::1", 7), ("[::1]:5", "::1", 5)]
    {
        let discovery = Discovery::new(config(&dns, &ca, server.port(), 7)?)?;
        let destination = resolve(&discovery, literal).await?;
        assert_eq!(destination.method, Method::Literal, "{literal}");
        assert_eq!((destination.host.as_str(), destination.port), (ip, port));
        assert_eq!(destination.addrs, vec![SocketAddr::new(ip.parse()?, port)]);
    }
    assert_eq!(dns.queries().len(), asked, "literals need no DNS");

    // The certificate is checked against the IP literal.
    let destination = resolve(&discovery, &format!("127.0.0.1:{}", server.port())).await?;
    assert_eq!(hello(&discovery, &destination.base_url()).await?, format!("g 127.0.0.1:{}", server.port()));
    Ok(())
}

#[tokio::test]
async fn name_without_records_fails_fast_and_failure_is_cached() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    let discovery = Discovery::new(config(&dns, &ca, closed_port()?, closed_port()?)?)?;

    let error = resolve(&discovery, "nothing.test").await.expect_err("no records");
    assert_eq!(error, DiscoveryError::NotFound { name: "nothing.test".into() });

    // The failure is cached: no new queries, even once the name exists...
    dns.add_a("nothing.test", LOCALHOST).await?;
    let asked = dns.queries().len();
    assert_eq!(resolve(&discovery, "nothing.test").await.expect_err("cached"), error);
    assert_eq!(dns.queries().len(), asked);
    // ...until the caller forgets it.
    discovery.forget(&name("nothing.test"));
    assert_eq!(resolve(&discovery, "nothing.test").await?.method, Method::Default);
    Ok(())
}

#[tokio::test]
async fn srv_target_dot_means_no_service() -> anyhow::Result<()> {
    let (dns, ca) = (TestDns::start().await?, Ca::new()?);
    dns.add_srv("_parley._tcp.h.test", 0, 0, 0, ".").await?;
    dns.add_a("h.test", LOCALHOST).await?;
    let discovery = Discovery::new(config(&dns, &ca, closed_port()?, closed_port()?)?)?;
    let error = resolve(&discovery, "h.test").await.expect_err("no service");
    assert_eq!(error, DiscoveryError::NoService { name: "_parley._tcp.h.test".into() });
    Ok(())
}

#[tokio::test]
async fn silent_dns_server_gives_a_timeout_not_a_hang() -> anyhow::Result<()> {
    let ca = Ca::new()?;
    // A socket that never answers.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let discovery = Discovery::new(DiscoveryConfig {
        nameservers: vec![silent.local_addr()?],
        well_known_port: closed_port()?,
        default_port: closed_port()?,
        timeout: Duration::from_millis(500),
        extra_roots: vec![ca.root()?],
    })?;
    let started = Instant::now();
    let error = resolve(&discovery, "silent.test").await.expect_err("nobody answers");
    assert!(matches!(error, DiscoveryError::Timeout { .. } | DiscoveryError::Dns { .. }), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    Ok(())
}
