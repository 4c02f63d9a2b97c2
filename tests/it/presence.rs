//! Presence: online while heartbeating, offline after the heartbeat timeout with a last-seen
//! time, and the privacy setting.

use crate::raw;
use crate::support::{register, Device, T};
use parley_sdk::{Api, Event, PresenceInfo, PresenceStatus, Visibility};
use parley_tests::TestServer;

const FAST_HEARTBEAT: &str = "[presence]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 600\n";

async fn next_presence(device: &mut Device) -> anyhow::Result<PresenceInfo> {
    device
        .next(|e| match e {
            Event::Presence(p) => Some(p),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn presence_goes_online_then_offline_after_the_heartbeat_timeout() -> anyhow::Result<()> {
    let server = TestServer::start_with(FAST_HEARTBEAT).await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let subscribed = Api::new(&alice)?.subscribe_presence(vec![bob.user_id.clone()]).await?;
    assert_eq!(subscribed.presence[0].status, PresenceStatus::Offline);
    assert_eq!(subscribed.presence[0].last_seen_ts, None, "never seen");
    let mut a1 = Device::connect(&alice).await?;
    // On connect the server sends the state of each contact.
    assert_eq!(next_presence(&mut a1).await?.status, PresenceStatus::Offline);

    // Bob connects with a raw socket that never sends a heartbeat.
    let mut socket = raw::connect(base, bob.access_token(), 0).await.expect("bob connects");
    let online = next_presence(&mut a1).await?;
    assert_eq!((&online.user, online.status), (&bob.user_id, PresenceStatus::Online));
    assert_eq!(Api::new(&alice)?.presence(&bob.user_id).await?.status, PresenceStatus::Online);

    // The server closes the silent socket after the timeout, and bob goes offline.
    let (code, reason) = raw::next_close(&mut socket, T).await?;
    assert_eq!((code, reason.as_str()), (1008, "heartbeat timeout"));
    let offline = next_presence(&mut a1).await?;
    assert_eq!((&offline.user, offline.status), (&bob.user_id, PresenceStatus::Offline));
    let last_seen = offline.last_seen_ts.expect("last seen is set");
    let now = parley_sdk::Timestamp::now();
    assert!(last_seen <= now && now.as_millis() - last_seen.as_millis() < 60_000, "last seen {last_seen} is recent");

    // An SDK connection heartbeats, so it stays online past the timeout. Silent raw sockets
    // opened after it are closed by the timeout, which proves the time has passed.
    let b1 = Device::connect(&bob).await?;
    assert_eq!(next_presence(&mut a1).await?.status, PresenceStatus::Online);
    for _ in 0..3 {
        let mut silent = raw::connect(base, alice.access_token(), 0).await.expect("silent socket");
        let (code, _) = raw::next_close(&mut silent, T).await?;
        assert_eq!(code, 1008);
    }
    assert!(b1.conn.is_connected(), "the heartbeating device was not dropped");
    assert_eq!(Api::new(&alice)?.presence(&bob.user_id).await?.status, PresenceStatus::Online);
    while let Some(event) = a1.try_next() {
        if let Event::Presence(p) = event {
            assert!(!(p.user == bob.user_id && p.status == PresenceStatus::Offline), "bob never went offline");
        }
    }
    Ok(())
}

#[tokio::test]
async fn last_seen_respects_the_privacy_setting() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?; // not bob's contact
    let carol = register(base, "carol").await?; // bob's contact
    let bob = register(base, "bob").await?;
    let bob_api = Api::new(&bob)?;
    bob_api.subscribe_presence(vec![carol.user_id.clone()]).await?;
    let as_alice = Api::new(&alice)?;
    let as_carol = Api::new(&carol)?;
    as_carol.subscribe_presence(vec![bob.user_id.clone()]).await?;
    let mut c1 = Device::connect(&carol).await?;
    assert_eq!(next_presence(&mut c1).await?.status, PresenceStatus::Offline);
    // Bob is seen once, then goes offline (announced after last-seen is stored).
    let b1 = Device::connect(&bob).await?;
    assert_eq!(next_presence(&mut c1).await?.status, PresenceStatus::Online);
    b1.conn.close().await;
    let offline = next_presence(&mut c1).await?;
    assert_eq!(offline.status, PresenceStatus::Offline);
    let seen = as_alice.presence(&bob.user_id).await?;
    assert_eq!((seen.status, seen.last_seen_ts), (PresenceStatus::Offline, offline.last_seen_ts));

    bob_api.set_privacy(Visibility::Contacts).await?;
    let hidden = as_alice.presence(&bob.user_id).await?;
    assert_eq!((hidden.status, hidden.last_seen_ts), (PresenceStatus::Hidden, None));
    let shown = as_carol.presence(&bob.user_id).await?;
    assert_eq!(shown.status, PresenceStatus::Offline);
    assert!(shown.last_seen_ts.is_some());

    bob_api.set_privacy(Visibility::Nobody).await?;
    for api in [&as_alice, &as_carol] {
        let hidden = api.presence(&bob.user_id).await?;
        assert_eq!((hidden.status, hidden.last_seen_ts), (PresenceStatus::Hidden, None));
    }
    // Bob always sees himself.
    assert_ne!(bob_api.presence(&bob.user_id).await?.status, PresenceStatus::Hidden);

    bob_api.set_privacy(Visibility::Everyone).await?;
    assert!(as_alice.presence(&bob.user_id).await?.last_seen_ts.is_some());
    Ok(())
}
