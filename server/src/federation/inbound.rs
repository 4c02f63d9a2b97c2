//! The federation listener's router: `GET /_parley/key/v1`, and the signed endpoints
//! `PUT /_parley/federation/v1/send/{txn_id}`, `GET /_parley/federation/v1/users/{user_id}/devices`,
//! `POST /_parley/federation/v1/keys/claim`, `POST /_parley/federation/v1/keypackages/claim`,
//! `POST /_parley/federation/v1/groups/{group_id}/submit`.
//!
//! Every signed request goes through [`authenticate`] (handlers take the [`Signed`] extractor,
//! which calls it): scheme, destination, clock skew, the allow/deny lists, the origin's key and
//! signature, the per-origin rate limit (only proven origins are counted) and the replay cache,
//! in that order (cheap checks first; nothing is written before all pass).

use super::Federation;
use crate::app::on;
use crate::app::AppState;
use crate::error::{Error, Result};
use crate::messaging::to_bytes;
use crate::storage::{Effects, InboundItem, MessageRoutes, NewEvent, RemoteMessage};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::get;
use axum::RequestExt as _;
use axum::Router;
use bytes::Bytes;
use parley_federation::{Authorization, RequestAuthError};
use parley_spec::endpoint::Endpoint as _;
use parley_spec::error::DeviceRef;
use parley_spec::federation::v1::claim::{ClaimKeyPackages as FedClaimKeyPackages, ClaimKeys as FedClaimKeys, ClaimRequest};
use parley_spec::federation::v1::groups::{GroupSubmission, SubmitGroupMessage};
use parley_spec::federation::v1::keys::GetServerKeys;
use parley_spec::federation::v1::media::GetMedia;
use parley_spec::federation::v1::transaction::{
    GetUserDevices, Item, RejectedItem, SendTransaction, SignedMessage, Transaction, TransactionResponse, UserDevices,
    MAX_TXN_ITEMS,
};
use parley_spec::v1::events::{InboxEvent, MessageEvent};
use parley_spec::v1::keypackages::ClaimKeyPackagesResponse;
use parley_spec::v1::keys::{ClaimResponse, MAX_CLAIM_DEVICES};
use parley_spec::v1::ws::{ServerFrame, TypingNotice};
use parley_spec::{ErrorCode, ServerMsgId, ServerName, Timestamp, UserId};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The router of the federation listener.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.federation.max_txn_bytes * 2;
    Router::new()
        .route(SendTransaction::PATH, on(SendTransaction, send_transaction))
        .route(GetUserDevices::PATH, on(GetUserDevices, user_devices))
        .route(GetMedia::PATH, on(GetMedia, get_media))
        .route(FedClaimKeys::PATH, on(FedClaimKeys, claim_keys))
        .route(FedClaimKeyPackages::PATH, on(FedClaimKeyPackages, claim_keypackages))
        .route(
            SubmitGroupMessage::PATH,
            on(SubmitGroupMessage, submit_group_message)
                .layer(DefaultBodyLimit::max(state.config.limits.max_group_send_bytes() + 4096)),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .route(GetServerKeys::PATH, on(GetServerKeys, crate::app::server_keys))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { Error::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| crate::error::response(crate::error::internal_body())))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(
            |request: &Request| tracing::info_span!("federation", method = %request.method(), path = %request.uri().path()),
        ))
        .with_state(state)
}

/// A signed federation request whose origin is proven ([`authenticate`]), with its body
/// parsed as `T` (`bad_json` when it does not parse; [`NoBody`] for a GET). The body is read
/// first (`too_large` past the listener's limit), then authenticated, then parsed. Extract it
/// last: it consumes the body.
pub struct Signed<T> {
    /// The server that signed the request.
    pub origin: ServerName,
    /// The request body.
    pub body: T,
}

/// What the body of a signed request is parsed into.
pub trait SignedBody: Sized {
    /// Whether the request has a body; without one, the body is not read and the signature
    /// covers an empty body.
    const HAS_BODY: bool = true;

    /// Parses the body.
    fn parse(body: &[u8]) -> Result<Self>;
}

impl<T: serde::de::DeserializeOwned> SignedBody for T {
    fn parse(body: &[u8]) -> Result<Self> {
        serde_json::from_slice(body).map_err(|e| Error::new(ErrorCode::BadJson, e.to_string()))
    }
}

/// The body of a request that has none (GET).
pub struct NoBody;

impl SignedBody for NoBody {
    const HAS_BODY: bool = false;

