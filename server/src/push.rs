//! Push wake-ups (`spec/push.md`): when a message reaches a device that has no live connection,
//! the device's push endpoint gets a content-free wake-up (`{"v":1}`, encrypted to the device
//! with RFC 8291 when it registered keys; never a sender, a text or a count).
//!
//! The hub calls [`Push::wake`] from the writer's commit path: a map lookup and a channel send,
//! nothing that waits on a push service. One task ([`run`]) owns the schedule: a device's first
//! wake-up of a burst is due `delay_ms` later (and at least `min_interval_ms` after its last
//! push), further wake-ups before it is sent join it (one push per burst), a device that
//! connects meanwhile gets none. Pending wake-ups are recorded in the database and reloaded
//! at start, so they survive a restart. Failures are retried with exponential backoff; 404 and
//! 410 drop the registration. Sends run concurrently, each with a timeout, so a slow or dead
//! push service delays only its own devices' wake-ups.

use crate::config::PushConfig;
use crate::metrics::Metrics;
use crate::storage::{DevicePk, PushRow, Store};
use parley_crypto::push::PushKeys;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The wake-up's plaintext.
const WAKE_UP: &[u8] = b"{\"v\":1}";

/// A device's push endpoint, parsed.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Where to POST.
    pub endpoint: reqwest::Url,
    /// RFC 8291 keys, when the device registered them.
    pub keys: Option<PushKeys>,
}

enum Signal {
    /// A message reached the device while it had no connection.
    Wake(DevicePk),
    /// The device connected: a wake-up not sent yet is not needed.
    Connected(DevicePk),
}

/// The push service's handle: registrations in memory, and the channel to its task.
pub struct Push {
    registrations: RwLock<HashMap<DevicePk, Registration>>,
    signals: mpsc::UnboundedSender<Signal>,
    /// The VAPID public key (65 bytes, uncompressed).
    pub vapid_public_key: Vec<u8>,
}

impl std::fmt::Debug for Push {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Push").finish_non_exhaustive()
    }
}

/// Why an endpoint is refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not a URL, not https, too long, or with credentials.
    #[error("{0}")]
    Invalid(&'static str),
    /// A literal private, loopback or link-local address.
    #[error("the endpoint is a private address")]
    Private,
}

/// Checks a push endpoint: an `https` URL (`http` too when private addresses are allowed, for
/// tests and local push services), no credentials, and not a private address literal unless
/// `allow_private` (names are checked when they are resolved, by [`client`]).
pub fn parse_endpoint(text: &str, allow_private: bool) -> Result<reqwest::Url, EndpointError> {
    if text.len() > parley_spec::v1::push::MAX_ENDPOINT_LEN {
        return Err(EndpointError::Invalid("the endpoint is longer than 1000 bytes"));
    }
    let url = reqwest::Url::parse(text).map_err(|_| EndpointError::Invalid("the endpoint is not a URL"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_private => {}
        _ => return Err(EndpointError::Invalid("the endpoint must be an https URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Invalid("the endpoint may not carry credentials"));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err(EndpointError::Invalid("the endpoint has no host")),
    };
    if ip.is_some_and(|ip| !is_public(ip)) && !allow_private {
        return Err(EndpointError::Private);
    }
    Ok(url)
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, shared,
/// documentation, unspecified or multicast).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
                    || first == 0x2001 && v6.segments()[1] == 0x0db8)
            }
        },
    }
}

/// Resolves names to their public addresses only: a push endpoint may not reach into the
/// server's own network by a name that resolves to a private address.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.filter(|a| is_public(a.ip())).collect();
            if addresses.is_empty() {
                return Err(format!("{} has no public address", name.as_str()).into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The HTTP client of push sends: no redirects (a push service must not send us elsewhere),
/// a timeout, the extra trust roots, and only public addresses unless allowed.
pub fn client(config: &PushConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(config.request_timeout_ms))
        .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(10_000)))
        .user_agent(concat!("parleyd/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.extra_ca_file {
        for root in parley_federation::tls::extra_roots(path).map_err(|e| e.to_string())? {
            builder = builder.add_root_certificate(root);
        }
    }
    if !config.allow_private_addresses {
        builder = builder.dns_resolver(Arc::new(PublicOnly));
    }
    builder.build().map_err(|e| e.to_string())
}

