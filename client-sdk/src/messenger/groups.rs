//! The [`Messenger`]'s MLS groups: it drives the sans-I/O [`GroupMachine`] with the HTTP API
//! (create, submit, resync, KeyPackages), the connection (group events in, `group_ack` out) and
//! the E2EE machine's trust (verified signed device lists).
//!
//! - Group events are handled one at a time (the WebSocket's and those pulled with
//!   `GET /v1/groups/{id}/events` alike), each acknowledged once its result is stored.
//! - A commit (adding or removing members) is submitted, then the call waits until the commit
//!   came back at its position and was merged. On `epoch_conflict` the commit is dropped, the
//!   stream is pulled until the group reached the hub's epoch, and the same change is rebuilt
//!   on top (members already added or removed are skipped), up to [`MAX_COMMIT_ATTEMPTS`]
//!   times. A commit whose answer was lost stays pending and is re-sent with the same id before
//!   the next one.
//! - Before building each commit, the device lists this device already holds for the group's
//!   member users are read from the local store (no fetch) and handed to the machine, which
//!   removes in the same commit the leaves of devices that left their owner's list
//!   (`spec/groups.md` §2). [`Messenger::prune_device`] makes such a commit on its own.
//! - KeyPackages: [`KEY_PACKAGE_TARGET`] one-time ones and a last-resort one are uploaded when
//!   the profile has none yet, more when the server says it runs low, and a new last-resort
//!   one when the current one nears its end.

use super::{Messenger, MessengerError};
use crate::e2ee::MessengerEvent;
use crate::groups::{
    check_key_package, GroupError, GroupMachine, GroupMessage, GroupProblem, GroupRecord, GroupState, Lists, MetaChange,
    Received, KEY_PACKAGE_LIFETIME_SECS, KEY_PACKAGE_TARGET,
};
use crate::store::Store;
use crate::Error;
use parley_crypto::identity::VerifiedDeviceList;
use parley_crypto::mls::KeyPackage;
use parley_spec::error::DeviceRef;
use parley_spec::v1::content::Attachment;
use parley_spec::v1::groups::{GroupEvent, GroupSendRequest, GroupSentResponse};
use parley_spec::v1::keypackages::ClaimKeyPackagesRequest;
use parley_spec::v1::keys::MAX_CLAIM_DEVICES;
use parley_spec::v1::presence::PresenceInfo;
use parley_spec::{DeviceId, ErrorCode, GroupId, GroupSeq, Timestamp, UserId};
use rand::rngs::OsRng;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Deref, DerefMut};
use tokio::sync::MutexGuard;
use uuid::Uuid;

/// How many times a commit is rebuilt after losing its epoch before giving up.
pub const MAX_COMMIT_ATTEMPTS: u32 = 5;

/// Most member users whose presence [`Messenger::open_group`] follows (one subscription
/// request; the server takes at most 1,000 users per request).
pub const MAX_GROUP_PRESENCE: usize = 1000;

/// Key-value key (+ group id) marking a group whose metadata waits to be sent again.
const META_UNSENT: &str = "group_meta_unsent:";

/// How far back in a group's history [`Messenger::flush_group_outbox`] looks (unsent messages
/// come first in the history's window, so this bounds only how many are sent per pass).
const GROUP_OUTBOX_SCAN: u32 = 500;

/// How many times an application message is encrypted again after an `epoch_conflict`.
const MAX_SEND_ATTEMPTS: u32 = 3;

/// Key-value keys: whether the first KeyPackages were uploaded, and when the last-resort one
/// ends (seconds since the epoch).
const KEY_PACKAGES_UPLOADED: &str = "mls_keypackages_uploaded";
const LAST_RESORT_ENDS: &str = "mls_last_resort_ends";

/// A new last-resort KeyPackage is uploaded this long before the current one ends.
const LAST_RESORT_RENEW_SECS: u64 = 7 * 24 * 60 * 60;

/// What adding members came to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AddReport {
    /// Devices added by the commit.
    pub added: Vec<DeviceRef>,
    /// Devices the server had no KeyPackage for (or whose server could not be reached).
    pub missing: Vec<DeviceRef>,
    /// Devices whose KeyPackage failed its checks (not the device claimed, not vouched for by
    /// its user's signed device list, invalid), with why.
    pub refused: Vec<(DeviceRef, String)>,
}

