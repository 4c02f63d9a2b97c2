//! The federation listener's router: `GET /_parley/key/v1`, and the signed endpoints
//! `PUT /_parley/federation/v1/send/{txn_id}`, `GET /_parley/federation/v1/users/{user_id}/devices`,
//! `POST /_parley/federation/v1/keys/claim`.
//!
//! Every signed request goes through [`authenticate`]: scheme, destination, clock skew, the
//! allow/deny lists, the origin's key and signature, the per-origin rate limit (only proven
//! origins are counted) and the replay cache, in that order (cheap checks first; nothing is
//! written before all pass).

use super::Federation;
use crate::app::on;
use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::messaging::to_bytes;
use crate::storage::{Effects, InboundItem, MessageRoutes, NewEvent, RemoteMessage};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, Method, Uri};
use axum::response::IntoResponse as _;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use parley_federation::{Authorization, RequestAuthError};
use parley_spec::endpoint::Endpoint as _;
use parley_spec::error::DeviceRef;
use parley_spec::federation::v1::claim::{ClaimKeys as FedClaimKeys, ClaimRequest};
use parley_spec::federation::v1::keys::GetServerKeys;
use parley_spec::federation::v1::transaction::{
    GetUserDevices, Item, RejectedItem, SendTransaction, SignedMessage, Transaction, TransactionResponse, UserDevices,
    MAX_TXN_ITEMS,
};
use parley_spec::v1::events::{InboxEvent, MessageEvent};
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
        .route(FedClaimKeys::PATH, on(FedClaimKeys, claim_keys))
        .layer(DefaultBodyLimit::max(body_limit))
        .route(GetServerKeys::PATH, on(GetServerKeys, crate::app::server_keys))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(ErrorCode::Internal, "internal server error").into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(
            |request: &Request| tracing::info_span!("federation", method = %request.method(), path = %request.uri().path()),
        ))
        .with_state(state)
}

/// A raw request body whose rejections are typed errors.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(request, state)
            .await
            .map(Self)
            .map_err(|_| ApiError::new(ErrorCode::TooLarge, "request body too large or unreadable"))
    }
}

fn federation(state: &AppState) -> ApiResult<&Arc<Federation>> {
    state.federation.as_ref().ok_or_else(|| ApiError::new(ErrorCode::NotFound, "federation is disabled on this server"))
}

fn auth_error(error: RequestAuthError) -> ApiError {
    let code = match error {
        RequestAuthError::Unsigned => ErrorCode::Unsigned,
        RequestAuthError::Malformed(_) => ErrorCode::BadAuthorization,
        RequestAuthError::WrongDestination => ErrorCode::WrongDestination,
        RequestAuthError::Stale => ErrorCode::StaleRequest,
        RequestAuthError::BadSignature => ErrorCode::BadSignature,
    };
    ApiError::new(code, error.to_string())
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
) -> ApiResult<ServerName> {
    let fed = federation(state)?;
    fed.check_not_blocked(peer)?;
    let result = verify_request(state, method, uri, headers, body).await;
    if let Err(error) = &result {
        if error.body.code.http_status() == 401 || error.code() == ErrorCode::ServerDenied {
            fed.auth_failed(peer, &state.metrics);
        }
    }
    result
}

async fn verify_request(state: &AppState, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> ApiResult<ServerName> {
    let fed = federation(state)?;
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| auth_error(RequestAuthError::Unsigned))?
        .to_str()
        .map_err(|_| auth_error(RequestAuthError::Malformed("not ASCII")))?;
    let auth = Authorization::parse(header).map_err(auth_error)?;
    let skew = fed.config().max_clock_skew_ms;
    auth.check_envelope(&state.server_name, Timestamp::now(), skew).map_err(auth_error)?;
    fed.check_allowed(auth.origin.as_str())?;
    let key = fed.origin_key(&auth.origin, &auth.key_id, auth.ts).await?;
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    auth.verify(method.as_str(), path_and_query, body, &key).map_err(auth_error)?;
    // Counted only once the origin is proven: forged requests must not use up its budget.
    fed.check_rate(auth.origin.as_str(), &state.metrics)?;
    // Only a correctly signed request can be a replay; remember it until it would be stale.
    if !fed.replays.first_sight(&auth.signature, auth.ts.saturating_add(Duration::from_millis(skew))) {
        return Err(ApiError::new(ErrorCode::ReplayedRequest, "this signed request was already received"));
    }
    // The origin is up: whatever we queued for it goes out now instead of after the backoff.
    fed.sender.contacted_by(auth.origin.as_str());
    Ok(auth.origin)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(ErrorCode::BadJson, e.to_string()))
}

/// PUT /_parley/federation/v1/send/{txn_id}
async fn send_transaction(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(txn_id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<axum::Json<TransactionResponse>> {
    let origin = authenticate(&state, peer.ip(), &method, &uri, &headers, &body).await?;
    if txn_id.is_empty() || txn_id.len() > 128 {
        return Err(ApiError::new(ErrorCode::BadRequest, "txn_id must be 1 to 128 characters"));
    }
    let txn: Transaction = parse_json(&body)?;
    if txn.origin != origin {
        return Err(ApiError::new(ErrorCode::Forbidden, "the transaction's origin is not the signing server"));
    }
    if txn.items.len() > MAX_TXN_ITEMS {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("at most {MAX_TXN_ITEMS} items per transaction")));
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
            Err(error) if error.code() == ErrorCode::Internal || error.code() == ErrorCode::Unavailable => return Err(error),
            Err(error) => {
                tracing::debug!(%origin, index, code = %error.code(), message = %error.body.message, "item rejected");
                response.rejected.push(RejectedItem::new(index, error.code(), error.body.message));
            }
        }
    }
    let new = state.store.apply_inbound(origin.as_str(), &txn_id, items).await?;
    if new {
        state.metrics.federation_items_received.inc_by(count as u64);
        for item in after_commit {
            deliver_ephemeral(&state, item).await;
        }
    }
    Ok(axum::Json(response))
}