    fn parse(_: &[u8]) -> Result<Self> {
        Ok(Self)
    }
}

impl<T: SignedBody + Send> FromRequest<AppState> for Signed<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &AppState) -> Result<Self> {
        let (parts, body) = request.with_limited_body().into_parts();
        let ConnectInfo(peer) =
            *parts.extensions.get::<ConnectInfo<SocketAddr>>().ok_or_else(|| Error::internal("no peer address"))?;
        let body = match T::HAS_BODY {
            true => axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(|_| Error::new(ErrorCode::TooLarge, "request body too large or unreadable"))?,
            false => Bytes::new(),
        };
        let origin = authenticate(state, peer.ip(), &parts.method, &parts.uri, &parts.headers, &body).await?;
        Ok(Self { origin, body: T::parse(&body)? })
    }
}

fn federation(state: &AppState) -> Result<&Arc<Federation>> {
    state.federation.as_ref().ok_or_else(|| Error::new(ErrorCode::NotFound, "federation is disabled on this server"))
}

fn auth_error(error: RequestAuthError) -> Error {
    let code = match error {
        RequestAuthError::Unsigned => ErrorCode::Unsigned,
        RequestAuthError::Malformed(_) => ErrorCode::BadAuthorization,
        RequestAuthError::WrongDestination => ErrorCode::WrongDestination,
        RequestAuthError::Stale => ErrorCode::StaleRequest,
        RequestAuthError::BadSignature => ErrorCode::BadSignature,
    };
    Error::new(code, error.to_string())
}

/// Why a signed request was refused, and whether that counts against the address it came from.
#[derive(Debug)]
enum AuthFailure {
    /// The request does not prove its origin (unsigned, malformed, misdirected, stale, unknown
    /// key, bad signature, replayed) or its origin is not one we federate with: counts.
    Failed(Error),
    /// Refused although it may be genuine (federation is off, the origin's rate limit): does
    /// not count.
    Refused(Error),
}

impl From<RequestAuthError> for AuthFailure {
    fn from(error: RequestAuthError) -> Self {
        Self::Failed(auth_error(error))
    }
}

