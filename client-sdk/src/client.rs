//! The unauthenticated [`Client`] (register, log in), the [`Session`] it hands out, and how
//! endpoint URLs are built from a base URL.

use crate::{error::Error, http, Api};
use parley_spec::{
    endpoint::{Endpoint, Method},
    v1::account::{Login, LoginRequest, Register, RegisterRequest, SessionResponse},
    v1::ws::WebSocket,
    DeviceId, Seq, UserId,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use url::Url;

/// An unauthenticated handle on a server: registers accounts and logs in devices.
///
/// Cheap to clone; clones share one HTTP connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    base_url: String,
    base: Url,
    http: reqwest::Client,
}

impl Client {
    /// A client for the server at `base_url` (`http://host:port` or `https://host`, optionally
    /// with a path prefix).
    pub fn new(base_url: &str) -> Result<Self, Error> {
        Ok(Self { base_url: base_url.to_owned(), base: parse_base(base_url)?, http: http::new_http_client()? })
    }

    /// The base URL, as given to [`Client::new`].
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/register`: creates an account and its first device.
    pub async fn register(&self, req: RegisterRequest) -> Result<Session, Error> {
        self.start_session::<Register>(&req).await
    }

    /// `POST /v1/login`: creates a new device with its own access token.
    pub async fn login(&self, req: LoginRequest) -> Result<Session, Error> {
        self.start_session::<Login>(&req).await
    }

    /// An authenticated API handle for `session` that shares this client's connection pool.
    pub fn api(&self, session: &Session) -> Result<Api, Error> {
        Api::with_http_client(session, self.http.clone())
    }

    async fn start_session<E: Endpoint<Response = SessionResponse>>(&self, body: &E::Request) -> Result<Session, Error>
    where
        E::Request: Serialize,
    {
        let url = url_of::<E>(&self.base, &[])?;
        let resp = self.http.request(method_of::<E>(), url).json(body).send().await?;
        let session: SessionResponse = http::decode(resp).await?;
        tracing::debug!(user_id = %session.user_id, device_id = %session.device_id, "session started");
        Ok(Session {
            base_url: self.base_url.clone(),
            user_id: session.user_id,
            device_id: session.device_id,
            access_token: session.access_token,
        })
    }
}

/// A logged-in device: what [`Api`] and [`Connection`](crate::Connection) need.
///
/// Serializable so an application can persist it; the serialized form contains the access
/// token, so store it like a password. `Debug` never prints the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The server's base URL, as given to [`Client::new`].
    pub base_url: String,
    /// The account.
    pub user_id: UserId,
    /// This device.
    pub device_id: DeviceId,
    access_token: String,
}

impl Session {
    /// Rebuilds a session from its parts (for example, from storage).
    pub fn new(base_url: impl Into<String>, user_id: UserId, device_id: DeviceId, access_token: impl Into<String>) -> Self {
        Self { base_url: base_url.into(), user_id, device_id, access_token: access_token.into() }
    }

    /// The bearer token for this device. Never log it.
    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    /// The parsed base URL.
    pub(crate) fn base(&self) -> Result<Url, Error> {
        parse_base(&self.base_url)
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("base_url", &self.base_url)
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("access_token", &"<redacted>")
            .finish()
    }
}

/// Parses and checks a base URL: absolute, `http` or `https`, with a host.
pub(crate) fn parse_base(base_url: &str) -> Result<Url, Error> {
    let mut url = Url::parse(base_url).map_err(|e| Error::InvalidUrl(format!("{base_url:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::InvalidUrl(format!("{base_url:?}: scheme must be http or https")));
    }
    if url.host_str().is_none_or(str::is_empty) || url.cannot_be_a_base() {
        return Err(Error::InvalidUrl(format!("{base_url:?}: no host")));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// `base` with `segments` appended as path segments (each percent-encoded as needed).
pub(crate) fn endpoint(base: &Url, segments: &[&str]) -> Result<Url, Error> {
    let mut url = base.clone();
    url.path_segments_mut().map_err(|()| Error::InvalidUrl(format!("{base}: cannot be a base")))?.pop_if_empty().extend(segments);
    Ok(url)
}

/// The URL of endpoint `E` under `base`, its path parameters filled in with `params` (each
/// percent-encoded as one segment).
pub(crate) fn url_of<E: Endpoint>(base: &Url, params: &[&str]) -> Result<Url, Error> {
    let segments = parley_spec::endpoint::segments::<E>(params).map_err(|e| Error::InvalidUrl(e.to_string()))?;
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    endpoint(base, &segments)
}

/// The HTTP method of endpoint `E`.
pub(crate) fn method_of<E: Endpoint>() -> reqwest::Method {
    match E::METHOD {
        Method::Get => reqwest::Method::GET,
        Method::Post => reqwest::Method::POST,
        Method::Put => reqwest::Method::PUT,
        Method::Delete => reqwest::Method::DELETE,
    }
}

/// The WebSocket URL: `ws://` for `http://`, `wss://` for `https://`, path `/v1/ws?since=N`.
pub(crate) fn ws_url(base: &Url, since: Seq) -> Result<Url, Error> {
    let mut url = url_of::<WebSocket>(base, &[])?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(Error::InvalidUrl(format!("{base}: unsupported scheme {other}"))),
    };
    url.set_scheme(scheme).map_err(|()| Error::InvalidUrl(format!("{base}: cannot switch to {scheme}")))?;
    url.query_pairs_mut().append_pair("since", &since.to_string());
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> Url {
        parse_base(s).unwrap()
    }

