//! [`Driver`]: runs an [`E2eeMachine`] against a [`Transport`]. It holds the machine behind a
//! lock for the length of one machine call (which awaits only the local store), performs the
//! requests the machine hands out with no lock held, and reports each answer back. So a send
//! waiting for the server never holds up an incoming message, and an incoming message whose
//! sender's device list is being fetched never holds up a send.

use super::MessengerError;
use crate::e2ee::StoreError;
use crate::e2ee::{CryptoStore, Done, E2eeError, E2eeMachine, Failure, MessengerEvent, OutgoingRequest, Progress, Response};
use crate::{Api, Connection, Error};
use parley_crypto::identity::VerifiedDeviceList;
use parley_spec::v1::events::{MessageEvent, ReceiptEvent};
use parley_spec::UserId;
use rand::{CryptoRng, RngCore};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use tokio::sync::{mpsc, Mutex, MutexGuard};
use uuid::Uuid;

/// Performs the machine's requests on the network.
pub(crate) trait Transport: Send + Sync + 'static {
    /// Performs one request and returns the server's answer.
    fn perform(&self, request: OutgoingRequest) -> impl Future<Output = Result<Response, Error>> + Send;
}

/// The real network: HTTP for keys and device lists, the WebSocket for sends.
pub(crate) struct Network {
    pub(crate) api: Api,
    pub(crate) conn: Option<Connection>,
}

impl Transport for Network {
    async fn perform(&self, request: OutgoingRequest) -> Result<Response, Error> {
        match request {
            OutgoingRequest::FetchDeviceList { user, .. } => self.api.device_list(&user).await.map(Response::DeviceList),
            OutgoingRequest::ClaimKeys { request, .. } => self.api.claim_keys(&request).await.map(Response::KeysClaimed),
            OutgoingRequest::UploadKeys { request, .. } => self.api.upload_keys(&request).await.map(|_| Response::KeysUploaded),
            OutgoingRequest::Send { request, .. } => match &self.conn {
                Some(conn) => conn.send_request(request).await.map(Response::Sent),
                None => Err(Error::NotConnected),
            },
        }
    }
}

/// How a failed request looks to the machine.
fn failure(error: &Error) -> Failure {
    error.server_code().map_or(Failure::NoAnswer, Failure::Refused)
}

/// An [`E2eeMachine`], the transport its requests go to, and where its events go.
pub(crate) struct Driver<S, R, T> {
    machine: Mutex<E2eeMachine<S, R>>,
    transport: T,
    events: mpsc::UnboundedSender<MessengerEvent>,
}

/// The machine, locked for one call; its events go to the application when the guard drops
/// (still in order: before the lock is released).
pub(crate) struct MachineGuard<'a, S, R> {
    guard: MutexGuard<'a, E2eeMachine<S, R>>,
    events: &'a mpsc::UnboundedSender<MessengerEvent>,
}

impl<S, R> Deref for MachineGuard<'_, S, R> {
    type Target = E2eeMachine<S, R>;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl<S, R> DerefMut for MachineGuard<'_, S, R> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

impl<S, R> Drop for MachineGuard<'_, S, R> {
    fn drop(&mut self) {
        for event in self.guard.take_events() {
            // The application stopped listening: nothing to tell it any more.
            let _ = self.events.send(event);
        }
    }
}

impl<S: CryptoStore, R: RngCore + CryptoRng + Send, T: Transport> Driver<S, R, T> {
    pub(crate) fn new(machine: E2eeMachine<S, R>, transport: T, events: mpsc::UnboundedSender<MessengerEvent>) -> Self {
        Self { machine: Mutex::new(machine), transport, events }
    }

    /// The machine back (no request of it may be pending).
    pub(crate) fn into_machine(self) -> E2eeMachine<S, R> {
        self.machine.into_inner()
    }