/// Checks a signed request from `peer`; returns the authenticated origin. An address whose
/// requests keep failing is refused for a while (before any key fetch it could trigger).
pub async fn authenticate(
    state: &AppState,
    peer: IpAddr,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ServerName> {
    let fed = federation(state)?;
    fed.check_not_blocked(peer)?;
    match verify_request(state, method, uri, headers, body).await {
        Ok(origin) => Ok(origin),
        Err(AuthFailure::Failed(error)) => {
            fed.auth_failed(peer, &state.metrics);
            Err(error)
        }
        Err(AuthFailure::Refused(error)) => Err(error),
    }
}

async fn verify_request(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ServerName, AuthFailure> {
    let fed = federation(state).map_err(AuthFailure::Refused)?;
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(RequestAuthError::Unsigned)?
        .to_str()
        .map_err(|_| RequestAuthError::Malformed("not ASCII"))?;
    let auth = Authorization::parse(header)?;
    let skew = fed.config().max_clock_skew_ms;
    auth.check_envelope(&state.server_name, Timestamp::now(), skew)?;
    fed.check_allowed(&auth.origin).map_err(AuthFailure::Failed)?;
    let key = fed.origin_key(&auth.origin, &auth.key_id, auth.ts).await.map_err(AuthFailure::Failed)?;
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    auth.verify(method.as_str(), path_and_query, body, &key)?;
    // Counted only once the origin is proven: forged requests must not use up its budget.
    fed.check_rate(&auth.origin, &state.metrics).map_err(AuthFailure::Refused)?;
    // Only a correctly signed request can be a replay; remember it until it would be stale.
    if !fed.replays.first_sight(&auth.signature, auth.ts.saturating_add(Duration::from_millis(skew))) {
        let error = Error::new(ErrorCode::ReplayedRequest, "this signed request was already received");
        return Err(AuthFailure::Failed(error));
    }
    // The origin is up: whatever we queued for it goes out now instead of after the backoff.
    fed.sender.contacted_by(&auth.origin);
    Ok(auth.origin)
}

/// POST /_parley/federation/v1/groups/{group_id}/submit
async fn submit_group_message(
    State(state): State<AppState>,
    Path(group_id): Path<String>,
    Signed { origin, body }: Signed<GroupSubmission>,
) -> Result<axum::Json<parley_spec::v1::groups::GroupSentResponse>> {
    let group_id = parley_spec::GroupId::parse(&group_id).map_err(|e| Error::new(ErrorCode::BadRequest, e.to_string()))?;
    require_origin(&body.sender, &origin, "sender")?;
    if group_id.hub() != state.server_name {
        return Err(Error::new(ErrorCode::UnknownGroup, format!("this server is not the hub of {group_id}")));
    }
    crate::groups::hub_submit(&state, &body.sender, &body.sender_device, &group_id, body.request).await.map(axum::Json)
}

/// PUT /_parley/federation/v1/send/{txn_id}
async fn send_transaction(
    State(state): State<AppState>,
    Path(txn_id): Path<String>,
    Signed { origin, body: txn }: Signed<Transaction>,
) -> Result<axum::Json<TransactionResponse>> {
    if txn_id.is_empty() || txn_id.len() > 128 || txn_id.chars().any(char::is_control) {
        return Err(Error::new(ErrorCode::BadRequest, "txn_id must be 1 to 128 characters, none of them a control character"));
    }
    if txn.origin != origin {
        return Err(Error::new(ErrorCode::Forbidden, "the transaction's origin is not the signing server"));
    }
    if txn.items.len() > MAX_TXN_ITEMS {
        return Err(Error::new(ErrorCode::TooLarge, format!("at most {MAX_TXN_ITEMS} items per transaction")));
    }
    let fed = federation(&state)?;
    let count = txn.items.len();
    let mut items = Vec::with_capacity(count);
    // Receipts name only messages their sender sent to their author: the routes of all the
    // messages the transaction's receipts name, in one query.
    let receipt_ids: Vec<ServerMsgId> = txn
        .items
        .iter()
        .filter_map(|item| match item {
            Item::Receipt(receipt) if receipt.message_ids.len() <= parley_spec::v1::messages::MAX_READ_IDS => {
                Some(receipt.message_ids.iter().copied())
            }
            _ => None,
        })
        .flatten()
        .collect();
    let routes = if receipt_ids.is_empty() { MessageRoutes::default() } else { state.store.message_routes(&receipt_ids).await? };
    let mut after_commit: Vec<Item> = Vec::new();
    let mut response = TransactionResponse::default();
    for (index, item) in txn.items.into_iter().enumerate() {
        // A message applies once per (origin, id), whichever transaction carries it.
        let message = match &item {
            Item::Message(message) => Some((Arc::from(message.origin.as_str()), message.id)),
            _ => None,
        };
        let mut effects = Effects::default();
        match apply_item(&state, fed, &origin, item, &routes, &mut effects, &mut after_commit).await {
            Ok(()) => items.push(InboundItem { message, effects }),
            // This server failed, not the item: the whole transaction is retried later.
            Err(error) if error.is_server_failure() => return Err(error),
            Err(error) => {
                tracing::debug!(%origin, index, %error, "item rejected");
                let body = error.into_body();
                response.rejected.push(RejectedItem::new(index, body.code, body.message));
            }
        }
    }
    let new = state.store.apply_inbound(&origin, &txn_id, items).await?;
    if new {
        state.metrics.federation_items_received.inc_by(count as u64);
        for item in after_commit {
            deliver_ephemeral(&state, item).await;
        }
    }
    Ok(axum::Json(response))
}

fn require_origin(user: &UserId, origin: &ServerName, what: &str) -> Result<()> {
    if user.server() != origin.as_str() {
        return Err(Error::new(ErrorCode::Forbidden, format!("{what} {user} is not a user of the sending server {origin}")));
    }
    Ok(())
}

async fn local_user(state: &AppState, user: &UserId) -> Result<Arc<crate::directory::UserEntry>> {
    state.directory.user(user).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, format!("no user {user} here")))
}

