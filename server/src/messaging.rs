//! The messaging service, shared by the WebSocket and the HTTP fallback: checking and storing
//! sends, turning acknowledgements into delivered receipts, read markers, typing.

use crate::app::AppState;
use crate::auth::AuthDevice;
use crate::directory::UserEntry;
use crate::error::{Error, Result};
use crate::storage::{Effects, MessageOutcome, NewEvent, NewMessage};
use bytes::Bytes;
use parley_spec::error::{DeviceRef, DevicesMismatch};
use parley_spec::federation::v1::transaction::{FedEnvelope, Item, SignedMessage, TypingItem, UserDevices};
use parley_spec::v1::events::{InboxEvent, MessageEvent, ReceiptEvent, ReceiptKind};
use parley_spec::v1::messages::{Envelope, ReadRequest, SendRequest, SentResponse, MAX_MESSAGE_MEDIA, MAX_READ_IDS};
use parley_spec::v1::ws::{ServerFrame, TypingNotice};
use parley_spec::{DeviceId, ErrorCode, Seq, ServerMsgId, Timestamp, UserId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Checks a send against the limits and the current devices, and builds what to store:
/// one inbox event per target device, each with its own ciphertext.
pub async fn prepare_send(state: &AppState, auth: &AuthDevice, request: SendRequest) -> Result<NewMessage> {
    let limits = &state.config.limits;
    if request.envelopes.len() > limits.max_devices_per_user * 2 {
        return Err(Error::new(ErrorCode::TooLarge, "too many envelopes"));
    }
    if let Some(big) = request.envelopes.iter().find(|e| e.ciphertext.0.len() > limits.max_envelope_bytes) {
        return Err(Error::new(
            ErrorCode::TooLarge,
            format!(
                "envelope for {} is {} bytes; the limit is {}",
                big.device,
                big.ciphertext.0.len(),
                limits.max_envelope_bytes
            ),
        ));
    }
    let media = message_media(&request.media)?;
    if !request.to.is_of(&state.server_name) {
        // A temporary chat's files follow the usual retention across servers: the other server
        // fetches on demand, and this one cannot tell when its devices have them.
        let mut message = prepare_remote_send(state, auth, request).await?;
        message.media = media;
        return Ok(message);
    }
    let recipient = state.directory.user(&request.to).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
    let sender = state
        .directory
        .local(auth.user_id.localpart())
        .await?
        .ok_or_else(|| Error::new(ErrorCode::UnknownToken, "the sending account no longer exists"))?;

    // Expected targets: every device of the recipient and every other device of the sender
    // (never the sending device itself, also for a note to self).
    let mut expected: Vec<Target<'_, i64>> = other_devices(&recipient, auth).collect();
    if recipient.pk != sender.pk {
        expected.extend(other_devices(&sender, auth));
    }
    let devices = match_targets(&expected, &request.envelopes)?;

    let id = state.store.next_message_id().await?;
    let ts = Timestamp::now();
    let origin = Some((sender.user_id_arc.clone(), id));
    let mut events = Vec::with_capacity(request.envelopes.len());
    for (envelope, device) in request.envelopes.into_iter().zip(devices) {
        let payload = message_event(auth, &request.to, id, ts, envelope.ciphertext.0)?;
        events.push(NewEvent { device, origin: origin.clone(), payload });
    }
    Ok(NewMessage {
        id,
        sender_device: auth.device_pk,
        sender_user: sender.pk,
        client_msg_id: request.client_msg_id,
        recipient: request.to.to_string(),
        ts,
        events,
        outbound: Vec::new(),
        media,
        media_once: request.media_once && state.config.media.temporary,
    })
}

/// The files a send names, checked (`spec/media.md` §5).
pub(crate) fn message_media(ids: &[String]) -> Result<Vec<[u8; 32]>> {
    if ids.len() > MAX_MESSAGE_MEDIA {
        return Err(Error::new(ErrorCode::TooLarge, format!("a message names at most {MAX_MESSAGE_MEDIA} files")));
    }
    ids.iter()
        .map(|id| {
            parley_spec::v1::media::parse_media_id(id)
                .ok_or_else(|| Error::new(ErrorCode::BadRequest, format!("{id:?} is not a media id")))
        })
        .collect()
}

/// A send to a user of another server: the sender's other devices get inbox events here, the
/// recipient's devices (as their server last told us; refreshed once on a mismatch) one signed
/// message in the durable queue to that server.
async fn prepare_remote_send(state: &AppState, auth: &AuthDevice, request: SendRequest) -> Result<NewMessage> {
    let sender = state
        .directory
        .local(auth.user_id.localpart())
        .await?
        .ok_or_else(|| Error::new(ErrorCode::UnknownToken, "the sending account no longer exists"))?;
    let remote = crate::federation::remote::devices(state, &request.to, false).await?;
    let targets = match match_targets(&remote_targets(&request.to, &remote, &sender, auth), &request.envelopes) {
        Ok(targets) => targets,
        Err(_) => {
            // Our copy of the remote devices may be stale: ask their server once.
            let remote = crate::federation::remote::devices(state, &request.to, true).await?;
            match_targets(&remote_targets(&request.to, &remote, &sender, auth), &request.envelopes)?
        }
    };
    let id = state.store.next_message_id().await?;
    let ts = Timestamp::now();
    let origin = Some((sender.user_id_arc.clone(), id));
    let mut events = Vec::new();
    let mut envelopes = Vec::new();
    for (envelope, target) in request.envelopes.into_iter().zip(targets) {
        match target {
            Some(device) => {
                let payload = message_event(auth, &request.to, id, ts, envelope.ciphertext.0)?;
                events.push(NewEvent { device, origin: origin.clone(), payload });
            }
            None => envelopes.push(FedEnvelope::new(envelope.device, envelope.ciphertext.0)),
        }
    }
    let message = SignedMessage::new(
        id,
        auth.user_id.clone(),
        auth.device_id.clone(),
        request.to.clone(),
        ts,
        envelopes,
        state.server_name.clone(),
        String::new(),
    );
    // Sent by its origin, the message needs no signature of its own: the request signature
    // over the transaction proves who wrote it (spec/federation.md, message items).
    let outbound = vec![crate::federation::sender::outbound(&request.to.server_name(), &Item::Message(message))?];
    Ok(NewMessage {
        id,
        sender_device: auth.device_pk,
        sender_user: sender.pk,
        client_msg_id: request.client_msg_id,
        recipient: request.to.to_string(),
        ts,
        events,
        outbound,
        media: Vec::new(),
        media_once: false,
    })
}

/// The inbox event of a message from `auth` to `to` carrying one device's ciphertext.
fn message_event(auth: &AuthDevice, to: &UserId, id: ServerMsgId, ts: Timestamp, ciphertext: Vec<u8>) -> Result<Bytes> {
    let event = MessageEvent::new(id, auth.user_id.clone(), auth.device_id.clone(), to.clone(), ts, ciphertext);
    to_bytes(&InboxEvent::Message(event))
}

/// A device a send must address: its owner, its id, and what the send needs of it.
type Target<'a, T> = (&'a UserId, &'a DeviceId, T);

/// `user`'s devices other than the sending one, as send targets.
fn other_devices<'a>(user: &'a UserEntry, auth: &'a AuthDevice) -> impl Iterator<Item = Target<'a, i64>> + 'a {
    user.devices.iter().filter(|(pk, _)| *pk != auth.device_pk).map(|(pk, id)| (&user.user_id, id, *pk))
}

