//! Group machines driven through a tiny hub built on `parley_crypto::mls::HubGroup`, as the
//! server's contract describes it: one stream per group in `group_seq` order, fanned out to
//! every member device (the sender's too), a commit's Welcome at the commit's position for the
//! devices it adds, one commit per epoch (`epoch_conflict` with the hub's epoch otherwise),
//! submissions idempotent per device and `client_msg_id`. No server, no sockets, no clock.

use super::*;
use parley_crypto::identity::{verify_device_list, UserIdentity};
use parley_crypto::mls::HubGroup;
use parley_spec::v1::content::GroupMetaContent;
use parley_spec::v1::groups::GroupSentResponse;
use parley_spec::{ErrorBody, ErrorCode};
use rand::rngs::StdRng;
use rand::SeedableRng as _;

type Dev = (UserId, DeviceId);

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// One group at the hub.
struct HubEntry {
    public: HubGroup<MemoryStorage>,
    seq: u64,
    members: BTreeSet<Dev>,
    answers: BTreeMap<(Dev, Uuid), GroupSentResponse>,
}

/// The hub and every device's stream.
#[derive(Default)]
struct Hub {
    groups: BTreeMap<GroupId, HubEntry>,
    streams: BTreeMap<Dev, VecDeque<GroupEvent>>,
    /// Every event of every group, for resync.
    log: Vec<(Dev, GroupEvent)>,
}

fn refusal(code: ErrorCode, current_epoch: Option<u64>) -> ErrorBody {
    let mut body = ErrorBody::new(code, "refused");
    body.current_epoch = current_epoch;
    body
}

impl Hub {
    fn create(&mut self, from: &Dev, request: &CreateGroupRequest) {
        let public = HubGroup::from_group_info(&request.group_info.0, &request.ratchet_tree.0, MemoryStorage::default()).unwrap();
        let members = BTreeSet::from([from.clone()]);
        self.groups.insert(request.group_id.clone(), HubEntry { public, seq: 0, members, answers: BTreeMap::new() });
    }

    fn send(&mut self, from: &Dev, group_id: &GroupId, request: &GroupSendRequest) -> Result<GroupSentResponse, ErrorBody> {
        let entry = self.groups.get_mut(group_id).ok_or_else(|| refusal(ErrorCode::UnknownGroup, None))?;
        if !entry.members.contains(from) {
            return Err(refusal(ErrorCode::NotAMember, None));
        }
        if let Some(answer) = entry.answers.get(&(from.clone(), request.client_msg_id)) {
            let mut again = *answer;
            again.duplicate = true;
            return Ok(again);
        }
        let make = |seq: u64, epoch: u64, kind, message: Vec<u8>, tree: Option<Vec<u8>>| {
            GroupEvent::new(
                group_id.clone(),
                GroupSeq::new(seq),
                epoch,
                kind,
                from.0.clone(),
                from.1.clone(),
                request.client_msg_id,
                message,
                tree,
                Timestamp::from_millis(1_000 + seq),
            )
        };
        let mut out = Vec::new();
        let epoch;
        match &request.group_info {
            Some(group_info) => {
                let accepted = match entry.public.check_commit(&request.message.0, &group_info.0) {
                    Ok(accepted) => accepted,
                    Err(MlsError::EpochConflict { current }) => return Err(refusal(ErrorCode::EpochConflict, Some(current))),
                    Err(MlsError::MissingProposals { .. }) => return Err(refusal(ErrorCode::MissingProposals, None)),
                    Err(_) => return Err(refusal(ErrorCode::BadMlsMessage, None)),
                };
                epoch = entry.public.epoch();
                let changes = accepted.changes().to_vec();
                entry.public.merge(accepted).unwrap();
                entry.seq += 1;
                let event = make(entry.seq, epoch, GroupEventKind::Commit, request.message.0.clone(), None);
                // The commit goes to the members before it (the removed ones see their removal).
                out.extend(entry.members.iter().map(|d| (d.clone(), event.clone())));
                for change in changes {
                    match change {
                        parley_crypto::mls::MemberChange::Added(leaf) => {
                            let device = (leaf.user().clone(), leaf.device().clone());
                            let welcome = request.welcome.as_ref().expect("a Welcome with adds").0.clone();
                            let tree = entry.public.ratchet_tree().unwrap();
                            let event = make(entry.seq, epoch, GroupEventKind::Welcome, welcome, Some(tree));
                            out.push((device.clone(), event));
                            entry.members.insert(device);
                        }
                        parley_crypto::mls::MemberChange::Removed { leaf, .. } => {
                            entry.members.remove(&(leaf.user().clone(), leaf.device().clone()));
                        }
                        parley_crypto::mls::MemberChange::Updated { .. } => {}
                    }
                }
            }
            None if entry.public.message_kind(&request.message.0) == Ok(parley_crypto::mls::MessageKind::Proposal) => {
                let proposal = match entry.public.check_proposal(&request.message.0) {
                    Ok(proposal) => proposal,
                    Err(MlsError::EpochConflict { current }) => return Err(refusal(ErrorCode::EpochConflict, Some(current))),
                    Err(_) => return Err(refusal(ErrorCode::BadMlsMessage, None)),
                };
                entry.public.store_proposal(proposal).unwrap();
                epoch = entry.public.epoch();
                entry.seq += 1;
                let event = make(entry.seq, epoch, GroupEventKind::Proposal, request.message.0.clone(), None);
                out.extend(entry.members.iter().map(|d| (d.clone(), event.clone())));
            }
            None => {
                epoch = match entry.public.check_application(&request.message.0) {
                    Ok(info) => info.epoch,
                    Err(MlsError::EpochConflict { current }) => return Err(refusal(ErrorCode::EpochConflict, Some(current))),
                    Err(_) => return Err(refusal(ErrorCode::BadMlsMessage, None)),
                };
                entry.seq += 1;
                let event = make(entry.seq, epoch, GroupEventKind::Application, request.message.0.clone(), None);
                out.extend(entry.members.iter().map(|d| (d.clone(), event.clone())));
            }
        }
        let answer =
            GroupSentResponse::new(request.client_msg_id, GroupSeq::new(entry.seq), epoch, Timestamp::from_millis(1), false);
        entry.answers.insert((from.clone(), request.client_msg_id), answer);
        for (device, event) in out {
            self.log.push((device.clone(), event.clone()));
            self.streams.entry(device).or_default().push_back(event);
        }
        Ok(answer)
    }

