//! MLS groups (`spec/groups.md`): the hub role for groups whose id names this server, and the
//! participating-server role for every group with a local member.
//!
//! - **Hub.** Each group ordered here has its public MLS state ([`HubGroup`]) in memory behind
//!   one async lock, loaded from `hub_groups` on first use. A submission takes the lock, is
//!   checked against the public state (sender is a member; a commit verifies, is for the current
//!   epoch — else `epoch_conflict` with the current one —, is signed by the sender's own leaf,
//!   keeps the group within the member limit; an application message is a `PrivateMessage` of a
//!   recent epoch), gets the next `group_seq`, and is stored in one transaction with the new
//!   public state and one fan-out item per other participating server. Only then is it answered.
//!   A retry of a stored submission (same device, same `client_msg_id`) gets the same answer.
//! - **Participating server.** Fan-out items are accepted only from the group's hub, stored once,
//!   and delivered to the local member devices from their own cursors ([`crate::ws`] reads the
//!   backlog; live messages are pushed through the connection [`Hub`](crate::hub::Hub)).
//!
//! The membership the hub routes by is the public state's: a commit goes to the servers of the
//! members after it and of the members it removed; the Welcome and the new ratchet tree go with
//! the commit to the servers of the members it added.

use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::error::{Error, RemoteFailure, Result};
use crate::federation::sender::outbound;
use crate::hub::GroupPush;
use crate::storage::{DevicePk, GroupMessageRow, HubUpdate, StoreError};
use bytes::Bytes;
use parley_crypto::mls::{ErrorKind, HubGroup, MemoryStorage, MessageKind, MlsError};
use parley_federation::transport::FederationError;
use parley_spec::error::DeviceRef;
use parley_spec::federation::v1::groups::{GroupMessageItem, GroupSubmission, SubmitGroupMessage};
use parley_spec::federation::v1::transaction::Item;
use parley_spec::v1::groups::{
    CreateGroupRequest, CreateGroupResponse, GroupEvent, GroupEventKind, GroupEventsQuery, GroupEventsResponse,
    GroupListResponse, GroupReceipt, GroupReceipts, GroupSendRequest, GroupSentResponse, GroupSummary, MAX_GROUP_EVENTS,
    MAX_GROUP_RECEIPTS,
};
use parley_spec::v1::ws::ServerFrame;
use parley_spec::{DeviceId, ErrorCode, GroupId, GroupSeq, ServerName, Timestamp, UserId};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// A group ordered here, as the hub holds it in memory.
struct HubEntry {
    group: HubGroup<MemoryStorage>,
    last_seq: GroupSeq,
    /// The members' devices (one leaf each).
    members: BTreeSet<DeviceRef>,
}

/// One hub group's slot: empty until loaded, emptied when a failed write left the memory ahead
/// of the database.
type Slot = Arc<tokio::sync::Mutex<Option<HubEntry>>>;

/// The groups service: hub slots, the batcher of group acknowledgements, and the receipt
/// markers of local users not yet sent to their groups' hubs.
pub struct Groups {
    slots: Mutex<HashMap<GroupId, Slot>>,
    acks: mpsc::UnboundedSender<(DevicePk, GroupId, GroupSeq)>,
    /// (delivered, read) per group and local user, moved since the last flush.
    markers: Mutex<Markers>,
}

/// (delivered, read) per group and user.
type Markers = HashMap<GroupId, HashMap<UserId, (GroupSeq, GroupSeq)>>;

