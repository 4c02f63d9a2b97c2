//! Groups of a few devices talking through the API, as the SDK will use it; the "hub" here is
//! the test passing bytes around in one order.

use super::*;
use crate::identity::{verify_device_list, UserIdentity, VerifiedDeviceList};
use rand::SeedableRng as _;

const GROUP: &[u8] = b"!room:hub.example";
const WEEK: u64 = 7 * 24 * 60 * 60;

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// A device: its ids, identity, MLS client and its user's signed device list.
struct Device {
    identity: DeviceIdentity,
    client: MlsClient<MemoryStorage>,
    list: VerifiedDeviceList,
}

impl Device {
    fn new(user: &str, device: &str, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let identity = DeviceIdentity::generate(&mut rng);
        Self::claiming(user, device, identity, seed)
    }

    /// A device whose credential claims (`user`, `device`), signed with `identity`; its "signed
    /// list" lists `identity` under that device.
    fn claiming(user: &str, device: &str, identity: DeviceIdentity, seed: u64) -> Self {
        let user = UserId::parse(user).unwrap();
        let device = DeviceId::parse(device).unwrap();
        let owner = UserIdentity::generate(&mut rand::rngs::StdRng::seed_from_u64(seed + 1000));
        let signed = owner.sign_device_list(&user, 1, vec![identity.list_entry(&device)]).unwrap();
        let list = verify_device_list(&signed, &user, None, None).unwrap();
        let client = MlsClient::new(MemoryStorage::default(), user, device, &identity);
        Self { identity, client, list }
    }

    fn key_package(&self) -> KeyPackage {
        let kp = self.client.create_key_package(&self.identity, Lifetime::starting_at(now(), WEEK), false).unwrap();
        // What the directory and the adder see: the uploaded bytes, parsed again.
        KeyPackage::from_bytes(kp.to_bytes()).unwrap()
    }

    fn join(&self, welcome: &[u8], tree: &[u8]) -> Group {
        self.client.join(welcome, tree).unwrap().accept(&self.client).unwrap()
    }

    fn send(&self, group: &mut Group, text: &str) -> Vec<u8> {
        group.encrypt(&self.client, &self.identity, text.as_bytes()).unwrap()
    }

    fn read(&self, group: &mut Group, message: &[u8]) -> (Member, String) {
        match group.process(&self.client, message).unwrap() {
            Incoming::Application { sender, plaintext } => (sender, String::from_utf8(plaintext).unwrap()),
            other => panic!("expected an application message, got {other:?}"),
        }
    }

    /// Processes another member's commit, checks every new leaf against the lists, merges it.
    fn apply(&self, group: &mut Group, commit: &[u8], lists: &[&VerifiedDeviceList]) -> Vec<MemberChange> {
        let Incoming::Commit(commit) = group.process(&self.client, commit).unwrap() else { panic!("expected a commit") };
        for leaf in commit.new_leaves() {
            let list = lists.iter().find(|l| l.user_id() == leaf.user()).expect("a list for every user");
            leaf.check_against_list(list).unwrap();
        }
        let changes = commit.changes().to_vec();
        group.merge_commit(&self.client, commit).unwrap();
        changes
    }
}

/// Alice's group with Bob and Carol added and joined.
fn three() -> (Device, Device, Device, Group, Group, Group) {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob = Device::new("@bob:b.example", "BOB1", 2);
    let carol = Device::new("@carol:c.example", "CAROL1", 3);
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    assert_eq!((a.epoch(), a.group_id()), (0, GROUP));
    let bundle = a.add_members(&alice.client, &alice.identity, &[bob.key_package(), carol.key_package()]).unwrap();
    assert_eq!(a.epoch(), 0, "pending until merged");
    a.merge_pending_commit(&alice.client).unwrap();
    assert_eq!(a.epoch(), 1);
    let tree = a.ratchet_tree().unwrap();
    let welcome = bundle.welcome.expect("a Welcome for the added members");
    let lists = [&alice.list, &bob.list, &carol.list];
    let mut joined = Vec::new();
    for device in [&bob, &carol] {
        let pending = device.client.join(&welcome, &tree).unwrap();
        assert_eq!((pending.group_id(), pending.epoch()), (GROUP, 1));
        assert_eq!(pending.welcome_sender().leaf, *alice.client.own_leaf());
        assert_eq!(pending.members().len(), 3);
        for member in pending.members() {
            let list = lists.iter().find(|l| l.user_id() == member.leaf.user()).unwrap();
            member.leaf.check_against_list(list).unwrap();
        }
        joined.push(pending.accept(&device.client).unwrap());
    }
    let c = joined.pop().unwrap();
    let b = joined.pop().unwrap();
    (alice, bob, carol, a, b, c)
}

