//! Test support: a fake server that answers the machine's requests the way Parley's server
//! does for E2EE (key directory with one-time prekeys claimed at most once, signed device
//! lists, sends stored once per `client_msg_id` and routed to each target device's inbox),
//! and devices with deterministic keys and RNGs.

use super::{Done, E2eeError, E2eeMachine, Failure, MemoryStore, OutgoingRequest, Progress, Response};
use parley_crypto::identity::{DeviceIdentity, UserIdentity};
use parley_spec::error::DeviceRef;
use parley_spec::v1::events::MessageEvent;
use parley_spec::v1::keys::{
    ClaimResponse, DeviceKeys, DeviceListEntry, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey,
};
use parley_spec::v1::messages::SentResponse;
use parley_spec::{DeviceId, ErrorCode, ServerMsgId, Timestamp, UserId};
use rand::rngs::StdRng;
use rand::SeedableRng as _;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

pub(crate) type TestMachine = E2eeMachine<MemoryStore, StdRng>;

/// A device's published keys.
#[derive(Default)]
struct Published {
    device_keys: Option<DeviceKeys>,
    signed: Option<SignedPrekey>,
    last_resort: Option<SignedPrekey>,
    one_time: VecDeque<OneTimePrekey>,
}

/// The server's side of E2EE.
#[derive(Default)]
pub(crate) struct FakeServer {
    lists: BTreeMap<UserId, SignedDeviceList>,
    keys: BTreeMap<(UserId, DeviceId), Published>,
    inboxes: BTreeMap<(UserId, DeviceId), VecDeque<MessageEvent>>,
    stored: BTreeMap<Uuid, SentResponse>,
    next_id: u64,
    /// Answer the next sends with this code instead of storing them.
    pub(crate) refuse_sends: VecDeque<ErrorCode>,
}

/// A shared [`FakeServer`].
pub(crate) type Shared = Arc<Mutex<FakeServer>>;

impl FakeServer {
    pub(crate) fn shared() -> Shared {
        Arc::new(Mutex::new(Self::default()))
    }

    /// Serves `list` as its user's device list from now on.
    pub(crate) fn serve_list(&mut self, list: SignedDeviceList) {
        self.lists.insert(list.user_id.clone(), list);
    }

    /// Takes the next message waiting for a device.
    pub(crate) fn next_message(&mut self, user: &UserId, device: &DeviceId) -> Option<MessageEvent> {
        self.inboxes.get_mut(&(user.clone(), device.clone()))?.pop_front()
    }

    /// What the server answers `from` for `request`.
    pub(crate) fn answer(&mut self, from: (&UserId, &DeviceId), request: &OutgoingRequest) -> Result<Response, Failure> {
        match request {
            OutgoingRequest::FetchDeviceList { user, .. } => {
                self.lists.get(user).cloned().map(Response::DeviceList).ok_or(Failure::Refused(ErrorCode::NotFound))
            }
            OutgoingRequest::UploadKeys { request, .. } => {
                let published = self.keys.entry((from.0.clone(), from.1.clone())).or_default();
                if let Some(keys) = &request.device_keys {
                    published.device_keys = Some(keys.clone());
                }
                if let Some(signed) = &request.signed_prekey {
                    published.signed = Some(signed.clone());
                }
                if let Some(last_resort) = &request.last_resort_prekey {
                    published.last_resort = Some(last_resort.clone());
                }
                published.one_time.extend(request.one_time_prekeys.iter().cloned());
                Ok(Response::KeysUploaded)
            }
            OutgoingRequest::ClaimKeys { request, .. } => {
                let (mut bundles, mut missing) = (Vec::new(), Vec::new());
                for DeviceRef { user, device, .. } in &request.devices {
                    match self.keys.get_mut(&(user.clone(), device.clone())) {
                        Some(Published { device_keys: Some(keys), signed: Some(signed), last_resort, one_time }) => {
                            // A one-time prekey is handed out once.
                            let one_time = one_time.pop_front();
                            bundles.push(PrekeyBundle::new(keys.clone(), signed.clone(), one_time, last_resort.clone()));
                        }
                        _ => missing.push(DeviceRef::new(user.clone(), device.clone())),
                    }
                }
                Ok(Response::KeysClaimed(ClaimResponse::new(bundles, missing)))
            }
            OutgoingRequest::Send { request, .. } => {
                if let Some(code) = self.refuse_sends.pop_front() {
                    return Err(Failure::Refused(code));
                }
                if let Some(sent) = self.stored.get(&request.client_msg_id) {
                    let mut again = *sent;
                    again.duplicate = true;
                    return Ok(Response::Sent(again));
                }
                self.next_id += 1;
                let (id, ts) = (ServerMsgId::new(self.next_id), Timestamp::from_millis(1_000 + self.next_id));
                for envelope in &request.envelopes {
                    let event = MessageEvent::new(
                        id,
                        from.0.clone(),
                        from.1.clone(),
                        request.to.clone(),
                        ts,
                        envelope.ciphertext.0.clone(),
                    );
                    self.inboxes.entry((envelope.user.clone(), envelope.device.clone())).or_default().push_back(event);
                }
                let sent = SentResponse::new(request.client_msg_id, id, ts, false);
                self.stored.insert(request.client_msg_id, sent);
                Ok(Response::Sent(sent))
            }
        }
    }
}