/// The group machine, locked for one call; its events go to the application when the guard
/// drops.
pub(super) struct GroupGuard<'a> {
    guard: MutexGuard<'a, GroupMachine<Store>>,
    messenger: &'a Messenger,
}

impl Deref for GroupGuard<'_> {
    type Target = GroupMachine<Store>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl DerefMut for GroupGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        for event in self.guard.take_events() {
            self.messenger.inner.driver.emit(event);
        }
    }
}

/// An application message to send.
#[derive(Clone, Copy)]
pub(super) enum Application<'a> {
    Text { client_msg_id: Uuid, body: &'a str, file: Option<&'a Attachment> },
    Meta,
}

/// A membership change to commit (each also removes the leaves the known lists no longer
/// vouch for).
enum Change {
    Add(Vec<KeyPackage>),
    Remove(Vec<UserId>),
    /// The stored proposals alone (members leaving).
    Pending,
    /// Only those leaves.
    Prune,
}

/// What removing a device from the groups came to ([`Messenger::remove_device`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceRemoval {
    /// The groups the device is no longer a member of (this device's commit removed it, or
    /// another member's did meanwhile).
    pub removed_from: Vec<GroupId>,
    /// The groups where it is still a member because the commit failed, with why. Any member's
    /// next commit there removes it (its list no longer names it).
    pub failed: Vec<(GroupId, String)>,
}

