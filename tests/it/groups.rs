//! MLS groups across homeservers, driven by bare MLS clients (`parley_crypto::mls`) over the
//! client API and the WebSocket, so the server's rules are tested without the SDK's recovery
//! logic: the hub orders commits (one per epoch, `epoch_conflict` with the current epoch for the
//! loser), fans every message out once per participating server, routes Welcomes to the new
//! members, refuses non-members, and each device reads the group stream from its own cursor.

use crate::raw;
use crate::support::register;
use anyhow::Context as _;
use parley_crypto::identity::DeviceIdentity;
use parley_crypto::mls::{Group, Incoming, KeyPackage, LeafIndex, Lifetime, MemoryStorage, MlsClient};
use parley_sdk::spec::error::DeviceRef;
use parley_sdk::spec::v1::groups::{CreateGroupRequest, GroupEvent, GroupEventKind, GroupSendRequest, GroupSentResponse};
use parley_sdk::spec::v1::keypackages::{ClaimKeyPackagesRequest, UploadKeyPackagesRequest};
use parley_sdk::spec::v1::keys::UploadKeysRequest;
use parley_sdk::spec::{ErrorBody, GroupId, GroupSeq};
use parley_sdk::{Api, ErrorCode, Session};
use parley_tests::fednet::{Discovery, FedNet};
use rand::rngs::OsRng;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

/// One device: its session, keys, MLS client, WebSocket, and what it decrypted, in order.
struct Member {
    base_url: String,
    session: Session,
    identity: DeviceIdentity,
    client: MlsClient<MemoryStorage>,
    group: Option<Group>,
    socket: raw::Socket,
    /// `client_msg_id` of this device's commit in flight.
    pending: Option<Uuid>,
    /// (position, text) of every application message seen, own ones included.
    texts: Vec<(GroupSeq, String)>,
    /// The last position processed.
    seen: GroupSeq,
}