#[test]
fn three_devices_talk_update_and_remove() {
    let (alice, bob, carol, mut a, mut b, mut c) = three();
    let members = a.members().unwrap();
    assert_eq!(members, b.members().unwrap());
    let users: Vec<&str> = members.iter().map(|m| m.leaf.user().as_str()).collect();
    assert_eq!(users, ["@alice:a.example", "@bob:b.example", "@carol:c.example"]);

    // Both ways.
    let hello = alice.send(&mut a, "hello");
    assert_eq!(bob.read(&mut b, &hello), (members[0].clone(), "hello".to_owned()));
    assert_eq!(carol.read(&mut c, &hello).1, "hello");
    let reply = bob.send(&mut b, "hi alice");
    assert_eq!(alice.read(&mut a, &reply), (members[1].clone(), "hi alice".to_owned()));
    assert_eq!(carol.read(&mut c, &reply).1, "hi alice");
    // The hub fans a message back to its sender too.
    assert!(matches!(a.process(&alice.client, &hello).unwrap(), Incoming::OwnMessage));

    // Bob updates his keys; the others see his new leaf and check it.
    let lists = [&alice.list, &bob.list, &carol.list];
    let update = b.self_update(&bob.client, &bob.identity).unwrap();
    assert!(update.welcome.is_none());
    assert!(matches!(b.process(&bob.client, &update.commit).unwrap(), Incoming::OwnCommit));
    b.merge_pending_commit(&bob.client).unwrap();
    let changes = alice.apply(&mut a, &update.commit, &lists);
    assert_eq!(changes, [MemberChange::Updated { index: b.own_index(), leaf: bob.client.own_leaf().clone() }]);
    carol.apply(&mut c, &update.commit, &lists);
    assert_eq!((a.epoch(), b.epoch(), c.epoch()), (2, 2, 2));
    let after_update = carol.send(&mut c, "after update");
    assert_eq!(alice.read(&mut a, &after_update).1, "after update");
    assert_eq!(bob.read(&mut b, &after_update).1, "after update");

    // Alice removes Carol.
    let carol_index = c.own_index();
    let removal = a.remove_members(&alice.client, &alice.identity, &[carol_index]).unwrap();
    a.merge_pending_commit(&alice.client).unwrap();
    let changes = bob.apply(&mut b, &removal.commit, &lists);
    assert!(changes.contains(&MemberChange::Removed { index: carol_index, leaf: carol.client.own_leaf().clone() }));
    assert_eq!(a.members().unwrap().len(), 2);
    let secret = alice.send(&mut a, "carol is gone");
    assert_eq!(bob.read(&mut b, &secret).1, "carol is gone");
    // Carol, still in the old epoch, has no key for it...
    assert_eq!(c.process(&carol.client, &secret).unwrap_err(), MlsError::WrongEpoch);
    // ...and after she applies her removal she is out.
    let Incoming::Commit(commit) = c.process(&carol.client, &removal.commit).unwrap() else { panic!("expected a commit") };
    assert!(commit.removes_me());
    c.merge_commit(&carol.client, commit).unwrap();
    assert!(!c.is_active());
    assert_eq!(c.process(&carol.client, &secret).unwrap_err(), MlsError::Inactive);
    assert_eq!(c.encrypt(&carol.client, &carol.identity, b"x").unwrap_err(), MlsError::Inactive);
}

#[test]
fn a_member_leaves_through_a_proposal_another_commits() {
    let (alice, bob, carol, mut a, mut b, mut c) = three();
    let bob_index = b.own_index();
    let proposal = b.leave(&bob.client, &bob.identity).unwrap();
    let Incoming::Proposal(incoming) = a.process(&alice.client, &proposal).unwrap() else { panic!("expected a proposal") };
    assert_eq!(incoming.sender().index, bob_index);
    assert_eq!(incoming.change(), &MemberChange::Removed { index: bob_index, leaf: bob.client.own_leaf().clone() });
    a.store_proposal(&alice.client, incoming).unwrap();
    let Incoming::Proposal(incoming) = c.process(&carol.client, &proposal).unwrap() else { panic!("expected a proposal") };
    c.store_proposal(&carol.client, incoming).unwrap();

    // With a proposal stored, openmls sends nothing until it is committed.
    assert!(matches!(a.encrypt(&alice.client, &alice.identity, b"wait"), Err(MlsError::State(_))));
    let bundle = a.commit_pending_proposals(&alice.client, &alice.identity).unwrap();
    a.merge_pending_commit(&alice.client).unwrap();
    let lists = [&alice.list, &bob.list, &carol.list];
    let changes = carol.apply(&mut c, &bundle.commit, &lists);
    assert!(changes.contains(&MemberChange::Removed { index: bob_index, leaf: bob.client.own_leaf().clone() }));
    let Incoming::Commit(commit) = b.process(&bob.client, &bundle.commit).unwrap() else { panic!("expected a commit") };
    assert!(commit.removes_me());
    b.merge_commit(&bob.client, commit).unwrap();
    assert!(!b.is_active());
    assert_eq!(a.members().unwrap().len(), 2);
    let message = carol.send(&mut c, "just us");
    assert_eq!(alice.read(&mut a, &message).1, "just us");
    // Nothing left to commit.
    assert!(matches!(a.commit_pending_proposals(&alice.client, &alice.identity), Err(MlsError::InvalidRequest(_))));
}

