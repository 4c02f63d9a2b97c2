//! The well-known delegation document: fetching `https://<host>/.well-known/parley/server`
//! and parsing it. How long an answer (or a miss) is trusted is the decision tree's business
//! (`mod.rs`); this file reports the `Cache-Control: max-age` it saw and whether a miss came
//! from the server or from failing to reach it.

use parley_spec::ServerName;
use std::time::Duration;

/// Largest well-known body accepted.
const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;
/// The well-known path.
const WELL_KNOWN_PATH: &str = "/.well-known/parley/server";

/// A delegation found in a well-known document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WellKnown {
    /// The delegated server name.
    pub(crate) server: ServerName,
    /// `Cache-Control: max-age` of the answer, if it had one.
    pub(crate) max_age: Option<Duration>,
}

/// Why there is no well-known delegation; `answered` if the server said so (rather than being
/// unreachable), which is cached longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WellKnownMiss {
    /// The server answered (4xx, bad document, too large) rather than failing to.
    pub(crate) answered: bool,
    /// What happened, for the logs.
    pub(crate) reason: String,
}

impl WellKnownMiss {
    /// The server answered, without a delegation.
    pub(crate) fn answered(reason: impl ToString) -> Self {
        Self { answered: true, reason: reason.to_string() }
    }

    /// The server could not be reached, or failed (5xx).
    pub(crate) fn down(reason: impl ToString) -> Self {
        Self { answered: false, reason: reason.to_string() }
    }
}

/// Fetches well-known documents over HTTPS.
pub(crate) struct WellKnownClient {
    /// Resolves with plain DNS, never with the map of resolved destinations.
    pub(crate) client: reqwest::Client,
    /// The HTTPS port (443; tests change it).
    pub(crate) port: u16,
    /// Limit for the whole request.
    pub(crate) timeout: Duration,
}

impl WellKnownClient {
    /// `https://<host>:<port>/.well-known/parley/server`: the delegation, or why there is none.
    pub(crate) async fn fetch(&self, host: &str) -> Result<WellKnown, WellKnownMiss> {
        let url = format!("https://{host}:{}{WELL_KNOWN_PATH}", self.port);
        let request = async {
            let mut response = self.client.get(&url).send().await.map_err(WellKnownMiss::down)?;
            let status = response.status();
            if !status.is_success() {
                let reason = format!("HTTP status {status}");
                return Err(if status.is_server_error() { WellKnownMiss::down(reason) } else { WellKnownMiss::answered(reason) });
            }
            if response.content_length().is_some_and(|n| n > WELL_KNOWN_MAX_BYTES as u64) {
                return Err(WellKnownMiss::answered("body too large"));
            }
            let max_age = max_age(response.headers());
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(WellKnownMiss::down)? {
                if body.len() + chunk.len() > WELL_KNOWN_MAX_BYTES {
                    return Err(WellKnownMiss::answered("body too large"));
                }
                body.extend_from_slice(&chunk);
            }
            let server = parse_well_known(&body).map_err(WellKnownMiss::answered)?;
            Ok(WellKnown { server, max_age })
        };
        tokio::time::timeout(self.timeout, request).await.map_err(|_| WellKnownMiss::down("timed out"))?
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

/// `max-age` from a `Cache-Control` header. (Ten lines: not worth the `headers` crate, which
/// nothing else here needs.)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
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
    fn cache_max_age() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(max_age(&headers), None);
        headers.insert(reqwest::header::CACHE_CONTROL, "public, Max-Age=600".parse().unwrap());
        assert_eq!(max_age(&headers), Some(Duration::from_secs(600)));
        headers.insert(reqwest::header::CACHE_CONTROL, "no-store".parse().unwrap());
        assert_eq!(max_age(&headers), None);
    }
}
