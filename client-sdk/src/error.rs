//! The SDK's error type, and how non-2xx answers (HTTP or a refused WebSocket upgrade) become
//! [`Error::Server`] with a structured [`ErrorBody`].

use parley_spec::{ErrorBody, ErrorCode};
use std::time::Duration;
use tokio_tungstenite::tungstenite;

/// Everything that can go wrong when talking to a Parley server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP request could not be sent or its answer could not be read.
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The WebSocket could not be opened or failed.
    #[error("WebSocket error: {0}")]
    WebSocket(#[source] Box<tungstenite::Error>),
    /// The server answered with an error (any non-2xx status, a refused WebSocket upgrade, or
    /// an `error` frame answering a send).
    #[error("server error {status}: {}: {}", .body.code, .body.message)]
    Server {
        /// The HTTP status (for an `error` frame: the status that goes with its code).
        status: u16,
        /// The structured error.
        body: ErrorBody,
    },
    /// A successful answer did not have the expected JSON shape.
    #[error("unexpected response body: {0}")]
    Decode(#[from] serde_json::Error),
    /// The server broke the protocol (for example, the first frame was not `hello`).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection was closed (by [`Connection::close`](crate::Connection::close), because
    /// every handle was dropped, or because the server refused to let it reconnect).
    #[error("the connection is closed")]
    Closed,
    /// The operation needs a live WebSocket and there is none right now (typing notices are
    /// not queued while reconnecting).
    #[error("not connected")]
    NotConnected,
    /// The operation did not finish in time (see
    /// [`ConnectOptions::send_timeout`](crate::ConnectOptions::send_timeout)).
    #[error("timed out")]
    Timeout,
    /// The base URL is not an absolute `http://` or `https://` URL.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// The access token cannot be sent in an HTTP header.
    #[error("the access token is not a valid header value")]
    InvalidToken,
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] crate::e2ee::StoreError),
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => {
                let retry_after = resp.headers().get(tungstenite::http::header::RETRY_AFTER).and_then(|v| v.to_str().ok());
                let retry_after_ms = parse_retry_after(retry_after);
                let body = resp.body().as_deref().unwrap_or_default();
                server_error(resp.status().as_u16(), retry_after_ms, body)
            }
            other => Self::WebSocket(Box::new(other)),
        }
    }
}

impl Error {
    /// The server's error code, when the server answered with an error.
    pub fn server_code(&self) -> Option<ErrorCode> {
        self.body().map(|b| b.code)
    }

    /// The server's error body, when the server answered with an error.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            Self::Server { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The HTTP status, when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Server { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How long the server asked to wait before retrying (`rate_limited`, `server_busy`,
    /// `unavailable`).
    pub fn retry_after(&self) -> Option<Duration> {
        self.body().and_then(|b| b.retry_after_ms).map(Duration::from_millis)
    }

    /// Whether retrying the same operation later may succeed: transport failures, timeouts,
    /// `rate_limited`, `unavailable` and 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Http(_) | Self::WebSocket(_) | Self::Timeout | Self::NotConnected => true,
            Self::Server { status, body } => {
                *status >= 500 || matches!(body.code, ErrorCode::RateLimited | ErrorCode::Unavailable)
            }
            _ => false,
        }
    }

    /// An error answering a WebSocket frame, with the status that goes with its code.
    pub(crate) fn from_body(body: ErrorBody) -> Self {
        Self::Server { status: body.code.http_status(), body }
    }

    /// A copy for one more waiter: server errors are cloned, anything else becomes `Closed`.
    pub(crate) fn for_waiter(&self) -> Self {
        match self {
            Self::Server { status, body } => Self::Server { status: *status, body: body.clone() },
            Self::Timeout => Self::Timeout,
            _ => Self::Closed,
        }
    }

    /// Whether reconnecting after this error is pointless (the token was revoked, the device
    /// removed, or the configuration is wrong).
    pub(crate) fn is_fatal_for_reconnect(&self) -> bool {
        match self {
            Self::Server { status, .. } => matches!(status, 401 | 403),
            Self::InvalidUrl(_) | Self::InvalidToken => true,
            _ => false,
        }
    }
}

/// Builds [`Error::Server`] from a non-2xx answer. A body that is not an [`ErrorBody`] (a
/// proxy's HTML page, say) gets a code derived from the status. A `Retry-After` header fills
/// in `retry_after_ms` when the body has none.
pub(crate) fn server_error(status: u16, retry_after_ms: Option<u64>, body: &[u8]) -> Error {
    let mut body = serde_json::from_slice::<ErrorBody>(body)
        .unwrap_or_else(|_| ErrorBody::new(code_for_status(status), format!("HTTP status {status}")));
    if body.retry_after_ms.is_none() {
        body.retry_after_ms = retry_after_ms;
    }
    Error::Server { status, body }
}

/// Parses a `Retry-After` header given in seconds (the only form Parley uses) into ms.
pub(crate) fn parse_retry_after(value: Option<&str>) -> Option<u64> {
    let secs: u64 = value?.trim().parse().ok()?;
    Some(secs.saturating_mul(1000))
}

/// The error code assumed for a status whose body is not an [`ErrorBody`].
fn code_for_status(status: u16) -> ErrorCode {
    match status {
        400 => ErrorCode::BadRequest,
        401 => ErrorCode::UnknownToken,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        409 => ErrorCode::DevicesMismatch,
        413 => ErrorCode::TooLarge,
        429 => ErrorCode::RateLimited,
        502..=504 => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_body_is_kept() {
        let raw = br#"{"code":"rate_limited","message":"slow down","retry_after_ms":1500}"#;
        let err = server_error(429, Some(3000), raw);
        assert_eq!(err.status(), Some(429));
        assert_eq!(err.server_code(), Some(ErrorCode::RateLimited));
        assert_eq!(err.retry_after(), Some(Duration::from_millis(1500)));
        assert!(err.is_transient());
    }

    #[test]
    fn header_fills_missing_retry_after() {
        let raw = br#"{"code":"rate_limited","message":"slow down"}"#;
        let err = server_error(429, parse_retry_after(Some(" 2 ")), raw);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn unstructured_body_gets_code_from_status() {
        let err = server_error(502, None, b"<html>bad gateway</html>");
        assert_eq!(err.server_code(), Some(ErrorCode::Unavailable));
        assert!(err.is_transient());
        let err = server_error(401, None, b"");
        assert_eq!(err.server_code(), Some(ErrorCode::UnknownToken));
        assert!(err.is_fatal_for_reconnect());
        assert!(!err.is_transient());
    }

    #[test]
    fn retry_after_parsing() {
        assert_eq!(parse_retry_after(Some("3")), Some(3000));
        assert_eq!(parse_retry_after(Some("soon")), None);
        assert_eq!(parse_retry_after(None), None);
    }

    #[test]
    fn frame_errors_take_status_from_code() {
        let err = Error::from_body(ErrorBody::new(ErrorCode::DevicesMismatch, "x"));
        assert_eq!(err.status(), Some(409));
        assert_eq!(err.for_waiter().server_code(), Some(ErrorCode::DevicesMismatch));
        assert!(matches!(Error::Closed.for_waiter(), Error::Closed));
    }
}
