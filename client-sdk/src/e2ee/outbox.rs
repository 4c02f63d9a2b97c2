//! Sending an outbox entry: the device lists of the recipient and of the own user, bundles for
//! devices without a usable session, one envelope per device, then the server's answer. A
//! `devices_mismatch` answer fetches the lists again and tries again, at most
//! [`MAX_ATTEMPTS`] sends in all; then the server is not trusted.

use super::{
    new_uuid, BundleError, CryptoError, CryptoStore, Done, E2eeError, E2eeMachine, Failure, MessengerEvent, OutboxEntry,
};
use super::{AfterList, OutgoingRequest, Pending, Progress, Untrust};
use crate::store::StoredMessage;
use parley_crypto::identity::VerifiedDevice;
use parley_crypto::ratchet::Session as Ratchet;
use parley_crypto::x3dh::{self, PrekeyPolicy};
use parley_spec::error::DeviceRef;
use parley_spec::v1::content::{Attachment, Content, FileContent, TextContent};
use parley_spec::v1::keys::{ClaimRequest, ClaimResponse};
use parley_spec::v1::messages::{Envelope, SendRequest, SentResponse};
use parley_spec::{DeviceId, ErrorCode, Timestamp, UserId};
use rand::{CryptoRng, RngCore};
use std::collections::BTreeMap;
use uuid::Uuid;
use zeroize::Zeroizing;

/// Sends of one entry before a server that keeps answering `devices_mismatch` is reported.
pub const MAX_ATTEMPTS: u8 = 3;

/// One outbox entry on its way.
pub(super) struct SendJob {
    /// Boxed: an entry with a file is large, and jobs move through the pending requests.
    entry: Box<OutboxEntry>,
    /// Sends made so far that the server answered `devices_mismatch`.
    mismatches: u8,
    /// Users whose device lists must be fetched again before the next send.
    refresh: Vec<UserId>,
    /// Sessions started from bundles claimed for this send (`None`: none claimed yet).
    claimed: Option<BTreeMap<(UserId, DeviceId), Ratchet>>,
}

impl SendJob {
    pub(super) fn client_msg_id(&self) -> Uuid {
        self.entry.client_msg_id
    }

    /// `user`'s list was fetched again.
    pub(super) fn refreshed(&mut self, user: &UserId) {
        self.refresh.retain(|u| u != user);
    }
}

/// Errors after which sending the same request again can never succeed.
pub(crate) fn is_permanent(code: ErrorCode) -> bool {
    !matches!(code, ErrorCode::RateLimited | ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::DevicesMismatch)
}

impl<S: CryptoStore, R: RngCore + CryptoRng + Send> E2eeMachine<S, R> {
    /// Writes a text message to `to` into the history and the outbox (it goes out with the
    /// next [`E2eeMachine::send`] of it). Returns its new id.
    pub async fn enqueue_text(&mut self, to: &UserId, body: &str, now: Timestamp) -> Result<Uuid, E2eeError> {
        self.enqueue_message(to, body, None, false, now).await
    }

    /// Writes a file message (an uploaded file and its caption) to `to` into the history and
    /// the outbox, as [`E2eeMachine::enqueue_text`] does. Returns its new id.
    /// With `once`, the server deletes the file once every device it went to downloaded it
    /// (a temporary chat).
    pub async fn enqueue_file(
        &mut self,
        to: &UserId,
        file: Attachment,
        caption: &str,
        once: bool,
        now: Timestamp,
    ) -> Result<Uuid, E2eeError> {
        self.enqueue_message(to, caption, Some(file), once, now).await
    }

    async fn enqueue_message(
        &mut self,
        to: &UserId,
        body: &str,
        file: Option<Attachment>,
        media_once: bool,
        now: Timestamp,
    ) -> Result<Uuid, E2eeError> {
        let client_msg_id = new_uuid(&mut self.rng);
        let message = StoredMessage {
            local_id: 0,
            peer: to.clone(),
            sender: self.user_id.clone(),
            sender_device: self.device_id.clone(),
            client_msg_id,
            server_msg_id: None,
            ts: now,
            body: body.to_owned(),
            file: file.clone(),
            delivered: false,
            read: false,
        };
        self.store.add_message(&message).await?;
        self.store.enqueue(&OutboxEntry { client_msg_id, to: to.clone(), body: body.to_owned(), file, media_once }, now).await?;
        Ok(client_msg_id)
    }