async fn apply_item(
    state: &AppState,
    fed: &Federation,
    origin: &ServerName,
    item: Item,
    routes: &MessageRoutes,
    effects: &mut Effects,
    after_commit: &mut Vec<Item>,
) -> Result<()> {
    match item {
        Item::Message(message) => {
            let (events, received) = message_events(state, fed, origin, message).await?;
            effects.events.extend(events);
            effects.received.push(received);
        }
        Item::Receipt(mut receipt) => {
            require_origin(&receipt.by, origin, "receipt author")?;
            if receipt.message_ids.is_empty() || receipt.message_ids.len() > parley_spec::v1::messages::MAX_READ_IDS {
                return Err(Error::new(ErrorCode::BadRequest, "a receipt names 1 to 1,000 messages (MAX_READ_IDS)"));
            }
            let sender = local_user(state, &receipt.sender).await?;
            // Delivered or read, only for messages `sender` sent to `by` (other ids are dropped).
            receipt.message_ids = routes.sent(&receipt.message_ids, sender.pk, &receipt.by);
            if receipt.message_ids.is_empty() {
                return Err(Error::new(
                    ErrorCode::BadRequest,
                    format!("none of the receipt's messages is one {} sent to {}", receipt.sender, receipt.by),
                ));
            }
            let payload = to_bytes(&InboxEvent::Receipt(receipt))?;
            effects.events.extend(sender.devices.iter().map(|(device, _)| NewEvent {
                device: *device,
                origin: None,
                payload: payload.clone(),
            }));
        }
        Item::Typing(typing) => {
            require_origin(&typing.from, origin, "typing user")?;
            local_user(state, &typing.to).await?;
            after_commit.push(Item::Typing(typing));
        }
        Item::Presence(presence) => {
            require_origin(&presence.presence.user, origin, "presence of")?;
            after_commit.push(Item::Presence(presence));
        }
        Item::PresenceSubscription(subscription) => {
            require_origin(&subscription.subscriber, origin, "subscriber")?;
            crate::presence::remote_subscription(state, subscription).await?;
        }
        Item::DeviceListChanged(changed) => {
            require_origin(&changed.user, origin, "user")?;
            fed.cache_devices(&changed.user, None);
            state.store.forget_remote_devices(&changed.user).await?;
        }
        // Stored at once (idempotent by position), before the transaction is recorded.
        Item::GroupMessage(item) => crate::groups::receive(state, origin, item).await?,
        Item::GroupReceipts(receipts) => crate::groups::receive_receipts(state, origin, receipts).await?,
        _ => return Err(Error::new(ErrorCode::BadRequest, "unknown item type")),
    }
    Ok(())
}

/// A message: turns it into inbox events for the recipient's devices (envelopes for devices
/// that no longer exist are dropped) and the record that its sender wrote to the recipient
/// (what the recipient's read markers are checked against). When another server relays it,
/// its origin signature is required and checked; from its origin itself, the request signature
/// (over the whole body) already proves who wrote it, and the message carries none.
async fn message_events(
    state: &AppState,
    fed: &Federation,
    sent_by: &ServerName,
    message: SignedMessage,
) -> Result<(Vec<NewEvent>, RemoteMessage)> {
    require_origin(&message.sender, &message.origin, "sender")?;
    fed.check_allowed(&message.origin)?;
    let limits = &state.config.limits;
    if message.envelopes.len() > limits.max_devices_per_user {
        return Err(Error::new(ErrorCode::TooLarge, "more envelopes than a user may have devices"));
    }
    // Ids are stored as SQLite integers: one beyond them is no id a server assigns.
    if i64::try_from(message.id).is_err() {
        return Err(Error::new(ErrorCode::BadRequest, "message id out of range"));
    }
    if message.envelopes.iter().any(|e| e.ciphertext.0.len() > limits.max_envelope_bytes) {
        return Err(Error::new(ErrorCode::TooLarge, format!("an envelope exceeds {} bytes", limits.max_envelope_bytes)));
    }
    if &message.origin != sent_by {
        if message.signature.is_empty() {
            return Err(Error::new(ErrorCode::BadSignature, "a relayed message must carry its origin's signature"));
        }
        let key = fed.origin_key(&message.origin, &message.key_id, message.ts).await?;
        parley_federation::message::verify_message(&message, &key)
            .map_err(|_| Error::new(ErrorCode::BadSignature, "the message's origin signature does not verify"))?;
    }
    let recipient = local_user(state, &message.to).await?;
    let sender: Arc<str> = Arc::from(message.sender.as_str());
    let mut events = Vec::with_capacity(message.envelopes.len());
    for envelope in message.envelopes {
        let Some((device, _)) = recipient.devices.iter().find(|(_, id)| *id == envelope.device) else { continue };
        let event = InboxEvent::Message(MessageEvent::new(
            message.id,
            message.sender.clone(),
            message.sender_device.clone(),
            message.to.clone(),
            message.ts,
            envelope.ciphertext.0,
        ));
        events.push(NewEvent { device: *device, origin: Some((sender.clone(), message.id)), payload: to_bytes(&event)? });
    }
    Ok((events, RemoteMessage { recipient: recipient.pk, sender, id: message.id }))
}

