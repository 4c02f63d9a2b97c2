//! One typed definition per endpoint: its method, path and authentication next to its request
//! and response types, as ruma's `metadata!` does. The server's routers, the SDK's HTTP client
//! and the federation client all take the path from here, and a test checks that
//! `openapi.json` documents exactly these endpoints, so no copy of a path can drift.
//!
//! Each endpoint is a unit struct implementing [`Endpoint`], defined next to its types (for
//! example [`crate::v1::messages::SendMessage`]); [`client_api`] and [`federation_api`] list
//! them.

/// The HTTP method of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
}

impl Method {
    /// The method's name, upper case.
    pub const fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Auth {
    /// Anyone (registration, login, public keys).
    None,
    /// A device's access token (`Authorization: Bearer …`, or `access_token` in the query of
    /// the WebSocket upgrade).
    AccessToken,
    /// Another homeserver's request signature (`Authorization: Parley …`, see
    /// `spec/federation.md`).
    ServerSignatures,
    /// A URL the server signed and handed out (an upload part's `expires` and `sig` query
    /// parameters, see `spec/media.md`): the URL is its own authorization.
    SignedUrl,
}

/// An endpoint of the client or federation API.
pub trait Endpoint {
    /// Its method.
    const METHOD: Method;
    /// Its path, with `{name}` for each path parameter (axum's syntax).
    const PATH: &'static str;
    /// Who may call it.
    const AUTH: Auth;
    /// The JSON request body, or the query for a `GET` (`()` when there is none).
    type Request;
    /// The JSON response body (`()` when the answer has no body).
    type Response;
}

/// An endpoint's metadata as a value, for lists and checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Metadata {
    /// Its method.
    pub method: Method,
    /// Its path template.
    pub path: &'static str,
    /// Who may call it.
    pub auth: Auth,
}

impl Metadata {
    /// The metadata of `E`.
    pub const fn of<E: Endpoint>() -> Self {
        Metadata { method: E::METHOD, path: E::PATH, auth: E::AUTH }
    }
}

/// Defines an endpoint: a unit struct and its [`Endpoint`] implementation.
macro_rules! endpoint {
    ($(#[$doc:meta])* $name:ident: $method:ident $path:literal, $auth:ident, $request:ty => $response:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $name;

        impl $crate::endpoint::Endpoint for $name {
            const METHOD: $crate::endpoint::Method = $crate::endpoint::Method::$method;
            const PATH: &'static str = $path;
            const AUTH: $crate::endpoint::Auth = $crate::endpoint::Auth::$auth;
            type Request = $request;
            type Response = $response;
        }
    };
}
pub(crate) use endpoint;

/// A path template filled with parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The template has another number of `{…}` segments than parameters given.
    #[error("path {path} takes {expected} parameters, {given} given")]
    Arity {
        /// The template.
        path: &'static str,
        /// Its parameters.
        expected: usize,
        /// Parameters given.
        given: usize,
    },
}

/// The path segments of `E` (without the leading `/`), its `{…}` segments replaced by
/// `params` in order. Segments are not percent-encoded: URL builders do that per segment.
pub fn segments<E: Endpoint>(params: &[&str]) -> Result<Vec<String>, PathError> {
    let template = E::PATH.trim_start_matches('/');
    let expected = template.split('/').filter(|s| is_param(s)).count();
    if expected != params.len() {
        return Err(PathError::Arity { path: E::PATH, expected, given: params.len() });
    }
    let mut params = params.iter();
    Ok(template
        .split('/')
        .map(|segment| match is_param(segment) {
            true => params.next().map(|p| (*p).to_owned()).unwrap_or_default(),
            false => segment.to_owned(),
        })
        .collect())
}

fn is_param(segment: &str) -> bool {
    segment.starts_with('{') && segment.ends_with('}')
}

