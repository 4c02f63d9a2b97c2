//! Groups through the SDK (`Messenger`) on three homeservers: creation with an encrypted name,
//! every device (a user's second device included) joins and reads the same order, two members
//! change the membership at the same time and both changes land (the loser's SDK recovers from
//! `epoch_conflict` by itself), a removed member stops receiving, and a member's profile
//! survives a restart and keeps chatting. A device dropped from its owner's signed device list
//! leaves its groups: through `Messenger::remove_device`, or by the next committer once it knows
//! the new list.

use crate::e2ee::next;
use parley_crypto::identity::{verify_device_list, UserIdentity, VerifiedDevice};
use parley_sdk::messenger::{GroupError, GroupState, Messenger, MessengerError, MessengerEvent, MessengerEvents, MetaChange};
use parley_sdk::spec::GroupId;
use parley_sdk::UserId;
use parley_tests::fednet::{Discovery, FedNet};
use std::path::Path;

const PASSWORD: &str = "correct horse";

struct Account {
    messenger: Messenger,
    events: MessengerEvents,
}

impl Account {
    fn user(&self) -> UserId {
        self.messenger.session().user_id.clone()
    }

    async fn joined(&mut self) -> anyhow::Result<GroupId> {
        next(&mut self.events, |e| match e {
            MessengerEvent::GroupJoined { group_id, .. } => Some(group_id),
            _ => None,
        })
        .await
    }

    /// The next `count` group texts, as (sender, body).
    async fn texts(&mut self, count: usize) -> anyhow::Result<Vec<(String, String)>> {
        let mut texts = Vec::with_capacity(count);
        while texts.len() < count {
            texts.push(
                next(&mut self.events, |e| match e {
                    MessengerEvent::GroupMessage(m) => Some((m.sender.to_string(), m.body)),
                    _ => None,
                })
                .await?,
            );
        }
        Ok(texts)
    }

    /// Waits for a change of the group's members.
    async fn members_changed(&mut self, group: &GroupId) -> anyhow::Result<()> {
        next(&mut self.events, |e| {
            matches!(e, MessengerEvent::GroupMembersChanged { group_id, .. } if &group_id == group).then_some(())
        })
        .await
    }

    /// Waits until this device learns it was removed from the group.
    async fn removed(&mut self, group: &GroupId) -> anyhow::Result<()> {
        next(&mut self.events, |e| matches!(e, MessengerEvent::GroupRemoved { group_id } if &group_id == group).then_some(()))
            .await
    }

    /// The group's member devices, as `user/device`.
    async fn members(&self, group: &GroupId) -> anyhow::Result<Vec<String>> {
        Ok(self.messenger.group_members(group).await?.into_iter().map(|(u, d)| format!("{u}/{d}")).collect())
    }

    fn device(&self) -> String {
        format!("{}/{}", self.user(), self.messenger.session().device_id)
    }

    /// The group's history, as (sender, body), in the hub's order.
    async fn history(&self, group: &GroupId) -> anyhow::Result<Vec<(String, String)>> {
        Ok(self.messenger.group_history(group, 100).await?.into_iter().map(|m| (m.sender.to_string(), m.body)).collect())
    }
}

async fn register(base: &str, dir: &Path, name: &str) -> anyhow::Result<(Account, zeroize::Zeroizing<[u8; 32]>)> {
    let (messenger, events, recovery) = Messenger::register(base, &dir.join(format!("{name}-1.db")), name, PASSWORD).await?;
    Ok((Account { messenger, events }, recovery))
}

/// Three servers and the people of these tests: alice on a.test, bob with two devices on
/// b.test, carol and dave on c.test; their profiles in `dir`.
struct Cast {
    net: FedNet,
    dir: tempfile::TempDir,
    /// b.test's base URL.
    b: String,
    bob_recovery: zeroize::Zeroizing<[u8; 32]>,
    alice: Account,
    bob: Account,
    bob2: Account,
    carol: Account,
    dave: Account,
}

async fn cast() -> anyhow::Result<Cast> {
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)], "").await?;
    let (a, b, c) =
        (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone(), net.server("c.test").base_url.clone());
    let dir = tempfile::tempdir()?;
    let (alice, _) = register(&a, dir.path(), "alice").await?;
    let (bob, bob_recovery) = register(&b, dir.path(), "bob").await?;
    let (messenger, events) = Messenger::add_device(&b, &dir.path().join("bob-2.db"), "bob", PASSWORD, &bob_recovery).await?;
    let bob2 = Account { messenger, events };
    let (carol, _) = register(&c, dir.path(), "carol").await?;
    let (dave, _) = register(&c, dir.path(), "dave").await?;
    Ok(Cast { net, dir, b, bob_recovery, alice, bob, bob2, carol, dave })
}

