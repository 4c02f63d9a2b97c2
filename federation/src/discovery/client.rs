//! HTTPS clients that reach resolved destinations: a reqwest DNS resolver that answers the
//! `host` of every destination resolved so far with its addresses (so a URL names the host the
//! certificate is checked against, while the connection goes where discovery said), and plain
//! DNS for other names.

use super::cache::{lock, Cache};
use super::dns::Dns;
use super::{Destination, DiscoveryConfig};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Host name → addresses of resolved destinations, for [`ClientResolver`].
#[derive(Default)]
pub(crate) struct HostMap {
    entries: Mutex<Cache<String, Vec<SocketAddr>>>,
}

impl HostMap {
    /// Maps `destination.host` to its addresses until `expires`.
    pub(crate) fn insert(&self, destination: &Destination, expires: Instant) {
        lock(&self.entries).insert(destination.host.clone(), destination.addrs.clone(), expires, Instant::now());
    }

    pub(crate) fn remove(&self, host: &str) {
        lock(&self.entries).remove(&host.to_owned());
    }

    fn get(&self, host: &str) -> Option<Vec<SocketAddr>> {
        lock(&self.entries).get(&host.to_owned(), Instant::now()).map(|(addrs, _)| addrs.clone())
    }
}

/// reqwest's resolver: the host map first (if any), then DNS.
pub(crate) struct ClientResolver {
    pub(crate) dns: Dns,
    pub(crate) map: Option<Arc<HostMap>>,
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
                    let (ips, _) = dns.lookup_ip(&host).await?;
                    ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect()
                }
            };
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// HTTPS only, no redirects, no proxy, the configured timeout and extra roots, `resolver`.
pub(crate) fn http_client(config: &DiscoveryConfig, resolver: ClientResolver) -> reqwest::ClientBuilder {
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