    fn next(&mut self, device: &Dev) -> Option<GroupEvent> {
        self.streams.get_mut(device)?.pop_front()
    }

    /// `GET /v1/groups/{id}/events?after=N` for `device`.
    fn events_after(&self, device: &Dev, group_id: &GroupId, after: GroupSeq) -> Vec<GroupEvent> {
        self.log
            .iter()
            .filter(|(d, e)| d == device && &e.group_id == group_id && e.group_seq > after)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

/// The signed device lists every device trusts (the key directory, verified).
#[derive(Default)]
struct Directory {
    owners: BTreeMap<UserId, (UserIdentity, Vec<parley_spec::v1::keys::DeviceListEntry>, u64)>,
    lists: BTreeMap<UserId, VerifiedDeviceList>,
}

impl Directory {
    fn publish(&mut self, user: &UserId, device: &DeviceId, identity: &DeviceIdentity, seed: u8) {
        let (owner, entries, version) =
            self.owners.entry(user.clone()).or_insert_with(|| (UserIdentity::from_bytes(&[seed; 32]), Vec::new(), 0));
        entries.push(identity.list_entry(device));
        *version += 1;
        let signed = owner.sign_device_list(user, *version, entries.clone()).unwrap();
        self.lists.insert(user.clone(), verify_device_list(&signed, user, None, None).unwrap());
    }

    /// Signs `user`'s list again without `device` (the owner dropped it).
    fn unpublish(&mut self, user: &UserId, device: &DeviceId) {
        let (owner, entries, version) = self.owners.get_mut(user).unwrap();
        entries.retain(|entry| &entry.device_id != device);
        *version += 1;
        let signed = owner.sign_device_list(user, *version, entries.clone()).unwrap();
        self.lists.insert(user.clone(), verify_device_list(&signed, user, None, None).unwrap());
    }

    /// The lists of `names` only.
    fn only(&self, names: &[&str]) -> Lists {
        let mut lists = Lists::new();
        for user in users(names) {
            lists.insert(self.lists[&user].clone(), true);
        }
        lists
    }

    fn all(&self) -> Lists {
        let mut lists = Lists::new();
        for list in self.lists.values() {
            lists.insert(list.clone(), true);
        }
        lists
    }
}

/// A device: its machine over a store that outlives it.
struct Device {
    id: Dev,
    identity: DeviceIdentity,
    store: MemoryGroupStore,
    machine: GroupMachine<MemoryGroupStore>,
}

impl Device {
    async fn new(dir: &mut Directory, user: &str, device: &str, seed: u8) -> Self {
        let id: Dev = (format!("@{user}:x").parse().unwrap(), device.parse().unwrap());
        let identity = DeviceIdentity::generate(&mut StdRng::seed_from_u64(u64::from(seed)));
        dir.publish(&id.0, &id.1, &identity, seed);
        let store = MemoryGroupStore::new();
        let machine = GroupMachine::open(store.clone(), id.0.clone(), id.1.clone(), &identity).await.unwrap();
        Self { id, identity, store, machine }
    }

    /// The machine restarted over its store.
    async fn restart(&mut self) {
        let (user, device) = self.id.clone();
        self.machine = GroupMachine::open(self.store.clone(), user, device, &self.identity).await.unwrap();
    }

    /// A one-time KeyPackage, as another device claims it.
    async fn key_package(&mut self) -> Vec<u8> {
        let request = self.machine.key_packages(1, false, now_secs()).await.unwrap();
        request.key_packages[0].0.clone()
    }

    async fn create(&mut self, hub: &mut Hub, name: &str) -> GroupId {
        let mut rng = StdRng::seed_from_u64(7);
        let (group_id, request) =
            self.machine.create_group(&mut rng, Some(name.to_owned()), Timestamp::from_millis(1)).await.unwrap();
        assert_eq!(request.group_id, group_id);
        assert_eq!(group_id.hub().as_str(), "x");
        hub.create(&self.id, &request);
        group_id
    }

    async fn say(&mut self, hub: &mut Hub, group_id: &GroupId, text: &str) -> GroupSentResponse {
        let request = self.machine.encrypt_text(group_id, Uuid::new_v4(), text, Timestamp::from_millis(1)).await.unwrap();
        let sent = hub.send(&self.id, group_id, &request).unwrap();
        self.machine.message_sent(group_id, &sent).await.unwrap();
        sent
    }

    /// Hands the device its stream; device lists come from `dir` when it asks. Returns what each
    /// event came to and the events for the application.
    async fn deliver(&mut self, hub: &mut Hub, dir: &Directory) -> (Vec<Received>, Vec<MessengerEvent>) {
        let mut results = Vec::new();
        while let Some(event) = hub.next(&self.id) {
            results.push(self.receive(&event, dir).await);
        }
        (results, self.machine.take_events())
    }

    /// One event, answering requests for device lists from `dir` (the lists start empty).
    async fn receive(&mut self, event: &GroupEvent, dir: &Directory) -> Received {
        let mut lists = Lists::new();
        for _ in 0..3 {
            match self.machine.receive(event, &lists).await.unwrap() {
                Received::NeedLists(needs) => {
                    for need in needs {
                        lists.insert(dir.lists[&need.user].clone(), true);
                    }
                }
                other => return other,
            }
        }
        panic!("device lists asked for again and again");
    }

    async fn texts(&self, group_id: &GroupId) -> Vec<(String, Option<u64>)> {
        let history = self.store.group_history(group_id, 100).await.unwrap();
        history.into_iter().map(|m| (m.body, m.group_seq.map(GroupSeq::get))).collect()
    }

    async fn record(&self, group_id: &GroupId) -> GroupRecord {
        self.machine.group(group_id).await.unwrap().unwrap()
    }
}

/// Claims and checks a KeyPackage of each device, as the Messenger does.
async fn claim(dir: &Directory, devices: &mut [&mut Device]) -> Vec<KeyPackage> {
    let mut key_packages = Vec::new();
    for device in devices.iter_mut() {
        let bytes = device.key_package().await;
        let (user, id) = device.id.clone();
        key_packages.push(check_key_package(&bytes, &user, &id, &dir.lists[&user]).unwrap());
    }
    key_packages
}

fn acks(results: &[Received]) -> Vec<u64> {
    results.iter().map(|r| if let Received::Ack(seq) = r { seq.get() } else { panic!("not acknowledged: {r:?}") }).collect()
}

fn group_texts(events: &[MessengerEvent]) -> Vec<String> {
    events.iter().filter_map(|e| if let MessengerEvent::GroupMessage(m) = e { Some(m.body.clone()) } else { None }).collect()
}

fn users(names: &[&str]) -> Vec<UserId> {
    names.iter().map(|n| format!("@{n}:x").parse().unwrap()).collect()
}

/// Alice's group "team" with Bob and Carol joined and all three admins; everyone has read the
/// stream.
async fn team_of_admins(hub: &mut Hub, dir: &mut Directory) -> (Device, Device, Device, GroupId) {
    let (mut alice, mut bob, mut carol, group) = team(hub, dir).await;
    alice.machine.update_meta(&group, MetaChange::Admins(users(&["alice", "bob", "carol"]))).await.unwrap();
    let meta = alice.machine.encrypt_meta(&group).await.unwrap().expect("metadata");
    hub.send(&alice.id, &group, &meta).unwrap();
    for device in [&mut alice, &mut bob, &mut carol] {
        device.deliver(hub, dir).await;
    }
    (alice, bob, carol, group)
}

/// Alice's group "team" with Bob and Carol joined; everyone has read the stream.
async fn team(hub: &mut Hub, dir: &mut Directory) -> (Device, Device, Device, GroupId) {
    let mut alice = Device::new(dir, "alice", "A1", 1).await;
    let mut bob = Device::new(dir, "bob", "B1", 2).await;
    let mut carol = Device::new(dir, "carol", "C1", 3).await;
    let group = alice.create(hub, "team").await;
    let key_packages = claim(dir, &mut [&mut bob, &mut carol]).await;
    let commit = alice.machine.commit_add(&group, &key_packages, &Lists::new()).await.unwrap().expect("a commit");
    assert!(commit.welcome.is_some() && commit.group_info.is_some());
    // Adding members already in the group (or no one) makes no commit; one commit at a time.
    assert!(matches!(alice.machine.commit_add(&group, &key_packages, &Lists::new()).await, Err(GroupError::CommitPending(_))));
    let sent = hub.send(&alice.id, &group, &commit).unwrap();
    assert_eq!((sent.group_seq.get(), sent.epoch), (1, 0));
    // "Sent" does not merge: alice is in epoch 0 until her commit comes back.
    assert_eq!(alice.record(&group).await.epoch, 0);
    let (results, events) = alice.deliver(hub, dir).await;
    assert_eq!(acks(&results), [1]);
    assert_eq!(alice.record(&group).await.epoch, 1);
    assert!(alice.record(&group).await.pending.is_none());
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: users(&["bob", "carol"]),
        removed: vec![]
    }));
    // The name travels encrypted, after the add (joiners cannot read epoch 0).
    let meta = alice.machine.encrypt_meta(&group).await.unwrap().expect("a name");
    hub.send(&alice.id, &group, &meta).unwrap();
    for device in [&mut bob, &mut carol] {
        let (results, events) = device.deliver(hub, dir).await;
        assert_eq!(acks(&results), [1, 2]);
        assert_eq!(events[0], MessengerEvent::GroupJoined { group_id: group.clone(), by: alice.id.0.clone() });
        assert_eq!(events[1], MessengerEvent::GroupRenamed { group_id: group.clone(), name: "team".into() });
        assert_eq!(device.record(&group).await.name.as_deref(), Some("team"));
    }
    assert_eq!(acks(&alice.deliver(hub, dir).await.0), [2], "her own message comes back and is skipped");
    (alice, bob, carol, group)
}