fn require_origin(user: &UserId, origin: &ServerName, what: &str) -> ApiResult<()> {
    if user.server() != origin.as_str() {
        return Err(ApiError::new(ErrorCode::Forbidden, format!("{what} {user} is not a user of the sending server {origin}")));
    }
    Ok(())
}

async fn local_user(state: &AppState, user: &UserId) -> ApiResult<Arc<crate::directory::UserEntry>> {
    state.directory.user(user).await?.ok_or_else(|| ApiError::new(ErrorCode::UnknownUser, format!("no user {user} here")))
}

async fn apply_item(
    state: &AppState,
    fed: &Federation,
    origin: &ServerName,
    item: Item,
    routes: &MessageRoutes,
    effects: &mut Effects,
    after_commit: &mut Vec<Item>,
) -> ApiResult<()> {
    match item {
        Item::Message(message) => {
            let (events, received) = message_events(state, fed, origin, message).await?;
            effects.events.extend(events);
            effects.received.push(received);
        }
        Item::Receipt(mut receipt) => {
            require_origin(&receipt.by, origin, "receipt author")?;
            if receipt.message_ids.is_empty() || receipt.message_ids.len() > parley_spec::v1::messages::MAX_READ_IDS {
                return Err(ApiError::new(ErrorCode::BadRequest, "a receipt names 1 to 1,000 messages (MAX_READ_IDS)"));
            }
            let sender = local_user(state, &receipt.sender).await?;
            // Delivered or read, only for messages `sender` sent to `by` (other ids are dropped).
            receipt.message_ids = routes.sent(&receipt.message_ids, sender.pk, receipt.by.as_str());
            if receipt.message_ids.is_empty() {
                return Err(ApiError::new(
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
            state.store.forget_remote_devices(changed.user.as_str()).await?;
        }
        _ => return Err(ApiError::new(ErrorCode::BadRequest, "unknown item type")),
    }
    Ok(())
}

/// A message: turns it into inbox events for the recipient's devices (envelopes for devices
/// that no longer exist are dropped) and the record that its sender wrote to the recipient
/// (what the recipient's read markers are checked against). When another server relays it,
/// its origin signature is checked; from its origin itself, the request signature (over the
/// whole body) already proves who wrote it, and the message signature is carried for later
/// relaying.
async fn message_events(
    state: &AppState,
    fed: &Federation,
    sent_by: &ServerName,
    message: SignedMessage,
) -> ApiResult<(Vec<NewEvent>, RemoteMessage)> {
    require_origin(&message.sender, &message.origin, "sender")?;
    fed.check_allowed(message.origin.as_str())?;
    let limits = &state.config.limits;
    if message.envelopes.len() > limits.max_devices_per_user {
        return Err(ApiError::new(ErrorCode::TooLarge, "more envelopes than a user may have devices"));
    }
    // Ids are stored as SQLite integers: one beyond them is no id a server assigns.
    if i64::try_from(message.id).is_err() {
        return Err(ApiError::new(ErrorCode::BadRequest, "message id out of range"));
    }
    if message.envelopes.iter().any(|e| e.ciphertext.0.len() > limits.max_envelope_bytes) {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("an envelope exceeds {} bytes", limits.max_envelope_bytes)));
    }
    if &message.origin != sent_by {
        let key = fed.origin_key(&message.origin, &message.key_id, message.ts).await?;
        parley_federation::message::verify_message(&message, &key)
            .map_err(|_| ApiError::new(ErrorCode::BadSignature, "the message's origin signature does not verify"))?;
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

/// GET /_parley/federation/v1/users/{user_id}/devices
async fn user_devices(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<UserDevices>> {
    let origin = authenticate(&state, peer.ip(), &method, &uri, &headers, b"").await?;
    let user_id = crate::api::parse_user(&user_id)?;
    let entry = local_user(&state, &user_id).await?;
    let device_list = match state.store.device_list(entry.pk).await? {
        Some(json) => Some(serde_json::from_slice(&json).map_err(ApiError::internal)?),
        None => None,
    };
    // The origin hears when these change.
    state.store.add_device_list_watcher(entry.pk, origin.as_str()).await?;
    let devices = entry.devices.iter().map(|(_, id)| id.clone()).collect();
    Ok(axum::Json(UserDevices::new(user_id, devices, device_list)))
}

/// POST /_parley/federation/v1/keys/claim
async fn claim_keys(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> ApiResult<axum::Json<ClaimResponse>> {
    let origin = authenticate(&state, peer.ip(), &method, &uri, &headers, &body).await?;
    let request: ClaimRequest = parse_json(&body)?;
    if request.devices.len() > MAX_CLAIM_DEVICES {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("at most {MAX_CLAIM_DEVICES} devices per claim")));
    }
    require_origin(&request.requester, &origin, "requester")?;
    let (local, foreign): (Vec<DeviceRef>, Vec<DeviceRef>) =
        request.devices.into_iter().partition(|d| d.user.server() == state.server_name.as_str());
    let mut response = crate::api::keys::claim_local(&state, local, Some((&origin, &request.requester))).await?;
    response.missing.extend(foreign);
    Ok(axum::Json(response))
}