/// A send to another server's user `to`: their devices as their server last told us (`None`:
/// no local device), and the sender's other devices here.
fn remote_targets<'a>(
    to: &'a UserId,
    remote: &'a UserDevices,
    sender: &'a UserEntry,
    auth: &'a AuthDevice,
) -> Vec<Target<'a, Option<i64>>> {
    let mut theirs: Vec<Target<'a, Option<i64>>> = remote.devices.iter().map(|id| (to, id, None)).collect();
    // Their server's list, taken as a set.
    theirs.sort_unstable_by(|a, b| a.1.cmp(b.1));
    theirs.dedup_by(|a, b| a.1 == b.1);
    theirs.extend(other_devices(sender, auth).map(|(user, id, pk)| (user, id, Some(pk))));
    theirs
}

/// What each envelope's device is to the send, in envelope order; `devices_mismatch` unless
/// the envelopes address exactly the `expected` devices (distinct), once each. Compared in
/// place, without copying an id: both lists are a few devices long (a send has at most twice
/// `limits.max_devices_per_user` envelopes), and this runs for every message.
fn match_targets<T: Copy>(expected: &[Target<'_, T>], envelopes: &[Envelope]) -> Result<Vec<T>> {
    let mut seen = vec![false; expected.len()];
    let mut found = Vec::with_capacity(envelopes.len());
    let mut extra = Vec::new();
    for envelope in envelopes {
        match expected.iter().position(|(user, device, _)| **user == envelope.user && **device == envelope.device) {
            Some(at) if !seen[at] => {
                seen[at] = true;
                found.push(expected[at].2);
            }
            _ => extra.push(DeviceRef::new(envelope.user.clone(), envelope.device.clone())),
        }
    }
    if extra.is_empty() && seen.iter().all(|seen| *seen) {
        return Ok(found);
    }
    let mut missing: Vec<DeviceRef> = expected
        .iter()
        .zip(&seen)
        .filter(|(_, seen)| !**seen)
        .map(|((user, device, _), _)| DeviceRef::new((*user).clone(), (*device).clone()))
        .collect();
    missing.sort();
    Err(Error::DevicesMismatch(DevicesMismatch::new(missing, extra)))
}

/// The `sent` answer for a store outcome.
pub fn sent_response(client_msg_id: uuid::Uuid, outcome: MessageOutcome) -> SentResponse {
    match outcome {
        MessageOutcome::Stored { id, ts } => SentResponse::new(client_msg_id, id, ts, false),
        MessageOutcome::Duplicate { id, ts } => SentResponse::new(client_msg_id, id, ts, true),
    }
}

/// Stores a send and waits for its commit (the HTTP path).
pub async fn send(state: &AppState, auth: &AuthDevice, request: SendRequest) -> Result<SentResponse> {
    let client_msg_id = request.client_msg_id;
    let message = prepare_send(state, auth, request).await?;
    let started = std::time::Instant::now();
    let outcome = state.store.store_message(message).await?;
    state.metrics.send_latency.observe(started.elapsed().as_secs_f64());
    if matches!(outcome, MessageOutcome::Stored { .. }) {
        state.metrics.messages_stored.inc();
    }
    Ok(sent_response(client_msg_id, outcome))
}

/// Receipt events (to every device of each sender) for messages that `auth` received or read.
/// Messages the user sent itself (copies on its other devices) produce none.
pub async fn receipts(
    state: &AppState,
    auth: &AuthDevice,
    kind: ReceiptKind,
    origins: impl IntoIterator<Item = (Arc<str>, ServerMsgId)>,
) -> Result<Effects> {
    let mut by_sender: BTreeMap<Arc<str>, Vec<ServerMsgId>> = BTreeMap::new();
    for (sender, id) in origins {
        if sender.as_ref() != auth.user_id.as_str() {
            by_sender.entry(sender).or_default().push(id);
        }
    }
    let ts = Timestamp::now();
    let mut effects = Effects::default();
    for (sender, ids) in by_sender {
        let Ok(sender_id) = sender.parse::<UserId>() else { continue };
        if !sender_id.is_of(&state.server_name) {
            if state.federation.is_none() {
                continue;
            }
            for chunk in ids.chunks(MAX_READ_IDS) {
                let receipt =
                    ReceiptEvent::new(kind, auth.user_id.clone(), auth.device_id.clone(), sender_id.clone(), chunk.to_vec(), ts);
                effects.outbound.push(crate::federation::sender::outbound(&sender_id.server_name(), &Item::Receipt(receipt))?);
            }
            continue;
        }
        let Some(entry) = state.directory.user(&sender_id).await? else { continue };
        for chunk in ids.chunks(MAX_READ_IDS) {
            let event = InboxEvent::Receipt(ReceiptEvent::new(
                kind,
                auth.user_id.clone(),
                auth.device_id.clone(),
                sender_id.clone(),
                chunk.to_vec(),
                ts,
            ));
            let payload = to_bytes(&event)?;
            effects.events.extend(entry.devices.iter().map(|(device, _)| NewEvent {
                device: *device,
                origin: None,
                payload: payload.clone(),
            }));
        }
    }
    Ok(effects)
}

/// Acknowledges `(from, to]` of the device's inbox, reading which messages that covers from the
/// database (used for `since` on connect and by `GET /v1/sync`).
pub async fn ack_from_store(state: &AppState, auth: &AuthDevice, from: Seq, to: Seq) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    let mut origins = Vec::new();
    let mut cursor = from;
    loop {
        let rows = state.store.inbox_after(auth.device_pk, cursor, 1000, usize::MAX).await?;
        let Some(last) = rows.last() else { break };
        let full = rows.len() == 1000;
        cursor = last.seq;
        origins.extend(rows.into_iter().filter(|r| r.seq <= to).filter_map(|r| r.origin));
        if !full || cursor >= to {
            break;
        }
    }
    let events = receipts(state, auth, ReceiptKind::Delivered, origins).await?;
    state.store.ack(auth.device_pk, to, events).await?;
    Ok(())
}

