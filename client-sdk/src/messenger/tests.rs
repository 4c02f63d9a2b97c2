//! The driver against a fake transport whose sends wait for the test to let them through: a
//! send that waits for the server holds no lock, so an incoming message is decrypted meanwhile.

use super::driver::{Driver, Transport};
use crate::e2ee::testing::{run, FakeServer, Shared, TestUser};
use crate::e2ee::{Failure, MessengerEvent, OutgoingRequest, Response};
use crate::Error;
use parley_spec::{DeviceId, ErrorBody, Timestamp, UserId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify, Semaphore};

/// Answers from a [`FakeServer`]; sends wait for a permit of `gate`.
struct Gated {
    server: Shared,
    from: (UserId, DeviceId),
    gate: Arc<Semaphore>,
    send_started: Arc<Notify>,
}

impl Transport for Gated {
    async fn perform(&self, request: OutgoingRequest) -> Result<Response, Error> {
        if let OutgoingRequest::Send { .. } = request {
            self.send_started.notify_one();
            self.gate.acquire().await.expect("the gate stays open").forget();
        }
        let answer = self.server.lock().expect("not poisoned").answer((&self.from.0, &self.from.1), &request);
        answer.map_err(|failure| match failure {
            Failure::Refused(code) => Error::from_body(ErrorBody::new(code, "refused")),
            Failure::NoAnswer => Error::Timeout,
        })
    }
}

#[tokio::test]
async fn a_send_waiting_for_the_server_does_not_hold_up_an_incoming_message() {
    let server = FakeServer::shared();
    let (mut alice, mut bob) = (TestUser::new("alice", 1), TestUser::new("bob", 2));
    let a = alice.add_device(&server, "A1", 11).await;
    let mut b = bob.add_device(&server, "B1", 21).await;
    // Bob writes to alice; it waits in her inbox.
    b.enqueue_text(&alice.id, "hello", Timestamp::from_millis(1)).await.unwrap();
    let entry = b.outbox().await.unwrap().remove(0);
    let progress = b.send(entry).await.unwrap();
    run(&mut b, &server, progress).await.unwrap();
    let message = server.lock().unwrap().next_message(&alice.id, a.device_id()).unwrap();

    let (gate, send_started) = (Arc::new(Semaphore::new(0)), Arc::new(Notify::new()));
    let transport = Gated {
        server: server.clone(),
        from: (alice.id.clone(), a.device_id().clone()),
        gate: gate.clone(),
        send_started: send_started.clone(),
    };
    let (tx, mut events) = mpsc::unbounded_channel();
    let driver = Arc::new(Driver::new(a, transport, tx));
    // Alice sends; the server does not answer yet.
    let id = driver.machine().await.enqueue_text(&bob.id, "slow", Timestamp::from_millis(1)).await.unwrap();
    let sending = tokio::spawn({
        let driver = driver.clone();
        async move { driver.flush(Some(id)).await }
    });
    send_started.notified().await;
    assert!(driver.is_idle(), "no lock is held while the send waits");
    // Bob's message is decrypted and stored meanwhile.
    tokio::time::timeout(Duration::from_secs(10), driver.receive_message(message))
        .await
        .expect("the incoming message is not held up by the send")
        .unwrap();
    assert!(matches!(events.try_recv(), Ok(MessengerEvent::Message(m)) if m.body == "hello"));
    assert!(!sending.is_finished(), "the send still waits");
    // The answer arrives; the send completes.
    gate.add_permits(1);
    sending.await.unwrap().unwrap();
    assert!(matches!(events.recv().await, Some(MessengerEvent::Sent { client_msg_id, .. }) if client_msg_id == id));
    assert!(driver.machine().await.outbox().await.unwrap().is_empty());
}

/// A transport for tests that must not touch the network.
struct NoNetwork;

impl Transport for NoNetwork {
    async fn perform(&self, request: OutgoingRequest) -> Result<Response, Error> {
        panic!("no request expected: {request:?}")
    }
}

#[tokio::test]
async fn the_known_device_lists_of_1000_users_are_read_locally_in_one_quick_pass() {
    use crate::e2ee::TrustStore as _;
    use parley_crypto::identity::{verify_device_list, DeviceIdentity, UserIdentity};
    use rand::SeedableRng as _;

    let server = FakeServer::shared();
    let mut alice = TestUser::new("alice", 1);
    let machine = alice.add_device(&server, "A1", 11).await;
    // 1,000 users whose lists this device verified and stored earlier; one more it never saw.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut users = Vec::new();
    for n in 0..1000 {
        let user: UserId = format!("@u{n}:x").parse().unwrap();
        let entry = DeviceIdentity::generate(&mut rng).list_entry(&"D".parse().unwrap());
        let signed = UserIdentity::from_bytes(&[9; 32]).sign_device_list(&user, 1, vec![entry]).unwrap();
        machine.store().save_device_list(&verify_device_list(&signed, &user, None, None).unwrap()).await.unwrap();
        users.push(user);
    }
    users.push("@stranger:x".parse().unwrap());
    let (tx, _events) = mpsc::unbounded_channel();
    let driver = Driver::new(machine, NoNetwork, tx);
    let started = std::time::Instant::now();
    let lists = driver.known_device_lists(&users).await.unwrap();
    let took = started.elapsed();
    assert_eq!(lists.len(), 1000, "the stranger's list is not fetched");
    assert!(lists.iter().zip(&users).all(|(list, user)| list.user_id() == user));
    eprintln!("1,000 known device lists read and verified: {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // Read again, they come from the machine's cache.
    let started = std::time::Instant::now();
    assert_eq!(driver.known_device_lists(&users).await.unwrap().len(), 1000);
    eprintln!("again, cached: {:?}", started.elapsed());
}