impl Groups {
    /// The service, and the receiver of acknowledgements that [`flush_acks`] consumes.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(DevicePk, GroupId, GroupSeq)>) {
        let (acks, rx) = mpsc::unbounded_channel();
        (Self { slots: Mutex::default(), acks, markers: Mutex::default() }, rx)
    }

    fn slot(&self, group: &GroupId) -> Slot {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(group.clone()).or_default().clone()
    }

    /// A device of `user` acknowledged `group` up to `seq` (written in the next batch; the
    /// user's delivered marker moves with it).
    pub fn ack(&self, device: DevicePk, user: &UserId, group: GroupId, seq: GroupSeq) {
        self.mark(user, &group, seq, GroupSeq::ZERO);
        let _ = self.acks.send((device, group, seq));
    }

    /// A device of `user` read `group` up to `seq`.
    pub fn read(&self, user: &UserId, group: &GroupId, seq: GroupSeq) {
        self.mark(user, group, seq, seq);
    }

    fn mark(&self, user: &UserId, group: &GroupId, delivered: GroupSeq, read: GroupSeq) {
        let mut markers = self.markers.lock().unwrap_or_else(|e| e.into_inner());
        let marker = markers.entry(group.clone()).or_default().entry(user.clone()).or_default();
        *marker = (marker.0.max(delivered), marker.1.max(read));
    }

    fn take_markers(&self) -> Markers {
        std::mem::take(&mut *self.markers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Writes group acknowledgements in batches (at most one transaction per `interval`), keeping
/// the highest per device and group. A crash loses at most the last batch: those devices get
/// those messages again and drop them by `group_seq`.
pub async fn flush_acks(
    store: Arc<crate::storage::Store>,
    mut rx: mpsc::UnboundedReceiver<(DevicePk, GroupId, GroupSeq)>,
    interval: Duration,
) {
    let mut pending: HashMap<(DevicePk, GroupId), GroupSeq> = HashMap::new();
    loop {
        let Some((device, group, seq)) = rx.recv().await else { break };
        let slot = pending.entry((device, group)).or_default();
        *slot = (*slot).max(seq);
        let deadline = tokio::time::sleep(interval);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some((device, group, seq)) => {
                        let slot = pending.entry((device, group)).or_default();
                        *slot = (*slot).max(seq);
                    }
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let batch: Vec<_> = pending.drain().map(|((device, group), seq)| (device, group, seq)).collect();
        if let Err(error) = store.save_group_acks(&batch).await {
            tracing::warn!(%error, "saving group acknowledgements failed; the devices will get those messages again");
        }
    }
}

/// The error a client sees for an MLS check that failed.
fn mls_refusal(error: MlsError) -> Error {
    match error {
        MlsError::EpochConflict { current } => Error::EpochConflict { current },
        error @ MlsError::MissingProposals { .. } => Error::new(ErrorCode::MissingProposals, error.to_string()),
        other if other.kind() == ErrorKind::BadInput => Error::new(ErrorCode::BadMlsMessage, other.to_string()),
        other => Error::internal(other),
    }
}

fn device_ref(leaf: &parley_crypto::mls::MemberLeaf) -> DeviceRef {
    DeviceRef::new(leaf.user().clone(), leaf.device().clone())
}

fn member_set(group: &HubGroup<MemoryStorage>) -> Result<BTreeSet<DeviceRef>> {
    Ok(group.members().map_err(Error::internal)?.iter().map(|m| device_ref(&m.leaf)).collect())
}

/// `POST /v1/groups`: registers a group ordered by this server from its creator's epoch 0.
pub async fn create(state: &AppState, auth: &AuthDevice, request: CreateGroupRequest) -> Result<CreateGroupResponse> {
    let group_id = request.group_id;
    if group_id.hub() != state.server_name {
        return Err(Error::new(ErrorCode::BadRequest, "a group is created on its hub: the creator's own server"));
    }
    let group = HubGroup::from_group_info(&request.group_info.0, &request.ratchet_tree.0, MemoryStorage::default())
        .map_err(mls_refusal)?;
    if group.group_id() != group_id.mls_group_id() {
        return Err(Error::new(ErrorCode::BadMlsMessage, "the GroupInfo is of another group id"));
    }
    if group.epoch() != 0 {
        return Err(Error::new(ErrorCode::BadMlsMessage, "a new group starts at epoch 0"));
    }
    let creator = DeviceRef::new(auth.user_id.clone(), auth.device_id.clone());
    if member_set(&group)? != BTreeSet::from([creator]) {
        return Err(Error::new(ErrorCode::BadMlsMessage, "a new group's only member is the creating device"));
    }
    match state.store.create_hub_group(&group_id, &group.state_bytes(), auth.device_pk).await {
        Err(StoreError::Conflict) => return Err(Error::new(ErrorCode::GroupExists, "the group id is taken")),
        other => other?,
    }
    tracing::info!(group = %group_id, "group created");
    Ok(CreateGroupResponse::new(group_id))
}

/// `POST /v1/groups/{group_id}/send`: a local device's submission, to the hub (here, or over
/// federation; the hub's refusal is passed on as it is).
pub async fn submit(
    state: &AppState,
    auth: &AuthDevice,
    group_id: &GroupId,
    mut request: GroupSendRequest,
) -> Result<GroupSentResponse> {
    check_size(state, &request)?;
    // Files on this server the message carries: held here for the local members (never told
    // to the hub).
    let media = crate::messaging::message_media(&std::mem::take(&mut request.media))?;
    let sent = forward_submission(state, auth, group_id, request).await?;
    if !media.is_empty() && !sent.duplicate {
        state.store.hold_group_media(auth.user_pk, group_id.as_str(), sent.group_seq, &media).await?;
    }
    Ok(sent)
}

/// [`submit`] once this server took what is its own: to the hub, here or over federation.
async fn forward_submission(
    state: &AppState,
    auth: &AuthDevice,
    group_id: &GroupId,
    request: GroupSendRequest,
) -> Result<GroupSentResponse> {
    let hub = group_id.hub();
    if hub == state.server_name {
        return hub_submit(state, &auth.user_id, &auth.device_id, group_id, request).await;
    }
    crate::federation::remote::check_reachable(state, &hub)?;
    let fed = state.federation.as_ref().ok_or_else(|| Error::internal("federation state missing"))?;
    let submission = GroupSubmission::new(auth.user_id.clone(), auth.device_id.clone(), request);
    let body = serde_json::to_vec(&submission).map_err(Error::internal)?;
    match fed.client.call::<SubmitGroupMessage>(&hub, &[group_id.as_str()], Some(body)).await {
        Ok(answer) => Ok(answer),
        // The hub's refusal of the request itself (4xx with a body): the client's to handle.
        Err(FederationError::Status { status, body: Some(body) }) if (400..500).contains(&status) => {
            Err(Error::Relayed { server: hub, body: Box::new(body) })
        }
        Err(error) => Err(Error::Remote { server: hub, failure: RemoteFailure::Unreachable(Box::new(error)) }),
    }
}

fn check_size(state: &AppState, request: &GroupSendRequest) -> Result<()> {
    let size = request.message.0.len()
        + request.group_info.as_ref().map_or(0, |b| b.0.len())
        + request.welcome.as_ref().map_or(0, |b| b.0.len());
    if size > state.config.limits.max_group_message_bytes {
        return Err(Error::new(
            ErrorCode::TooLarge,
            format!("the group message is {size} bytes; the limit is {}", state.config.limits.max_group_message_bytes),
        ));
    }
    Ok(())
}

/// The hub's side of a submission by `sender`'s device `sender_device` (a local user, or one a
/// member server vouched for).
pub async fn hub_submit(
    state: &AppState,
    sender: &UserId,
    sender_device: &DeviceId,
    group_id: &GroupId,
    request: GroupSendRequest,
) -> Result<GroupSentResponse> {
    check_size(state, &request)?;
    let slot = state.groups.slot(group_id);
    let mut guard = slot.lock().await;
    if guard.is_none() {
        *guard = Some(load(state, group_id).await?);
    }
    let client_msg_id = request.client_msg_id;
    if let Some(row) = state.store.group_message_by_client_id(group_id, sender, sender_device, client_msg_id).await? {
        return Ok(GroupSentResponse::new(client_msg_id, row.seq, row.epoch, row.ts, true));
    }
    let Some(entry) = guard.as_mut() else { return Err(Error::internal("hub slot emptied while locked")) };
    let me = DeviceRef::new(sender.clone(), sender_device.clone());
    if !entry.members.contains(&me) {
        return Err(Error::new(ErrorCode::NotAMember, format!("{sender} device {sender_device} is not a member of {group_id}")));
    }
    let epoch_before = entry.group.epoch();
    let accepted = match accept(state, entry, &me, group_id, request) {
        Ok(accepted) => accepted,
        Err(error) => {
            // Only a merged commit can leave memory changed behind a refusal (a proposal is
            // stored as the last step of its acceptance).
            if entry.group.epoch() != epoch_before {
                // Merged in memory but failed after: reload from the database next time.
                *guard = None;
            }
            return Err(error);
        }
    };
    let seq = entry.last_seq.next();
    let row = GroupMessageRow {
        group_id: group_id.clone(),
        seq,
        epoch: accepted.epoch,
        kind: accepted.kind,
        sender: sender.clone(),
        sender_device: sender_device.clone(),
        client_msg_id,
        message: accepted.message,
        ts: Timestamp::now(),
        welcome: None,
    };
    // Fan-out: the servers of the members after the message and of those it removed.
    let mut servers: BTreeSet<ServerName> = entry.members.iter().map(|d| d.user.server_name()).collect();
    servers.extend(accepted.removed.iter().map(|d| d.user.server_name()));
    servers.remove(&state.server_name);
    let mut items = Vec::with_capacity(servers.len());
    for server in &servers {
        let joins_here = accepted.added.iter().any(|d| d.user.is_of(server));
        let item = GroupMessageItem::new(
            group_id.clone(),
            seq,
            row.epoch,
            row.kind,
            sender.clone(),
            sender_device.clone(),
            client_msg_id,
            row.message.clone(),
            row.ts,
        )
        .with_changes(accepted.added.clone(), accepted.removed.clone(), accepted.welcome.clone().filter(|_| joins_here));
        items.push(outbound(server, &Item::GroupMessage(item))?);
    }
    let local_joins = accepted.added.iter().any(|d| d.user.is_of(&state.server_name));
    let row = GroupMessageRow { welcome: accepted.welcome.clone().filter(|_| local_joins), ..row };
    let update = HubUpdate { epoch: entry.group.epoch(), state: accepted.state };
    let stored =
        state.store.store_group_message(&row, Some(update), &accepted.added, &accepted.removed, &state.server_name, items).await;
    match stored {
        Ok(true) => entry.last_seq = seq,
        Ok(false) => {
            *guard = None;
            return Err(Error::internal(format!("group {group_id} position {seq} was taken")));
        }
        Err(error) => {
            // A commit may have been merged in memory: reload from the database next time.
            *guard = None;
            return Err(error.into());
        }
    }
    drop(guard);
    if let Some(fed) = &state.federation {
        for server in &servers {
            fed.sender.wake(server);
        }
    }
    deliver_local(state, &row).await;
    Ok(GroupSentResponse::new(client_msg_id, seq, row.epoch, row.ts, false))
}

/// What the hub accepted, ready to store.
struct Accepted {
    kind: GroupEventKind,
    epoch: u64,
    message: Vec<u8>,
    added: Vec<DeviceRef>,
    removed: Vec<DeviceRef>,
    /// A commit that adds members: its Welcome and the new ratchet tree.
    welcome: Option<(Vec<u8>, Vec<u8>)>,
    /// A commit: the new public state.
    state: Option<Vec<u8>>,
}

/// Checks a submission against the group's public state; a commit is merged into `entry`.
fn accept(
    state: &AppState,
    entry: &mut HubEntry,
    me: &DeviceRef,
    group_id: &GroupId,
    request: GroupSendRequest,
) -> Result<Accepted> {
    let Some(group_info) = request.group_info else {
        if request.welcome.is_some() {
            return Err(Error::new(ErrorCode::BadRequest, "a Welcome comes only with a commit (and its group_info)"));
        }
        let kind = entry.group.message_kind(&request.message.0).map_err(mls_refusal)?;
        if kind == MessageKind::Proposal {
            return accept_proposal(entry, me, group_id, request.message.0);
        }
        let info = entry.group.check_application(&request.message.0).map_err(mls_refusal)?;
        // Only the current epoch: every member at the message's position can then read it (a
        // device that joined in a later epoch could not). The sender catches up and re-encrypts.
        if info.epoch != entry.group.epoch() {
            return Err(Error::EpochConflict { current: entry.group.epoch() });
        }
        return Ok(Accepted {
            kind: GroupEventKind::Application,
            epoch: info.epoch,
            message: request.message.0,
            added: Vec::new(),
            removed: Vec::new(),
            welcome: None,
            state: None,
        });
    };
    let epoch = entry.group.epoch();
    let commit = entry.group.check_commit(&request.message.0, &group_info.0).map_err(mls_refusal)?;
    if device_ref(&commit.committer().leaf) != *me {
        return Err(Error::new(ErrorCode::BadMlsMessage, "the commit is signed by another member's leaf"));
    }
    let before = entry.members.clone();
    let after: BTreeSet<DeviceRef> = {
        let mut after = before.clone();
        for change in commit.changes() {
            match change {
                parley_crypto::mls::MemberChange::Added(leaf) => {
                    after.insert(device_ref(leaf));
                }
                parley_crypto::mls::MemberChange::Removed { leaf, .. } => {
                    after.remove(&device_ref(leaf));
                }
                parley_crypto::mls::MemberChange::Updated { .. } => {}
            }
        }
        after
    };
    let limit = state.config.limits.max_group_members;
    if after.len() > limit {
        return Err(Error::new(
            ErrorCode::GroupFull,
            format!("the group would have {} members; the limit is {limit}", after.len()),
        ));
    }
    let adds = commit.changes().iter().any(|c| matches!(c, parley_crypto::mls::MemberChange::Added(_)));
    if adds != request.welcome.is_some() {
        return Err(Error::new(ErrorCode::BadRequest, "a commit comes with a Welcome exactly when it adds members"));
    }
    entry.group.merge(commit).map_err(Error::internal)?;
    // The membership as the merged public state has it (an update may swap a leaf's identity).
    let members = member_set(&entry.group)?;
    let added: Vec<DeviceRef> = members.difference(&before).cloned().collect();
    let removed: Vec<DeviceRef> = before.difference(&members).cloned().collect();
    entry.members = members;
    let welcome = match request.welcome {
        Some(welcome) => Some((welcome.0, entry.group.ratchet_tree().map_err(Error::internal)?)),
        None => None,
    };
    tracing::debug!(group = %group_id, epoch = entry.group.epoch(), added = added.len(), removed = removed.len(), "commit accepted");
    Ok(Accepted {
        kind: GroupEventKind::Commit,
        epoch,
        message: request.message.0,
        added,
        removed,
        welcome,
        state: Some(entry.group.state_bytes()),
    })
}

/// Checks a standalone proposal (a member asking to remove its own user's devices: leaving)
/// and stores it in `entry`'s public state; the epoch's commit must include it.
fn accept_proposal(entry: &mut HubEntry, me: &DeviceRef, group_id: &GroupId, message: Vec<u8>) -> Result<Accepted> {
    let proposal = entry.group.check_proposal(&message).map_err(mls_refusal)?;
    if device_ref(&proposal.proposer().leaf) != *me {
        return Err(Error::new(ErrorCode::BadMlsMessage, "the proposal is signed by another member's leaf"));
    }
    let removed = device_ref(&proposal.removed().leaf);
    entry.group.store_proposal(proposal).map_err(Error::internal)?;
    tracing::debug!(group = %group_id, epoch = entry.group.epoch(), %removed.user, %removed.device, "leave proposal accepted");
    Ok(Accepted {
        kind: GroupEventKind::Proposal,
        epoch: entry.group.epoch(),
        message,
        added: Vec::new(),
        removed: Vec::new(),
        welcome: None,
        state: Some(entry.group.state_bytes()),
    })
}

async fn load(state: &AppState, group_id: &GroupId) -> Result<HubEntry> {
    let record = state
        .store
        .hub_group(group_id)
        .await?
        .ok_or_else(|| Error::new(ErrorCode::UnknownGroup, format!("{group_id} is not a group of this hub")))?;
    let group = HubGroup::from_state_bytes(&record.state, group_id.mls_group_id())
        .map_err(Error::internal)?
        .ok_or_else(|| Error::internal(format!("the stored state of {group_id} holds no group")))?;
    if group.epoch() != record.epoch {
        return Err(Error::internal(format!("group {group_id}: stored epoch {} but state at {}", record.epoch, group.epoch())));
    }
    let members = member_set(&group)?;
    Ok(HubEntry { group, last_seq: record.last_seq, members })
}

/// A `group_message` item from `origin`: stored and delivered if `origin` is the group's hub.
pub async fn receive(state: &AppState, origin: &ServerName, item: GroupMessageItem) -> Result<()> {
    if item.group_id.hub() != *origin {
        return Err(Error::new(ErrorCode::NotTheHub, format!("{origin} is not the hub of {}", item.group_id)));
    }
    if item.kind == GroupEventKind::Welcome {
        return Err(Error::new(ErrorCode::BadRequest, "a welcome travels with its commit"));
    }
    let welcome = match (item.welcome, item.ratchet_tree) {
        (Some(welcome), Some(tree)) => Some((welcome.0, tree.0)),
        (None, None) => None,
        _ => return Err(Error::new(ErrorCode::BadRequest, "a Welcome comes with the ratchet tree")),
    };
    let row = GroupMessageRow {
        group_id: item.group_id,
        seq: item.group_seq,
        epoch: item.epoch,
        kind: item.kind,
        sender: item.sender,
        sender_device: item.sender_device,
        client_msg_id: item.client_msg_id,
        message: item.message.0,
        ts: item.ts,
        welcome,
    };
    if state.store.store_group_message(&row, None, &item.added, &item.removed, &state.server_name, Vec::new()).await? {
        deliver_local(state, &row).await;
    }
    Ok(())
}

/// The `group_event` a device receives for a stored message (`welcome`: the device joins at
/// this position and gets the Welcome and tree instead of the commit).
pub fn event(row: &GroupMessageRow, welcome: bool) -> Option<GroupEvent> {
    let (kind, message, tree) = match (welcome, &row.welcome) {
        (true, Some((welcome, tree))) => (GroupEventKind::Welcome, welcome.clone(), Some(tree.clone())),
        // A device added by a commit whose Welcome did not reach this server: nothing to give.
        (true, None) => return None,
        (false, _) => (row.kind, row.message.clone(), None),
    };
    Some(GroupEvent::new(
        row.group_id.clone(),
        row.seq,
        row.epoch,
        kind,
        row.sender.clone(),
        row.sender_device.clone(),
        row.client_msg_id,
        message,
        tree,
        row.ts,
    ))
}

/// Hands a newly stored message to the connected local member devices: the same frame, made
/// once, to every member; joiners are told to read their Welcome from the database.
async fn deliver_local(state: &AppState, row: &GroupMessageRow) {
    let recipients = match state.store.group_recipients(&row.group_id, row.seq).await {
        Ok(recipients) => recipients,
        Err(error) => {
            // They read it from their cursor when they next (re)connect.
            tracing::warn!(%error, group = %row.group_id, "looking up local group members failed");
            return;
        }
    };
    if recipients.is_empty() {
        return;
    }
    let frame = event(row, false).and_then(|event| serde_json::to_vec(&ServerFrame::GroupEvent(event)).ok()).map(Bytes::from);
    let wakes = row.kind == GroupEventKind::Application;
    let push = Arc::new(GroupPush { group_id: row.group_id.clone(), seq: row.seq, frame, wakes });
    let joiner = Arc::new(GroupPush { group_id: row.group_id.clone(), seq: row.seq, frame: None, wakes: true });
    for recipient in recipients {
        let push = if recipient.welcome { joiner.clone() } else { push.clone() };
        state.hub.push_group(recipient.device, push);
    }
}

/// `GET /v1/groups/{group_id}/events`: the device's stream after `after`.
pub async fn events(
    state: &AppState,
    auth: &AuthDevice,
    group_id: &GroupId,
    query: GroupEventsQuery,
) -> Result<GroupEventsResponse> {
    let window = state
        .store
        .group_device(group_id, auth.device_pk)
        .await?
        .ok_or_else(|| Error::new(ErrorCode::NotAMember, format!("this device is not a member of {group_id}")))?;
    let limit = query.limit.unwrap_or(MAX_GROUP_EVENTS).clamp(1, MAX_GROUP_EVENTS);
    let after = query.after.max(GroupSeq::new(window.from_seq.get().saturating_sub(1)));
    let rows = state.store.group_messages_after(group_id, after, window.until_seq, limit + 1).await?;
    let more = rows.len() > limit as usize;
    let events = rows.iter().take(limit as usize).filter_map(|row| event(row, row.seq == window.from_seq)).collect();
    Ok(GroupEventsResponse::new(events, more))
}

/// `GET /v1/groups`: the device's groups.
pub async fn list(state: &AppState, auth: &AuthDevice) -> Result<GroupListResponse> {
    let mut groups = Vec::new();
    for row in state.store.groups_of_device(auth.device_pk).await? {
        let latest = state.store.latest_group_seq(&row.group_id).await?;
        let latest = row.until_seq.map_or(latest, |until| latest.min(until));
        groups.push(GroupSummary::new(row.group_id, row.acked, latest));
    }
    Ok(GroupListResponse::new(groups))
}

/// Sends the local users' receipt markers that moved to their groups' hubs, once per
/// `limits.group_receipt_interval_ms` (through the durable queue for remote hubs), until
/// shutdown. Markers only move forward, so a lost batch is made good by the next one.
pub async fn flush_receipts(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_millis(state.config.limits.group_receipt_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        for (group, users) in state.groups.take_markers() {
            let receipts: Vec<GroupReceipt> =
                users.into_iter().map(|(user, (delivered, read))| GroupReceipt::new(user, delivered, read)).collect();
            let result = if group.hub() == state.server_name {
                hub_receipts(&state, &state.server_name, &group, receipts).await
            } else {
                queue_items(&state, &[group.hub()], Item::GroupReceipts(GroupReceipts::new(group.clone(), receipts))).await
            };
            if let Err(error) = result {
                tracing::warn!(%error, %group, "group receipts not sent");
            }
        }
    }
}

/// Queues `item` for each of `servers` durably and wakes their senders.
async fn queue_items(state: &AppState, servers: &[ServerName], item: Item) -> Result<()> {
    let Some(fed) = &state.federation else { return Ok(()) };
    let outbound = servers.iter().map(|server| outbound(server, &item)).collect::<Result<Vec<_>>>()?;
    state.store.queue_outbound(outbound).await?;
    for server in servers {
        fed.sender.wake(server);
    }
    Ok(())
}

/// The hub takes receipt markers of members (of `origin`'s users when `origin` is another
/// server), keeps the highest of each, and sends the markers that moved to every participating
/// server and to its own member devices.
async fn hub_receipts(state: &AppState, origin: &ServerName, group_id: &GroupId, receipts: Vec<GroupReceipt>) -> Result<()> {
    if receipts.iter().any(|r| !r.user.is_of(origin)) {
        return Err(Error::new(ErrorCode::Forbidden, format!("{origin} sends receipts only for its own users")));
    }
    let slot = state.groups.slot(group_id);
    let (servers, members): (BTreeSet<ServerName>, BTreeSet<UserId>) = {
        let mut guard = slot.lock().await;
        if guard.is_none() {
            *guard = Some(load(state, group_id).await?);
        }
        let Some(entry) = guard.as_ref() else { return Err(Error::internal("hub slot emptied while locked")) };
        (entry.members.iter().map(|d| d.user.server_name()).collect(), entry.members.iter().map(|d| d.user.clone()).collect())
    };
    // Markers of users who are not members are dropped.
    let receipts: Vec<GroupReceipt> = receipts.into_iter().filter(|r| members.contains(&r.user)).collect();
    let moved = state.store.merge_group_markers(group_id, &receipts).await?;
    if moved.is_empty() {
        return Ok(());
    }
    let others: Vec<ServerName> = servers.into_iter().filter(|s| *s != state.server_name).collect();
    for chunk in moved.chunks(MAX_GROUP_RECEIPTS) {
        let batch = GroupReceipts::new(group_id.clone(), chunk.to_vec());
        if !others.is_empty() {
            queue_items(state, &others, Item::GroupReceipts(batch.clone())).await?;
        }
        deliver_receipts(state, batch).await;
    }
    Ok(())
}

/// A `group_receipts` item from `origin`: a member server's markers for the hub (this server),
/// or the hub's markers for this participating server.
pub async fn receive_receipts(state: &AppState, origin: &ServerName, receipts: GroupReceipts) -> Result<()> {
    if receipts.receipts.len() > MAX_GROUP_RECEIPTS {
        return Err(Error::new(ErrorCode::TooLarge, format!("at most {MAX_GROUP_RECEIPTS} markers per item")));
    }
    let group_id = receipts.group_id.clone();
    if group_id.hub() == state.server_name {
        return hub_receipts(state, origin, &group_id, receipts.receipts).await;
    }
    if group_id.hub() != *origin {
        return Err(Error::new(ErrorCode::NotTheHub, format!("{origin} is not the hub of {group_id}")));
    }
    let moved = state.store.merge_group_markers(&group_id, &receipts.receipts).await?;
    if !moved.is_empty() {
        deliver_receipts(state, GroupReceipts::new(group_id, moved)).await;
    }
    Ok(())
}

/// How many recent positions make a member a recent sender, who is shown receipts.
const RECEIPT_WINDOW: u64 = 1000;

/// Tells the connected local member devices of a group's recent senders (the users who sent one
/// of its last [`RECEIPT_WINDOW`] messages: receipts are about their messages) which markers
/// moved. Not every member: at 1,000 members that would be every marker to every device each
/// interval. A notice, dropped for a device that is not connected or whose buffer is full.
async fn deliver_receipts(state: &AppState, receipts: GroupReceipts) {
    let devices = match state.store.group_recent_sender_devices(&receipts.group_id, &state.server_name, RECEIPT_WINDOW).await {
        Ok(devices) => devices,
        Err(error) => {
            tracing::warn!(%error, group = %receipts.group_id, "looking up local group members failed");
            return;
        }
    };
    let Ok(frame) = serde_json::to_vec(&ServerFrame::GroupReceipts(receipts)) else { return };
    let frame = Bytes::from(frame);
    for device in devices {
        state.hub.send_ephemeral(device, frame.clone());
    }
}
