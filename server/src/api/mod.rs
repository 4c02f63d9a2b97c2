//! HTTP handlers of the client API, one module per area of `parley_spec::v1`. Handlers are
//! named `<verb>_<noun>` with a doc line `METHOD /path`.

pub mod account;
pub mod groups;
pub mod keypackages;
pub mod keys;
pub mod media;
pub mod messages;
pub mod presence;
pub mod push;

use crate::error::Error;
use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use parley_spec::ErrorCode;

/// A JSON body whose rejections become typed [`Error`]s.
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = Error;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(JsonRejection::BytesRejection(e)) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Error::new(ErrorCode::TooLarge, "request body too large"))
            }
            Err(rejection) => Err(Error::new(ErrorCode::BadJson, rejection.body_text())),
        }
    }
}

/// Parses a path or query parameter that must be a user id.
pub fn parse_user(text: &str) -> Result<parley_spec::UserId, Error> {
    text.parse().map_err(|e: parley_spec::IdError| Error::new(ErrorCode::BadRequest, e.to_string()))
}
