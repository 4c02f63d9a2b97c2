//! The OpenAPI document of the client API, generated from the types and endpoint stubs of
//! [`crate::v1`]. The checked-in `spec/openapi.json` must equal [`document_json`]; a test fails
//! when it is stale (`PARLEY_UPDATE_OPENAPI=1 cargo test -p parley-spec` rewrites it).

use crate::v1;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "Parley client API", version = "1", description = "See spec/client-api.md for the prose, the WebSocket frames and examples."),
    paths(
        v1::account::register, v1::account::login, v1::account::logout, v1::account::whoami,
        v1::devices::list_devices, v1::devices::delete_device, v1::devices::user_devices,
        v1::messages::send_message, v1::messages::mark_read,
        v1::sync::sync,
        v1::presence::get_presence, v1::presence::subscribe_presence, v1::presence::list_subscriptions,
        v1::presence::set_privacy,
        v1::ws::websocket,
        v1::keys::upload_keys, v1::keys::put_device_list, v1::keys::get_device_list, v1::keys::claim_keys,
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