/// A read marker: `read` receipts to every device of the peer and to the reader's other devices,
/// for those of the messages that the peer sent to the reader (other ids are dropped; `bad_request`
/// when none is left).
pub async fn mark_read(state: &AppState, auth: &AuthDevice, request: ReadRequest) -> Result<()> {
    if request.message_ids.is_empty() || request.message_ids.len() > MAX_READ_IDS {
        return Err(Error::new(ErrorCode::BadRequest, format!("message_ids must hold 1 to {MAX_READ_IDS} ids")));
    }
    let remote_peer = !request.peer.is_of(&state.server_name);
    let (peer_devices, message_ids): (Vec<i64>, Vec<ServerMsgId>) = if remote_peer {
        crate::federation::remote::check_reachable(state, &request.peer.server_name())?;
        (Vec::new(), state.store.received_from(auth.user_pk, &request.peer, &request.message_ids).await?)
    } else {
        let peer =
            state.directory.user(&request.peer).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
        let message_ids = state.store.sent_to(peer.pk, &auth.user_id, &request.message_ids).await?;
        (peer.devices.iter().map(|(pk, _)| *pk).collect(), message_ids)
    };
    if message_ids.is_empty() {
        return Err(Error::new(
            ErrorCode::BadRequest,
            format!("none of message_ids is a message {} sent to {}", request.peer, auth.user_id),
        ));
    }
    let me =
        state.directory.local(auth.user_id.localpart()).await?.ok_or_else(|| Error::internal("authenticated user vanished"))?;
    let event = InboxEvent::Receipt(ReceiptEvent::new(
        ReceiptKind::Read,
        auth.user_id.clone(),
        auth.device_id.clone(),
        request.peer.clone(),
        message_ids,
        Timestamp::now(),
    ));
    let payload = to_bytes(&event)?;
    let mut effects = Effects::default();
    if remote_peer {
        let InboxEvent::Receipt(receipt) = event else { return Err(Error::internal("receipt expected")) };
        effects.outbound.push(crate::federation::sender::outbound(&request.peer.server_name(), &Item::Receipt(receipt))?);
    }
    let targets = peer_devices.into_iter().chain(me.devices.iter().map(|(pk, _)| *pk).filter(|pk| *pk != auth.device_pk));
    effects.events = targets.map(|device| NewEvent { device, origin: None, payload: payload.clone() }).collect();
    state.store.append(effects).await?;
    Ok(())
}

