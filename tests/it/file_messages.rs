//! Files in end-to-end encrypted messages through the SDK (`Messenger::send_file`,
//! `send_group_file`, `download`): an image crosses servers with a thumbnail made by the sender
//! and downloads intact through the recipient's own server, a forward re-sends the same
//! reference, and a group upload cancelled halfway resumes after the profile is reopened,
//! sending only the parts that were missing.

use crate::e2ee::next;
use crate::media::SMALL_PARTS;
use parley_sdk::media::MediaError;
use parley_sdk::messenger::{Messenger, MessengerError, MessengerEvent, MessengerEvents};
use parley_sdk::store::StoredMessage;
use parley_tests::fednet::{Discovery, FedNet};
use parley_tests::TestServer;
use rand::RngCore as _;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::{Arc, Mutex};

const PASSWORD: &str = "correct horse";

fn go(_: u64, _: u64) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

async fn register(server: &TestServer, dir: &Path, name: &str) -> anyhow::Result<(Messenger, MessengerEvents)> {
    let (messenger, events, _) = Messenger::register(&server.base_url, &dir.join(format!("{name}.db")), name, PASSWORD).await?;
    Ok((messenger, events))
}

async fn next_message(events: &mut MessengerEvents) -> anyhow::Result<StoredMessage> {
    next(events, |e| match e {
        MessengerEvent::Message(m) => Some(m),
        _ => None,
    })
    .await
}

#[tokio::test]
async fn an_image_crosses_servers_with_its_thumbnail_and_downloads_intact() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], SMALL_PARTS).await?;
    let dir = tempfile::tempdir()?;
    let (alice, mut alice_events) = register(net.server("a.test"), dir.path(), "alice").await?;
    let (bob, mut bob_events) = register(net.server("b.test"), dir.path(), "bob").await?;
    let (alice_id, bob_id) = (alice.session().user_id.clone(), bob.session().user_id.clone());

    // A 900x600 gradient: several 64 KiB parts as PNG.
    let photo = dir.path().join("photo.png");
    image::RgbImage::from_fn(900, 600, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x * y) % 251) as u8]))
        .save(&photo)?;
    let plaintext = std::fs::read(&photo)?;
    let sent = alice.send_file(&bob_id, &photo, "the view", go).await?;

    let got = next_message(&mut bob_events).await?;
    assert_eq!((got.client_msg_id, got.sender.clone(), got.body.as_str()), (sent, alice_id.clone(), "the view"));
    let file = got.file.clone().expect("a file message");
    assert_eq!((file.server.as_str(), file.name.as_deref()), ("a.test", Some("photo.png")));
    assert_eq!((file.media.mime.as_str(), file.media.size), ("image/png", plaintext.len() as u64));
    assert_eq!(file.dimensions, Some((900, 600)));
    let thumbnail = file.thumbnail.clone().expect("a thumbnail");
    assert_eq!((thumbnail.mime.as_str(), thumbnail.width, thumbnail.height), ("image/jpeg", 320, 213));
    let preview = image::load_from_memory(&thumbnail.data.0)?;
    assert_eq!((preview.width(), preview.height()), (320, 213));

    // Through b.test, which fetches it from a.test over federation.
    let saved = dir.path().join("bob-got.png");
    bob.download(&file, &saved, go).await?;
    assert!(std::fs::read(&saved)? == plaintext, "the download is the file");
    assert_eq!(bob.store().history(&alice_id, 10).await?[0].file.as_ref(), Some(&file), "the history keeps it");
    let mine = alice.store().history(&bob_id, 10).await?;
    assert_eq!((mine[0].client_msg_id, mine[0].file.as_ref()), (sent, Some(&file)));

    // A forward sends the same reference: nothing is uploaded again, and it still opens.
    let stored =
        |pool: sqlx::AnyPool| async move { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM media").fetch_one(&pool).await };
    assert_eq!(stored(net.server("a.test").db().await?).await?, 1);
    bob.send_attachment(&alice_id, file.clone(), "").await?;
    let forwarded = next_message(&mut alice_events).await?;
    assert_eq!((forwarded.sender, forwarded.body.as_str(), forwarded.file.as_ref()), (bob_id, "", Some(&file)));
    let again = dir.path().join("alice-got.png");
    alice.download(forwarded.file.as_ref().expect("file"), &again, go).await?;
    assert!(std::fs::read(&again)? == plaintext);
    assert_eq!(stored(net.server("a.test").db().await?).await?, 1, "stored once");

    // An attachment whose media id is not its hash is refused before anything is fetched.
    let mut forged = file.clone();
    forged.media_id = "0".repeat(64);
    let refused = bob.download(&forged, &dir.path().join("forged"), go).await;
    assert!(matches!(refused, Err(MessengerError::InvalidRequest(_))), "{refused:?}");
    Ok(())
}