#[tokio::test]
async fn members_join_talk_and_skip_their_own_messages() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;
    let members = alice.machine.members(&group).await.unwrap();
    assert_eq!(members, bob.machine.members(&group).await.unwrap());
    assert_eq!(members.len(), 3);

    let hello = alice.say(&mut hub, &group, "hello").await;
    bob.say(&mut hub, &group, "hi alice").await;
    let (results, events) = bob.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [3, 4]);
    assert_eq!(group_texts(&events), ["hello"], "bob's own message is not an event");
    let (_, events) = carol.deliver(&mut hub, &dir).await;
    assert_eq!(group_texts(&events), ["hello", "hi alice"]);
    alice.deliver(&mut hub, &dir).await;
    // Every history has both, in the hub's order, with their positions.
    let expected = [("hello".to_owned(), Some(3)), ("hi alice".to_owned(), Some(4))];
    for device in [&alice, &bob, &carol] {
        assert_eq!(device.texts(&group).await, expected);
    }
    // A repeat (lost acknowledgement) is acknowledged again and changes nothing.
    let again = hub.events_after(&carol.id, &group, GroupSeq::new(2)).remove(0);
    assert_eq!(again.group_seq, hello.group_seq);
    assert_eq!(carol.receive(&again, &dir).await, Received::Ack(GroupSeq::new(4)));
    assert!(carol.machine.take_events().is_empty());
}