#[test]
fn group_state_survives_reload_from_storage() {
    let (alice, bob, carol, a, mut b, _c) = three();
    let epoch = a.epoch();
    drop(a);
    let mut a = alice.client.load_group(GROUP).unwrap().expect("stored");
    assert_eq!(a.epoch(), epoch);
    assert_eq!(a.members().unwrap(), b.members().unwrap());
    let message = alice.send(&mut a, "after reload");
    assert_eq!(bob.read(&mut b, &message).1, "after reload");
    let update = b.self_update(&bob.client, &bob.identity).unwrap();
    b.merge_pending_commit(&bob.client).unwrap();
    alice.apply(&mut a, &update.commit, &[&alice.list, &bob.list, &carol.list]);
    drop(a);
    let mut a = alice.client.load_group(GROUP).unwrap().expect("stored");
    assert_eq!(a.epoch(), epoch + 1);
    let reply = bob.send(&mut b, "still here");
    assert_eq!(alice.read(&mut a, &reply).1, "still here");
    assert!(alice.client.load_group(b"!other:hub.example").unwrap().is_none());
}

#[test]
fn two_commits_in_one_epoch_the_loser_clears_and_redoes() {
    let (alice, bob, carol, mut a, mut b, mut c) = three();
    let lists = [&alice.list, &bob.list, &carol.list];
    // Both commit against epoch 1; the hub takes Alice's.
    let winner = a.self_update(&alice.client, &alice.identity).unwrap();
    let loser = b.remove_members(&bob.client, &bob.identity, &[c.own_index()]).unwrap();
    assert!(b.has_pending_commit());
    // A second commit while one is pending is refused.
    assert!(matches!(b.self_update(&bob.client, &bob.identity), Err(MlsError::State(_))));
    a.merge_pending_commit(&alice.client).unwrap();
    carol.apply(&mut c, &winner.commit, &lists);
    // Bob drops his commit, applies the winner, and redoes his change on top.
    b.clear_pending_commit(&bob.client).unwrap();
    assert!(!b.has_pending_commit());
    assert_eq!(b.epoch(), 1);
    bob.apply(&mut b, &winner.commit, &lists);
    assert_eq!(b.epoch(), 2);
    // Bob's first commit is stale for everyone who moved on.
    assert_eq!(a.process(&alice.client, &loser.commit).unwrap_err(), MlsError::WrongEpoch);
    let redo = b.remove_members(&bob.client, &bob.identity, &[c.own_index()]).unwrap();
    b.merge_pending_commit(&bob.client).unwrap();
    alice.apply(&mut a, &redo.commit, &lists);
    assert_eq!((a.epoch(), b.epoch()), (3, 3));
    assert_eq!(a.members().unwrap(), b.members().unwrap());
    let message = alice.send(&mut a, "epoch 3");
    assert_eq!(bob.read(&mut b, &message).1, "epoch 3");
}

#[test]
fn a_leaf_whose_key_is_not_the_listed_one_fails_the_check() {
    let (alice, bob, carol, mut a, mut b, _c) = three();
    // Mallory makes a KeyPackage claiming to be Bob's second device, signed with her own key.
    let mallory_key = DeviceIdentity::generate(&mut rand::rngs::StdRng::seed_from_u64(66));
    let forged = Device::claiming("@bob:b.example", "BOB2", mallory_key, 66);
    let forged_kp = forged.key_package();
    // Bob's real list names BOB1 only; a list that names BOB2 with another key also refuses it.
    let real_bob2 = Device::new("@bob:b.example", "BOB2", 7);
    assert_eq!(
        forged_kp.leaf().check_against_list(&bob.list),
        Err(LeafMismatch::UnlistedDevice(DeviceId::parse("BOB2").unwrap()))
    );
    assert_eq!(
        forged_kp.leaf().check_against_list(&real_bob2.list).map_err(|e| matches!(e, LeafMismatch::SignatureKey(_))),
        Err(true)
    );
    assert!(matches!(forged_kp.leaf().check_against_list(&carol.list), Err(LeafMismatch::User { .. })));
    assert_eq!(
        forged_kp.leaf().check(forged_kp.leaf().user(), forged_kp.leaf().device(), &real_bob2.identity.signing_public()),
        Err(LeafMismatch::SignatureKey(DeviceId::parse("BOB2").unwrap()))
    );

    // Alice adds it anyway (a buggy or malicious client): Bob sees the leaf before merging.
    let bundle = a.add_members(&alice.client, &alice.identity, std::slice::from_ref(&forged_kp)).unwrap();
    let Incoming::Commit(commit) = b.process(&bob.client, &bundle.commit).unwrap() else { panic!("expected a commit") };
    let added: Vec<&MemberLeaf> = commit.new_leaves().filter(|leaf| leaf.device().as_str() == "BOB2").collect();
    assert_eq!(added, [forged_kp.leaf()]);
    assert!(added[0].check_against_list(&real_bob2.list).is_err());
    // Refusing is dropping it: Bob stays where he was.
    drop(commit);
    assert_eq!(b.epoch(), 1);
}