#[tokio::test]
async fn a_group_upload_cancelled_halfway_resumes_after_a_restart_and_the_members_get_the_file() -> anyhow::Result<()> {
    let server = TestServer::start_with(SMALL_PARTS).await?;
    let dir = tempfile::tempdir()?;
    let (alice, _alice_events) = register(&server, dir.path(), "alice").await?;
    let (bob, mut bob_events) = register(&server, dir.path(), "bob").await?;
    let (group, _) = alice.create_group("files", &[bob.session().user_id.clone()]).await?;
    next(&mut bob_events, |e| matches!(e, MessengerEvent::GroupJoined { .. }).then_some(())).await?;

    // Four parts of 64 KiB (the server's part size here) and a bit.
    let mut plaintext = vec![0u8; 4 * 65536 + 1000];
    rand::thread_rng().fill_bytes(&mut plaintext);
    let report = dir.path().join("report.bin");
    std::fs::write(&report, &plaintext)?;

    // Cancelled once the first part is up.
    let cancelled = alice
        .send_group_file(
            &group,
            &report,
            "q3",
            |done, _| if done > 0 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) },
        )
        .await;
    assert!(matches!(cancelled, Err(MessengerError::Media(MediaError::Cancelled))), "{cancelled:?}");
    alice.close().await;
    drop(alice);

    // The profile reopens (a restarted app): the upload picks up where it stopped.
    let (alice, _alice_events) = Messenger::open(&dir.path().join("alice.db")).await?;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let (id, _) = alice
        .send_group_file(&group, &report, "q3", move |done, total| {
            seen.lock().expect("lock").push((done, total));
            ControlFlow::Continue(())
        })
        .await?;
    let calls = calls.lock().expect("lock").clone();
    let (first_done, total) = calls[0];
    assert!(first_done >= 65536, "the part already up is not sent again: {calls:?}");
    assert_eq!(calls.last().copied(), Some((total, total)));

    let got = next(&mut bob_events, |e| match e {
        MessengerEvent::GroupMessage(m) => Some(m),
        _ => None,
    })
    .await?;
    assert_eq!((got.client_msg_id, got.body.as_str()), (id, "q3"));
    let file = got.file.expect("a file message");
    assert_eq!(
        (file.name.as_deref(), file.media.mime.as_str(), file.thumbnail.is_none()),
        (Some("report.bin"), "application/octet-stream", true)
    );
    let saved = dir.path().join("bob-report.bin");
    bob.download(&file, &saved, go).await?;
    assert!(std::fs::read(&saved)? == plaintext);
    // Forwarded 1:1 on the same server: bob's reference is renewed, nothing is stored again.
    bob.send_attachment(&alice.session().user_id, file.clone(), "fyi").await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM media").fetch_one(&server.db().await?).await?;
    let refs: i64 = sqlx::query_scalar("SELECT count(*) FROM media_refs").fetch_one(&server.db().await?).await?;
    assert_eq!((stored, refs), (1, 2), "one file, referenced by alice and bob");
    let history = alice.group_history(&group, 10).await?;
    assert_eq!(history.iter().filter(|m| m.file.is_some()).count(), 1, "one message, though sent twice over");
    Ok(())
}