/// Typing: to the recipient's connected devices only; never stored.
pub async fn typing(state: &AppState, auth: &AuthDevice, to: &UserId, typing: bool) -> Result<()> {
    if !to.is_of(&state.server_name) {
        crate::federation::remote::check_reachable(state, &to.server_name())?;
        if let Some(fed) = &state.federation {
            fed.sender.push_ephemeral(&to.server_name(), Item::Typing(TypingItem::new(auth.user_id.clone(), to.clone(), typing)));
        }
        return Ok(());
    }
    let peer = state.directory.user(to).await?.ok_or_else(|| Error::new(ErrorCode::UnknownUser, "no such user"))?;
    let frame = to_bytes(&ServerFrame::Typing(TypingNotice::new(auth.user_id.clone(), typing)))?;
    for (device, _) in &peer.devices {
        state.hub.send_ephemeral(*device, frame.clone());
    }
    Ok(())
}

/// JSON bytes of an event or frame.
pub(crate) fn to_bytes<T: serde::Serialize>(value: &T) -> Result<Bytes> {
    serde_json::to_vec(value).map(Bytes::from).map_err(Error::internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(user: &UserId, device: &str) -> Envelope {
        Envelope::new(user.clone(), DeviceId::parse(device).unwrap(), Vec::new())
    }

    #[test]
    fn envelopes_match_their_devices_in_order_and_a_mismatch_names_the_missing_and_extra_ones() {
        let bob = UserId::parse("@bob:a.example").unwrap();
        let alice = UserId::parse("@alice:a.example").unwrap();
        let ids: Vec<DeviceId> = ["B1", "B2", "A2"].iter().map(|id| DeviceId::parse(id).unwrap()).collect();
        let expected = [(&bob, &ids[0], 10), (&bob, &ids[1], 11), (&alice, &ids[2], 20)];

        let found = match_targets(&expected, &[envelope(&alice, "A2"), envelope(&bob, "B2"), envelope(&bob, "B1")]).unwrap();
        assert_eq!(found, vec![20, 11, 10]);

        // B1 twice (the second is extra), an unknown device, B2 and A2 missing (sorted).
        let sent = [envelope(&bob, "B1"), envelope(&bob, "B1"), envelope(&bob, "B9")];
        let Err(Error::DevicesMismatch(mismatch)) = match_targets(&expected, &sent) else { panic!("a mismatch expected") };
        let names = |refs: &[DeviceRef]| refs.iter().map(|r| format!("{} {}", r.user, r.device)).collect::<Vec<_>>();
        assert_eq!(names(&mismatch.missing), ["@alice:a.example A2", "@bob:a.example B2"]);
        assert_eq!(names(&mismatch.extra), ["@bob:a.example B1", "@bob:a.example B9"]);
    }
}