impl Push {
    /// The handle and the receiving end for [`run`].
    fn new(vapid_public_key: Vec<u8>) -> (Self, mpsc::UnboundedReceiver<Signal>) {
        let (signals, receiver) = mpsc::unbounded_channel();
        (Self { registrations: RwLock::default(), signals, vapid_public_key }, receiver)
    }

    /// Called for each message committed for a device with no connection.
    pub fn wake(&self, device: DevicePk) {
        if self.registrations.read().unwrap_or_else(|e| e.into_inner()).contains_key(&device) {
            let _ = self.signals.send(Signal::Wake(device));
        }
    }

    /// Called when a device connects.
    pub fn connected(&self, device: DevicePk) {
        if self.registrations.read().unwrap_or_else(|e| e.into_inner()).contains_key(&device) {
            let _ = self.signals.send(Signal::Connected(device));
        }
    }

    /// Records a registration in memory (the caller stored it).
    pub fn register(&self, device: DevicePk, registration: Registration) {
        self.registrations.write().unwrap_or_else(|e| e.into_inner()).insert(device, registration);
    }

    /// Forgets a registration in memory (the caller deleted it).
    pub fn unregister(&self, device: DevicePk) {
        self.registrations.write().unwrap_or_else(|e| e.into_inner()).remove(&device);
    }

    /// Reads `device`'s registration again (another worker changed it).
    pub async fn reload(&self, store: &Store, device: DevicePk, allow_private: bool) {
        match store.pushers_of(device).await {
            Ok(Some(row)) => match registration_of(&row, allow_private) {
                Some(registration) => self.register(device, registration),
                None => self.unregister(device),
            },
            Ok(None) => self.unregister(device),
            Err(error) => tracing::warn!(%error, device, "reading a changed push registration failed"),
        }
    }

    fn registration(&self, device: DevicePk) -> Option<Registration> {
        self.registrations.read().unwrap_or_else(|e| e.into_inner()).get(&device).cloned()
    }
}

/// A stored registration, parsed (`None` when it no longer parses: it is skipped).
pub fn registration_of(row: &PushRow, allow_private: bool) -> Option<Registration> {
    let endpoint = parse_endpoint(&row.endpoint, allow_private).ok()?;
    let keys = match &row.keys {
        Some((p256dh, auth)) => Some(PushKeys::parse(p256dh, auth).ok()?),
        None => None,
    };
    Some(Registration { endpoint, keys })
}

/// What one send led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The push service took it.
    Sent,
    /// The endpoint is gone (404, 410): drop the registration.
    Gone,
    /// Try again later (network, timeout, 408, 429, 5xx), not before the service's
    /// `Retry-After` if it gave one (in seconds).
    Retry(Option<Duration>),
    /// Refused for good (other 4xx, a redirect): drop this wake-up.
    Refused,
}

/// How pushes are signed (RFC 8292).
struct Vapid {
    key: parley_crypto::push::VapidKey,
    subject: String,
}

impl Vapid {
    /// The `Authorization` header for a push to `endpoint`, valid 12 hours.
    fn authorization(&self, endpoint: &reqwest::Url) -> String {
        let exp = parley_spec::Timestamp::now().as_millis() / 1000 + 12 * 3600;
        let claims =
            parley_crypto::push::VapidClaims { aud: endpoint.origin().ascii_serialization(), exp, sub: self.subject.clone() };
        self.key.authorization(&claims)
    }
}

