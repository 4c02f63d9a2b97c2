//! The outbound HTTPS transport: signed requests to other homeservers, found by [`Discovery`].

use crate::discovery::{Discovery, DiscoveryError};
use crate::request::SignedParts;
use crate::ServerKey;
use parley_spec::endpoint::{Endpoint, Method};
use parley_spec::error::ErrorBody;
use parley_spec::federation::v1::keys::{GetServerKeys, ServerKeys};
use parley_spec::{ServerName, Timestamp};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest response body read from another server.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Why a request to another server failed.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The name could not be resolved.
    #[error("discovery: {0}")]
    Discovery(#[from] DiscoveryError),
    /// Connecting, TLS, or the exchange failed (retry later).
    #[error("transport: {0}")]
    Transport(String),
    /// The other server answered with an error.
    #[error("{status}: {}", body.as_ref().map(|b| b.message.as_str()).unwrap_or("no error body"))]
    Status {
        /// HTTP status.
        status: u16,
        /// The error body, when it is one of ours.
        body: Option<ErrorBody>,
    },
    /// The answer is not what the API promises.
    #[error("bad response: {0}")]
    BadResponse(String),
    /// The request could not be built (a path without its parameters: a bug, not retried).
    #[error("bad request: {0}")]
    Request(String),
}

impl FederationError {
    /// Whether retrying later may succeed (transport problems, 5xx, 429, and 401/403 which a
    /// key rotation or a changed access list can fix); 4xx about the request itself will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Discovery(_) | Self::Transport(_) | Self::BadResponse(_) => true,
            Self::Status { status, .. } => *status >= 500 || matches!(status, 401 | 403 | 404 | 408 | 429),
            Self::Request(_) => false,
        }
    }
}

/// Signs and sends requests to other servers.
#[derive(Clone)]
pub struct FederationClient {
    origin: ServerName,
    key: Arc<ServerKey>,
    discovery: Discovery,
    http: reqwest::Client,
    signing_clock: Arc<SigningClock>,
    turns: Arc<Turns>,
    timeout: Duration,
}

/// How many requests may be in flight to one destination at a time (and so how many
/// connections it gets from us): a burst of requests (every user's first message after a
/// restart asks for a remote user's devices) waits its turn on a few kept-alive connections
/// rather than opening a TLS connection each, which both servers pay for in CPU.
#[derive(Debug)]
struct Turns {
    per_destination: usize,
    destinations: Mutex<BTreeMap<ServerName, Arc<Semaphore>>>,
}

/// Destinations remembered before those with nothing in flight are forgotten.
const TURNS_KEPT: usize = 1024;

impl Turns {
    /// A turn for a request to `destination`, once one is free.
    async fn take(&self, destination: &ServerName) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut destinations = self.destinations.lock().unwrap_or_else(|e| e.into_inner());
            if destinations.len() >= TURNS_KEPT && !destinations.contains_key(destination) {
                destinations.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
            }
            destinations.entry(destination.clone()).or_insert_with(|| Arc::new(Semaphore::new(self.per_destination))).clone()
        };
        semaphore.acquire_owned().await.expect("the semaphore is never closed")
    }
}

/// The times requests are signed at: the wall clock in milliseconds, but never the same value
/// twice. The destination refuses a signature it has seen before (its replay cache), and two
/// identical requests signed in the same millisecond would carry the same signature.
#[derive(Debug, Default)]
struct SigningClock {
    last: std::sync::atomic::AtomicU64,
}

impl SigningClock {
    /// `now_ms`, or one more than the last time handed out if that is not earlier.
    fn next(&self, now_ms: u64) -> u64 {
        use std::sync::atomic::Ordering;
        let previous = self
            .last
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(now_ms.max(last.saturating_add(1))))
            .unwrap_or_else(|last| last);
        now_ms.max(previous.saturating_add(1))
    }
}