#[tokio::test]
async fn an_own_commit_merges_at_its_position_and_messages_before_it_are_read_in_the_old_epoch() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;
    // Alice removes carol; before her commit reaches the hub, bob's message (epoch 1) does.
    let removal = alice.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    bob.say(&mut hub, &group, "still epoch 1").await;
    let sent = hub.send(&alice.id, &group, &removal).unwrap();
    assert_eq!(sent.group_seq.get(), 4);
    let (results, events) = alice.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [3, 4]);
    assert_eq!(group_texts(&events), ["still epoch 1"]);
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: vec![],
        removed: users(&["carol"])
    }));
    assert_eq!(alice.record(&group).await.epoch, 2);
    bob.deliver(&mut hub, &dir).await;
    assert_eq!(bob.machine.members(&group).await.unwrap().len(), 2);
    // Carol reads bob's message, then learns she is out.
    let (results, events) = carol.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [3, 4]);
    assert_eq!(group_texts(&events), ["still epoch 1"]);
    assert_eq!(events.last(), Some(&MessengerEvent::GroupRemoved { group_id: group.clone() }));
    assert_eq!(carol.record(&group).await.state, GroupState::Removed);
    assert!(matches!(
        carol.machine.encrypt_text(&group, Uuid::new_v4(), "x", Timestamp::from_millis(1)).await,
        Err(GroupError::NotActive { state: GroupState::Removed, .. })
    ));
    // What follows reaches the two left, not carol.
    alice.say(&mut hub, &group, "just us").await;
    assert_eq!(group_texts(&bob.deliver(&mut hub, &dir).await.1), ["just us"]);
    assert!(hub.next(&carol.id).is_none());
}

#[tokio::test]
async fn a_commit_that_lost_its_epoch_is_cleared_rebuilt_on_top_and_resubmitted() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team_of_admins(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    let dave_kp = claim(&dir, &mut [&mut dave]).await;
    // Both commit in epoch 1: alice removes carol, bob adds dave. Alice's reaches the hub first.
    let removal = alice.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    let add = bob.machine.commit_add(&group, &dave_kp, &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &removal).unwrap();
    let refused = hub.send(&bob.id, &group, &add).unwrap_err();
    assert_eq!((refused.code, refused.current_epoch), (ErrorCode::EpochConflict, Some(2)));
    // Bob drops his commit, catches up to epoch 2 (alice's commit is merged, not his), and
    // rebuilds the same change with the KeyPackage he claimed.
    bob.machine.commit_refused(&group).await.unwrap();
    assert!(bob.machine.pending_commit(&group).await.unwrap().is_none());
    let (results, _) = bob.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [4]);
    assert_eq!(bob.record(&group).await.epoch, 2);
    let add = bob.machine.commit_add(&group, &dave_kp, &Lists::new()).await.unwrap().unwrap();
    let sent = hub.send(&bob.id, &group, &add).unwrap();
    assert_eq!((sent.group_seq.get(), sent.epoch), (5, 2));
    // A retry of the same submission is the same answer.
    assert!(hub.send(&bob.id, &group, &add).unwrap().duplicate);
    bob.deliver(&mut hub, &dir).await;
    alice.deliver(&mut hub, &dir).await;
    let (results, events) = dave.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [5]);
    assert_eq!(events, [MessengerEvent::GroupJoined { group_id: group.clone(), by: bob.id.0.clone() }]);
    for device in [&alice, &bob, &dave] {
        let members: Vec<UserId> = device.machine.members(&group).await.unwrap().into_iter().map(|m| m.0).collect();
        assert_eq!(members, users(&["alice", "bob", "dave"]), "{:?}", device.id);
        assert_eq!(device.record(&group).await.epoch, 3);
    }
    // Carol saw her removal; the add after it never reaches her.
    carol.deliver(&mut hub, &dir).await;
    assert_eq!(carol.record(&group).await.state, GroupState::Removed);
    dave.say(&mut hub, &group, "hi all").await;
    assert_eq!(group_texts(&alice.deliver(&mut hub, &dir).await.1), ["hi all"]);
}

#[tokio::test]
async fn a_commit_adding_an_unvouched_device_is_refused_and_the_group_is_stuck() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, _carol, group) = team(&mut hub, &mut dir).await;
    // A device claiming to be bob's, in no list of bob's (its own directory entry is elsewhere).
    let mut elsewhere = Directory::default();
    let mut evil = Device::new(&mut elsewhere, "bob", "EVIL", 9).await;
    let bytes = evil.key_package().await;
    let claimed_as: (UserId, DeviceId) = evil.id.clone();
    let refused = check_key_package(&bytes, &claimed_as.0, &claimed_as.1, &dir.lists[&claimed_as.0]).unwrap_err();
    assert!(refused.contains("not in its user's signed device list"), "{refused}");
    // A careless (or hostile) member adds it anyway.
    let key_package = KeyPackage::from_bytes(&bytes).unwrap();
    let commit = alice.machine.commit_add(&group, &[key_package], &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    let (results, events) = bob.deliver(&mut hub, &dir).await;
    assert_eq!(results, [Received::Ignored], "not merged, not acknowledged");
    let [MessengerEvent::GroupProblem { reason: GroupProblem::UnvouchedMember { user, device, .. }, .. }] = &events[..] else {
        panic!("expected an unvouched member: {events:?}")
    };
    assert_eq!((user, device), (&claimed_as.0, &claimed_as.1));
    let record = bob.record(&group).await;
    assert_eq!((record.state, record.cursor.get(), record.epoch), (GroupState::Stuck, 2, 1));
    // The group stays stuck: later events are neither processed nor acknowledged.
    alice.deliver(&mut hub, &dir).await;
    alice.say(&mut hub, &group, "after").await;
    let (results, events) = bob.deliver(&mut hub, &dir).await;
    assert_eq!((results, events), (vec![Received::Ignored], vec![]));
}