impl Member {
    async fn new(base_url: &str, session: Session) -> anyhow::Result<Self> {
        let identity = DeviceIdentity::generate(&mut OsRng);
        let mut upload = UploadKeysRequest::default();
        upload.device_keys = Some(identity.device_keys(&session.user_id, &session.device_id));
        Api::new(&session)?.upload_keys(&upload).await?;
        let client = MlsClient::new(MemoryStorage::default(), session.user_id.clone(), session.device_id.clone(), &identity);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let packages = (0..3)
            .map(|_| Ok(client.create_key_package(&identity, Lifetime::starting_at(now, 86_400), false)?.to_bytes().to_vec()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Api::new(&session)?.upload_keypackages(&UploadKeyPackagesRequest::new(packages, None)).await?;
        let mut socket =
            raw::connect(base_url, session.access_token(), 0).await.map_err(|s| anyhow::anyhow!("upgrade refused: {s}"))?;
        raw::next_of(&mut socket, "caught_up", WAIT).await?;
        Ok(Self {
            base_url: base_url.to_owned(),
            session,
            identity,
            client,
            group: None,
            socket,
            pending: None,
            texts: Vec::new(),
            seen: GroupSeq::ZERO,
        })
    }

    async fn register(base_url: &str, name: &str) -> anyhow::Result<Self> {
        Self::new(base_url, register(base_url, name).await?).await
    }

    fn device(&self) -> DeviceRef {
        DeviceRef::new(self.session.user_id.clone(), self.session.device_id.clone())
    }

    async fn create(&mut self, group_id: &GroupId) -> anyhow::Result<()> {
        let group = self.client.create_group(&self.identity, group_id.mls_group_id())?;
        let request =
            CreateGroupRequest::new(group_id.clone(), group.group_info(&self.client, &self.identity)?, group.ratchet_tree()?);
        let (status, body) = raw::post(&self.base_url, "/v1/groups", Some(self.session.access_token()), &json!(request)).await?;
        anyhow::ensure!(status == 200, "create: {status} {body}");
        self.group = Some(group);
        Ok(())
    }

    /// Submits to the group through this device's server: the hub's answer or its error.
    async fn submit(
        &self,
        group_id: &GroupId,
        request: &GroupSendRequest,
    ) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let path = format!("/v1/groups/{}/send", urlencoding(group_id.as_str()));
        let (status, body) = raw::post(&self.base_url, &path, Some(self.session.access_token()), &json!(request)).await?;
        Ok(match status {
            200 => Ok(serde_json::from_value(body)?),
            _ => Err(serde_json::from_value(body).with_context(|| format!("error {status}"))?),
        })
    }

    /// Claims one KeyPackage of each device (through this device's server) and commits adding
    /// them; the commit stays pending until it comes back.
    async fn add(&mut self, group_id: &GroupId, devices: &[DeviceRef]) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let claimed = Api::new(&self.session)?.claim_keypackages(&ClaimKeyPackagesRequest::new(devices.to_vec())).await?;
        anyhow::ensure!(claimed.missing.is_empty() && claimed.key_packages.len() == devices.len(), "claim: {claimed:?}");
        let packages = claimed
            .key_packages
            .iter()
            .map(|kp| Ok(KeyPackage::from_bytes(&kp.key_package.0)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (client, identity) = (&self.client, &self.identity);
        let bundle = self.group.as_mut().context("not in a group")?.add_members(client, identity, &packages)?;
        self.commit(group_id, bundle).await
    }

    async fn remove(
        &mut self,
        group_id: &GroupId,
        devices: &[DeviceRef],
    ) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let group = self.group.as_ref().context("not in a group")?;
        let indices: Vec<LeafIndex> = group
            .members()?
            .into_iter()
            .filter(|m| devices.iter().any(|d| &d.user == m.leaf.user() && &d.device == m.leaf.device()))
            .map(|m| m.index)
            .collect();
        let (client, identity) = (&self.client, &self.identity);
        let bundle = self.group.as_mut().context("not in a group")?.remove_members(client, identity, &indices)?;
        self.commit(group_id, bundle).await
    }

    /// Proposes removing `devices` (one proposal each); the hub's answer to each.
    async fn propose_remove(
        &mut self,
        group_id: &GroupId,
        devices: &[DeviceRef],
    ) -> anyhow::Result<Vec<Result<GroupSentResponse, ErrorBody>>> {
        let mut answers = Vec::new();
        for device in devices {
            let group = self.group.as_mut().context("not in a group")?;
            let index = group
                .members()?
                .into_iter()
                .find(|m| &device.user == m.leaf.user() && &device.device == m.leaf.device())
                .context("not a member")?
                .index;
            let proposal = group.propose_remove(&self.client, &self.identity, index)?;
            let answer = self.submit(group_id, &GroupSendRequest::application(Uuid::new_v4(), proposal)).await?;
            if answer.is_err() {
                let client = &self.client;
                self.group.as_mut().context("not in a group")?.drop_own_proposals(client)?;
            }
            answers.push(answer);
        }
        Ok(answers)
    }

    async fn self_update(&mut self, group_id: &GroupId) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let (client, identity) = (&self.client, &self.identity);
        let bundle = self.group.as_mut().context("not in a group")?.self_update(client, identity)?;
        self.commit(group_id, bundle).await
    }

