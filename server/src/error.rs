//! The server's domain error, [`Error`], and its one mapping to the wire: [`Error::into_body`]
//! (the [`ErrorBody`] of an HTTP answer or of a WebSocket `error` frame) and `IntoResponse`
//! (status, body and `Retry-After`). Services say what happened; only this file decides what a
//! client sees. Internal errors are logged here, with their cause, when they are answered, and
//! the client gets a generic `internal`.

use crate::storage::StoreError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parley_federation::transport::FederationError;
use parley_spec::error::DevicesMismatch;
use parley_spec::{ErrorBody, ErrorCode, ServerName};
use std::time::Duration;

/// Why a request (HTTP, WebSocket frame, or an item of a federation transaction) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is refused for what it asks: bad input, forbidden, not found, too large…
    /// The code is the stable wire contract; the message is for humans.
    #[error("{code}: {message}")]
    Refused {
        /// What the client sees as `code`.
        code: ErrorCode,
        /// What the client sees as `message`.
        message: String,
    },
    /// Too many requests; the client may retry after `wait`.
    #[error("rate limited for {wait:?}")]
    RateLimited {
        /// How long until a request would be let through.
        wait: Duration,
    },
    /// Too many password hashes are in progress; the client may retry after `wait`.
    #[error("busy; retry after {wait:?}")]
    Busy {
        /// What the client is asked to wait.
        wait: Duration,
    },
    /// A send did not target exactly the current devices.
    #[error("the envelopes do not match the current devices")]
    DevicesMismatch(DevicesMismatch),
    /// Storage is busy or shutting down; the same request may succeed later.
    #[error("storage is busy or shutting down")]
    Unavailable,
    /// A group commit (or a message too old) for an epoch that is not the group's current one.
    #[error("epoch conflict: the group is at epoch {current}")]
    EpochConflict {
        /// The group's epoch at the hub.
        current: u64,
    },
    /// Another server (a group's hub) refused a request made on a client's behalf: its answer,
    /// passed on to the client as it is.
    #[error("{server} refused: {}", .body.message)]
    Relayed {
        /// The server that refused.
        server: ServerName,
        /// Its answer.
        body: Box<ErrorBody>,
    },
    /// Another server could not be used.
    #[error("{server}: {failure}")]
    Remote {
        /// The other server.
        server: ServerName,
        /// What went wrong with it.
        failure: RemoteFailure,
    },
    /// A bug or an unexpected failure on this server (the cause is logged, never answered).
    #[error("internal error: {0}")]
    Internal(Box<dyn std::error::Error + Send + Sync>),
}