impl FederationClient {
    /// A client signing as `origin` with `key`; at most `per_destination` requests in flight
    /// to one destination (streamed responses not counted), the others wait their turn.
    pub fn new(
        origin: ServerName,
        key: Arc<ServerKey>,
        discovery: Discovery,
        timeout: Duration,
        per_destination: usize,
    ) -> Result<Self, FederationError> {
        let http = discovery
            .client_builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("parleyd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FederationError::Transport(e.to_string()))?;
        let turns = Arc::new(Turns { per_destination: per_destination.max(1), destinations: Mutex::default() });
        Ok(Self { origin, key, discovery, http, signing_clock: Arc::default(), turns, timeout })
    }

    /// The discovery in use.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// This server's name.
    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// Calls endpoint `E` (its method and path from its definition in `parley-spec`) of
    /// `destination`, with its path parameters `params` (each percent-encoded as one segment)
    /// and a JSON `body`; decodes its response.
    pub async fn call<E: Endpoint>(
        &self,
        destination: &ServerName,
        params: &[&str],
        body: Option<Vec<u8>>,
    ) -> Result<E::Response, FederationError>
    where
        E::Response: DeserializeOwned,
    {
        let path = endpoint_path::<E>(params)?;
        let method = match E::METHOD {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        };
        self.request(destination, method, &path, body).await
    }

    /// A signed request; `path_and_query` starts with `/`. Decodes a JSON answer.
    pub async fn request<T: DeserializeOwned>(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, FederationError> {
        let bytes = self.request_bytes(destination, method, path_and_query, body, true).await?;
        serde_json::from_slice(&bytes).map_err(|e| FederationError::BadResponse(e.to_string()))
    }

    /// The destination's key document (unsigned request, the document signs itself).
    pub async fn server_keys(&self, destination: &ServerName) -> Result<ServerKeys, FederationError> {
        let bytes = self.request_bytes(destination, reqwest::Method::GET, GetServerKeys::PATH, None, false).await?;
        serde_json::from_slice(&bytes).map_err(|e| FederationError::BadResponse(e.to_string()))
    }

    /// Sends a request, signed when `sign`; the response whatever its status.
    async fn send(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        sign: bool,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, FederationError> {
        let target = self.discovery.resolve(destination).await?;
        let url = format!("{}{}", target.base_url(), path_and_query);
        let body = body.unwrap_or_default();
        let mut request = self.http.request(method.clone(), &url);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if sign {
            let ts = Timestamp::from_millis(self.signing_clock.next(Timestamp::now().as_millis()));
            let parts = SignedParts::new(method.as_str(), path_and_query, &self.origin, destination, ts, &body);
            request = request.header(reqwest::header::AUTHORIZATION, parts.authorization(&self.key.key_id, &self.key.key));
        }
        if !body.is_empty() {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        match request.send().await {
            Ok(response) => Ok(response),
            Err(error) => {
                // The address may have changed: resolve again next time.
                self.discovery.forget(destination);
                Err(FederationError::Transport(error_chain(&error)))
            }
        }
    }

    /// A response's body, at most [`MAX_RESPONSE_BYTES`].
    async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, FederationError> {
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_RESPONSE_BYTES {
                        return Err(FederationError::BadResponse("response too large".into()));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(bytes),
                Err(error) => return Err(FederationError::Transport(error_chain(&error))),
            }
        }
    }

    async fn request_bytes(
        &self,
        destination: &ServerName,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        sign: bool,
    ) -> Result<Vec<u8>, FederationError> {
        // Waiting for a turn counts against the request's timeout.
        let exchange = async {
            let _turn = self.turns.take(destination).await;
            let response = self.send(destination, method, path_and_query, body, sign, None).await?;
            Self::read_body(Self::successful(response).await?).await
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(FederationError::Transport("timed out waiting for the destination".into())))
    }

    /// The response when its status is a success; otherwise its status and error body.
    async fn successful(response: reqwest::Response) -> Result<reqwest::Response, FederationError> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let bytes = Self::read_body(response).await?;
        Err(FederationError::Status { status, body: serde_json::from_slice(&bytes).ok() })
    }

    /// A signed `GET` of endpoint `E` whose answer is streamed (media): the response once its
    /// status is a success, for the caller to read chunk by chunk within `timeout` (which
    /// replaces the client's own, meant for small requests).
    pub async fn get_stream<E: Endpoint>(
        &self,
        destination: &ServerName,
        params: &[&str],
        timeout: Duration,
    ) -> Result<reqwest::Response, FederationError> {
        let path = endpoint_path::<E>(params)?;
        Self::successful(self.send(destination, reqwest::Method::GET, &path, None, true, Some(timeout)).await?).await
    }
}

/// The error and its causes on one line (reqwest hides the interesting part in `source()`).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The path of endpoint `E` with `params` filled in, each percent-encoded as one segment (the
/// same encoding the SDK uses, so signer and verifier see the same path).
pub fn endpoint_path<E: Endpoint>(params: &[&str]) -> Result<String, FederationError> {
    let segments = parley_spec::endpoint::segments::<E>(params).map_err(|e| FederationError::Request(e.to_string()))?;
    let mut url = url::Url::parse("http://path.invalid/").map_err(|e| FederationError::Request(e.to_string()))?;
    url.path_segments_mut().map_err(|()| FederationError::Request("no path".into()))?.pop_if_empty().extend(&segments);
    Ok(url.path().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_spec::federation::v1::transaction::{GetUserDevices, SendTransaction};

    #[test]
    fn endpoint_paths_fill_and_encode_each_parameter_as_one_segment() {
        assert_eq!(
            endpoint_path::<GetUserDevices>(&["@alice:b.test"]).unwrap(),
            "/_parley/federation/v1/users/@alice:b.test/devices"
        );
        assert_eq!(endpoint_path::<SendTransaction>(&["a/b?c d"]).unwrap(), "/_parley/federation/v1/send/a%2Fb%3Fc%20d");
        assert!(matches!(endpoint_path::<SendTransaction>(&[]), Err(FederationError::Request(_))));
    }

    #[test]
    fn no_two_requests_are_signed_at_the_same_time() {
        let clock = SigningClock::default();
        assert_eq!(clock.next(1_000), 1_000);
        assert_eq!(clock.next(1_000), 1_001, "the same millisecond again");
        assert_eq!(clock.next(1_000), 1_002);
        assert_eq!(clock.next(1_001), 1_003, "the wall clock is behind what was handed out");
        assert_eq!(clock.next(5_000), 5_000, "the wall clock moved on");
        assert_eq!(clock.next(4_000), 5_001, "the wall clock went back");
    }
}
