//! The DNS side of discovery: hickory with the configured name servers, the hosts file first.
//! It answers single lookups (A/AAAA, SRV) with their TTLs; which lookups to make, and in
//! which order, is the decision tree's business (`mod.rs`).

use super::{Addresses, DiscoveryConfig, DiscoveryError, Query, SrvAnswer, SrvRecord, MAX_CACHE};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::op::Query as DnsQuery;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{Hosts, TokioResolver};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// Hickory with the configured servers, the hosts file first. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Dns {
    resolver: TokioResolver,
    hosts: Arc<Hosts>,
    timeout: Duration,
}

impl Dns {
    /// The system's resolver when `config.nameservers` is empty, else those servers (UDP,
    /// then TCP); each lookup bounded by `config.timeout`.
    pub(crate) fn new(config: &DiscoveryConfig) -> Result<Self, DiscoveryError> {
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

    /// A/AAAA of `host` and until when they are valid: from the hosts file if it lists the
    /// name (either family), else DNS. Never an empty list.
    pub(crate) async fn lookup_ip(&self, host: &str) -> Result<(Vec<IpAddr>, Instant), DiscoveryError> {
        let name = fqdn(host)?;
        if let Some(found) = self.hosts_file(&name) {
            return Ok(found);
        }
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

    /// [`lookup_ip`](Self::lookup_ip) with a TTL.
    pub(crate) async fn ip(&self, host: &str) -> Result<Addresses, DiscoveryError> {
        let (ips, valid_until) = self.lookup_ip(host).await?;
        Ok(Addresses { ips, ttl: valid_until.saturating_duration_since(Instant::now()) })
    }

    /// Hickory consults the hosts file per record type, so a name listed only with IPv4 would
    /// still wait for a DNS AAAA answer; like the C library, let a listed name end the search.
    fn hosts_file(&self, name: &Name) -> Option<(Vec<IpAddr>, Instant)> {
        let mut ips = Vec::new();
        for record_type in [RecordType::AAAA, RecordType::A] {
            if let Some(lookup) = self.hosts.lookup_static_host(&DnsQuery::query(name.clone(), record_type)) {
                ips.extend(lookup.answers().iter().filter_map(|record| record.data.ip_addr()));
            }
        }
        (!ips.is_empty()).then(|| (ips, Instant::now() + MAX_CACHE))
    }

    /// The SRV records of `name`; `None` if there are none, or if the DNS server refuses or
    /// ignores the query type.
    pub(crate) async fn srv(&self, name: &str) -> Result<Option<SrvAnswer>, DiscoveryError> {
        let fqdn = fqdn(name)?;
        let lookup = match tokio::time::timeout(self.timeout, self.resolver.lookup(fqdn, RecordType::SRV)).await {
            // Some resolvers (Docker's, without upstream DNS) never answer SRV for names they
            // only know A records of: treat a timeout as "no SRV" and try the address records.
            Err(_) => {
                debug!(name, "SRV lookup timed out; trying address records");
                return Ok(None);
            }
            Ok(Err(NetError::Dns(e))) => {
                debug!(name, error = %e, "no SRV record");
                return Ok(None);
            }
            Ok(Err(e)) => return Err(dns_error(name, &e)),
            Ok(Ok(lookup)) => lookup,
        };
        let records: Vec<SrvRecord> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some(SrvRecord {
                    priority: srv.priority,
                    weight: srv.weight,
                    port: srv.port,
                    target: (!srv.target.is_root()).then(|| srv.target.to_ascii()),
                }),
                _ => None,
            })
            .collect();
        if records.is_empty() {
            return Ok(None);
        }
        Ok(Some(SrvAnswer { records, ttl: lookup.valid_until().saturating_duration_since(Instant::now()) }))
    }

    /// Drops the answers to `queries` from hickory's cache.
    pub(crate) fn forget(&self, queries: &[Query]) {
        for query in queries {
            let (name, types): (&str, &[RecordType]) = match query {
                Query::Ip(host) => (host, &[RecordType::A, RecordType::AAAA]),
                Query::Srv(name) => (name, &[RecordType::SRV]),
            };
            let Ok(name) = fqdn(name) else { continue };
            for record_type in types {
                self.resolver.clear_lookup_cache(name.clone(), *record_type);
            }
        }
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

/// `host` as an absolute DNS name, so that search domains are never appended.
fn fqdn(host: &str) -> Result<Name, DiscoveryError> {
    let mut name = Name::from_ascii(host.trim_end_matches('.'))
        .map_err(|e| DiscoveryError::Dns { name: host.to_owned(), reason: e.to_string() })?;
    name.set_fqdn(true);
    Ok(name)
}
