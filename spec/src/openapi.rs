//! The OpenAPI document of the client API and the federation API, generated from the types
//! and endpoint stubs of [`crate::v1`] and [`crate::federation::v1`]. The checked-in
//! `spec/openapi.json` must equal [`document_json`]; a test fails when it is stale
//! (`PARLEY_UPDATE_OPENAPI=1 cargo test -p parley-spec` rewrites it), and another when it does
//! not document exactly the endpoints of [`crate::endpoint`].

use crate::federation::v1 as fed;
use crate::v1;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley client and federation API", version = "1", description = "See spec/client-api.md and spec/federation.md for the prose, the WebSocket frames, request signatures and examples. Endpoints tagged `federation` are served to other homeservers on the federation listener."),
    paths(
        v1::account::register, v1::account::login, v1::account::logout, v1::account::whoami,
        v1::devices::list_devices, v1::devices::delete_device, v1::devices::user_devices,
        v1::messages::send_message, v1::messages::mark_read,
        v1::sync::sync,
        v1::presence::get_presence, v1::presence::subscribe_presence, v1::presence::list_subscriptions,
        v1::presence::set_privacy,
        v1::ws::websocket,
        v1::keys::upload_keys, v1::keys::put_device_list, v1::keys::get_device_list, v1::keys::claim_keys,
        v1::keypackages::upload_keypackages, v1::keypackages::claim_keypackages,
        v1::groups::create_group, v1::groups::group_send, v1::groups::group_events, v1::groups::list_groups,
        v1::media::get_media_config, v1::media::create_upload, v1::media::get_upload, v1::media::put_upload_part,
        v1::media::complete_upload, v1::media::download_media,
        v1::push::set_pusher, v1::push::get_pusher, v1::push::delete_pusher, v1::push::get_vapid_key,
        fed::transaction::send_transaction, fed::transaction::get_user_devices, fed::claim::claim_keys,
        fed::claim::claim_keypackages, fed::groups::submit_group_message,
        fed::keys::get_server_keys, fed::media::get_media,
    ),
    components(schemas(v1::ws::ClientFrame, v1::ws::ServerFrame, crate::ErrorCode)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
        // `Authorization: Parley origin=…,destination=…,key=…,ts=…,sig=…` (spec/federation.md).
        components.add_security_scheme(
            "server_signatures",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`Parley origin=\"…\",destination=\"…\",key=\"…\",ts=\"…\",sig=\"…\"`: the origin server's signature of the request (spec/federation.md)",
            ))),
        );
        // `?expires=…&sig=…` of an upload URL the server handed out (spec/media.md).
        components.add_security_scheme(
            "signed_url",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "sig",
                "the server's signature of an upload part URL it handed out, with its `expires` (spec/media.md)",
            ))),
        );
    }
}

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document as pretty JSON, with a trailing newline, exactly as checked in.
pub fn document_json() -> String {
    let mut json = document().to_pretty_json().expect("the OpenAPI document serializes"); // invariant: built from static types
    json.push('\n');
    json
}

#[cfg(test)]
mod tests {
    use crate::endpoint::{Auth, Metadata, Method};
    use std::collections::BTreeSet;

    /// (method, path, authentication) of every operation in the document.
    fn documented() -> BTreeSet<(Method, String, Auth)> {
        let mut found = BTreeSet::new();
        for (path, item) in super::document().paths.paths {
            let operations =
                [(Method::Get, &item.get), (Method::Post, &item.post), (Method::Put, &item.put), (Method::Delete, &item.delete)];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let schemes: Vec<String> = operation
                    .security
                    .iter()
                    .flatten()
                    .flat_map(|s| serde_json::to_value(s).ok())
                    .flat_map(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default())
                    .collect();
                let auth = match schemes.as_slice() {
                    [] => Auth::None,
                    [s] if s == "bearer" => Auth::AccessToken,
                    [s] if s == "server_signatures" => Auth::ServerSignatures,
                    [s] if s == "signed_url" => Auth::SignedUrl,
                    other => panic!("{path}: unexpected security {other:?}"),
                };
                found.insert((method, path.clone(), auth));
            }
        }
        found
    }

    #[test]
    fn openapi_documents_exactly_the_defined_endpoints() {
        let defined: BTreeSet<(Method, String, Auth)> = crate::endpoint::client_api()
            .into_iter()
            .chain(crate::endpoint::federation_api())
            .map(|Metadata { method, path, auth }| (method, path.to_owned(), auth))
            .collect();
        let documented = documented();
        let undocumented: Vec<_> = defined.difference(&documented).collect();
        let undefined: Vec<_> = documented.difference(&defined).collect();
        assert!(
            undocumented.is_empty(),
            "defined in crate::endpoint, not documented (or documented otherwise): {undocumented:?}"
        );
        assert!(undefined.is_empty(), "documented, not defined in crate::endpoint: {undefined:?}");
    }

    #[test]
    fn checked_in_openapi_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let generated = super::document_json();
        if std::env::var_os("PARLEY_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "spec/openapi.json is stale: run `PARLEY_UPDATE_OPENAPI=1 cargo test -p parley-spec` and commit it"
        );
    }
}