    /// The outbox, oldest first.
    pub async fn outbox(&self) -> Result<Vec<OutboxEntry>, E2eeError> {
        Ok(self.store.outbox().await?)
    }

    /// Starts sending an outbox entry: returns its first request, or
    /// [`Done::AlreadySending`] when another piece of work is sending it. It ends in
    /// [`Done::Sent`] (removed from the outbox), [`Done::Refused`] (removed too),
    /// [`Done::Failed`] (kept for a later attempt) or an [`E2eeError::Untrusted`] (kept: held
    /// until the keys are sorted out).
    pub async fn send(&mut self, entry: OutboxEntry) -> Result<Progress, E2eeError> {
        if !self.sending.insert(entry.client_msg_id) {
            return Ok(Progress::Done(Done::AlreadySending));
        }
        let client_msg_id = entry.client_msg_id;
        let job = SendJob { entry: Box::new(entry), mismatches: 0, refresh: Vec::new(), claimed: None };
        let result = self.advance(job).await;
        self.settle(client_msg_id, &result);
        result
    }

    /// Forgets that an entry is being sent once its work ended.
    pub(super) fn settle(&mut self, client_msg_id: Uuid, result: &Result<Progress, E2eeError>) {
        if !matches!(result, Ok(Progress::Next(_))) {
            self.sending.remove(&client_msg_id);
        }
    }

    /// The recipient, and the own user for the other own devices (once, for a note to self).
    fn job_users(&self, job: &SendJob) -> Vec<UserId> {
        let to = job.entry.to.clone();
        if to == self.user_id {
            vec![to]
        } else {
            vec![to, self.user_id.clone()]
        }
    }

    /// The devices of `users`' verified lists, without this device.
    async fn targets(&mut self, users: &[UserId]) -> Result<Vec<(UserId, VerifiedDevice)>, E2eeError> {
        let mut targets = Vec::new();
        for user in users {
            let Some(list) = self.known_device_list(user).await? else { continue };
            for device in list.devices() {
                if user == &self.user_id && device.device_id() == &self.device_id {
                    continue;
                }
                targets.push((user.clone(), device.clone()));
            }
        }
        Ok(targets)
    }

    /// The stored session with a device, if it is still usable: made with the identity key the
    /// device has now (a device whose keys changed under the same id starts over).
    async fn usable_session(&self, user: &UserId, device: &VerifiedDevice) -> Result<Option<Ratchet>, E2eeError> {
        let Some(bytes) = self.store.session(user, device.device_id()).await? else { return Ok(None) };
        let session = Ratchet::from_bytes(&bytes).map_err(CryptoError::from)?;
        Ok((session.remote_identity_key().as_bytes() == device.identity_key().as_bytes()).then_some(session))
    }

    /// The next step of a send: a device list to fetch, bundles to claim, or the envelopes.
    pub(super) async fn advance(&mut self, mut job: SendJob) -> Result<Progress, E2eeError> {
        let users = self.job_users(&job);
        for user in &users {
            if job.refresh.contains(user) || self.known_device_list(user).await?.is_none() {
                return Ok(Progress::Next(self.fetch_list(user, AfterList::Send(job))));
            }
        }
        let targets = self.targets(&users).await?;
        if job.claimed.is_none() {
            let mut missing = Vec::new();
            for (user, device) in &targets {
                if self.usable_session(user, device).await?.is_none() {
                    missing.push(DeviceRef::new(user.clone(), device.device_id().clone()));
                }
            }
            if !missing.is_empty() {
                let request = ClaimRequest::new(missing);
                return Ok(Progress::Next(
                    self.request(Pending::ClaimKeys(job), |id| OutgoingRequest::ClaimKeys { id, request }),
                ));
            }
        }
        let (id, to, body) = (job.entry.client_msg_id, job.entry.to.clone(), job.entry.body.clone());
        let content = match &job.entry.file {
            None => Content::Text(TextContent::new(id, to, body)),
            Some(file) => Content::File(FileContent::new(id, to, file.clone(), body)),
        };
        // A content is strings, numbers and a UUID: its JSON encoding cannot fail.
        let plaintext = Zeroizing::new(serde_json::to_vec(&content).expect("message content encodes as JSON"));
        let mut claimed = job.claimed.take().unwrap_or_default();
        let mut envelopes = Vec::with_capacity(targets.len());
        for (user, device) in &targets {
            let fresh = claimed.remove(&(user.clone(), device.device_id().clone()));
            // A session that appeared since the claim (the device started one with us) wins
            // over the one from the claimed bundle.
            let session = match self.usable_session(user, device).await? {
                Some(session) => Some(session),
                None => fresh,
            };
            // A device without keys on the server cannot be reached; the server will answer
            // devices_mismatch if it insists on it.
            let Some(mut session) = session else { continue };
            let ciphertext = session.encrypt(&mut self.rng, &plaintext).map_err(CryptoError::from)?;
            self.store.save_session(user, device.device_id(), &session.to_bytes()).await?;
            envelopes.push(Envelope::new(user.clone(), device.device_id().clone(), ciphertext));
        }
        // A file on this user's server is held there until the recipients' devices have the
        // message (spec/media.md §5).
        let media = crate::media::held_media(job.entry.file.as_ref(), &self.user_id);
        let request =
            SendRequest::new(job.entry.client_msg_id, job.entry.to.clone(), envelopes).with_media(media, job.entry.media_once);
        Ok(Progress::Next(self.request(Pending::Send(job), |id| OutgoingRequest::Send { id, request })))
    }