#[tokio::test]
async fn a_welcome_waits_for_device_lists_and_a_stale_list_is_refreshed_before_refusing() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let mut alice = Device::new(&mut dir, "alice", "A1", 1).await;
    let mut bob = Device::new(&mut dir, "bob", "B1", 2).await;
    let group = alice.create(&mut hub, "pair").await;
    let key_packages = claim(&dir, &mut [&mut bob]).await;
    let commit = alice.machine.commit_add(&group, &key_packages, &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    let welcome = hub.events_after(&bob.id, &group, GroupSeq::ZERO).remove(0);
    // No lists: both users' are asked for.
    let Received::NeedLists(needs) = bob.machine.receive(&welcome, &Lists::new()).await.unwrap() else { panic!() };
    let asked: Vec<_> = needs.iter().map(|n| (n.user.clone(), n.refresh)).collect();
    assert_eq!(asked, [(users(&["alice"])[0].clone(), false), (users(&["bob"])[0].clone(), false)]);
    // A stale list of alice's (before her device) does not vouch for her leaf: refresh it.
    let mut stale_dir = Directory::default();
    let other = DeviceIdentity::generate(&mut StdRng::seed_from_u64(77));
    stale_dir.publish(&alice.id.0, &"OLD".parse().unwrap(), &other, 1);
    let mut lists = Lists::new();
    lists.insert(stale_dir.lists[&alice.id.0].clone(), false);
    lists.insert(dir.lists[&bob.id.0].clone(), true);
    let Received::NeedLists(needs) = bob.machine.receive(&welcome, &lists).await.unwrap() else { panic!() };
    assert_eq!(needs, [ListNeed { user: alice.id.0.clone(), refresh: true }]);
    lists.insert(dir.lists[&alice.id.0].clone(), true);
    assert_eq!(bob.machine.receive(&welcome, &lists).await.unwrap(), Received::Ack(GroupSeq::new(1)));
    assert_eq!(bob.machine.take_events(), [MessengerEvent::GroupJoined { group_id: group.clone(), by: alice.id.0.clone() }]);
}

#[tokio::test]
async fn a_member_whose_device_list_cannot_be_had_is_not_vouched_for() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, _carol, group) = team(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    let key_packages = claim(&dir, &mut [&mut dave]).await;
    let commit = alice.machine.commit_add(&group, &key_packages, &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    let event = hub.next(&bob.id).unwrap();
    let mut lists = dir.all();
    lists.mark_unavailable(dave.id.0.clone(), "the server has none".into());
    assert_eq!(bob.machine.receive(&event, &lists).await.unwrap(), Received::Ignored);
    let events = bob.machine.take_events();
    let [MessengerEvent::GroupProblem { reason: GroupProblem::UnvouchedMember { user, reason, .. }, .. }] = &events[..] else {
        panic!("expected an unvouched member: {events:?}")
    };
    assert_eq!(user, &dave.id.0);
    assert!(reason.contains("the server has none"), "{reason}");
    assert_eq!(bob.record(&group).await.state, GroupState::Stuck);
}

#[tokio::test]
async fn a_hole_in_the_stream_is_reported_and_resync_fills_it() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, _carol, group) = team(&mut hub, &mut dir).await;
    alice.say(&mut hub, &group, "one").await;
    alice.say(&mut hub, &group, "two").await;
    let _lost = hub.next(&bob.id).unwrap();
    let second = hub.next(&bob.id).unwrap();
    assert_eq!(bob.receive(&second, &dir).await, Received::Gap { after: GroupSeq::new(2) });
    for event in hub.events_after(&bob.id, &group, GroupSeq::new(2)) {
        assert!(matches!(bob.receive(&event, &dir).await, Received::Ack(_)));
    }
    assert_eq!(group_texts(&bob.machine.take_events()), ["one", "two"]);
}

#[tokio::test]
async fn a_group_survives_a_restart_and_a_failed_write_loses_nothing() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team_of_admins(&mut hub, &mut dir).await;
    alice.restart().await;
    bob.restart().await;
    alice.say(&mut hub, &group, "after restart").await;
    // Bob's store fails while he reads it: nothing is acknowledged, and the retry reads it
    // (the failed step's MLS state was rolled back with the store).
    let event = hub.next(&bob.id).unwrap();
    bob.store.fail_next_write();
    assert!(matches!(bob.machine.receive(&event, &dir.all()).await, Err(GroupError::Store(_))));
    assert_eq!(bob.receive(&event, &dir).await, Received::Ack(event.group_seq));
    assert_eq!(group_texts(&bob.machine.take_events()), ["after restart"]);
    bob.say(&mut hub, &group, "me too").await;
    // A commit after the restart, and the others follow it.
    let removal = bob.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    bob.restart().await;
    assert_eq!(bob.machine.pending_commit(&group).await.unwrap().as_ref(), Some(&removal), "kept to re-send");
    hub.send(&bob.id, &group, &removal).unwrap();
    bob.deliver(&mut hub, &dir).await;
    assert_eq!(bob.record(&group).await.epoch, 2);
    assert_eq!(group_texts(&alice.deliver(&mut hub, &dir).await.1), ["me too"]);
    assert_eq!(alice.record(&group).await.epoch, 2);
    carol.deliver(&mut hub, &dir).await;
    assert_eq!(carol.record(&group).await.state, GroupState::Removed);
    assert_eq!(alice.texts(&group).await, [("after restart".to_owned(), Some(4)), ("me too".to_owned(), Some(5))]);
}

#[tokio::test]
async fn removing_oneself_is_a_typed_error() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, _bob, _carol, group) = team(&mut hub, &mut dir).await;
    assert!(matches!(
        alice.machine.commit_remove(&group, &users(&["alice"]), &Lists::new()).await,
        Err(GroupError::InvalidRequest(_))
    ));
    assert_eq!(alice.machine.commit_remove(&group, &users(&["nobody"]), &Lists::new()).await.unwrap(), None);
    let unknown = GroupId::parse("!nope:x").unwrap();
    assert!(matches!(alice.machine.members(&unknown).await, Err(GroupError::UnknownGroup(_))));
}

#[tokio::test]
async fn a_server_cannot_pass_another_commit_off_as_ours() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, _carol, group) = team_of_admins(&mut hub, &mut dir).await;
    // Alice's commit is pending; bob's wins the epoch; the server labels bob's as alice's.
    alice.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    let update = bob.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    hub.send(&bob.id, &group, &update).unwrap();
    let mut forged = hub.next(&alice.id).unwrap();
    forged.sender = alice.id.0.clone();
    forged.sender_device = alice.id.1.clone();
    assert_eq!(alice.receive(&forged, &dir).await, Received::Ack(forged.group_seq));
    // Alice merged bob's commit (her own was dropped), so she and bob agree.
    let record = alice.record(&group).await;
    assert_eq!((record.epoch, record.pending.is_none()), (2, true));
    bob.deliver(&mut hub, &dir).await;
    bob.say(&mut hub, &group, "in sync").await;
    assert_eq!(group_texts(&alice.deliver(&mut hub, &dir).await.1), ["in sync"]);
}