async fn send(client: &reqwest::Client, vapid: &Vapid, registration: &Registration, ttl_secs: u64) -> Outcome {
    let mut request = client
        .post(registration.endpoint.clone())
        .header(reqwest::header::AUTHORIZATION, vapid.authorization(&registration.endpoint))
        .header("TTL", ttl_secs.to_string())
        .header("Urgency", "high")
        .header("Topic", "parley-wake");
    request = match &registration.keys {
        Some(keys) => match keys.encrypt(WAKE_UP) {
            Ok(body) => request
                .header(reqwest::header::CONTENT_ENCODING, "aes128gcm")
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .body(body),
            Err(_) => return Outcome::Refused,
        },
        None => request.body(Vec::new()),
    };
    match request.send().await {
        Ok(response) => match response.status().as_u16() {
            200..=299 => Outcome::Sent,
            404 | 410 => Outcome::Gone,
            408 | 429 | 500..=599 => Outcome::Retry(retry_after(response.headers())),
            _ => Outcome::Refused,
        },
        Err(_) => Outcome::Retry(None),
    }
}

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A `Retry-After` header in seconds (RFC 9110 §10.2.3; the HTTP-date form is treated as
/// absent), at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// A device's wake-up to come.
#[derive(Debug, Clone, Copy)]
struct Due {
    at: Instant,
    attempts: u32,
    in_flight: bool,
}

/// Starts the push service: its handle (given to the hub and the API) and its task.
/// The task stops at shutdown (releasing the store); pending wake-ups stay recorded.
pub async fn start(
    store: Arc<Store>,
    config: PushConfig,
    metrics: Metrics,
    shutdown: tokio::sync::watch::Receiver<bool>,
    server_name: &parley_spec::ServerName,
    server_key: &parley_federation::ServerKey,
) -> Result<Arc<Push>, String> {
    let client = client(&config)?;
    let key = parley_crypto::push::VapidKey::derive(&server_key.key.seed());
    let (push, signals) = Push::new(key.public_key());
    let subject = match config.vapid_subject.as_str() {
        "" => format!("https://{}", server_name.host()),
        subject => subject.to_owned(),
    };
    let vapid = Arc::new(Vapid { key, subject });
    let push = Arc::new(push);
    for row in store.pushers().await.map_err(|e| e.to_string())? {
        if let Some(registration) = registration_of(&row, config.allow_private_addresses) {
            push.register(row.device, registration);
        }
    }
    let pending = store.pending_pushes().await.map_err(|e| e.to_string())?;
    let worker = Worker { push: push.clone(), store, config, metrics, client, vapid };
    tokio::spawn(worker.run(signals, pending, shutdown));
    Ok(push)
}

/// The retry delay after `attempts` failures: doubling from `retry_min_ms`, at most
/// `retry_max_ms`.
fn backoff(config: &PushConfig, attempts: u32) -> Duration {
    let factor = 1u64 << attempts.saturating_sub(1).min(20);
    Duration::from_millis(config.retry_min_ms.saturating_mul(factor).min(config.retry_max_ms))
}

/// What the push task works with.
struct Worker {
    push: Arc<Push>,
    store: Arc<Store>,
    config: PushConfig,
    metrics: Metrics,
    client: reqwest::Client,
    vapid: Arc<Vapid>,
}

impl Worker {
    async fn run(
        self,
        mut signals: mpsc::UnboundedReceiver<Signal>,
        pending: Vec<(DevicePk, u32)>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let Worker { push, store, config, metrics, client, vapid } = self;
        let now = Instant::now();
        let mut due: HashMap<DevicePk, Due> =
            pending.into_iter().map(|(device, attempts)| (device, Due { at: now, attempts, in_flight: false })).collect();
        let mut last_sent: HashMap<DevicePk, Instant> = HashMap::new();
        let (done_tx, mut done) = mpsc::unbounded_channel::<(DevicePk, Outcome)>();
        let delay = Duration::from_millis(config.delay_ms);
        let min_interval = Duration::from_millis(config.min_interval_ms);
        let stopping = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopping);
        loop {
            let next = due.values().filter(|d| !d.in_flight).map(|d| d.at).min();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut stopping => return,
                signal = signals.recv() => match signal {
                    None => return,
                    Some(Signal::Wake(device)) => {
                        if due.contains_key(&device) {
                            continue; // joins the wake-up already coming
                        }
                        let now = Instant::now();
                        let earliest = last_sent.get(&device).map_or(now, |sent| *sent + min_interval);
                        due.insert(device, Due { at: (now + delay).max(earliest), attempts: 0, in_flight: false });
                        if let Err(error) = store.add_pending_push(device).await {
                            tracing::warn!(%error, "recording a pending push failed");
                        }
                    }
                    Some(Signal::Connected(device)) => {
                        if due.get(&device).is_some_and(|d| !d.in_flight) {
                            due.remove(&device);
                            if let Err(error) = store.push_done(device).await {
                                tracing::warn!(%error, "forgetting a pending push failed");
                            }
                        }
                    }
                },
                () = sleep => {
                    let now = Instant::now();
                    for (device, entry) in due.iter_mut().filter(|(_, d)| !d.in_flight && d.at <= now) {
                        let Some(registration) = push.registration(*device) else {
                            let _ = done_tx.send((*device, Outcome::Refused));
                            entry.in_flight = true;
                            continue;
                        };
                        entry.in_flight = true;
                        let (client, done_tx, device, ttl) = (client.clone(), done_tx.clone(), *device, config.ttl_secs);
                        let vapid = vapid.clone();
                        tokio::spawn(async move {
                            let outcome = send(&client, &vapid, &registration, ttl).await;
                            let _ = done_tx.send((device, outcome));
                        });
                    }
                }
                Some((device, outcome)) = done.recv() => {
                    let result = match outcome {
                        Outcome::Sent => {
                            metrics.pushes_sent.inc();
                            due.remove(&device);
                            last_sent.insert(device, Instant::now());
                            store.push_done(device).await
                        }
                        Outcome::Gone => {
                            metrics.push_endpoints_gone.inc();
                            due.remove(&device);
                            push.unregister(device);
                            store.delete_pusher(device).await
                        }
                        Outcome::Refused => {
                            due.remove(&device);
                            store.push_done(device).await
                        }
                        Outcome::Retry(after) => {
                            metrics.push_failures.inc();
                            let entry = due.entry(device).or_insert(Due { at: Instant::now(), attempts: 0, in_flight: false });
                            entry.attempts += 1;
                            entry.in_flight = false;
                            if entry.attempts >= config.max_attempts {
                                due.remove(&device);
                                store.push_done(device).await
                            } else {
                                // The service's own delay wins over a shorter backoff.
                                let delay = backoff(&config, entry.attempts).max(after.unwrap_or_default());
                                entry.at = Instant::now() + delay;
                                store.push_failed(device).await
                            }
                        }
                    };
                    if let Err(error) = result {
                        tracing::warn!(%error, "recording a push outcome failed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_urls_to_public_addresses() {
        assert!(parse_endpoint("https://push.example.org/wake/abc", false).is_ok());
        assert!(matches!(parse_endpoint("http://push.example.org/x", false), Err(EndpointError::Invalid(_))));
        assert!(matches!(parse_endpoint("ftp://push.example.org/x", true), Err(EndpointError::Invalid(_))));
        assert!(matches!(parse_endpoint("https://user:pw@push.example.org/x", false), Err(EndpointError::Invalid(_))));
        assert!(matches!(parse_endpoint("not a url", false), Err(EndpointError::Invalid(_))));
        assert!(matches!(
            parse_endpoint(&format!("https://a.example/{}", "x".repeat(1000)), false),
            Err(EndpointError::Invalid(_))
        ));
        for private in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://192.168.0.1/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://169.254.169.254/x",
            "https://100.64.0.1/x",
            "https://[::ffff:10.0.0.1]/x",
        ] {
            assert!(matches!(parse_endpoint(private, false), Err(EndpointError::Private)), "{private}");
            assert!(parse_endpoint(private, true).is_ok(), "{private} when private addresses are allowed");
        }
        assert!(parse_endpoint("https://8.8.8.8/x", false).is_ok());
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(reqwest::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        headers.insert(reqwest::header::RETRY_AFTER, "99999999".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(reqwest::header::RETRY_AFTER, "Wed, 21 Oct 2026 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None, "a date is not honoured");
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_maximum() {
        let config = PushConfig { retry_min_ms: 100, retry_max_ms: 1000, ..PushConfig::default() };
        let delays: Vec<u64> = (1..=6).map(|n| backoff(&config, n).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }
}