    #[test]
    fn endpoints_join_paths() {
        assert_eq!(endpoint(&base("http://h:8008"), &["v1", "login"]).unwrap().as_str(), "http://h:8008/v1/login");
        assert_eq!(endpoint(&base("http://h:8008/"), &["v1", "login"]).unwrap().as_str(), "http://h:8008/v1/login");
        assert_eq!(endpoint(&base("https://h/pre/"), &["v1", "whoami"]).unwrap().as_str(), "https://h/pre/v1/whoami");
        assert_eq!(endpoint(&base("https://h/pre"), &["v1", "whoami"]).unwrap().as_str(), "https://h/pre/v1/whoami");
    }

    #[test]
    fn user_ids_stay_readable_in_paths() {
        let url = endpoint(&base("http://h"), &["v1", "users", "@alice:example.org", "devices"]).unwrap();
        assert_eq!(url.as_str(), "http://h/v1/users/@alice:example.org/devices");
        let url = endpoint(&base("http://h"), &["v1", "presence", "a/b?c"]).unwrap();
        assert_eq!(url.path(), "/v1/presence/a%2Fb%3Fc");
    }

    #[test]
    fn websocket_urls() {
        assert_eq!(ws_url(&base("http://127.0.0.1:8008"), Seq::ZERO).unwrap().as_str(), "ws://127.0.0.1:8008/v1/ws?since=0");
        assert_eq!(
            ws_url(&base("https://chat.example.org/"), Seq::new(42)).unwrap().as_str(),
            "wss://chat.example.org/v1/ws?since=42"
        );
        assert_eq!(ws_url(&base("https://h:8448/p"), Seq::new(7)).unwrap().as_str(), "wss://h:8448/p/v1/ws?since=7");
    }

    #[test]
    fn bad_base_urls() {
        for bad in ["", "example.org", "ftp://h/", "mailto:x@y", "http://"] {
            assert!(matches!(parse_base(bad), Err(Error::InvalidUrl(_))), "{bad}");
        }
        assert_eq!(base("http://h/?q=1#f").as_str(), "http://h/");
    }

    #[test]
    fn session_debug_hides_token() {
        let s = Session::new("http://h/", UserId::parse("@a:h").unwrap(), DeviceId::parse("DEV").unwrap(), "secret-token");
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("secret-token"));
        assert!(dbg.contains("@a:h"));
        let json = serde_json::to_string(&s).unwrap();
        let back: Session = serde_json::from_str(&json).unwrap();
        assert_eq!(back.access_token(), "secret-token");
    }
}