    async fn commit(
        &mut self,
        group_id: &GroupId,
        bundle: parley_crypto::mls::CommitBundle,
    ) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let id = Uuid::new_v4();
        let answer =
            self.submit(group_id, &GroupSendRequest::commit(id, bundle.commit, bundle.group_info, bundle.welcome)).await?;
        match &answer {
            Ok(_) => self.pending = Some(id),
            Err(_) => {
                let client = &self.client;
                self.group.as_mut().context("not in a group")?.clear_pending_commit(client)?;
            }
        }
        Ok(answer)
    }

    async fn send(&mut self, group_id: &GroupId, text: &str) -> anyhow::Result<Result<GroupSentResponse, ErrorBody>> {
        let (client, identity) = (&self.client, &self.identity);
        let message = self.group.as_mut().context("not in a group")?.encrypt(client, identity, text.as_bytes())?;
        let answer = self.submit(group_id, &GroupSendRequest::application(Uuid::new_v4(), message)).await?;
        if let Ok(sent) = &answer {
            // Own messages come back but cannot be decrypted: remember them at their position.
            self.texts.push((sent.group_seq, text.to_owned()));
        }
        Ok(answer)
    }

    /// Reads and processes group events until `done` holds.
    async fn until(&mut self, mut done: impl FnMut(&Self) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            anyhow::ensure!(!left.is_zero(), "{} timed out at position {}", self.session.user_id, self.seen);
            let frame = raw::next_of(&mut self.socket, "group_event", left).await?;
            let event: GroupEvent = serde_json::from_value(frame)?;
            self.process(event).await?;
        }
        Ok(())
    }

    async fn process(&mut self, event: GroupEvent) -> anyhow::Result<()> {
        if event.group_seq <= self.seen {
            // Sent again after a reconnect (acknowledgements are written in batches).
            return Ok(());
        }
        self.seen = event.group_seq;
        match event.kind {
            GroupEventKind::Welcome => {
                let tree = event.ratchet_tree.context("a welcome carries the tree")?;
                let join = self.client.join(&event.message.0, &tree.0)?;
                self.group = Some(join.accept(&self.client)?);
            }
            // Own proposals are stored already.
            GroupEventKind::Proposal if event.sender_device == self.session.device_id => {}
            GroupEventKind::Commit
                if self.pending == Some(event.client_msg_id) && event.sender_device == self.session.device_id =>
            {
                self.pending = None;
                let client = &self.client;
                self.group.as_mut().context("group")?.merge_pending_commit(client)?;
            }
            _ => {
                let client = &self.client;
                let group = self.group.as_mut().context("an event before joining")?;
                let incoming = group.process(client, &event.message.0).with_context(|| {
                    format!(
                        "{} processing {:?} {} from {}",
                        self.session.device_id, event.kind, event.group_seq, event.sender_device
                    )
                })?;
                match incoming {
                    Incoming::Application { plaintext, .. } => {
                        self.texts.push((event.group_seq, String::from_utf8(plaintext)?));
                    }
                    Incoming::Commit(commit) => group.merge_commit(client, commit)?,
                    Incoming::Proposal(proposal) => group.store_proposal(client, proposal)?,
                    Incoming::OwnMessage => {}
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
        }
        let ack = json!({"type": "group_ack", "group_id": event.group_id, "group_seq": event.group_seq});
        raw::send_json(&mut self.socket, &ack).await
    }

    /// Opens a new WebSocket (after the server restarted): the group streams resume from the
    /// acknowledged cursors.
    async fn reconnect(&mut self) -> anyhow::Result<()> {
        self.socket = raw::connect(&self.base_url, self.session.access_token(), 0)
            .await
            .map_err(|s| anyhow::anyhow!("upgrade refused: {s}"))?;
        Ok(())
    }

    /// Sends a text, resubmitting the same ciphertext under the same id until the hub answers
    /// (through a server that may be down or restarting).
    async fn send_retrying(&mut self, group_id: &GroupId, text: &str) -> anyhow::Result<GroupSentResponse> {
        let (client, identity) = (&self.client, &self.identity);
        let message = self.group.as_mut().context("not in a group")?.encrypt(client, identity, text.as_bytes())?;
        let request = GroupSendRequest::application(Uuid::new_v4(), message);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.submit(group_id, &request).await {
                Ok(Ok(sent)) => {
                    self.texts.push((sent.group_seq, text.to_owned()));
                    return Ok(sent);
                }
                Ok(Err(error)) if error.code.http_status() < 500 => anyhow::bail!("refused: {error:?}"),
                _ => {
                    anyhow::ensure!(tokio::time::Instant::now() < deadline, "no answer for {text}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn epoch(&self) -> u64 {
        self.group.as_ref().map_or(0, Group::epoch)
    }

    fn texts(&self) -> Vec<String> {
        self.texts.iter().map(|(_, t)| t.clone()).collect()
    }
}

fn urlencoding(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A")
}

/// Three servers: alice on a.test (the hub of the groups here), bob with two devices on b.test,
/// carol on c.test.
struct Cast {
    net: FedNet,
    c_url: String,
    alice: Member,
    bob: Member,
    bob2: Member,
    carol: Member,
}

async fn cast() -> anyhow::Result<Cast> {
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)], "").await?;
    let (a_url, b_url, c_url) =
        (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone(), net.server("c.test").base_url.clone());
    let alice = Member::register(&a_url, "alice").await?;
    let bob = Member::register(&b_url, "bob").await?;
    let bob2 = Member::new(&b_url, crate::support::login(&b_url, "bob").await?).await?;
    let carol = Member::register(&c_url, "carol").await?;
    Ok(Cast { net, c_url, alice, bob, bob2, carol })
}

#[tokio::test]
async fn a_group_across_three_servers_agrees_on_order_adds_removes_and_resolves_concurrent_commits() -> anyhow::Result<()> {
    let Cast { net: _net, c_url, mut alice, mut bob, mut bob2, mut carol } = cast().await?;
    let mut dave = Member::register(&c_url, "dave").await?;
    let group_id = GroupId::parse("!team:a.test")?;

    // Alice creates the group on her server (its hub) and adds Bob's two devices and Carol.
    alice.create(&group_id).await?;
    let added =
        alice.add(&group_id, &[bob.device(), bob2.device(), carol.device()]).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!((added.group_seq, added.epoch), (GroupSeq::new(1), 0));
    alice.until(|m| m.pending.is_none()).await?;
    for member in [&mut bob, &mut bob2, &mut carol] {
        member.until(|m| m.group.is_some()).await?;
        assert_eq!(member.epoch(), 1);
    }
    // A non-member cannot post, nor read the stream.
    let stranger = dave.submit(&group_id, &GroupSendRequest::application(Uuid::new_v4(), b"x".to_vec())).await?;
    assert_eq!(stranger.unwrap_err().code, ErrorCode::NotAMember);
    let (status, body) =
        raw::get(&c_url, &format!("/v1/groups/{}/events", urlencoding(group_id.as_str())), Some(dave.session.access_token()))
            .await?;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_a_member")));

    // Everyone talks, concurrently from three servers; everyone sees the same order.
    for round in 0..3 {
        let (ta, tb, tc) = (format!("alice {round}"), format!("bob {round}"), format!("carol {round}"));
        let (a, b, c) = tokio::join!(alice.send(&group_id, &ta), bob.send(&group_id, &tb), carol.send(&group_id, &tc));
        for answer in [a?, b?, c?] {
            answer.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    let last = GroupSeq::new(1 + 9);
    for member in [&mut alice, &mut bob, &mut bob2, &mut carol] {
        member.until(|m| m.seen >= last).await?;
    }
    let mut order = alice.texts.clone();
    order.sort_by_key(|(seq, _)| *seq);
    assert_eq!(order.len(), 9);
    for member in [&bob, &bob2, &carol] {
        let mut theirs = member.texts.clone();
        theirs.sort_by_key(|(seq, _)| *seq);
        assert_eq!(theirs, order, "{} sees the same order", member.session.user_id);
    }

    // Two members commit in the same epoch: exactly one wins; the other is told the epoch.
    let epoch = alice.epoch();
    let (a, b) = tokio::join!(alice.self_update(&group_id), bob.self_update(&group_id));
    let (a, b) = (a?, b?);
    let (winner_is_alice, conflict) = match (&a, &b) {
        (Ok(_), Err(e)) => (true, e.clone()),
        (Err(e), Ok(_)) => (false, e.clone()),
        other => anyhow::bail!("exactly one commit must win: {other:?}"),
    };
    assert_eq!((conflict.code, conflict.current_epoch), (ErrorCode::EpochConflict, Some(epoch + 1)));
    for member in [&mut alice, &mut bob, &mut bob2, &mut carol] {
        member.until(|m| m.epoch() == epoch + 1).await?;
    }
    // The loser catches up (done above) and its change lands in the next epoch.
    let loser = if winner_is_alice { &mut bob } else { &mut alice };
    loser.self_update(&group_id).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for member in [&mut alice, &mut bob, &mut bob2, &mut carol] {
        member.until(|m| m.epoch() == epoch + 2).await?;
    }

    // Carol is removed: she gets the removing commit and nothing after it.
    alice.remove(&group_id, &[carol.device()]).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    carol.until(|m| m.group.as_ref().is_some_and(|g| !g.is_active())).await?;
    let removal = carol.seen;
    // Dave (same server as Carol) joins; he reads from his Welcome on, nothing before.
    alice.until(|m| m.pending.is_none()).await?;
    alice.add(&group_id, &[dave.device()]).await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    dave.until(|m| m.group.is_some()).await?;
    assert!(dave.seen > removal);
    // A message of an older epoch is refused: Bob has not seen the last two commits yet.
    let stale = bob.send(&group_id, "stale").await?.unwrap_err();
    assert_eq!((stale.code, stale.current_epoch), (ErrorCode::EpochConflict, Some(dave.epoch())));
    bob.until(|m| m.epoch() == dave.epoch()).await?;
    let after = bob.send(&group_id, "after carol left").await?.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for member in [&mut alice, &mut bob2, &mut dave] {
        member.until(|m| m.seen >= after.group_seq).await?;
        assert_eq!(member.texts().last().map(String::as_str), Some("after carol left"));
    }
    assert_eq!(dave.texts(), vec!["after carol left".to_owned()], "a new member reads nothing from before it joined");
    // Carol's stream ended at her removal: she is not sent the later messages.
    let nothing = raw::next_of(&mut carol.socket, "group_event", Duration::from_millis(500)).await;
    assert!(nothing.is_err(), "carol got {nothing:?}");
    let (status, _) =
        raw::get(&c_url, &format!("/v1/groups/{}/events", urlencoding(group_id.as_str())), Some(carol.session.access_token()))
            .await?;
    assert!(status == 200 || status == 403);
    Ok(())
}

#[tokio::test]
async fn a_user_leaves_by_proposals_that_the_next_commit_of_the_epoch_must_include() -> anyhow::Result<()> {
    let Cast { net: _net, c_url: _, mut alice, mut bob, mut bob2, mut carol } = cast().await?;
    let group_id = GroupId::parse("!leaving:a.test")?;
    alice.create(&group_id).await?;
    ok(alice.add(&group_id, &[bob.device(), bob2.device(), carol.device()]).await)?;
    alice.until(|m| m.pending.is_none()).await?;
    for member in [&mut bob, &mut bob2, &mut carol] {
        member.until(|m| m.group.is_some()).await?;
    }

    // Carol may not propose Bob's removal: only a user's own devices.
    let answers = carol.propose_remove(&group_id, &[bob.device()]).await?;
    assert_eq!(answers[0].as_ref().unwrap_err().code, ErrorCode::BadMlsMessage);

    // Bob leaves from his first device: a proposal for each of his two leaves.
    let answers = bob.propose_remove(&group_id, &[bob2.device(), bob.device()]).await?;
    let proposed = answers.into_iter().map(|a| a.map_err(|e| anyhow::anyhow!("{e:?}"))).collect::<anyhow::Result<Vec<_>>>()?;
    let last_proposal = proposed[1].group_seq;
    // The same removal twice is refused (it would make every commit of the epoch invalid).
    bob2.until(|m| m.seen >= last_proposal).await?;
    let again = bob2.propose_remove(&group_id, &[bob2.device()]).await?;
    assert_eq!(again[0].as_ref().unwrap_err().code, ErrorCode::BadMlsMessage);

    // Alice has not read the proposals: her commit leaves them out and is refused.
    let blind = alice.self_update(&group_id).await?.unwrap_err();
    assert_eq!(blind.code, ErrorCode::MissingProposals);
    // Once read, her commit includes them and removes both of Bob's devices.
    alice.until(|m| m.seen >= last_proposal).await?;
    ok(alice.self_update(&group_id).await)?;
    alice.until(|m| m.pending.is_none()).await?;
    assert_eq!(alice.group.as_ref().context("group")?.members()?.len(), 2);
    for member in [&mut bob, &mut bob2] {
        member.until(|m| m.group.as_ref().is_some_and(|g| !g.is_active())).await?;
    }
    carol.until(|m| m.epoch() == alice.epoch()).await?;
    let after = ok(carol.send(&group_id, "after bob left").await)?;
    alice.until(|m| m.seen >= after.group_seq).await?;
    assert_eq!(alice.texts(), vec!["after bob left".to_owned()]);
    // Bob's streams ended at the commit; his devices are no longer members.
    let refused = bob.submit(&group_id, &GroupSendRequest::application(Uuid::new_v4(), b"x".to_vec())).await?;
    assert_eq!(refused.unwrap_err().code, ErrorCode::NotAMember);
    Ok(())
}

fn ok(answer: anyhow::Result<Result<GroupSentResponse, ErrorBody>>) -> anyhow::Result<GroupSentResponse> {
    answer?.map_err(|e| anyhow::anyhow!("refused: {e:?}"))
}

#[tokio::test]
async fn a_member_server_that_was_down_catches_up_in_order_and_a_killed_hub_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut net = FedNet::start_as(
        parley_tests::Mode::Process,
        &[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)],
        "[federation]\nretry_max_ms = 1000\n",
    )
    .await?;
    let (a_url, b_url, c_url) =
        (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone(), net.server("c.test").base_url.clone());
    let mut alice = Member::register(&a_url, "alice").await?;
    let mut bob = Member::register(&b_url, "bob").await?;
    let mut carol = Member::register(&c_url, "carol").await?;
    let mut dave = Member::register(&c_url, "dave").await?;
    let group_id = GroupId::parse("!faults:a.test")?;
    drop(b_url);
    alice.create(&group_id).await?;
    ok(alice.add(&group_id, &[bob.device(), carol.device()]).await)?;
    alice.until(|m| m.pending.is_none()).await?;
    bob.until(|m| m.group.is_some()).await?;
    carol.until(|m| m.group.is_some()).await?;

    // b.test is down while the group sends 500 messages and two membership changes.
    net.server("b.test").stop().await?;
    let mut expected = Vec::new();
    for i in 0..500 {
        if i == 200 {
            ok(alice.add(&group_id, &[dave.device()]).await)?;
            alice.until(|m| m.pending.is_none()).await?;
        }
        if i == 400 {
            ok(alice.remove(&group_id, &[carol.device()]).await)?;
            alice.until(|m| m.pending.is_none()).await?;
        }
        let text = format!("message {i:03}");
        ok(alice.send(&group_id, &text).await)?;
        expected.push(text);
    }
    let last = alice.texts.last().map(|(seq, _)| *seq).context("sent")?;
    net.server("b.test").restart().await?;
    bob.reconnect().await?;
    bob.until(|m| m.seen >= last).await?;
    assert_eq!(bob.texts(), expected, "bob reads all 500 in order");
    assert_eq!(bob.epoch(), alice.epoch(), "and followed both membership changes");
    dave.until(|m| m.seen >= last).await?;
    assert_eq!(dave.texts(), expected[200..].to_vec(), "dave reads from his Welcome on");
    carol.until(|m| m.group.as_ref().is_some_and(|g| !g.is_active())).await?;
    assert_eq!(carol.texts(), expected[..400].to_vec(), "carol reads up to her removal");

    // The hub is SIGKILLed while Bob sends; every message he was told is stored arrives once.
    let (started, mid_stream) = tokio::sync::oneshot::channel();
    let sender = tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut started = Some(started);
        for i in 0..60 {
            let text = format!("bob {i:02}");
            bob.send_retrying(&group_id, &text).await?;
            sent.push(text);
            if i == 20 {
                let _ = started.take().map(|tx| tx.send(()));
            }
        }
        anyhow::Ok((bob, sent))
    });
    // Killed once 21 messages were answered, while the rest are still being sent.
    mid_stream.await?;
    net.server("a.test").kill().await?;
    net.server("a.test").restart().await?;
    let (bob, sent) = sender.await??;
    let bob_last = bob.texts.last().map(|(seq, _)| *seq).context("sent")?;
    alice.reconnect().await?;
    alice.until(|m| m.seen >= bob_last).await?;
    dave.until(|m| m.seen >= bob_last).await?;
    for member in [&alice, &dave] {
        let theirs: Vec<String> = member.texts().into_iter().filter(|t| t.starts_with("bob ")).collect();
        assert_eq!(theirs, sent, "{}: each of bob's messages once, in order", member.session.user_id);
    }
    Ok(())
}