/// What went wrong with another server.
#[derive(Debug, thiserror::Error)]
pub enum RemoteFailure {
    /// It could not be reached, or it failed (retry later).
    #[error("could not be reached: {0}")]
    Unreachable(Box<FederationError>),
    /// It answered, but not what was asked.
    #[error("{0}")]
    BadAnswer(&'static str),
    /// It refuses to federate with this server.
    #[error("refuses to federate with this server")]
    Denied,
}

/// Result of the server's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A refused request: `code` and a message for humans.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Refused { code, message: message.into() }
    }

    /// A bug or unexpected failure, keeping its cause (logged when it is answered).
    pub fn internal(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(cause.into())
    }

    /// Whether the fault is this server's (a bug, or storage busy or shutting down) rather than
    /// the request's: the same input may well succeed later, so a batch that hits it is
    /// abandoned as a whole instead of refusing the one item.
    pub fn is_server_failure(&self) -> bool {
        matches!(self, Self::Internal(_) | Self::Unavailable)
    }

    /// What the client sees: the body of an HTTP error answer or the payload of a WebSocket
    /// `error` frame. An internal error is logged here, with its cause.
    pub fn into_body(self) -> ErrorBody {
        match self {
            Self::Refused { code, message } => ErrorBody::new(code, message),
            Self::RateLimited { wait } => retry_after(ErrorBody::new(ErrorCode::RateLimited, "too many requests"), wait),
            Self::Busy { wait } => retry_after(ErrorBody::new(ErrorCode::ServerBusy, "the server is busy; retry later"), wait),
            Self::DevicesMismatch(mismatch) => {
                let mut body = ErrorBody::new(ErrorCode::DevicesMismatch, "the envelopes do not match the current devices");
                body.devices = Some(mismatch);
                body
            }
            Self::Unavailable => ErrorBody::new(ErrorCode::Unavailable, "storage is busy or shutting down; retry"),
            Self::EpochConflict { current } => {
                let mut body =
                    ErrorBody::new(ErrorCode::EpochConflict, format!("the group is at epoch {current}: catch up and retry"));
                body.current_epoch = Some(current);
                body
            }
            Self::Relayed { body, .. } => *body,
            Self::Remote { server, failure } => match failure {
                RemoteFailure::Unreachable(error) => {
                    ErrorBody::new(ErrorCode::RemoteUnavailable, format!("{server} could not be reached: {error}"))
                }
                RemoteFailure::BadAnswer(what) => ErrorBody::new(ErrorCode::RemoteUnavailable, format!("{server} {what}")),
                RemoteFailure::Denied => {
                    ErrorBody::new(ErrorCode::ServerDenied, format!("{server} refuses to federate with this server"))
                }
            },
            Self::Internal(cause) => {
                tracing::error!(error = %Chain(&*cause), "internal error");
                internal_body()
            }
        }
    }
}

/// `body` with a retry time of `wait` (at least 1 ms).
fn retry_after(mut body: ErrorBody, wait: Duration) -> ErrorBody {
    body.retry_after_ms = Some(wait.as_millis().max(1) as u64);
    body
}

/// The body of every internal error: no detail leaves the server.
pub fn internal_body() -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, "internal server error")
}

/// An error and its sources, `a: b: c`.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable => Self::Unavailable,
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        response(self.into_body())
    }
}