#[test]
fn key_packages_last_resort_lifetime_and_signer() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let lifetime = Lifetime::starting_at(now(), WEEK);
    let kp = alice.client.create_key_package(&alice.identity, lifetime, true).unwrap();
    assert!(kp.is_last_resort());
    let parsed = KeyPackage::from_bytes(kp.to_bytes()).unwrap();
    assert!(parsed.is_last_resort());
    assert_eq!(parsed.lifetime(), lifetime);
    assert_eq!(parsed.leaf(), alice.client.own_leaf());
    assert_eq!(parsed.reference(), kp.reference());
    assert_eq!(parsed, kp);
    let ordinary = alice.key_package();
    assert!(!ordinary.is_last_resort());
    assert_ne!(ordinary.reference(), kp.reference());

    let too_long = Lifetime::starting_at(now(), MAX_KEY_PACKAGE_LIFETIME_SECS + 1);
    assert!(matches!(alice.client.create_key_package(&alice.identity, too_long, false), Err(MlsError::InvalidRequest(_))));
    let expired = Lifetime { not_before: 1, not_after: 2 };
    // Made as asked, refused by whoever checks it.
    let stale = alice.client.create_key_package(&alice.identity, expired, false).unwrap();
    assert!(matches!(KeyPackage::from_bytes(stale.to_bytes()), Err(MlsError::InvalidKeyPackage(_))));

    let other = DeviceIdentity::generate(&mut rand::rngs::StdRng::seed_from_u64(99));
    assert_eq!(alice.client.create_key_package(&other, lifetime, false).unwrap_err(), MlsError::WrongSigner);
    assert_eq!(alice.client.create_group(&other, GROUP).unwrap_err(), MlsError::WrongSigner);
}

#[test]
fn a_last_resort_key_package_can_be_used_for_a_join() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob = Device::new("@bob:b.example", "BOB1", 2);
    let kp = bob.client.create_key_package(&bob.identity, Lifetime::starting_at(now(), WEEK), true).unwrap();
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let bundle = a.add_members(&alice.client, &alice.identity, &[KeyPackage::from_bytes(kp.to_bytes()).unwrap()]).unwrap();
    a.merge_pending_commit(&alice.client).unwrap();
    let mut b = bob.join(&bundle.welcome.unwrap(), &a.ratchet_tree().unwrap());
    let message = alice.send(&mut a, "welcome");
    assert_eq!(bob.read(&mut b, &message).1, "welcome");
}

#[test]
fn malformed_and_misdirected_input_gives_typed_errors() {
    let (alice, bob, _carol, mut a, mut b, _c) = three();
    let message = alice.send(&mut a, "real");
    let kp = bob.key_package();
    let update = a.self_update(&alice.client, &alice.identity).unwrap();
    let tree = a.ratchet_tree().unwrap();

    let malformed = |e: &MlsError| matches!(e, MlsError::Malformed { .. });
    for garbage in [&b""[..], b"\x00", b"\x00\x01\x00\x05", &[0xff; 64], &message[..message.len() / 2]] {
        assert!(malformed(&KeyPackage::from_bytes(garbage).unwrap_err()));
        assert!(malformed(&bob.client.join(garbage, &tree).unwrap_err()));
        let error = b.process(&bob.client, garbage).unwrap_err();
        assert!(malformed(&error), "{error:?}");
        assert_eq!(error.kind(), ErrorKind::BadInput);
    }
    // The right encoding, the wrong type.
    assert!(malformed(&KeyPackage::from_bytes(&message).unwrap_err()));
    assert!(malformed(&b.process(&bob.client, kp.to_bytes()).unwrap_err()));
    assert!(malformed(&b.process(&bob.client, &update.group_info).unwrap_err()));
    assert!(malformed(&bob.client.join(&message, &tree).unwrap_err()));
    assert!(malformed(&bob.client.join(&update.commit, b"not a tree").unwrap_err()));

    // Tampered bytes: rejected or malformed, never a panic, never accepted.
    for position in (0..message.len()).step_by(7) {
        let mut tampered = message.clone();
        tampered[position] ^= 0x01;
        if let Ok(incoming) = b.process(&bob.client, &tampered) {
            panic!("tampered byte {position} accepted: {incoming:?}");
        }
    }
    for position in (0..update.commit.len()).step_by(97) {
        let mut tampered = update.commit.clone();
        tampered[position] ^= 0x01;
        assert!(b.process(&bob.client, &tampered).is_err(), "tampered commit byte {position} accepted");
    }
    let mut bad_kp = kp.to_bytes().to_vec();
    let last = bad_kp.len() - 1;
    bad_kp[last] ^= 0x01;
    assert_eq!(KeyPackage::from_bytes(&bad_kp).unwrap_err().kind(), ErrorKind::BadInput);

    // A message of another group.
    let other = Device::new("@dave:d.example", "DAVE1", 4);
    let mut d = other.client.create_group(&other.identity, b"!other:hub.example").unwrap();
    let elsewhere = other.send(&mut d, "elsewhere");
    assert_eq!(b.process(&bob.client, &elsewhere).unwrap_err(), MlsError::WrongGroup);
    // A Welcome for someone else.
    let dave_kp = other.key_package();
    let eve = Device::new("@eve:e.example", "EVE1", 5);
    a.clear_pending_commit(&alice.client).unwrap();
    let bundle = a.add_members(&alice.client, &alice.identity, &[dave_kp]).unwrap();
    a.merge_pending_commit(&alice.client).unwrap();
    let error = eve.client.join(&bundle.welcome.unwrap(), &a.ratchet_tree().unwrap()).unwrap_err();
    assert_eq!(error, MlsError::NoMatchingKeyPackage);
    assert_eq!(error.kind(), ErrorKind::BadInput);
    // Misuse is misuse.
    assert_eq!(a.remove_members(&alice.client, &alice.identity, &[a.own_index()]).unwrap_err().kind(), ErrorKind::Misuse);
    assert_eq!(a.remove_members(&alice.client, &alice.identity, &[LeafIndex(40)]).unwrap_err().kind(), ErrorKind::Misuse);
    assert_eq!(a.merge_pending_commit(&alice.client).unwrap_err().kind(), ErrorKind::Misuse);
}