/// A signed transaction from `origin` (with its real key) to `destination`: the answer's JSON.
async fn signed_transaction(
    net: &mut FedNet,
    origin: &str,
    destination: &str,
    items: Vec<parley_sdk::spec::federation::v1::transaction::Item>,
) -> anyhow::Result<serde_json::Value> {
    use parley_sdk::spec::{ServerName, Timestamp};
    let key = parley_federation::ServerKey::load_or_create(&net.server(origin).data_dir().join("server.key"))?;
    let (origin_name, destination_name) = (ServerName::parse(origin)?, ServerName::parse(destination)?);
    let body = serde_json::to_vec(&parley_sdk::spec::federation::v1::transaction::Transaction::new(
        origin_name.clone(),
        Timestamp::now(),
        items,
    ))?;
    let path = format!("/_parley/federation/v1/send/forged-{}", Uuid::new_v4());
    let auth = parley_federation::SignedParts::new("PUT", &path, &origin_name, &destination_name, Timestamp::now(), &body)
        .authorization(&key.key_id, &key.key);
    let addr = net.server(destination).federation_addr.context("federation listener")?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(net.ca.cert_pem().as_bytes())?)
        .resolve(destination, addr)
        .build()?;
    let response = http
        .put(format!("https://{destination}:{}{path}", addr.port()))
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    anyhow::ensure!(response.status().as_u16() == 200, "transaction answered {}", response.status());
    Ok(response.json().await?)
}

