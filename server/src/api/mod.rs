//! HTTP handlers of the client API, one module per area of `parley_spec::v1`. Handlers are
//! named `<verb>_<noun>` with a doc line `METHOD /path`.

pub mod account;
pub mod keys;
pub mod messages;
pub mod presence;

use crate::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use parley_spec::ErrorCode;

/// A JSON body whose rejections become typed [`ApiError`]s.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(JsonRejection::BytesRejection(e)) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(ErrorCode::TooLarge, "request body too large"))
            }
            Err(rejection) => Err(ApiError::new(ErrorCode::BadJson, rejection.body_text())),
        }
    }
}

/// Parses a path or query parameter that must be a user id.
pub fn parse_user(text: &str) -> Result<parley_spec::UserId, ApiError> {
    text.parse().map_err(|e: parley_spec::IdError| ApiError::new(ErrorCode::BadRequest, e.to_string()))
}