/// `team`, with bob's second device B2 added by alice; everyone has read the stream.
async fn team_with_bob2(hub: &mut Hub, dir: &mut Directory) -> (Device, Device, Device, Device, GroupId) {
    let (mut alice, mut bob, mut carol, group) = team(hub, dir).await;
    let mut bob2 = Device::new(dir, "bob", "B2", 5).await;
    let key_packages = claim(dir, &mut [&mut bob2]).await;
    let commit = alice.machine.commit_add(&group, &key_packages, &dir.all()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    for device in [&mut alice, &mut bob, &mut carol, &mut bob2] {
        device.deliver(hub, dir).await;
    }
    assert_eq!(alice.machine.members(&group).await.unwrap().len(), 4);
    (alice, bob, carol, bob2, group)
}

fn devices(names: &[(&str, &str)]) -> Vec<Dev> {
    names.iter().map(|(u, d)| (format!("@{u}:x").parse().unwrap(), d.parse().unwrap())).collect()
}

#[tokio::test]
async fn a_device_dropped_from_its_owners_list_is_removed_by_the_next_commit_add() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, mut bob2, group) = team_with_bob2(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    let dave_kp = claim(&dir, &mut [&mut dave]).await;
    // Bob drops B2 from his list, with no group commit; alice's next change removes its leaf.
    dir.unpublish(&bob.id.0, &bob2.id.1);
    let commit = alice.machine.commit_add(&group, &dave_kp, &dir.all()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    let expected = devices(&[("alice", "A1"), ("bob", "B1"), ("carol", "C1"), ("dave", "D1")]);
    let (_, events) = alice.deliver(&mut hub, &dir).await;
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: users(&["dave"]),
        removed: vec![]
    }));
    for device in [&mut bob, &mut carol] {
        let (results, events) = device.deliver(&mut hub, &dir).await;
        assert_eq!(acks(&results), [4]);
        assert!(events.iter().any(|e| matches!(e, MessengerEvent::GroupMembersChanged { .. })), "{events:?}");
    }
    let (results, events) = bob2.deliver(&mut hub, &dir).await;
    assert_eq!(acks(&results), [4]);
    assert_eq!(events, [MessengerEvent::GroupRemoved { group_id: group.clone() }]);
    assert_eq!(bob2.record(&group).await.state, GroupState::Removed);
    // Dave joins a tree without B2 (every leaf vouched for by the lists he holds).
    assert_eq!(acks(&dave.deliver(&mut hub, &dir).await.0), [4]);
    for device in [&alice, &bob, &carol, &dave] {
        assert_eq!(device.machine.members(&group).await.unwrap(), expected, "{:?}", device.id);
    }
    // What follows does not reach B2.
    alice.say(&mut hub, &group, "without B2").await;
    assert_eq!(group_texts(&bob.deliver(&mut hub, &dir).await.1), ["without B2"]);
    assert!(hub.next(&bob2.id).is_none());
}

#[tokio::test]
async fn the_pruning_commit_removes_the_stale_leaf_alone_and_unknown_lists_remove_nothing() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, mut bob2, group) = team_with_bob2(&mut hub, &mut dir).await;
    // Nothing stale: no commit.
    assert_eq!(alice.machine.commit_prune(&group, &dir.all()).await.unwrap(), None);
    dir.unpublish(&bob.id.0, &bob2.id.1);
    // Bob's list unknown (none, or only the others'): his leaves are left alone.
    assert_eq!(alice.machine.commit_prune(&group, &Lists::new()).await.unwrap(), None);
    assert_eq!(alice.machine.commit_prune(&group, &dir.only(&["alice", "carol"])).await.unwrap(), None);
    let mut unavailable = dir.only(&["alice", "carol"]);
    unavailable.mark_unavailable(bob.id.0.clone(), "the server has none".into());
    assert_eq!(alice.machine.commit_prune(&group, &unavailable).await.unwrap(), None);
    assert!(alice.machine.pending_commit(&group).await.unwrap().is_none());
    // With bob's current list, the commit removes B2 and nothing else.
    let prune = alice.machine.commit_prune(&group, &dir.only(&["bob"])).await.unwrap().expect("a pruning commit");
    assert!(prune.welcome.is_none());
    assert_eq!(alice.machine.pending_commit(&group).await.unwrap().as_ref(), Some(&prune));
    hub.send(&alice.id, &group, &prune).unwrap();
    let expected = devices(&[("alice", "A1"), ("bob", "B1"), ("carol", "C1")]);
    for device in [&mut alice, &mut bob, &mut carol] {
        let (results, events) = device.deliver(&mut hub, &dir).await;
        assert_eq!(acks(&results), [4]);
        // The same users before and after: a device left, no user did.
        assert!(events.contains(&MessengerEvent::GroupMembersChanged {
            group_id: group.clone(),
            added: vec![],
            removed: vec![]
        }));
        assert_eq!(device.machine.members(&group).await.unwrap(), expected, "{:?}", device.id);
    }
    assert_eq!(bob2.deliver(&mut hub, &dir).await.1, [MessengerEvent::GroupRemoved { group_id: group.clone() }]);
    // Nothing stale any more.
    assert_eq!(alice.machine.commit_prune(&group, &dir.all()).await.unwrap(), None);
}

#[tokio::test]
async fn a_leaf_whose_key_differs_from_its_list_is_stale_and_a_removal_names_each_leaf_once() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, mut bob2, group) = team_with_bob2(&mut hub, &mut dir).await;
    // Carol's list now gives C1 another key: her leaf is stale too.
    let other = DeviceIdentity::generate(&mut StdRng::seed_from_u64(99));
    dir.unpublish(&carol.id.0, &carol.id.1);
    dir.publish(&carol.id.0, &carol.id.1, &other, 3);
    dir.unpublish(&bob.id.0, &bob2.id.1);
    // Removing bob (both his devices) and pruning B2 and C1: B2 is removed once.
    let removal = alice.machine.commit_remove(&group, &users(&["bob"]), &dir.all()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &removal).unwrap();
    let (_, events) = alice.deliver(&mut hub, &dir).await;
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: vec![],
        removed: users(&["bob", "carol"])
    }));
    assert_eq!(alice.machine.members(&group).await.unwrap(), devices(&[("alice", "A1")]));
    for device in [&mut bob, &mut bob2, &mut carol] {
        assert_eq!(device.deliver(&mut hub, &dir).await.1, [MessengerEvent::GroupRemoved { group_id: group.clone() }]);
    }
}

