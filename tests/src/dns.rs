//! A real DNS server for tests: hickory-server on `127.0.0.1`, UDP and TCP on one OS-chosen port,
//! authoritative for `test.` from an in-memory zone the test changes while it runs. Unknown
//! names under `test.` get NXDOMAIN; names outside it are refused. Stops when dropped.

use anyhow::Context as _;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::rr::rdata::{SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use hickory_server::Server;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// TTL of the records the test adds.
pub const TTL: u32 = 60;
/// How long resolvers may cache "no such name" (the SOA minimum).
pub const NEGATIVE_TTL: u32 = 5;

/// A running DNS server; see the module docs.
pub struct TestDns {
    /// Where it listens (UDP and TCP): give it to the resolver under test.
    pub addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
    serial: AtomicU32,
    // Dropping the server aborts its tasks.
    _server: Server<QueryLog>,
}

impl TestDns {
    /// Starts a server with an empty `test.` zone (only its SOA).
    pub async fn start() -> anyhow::Result<Self> {
        let (udp, tcp) = bind_udp_and_tcp().await?;
        let addr = udp.local_addr()?;
        let origin = Name::from_ascii("test.")?;
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let soa =
            SOA::new(Name::from_ascii("ns.test.")?, Name::from_ascii("hostmaster.test.")?, 1, 3600, 600, 86400, NEGATIVE_TTL);
        anyhow::ensure!(zone.upsert_mut(Record::from_rdata(origin.clone(), TTL, RData::SOA(soa)), 1), "SOA not accepted");
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![zone.clone() as Arc<dyn ZoneHandler>]);
        let queries = Arc::new(Mutex::new(Vec::new()));
        let mut server = Server::new(QueryLog { catalog, queries: queries.clone() });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 32);
        Ok(Self { addr, zone, queries, serial: AtomicU32::new(2), _server: server })
    }

    /// Adds an A (IPv4) or AAAA (IPv6) record for `name` (`"b.test"`).
    pub async fn add_a(&self, name: &str, ip: IpAddr) -> anyhow::Result<()> {
        self.add(Record::from_rdata(fqdn(name)?, TTL, RData::from(ip))).await
    }

    /// Adds an SRV record: `name` is the full SRV name (`"_parley._tcp.b.test"`), `target` a host
    /// name (`"fed.b.test"`, or `"."` for "no service").
    pub async fn add_srv(&self, name: &str, priority: u16, weight: u16, port: u16, target: &str) -> anyhow::Result<()> {
        let srv = SRV::new(priority, weight, port, fqdn(target)?);
        self.add(Record::from_rdata(fqdn(name)?, TTL, RData::SRV(srv))).await
    }

    /// Removes every record of `name`.
    pub async fn remove(&self, name: &str) -> anyhow::Result<()> {
        let name = LowerName::new(&fqdn(name)?);
        self.zone.records_mut().await.retain(|key, _| key.name != name);
        Ok(())
    }

    /// Every query received so far: lower-case name with trailing dot, and type.
    pub fn queries(&self) -> Vec<(String, RecordType)> {
        self.queries.lock().map(|q| q.clone()).unwrap_or_default()
    }

    async fn add(&self, record: Record) -> anyhow::Result<()> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let description = format!("{} {}", record.name, record.record_type());
        anyhow::ensure!(self.zone.upsert(record, serial).await, "record not accepted: {description}");
        Ok(())
    }
}

/// `name` as an absolute DNS name (`"."` is the root).
fn fqdn(name: &str) -> anyhow::Result<Name> {
    let mut name = Name::from_ascii(name).with_context(|| format!("bad DNS name {name:?}"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A UDP socket and a TCP listener on the same loopback port (retried if the OS gave the UDP
/// port to us while someone else has it for TCP).
async fn bind_udp_and_tcp() -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let mut last_error = None;
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        match tokio::net::TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.map_or_else(|| anyhow::anyhow!("no port"), anyhow::Error::from)).context("binding UDP and TCP on one port")
}

/// The catalog, recording each query first.
struct QueryLog {
    catalog: Catalog,
    queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

// `RequestHandler` is an `#[async_trait]` trait; this is its expanded signature (the tests crate
// does not depend on `async-trait`), forwarding to the catalog's boxed future.
impl RequestHandler for QueryLog {
    fn handle_request<'life0, 'life1, 'async_trait, R, T>(
        &'life0 self,
        request: &'life1 Request,
        response_handle: R,
    ) -> Pin<Box<dyn Future<Output = ResponseInfo> + Send + 'async_trait>>
    where
        R: 'async_trait + ResponseHandler,
        T: 'async_trait + Time,
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        if let Ok(info) = request.request_info() {
            if let Ok(mut queries) = self.queries.lock() {
                queries.push((info.query.name().to_string().to_ascii_lowercase(), info.query.query_type()));
            }
        }
        self.catalog.handle_request::<R, T>(request, response_handle)
    }
}