/// The HTTP answer carrying `body`: the status that goes with its code, and `Retry-After` (in
/// whole seconds, at least 1) when it has a retry time.
pub fn response(body: ErrorBody) -> Response {
    let status = StatusCode::from_u16(body.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry = body.retry_after_ms;
    let mut response = (status, axum::Json(body)).into_response();
    if let Some(ms) = retry {
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_spec::error::DeviceRef;

    /// Status, `Retry-After` and body of the HTTP answer to `error`.
    async fn answer(error: Error) -> (u16, Option<String>, ErrorBody) {
        let response = error.into_response();
        let status = response.status().as_u16();
        let retry = response.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn a_refusal_is_its_code_and_message() {
        let (status, retry, body) = answer(Error::new(ErrorCode::Forbidden, "not yours")).await;
        assert_eq!((status, retry), (403, None));
        assert_eq!(body, ErrorBody::new(ErrorCode::Forbidden, "not yours"));
        let (status, _, body) = answer(Error::new(ErrorCode::TooLarge, "too big")).await;
        assert_eq!((status, body.code), (413, ErrorCode::TooLarge));
    }

    #[tokio::test]
    async fn waits_become_retry_after_in_whole_seconds() {
        let (status, retry, body) = answer(Error::RateLimited { wait: Duration::from_millis(1500) }).await;
        assert_eq!((status, retry.as_deref()), (429, Some("2")));
        assert_eq!(
            (body.code, body.retry_after_ms, body.message.as_str()),
            (ErrorCode::RateLimited, Some(1500), "too many requests")
        );
        // Never zero: a wait below a millisecond is one, and Retry-After at least one second.
        let (_, retry, body) = answer(Error::RateLimited { wait: Duration::from_micros(10) }).await;
        assert_eq!((retry.as_deref(), body.retry_after_ms), (Some("1"), Some(1)));
        let (status, retry, body) = answer(Error::Busy { wait: Duration::from_secs(1) }).await;
        assert_eq!((status, retry.as_deref()), (503, Some("1")));
        assert_eq!((body.code, body.retry_after_ms), (ErrorCode::ServerBusy, Some(1000)));
    }

    #[tokio::test]
    async fn a_devices_mismatch_lists_the_difference() {
        let device = DeviceRef::new("@a:x.example".parse().unwrap(), parley_spec::DeviceId::parse("ABCDEFGHIJ").unwrap());
        let mismatch = DevicesMismatch::new(vec![device], Vec::new());
        let (status, retry, body) = answer(Error::DevicesMismatch(mismatch.clone())).await;
        assert_eq!((status, retry, body.code), (409, None, ErrorCode::DevicesMismatch));
        assert_eq!(body.devices, Some(mismatch));
    }

    #[tokio::test]
    async fn storage_unavailable_is_503_and_other_storage_errors_are_internal() {
        let (status, _, body) = answer(StoreError::Unavailable.into()).await;
        assert_eq!((status, body.code), (503, ErrorCode::Unavailable));
        let error = Error::from(StoreError::Conflict);
        assert!(matches!(error, Error::Internal(_)), "{error:?}");
        let (status, _, body) = answer(error).await;
        assert_eq!((status, body.code), (500, ErrorCode::Internal));
    }

    #[tokio::test]
    async fn remote_failures_say_which_server() {
        let unreachable = FederationError::Transport("connection refused".into());
        let error = Error::Remote {
            server: ServerName::parse("b.example").unwrap(),
            failure: RemoteFailure::Unreachable(Box::new(unreachable)),
        };
        let (status, _, body) = answer(error).await;
        assert_eq!((status, body.code), (502, ErrorCode::RemoteUnavailable));
        assert_eq!(body.message, "b.example could not be reached: transport: connection refused");
        let error = Error::Remote {
            server: ServerName::parse("b.example").unwrap(),
            failure: RemoteFailure::BadAnswer("answered for another user"),
        };
        let (status, _, body) = answer(error).await;
        assert_eq!(
            (status, body.code, body.message.as_str()),
            (502, ErrorCode::RemoteUnavailable, "b.example answered for another user")
        );
        let (status, _, body) =
            answer(Error::Remote { server: ServerName::parse("b.example").unwrap(), failure: RemoteFailure::Denied }).await;
        assert_eq!(
            (status, body.code, body.message.as_str()),
            (403, ErrorCode::ServerDenied, "b.example refuses to federate with this server")
        );
    }

    #[tokio::test]
    async fn an_internal_error_shows_nothing_of_its_cause() {
        let cause = std::io::Error::other("secret detail");
        let (status, retry, body) = answer(Error::internal(cause)).await;
        assert_eq!((status, retry), (500, None));
        assert_eq!(body, ErrorBody::new(ErrorCode::Internal, "internal server error"));
        assert_eq!(Error::internal("on a WebSocket too").into_body(), internal_body());
    }

    #[test]
    fn only_internal_and_unavailable_are_server_failures() {
        assert!(Error::internal("bug").is_server_failure());
        assert!(Error::Unavailable.is_server_failure());
        for error in [
            Error::new(ErrorCode::BadRequest, "bad"),
            Error::new(ErrorCode::UnknownUser, "who"),
            Error::RateLimited { wait: Duration::from_secs(1) },
            Error::Busy { wait: Duration::from_secs(1) },
            Error::DevicesMismatch(DevicesMismatch::new(Vec::new(), Vec::new())),
            Error::Remote { server: ServerName::parse("b.example").unwrap(), failure: RemoteFailure::Denied },
        ] {
            assert!(!error.is_server_failure(), "{error:?}");
        }
    }

    #[test]
    fn the_log_line_of_an_internal_error_has_its_whole_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading the inbox")]
        struct Outer(#[source] std::io::Error);
        let outer = Outer(std::io::Error::other("disk gone"));
        assert_eq!(Chain(&outer).to_string(), "reading the inbox: disk gone");
    }
}
