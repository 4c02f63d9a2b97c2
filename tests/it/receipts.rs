//! Receipts name only messages their author received: a read marker (HTTP or WebSocket) for
//! messages that were never sent to the reader reaches no one, however many ids it lists.

use crate::raw;
use crate::support::{login, register, Device, T};
use parley_sdk::{Api, Event, ReadRequest, ReceiptKind, ServerMsgId};
use parley_tests::TestServer;
use serde_json::json;

/// The `(by, message_ids)` of the next `read` receipt `device` gets.
async fn next_read(device: &mut Device) -> anyhow::Result<(String, Vec<ServerMsgId>)> {
    let receipt = device.next_receipt(ReceiptKind::Read).await?;
    Ok((receipt.by.to_string(), receipt.message_ids))
}

#[tokio::test]
async fn a_read_marker_for_a_message_not_sent_to_the_reader_reaches_no_one() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let mallory = register(base, "mallory").await?;
    let mut a1 = Device::connect(&alice).await?;
    let mut b1 = Device::connect(&bob).await?;
    let sent = a1.send_text(&bob.user_id, "for bob only").await?;
    assert_eq!(b1.next_message().await?.id, sent.server_msg_id);

    // Mallory marks alice's message to bob as read, over HTTP ...
    let forged = Api::new(&mallory)?.read(ReadRequest::new(alice.user_id.clone(), vec![sent.server_msg_id])).await;
    let http_code = forged.err().and_then(|e| e.server_code()).map(|c| c.to_string());
    // ... and with a `read` frame; the ping after it is answered once the frame was handled.
    let mut socket =
        raw::connect(base, mallory.access_token(), 0).await.map_err(|status| anyhow::anyhow!("upgrade refused: {status}"))?;
    raw::next_of(&mut socket, "caught_up", T).await?;
    let frame = json!({"type": "read", "peer": alice.user_id, "message_ids": [sent.server_msg_id]});
    raw::send_json(&mut socket, &frame).await?;
    raw::send_json(&mut socket, &json!({"type": "ping", "nonce": 1})).await?;
    let mut ws_errors = Vec::new();
    loop {
        let frame = raw::next_json(&mut socket, T).await?;
        match frame["type"].as_str() {
            Some("pong") => break,
            Some("error") => ws_errors.push(frame["code"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }

    // Bob really reads it: the first read receipt alice sees is his.
    b1.conn.read(alice.user_id.clone(), vec![sent.server_msg_id]).await?;
    assert_eq!(next_read(&mut a1).await?, (bob.user_id.to_string(), vec![sent.server_msg_id]));
    // Mallory was told why.
    assert_eq!(http_code.as_deref(), Some("bad_request"), "HTTP answer to the forged marker");
    assert_eq!(ws_errors, ["bad_request"], "error frames for the forged `read` frame");
    Ok(())
}

#[tokio::test]
async fn a_read_marker_with_1000_ids_carries_only_the_messages_the_reader_received() -> anyhow::Result<()> {
    let server = TestServer::start().await?;
    let base = &server.base_url;
    let alice = register(base, "alice").await?;
    let bob = register(base, "bob").await?;
    let mallory = register(base, "mallory").await?;
    let mallory2 = login(base, "mallory").await?;
    let mut a1 = Device::connect(&alice).await?;
    let mut b1 = Device::connect(&bob).await?;
    let mut m2 = Device::connect(&mallory2).await?;
    let to_bob = a1.send_text(&bob.user_id, "for bob").await?;
    assert_eq!(b1.next_message().await?.id, to_bob.server_msg_id);
    let to_mallory = a1.send_text(&mallory.user_id, "for mallory").await?;
    assert_eq!(m2.next_message().await?.id, to_mallory.server_msg_id);

    // 1,000 ids, none of them a message alice sent to mallory: refused, nothing stored.
    let bogus: Vec<ServerMsgId> = (0..1000)
        .map(ServerMsgId::new)
        .filter(|id| *id != to_mallory.server_msg_id)
        .chain([ServerMsgId::new(u64::MAX)])
        .collect();
    assert_eq!(bogus.len(), 1000);
    let answer = Api::new(&mallory)?.read(ReadRequest::new(alice.user_id.clone(), bogus)).await;
    let code = answer.err().and_then(|e| e.server_code()).map(|c| c.to_string());

    // 1,000 ids with one message alice sent to bob among them: only that one is receipted.
    let mut ids: Vec<ServerMsgId> = (1_000_000..1_000_999).map(ServerMsgId::new).collect();
    ids.insert(500, to_bob.server_msg_id);
    Api::new(&bob)?.read(ReadRequest::new(alice.user_id.clone(), ids)).await?;
    assert_eq!(next_read(&mut a1).await?, (bob.user_id.to_string(), vec![to_bob.server_msg_id]));

    // Nothing reached mallory's other device either: its next event is a message sent now.
    b1.send_text(&mallory.user_id, "marker").await?;
    let next = m2
        .next(|e| match e {
            Event::Message(_) | Event::Receipt(_) => Some(e),
            _ => None,
        })
        .await?;
    assert!(matches!(&next, Event::Message(m) if m.sender == bob.user_id), "mallory's device got {next:?}");
    assert_eq!(code.as_deref(), Some("bad_request"), "answer to 1,000 ids of messages mallory never got");
    Ok(())
}