impl Messenger {
    /// The group machine, for one call. Never hold it across a network round trip.
    pub(super) async fn group_machine(&self) -> GroupGuard<'_> {
        GroupGuard { guard: self.inner.groups.lock().await, messenger: self }
    }

    /// Creates a group named `name` hubbed on this user's server, tells its name (encrypted),
    /// and adds every device of `members` and this user's other devices. Returns its id and
    /// what the add came to.
    pub async fn create_group(&self, name: &str, members: &[UserId]) -> Result<(GroupId, AddReport), MessengerError> {
        let mut attempts = 0;
        let group_id = loop {
            let (group_id, request) =
                self.group_machine().await.create_group(&mut OsRng, Some(name.to_owned()), Timestamp::now()).await?;
            match self.api().create_group(&request).await {
                Ok(_) => break group_id,
                Err(error) => {
                    self.group_machine().await.forget_group(&group_id).await?;
                    attempts += 1;
                    if error.server_code() != Some(ErrorCode::GroupExists) || attempts >= 3 {
                        return Err(error.into());
                    }
                }
            }
        };
        self.send_meta(&group_id).await?;
        let report = self.add_members(&group_id, members).await?;
        Ok((group_id, report))
    }

    /// Adds every device of `users` (and this user's other devices) that is not a member yet:
    /// their device lists are verified, one KeyPackage per device is claimed and checked
    /// against them, and one commit adds them. Returns once the commit is merged.
    pub async fn add_members(&self, group_id: &GroupId, users: &[UserId]) -> Result<AddReport, MessengerError> {
        let me = (self.session().user_id.clone(), self.session().device_id.clone());
        let mut lists: BTreeMap<UserId, VerifiedDeviceList> = BTreeMap::new();
        for user in users.iter().chain([&me.0]) {
            if !lists.contains_key(user) {
                lists.insert(user.clone(), self.inner.driver.device_list(user, true).await?);
            }
        }
        let members: BTreeSet<(UserId, DeviceId)> = self.group_machine().await.members(group_id).await?.into_iter().collect();
        let wanted: Vec<DeviceRef> = lists
            .values()
            .flat_map(|list| list.devices().iter().map(|d| (list.user_id().clone(), d.device_id().clone())))
            .filter(|device| device != &me && !members.contains(device))
            .map(|(user, device)| DeviceRef::new(user, device))
            .collect();
        let mut report = AddReport::default();
        let mut key_packages = Vec::new();
        for chunk in wanted.chunks(MAX_CLAIM_DEVICES) {
            let claimed = self.api().claim_keypackages(&ClaimKeyPackagesRequest::new(chunk.to_vec())).await?;
            report.missing.extend(claimed.missing);
            for entry in claimed.key_packages {
                let device = DeviceRef::new(entry.user.clone(), entry.device.clone());
                let checked = match (chunk.contains(&device), lists.get(&entry.user)) {
                    (true, Some(list)) => check_key_package(&entry.key_package.0, &entry.user, &entry.device, list),
                    _ => Err("the server handed out a KeyPackage of a device not asked for".to_owned()),
                };
                match checked {
                    Ok(key_package) => {
                        report.added.push(device);
                        key_packages.push(key_package);
                    }
                    Err(reason) => {
                        tracing::warn!(user = %entry.user, device = %entry.device, %reason, "KeyPackage refused");
                        report.refused.push((device, reason));
                    }
                }
            }
        }
        if key_packages.is_empty() {
            return Ok(report);
        }
        self.commit(group_id, &Change::Add(key_packages)).await?;
        // Joiners cannot read earlier epochs: tell them the name.
        self.send_meta(group_id).await?;
        Ok(report)
    }

    /// Removes every device of `users` from the group, in one commit; returns once it is
    /// merged (false when none of them was a member).
    pub async fn remove_members(&self, group_id: &GroupId, users: &[UserId]) -> Result<bool, MessengerError> {
        self.commit(group_id, &Change::Remove(users.to_vec())).await
    }

    /// Removes `device` of this user from every active group where it is a member, each by a
    /// pruning commit ([`GroupMachine::commit_prune`]): call it once this device holds the
    /// user's list without `device` (else the commits remove nothing). Groups whose commit
    /// fails are reported, not fatal.
    pub(super) async fn prune_device(&self, device: &DeviceId) -> Result<DeviceRemoval, MessengerError> {
        let me = self.session().user_id.clone();
        let mut removal = DeviceRemoval::default();
        for record in self.groups().await? {
            if record.state != GroupState::Active {
                continue;
            }
            let group_id = record.group_id;
            let is_member = |members: &[(UserId, DeviceId)]| members.iter().any(|(u, d)| u == &me && d == device);
            if !is_member(&self.group_members(&group_id).await?) {
                continue;
            }
            let outcome = self.commit(&group_id, &Change::Prune).await;
            match (outcome, self.group_members(&group_id).await) {
                (_, Ok(members)) if !is_member(&members) => removal.removed_from.push(group_id),
                (Err(error), _) => {
                    tracing::warn!(group = %group_id, %device, %error, "device not removed from the group");
                    removal.failed.push((group_id, error.to_string()));
                }
                (Ok(_), Err(error)) => removal.failed.push((group_id, error.to_string())),
                (Ok(_), Ok(_)) => removal.failed.push((group_id, "the known device list still names it".to_owned())),
            }
        }
        Ok(removal)
    }

    /// Leaves a group with all of this user's devices: proposes the removal of each of their
    /// leaves (one proposal at a time, again from the new epoch after an `epoch_conflict`),
    /// after which the group is [`GroupState::Leaving`] on this device. Another member commits
    /// the proposals; every device of the user then gets [`MessengerEvent::GroupRemoved`].
    /// Returns once every proposal is accepted by the hub. Calling it again while leaving
    /// proposes what an epoch change dropped.
    pub async fn leave(&self, group_id: &GroupId) -> Result<(), MessengerError> {
        let mut attempts = 0;
        loop {
            let Some(request) = self.group_machine().await.propose_leave(group_id).await? else { return Ok(()) };
            match self.api().group_send(group_id, &request).await {
                Ok(_) => {}
                Err(error) if attempts < MAX_COMMIT_ATTEMPTS && error.server_code().is_some() && !error.is_transient() => {
                    // Another commit won the epoch (catch up: its proposals are gone), or another
                    // device of this user proposed the same removal (read it).
                    attempts += 1;
                    let current = error.body().and_then(|b| b.current_epoch);
                    tracing::debug!(group = %group_id, %error, "leave proposal refused; catching up");
                    match current {
                        Some(_) => self.catch_up(group_id, current).await?,
                        None => self.resync(group_id).await?,
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Sends a text to a group; returns its id and position once the hub stored it. It is in
    /// the history first (without position while it is on its way). If the hub cannot be
    /// reached, the error is returned and the text stays in the history, to be sent again
    /// after the next (re)connection ([`flush_group_outbox`](Self::flush_group_outbox)).
    pub async fn send_group_text(&self, group_id: &GroupId, body: &str) -> Result<(Uuid, GroupSeq), MessengerError> {
        let client_msg_id = Uuid::new_v4();
        let sent = self.send_application(group_id, Application::Text { client_msg_id, body, file: None }).await?;
        let sent = sent.ok_or_else(|| GroupError::InvalidRequest("nothing sent".into()))?;
        self.group_machine().await.message_sent(group_id, &sent).await?;
        Ok((client_msg_id, sent.group_seq))
    }

    /// Changes a group's name, topic, admins or member limit (this user must be an admin) and
    /// sends the metadata to the members, end-to-end encrypted. Members take it only from an
    /// admin; from then on they refuse adds and removals of other users' devices by anyone not
    /// among the admins, and adds past the limit.
    pub async fn update_group(&self, group_id: &GroupId, change: MetaChange) -> Result<(), MessengerError> {
        self.group_machine().await.update_meta(group_id, change).await?;
        self.send_meta(group_id).await
    }

    /// Opens a group for display: subscribes to the presence of its members' users (at most
    /// [`MAX_GROUP_PRESENCE`], in leaf order), as for 1:1 contacts, and returns their presence
    /// now; changes then arrive as [`MessengerEvent::Presence`]. Presence is not pushed to a
    /// group: only the devices that opened it follow it (`spec/groups.md` §4).
    pub async fn open_group(&self, group_id: &GroupId) -> Result<Vec<PresenceInfo>, MessengerError> {
        let me = &self.session().user_id;
        let mut users: Vec<UserId> = Vec::new();
        for (user, _) in self.group_members(group_id).await? {
            if &user != me && !users.contains(&user) && users.len() < MAX_GROUP_PRESENCE {
                users.push(user);
            }
        }
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let presence = self.subscribe_presence(users.clone()).await?;
        Ok(presence.into_iter().filter(|p| users.contains(&p.user)).collect())
    }

    /// Sends again the group metadata that failed to go out, and this device's group texts that
    /// have no position yet (the hub's answer never came: the server was down, the connection
    /// cut), oldest first, each with its own
    /// `client_msg_id`, so one the hub had stored after all is answered with its position and
    /// not stored twice. Runs after each (re)connection; a message that fails holds back its
    /// group's later ones until the next pass, not other groups'.
    pub async fn flush_group_outbox(&self) -> Result<(), MessengerError> {
        let me = self.session().device_id.clone();
        for record in self.groups().await? {
            if record.state != GroupState::Active {
                continue;
            }
            let group_id = record.group_id;
            if self.meta_unsent(&group_id).await? {
                if let Err(error) = self.send_meta(&group_id).await {
                    tracing::warn!(group = %group_id, %error, "group metadata not sent; trying again later");
                    continue;
                }
            }
            let unsent: Vec<GroupMessage> = self
                .group_history(&group_id, GROUP_OUTBOX_SCAN)
                .await?
                .into_iter()
                .filter(|m| m.group_seq.is_none() && m.sender_device == me)
                .collect();
            for message in unsent {
                let what =
                    Application::Text { client_msg_id: message.client_msg_id, body: &message.body, file: message.file.as_ref() };
                match self.send_application(&group_id, what).await {
                    Ok(Some(sent)) => {
                        self.group_machine().await.message_sent(&group_id, &sent).await?;
                        tracing::debug!(group = %group_id, seq = sent.group_seq.get(), "unsent group message sent");
                    }
                    Ok(None) => {}
                    // This group's later messages wait behind it (their order); other groups go on.
                    Err(error) => {
                        tracing::warn!(group = %group_id, %error, "unsent group message not sent; trying again later");
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// The current members of a group: (user, device).
    pub async fn group_members(&self, group_id: &GroupId) -> Result<Vec<(UserId, DeviceId)>, MessengerError> {
        Ok(self.group_machine().await.members(group_id).await?)
    }

    /// This device's groups, latest activity first.
    pub async fn groups(&self) -> Result<Vec<GroupRecord>, MessengerError> {
        use crate::groups::GroupStore as _;
        Ok(self.inner.store.groups().await.map_err(Error::from)?)
    }

    /// One group.
    pub async fn group(&self, group_id: &GroupId) -> Result<Option<GroupRecord>, MessengerError> {
        Ok(self.group_machine().await.group(group_id).await?)
    }

    /// The last `limit` messages of a group, in the hub's order.
    pub async fn group_history(&self, group_id: &GroupId, limit: u32) -> Result<Vec<GroupMessage>, MessengerError> {
        use crate::groups::GroupStore as _;
        Ok(self.inner.store.group_history(group_id, limit).await.map_err(Error::from)?)
    }

    /// Sends the group's metadata and policy to its members (if it has a name and this user is
    /// an admin). It is marked unsent first and sent again by the next
    /// [`flush_group_outbox`](Self::flush_group_outbox) if this fails: members added by a commit
    /// know only their adder as admin until it arrives.
    async fn send_meta(&self, group_id: &GroupId) -> Result<(), MessengerError> {
        let key = format!("{META_UNSENT}{group_id}");
        let store = &self.inner.store;
        store.set(&key, b"1").await.map_err(Error::from)?;
        self.send_application(group_id, Application::Meta).await?;
        store.set(&key, b"0").await.map_err(Error::from)?;
        Ok(())
    }

    /// Whether the group's metadata waits to be sent again.
    async fn meta_unsent(&self, group_id: &GroupId) -> Result<bool, MessengerError> {
        let value = self.inner.store.get(&format!("{META_UNSENT}{group_id}")).await.map_err(Error::from)?;
        Ok(value.is_some_and(|v| v.as_slice() == b"1"))
    }

    /// Encrypts `what` and submits it, again after catching up when the hub finds its epoch too
    /// old. `None` when there was nothing to send.
    pub(super) async fn send_application(
        &self,
        group_id: &GroupId,
        what: Application<'_>,
    ) -> Result<Option<GroupSentResponse>, MessengerError> {
        for _ in 0..MAX_SEND_ATTEMPTS {
            let encrypted = {
                let mut machine = self.group_machine().await;
                match what {
                    Application::Text { client_msg_id, body, file } => {
                        machine.encrypt_message(group_id, client_msg_id, body, file.cloned(), Timestamp::now()).await.map(Some)
                    }
                    Application::Meta => machine.encrypt_meta(group_id).await,
                }
            };
            let request = match encrypted {
                // Members are leaving: their removal is committed before anything is sent.
                Err(GroupError::ProposalsPending(_)) => {
                    self.commit(group_id, &Change::Pending).await?;
                    continue;
                }
                other => other?,
            };
            let Some(request) = request else { return Ok(None) };
            match self.api().group_send(group_id, &request).await {
                Ok(sent) => return Ok(Some(sent)),
                Err(error) if error.server_code() == Some(ErrorCode::EpochConflict) => {
                    let current = error.body().and_then(|b| b.current_epoch);
                    self.catch_up(group_id, current).await?;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(GroupError::Conflict { group_id: group_id.clone(), attempts: MAX_SEND_ATTEMPTS }.into())
    }

    /// Commits `change`: re-sends a pending commit first, then builds, submits and waits for the
    /// commit, rebuilding it after each lost epoch. False when there was nothing to change.
    async fn commit(&self, group_id: &GroupId, change: &Change) -> Result<bool, MessengerError> {
        let _one_at_a_time = self.inner.commit_serial.lock().await;
        if let Some(pending) = self.group_machine().await.pending_commit(group_id).await? {
            tracing::debug!(group = %group_id, "re-sending a pending commit");
            self.submit_commit(group_id, &pending).await?;
        }
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let lists = self.known_lists(group_id).await?;
            let request = {
                let mut machine = self.group_machine().await;
                match change {
                    Change::Add(key_packages) => machine.commit_add(group_id, key_packages, &lists).await?,
                    Change::Remove(users) => machine.commit_remove(group_id, users, &lists).await?,
                    Change::Prune => machine.commit_prune(group_id, &lists).await?,
                    Change::Pending => machine.commit_pending(group_id, &lists).await?,
                }
            };
            let Some(request) = request else { return Ok(false) };
            if self.submit_commit(group_id, &request).await? {
                return Ok(true);
            }
        }
        Err(GroupError::Conflict { group_id: group_id.clone(), attempts: MAX_COMMIT_ATTEMPTS }.into())
    }

    /// The verified device lists this device already holds for the group's member users: local
    /// reads only (a list is fetched when a leaf needs vouching, or on
    /// [`refresh_devices`](Messenger::refresh_devices)), one pass over the members.
    async fn known_lists(&self, group_id: &GroupId) -> Result<Lists, MessengerError> {
        let members = self.group_machine().await.members(group_id).await?;
        let users: BTreeSet<UserId> = members.into_iter().map(|(user, _)| user).collect();
        let mut lists = Lists::new();
        for list in self.inner.driver.known_device_lists(&users).await? {
            lists.insert(list, false);
        }
        Ok(lists)
    }

    /// Submits a commit and waits until it is merged at its position (true), or drops it after
    /// an `epoch_conflict` and catches up (false). Another refusal for good drops it too; a
    /// passing failure keeps it pending, to be re-sent.
    async fn submit_commit(&self, group_id: &GroupId, request: &GroupSendRequest) -> Result<bool, MessengerError> {
        match self.api().group_send(group_id, request).await {
            Ok(sent) => {
                self.wait_for(group_id, |record| record.cursor >= sent.group_seq).await?;
                let record = self.group_machine().await.group(group_id).await?;
                match record {
                    Some(record) if record.state == GroupState::Active => Ok(true),
                    Some(record) => Err(GroupError::NotActive { group_id: group_id.clone(), state: record.state }.into()),
                    None => Err(GroupError::UnknownGroup(group_id.clone()).into()),
                }
            }
            Err(error) if error.server_code() == Some(ErrorCode::EpochConflict) => {
                let current = error.body().and_then(|b| b.current_epoch);
                self.group_machine().await.commit_refused(group_id).await?;
                self.catch_up(group_id, current).await?;
                Ok(false)
            }
            // The commit left out proposals of its epoch this device had not read yet: read
            // them (they are stored) and build the commit again.
            Err(error) if error.server_code() == Some(ErrorCode::MissingProposals) => {
                self.group_machine().await.commit_refused(group_id).await?;
                self.resync(group_id).await?;
                Ok(false)
            }
            Err(error) => {
                if !error.is_transient() {
                    self.group_machine().await.commit_refused(group_id).await?;
                }
                Err(error.into())
            }
        }
    }

    /// Pulls the group's stream until the group is in `epoch` (or as far as it goes).
    async fn catch_up(&self, group_id: &GroupId, epoch: Option<u64>) -> Result<(), MessengerError> {
        match epoch {
            Some(epoch) => self.wait_for(group_id, |record| record.epoch >= epoch).await,
            None => self.resync(group_id).await,
        }
    }

    /// Pulls the stream, then waits for live events until `reached` holds for the group (or it is
    /// no longer active).
    async fn wait_for(&self, group_id: &GroupId, reached: impl Fn(&GroupRecord) -> bool) -> Result<(), MessengerError> {
        let mut progress = self.inner.group_progress.subscribe();
        let mut pulled = false;
        loop {
            let record = self.group_machine().await.group(group_id).await?;
            let record = record.ok_or_else(|| GroupError::UnknownGroup(group_id.clone()))?;
            if reached(&record) || record.state != GroupState::Active {
                return Ok(());
            }
            if !pulled {
                self.resync(group_id).await?;
                pulled = true;
                continue;
            }
            progress.changed().await.map_err(|_| Error::Closed)?;
        }
    }

    /// Pulls the group's events after its cursor (`GET /v1/groups/{id}/events`) and handles them.
    async fn resync(&self, group_id: &GroupId) -> Result<(), MessengerError> {
        let _serial = self.inner.group_serial.lock().await;
        self.resync_locked(group_id).await
    }

    async fn resync_locked(&self, group_id: &GroupId) -> Result<(), MessengerError> {
        loop {
            let cursor = self.group_machine().await.group(group_id).await?.map_or(GroupSeq::ZERO, |r| r.cursor);
            let page = self.api().group_events(group_id, cursor).await?;
            let more = page.more && !page.events.is_empty();
            for event in page.events {
                if &event.group_id == group_id {
                    Box::pin(self.handle_group_event(&event, false)).await?;
                }
            }
            let after = self.group_machine().await.group(group_id).await?.map_or(GroupSeq::ZERO, |r| r.cursor);
            if !more || after == cursor {
                return Ok(());
            }
        }
    }

    /// A group event from the WebSocket.
    pub(super) async fn receive_group_event(&self, event: GroupEvent) -> Result<(), MessengerError> {
        let handled = {
            let _serial = self.inner.group_serial.lock().await;
            self.handle_group_event(&event, true).await
        };
        self.commit_wanted_proposals().await;
        handled
    }

    /// Handles one group event (the caller holds `group_serial`): gets the device lists it
    /// needs, fills a gap before it (once), acknowledges it once stored.
    async fn handle_group_event(&self, event: &GroupEvent, may_resync: bool) -> Result<(), MessengerError> {
        let mut lists = Lists::new();
        let mut resynced = !may_resync;
        for _ in 0..6 {
            let received = self.group_machine().await.receive(event, &lists).await?;
            match received {
                Received::Ack(seq) => {
                    if let Some(conn) = self.inner.driver.transport().conn.as_ref() {
                        conn.group_ack(event.group_id.clone(), seq);
                    }
                    self.inner.group_progress.send_modify(|n| *n += 1);
                    return Ok(());
                }
                Received::Ignored => {
                    self.inner.group_progress.send_modify(|n| *n += 1);
                    return Ok(());
                }
                Received::NeedLists(needs) => {
                    for need in needs {
                        match self.inner.driver.device_list(&need.user, need.refresh).await {
                            Ok(list) => lists.insert(list, need.refresh),
                            // No list to vouch for the user's leaves: they are refused.
                            Err(MessengerError::Untrusted { user, reason }) => {
                                lists.mark_unavailable(user, reason.to_string());
                            }
                            Err(MessengerError::Sdk(error)) if !error.is_transient() && error.server_code().is_some() => {
                                let reason = GroupProblem::ListUnavailable { user: need.user.clone(), reason: error.to_string() };
                                self.inner.driver.emit(MessengerEvent::GroupProblem { group_id: event.group_id.clone(), reason });
                                lists.mark_unavailable(need.user, error.to_string());
                            }
                            // A passing failure: the event is not acknowledged and comes again.
                            Err(error) => return Err(error),
                        }
                    }
                }
                Received::Gap { after } => {
                    if resynced {
                        let reason = GroupProblem::Gap { cursor: after, next: event.group_seq };
                        self.inner.driver.emit(MessengerEvent::GroupProblem { group_id: event.group_id.clone(), reason });
                        return Ok(());
                    }
                    resynced = true;
                    self.resync_locked(&event.group_id).await?;
                }
            }
        }
        Err(GroupError::InvalidRequest(format!("group event {} of {} needs more than it got", event.group_seq, event.group_id))
            .into())
    }

    /// Commits, in the background, the stored proposals of the groups where this device is the
    /// one to do it (a member is leaving). A failure is logged: the next sender or committer
    /// includes the proposals anyway.
    async fn commit_wanted_proposals(&self) {
        for group_id in self.group_machine().await.take_commits_wanted() {
            let messenger = self.clone();
            tokio::spawn(async move {
                if let Err(error) = messenger.commit(&group_id, &Change::Pending).await {
                    tracing::warn!(group = %group_id, %error, "proposals not committed");
                }
            });
        }
    }

    /// Uploads the first KeyPackages of this device, and a new last-resort one when the current
    /// one nears its end.
    pub(super) async fn ensure_key_packages(&self) -> Result<(), MessengerError> {
        let store = &self.inner.store;
        let now = Timestamp::now().as_millis() / 1000;
        let uploaded = store.get(KEY_PACKAGES_UPLOADED).await.map_err(Error::from)?.is_some();
        let ends = store.get(LAST_RESORT_ENDS).await.map_err(Error::from)?;
        let ends = ends.and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u64>().ok()));
        let renew = ends.is_none_or(|ends| ends < now.saturating_add(LAST_RESORT_RENEW_SECS));
        if uploaded && !renew {
            return Ok(());
        }
        self.upload_key_packages(if uploaded { 0 } else { KEY_PACKAGE_TARGET }, renew).await
    }

    /// The server runs low on this device's KeyPackages: tops them up to the target.
    pub(super) async fn replenish_key_packages(&self, count: u32) -> Result<(), MessengerError> {
        let missing = KEY_PACKAGE_TARGET.saturating_sub(count);
        if missing == 0 {
            return Ok(());
        }
        self.upload_key_packages(missing, false).await
    }

    async fn upload_key_packages(&self, count: u32, last_resort: bool) -> Result<(), MessengerError> {
        let now = Timestamp::now().as_millis() / 1000;
        let request = self.group_machine().await.key_packages(count, last_resort, now).await?;
        self.api().upload_keypackages(&request).await?;
        let store = &self.inner.store;
        store.set(KEY_PACKAGES_UPLOADED, b"1").await.map_err(Error::from)?;
        if last_resort {
            let ends = now.saturating_add(KEY_PACKAGE_LIFETIME_SECS);
            store.set(LAST_RESORT_ENDS, ends.to_string().as_bytes()).await.map_err(Error::from)?;
        }
        tracing::debug!(count, last_resort, "KeyPackages uploaded");
        Ok(())
    }
}