/// Applies `changes` to `stored` (as the SDK's store does) and checks that it now equals the
/// client's state.
fn persist(
    stored: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    client: &MlsClient<MemoryStorage>,
    changes: Vec<StateChange>,
) {
    for StateChange { key, value } in changes {
        match value {
            Some(value) => stored.insert(key, value),
            None => stored.remove(&key),
        };
    }
    let state = client.storage().values.read().unwrap();
    assert_eq!(stored.len(), state.len());
    assert!(stored.iter().all(|(key, value)| state.get(key) == Some(value)));
}

#[test]
fn state_changes_persist_the_client_and_a_rebuilt_client_keeps_talking() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob = Device::new("@bob:b.example", "BOB1", 2);
    let mut stored = std::collections::BTreeMap::new();
    assert!(alice.client.take_state_changes().is_empty(), "a new client has no state");

    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let changes = alice.client.take_state_changes();
    assert!(!changes.is_empty() && changes.iter().all(|c| c.value.is_some()), "{changes:?}");
    assert!(changes.windows(2).all(|w| w[0].key < w[1].key), "sorted by key");
    persist(&mut stored, &alice.client, changes);
    // Reading changes nothing, and what was taken is not reported again.
    assert_eq!(a.members().unwrap().len(), 1);
    assert!(alice.client.take_state_changes().is_empty());

    let kp = bob.key_package();
    let mut bob_stored = std::collections::BTreeMap::new();
    persist(&mut bob_stored, &bob.client, bob.client.take_state_changes());
    let bundle = a.add_members(&alice.client, &alice.identity, &[kp]).unwrap();
    a.merge_pending_commit(&alice.client).unwrap();
    persist(&mut stored, &alice.client, alice.client.take_state_changes());
    // Joining spends Bob's KeyPackage: its private keys are deleted.
    let mut b = bob.join(&bundle.welcome.unwrap(), &a.ratchet_tree().unwrap());
    let changes = bob.client.take_state_changes();
    assert!(changes.iter().any(|c| c.value.is_none()), "the spent KeyPackage is deleted: {changes:?}");
    persist(&mut bob_stored, &bob.client, changes);

    let message = alice.send(&mut a, "before the restart");
    assert_eq!(bob.read(&mut b, &message).1, "before the restart");
    persist(&mut stored, &alice.client, alice.client.take_state_changes());
    let epoch = a.epoch();
    drop(a);

    // A restart: a new client from the stored pairs only.
    let (user, device) = (alice.client.own_leaf().user().clone(), alice.client.own_leaf().device().clone());
    let alice = Device { client: MlsClient::with_state(stored.clone(), user, device, &alice.identity), ..alice };
    assert!(alice.client.take_state_changes().is_empty(), "the loaded state is not reported again");
    let mut a = alice.client.load_group(GROUP).unwrap().expect("stored");
    assert_eq!((a.epoch(), a.members().unwrap()), (epoch, b.members().unwrap()));
    let message = alice.send(&mut a, "after the restart");
    assert_eq!(bob.read(&mut b, &message).1, "after the restart");
    let reply = bob.send(&mut b, "welcome back");
    assert_eq!(alice.read(&mut a, &reply).1, "welcome back");
    let update = b.self_update(&bob.client, &bob.identity).unwrap();
    b.merge_pending_commit(&bob.client).unwrap();
    alice.apply(&mut a, &update.commit, &[&alice.list, &bob.list]);
    assert_eq!(a.epoch(), epoch + 1);
    persist(&mut stored, &alice.client, alice.client.take_state_changes());
}

/// The hub checks a commit with its GroupInfo and merges it; returns the changes it saw.
fn hub_accepts(hub: &mut HubGroup<MemoryStorage>, bundle: &CommitBundle) -> Vec<MemberChange> {
    let accepted = hub.check_commit(&bundle.commit, &bundle.group_info).unwrap();
    assert_eq!(accepted.epoch(), hub.epoch() + 1);
    let changes = accepted.changes().to_vec();
    hub.merge(accepted).unwrap();
    changes
}

