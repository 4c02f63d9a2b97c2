//! Deterministic tests of the machine: in-memory stores, seeded RNGs and a fake server, no
//! sockets and no clock. They reach what only whole-server tests reached before: simultaneous
//! session starts, superseded sessions, replayed first messages, device-list rollback and
//! equivocation, outbox retries, and a receipt that overtakes its `sent` answer.

use super::testing::{deliver_all, run, FakeServer, Shared, TestMachine, TestUser};
use super::*;
use parley_crypto::identity::DeviceListError;
use parley_spec::v1::events::ReceiptKind;
use parley_spec::Timestamp;

async fn enqueue(machine: &mut TestMachine, to: &UserId, body: &str) -> OutboxEntry {
    let id = machine.enqueue_text(to, body, Timestamp::from_millis(1)).await.unwrap();
    let entry = machine.outbox().await.unwrap().into_iter().find(|e| e.client_msg_id == id).unwrap();
    assert_eq!((&entry.to, entry.body.as_str()), (to, body));
    entry
}

/// Writes and sends a text; returns its id and server id.
async fn send(machine: &mut TestMachine, server: &Shared, to: &UserId, body: &str) -> (Uuid, ServerMsgId) {
    let entry = enqueue(machine, to, body).await;
    let progress = machine.send(entry).await.unwrap();
    match run(machine, server, progress).await.unwrap() {
        Done::Sent { client_msg_id, server_msg_id } => (client_msg_id, server_msg_id),
        other => panic!("not sent: {other:?}"),
    }
}

/// The bodies of the messages among `events`.
fn texts(events: &[MessengerEvent]) -> Vec<String> {
    events.iter().filter_map(|e| if let MessengerEvent::Message(m) = e { Some(m.body.clone()) } else { None }).collect()
}

fn undecryptable(events: &[MessengerEvent]) -> Vec<Undecryptable> {
    events
        .iter()
        .filter_map(|e| if let MessengerEvent::Undecryptable { reason, .. } = e { Some(reason.clone()) } else { None })
        .collect()
}

/// Alice and Bob, one device each, keys published.
async fn alice_and_bob(server: &Shared) -> (TestUser, TestMachine, TestUser, TestMachine) {
    let (mut alice, mut bob) = (TestUser::new("alice", 1), TestUser::new("bob", 2));
    let a = alice.add_device(server, "A1", 11).await;
    let b = bob.add_device(server, "B1", 21).await;
    (alice, a, bob, b)
}