async fn deliver_ephemeral(state: &AppState, item: Item) {
    match item {
        Item::Typing(typing) => {
            let Ok(Some(peer)) = state.directory.user(&typing.to).await else { return };
            let Ok(frame) = to_bytes(&ServerFrame::Typing(TypingNotice::new(typing.from, typing.typing))) else { return };
            for (device, _) in &peer.devices {
                state.hub.send_ephemeral(*device, frame.clone());
            }
        }
        Item::Presence(presence) => crate::presence::deliver_remote(state, presence).await,
        _ => {}
    }
}

/// GET /_parley/federation/v1/media/{media_id}: a file stored here, whole, for the origin's users.
async fn get_media(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Signed { origin: _, body: NoBody }: Signed<NoBody>,
) -> Result<axum::response::Response> {
    let sha256 = parley_spec::v1::media::parse_media_id(&id)
        .ok_or_else(|| Error::new(ErrorCode::BadRequest, "a media id is 64 lowercase hex digits"))?;
    crate::api::media::serve(&state, &sha256, &id, None, None).await
}

/// GET /_parley/federation/v1/users/{user_id}/devices
async fn user_devices(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Signed { origin, body: NoBody }: Signed<NoBody>,
) -> Result<axum::Json<UserDevices>> {
    let user_id = crate::api::parse_user(&user_id)?;
    let entry = local_user(&state, &user_id).await?;
    let device_list = match state.store.device_list(entry.pk).await? {
        Some(json) => Some(serde_json::from_slice(&json).map_err(Error::internal)?),
        None => None,
    };
    // The origin hears when these change.
    state.store.add_device_list_watcher(entry.pk, &origin).await?;
    let devices = entry.devices.iter().map(|(_, id)| id.clone()).collect();
    Ok(axum::Json(UserDevices::new(user_id, devices, device_list)))
}

/// POST /_parley/federation/v1/keys/claim
async fn claim_keys(
    State(state): State<AppState>,
    Signed { origin, body: request }: Signed<ClaimRequest>,
) -> Result<axum::Json<ClaimResponse>> {
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(Error::new(ErrorCode::BadRequest, format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    require_origin(&request.requester, &origin, "requester")?;
    let (local, foreign): (Vec<DeviceRef>, Vec<DeviceRef>) =
        request.devices.into_iter().partition(|d| d.user.is_of(&state.server_name));
    let mut response = crate::api::keys::claim_local(&state, local, Some((&origin, &request.requester))).await?;
    response.missing.extend(foreign);
    Ok(axum::Json(response))
}

/// POST /_parley/federation/v1/keypackages/claim
async fn claim_keypackages(
    State(state): State<AppState>,
    Signed { origin, body: request }: Signed<ClaimRequest>,
) -> Result<axum::Json<ClaimKeyPackagesResponse>> {
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(Error::new(ErrorCode::BadRequest, format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    require_origin(&request.requester, &origin, "requester")?;
    let (local, foreign): (Vec<DeviceRef>, Vec<DeviceRef>) =
        request.devices.into_iter().partition(|d| d.user.is_of(&state.server_name));
    let mut response = crate::api::keypackages::claim_local(&state, local, Some((&origin, &request.requester))).await?;
    response.missing.extend(foreign);
    Ok(axum::Json(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_does_not_prove_its_origin_counts_against_its_address() {
        for (error, code) in [
            (RequestAuthError::Unsigned, ErrorCode::Unsigned),
            (RequestAuthError::Malformed("not ASCII"), ErrorCode::BadAuthorization),
            (RequestAuthError::WrongDestination, ErrorCode::WrongDestination),
            (RequestAuthError::Stale, ErrorCode::StaleRequest),
            (RequestAuthError::BadSignature, ErrorCode::BadSignature),
        ] {
            match AuthFailure::from(error) {
                AuthFailure::Failed(error) => assert_eq!(error.into_body().code, code),
                other => panic!("{other:?} does not count against the address"),
            }
        }
    }

    #[test]
    fn a_signed_body_that_does_not_parse_is_bad_json() {
        let error = <ClaimRequest as SignedBody>::parse(b"{\"requester\":").err().map(Error::into_body);
        assert_eq!(error.map(|body| body.code), Some(ErrorCode::BadJson));
        let error = <Transaction as SignedBody>::parse(b"[]").err().map(Error::into_body);
        assert_eq!(error.map(|body| body.code), Some(ErrorCode::BadJson));
        assert!(NoBody::parse(b"ignored").is_ok());
    }
}