    /// The machine, for one call. Never hold the guard across a network round trip.
    pub(crate) async fn machine(&self) -> MachineGuard<'_, S, R> {
        MachineGuard { guard: self.machine.lock().await, events: &self.events }
    }

    /// Whether no machine call is in progress (nobody holds the lock).
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.machine.try_lock().is_ok()
    }

    pub(crate) fn transport(&self) -> &T {
        &self.transport
    }

    /// Hands an event to the application.
    pub(crate) fn emit(&self, event: MessengerEvent) {
        let _ = self.events.send(event);
    }

    /// Performs requests until the piece of work `progress` belongs to is done. A piece of work
    /// that stopped because a request failed returns that request's error.
    pub(crate) async fn drive(&self, mut progress: Progress) -> Result<Done, MessengerError> {
        loop {
            let request = match progress {
                Progress::Next(request) => request,
                Progress::Done(done) => return Ok(done),
            };
            let id = request.id();
            let (answer, error) = match self.transport.perform(request).await {
                Ok(response) => (Ok(response), None),
                Err(error) => (Err(failure(&error)), Some(error)),
            };
            progress = self.machine().await.mark_request_done(id, answer).await?;
            if let (Progress::Done(Done::Failed(_) | Done::Refused { .. }), Some(error)) = (&progress, error) {
                return Err(error.into());
            }
        }
    }

    /// Decrypts and files a received message (fetching the sender's device list if a session
    /// start needs it).
    pub(crate) async fn receive_message(&self, message: MessageEvent) -> Result<(), MessengerError> {
        let progress = self.machine().await.receive_message(message).await?;
        self.drive(progress).await?;
        Ok(())
    }

    /// Applies a receipt.
    pub(crate) async fn receive_receipt(&self, receipt: ReceiptEvent) -> Result<(), MessengerError> {
        Ok(self.machine().await.receive_receipt(receipt).await?)
    }

    /// Uploads a new batch of one-time prekeys.
    pub(crate) async fn replenish(&self) -> Result<(), MessengerError> {
        let request = self.machine().await.replenish_prekeys().await?;
        self.drive(Progress::Next(request)).await?;
        Ok(())
    }

    /// The verified device list of `user`: the known one, or (when asked, or when none is
    /// known) the server's, verified against the pinned identity key and the last version.
    pub(crate) async fn device_list(&self, user: &UserId, refresh: bool) -> Result<VerifiedDeviceList, MessengerError> {
        if !refresh {
            if let Some(list) = self.machine().await.known_device_list(user).await? {
                return Ok(list);
            }
        }
        let request = self.machine().await.fetch_device_list(user);
        let id = request.id();
        match self.drive(Progress::Next(request)).await? {
            Done::DeviceList(list) => Ok(*list),
            // A fetch ends in a list, an error, or a failure that `drive` returned.
            _ => Err(MessengerError::Internal(E2eeError::UnexpectedAnswer(id))),
        }
    }

    /// The verified device lists this device already holds for `users` (the local store, no
    /// network): users without one are left out. One machine call for all of them, so at 1,000
    /// users it is 1,000 local reads (cached once read). A stored list that no longer verifies
    /// is left out too, with a warning.
    pub(crate) async fn known_device_lists<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
    ) -> Result<Vec<VerifiedDeviceList>, MessengerError> {
        let mut machine = self.machine().await;
        let mut lists = Vec::new();
        for user in users {
            match machine.known_device_list(user).await {
                Ok(Some(list)) => lists.push(list),
                Ok(None) => {}
                // The store cannot be read: nothing reliable to commit on.
                Err(E2eeError::Store(error @ StoreError::Backend(_))) => return Err(E2eeError::Store(error).into()),
                Err(error) => tracing::warn!(%user, %error, "stored device list left out"),
            }
        }
        Ok(lists)
    }

    /// Sends everything in the outbox, oldest first. A message to a user whose keys are
    /// untrusted, or that the server refused for good, does not hold back the others; any
    /// other failure stops the pass (the rest waits for the next one). Returns the outcome of
    /// the entry `report`, or that failure.
    pub(crate) async fn flush(&self, report: Option<Uuid>) -> Result<(), MessengerError> {
        let mut outcome = Ok(());
        let outbox = self.machine().await.outbox().await?;
        for entry in outbox {
            let client_msg_id = entry.client_msg_id;
            match self.send_entry(entry).await {
                Ok(()) => {}
                Err(e @ MessengerError::Untrusted { .. }) => {
                    tracing::warn!(error = %e, "message held in the outbox");
                    if report == Some(client_msg_id) {
                        outcome = Err(e);
                    }
                }
                Err(MessengerError::Sdk(e)) if e.server_code().is_some_and(crate::e2ee::is_permanent) => {
                    if report == Some(client_msg_id) {
                        outcome = Err(MessengerError::Sdk(e));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        outcome
    }

    async fn send_entry(&self, entry: crate::e2ee::OutboxEntry) -> Result<(), MessengerError> {
        let progress = self.machine().await.send(entry).await?;
        self.drive(progress).await?;
        Ok(())
    }
}