    /// Bundles arrived: each must carry exactly the keys the verified list names for its
    /// device; sessions start from them (kept in the job until the envelopes are made).
    pub(super) async fn on_keys_claimed(&mut self, mut job: SendJob, claimed: ClaimResponse) -> Result<Progress, E2eeError> {
        let targets = self.targets(&self.job_users(&job)).await?;
        let mut sessions = BTreeMap::new();
        for bundle in claimed.bundles {
            let (user, device_id) = (bundle.device_keys.user_id.clone(), bundle.device_keys.device_id.clone());
            if !targets.iter().any(|(u, d)| *u == user && *d.device_id() == device_id) {
                continue;
            }
            let Some(list) = self.known_device_list(&user).await? else { continue };
            if let Err(e) = list.check_device_keys(&bundle.device_keys) {
                return Err(self.untrusted(&user, Untrust::Bundle { device: device_id, error: BundleError::DeviceKeys(e) }));
            }
            let initiated =
                match x3dh::initiate(&mut self.rng, self.device.identity_secret(), &bundle, PrekeyPolicy::AllowThreeDh) {
                    Ok(initiated) => initiated,
                    Err(e) => {
                        return Err(self.untrusted(&user, Untrust::Bundle { device: device_id, error: BundleError::X3dh(e) }))
                    }
                };
            let session = Ratchet::initiate(&mut self.rng, initiated).map_err(CryptoError::from)?;
            sessions.insert((user, device_id), session);
        }
        job.claimed = Some(sessions);
        self.advance(job).await
    }

    /// The server stored the message.
    pub(super) async fn on_sent(&mut self, job: SendJob, sent: SentResponse) -> Result<Progress, E2eeError> {
        let client_msg_id = job.entry.client_msg_id;
        self.store.mark_sent(&self.user_id, client_msg_id, sent.server_msg_id, sent.ts).await?;
        self.store.dequeue(client_msg_id).await?;
        self.emit(MessengerEvent::Sent { client_msg_id, server_msg_id: sent.server_msg_id });
        self.apply_deferred_receipts().await?;
        Ok(Progress::Done(Done::Sent { client_msg_id, server_msg_id: sent.server_msg_id }))
    }

    /// The send failed: try again with fresh device lists, give up for good, or stop for now.
    pub(super) async fn on_send_failed(&mut self, mut job: SendJob, failure: Failure) -> Result<Progress, E2eeError> {
        let client_msg_id = job.entry.client_msg_id;
        match failure {
            Failure::Refused(ErrorCode::DevicesMismatch) => {
                job.mismatches += 1;
                if job.mismatches >= MAX_ATTEMPTS {
                    let to = job.entry.to.clone();
                    return Err(self.untrusted(&to, Untrust::DevicesKeepDiffering));
                }
                job.refresh = self.job_users(&job);
                job.claimed = None;
                self.advance(job).await
            }
            Failure::Refused(code) if is_permanent(code) => {
                // The server will never take it (unknown user, too large, ...): drop it from the
                // outbox so that it does not hold back later messages.
                self.store.dequeue(client_msg_id).await?;
                self.emit(MessengerEvent::SendFailed { client_msg_id, code });
                Ok(Progress::Done(Done::Refused { client_msg_id, code }))
            }
            // Not answered, or refused for now: the entry stays in the outbox.
            failure => Ok(Progress::Done(Done::Failed(failure))),
        }
    }
}