#[test]
fn finding_stale_leaves_among_1000_members_is_one_quick_pass() {
    // 1,000 users with one device each; every list given. User 1 dropped its device, user 2's
    // device has another key, user 3's list is not given, and our own leaf (0) is in no list.
    let mut rng = StdRng::seed_from_u64(1);
    let mut leaves = Vec::new();
    let mut lists = Lists::new();
    for n in 0..1000u32 {
        let user: UserId = format!("@u{n}:x").parse().unwrap();
        let device: DeviceId = "D".parse().unwrap();
        let identity = DeviceIdentity::generate(&mut rng);
        leaves.push(MemberLeaf::new(user.clone(), device.clone(), identity.signing_key().public()));
        let owner = UserIdentity::from_bytes(&[7; 32]);
        let entries = match n {
            0 | 1 => vec![DeviceIdentity::generate(&mut rng).list_entry(&"OTHER".parse().unwrap())],
            2 => vec![DeviceIdentity::generate(&mut rng).list_entry(&device)],
            _ => vec![identity.list_entry(&device)],
        };
        if n != 3 {
            let signed = owner.sign_device_list(&user, 1, entries).unwrap();
            lists.insert(verify_device_list(&signed, &user, None, None).unwrap(), false);
        }
    }
    let started = std::time::Instant::now();
    let found = stale(leaves.iter().enumerate(), 0, &lists);
    let took = started.elapsed();
    assert_eq!(found, [1, 2]);
    eprintln!("stale leaves among 1,000 members: {took:?}");
    assert!(took < std::time::Duration::from_millis(100), "{took:?}");
}

#[tokio::test]
async fn a_user_leaves_by_proposals_the_lowest_remaining_leaf_commits_them_and_nobody_sends_before() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;

    // Bob proposes his removal; once every leaf of his is proposed he is leaving.
    let proposal = bob.machine.propose_leave(&group).await.unwrap().expect("a proposal");
    assert!(proposal.group_info.is_none());
    let proposed = hub.send(&bob.id, &group, &proposal).unwrap();
    assert_eq!(bob.machine.propose_leave(&group).await.unwrap(), None, "nothing left to propose");
    assert_eq!(bob.record(&group).await.state, GroupState::Leaving);
    assert!(matches!(
        bob.machine.encrypt_text(&group, Uuid::new_v4(), "x", Timestamp::from_millis(1)).await,
        Err(GroupError::NotActive { .. })
    ));
    assert_eq!(acks(&bob.deliver(&mut hub, &dir).await.0), [proposed.group_seq.get()], "his own proposal is skipped");

    // Carol reads it but is not the committer; she cannot send before it is committed.
    assert_eq!(acks(&carol.deliver(&mut hub, &dir).await.0), [proposed.group_seq.get()]);
    assert!(carol.machine.take_commits_wanted().is_empty());
    assert!(carol.machine.has_pending_proposals(&group).await.unwrap());
    assert!(matches!(
        carol.machine.encrypt_text(&group, Uuid::new_v4(), "x", Timestamp::from_millis(1)).await,
        Err(GroupError::ProposalsPending(_))
    ));
    // Alice (leaf 0) is the one to commit it.
    alice.deliver(&mut hub, &dir).await;
    assert_eq!(alice.machine.take_commits_wanted(), std::slice::from_ref(&group));
    // Whoever commits first wins: here Carol, as her SDK does before sending. Her commit of
    // the proposal (and nothing else) removes Bob.
    let commit = carol.machine.commit_pending(&group, &Lists::new()).await.unwrap().expect("a commit");
    hub.send(&carol.id, &group, &commit).unwrap();
    for device in [&mut alice, &mut carol] {
        let (_, events) = device.deliver(&mut hub, &dir).await;
        assert!(events.contains(&MessengerEvent::GroupMembersChanged {
            group_id: group.clone(),
            added: vec![],
            removed: users(&["bob"])
        }));
    }
    let (_, events) = bob.deliver(&mut hub, &dir).await;
    assert_eq!(events, [MessengerEvent::GroupRemoved { group_id: group.clone() }]);
    assert_eq!(bob.record(&group).await.state, GroupState::Removed);
    assert_eq!(alice.machine.commit_pending(&group, &Lists::new()).await.unwrap(), None, "nothing pending any more");
    carol.say(&mut hub, &group, "without bob").await;
    assert_eq!(group_texts(&alice.deliver(&mut hub, &dir).await.1), ["without bob"]);
    assert!(bob.deliver(&mut hub, &dir).await.0.is_empty());
}

#[tokio::test]
async fn a_commit_that_leaves_out_a_proposal_is_refused_and_a_removal_of_a_leaving_user_commits_the_proposal() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;
    let proposal = bob.machine.propose_leave(&group).await.unwrap().unwrap();
    hub.send(&bob.id, &group, &proposal).unwrap();
    // Alice has not read it: her removal of Carol leaves it out.
    let blind = alice.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    assert_eq!(hub.send(&alice.id, &group, &blind).unwrap_err().code, ErrorCode::MissingProposals);
    alice.machine.commit_refused(&group).await.unwrap();
    alice.deliver(&mut hub, &dir).await;
    // Removing Bob, whose removal is proposed, commits the proposal instead of a second removal.
    let commit = alice.machine.commit_remove(&group, &users(&["bob"]), &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &commit).unwrap();
    let (_, events) = carol.deliver(&mut hub, &dir).await;
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: vec![],
        removed: users(&["bob"])
    }));
    assert_eq!(bob.deliver(&mut hub, &dir).await.1, [MessengerEvent::GroupRemoved { group_id: group.clone() }]);
}

