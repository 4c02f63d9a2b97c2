//! Messages over HTTP: send, read markers and the long-poll sync fallback.

use super::Json;
use crate::app::AppState;
use crate::auth::{AuthDevice, ControlDevice};
use crate::error::{Error, Result};
use crate::messaging;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use parley_spec::v1::events::{InboxEvent, SequencedEvent};
use parley_spec::v1::messages::{ReadRequest, SendRequest, SentResponse};
use parley_spec::v1::sync::{SyncQuery, SyncResponse};
use parley_spec::ErrorCode;
use std::time::Duration;

/// POST /v1/send
pub async fn send_message(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<SendRequest>,
) -> Result<axum::Json<SentResponse>> {
    Ok(axum::Json(messaging::send(&state, &auth, request).await?))
}

/// POST /v1/read
pub async fn mark_read(
    State(state): State<AppState>,
    ControlDevice(auth): ControlDevice,
    Json(request): Json<ReadRequest>,
) -> Result<StatusCode> {
    messaging::mark_read(&state, &auth, request).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// GET /v1/sync
pub async fn sync(
    State(state): State<AppState>,
    ControlDevice(auth): ControlDevice,
    query: Result<Query<SyncQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<SyncResponse>> {
    let Query(query) = query.map_err(|e| Error::new(ErrorCode::BadRequest, e.body_text()))?;
    let limits = &state.config.limits;
    let limit = query.limit.unwrap_or(limits.sync_page).clamp(1, limits.sync_page);
    let acked = state.store.acked_seq(auth.device_pk).await?;
    let mut since = query.since;
    if since > acked {
        messaging::ack_from_store(&state, &auth, acked, since).await?;
        // A cursor beyond the end of the inbox was clamped when recorded.
        since = since.min(state.store.acked_seq(auth.device_pk).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(query.timeout_ms.min(limits.max_sync_timeout_ms));
    let mut shutdown = state.shutdown.clone();
    let waiter = state.hub.waiter(auth.device_pk);
    loop {
        // Register for the wake-up before reading, so an event committed in between is not missed.
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let rows = state.store.inbox_after(auth.device_pk, since, limit, usize::MAX).await?;
        if !rows.is_empty() {
            let cursor = rows.last().map_or(since, |r| r.seq);
            let events = rows
                .into_iter()
                .map(|row| {
                    let event: InboxEvent = serde_json::from_slice(&row.payload).map_err(Error::internal)?;
                    Ok(SequencedEvent::new(row.seq, event))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(axum::Json(SyncResponse::new(events, cursor)));
        }
        if *shutdown.borrow() {
            return Ok(axum::Json(SyncResponse::new(Vec::new(), since)));
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(axum::Json(SyncResponse::new(Vec::new(), since))),
            _ = shutdown.changed() => {}
        }
    }
}
