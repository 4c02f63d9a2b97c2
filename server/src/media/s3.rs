//! The S3 store's HTTP transport: object_store's S3 client over the reqwest client the server
//! already uses (rustls with ring), instead of object_store's own reqwest 0.13 stack with
//! aws-lc-rs. Bodies stream both ways; errors keep object_store's retry classes.

use axum::http;
use http_body_util::BodyExt as _;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};

/// object_store's HTTP client over reqwest 0.12.
#[derive(Debug, Clone)]
struct Reqwest(reqwest::Client);

/// A reqwest error in object_store's classes (which decide what is retried).
fn map_error(error: reqwest::Error) -> HttpError {
    use std::error::Error as _;
    let kind = if error.is_timeout() {
        HttpErrorKind::Timeout
    } else if error.is_connect() {
        HttpErrorKind::Connect
    } else if error.is_decode() {
        HttpErrorKind::Decode
    } else if error.is_body() || error.is_request() {
        // A connection cut mid-exchange may succeed on a retry.
        let mut kind = HttpErrorKind::Request;
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
                if matches!(io.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof) {
                    kind = HttpErrorKind::Interrupted;
                }
            }
            source = cause.source();
        }
        kind
    } else {
        HttpErrorKind::Unknown
    };
    HttpError::new(kind, error.without_url())
}

#[async_trait::async_trait]
impl HttpService for Reqwest {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = request.into_parts();
        let url = reqwest::Url::parse(&parts.uri.to_string()).map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        let mut outgoing = reqwest::Request::new(parts.method, url);
        *outgoing.headers_mut() = parts.headers;
        *outgoing.body_mut() = Some(match body.as_bytes() {
            Some(bytes) => reqwest::Body::from(bytes.clone()),
            None => reqwest::Body::wrap(body),
        });
        let response: http::Response<reqwest::Body> = self.0.execute(outgoing).await.map_err(map_error)?.into();
        let (parts, body) = response.into_parts();
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body.map_err(map_error))))
    }
}

/// Hands object_store the transport; plain `http://` endpoints only when `allow_http` (our
/// client would otherwise follow any scheme object_store builds URLs with).
#[derive(Debug, Clone)]
pub struct Connector {
    client: reqwest::Client,
}

impl Connector {
    /// A transport with connect and read timeouts (no total timeout: a large object streams
    /// for as long as it takes).
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .user_agent(concat!("parleyd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }
}

impl HttpConnector for Connector {
    fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Reqwest(self.client.clone())))
    }
}