/// A user: the identity (from a fixed seed, so tests can sign lists for it) and its devices.
pub(crate) struct TestUser {
    pub(crate) id: UserId,
    identity_seed: [u8; 32],
    entries: Vec<DeviceListEntry>,
    version: u64,
}

impl TestUser {
    pub(crate) fn new(name: &str, seed: u8) -> Self {
        Self {
            id: format!("@{name}:x").parse().expect("a valid user id"),
            identity_seed: [seed; 32],
            entries: Vec::new(),
            version: 0,
        }
    }

    pub(crate) fn identity(&self) -> UserIdentity {
        UserIdentity::from_bytes(&self.identity_seed)
    }

    /// Signs the user's current device list with the next version.
    pub(crate) fn sign_list(&mut self) -> SignedDeviceList {
        self.version += 1;
        self.identity().sign_device_list(&self.id, self.version, self.entries.clone()).expect("a valid device list")
    }

    /// Sets up a device: its keys uploaded, the user's list (with it) signed and served.
    pub(crate) async fn add_device(&mut self, server: &Shared, device: &str, seed: u64) -> TestMachine {
        let mut rng = StdRng::seed_from_u64(seed);
        let device_id: DeviceId = device.parse().expect("a valid device id");
        let keys = DeviceIdentity::generate(&mut rng);
        self.entries.push(keys.list_entry(&device_id));
        let machine = E2eeMachine::create(MemoryStore::new(), rng, self.id.clone(), device_id, self.identity(), keys).await;
        let mut machine = machine.expect("a new machine");
        let upload = machine.initial_keys().await.expect("initial keys");
        run(&mut machine, server, Progress::Next(upload)).await.expect("keys uploaded");
        let list = self.sign_list();
        server.lock().expect("not poisoned").serve_list(list);
        machine
    }
}

/// Answers `machine`'s requests from `server` until the work is done.
pub(crate) async fn run(machine: &mut TestMachine, server: &Shared, mut progress: Progress) -> Result<Done, E2eeError> {
    loop {
        let request = match progress {
            Progress::Next(request) => request,
            Progress::Done(done) => return Ok(done),
        };
        let from = (machine.user_id().clone(), machine.device_id().clone());
        let answer = server.lock().expect("not poisoned").answer((&from.0, &from.1), &request);
        progress = machine.mark_request_done(request.id(), answer).await?;
    }
}

/// Hands `machine` every message waiting for it; returns how many.
pub(crate) async fn deliver_all(machine: &mut TestMachine, server: &Shared) -> usize {
    let mut count = 0;
    loop {
        let next = server.lock().expect("not poisoned").next_message(machine.user_id(), machine.device_id());
        let Some(message) = next else { return count };
        let progress = machine.receive_message(message).await.expect("received");
        run(machine, server, progress).await.expect("handled");
        count += 1;
    }
}