/// Every endpoint of the client API.
pub fn client_api() -> Vec<Metadata> {
    use crate::v1::{account, devices, groups, keypackages, keys, media, messages, presence, push, sync, ws};
    vec![
        Metadata::of::<account::Register>(),
        Metadata::of::<account::Login>(),
        Metadata::of::<account::Logout>(),
        Metadata::of::<account::WhoAmI>(),
        Metadata::of::<devices::ListDevices>(),
        Metadata::of::<devices::DeleteDevice>(),
        Metadata::of::<devices::UserDevices>(),
        Metadata::of::<messages::SendMessage>(),
        Metadata::of::<messages::MarkRead>(),
        Metadata::of::<sync::SyncEvents>(),
        Metadata::of::<presence::GetPresence>(),
        Metadata::of::<presence::SubscribePresence>(),
        Metadata::of::<presence::ListSubscriptions>(),
        Metadata::of::<presence::SetPrivacy>(),
        Metadata::of::<ws::WebSocket>(),
        Metadata::of::<keys::UploadKeys>(),
        Metadata::of::<keys::PutDeviceList>(),
        Metadata::of::<keys::GetDeviceList>(),
        Metadata::of::<keys::ClaimKeys>(),
        Metadata::of::<keypackages::UploadKeyPackages>(),
        Metadata::of::<keypackages::ClaimKeyPackages>(),
        Metadata::of::<groups::CreateGroup>(),
        Metadata::of::<groups::GroupSend>(),
        Metadata::of::<groups::GroupEvents>(),
        Metadata::of::<groups::ListGroups>(),
        Metadata::of::<media::GetMediaConfig>(),
        Metadata::of::<media::CreateUpload>(),
        Metadata::of::<media::GetUpload>(),
        Metadata::of::<media::PutUploadPart>(),
        Metadata::of::<media::CompleteUpload>(),
        Metadata::of::<media::DownloadMedia>(),
        Metadata::of::<push::SetPusher>(),
        Metadata::of::<push::GetPusher>(),
        Metadata::of::<push::DeletePusher>(),
        Metadata::of::<push::GetVapidKey>(),
    ]
}

/// Every endpoint of the federation API (served on the federation listener; the server key
/// document is served on both listeners).
pub fn federation_api() -> Vec<Metadata> {
    use crate::federation::v1::{claim, groups, keys, media, transaction};
    vec![
        Metadata::of::<transaction::SendTransaction>(),
        Metadata::of::<transaction::GetUserDevices>(),
        Metadata::of::<claim::ClaimKeys>(),
        Metadata::of::<claim::ClaimKeyPackages>(),
        Metadata::of::<groups::SubmitGroupMessage>(),
        Metadata::of::<keys::GetServerKeys>(),
        Metadata::of::<media::GetMedia>(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Example;
    impl Endpoint for Example {
        const METHOD: Method = Method::Get;
        const PATH: &'static str = "/v1/users/{user_id}/devices/{device_id}";
        const AUTH: Auth = Auth::AccessToken;
        type Request = ();
        type Response = ();
    }

    #[test]
    fn segments_fill_parameters_in_order() {
        assert_eq!(segments::<Example>(&["@a:b.test", "D1"]).unwrap(), ["v1", "users", "@a:b.test", "devices", "D1"]);
        assert_eq!(segments::<Example>(&["@a:b.test"]), Err(PathError::Arity { path: Example::PATH, expected: 2, given: 1 }));
    }

    #[test]
    fn paths_are_unique_per_method_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for endpoint in client_api().into_iter().chain(federation_api()) {
            assert!(endpoint.path.starts_with('/'), "{endpoint:?}");
            assert!(seen.insert((endpoint.method, endpoint.path)), "{endpoint:?} defined twice");
            for segment in endpoint.path.trim_start_matches('/').split('/') {
                assert!(!segment.is_empty(), "{endpoint:?} has an empty segment");
                assert!(is_param(segment) || !segment.contains(['{', '}']), "{endpoint:?}: {segment}");
            }
        }
    }
}