#[test]
fn the_hub_follows_adds_updates_and_removals_and_survives_a_reload() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob = Device::new("@bob:b.example", "BOB1", 2);
    let carol = Device::new("@carol:c.example", "CAROL1", 3);
    let lists = [&alice.list, &bob.list, &carol.list];
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let group_info = a.group_info(&alice.client, &alice.identity).unwrap();
    let mut hub = HubGroup::from_group_info(&group_info, &a.ratchet_tree().unwrap(), MemoryStorage::default()).unwrap();
    assert_eq!((hub.group_id(), hub.epoch()), (GROUP, 0));
    assert_eq!(hub.members().unwrap(), a.members().unwrap());

    // Alice adds Bob and Carol; they join with the tree the hub serves.
    let add = a.add_members(&alice.client, &alice.identity, &[bob.key_package(), carol.key_package()]).unwrap();
    let changes = hub_accepts(&mut hub, &add);
    assert!(changes.contains(&MemberChange::Added(bob.client.own_leaf().clone())));
    assert!(changes.contains(&MemberChange::Added(carol.client.own_leaf().clone())));
    a.merge_pending_commit(&alice.client).unwrap();
    let welcome = add.welcome.unwrap();
    let mut b = bob.join(&welcome, &hub.ratchet_tree().unwrap());
    let mut c = carol.join(&welcome, &hub.ratchet_tree().unwrap());
    assert_eq!(hub.epoch(), 1);
    assert_eq!(hub.members().unwrap(), a.members().unwrap());
    assert_eq!(hub.members().unwrap(), c.members().unwrap());

    // Bob updates his keys.
    let update = b.self_update(&bob.client, &bob.identity).unwrap();
    let changes = hub_accepts(&mut hub, &update);
    assert_eq!(changes, [MemberChange::Updated { index: b.own_index(), leaf: bob.client.own_leaf().clone() }]);
    b.merge_pending_commit(&bob.client).unwrap();
    alice.apply(&mut a, &update.commit, &lists);
    carol.apply(&mut c, &update.commit, &lists);
    assert_eq!(hub.members().unwrap(), b.members().unwrap());
    assert_eq!(hub.ratchet_tree().unwrap(), a.ratchet_tree().unwrap());

    // An application message of this epoch: the hub sees its epoch, not its sender.
    let hello = carol.send(&mut c, "hello");
    assert_eq!(hub.check_application(&hello).unwrap(), ApplicationInfo { epoch: 2 });

    // Alice removes Carol.
    let carol_index = c.own_index();
    let removal = a.remove_members(&alice.client, &alice.identity, &[carol_index]).unwrap();
    let changes = hub_accepts(&mut hub, &removal);
    assert!(changes.contains(&MemberChange::Removed { index: carol_index, leaf: carol.client.own_leaf().clone() }));
    a.merge_pending_commit(&alice.client).unwrap();
    bob.apply(&mut b, &removal.commit, &lists);
    assert_eq!(hub.members().unwrap(), a.members().unwrap());
    assert_eq!(hub.members().unwrap(), b.members().unwrap());
    assert_eq!(hub.member(carol_index).unwrap(), None);
    // Carol's message of the epoch before is still within MAX_PAST_EPOCHS.
    assert_eq!(hub.check_application(&hello).unwrap(), ApplicationInfo { epoch: 2 });

    // The state as one blob brings the group back; a damaged blob is refused.
    let blob = hub.state_bytes();
    let copy = HubGroup::from_state_bytes(&blob, GROUP).unwrap().expect("the group in the blob");
    assert_eq!((copy.epoch(), copy.members().unwrap()), (3, hub.members().unwrap()));
    assert!(HubGroup::from_state_bytes(&blob, b"!other:hub.example").unwrap().is_none());
    assert!(matches!(HubGroup::from_state_bytes(&blob[..blob.len() - 1], GROUP).unwrap_err(), MlsError::Storage(_)));

    // The stored state brings the group back.
    let storage = hub.into_storage();
    assert!(HubGroup::load(MemoryStorage::default(), GROUP).unwrap().is_none());
    let mut hub = HubGroup::load(storage, GROUP).unwrap().expect("the stored group");
    assert_eq!(hub.epoch(), 3);
    assert_eq!(hub.members().unwrap(), a.members().unwrap());
    let update = a.self_update(&alice.client, &alice.identity).unwrap();
    hub_accepts(&mut hub, &update);
    assert_eq!(hub.epoch(), 4);
}

