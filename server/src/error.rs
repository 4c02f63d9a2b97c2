//! The one mapping from errors to HTTP responses: status + stable code + message. Internal
//! errors are logged with their cause and answered with a generic `internal`.

use crate::storage::StoreError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use parley_spec::error::DevicesMismatch;
use parley_spec::{ErrorBody, ErrorCode};
use std::time::Duration;

/// An error answered to a client.
#[derive(Debug)]
pub struct ApiError {
    /// What the client sees.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { body: ErrorBody::new(code, message) }
    }

    /// `rate_limited` with a retry time.
    pub fn rate_limited(wait: Duration) -> Self {
        let mut body = ErrorBody::new(ErrorCode::RateLimited, "too many requests");
        body.retry_after_ms = Some(wait.as_millis().max(1) as u64);
        Self { body }
    }

    /// `server_busy` (too many password hashes in progress) with a retry time.
    pub fn server_busy(wait: Duration) -> Self {
        let mut body = ErrorBody::new(ErrorCode::ServerBusy, "the server is busy; retry later");
        body.retry_after_ms = Some(wait.as_millis().max(1) as u64);
        Self { body }
    }

    /// `devices_mismatch` with the difference.
    pub fn devices_mismatch(mismatch: DevicesMismatch) -> Self {
        let mut body = ErrorBody::new(ErrorCode::DevicesMismatch, "the envelopes do not match the current devices");
        body.devices = Some(mismatch);
        Self { body }
    }

    /// A generic internal error; the cause is logged, not returned.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "internal server error")
    }

    /// The error code.
    pub fn code(&self) -> ErrorCode {
        self.body.code
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable => Self::new(ErrorCode::Unavailable, "storage is busy or shutting down; retry"),
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.body.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.body.retry_after_ms;
        let mut response = (status, axum::Json(self.body)).into_response();
        if let Some(ms) = retry {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