#[tokio::test]
async fn fan_out_from_a_server_that_is_not_the_hub_and_forged_commits_are_refused() -> anyhow::Result<()> {
    use parley_sdk::spec::federation::v1::groups::GroupMessageItem;
    use parley_sdk::spec::federation::v1::transaction::Item;
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)], "").await?;
    let (a_url, b_url) = (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone());
    let mut alice = Member::register(&a_url, "alice").await?;
    let mut bob = Member::register(&b_url, "bob").await?;
    let group_id = GroupId::parse("!guarded:a.test")?;
    alice.create(&group_id).await?;
    ok(alice.add(&group_id, &[bob.device()]).await)?;
    bob.until(|m| m.group.is_some()).await?;
    alice.until(|m| m.pending.is_none()).await?;

    // c.test, a real server with a valid signature, sends fan-out for a group hubbed on a.test:
    // b.test rejects the item as not_the_hub and bob's stream gets nothing.
    let (client, identity) = (&alice.client, &alice.identity);
    let message = alice.group.as_mut().context("group")?.encrypt(client, identity, b"forged by c.test")?;
    let forged = GroupMessageItem::new(
        group_id.clone(),
        GroupSeq::new(2),
        1,
        GroupEventKind::Application,
        alice.session.user_id.clone(),
        alice.session.device_id.clone(),
        Uuid::new_v4(),
        message,
        parley_sdk::spec::Timestamp::now(),
    );
    let answer = signed_transaction(&mut net, "c.test", "b.test", vec![Item::GroupMessage(forged)]).await?;
    assert_eq!(answer["rejected"][0]["code"], "not_the_hub", "{answer}");
    let nothing = raw::next_of(&mut bob.socket, "group_event", Duration::from_millis(300)).await;
    assert!(nothing.is_err(), "bob got {nothing:?}");

    // A commit altered in transit does not verify against the public state: bad_mls_message,
    // and the group stays at its epoch.
    let (client, identity) = (&bob.client, &bob.identity);
    let bundle = bob.group.as_mut().context("group")?.self_update(client, identity)?;
    let mut altered = bundle.commit.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0x01;
    let refused =
        bob.submit(&group_id, &GroupSendRequest::commit(Uuid::new_v4(), altered, bundle.group_info.clone(), None)).await?;
    assert_eq!(refused.unwrap_err().code, ErrorCode::BadMlsMessage);
    // A valid commit with the GroupInfo of another epoch is refused too.
    let (client, identity) = (&bob.client, &bob.identity);
    let stale_info = bob.group.as_ref().context("group")?.group_info(client, identity)?;
    let refused =
        bob.submit(&group_id, &GroupSendRequest::commit(Uuid::new_v4(), bundle.commit.clone(), stale_info, None)).await?;
    assert_eq!(refused.unwrap_err().code, ErrorCode::BadMlsMessage);
    // Alice's own commit signed by her leaf cannot be passed off as Bob's: submitted by Bob, refused.
    let (client, identity) = (&alice.client, &alice.identity);
    let alices = alice.group.as_mut().context("group")?.self_update(client, identity)?;
    let refused =
        bob.submit(&group_id, &GroupSendRequest::commit(Uuid::new_v4(), alices.commit, alices.group_info, None)).await?;
    assert_eq!(refused.unwrap_err().code, ErrorCode::BadMlsMessage);
    // The real one goes through, at the next position.
    let sent = bob.submit(&group_id, &GroupSendRequest::commit(Uuid::new_v4(), bundle.commit, bundle.group_info, None)).await?;
    assert_eq!(ok(Ok(sent))?.group_seq, GroupSeq::new(2));
    Ok(())
}