#[tokio::test]
async fn a_first_message_starts_a_session_that_carries_the_conversation_both_ways() {
    let server = FakeServer::shared();
    let (alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    send(&mut a, &server, &bob.id, "hello").await;
    assert_eq!(deliver_all(&mut b, &server).await, 1);
    assert_eq!(texts(&b.take_events()), ["hello"]);
    send(&mut b, &server, &alice.id, "hi back").await;
    deliver_all(&mut a, &server).await;
    let events = a.take_events();
    assert!(matches!(events[0], MessengerEvent::Sent { .. }));
    assert_eq!(texts(&events), ["hi back"]);
    // The one-time prekey the session start used is gone; the history has both messages.
    assert_eq!(b.store().history(&alice.id).len(), 2);
    assert_eq!(b.store().history(&alice.id)[0].peer, alice.id);
}

/// Both sides send their first message before either received one: each starts a session,
/// each accepts the other's (superseding its own), and the conversation goes on.
#[tokio::test]
async fn simultaneous_session_starts_converge() {
    let server = FakeServer::shared();
    let (alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    send(&mut a, &server, &bob.id, "hi from alice").await;
    send(&mut b, &server, &alice.id, "hi from bob").await;
    deliver_all(&mut a, &server).await;
    deliver_all(&mut b, &server).await;
    assert_eq!(texts(&a.take_events()), ["hi from bob"]);
    assert_eq!(texts(&b.take_events()), ["hi from alice"]);
    // Each side's own session was superseded by the peer's.
    assert_eq!(a.store().previous_session_count(&bob.id, b.device_id()), 1);
    assert_eq!(b.store().previous_session_count(&alice.id, a.device_id()), 1);
    for i in 0..3 {
        send(&mut a, &server, &bob.id, &format!("a{i}")).await;
        deliver_all(&mut b, &server).await;
        assert_eq!(texts(&b.take_events()), [format!("a{i}")]);
        send(&mut b, &server, &alice.id, &format!("b{i}")).await;
        deliver_all(&mut a, &server).await;
        assert_eq!(texts(&a.take_events()), [format!("b{i}")]);
    }
    assert!(undecryptable(&a.take_events()).is_empty() && undecryptable(&b.take_events()).is_empty());
}

/// A newer session replaces an older one (the older is kept), and messages that still arrive
/// on the older one decrypt with it; a replayed copy of one of them does not.
#[tokio::test]
async fn a_superseded_session_still_decrypts_what_was_in_flight_on_it() {
    let server = FakeServer::shared();
    let (alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    // Alice starts a session and sends twice on it; bob starts his own before either arrives.
    send(&mut a, &server, &bob.id, "one").await;
    send(&mut a, &server, &bob.id, "two").await;
    send(&mut b, &server, &alice.id, "from bob").await;
    let (one, two) = {
        let mut s = server.lock().unwrap();
        (s.next_message(&bob.id, b.device_id()).unwrap(), s.next_message(&bob.id, b.device_id()).unwrap())
    };
    // Alice accepts bob's session: hers is superseded. What she sends now goes on bob's.
    deliver_all(&mut a, &server).await;
    send(&mut a, &server, &bob.id, "three").await;
    // Bob gets "three" first (on his own session), then the two sent on alice's older one.
    deliver_all(&mut b, &server).await;
    for message in [one, two.clone()] {
        let progress = b.receive_message(message).await.unwrap();
        run(&mut b, &server, progress).await.unwrap();
    }
    assert_eq!(texts(&b.take_events()), ["three", "one", "two"]);
    // Accepting alice's start superseded bob's own session, on which alice still sends.
    assert_eq!(b.store().previous_session_count(&alice.id, a.device_id()), 1);
    send(&mut a, &server, &bob.id, "four").await;
    deliver_all(&mut b, &server).await;
    assert_eq!(texts(&b.take_events()), ["four"]);
    assert_eq!(b.store().history(&alice.id).len(), 5);
    // "two" again under another server id: its message key is spent in every session.
    let mut replay = two;
    replay.id = ServerMsgId::new(replay.id.get() + 100);
    let progress = b.receive_message(replay).await.unwrap();
    run(&mut b, &server, progress).await.unwrap();
    let events = b.take_events();
    assert!(texts(&events).is_empty());
    assert_eq!(undecryptable(&events), [Undecryptable::ReplayedFirstMessage], "two still carried alice's session start");
}

/// A first message is accepted once: replayed (under a new server id, so the history does not
/// catch it) it is rejected, even when the session it started is gone.
#[tokio::test]
async fn a_replayed_first_message_is_rejected() {
    let server = FakeServer::shared();
    let (alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    send(&mut a, &server, &bob.id, "start").await;
    let first = server.lock().unwrap().next_message(&bob.id, b.device_id()).unwrap();
    let progress = b.receive_message(first.clone()).await.unwrap();
    run(&mut b, &server, progress).await.unwrap();
    assert_eq!(texts(&b.take_events()), ["start"]);
    // The same delivery again is a repeat the history recognises: silently dropped.
    let progress = b.receive_message(first.clone()).await.unwrap();
    run(&mut b, &server, progress).await.unwrap();
    assert!(b.take_events().is_empty());
    // A copy with another server id reaches the replay check.
    let mut replay = first;
    replay.id = ServerMsgId::new(replay.id.get() + 1);
    let progress = b.receive_message(replay.clone()).await.unwrap();
    assert!(matches!(run(&mut b, &server, progress).await.unwrap(), Done::Received));
    assert_eq!(undecryptable(&b.take_events()), [Undecryptable::ReplayedFirstMessage]);
    assert_eq!(b.store().history(&alice.id).len(), 1);
}

#[tokio::test]
async fn device_list_rollback_equivocation_and_a_changed_identity_are_untrusted() {
    let server = FakeServer::shared();
    let (_alice, mut a, mut bob, _b) = alice_and_bob(&server).await;
    // Bob adds a device (list v2); alice learns it.
    let fetch = a.fetch_device_list(&bob.id);
    let Done::DeviceList(v1) = run(&mut a, &server, Progress::Next(fetch)).await.unwrap() else { panic!("a list") };
    let _b2 = bob.add_device(&server, "B2", 22).await;
    let fetch = a.fetch_device_list(&bob.id);
    let Done::DeviceList(v2) = run(&mut a, &server, Progress::Next(fetch)).await.unwrap() else { panic!("a list") };
    assert_eq!((v1.version(), v2.version()), (1, 2));
    let (v1, v2) = (v1.signed().clone(), v2.signed().clone());
    let changed = a.take_events();
    assert!(
        matches!(&changed[..], [MessengerEvent::DevicesChanged { added, removed, .. }] if added.len() == 1 && removed.is_empty()),
        "{changed:?}"
    );

    let refetch = |a: &mut TestMachine| Progress::Next(a.fetch_device_list(&bob.id));
    // Rollback: the server serves v1 again.
    server.lock().unwrap().serve_list(v1);
    let progress = refetch(&mut a);
    let error = run(&mut a, &server, progress).await.unwrap_err();
    assert!(
        matches!(
            &error,
            E2eeError::Untrusted { reason: Untrust::DeviceList(DeviceListError::Rollback { last_seen: 2, found: 1 }), .. }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("older than version 2"), "{error}");
    assert!(matches!(&a.take_events()[..], [MessengerEvent::Untrusted { reason: Untrust::DeviceList(_), .. }]));
    // Equivocation: another list, validly signed, with the same version 2.
    let mut other = bob.identity().sign_device_list(&bob.id, 2, v2.devices[..1].to_vec()).unwrap();
    server.lock().unwrap().serve_list(other.clone());
    let progress = refetch(&mut a);
    let error = run(&mut a, &server, progress).await.unwrap_err();
    assert!(matches!(
        error,
        E2eeError::Untrusted { reason: Untrust::DeviceList(DeviceListError::Equivocation { version: 2 }), .. }
    ));
    // A changed identity: a newer list signed by another key.
    let mallory = TestUser::new("bob", 99).identity();
    other = mallory.sign_device_list(&bob.id, 3, v2.devices.clone()).unwrap();
    server.lock().unwrap().serve_list(other);
    let progress = refetch(&mut a);
    let error = run(&mut a, &server, progress).await.unwrap_err();
    assert!(matches!(error, E2eeError::Untrusted { reason: Untrust::DeviceList(DeviceListError::IdentityChanged { .. }), .. }));
    // Nothing of it was accepted: the pinned list is still v2, and a message to bob is held.
    assert_eq!(a.known_device_list(&bob.id).await.unwrap().unwrap().version(), 2);
    server.lock().unwrap().serve_list(v2);
    let progress = refetch(&mut a);
    assert!(matches!(run(&mut a, &server, progress).await.unwrap(), Done::DeviceList(_)), "the same v2 again is fine");
}

/// A failed send leaves the entry in the outbox; sending it again uses the same id; the `sent`
/// answer removes it; the recipient gets it once, even when the first attempt reached the
/// server and only its answer was lost.
#[tokio::test]
async fn outbox_entries_are_retried_until_sent_exactly_once() {
    let server = FakeServer::shared();
    let (_alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    let entry = enqueue(&mut a, &bob.id, "hello").await;

    // First attempt: no answer, and the server never got it.
    let progress = a.send(entry.clone()).await.unwrap();
    let Progress::Next(OutgoingRequest::Send { id, request }) = run_until_send(&mut a, &server, progress).await else {
        panic!("a send")
    };
    assert_eq!(request.client_msg_id, entry.client_msg_id);
    // While it is on its way, nothing else sends the same entry.
    assert!(matches!(a.send(entry.clone()).await.unwrap(), Progress::Done(Done::AlreadySending)));
    assert!(matches!(
        a.mark_request_done(id, Err(Failure::NoAnswer)).await.unwrap(),
        Progress::Done(Done::Failed(Failure::NoAnswer))
    ));
    assert_eq!(a.outbox().await.unwrap(), std::slice::from_ref(&entry), "still queued");
    assert!(a.take_events().is_empty());

    // Second attempt: the server stores it, but the answer is lost.
    let progress = a.send(entry.clone()).await.unwrap();
    let Progress::Next(request @ OutgoingRequest::Send { .. }) = progress else { panic!("a send") };
    let answer = server.lock().unwrap().answer((a.user_id(), a.device_id()), &request);
    assert!(answer.is_ok());
    let progress = a.mark_request_done(request.id(), Err(Failure::NoAnswer)).await.unwrap();
    assert!(matches!(progress, Progress::Done(Done::Failed(_))));
    assert_eq!(a.outbox().await.unwrap().len(), 1);

    // Third attempt: answered (as a duplicate of what is stored); the entry leaves the outbox.
    let progress = a.send(entry.clone()).await.unwrap();
    let done = run(&mut a, &server, progress).await.unwrap();
    assert!(matches!(done, Done::Sent { client_msg_id, .. } if client_msg_id == entry.client_msg_id));
    assert!(a.outbox().await.unwrap().is_empty());
    let sent: Vec<_> = a.take_events().into_iter().filter(|e| matches!(e, MessengerEvent::Sent { .. })).collect();
    assert_eq!(sent.len(), 1, "one Sent event");
    assert_eq!(a.store().history(&bob.id)[0].server_msg_id, Some(ServerMsgId::new(1)));
    assert_eq!(deliver_all(&mut b, &server).await, 1, "stored once, delivered once");
    assert_eq!(texts(&b.take_events()), ["hello"]);
}

/// Runs until the machine hands out a send (answering everything before it).
async fn run_until_send(machine: &mut TestMachine, server: &Shared, mut progress: Progress) -> Progress {
    loop {
        match progress {
            Progress::Next(OutgoingRequest::Send { .. }) | Progress::Done(_) => return progress,
            Progress::Next(request) => {
                let answer = server.lock().unwrap().answer((machine.user_id(), machine.device_id()), &request);
                progress = machine.mark_request_done(request.id(), answer).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn a_send_refused_for_good_leaves_the_outbox_and_a_server_insisting_on_other_devices_is_untrusted() {
    let server = FakeServer::shared();
    let (_alice, mut a, bob, _b) = alice_and_bob(&server).await;
    let entry = enqueue(&mut a, &bob.id, "too large").await;
    server.lock().unwrap().refuse_sends.push_back(ErrorCode::TooLarge);
    let progress = a.send(entry.clone()).await.unwrap();
    assert!(matches!(run(&mut a, &server, progress).await.unwrap(), Done::Refused { code: ErrorCode::TooLarge, .. }));
    assert!(a.outbox().await.unwrap().is_empty());
    assert!(a
        .take_events()
        .contains(&MessengerEvent::SendFailed { client_msg_id: entry.client_msg_id, code: ErrorCode::TooLarge }));

    // devices_mismatch: the lists are fetched again and the send retried, three sends in all.
    let entry = enqueue(&mut a, &bob.id, "held").await;
    server.lock().unwrap().refuse_sends.extend([ErrorCode::DevicesMismatch; 3]);
    let progress = a.send(entry.clone()).await.unwrap();
    let error = run(&mut a, &server, progress).await.unwrap_err();
    assert!(matches!(error, E2eeError::Untrusted { reason: Untrust::DevicesKeepDiffering, .. }), "{error}");
    assert!(server.lock().unwrap().refuse_sends.is_empty(), "three sends were made");
    assert_eq!(a.outbox().await.unwrap(), std::slice::from_ref(&entry), "held in the outbox");
    // Once the server behaves, the same entry goes out.
    let progress = a.send(entry).await.unwrap();
    assert!(matches!(run(&mut a, &server, progress).await.unwrap(), Done::Sent { .. }));
}

/// A receipt that arrives before the `sent` answer of the message it names is applied once
/// the answer recorded the server id (and reported after `Sent`).
#[tokio::test]
async fn a_receipt_that_overtakes_its_sent_answer_is_applied_after_it() {
    let server = FakeServer::shared();
    let (_alice, mut a, bob, mut b) = alice_and_bob(&server).await;
    let entry = enqueue(&mut a, &bob.id, "quick").await;
    let progress = a.send(entry).await.unwrap();
    let Progress::Next(request @ OutgoingRequest::Send { .. }) = run_until_send(&mut a, &server, progress).await else {
        panic!("a send")
    };
    let answer = server.lock().unwrap().answer((a.user_id(), a.device_id()), &request);
    let Ok(Response::Sent(sent)) = &answer else { panic!("sent") };
    let sent = *sent;
    deliver_all(&mut b, &server).await;
    let receipt = ReceiptEvent::new(
        ReceiptKind::Delivered,
        bob.id.clone(),
        b.device_id().clone(),
        a.user_id().clone(),
        vec![sent.server_msg_id],
        Timestamp::EPOCH,
    );
    a.receive_receipt(receipt.clone()).await.unwrap();
    assert!(a.take_events().is_empty(), "nothing to apply it to yet");
    let done = a.mark_request_done(request.id(), answer).await.unwrap();
    assert!(matches!(done, Progress::Done(Done::Sent { .. })));
    let events = a.take_events();
    assert!(matches!(
        &events[..],
        [MessengerEvent::Sent { .. }, MessengerEvent::Delivered { message_ids, .. }] if message_ids == &[sent.server_msg_id]
    ));
    assert!(a.store().history(&bob.id)[0].delivered);
    // With no send on its way, a receipt that matches nothing is dropped at once.
    let mut forged = receipt;
    forged.message_ids = vec![ServerMsgId::new(999)];
    a.receive_receipt(forged).await.unwrap();
    assert!(a.take_events().is_empty());
}

/// A session start from a device the sender's signed list does not name is refused, after the
/// list was fetched again to make sure.
#[tokio::test]
async fn a_session_start_from_an_unlisted_device_is_untrusted() {
    let server = FakeServer::shared();
    let (alice, mut a, mut bob, _b) = alice_and_bob(&server).await;
    let fetch = a.fetch_device_list(&bob.id);
    let Done::DeviceList(v1) = run(&mut a, &server, Progress::Next(fetch)).await.unwrap() else { panic!("a list") };
    // Bob's second device publishes keys; the server then hides the list that names it (it
    // serves v1, which alice has seen) and passes the device's session start on.
    let mut b2 = bob.add_device(&server, "B2", 22).await;
    server.lock().unwrap().serve_list(v1.signed().clone());
    send(&mut b2, &server, &alice.id, "sneaky").await;
    deliver_all(&mut a, &server).await;
    let events = a.take_events();
    assert!(texts(&events).is_empty());
    let device: DeviceId = "B2".parse().unwrap();
    let untrusted = MessengerEvent::Untrusted { user: bob.id.clone(), reason: Untrust::UnlistedSender(device.clone()) };
    assert!(events.contains(&untrusted), "{events:?}");
    assert_eq!(undecryptable(&events), [Undecryptable::Untrusted(Untrust::UnlistedSender(device))]);
}
