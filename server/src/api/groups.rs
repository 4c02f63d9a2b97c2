//! MLS groups (`spec/groups.md` §4): create a group hubbed here, submit a message to a group's
//! hub, read the device's group stream, list the device's groups. The rules live in
//! [`crate::groups`].

use super::Json;
use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, Result};
use axum::extract::{Path, Query, State};
use parley_spec::v1::groups::{
    CreateGroupRequest, CreateGroupResponse, GroupEventsQuery, GroupEventsResponse, GroupListResponse, GroupSendRequest,
    GroupSentResponse,
};
use parley_spec::{ErrorCode, GroupId};

fn parse_group(text: &str) -> Result<GroupId> {
    GroupId::parse(text).map_err(|e| Error::new(ErrorCode::BadRequest, e.to_string()))
}

/// POST /v1/groups
pub async fn create_group(
    State(state): State<AppState>,
    auth: AuthDevice,
    Json(request): Json<CreateGroupRequest>,
) -> Result<axum::Json<CreateGroupResponse>> {
    crate::groups::create(&state, &auth, request).await.map(axum::Json)
}

/// POST /v1/groups/{group_id}/send
pub async fn group_send(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(group_id): Path<String>,
    Json(request): Json<GroupSendRequest>,
) -> Result<axum::Json<GroupSentResponse>> {
    let group_id = parse_group(&group_id)?;
    crate::groups::submit(&state, &auth, &group_id, request).await.map(axum::Json)
}

/// GET /v1/groups/{group_id}/events
pub async fn group_events(
    State(state): State<AppState>,
    auth: AuthDevice,
    Path(group_id): Path<String>,
    query: Result<Query<GroupEventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<GroupEventsResponse>> {
    let group_id = parse_group(&group_id)?;
    let Query(query) = query.map_err(|e| Error::new(ErrorCode::BadRequest, e.body_text()))?;
    crate::groups::events(&state, &auth, &group_id, query).await.map(axum::Json)
}

/// GET /v1/groups
pub async fn list_groups(State(state): State<AppState>, auth: AuthDevice) -> Result<axum::Json<GroupListResponse>> {
    crate::groups::list(&state, &auth).await.map(axum::Json)
}