#[test]
fn the_hub_refuses_a_second_commit_for_an_epoch_and_a_mismatched_group_info() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob = Device::new("@bob:b.example", "BOB1", 2);
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let group_info = a.group_info(&alice.client, &alice.identity).unwrap();
    let mut hub = HubGroup::from_group_info(&group_info, &a.ratchet_tree().unwrap(), MemoryStorage::default()).unwrap();
    let add = a.add_members(&alice.client, &alice.identity, &[bob.key_package()]).unwrap();
    hub_accepts(&mut hub, &add);
    a.merge_pending_commit(&alice.client).unwrap();
    let mut b = bob.join(add.welcome.as_deref().unwrap(), &hub.ratchet_tree().unwrap());
    let old_message = alice.send(&mut a, "epoch 1");

    // Both commit in epoch 1; the hub takes Alice's, and names its epoch to Bob.
    let winner = a.self_update(&alice.client, &alice.identity).unwrap();
    let loser = b.self_update(&bob.client, &bob.identity).unwrap();
    // A GroupInfo that is not the commit's: of the epoch before, of the other commit, of another group.
    let other_group = alice.client.create_group(&alice.identity, b"!other:hub.example").unwrap();
    let other_info = other_group.group_info(&alice.client, &alice.identity).unwrap();
    for group_info in [&add.group_info, &loser.group_info, &other_info] {
        let error = hub.check_commit(&winner.commit, group_info).unwrap_err();
        assert!(matches!(error, MlsError::Rejected(_)), "{error:?}");
    }
    hub_accepts(&mut hub, &winner);
    assert_eq!(hub.check_commit(&loser.commit, &loser.group_info).unwrap_err(), MlsError::EpochConflict { current: 2 });
    assert_eq!(hub.check_commit(&winner.commit, &winner.group_info).unwrap_err(), MlsError::EpochConflict { current: 2 });

    // Application messages: within MAX_PAST_EPOCHS, then too old; handshake and application
    // messages are not taken for one another; another group's messages are refused.
    assert_eq!(hub.check_application(&old_message).unwrap(), ApplicationInfo { epoch: 1 });
    a.merge_pending_commit(&alice.client).unwrap();
    for _ in 0..2 {
        let update = a.self_update(&alice.client, &alice.identity).unwrap();
        hub_accepts(&mut hub, &update);
        a.merge_pending_commit(&alice.client).unwrap();
    }
    assert_eq!(hub.check_application(&old_message).unwrap_err(), MlsError::EpochConflict { current: 4 });
    let current = alice.send(&mut a, "epoch 4");
    assert_eq!(hub.check_application(&current).unwrap(), ApplicationInfo { epoch: 4 });
    assert!(matches!(hub.check_application(&winner.commit).unwrap_err(), MlsError::Rejected(_)));
    assert!(matches!(hub.check_commit(&current, &winner.group_info).unwrap_err(), MlsError::Rejected(_)));
    let mut other_group = other_group;
    let elsewhere = alice.send(&mut other_group, "elsewhere");
    assert_eq!(hub.check_application(&elsewhere).unwrap_err(), MlsError::WrongGroup);
}

#[test]
fn the_hub_gives_typed_errors_for_garbage() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let group_info = a.group_info(&alice.client, &alice.identity).unwrap();
    let tree = a.ratchet_tree().unwrap();
    let hub = HubGroup::from_group_info(&group_info, &tree, MemoryStorage::default()).unwrap();
    let update = a.self_update(&alice.client, &alice.identity).unwrap();
    let malformed = |e: MlsError| {
        assert!(matches!(e, MlsError::Malformed { .. }), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::BadInput);
    };
    for garbage in [&b""[..], b"\x00", b"\x00\x01\x00\x05", &[0xff; 64], &update.commit[..update.commit.len() / 2]] {
        malformed(HubGroup::from_group_info(garbage, &tree, MemoryStorage::default()).unwrap_err());
        // (An empty byte string is a well-formed empty tree, which does not verify.)
        let error = HubGroup::from_group_info(&group_info, garbage, MemoryStorage::default()).unwrap_err();
        assert!(matches!(error, MlsError::Malformed { .. } | MlsError::Rejected(_)), "{error:?}");
        assert_eq!(error.kind(), ErrorKind::BadInput);
        malformed(hub.check_commit(garbage, &update.group_info).unwrap_err());
        malformed(hub.check_commit(&update.commit, garbage).unwrap_err());
        malformed(hub.check_application(garbage).unwrap_err());
    }
    // The right encoding, the wrong type.
    malformed(HubGroup::from_group_info(&update.commit, &tree, MemoryStorage::default()).unwrap_err());
    malformed(hub.check_commit(&update.group_info, &update.group_info).unwrap_err());
    // A GroupInfo whose tree is not the one given.
    let other = alice.client.create_group(&alice.identity, b"!other:hub.example").unwrap();
    let other_tree = other.ratchet_tree().unwrap();
    let error = HubGroup::from_group_info(&update.group_info, &other_tree, MemoryStorage::default()).unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadInput, "{error:?}");
}