#[tokio::test]
async fn group_receipts_are_markers_batched_through_the_hub_to_every_member() -> anyhow::Result<()> {
    let config = "[limits]\ngroup_receipt_interval_ms = 100\n";
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)], config).await?;
    let (a_url, b_url, c_url) =
        (net.server("a.test").base_url.clone(), net.server("b.test").base_url.clone(), net.server("c.test").base_url.clone());
    let mut alice = Member::register(&a_url, "alice").await?;
    let mut bob = Member::register(&b_url, "bob").await?;
    let mut carol = Member::register(&c_url, "carol").await?;
    let group_id = GroupId::parse("!receipts:a.test")?;
    alice.create(&group_id).await?;
    ok(alice.add(&group_id, &[bob.device(), carol.device()]).await)?;
    alice.until(|m| m.pending.is_none()).await?;
    // Carol says something first (receipts go to the devices of recent senders).
    carol.until(|m| m.group.is_some()).await?;
    let mut last = ok(carol.send(&group_id, "carol was here").await)?.group_seq;
    for i in 0..5 {
        last = ok(alice.send(&group_id, &format!("hello {i}")).await)?.group_seq;
    }
    // Bob and Carol receive everything (and acknowledge it); Bob reads up to the third.
    bob.until(|m| m.seen >= last).await?;
    carol.until(|m| m.seen >= last).await?;
    let read_to = GroupSeq::new(last.get() - 2);
    raw::send_json(&mut bob.socket, &json!({"type": "group_read", "group_id": group_id, "group_seq": read_to})).await?;
    // A marker past what the device was sent is clamped; of a group it is not in, refused.
    let other = json!({"type": "group_read", "group_id": "!elsewhere:a.test", "group_seq": 1, "id": 5});
    raw::send_json(&mut bob.socket, &other).await?;
    let refused = raw::next_of(&mut bob.socket, "error", WAIT).await?;
    assert_eq!((refused["id"].as_u64(), refused["code"].as_str()), (Some(5), Some("not_a_member")));

    // The senders, on both other servers, learn the markers: bob delivered all, read up to the
    // third from last.
    for member in [&mut alice, &mut carol] {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = raw::next_of(&mut member.socket, "group_receipts", left).await?;
            let bobs = frame["receipts"].as_array().into_iter().flatten().find(|r| r["user"] == "@bob:b.test");
            if bobs.is_some_and(|r| r["delivered"] == last.get() && r["read"] == read_to.get()) {
                assert_eq!(frame["group_id"], group_id.as_str());
                break;
            }
        }
    }
    Ok(())
}