#[tokio::test]
async fn only_admins_change_the_membership_and_the_metadata() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    assert_eq!(alice.record(&group).await.policy.admins, users(&["alice"]));
    assert_eq!(bob.record(&group).await.policy.admins, users(&["alice"]), "the adder, then her metadata");

    // Bob is not an admin: his SDK builds no add and no removal of another user.
    let key_packages = claim(&dir, &mut [&mut dave]).await;
    assert!(matches!(bob.machine.commit_add(&group, &key_packages, &Lists::new()).await, Err(GroupError::NotAllowed(_))));
    assert!(matches!(bob.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await, Err(GroupError::NotAllowed(_))));
    assert!(matches!(
        bob.machine.update_meta(&group, MetaChange::Topic(Some("mine".into()))).await,
        Err(GroupError::NotAllowed(_))
    ));

    // Metadata that makes Bob an admin, sent by Bob himself, is dropped by the others.
    let forged = GroupMetaContent::new("taken").with_policy(None, users(&["bob"]), None);
    let message = bob.machine.encrypt(&group, &Content::GroupMeta(forged)).unwrap();
    hub.send(&bob.id, &group, &GroupSendRequest::application(Uuid::new_v4(), message)).unwrap();
    let (_, events) = carol.deliver(&mut hub, &dir).await;
    assert!(matches!(&events[..], [MessengerEvent::GroupProblem { reason: GroupProblem::PolicyViolation(_), .. }]), "{events:?}");
    assert_eq!(carol.record(&group).await.name.as_deref(), Some("team"));
    assert_eq!(carol.record(&group).await.policy.admins, users(&["alice"]));

    // A commit of Bob's adding Dave, made without the SDK's check: the hub cannot tell (the
    // policy is encrypted) and takes it; every member refuses it.
    let mut mls = bob.machine.load(&group).unwrap();
    let bundle = mls.add_members(&bob.machine.client, &bob.machine.device, &key_packages).unwrap();
    let commit = GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, bundle.welcome);
    hub.send(&bob.id, &group, &commit).unwrap();
    for device in [&mut alice, &mut carol] {
        let (_, events) = device.deliver(&mut hub, &dir).await;
        assert!(
            events.iter().any(|e| matches!(e, MessengerEvent::GroupProblem { reason: GroupProblem::PolicyViolation(_), .. })),
            "{events:?}"
        );
        assert_eq!(device.record(&group).await.state, GroupState::Stuck);
    }
}

#[tokio::test]
async fn an_admin_makes_another_admin_and_sets_a_member_limit() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, mut carol, group) = team(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    alice.machine.update_meta(&group, MetaChange::Admins(users(&["alice", "bob"]))).await.unwrap();
    alice.machine.update_meta(&group, MetaChange::Topic(Some("planning".into()))).await.unwrap();
    assert!(matches!(alice.machine.update_meta(&group, MetaChange::Admins(vec![])).await, Err(GroupError::InvalidRequest(_))));
    let meta = alice.machine.encrypt_meta(&group).await.unwrap().expect("metadata");
    hub.send(&alice.id, &group, &meta).unwrap();
    for device in [&mut bob, &mut carol] {
        let (_, events) = device.deliver(&mut hub, &dir).await;
        let policy = GroupPolicy { topic: Some("planning".into()), admins: users(&["alice", "bob"]), max_members: None };
        assert_eq!(events, [MessengerEvent::GroupPolicyChanged { group_id: group.clone(), policy }]);
    }
    // Bob may add now; his commit is merged by the others.
    let key_packages = claim(&dir, &mut [&mut dave]).await;
    let commit = bob.machine.commit_add(&group, &key_packages, &Lists::new()).await.unwrap().expect("a commit");
    hub.send(&bob.id, &group, &commit).unwrap();
    let (_, events) = carol.deliver(&mut hub, &dir).await;
    assert!(events.contains(&MessengerEvent::GroupMembersChanged {
        group_id: group.clone(),
        added: users(&["dave"]),
        removed: vec![]
    }));
    assert_eq!(carol.record(&group).await.state, GroupState::Active);

    // A limit of 4 devices: a fifth is refused by the SDK.
    alice.deliver(&mut hub, &dir).await;
    alice.machine.update_meta(&group, MetaChange::MaxMembers(Some(4))).await.unwrap();
    let mut erin = Device::new(&mut dir, "erin", "E1", 5).await;
    let key_packages = claim(&dir, &mut [&mut erin]).await;
    assert!(matches!(alice.machine.commit_add(&group, &key_packages, &Lists::new()).await, Err(GroupError::NotAllowed(_))));
}

#[tokio::test]
async fn a_commit_a_server_dropped_or_reordered_is_detected() {
    let (mut hub, mut dir) = (Hub::default(), Directory::default());
    let (mut alice, mut bob, _carol, group) = team(&mut hub, &mut dir).await;
    let mut dave = Device::new(&mut dir, "dave", "D1", 4).await;
    // Two commits in a row: alice removes carol (epoch 1 → 2), then adds dave (2 → 3).
    let first = alice.machine.commit_remove(&group, &users(&["carol"]), &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &first).unwrap();
    alice.deliver(&mut hub, &dir).await;
    let key_packages = claim(&dir, &mut [&mut dave]).await;
    let second = alice.machine.commit_add(&group, &key_packages, &Lists::new()).await.unwrap().unwrap();
    hub.send(&alice.id, &group, &second).unwrap();
    let first_event = hub.next(&bob.id).unwrap();
    let second_event = hub.next(&bob.id).unwrap();

    // Dropped, with the positions left as they are: a hole, which resync would fill.
    assert_eq!(bob.receive(&second_event, &dir).await, Received::Gap { after: GroupSeq::new(first_event.group_seq.get() - 1) });
    // Dropped and the next one renumbered to hide the hole (or the two swapped): the commit is
    // of an epoch bob is not in, so it does not process; the group stops there, reported.
    let mut forged = second_event.clone();
    forged.group_seq = first_event.group_seq;
    assert_eq!(bob.receive(&forged, &dir).await, Received::Ignored);
    let events = bob.machine.take_events();
    assert!(matches!(&events[..], [MessengerEvent::GroupProblem { reason: GroupProblem::BadCommit(_), .. }]), "{events:?}");
    assert_eq!(bob.record(&group).await.state, GroupState::Stuck);
    assert_eq!(bob.record(&group).await.epoch, 1, "nothing merged");
}