#[test]
fn the_hub_takes_a_users_leave_as_proposals_and_the_epochs_commit_must_include_them() {
    let alice = Device::new("@alice:a.example", "ALICE1", 1);
    let bob1 = Device::new("@bob:b.example", "BOB1", 2);
    let bob2 = Device::new("@bob:b.example", "BOB2", 4);
    let carol = Device::new("@carol:c.example", "CAROL1", 3);
    let mut a = alice.client.create_group(&alice.identity, GROUP).unwrap();
    let group_info = a.group_info(&alice.client, &alice.identity).unwrap();
    let mut hub = HubGroup::from_group_info(&group_info, &a.ratchet_tree().unwrap(), MemoryStorage::default()).unwrap();
    let add =
        a.add_members(&alice.client, &alice.identity, &[bob1.key_package(), bob2.key_package(), carol.key_package()]).unwrap();
    hub_accepts(&mut hub, &add);
    a.merge_pending_commit(&alice.client).unwrap();
    let welcome = add.welcome.unwrap();
    let (mut b1, mut b2, mut c) = (
        bob1.join(&welcome, &hub.ratchet_tree().unwrap()),
        bob2.join(&welcome, &hub.ratchet_tree().unwrap()),
        carol.join(&welcome, &hub.ratchet_tree().unwrap()),
    );
    let (b1_index, b2_index) = (b1.own_index(), b2.own_index());

    // Carol may not propose removing Bob; Alice may not propose an add.
    let foreign = c.propose_remove(&carol.client, &carol.identity, b1_index).unwrap();
    assert_eq!(hub.message_kind(&foreign).unwrap(), MessageKind::Proposal);
    assert!(matches!(hub.check_proposal(&foreign).unwrap_err(), MlsError::Rejected(_)));
    c.drop_own_proposals(&carol.client).unwrap();
    assert!(!c.has_pending_proposals());

    // Bob leaves from his first device: both his leaves, each by a proposal.
    let mut proposals = Vec::new();
    for index in [b2_index, b1_index] {
        let proposal = b1.propose_remove(&bob1.client, &bob1.identity, index).unwrap();
        let accepted = hub.check_proposal(&proposal).unwrap();
        assert_eq!((accepted.proposer().index, accepted.removed().index), (b1_index, index));
        hub.store_proposal(accepted).unwrap();
        proposals.push(proposal);
    }
    assert_eq!(hub.pending_proposals(), 2);
    assert_eq!(b1.pending_removals(), [b2_index, b1_index]);
    // The same removal twice would make every commit of the epoch invalid: refused.
    let again = b2.propose_remove(&bob2.client, &bob2.identity, b2_index).unwrap();
    assert!(matches!(hub.check_proposal(&again).unwrap_err(), MlsError::Rejected(_)));
    b2.drop_own_proposals(&bob2.client).unwrap();
    // Proposals are part of the hub's stored state.
    let copy = HubGroup::from_state_bytes(&hub.state_bytes(), GROUP).unwrap().unwrap();
    assert_eq!(copy.pending_proposals(), 2);

    // A commit that leaves them out is refused; one that includes them is taken.
    let blind = a.self_update(&alice.client, &alice.identity).unwrap();
    assert_eq!(hub.check_commit(&blind.commit, &blind.group_info).unwrap_err(), MlsError::MissingProposals { missing: 2 });
    a.clear_pending_commit(&alice.client).unwrap();
    for proposal in &proposals {
        let Incoming::Proposal(incoming) = a.process(&alice.client, proposal).unwrap() else { panic!("expected a proposal") };
        a.store_proposal(&alice.client, incoming).unwrap();
        let Incoming::Proposal(incoming) = c.process(&carol.client, proposal).unwrap() else { panic!("expected a proposal") };
        c.store_proposal(&carol.client, incoming).unwrap();
        let Incoming::Proposal(incoming) = b2.process(&bob2.client, proposal).unwrap() else { panic!("expected a proposal") };
        b2.store_proposal(&bob2.client, incoming).unwrap();
    }
    assert!(a.has_pending_proposals());
    let commit = a.commit_pending_proposals(&alice.client, &alice.identity).unwrap();
    let changes = hub_accepts(&mut hub, &commit);
    assert!(changes.contains(&MemberChange::Removed { index: b1_index, leaf: bob1.client.own_leaf().clone() }));
    assert!(changes.contains(&MemberChange::Removed { index: b2_index, leaf: bob2.client.own_leaf().clone() }));
    assert_eq!(hub.pending_proposals(), 0);
    a.merge_pending_commit(&alice.client).unwrap();
    carol.apply(&mut c, &commit.commit, &[&alice.list, &bob1.list, &bob2.list, &carol.list]);
    for (device, group) in [(&bob1, &mut b1), (&bob2, &mut b2)] {
        let Incoming::Commit(incoming) = group.process(&device.client, &commit.commit).unwrap() else { panic!("a commit") };
        assert!(incoming.removes_me());
    }
    assert_eq!(hub.members().unwrap(), a.members().unwrap());
    assert_eq!(hub.members().unwrap().len(), 2);

    // A proposal of an epoch gone by.
    let stale = c.propose_remove(&carol.client, &carol.identity, c.own_index()).unwrap();
    let update = a.self_update(&alice.client, &alice.identity).unwrap();
    hub_accepts(&mut hub, &update);
    assert_eq!(hub.check_proposal(&stale).unwrap_err(), MlsError::EpochConflict { current: 3 });
}