/// Rows of `media_holds` on `server`.
async fn holds(server: &TestServer) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM media_holds").fetch_one(&server.db().await?).await?)
}

/// Rows of `media` on `server`, by media id.
async fn has_media(server: &TestServer, media_id: &str) -> anyhow::Result<bool> {
    let sha256 = parley_spec::v1::media::parse_media_id(media_id).expect("a media id");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM media WHERE sha256 = $1")
        .bind(sha256.as_slice())
        .fetch_one(&server.db().await?)
        .await?;
    Ok(count == 1)
}

#[tokio::test]
async fn a_file_outlives_its_retention_while_a_device_it_was_sent_to_has_not_received_it() -> anyhow::Result<()> {
    let server =
        TestServer::start_with(&format!("{SMALL_PARTS}retention_ms = 4000\ngrace_ms = 0\nsweep_interval_ms = 100\n")).await?;
    let dir = tempfile::tempdir()?;
    let (alice, _alice_events) = register(&server, dir.path(), "alice").await?;
    let (bob, bob_events) = register(&server, dir.path(), "bob").await?;
    let bob_id = bob.session().user_id.clone();
    // Bob's only device goes offline.
    bob.close().await;
    drop((bob, bob_events));

    let path = dir.path().join("held.bin");
    let mut plaintext = vec![0u8; 100_000];
    rand::thread_rng().fill_bytes(&mut plaintext);
    std::fs::write(&path, &plaintext)?;
    alice.send_file(&bob_id, &path, "", go).await?;
    let held = alice.store().history(&bob_id, 1).await?[0].file.clone().expect("file").media_id;
    // The same kind of file, uploaded but never sent: nothing holds it.
    let loose = dir.path().join("loose.bin");
    std::fs::write(&loose, &plaintext[..50_000])?;
    let unsent = alice.upload(&loose, go).await?.media_id;

    // Past the retention, the file no message holds is swept; the held one stays.
    crate::media::eventually("the file no message holds is swept", || async { Ok(!has_media(&server, &unsent).await?) }).await?;
    assert!(has_media(&server, &held).await?, "kept for bob's device, which has not received the message");

    // Bob comes back: his device receives the message, acknowledges it, and the hold ends.
    let (bob, mut bob_events) = Messenger::open(&dir.path().join("bob.db")).await?;
    let got = next_message(&mut bob_events).await?;
    let file = got.file.expect("file");
    assert_eq!(file.media_id, held);
    bob.download(&file, &dir.path().join("got.bin"), go).await?;
    assert!(std::fs::read(dir.path().join("got.bin"))? == plaintext);
    // Delivered, it is kept one more retention period (for the download), then swept.
    crate::media::eventually("the file is swept after its last retention", || async { Ok(!has_media(&server, &held).await?) })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_temporary_chats_file_goes_once_every_device_it_went_to_downloaded_it() -> anyhow::Result<()> {
    let server = TestServer::start_with(&format!("{SMALL_PARTS}grace_ms = 0\nsweep_interval_ms = 100\n")).await?;
    let dir = tempfile::tempdir()?;
    let (alice, _alice_events) = register(&server, dir.path(), "alice").await?;
    let (bob, mut bob_events, recovery) =
        Messenger::register(&server.base_url, &dir.path().join("bob.db"), "bob", PASSWORD).await?;
    let (bob2, mut bob2_events) =
        Messenger::add_device(&server.base_url, &dir.path().join("bob-2.db"), "bob", PASSWORD, &recovery).await?;
    let bob_id = bob.session().user_id.clone();
    alice.refresh_devices(&bob_id).await?;

    let path = dir.path().join("secret.bin");
    let mut plaintext = vec![0u8; 150_000];
    rand::thread_rng().fill_bytes(&mut plaintext);
    std::fs::write(&path, &plaintext)?;
    alice.send_temporary_file(&bob_id, &path, "read once", go).await?;
    let media_id = alice.store().history(&bob_id, 1).await?[0].file.clone().expect("file").media_id;
    assert_eq!(holds(&server).await?, 2, "one hold per device of bob");

    // The first device downloads: its hold ends, the file stays for the other one.
    let file = next_message(&mut bob_events).await?.file.expect("file");
    bob.download(&file, &dir.path().join("one.bin"), go).await?;
    crate::media::eventually("the first device's hold ends", || async { Ok(holds(&server).await? == 1) }).await?;
    assert!(has_media(&server, &media_id).await?, "kept for bob's second device");

    // The second downloads too: the file goes, alice's reference with it.
    let file = next_message(&mut bob2_events).await?.file.expect("file");
    bob2.download(&file, &dir.path().join("two.bin"), go).await?;
    assert!(std::fs::read(dir.path().join("two.bin"))? == plaintext);
    crate::media::eventually("the file goes once both devices have it", || async { Ok(!has_media(&server, &media_id).await?) })
        .await?;
    let refs: i64 = sqlx::query_scalar("SELECT count(*) FROM media_refs").fetch_one(&server.db().await?).await?;
    assert_eq!(refs, 0);
    let again = bob.download(&file, &dir.path().join("three.bin"), go).await;
    assert!(
        matches!(&again, Err(MessengerError::Sdk(e)) if e.server_code() == Some(parley_sdk::ErrorCode::NotFound)),
        "{again:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_group_file_outlives_its_retention_until_every_local_member_device_has_the_message() -> anyhow::Result<()> {
    let server =
        TestServer::start_with(&format!("{SMALL_PARTS}retention_ms = 4000\ngrace_ms = 0\nsweep_interval_ms = 100\n")).await?;
    let dir = tempfile::tempdir()?;
    let (alice, _alice_events) = register(&server, dir.path(), "alice").await?;
    let (bob, mut bob_events) = register(&server, dir.path(), "bob").await?;
    let (group, _) = alice.create_group("files", &[bob.session().user_id.clone()]).await?;
    next(&mut bob_events, |e| matches!(e, MessengerEvent::GroupJoined { .. }).then_some(())).await?;
    bob.close().await;
    drop((bob, bob_events));

    let path = dir.path().join("minutes.bin");
    let mut plaintext = vec![0u8; 100_000];
    rand::thread_rng().fill_bytes(&mut plaintext);
    std::fs::write(&path, &plaintext)?;
    alice.send_group_file(&group, &path, "minutes", go).await?;
    let held = alice.group_history(&group, 10).await?.into_iter().find_map(|m| m.file).expect("file").media_id;
    let loose = dir.path().join("loose.bin");
    std::fs::write(&loose, &plaintext[..50_000])?;
    let unsent = alice.upload(&loose, go).await?.media_id;

    crate::media::eventually("the file no message holds is swept", || async { Ok(!has_media(&server, &unsent).await?) }).await?;
    assert!(has_media(&server, &held).await?, "kept for bob's device, which has not received the group message");

    let (bob, mut bob_events) = Messenger::open(&dir.path().join("bob.db")).await?;
    let got = next(&mut bob_events, |e| match e {
        MessengerEvent::GroupMessage(m) => Some(m),
        _ => None,
    })
    .await?;
    let file = got.file.expect("file");
    bob.download(&file, &dir.path().join("got.bin"), go).await?;
    assert!(std::fs::read(dir.path().join("got.bin"))? == plaintext);
    crate::media::eventually("the file is swept after its last retention", || async { Ok(!has_media(&server, &held).await?) })
        .await?;
    Ok(())
}