#[tokio::test]
async fn sdk_groups_across_three_servers_agree_recover_from_concurrent_commits_and_survive_a_restart() -> anyhow::Result<()> {
    let Cast { net: _net, dir, b: _, bob_recovery: _, mut alice, mut bob, mut bob2, mut carol, mut dave } = cast().await?;

    let (group, report) = alice.messenger.create_group("Team", &[bob.user(), carol.user()]).await?;
    assert_eq!(report.added.len(), 3, "bob's two devices and carol's: {report:?}");
    assert_eq!(group.hub().as_str(), "a.test");
    for member in [&mut bob, &mut bob2, &mut carol] {
        assert_eq!(member.joined().await?, group);
    }

    // Everyone talks; every device has the same history in the same order.
    alice.messenger.send_group_text(&group, "hello from a").await?;
    bob.messenger.send_group_text(&group, "hello from b").await?;
    carol.messenger.send_group_text(&group, "hello from c").await?;
    alice.texts(2).await?;
    bob.texts(2).await?;
    bob2.texts(3).await?;
    carol.texts(2).await?;
    let order = alice.history(&group).await?;
    assert_eq!(order.len(), 3);
    for member in [&bob, &bob2, &carol] {
        assert_eq!(member.history(&group).await?, order, "{} has the same order", member.user());
    }

    // Only admins change the membership: Alice (the creator) makes Bob one too. The policy
    // travels encrypted; Bob's SDK takes it from Alice because she is an admin.
    assert!(matches!(
        bob.messenger.remove_members(&group, &[carol.user()]).await,
        Err(MessengerError::Group(GroupError::NotAllowed(_)))
    ));
    alice.messenger.update_group(&group, MetaChange::Admins(vec![alice.user(), bob.user()])).await?;
    let policy = next(&mut bob.events, |e| match e {
        MessengerEvent::GroupPolicyChanged { policy, .. } => Some(policy),
        _ => None,
    })
    .await?;
    assert_eq!(policy.admins, [alice.user(), bob.user()]);
    // Opening the group follows its members' presence (not pushed to the group as a whole).
    let presence = bob.messenger.open_group(&group).await?;
    let mut seen: Vec<String> = presence.iter().map(|p| p.user.to_string()).collect();
    seen.sort();
    assert_eq!(seen, ["@alice:a.test", "@carol:c.test"]);

    // Alice adds Dave while Bob removes Carol, at the same time: exactly one commit wins the
    // epoch; the other SDK catches up and rebuilds its change on top, and both land.
    let (dave_id, carol_id) = ([dave.user()], [carol.user()]);
    let (added, removed) =
        tokio::join!(alice.messenger.add_members(&group, &dave_id), bob.messenger.remove_members(&group, &carol_id));
    added?;
    removed?;
    assert_eq!(dave.joined().await?, group);
    next(&mut carol.events, |e| matches!(e, MessengerEvent::GroupRemoved { .. }).then_some(())).await?;
    let members: Vec<String> = alice.messenger.group_members(&group).await?.into_iter().map(|(u, _)| u.to_string()).collect();
    assert!(members.contains(&"@dave:c.test".to_owned()) && !members.contains(&"@carol:c.test".to_owned()), "{members:?}");

    // Bob's second device restarts and keeps chatting; Dave reads only what came after he joined.
    bob2.messenger.close().await;
    drop(bob2);
    let (messenger, events) = Messenger::open(&dir.path().join("bob-2.db")).await?;
    let bob2 = Account { messenger, events };
    bob2.messenger.send_group_text(&group, "back after a restart").await?;
    for member in [&mut alice, &mut bob, &mut dave] {
        let texts = member.texts(1).await?;
        assert_eq!(texts, [("@bob:b.test".to_owned(), "back after a restart".to_owned())]);
    }
    assert_eq!(dave.history(&group).await?, [("@bob:b.test".to_owned(), "back after a restart".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn sdk_a_user_leaves_with_both_devices_and_another_member_commits_it_by_itself() -> anyhow::Result<()> {
    let Cast { net: _net, dir: _dir, b: _, bob_recovery: _, mut alice, mut bob, mut bob2, mut carol, dave: _ } = cast().await?;
    let (group, report) = alice.messenger.create_group("Team", &[bob.user(), carol.user()]).await?;
    assert_eq!(report.added.len(), 3, "{report:?}");
    for member in [&mut bob, &mut bob2, &mut carol] {
        assert_eq!(member.joined().await?, group);
    }

    // Bob leaves from his second device. Nobody is asked to do anything: Alice's SDK (the
    // remaining member with the lowest leaf) commits the proposals when it reads them.
    bob2.messenger.leave(&group).await?;
    for member in [&mut bob, &mut bob2] {
        next(&mut member.events, |e| matches!(e, MessengerEvent::GroupRemoved { group_id } if group_id == group).then_some(()))
            .await?;
    }
    for member in [&mut alice, &mut carol] {
        let removed = next(&mut member.events, |e| match e {
            MessengerEvent::GroupMembersChanged { group_id, removed, .. } if group_id == group && !removed.is_empty() => {
                Some(removed)
            }
            _ => None,
        })
        .await?;
        assert_eq!(removed, [bob.user()]);
    }
    let members: Vec<String> = carol.messenger.group_members(&group).await?.into_iter().map(|(u, _)| u.to_string()).collect();
    assert_eq!(members, ["@alice:a.test", "@carol:c.test"]);
    for member in [&bob, &bob2] {
        let record = member.messenger.group(&group).await?.expect("the group stays in the list");
        assert_eq!(record.state, parley_sdk::messenger::GroupState::Removed);
        assert!(member.messenger.send_group_text(&group, "still here?").await.is_err());
    }

    // The others go on; Bob's devices read nothing more.
    carol.messenger.send_group_text(&group, "after bob left").await?;
    assert_eq!(alice.texts(1).await?, [("@carol:c.test".to_owned(), "after bob left".to_owned())]);
    for member in [&bob, &bob2] {
        assert!(member.history(&group).await?.iter().all(|(_, body)| body != "after bob left"));
    }
    Ok(())
}

#[tokio::test]
async fn a_device_dropped_from_its_owners_signed_list_leaves_its_groups() -> anyhow::Result<()> {
    let Cast { net: _net, dir, b, bob_recovery, mut alice, mut bob, mut bob2, mut carol, mut dave } = cast().await?;

    let (group, report) = alice.messenger.create_group("Team", &[bob.user(), carol.user()]).await?;
    assert_eq!(report.added.len(), 3, "{report:?}");
    for member in [&mut bob, &mut bob2, &mut carol] {
        assert_eq!(member.joined().await?, group);
    }

    // 1. Bob removes his device B2 through the SDK: a new signed list, a pruning commit, then
    //    the server forgets B2. A device cannot remove itself that way.
    let own = bob.messenger.session().device_id.clone();
    let refused = bob.messenger.remove_device(&own, PASSWORD).await;
    assert!(matches!(refused, Err(MessengerError::InvalidRequest(_))), "{refused:?}");
    let b2 = bob2.messenger.session().device_id.clone();
    let removal = bob.messenger.remove_device(&b2, PASSWORD).await?;
    assert_eq!(removal.removed_from, std::slice::from_ref(&group));
    assert!(removal.failed.is_empty(), "{removal:?}");
    bob2.removed(&group).await?;
    assert_eq!(bob2.messenger.group(&group).await?.map(|r| r.state), Some(GroupState::Removed));
    for member in [&mut alice, &mut carol] {
        member.members_changed(&group).await?;
    }
    let expected = vec![alice.device(), bob.device(), carol.device()];
    for member in [&alice, &bob, &carol] {
        let mut members = member.members(&group).await?;
        members.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(members, want, "{} sees the group without B2", member.user());
    }
    assert!(!bob.messenger.refresh_devices(&bob.user()).await?.contains(&b2), "B2 left bob's list");
    // What is sent afterwards reaches the others, not B2.
    alice.messenger.send_group_text(&group, "after B2 left").await?;
    for member in [&mut bob, &mut carol] {
        assert_eq!(member.texts(1).await?, [("@alice:a.test".to_owned(), "after B2 left".to_owned())]);
    }
    assert!(bob2.history(&group).await?.iter().all(|(_, body)| body != "after B2 left"));

    // 2. Bob's list drops B3 by a raw list update (no group commit). Once alice refreshes bob's
    //    list, her next commit (adding dave) removes B3's leaf too.
    let (messenger, events) = Messenger::add_device(&b, &dir.path().join("bob-3.db"), "bob", PASSWORD, &bob_recovery).await?;
    let mut bob3 = Account { messenger, events };
    let (second, report) = alice.messenger.create_group("Second", &[bob.user(), carol.user()]).await?;
    assert_eq!(report.added.len(), 3, "bob's two devices and carol's: {report:?}");
    for member in [&mut bob, &mut bob3, &mut carol] {
        assert_eq!(member.joined().await?, second);
    }
    let b3 = bob3.messenger.session().device_id.clone();
    let api = parley_sdk::Api::new(bob.messenger.session())?;
    let identity = UserIdentity::from_recovery_seed(&bob_recovery);
    let current = verify_device_list(&api.device_list(&bob.user()).await?, &bob.user(), Some(&identity.public()), None)?;
    let entries = current.devices().iter().filter(|d| d.device_id() != &b3).map(VerifiedDevice::to_entry).collect();
    api.put_device_list(&identity.sign_device_list(&bob.user(), current.version() + 1, entries)?).await?;
    assert!(!alice.messenger.refresh_devices(&bob.user()).await?.contains(&b3));
    let report = alice.messenger.add_members(&second, &[dave.user()]).await?;
    assert_eq!(report.added.len(), 1, "{report:?}");
    assert_eq!(dave.joined().await?, second);
    bob3.removed(&second).await?;
    for member in [&mut bob, &mut carol] {
        member.members_changed(&second).await?;
    }
    let members = alice.members(&second).await?;
    assert!(!members.contains(&bob3.device()) && members.contains(&dave.device()), "{members:?}");
    assert_eq!(members.len(), 4, "{members:?}");
    alice.messenger.send_group_text(&second, "after B3 left").await?;
    for member in [&mut bob, &mut carol, &mut dave] {
        assert_eq!(member.texts(1).await?, [("@alice:a.test".to_owned(), "after B3 left".to_owned())]);
    }
    assert!(bob3.history(&second).await?.iter().all(|(_, body)| body != "after B3 left"));
    assert_eq!(bob3.messenger.group(&second).await?.map(|r| r.state), Some(GroupState::Removed));
    Ok(())
}

#[tokio::test]
async fn sdk_group_texts_and_metadata_written_while_the_server_is_down_go_out_when_it_is_back() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let (a, b) = (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone());
    let dir = tempfile::tempdir()?;
    let (mut alice, _) = register(&a, dir.path(), "alice").await?;
    let (mut bob, _) = register(&b, dir.path(), "bob").await?;
    let (group, _) = alice.messenger.create_group("Team", &[bob.user()]).await?;
    assert_eq!(bob.joined().await?, group);

    // Bob's server is down: the send fails, the text stays in his history without position.
    net.server("b.test").stop().await?;
    assert!(bob.messenger.send_group_text(&group, "written offline").await.is_err());
    let unsent = bob.messenger.group_history(&group, 10).await?;
    assert!(unsent.iter().any(|m| m.body == "written offline" && m.group_seq.is_none()), "{unsent:?}");

    // When it is back, Bob's SDK reconnects and sends it, once.
    net.server("b.test").restart().await?;
    assert_eq!(alice.texts(1).await?, [("@bob:b.test".to_owned(), "written offline".to_owned())]);
    alice.messenger.send_group_text(&group, "got it").await?;
    assert_eq!(bob.texts(1).await?, [("@alice:a.test".to_owned(), "got it".to_owned())]);
    let history = alice.history(&group).await?;
    assert_eq!(history.iter().filter(|(_, body)| body == "written offline").count(), 1, "{history:?}");

    // The same for metadata: alice changes the topic while her server (the hub) is down; it
    // reaches bob once the server is back.
    net.server("a.test").stop().await?;
    assert!(alice.messenger.update_group(&group, MetaChange::Topic(Some("set offline".into()))).await.is_err());
    net.server("a.test").restart().await?;
    let policy = next(&mut bob.events, |e| match e {
        MessengerEvent::GroupPolicyChanged { policy, .. } => Some(policy),
        _ => None,
    })
    .await?;
    assert_eq!(policy.topic.as_deref(), Some("set offline"));
    Ok(())
}
