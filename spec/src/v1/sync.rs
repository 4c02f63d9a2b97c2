//! Long-poll sync: `GET /v1/sync`, the HTTP fallback for clients that cannot hold a WebSocket.
//! Same cursor semantics as the WebSocket: passing `since=N` acknowledges everything up to `N`.

use crate::{error::ErrorBody, v1::events::SequencedEvent, Seq};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Query of `GET /v1/sync`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SyncQuery {
    /// The cursor from the previous answer (0 at first). Acknowledges every event up to it.
    #[serde(default)]
    #[param(value_type = u64)]
    pub since: Seq,
    /// How long to wait for a new event when there is none, in milliseconds (capped by the server).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Most events in one answer (capped by the server).
    #[serde(default)]
    pub limit: Option<u32>,
}

impl SyncQuery {
    /// Builds a sync query.
    pub fn new(since: Seq, timeout_ms: u64, limit: Option<u32>) -> Self {
        Self { since, timeout_ms, limit }
    }
}

/// Answer to `GET /v1/sync`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[non_exhaustive]
pub struct SyncResponse {
    /// Events after `since`, in order.
    pub events: Vec<SequencedEvent>,
    /// Pass this as `since` next time.
    #[schema(value_type = u64)]
    pub cursor: Seq,
}

impl SyncResponse {
    /// Builds the response.
    pub fn new(events: Vec<SequencedEvent>, cursor: Seq) -> Self {
        Self { events, cursor }
    }
}

/// GET /v1/sync
#[utoipa::path(get, path = "/v1/sync", tag = "sync", security(("bearer" = [])), params(SyncQuery),
    responses(
        (status = 200, description = "Events after `since` (empty after the timeout)", body = SyncResponse),
        (status = 401, body = ErrorBody),
    ))]
pub fn sync() {}

crate::endpoint::endpoint! {
    /// `GET /v1/sync`: events after `since`, long-polling.
    SyncEvents: Get "/v1/sync", AccessToken, SyncQuery => SyncResponse
}
