//! Receiving: decrypting a message (the current session first, then superseded ones, then as a
//! session start, accepted once and only from a device whose verified listed identity key made
//! it), filing it in the history, and applying receipts.

use super::{
    AfterList, CryptoError, CryptoStore, Done, E2eeError, E2eeMachine, InitialMessageId, MessengerEvent, PrekeyKind, Progress,
};
use super::{Undecryptable, Untrust};
use crate::store::StoredMessage;
use parley_crypto::prekeys::{initial_message_id, LoadedPrekeys};
use parley_crypto::ratchet::{self, Session as Ratchet};
use parley_crypto::x3dh::{InitialHeader, PrekeyRef};
use parley_spec::v1::content::Content;
use parley_spec::v1::events::{MessageEvent, ReceiptEvent, ReceiptKind};
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

/// What decrypting a message came to.
enum Decrypted {
    Plaintext(Zeroizing<Vec<u8>>),
    /// A session start from a device the known list of its user does not name: fetch the list.
    NeedDeviceList,
    Failed(Undecryptable),
}

impl<S: CryptoStore, R: RngCore + CryptoRng + Send> E2eeMachine<S, R> {
    /// A message arrived for this device. Ends in [`Done::Received`] once it is stored (and
    /// reported as [`MessengerEvent::Message`]), recognised as a repeat, or reported
    /// [`MessengerEvent::Undecryptable`]; before that, a session start from a device not in
    /// the sender's known list needs that list fetched
    /// ([`OutgoingRequest::FetchDeviceList`](super::OutgoingRequest::FetchDeviceList)).
    /// Errors are the store's: the message was not handled and should be delivered again.
    pub async fn receive_message(&mut self, message: MessageEvent) -> Result<Progress, E2eeError> {
        // MLS: group messages will carry their own kind and go to the group state here; every
        // message today is a 1:1 Double Ratchet ciphertext.
        self.receive_one_to_one(message, false).await
    }

    /// [`E2eeMachine::receive_message`] for a 1:1 ciphertext; `list_fetched` once the sender's
    /// list was fetched for it.
    pub(super) async fn receive_one_to_one(&mut self, message: MessageEvent, list_fetched: bool) -> Result<Progress, E2eeError> {
        // Delivered again (it was stored, but the acknowledgement did not reach the server):
        // its message key is spent, and the history has it.
        if self.store.has_server_message(&message.sender, message.id).await? {
            return Ok(Progress::Done(Done::Received));
        }
        let plaintext = match self.decrypt(&message, list_fetched).await? {
            Decrypted::Plaintext(plaintext) => plaintext,
            Decrypted::NeedDeviceList => {
                let sender = message.sender.clone();
                return Ok(Progress::Next(self.fetch_list(&sender, AfterList::Receive(message))));
            }
            Decrypted::Failed(reason) => {
                self.undecryptable(&message, reason);
                return Ok(Progress::Done(Done::Received));
            }
        };
        // MLS: group contents (and group control messages) join this dispatch.
        let (client_msg_id, to, body, file) = match serde_json::from_slice::<Content>(&plaintext) {
            Ok(Content::Text(text)) => (text.client_msg_id, text.to, text.body, None),
            Ok(Content::File(file)) => (file.client_msg_id, file.to, file.caption, Some(file.file)),
            _ => {
                self.undecryptable(&message, Undecryptable::UnknownContent);
                return Ok(Progress::Done(Done::Received));
            }
        };
        let peer = if message.sender == self.user_id { to } else { message.sender.clone() };
        let stored = StoredMessage {
            local_id: 0,
            peer: peer.clone(),
            sender: message.sender.clone(),
            sender_device: message.sender_device.clone(),
            client_msg_id,
            server_msg_id: Some(message.id),
            ts: message.ts,
            body,
            file,
            delivered: false,
            read: false,
        };
        if self.store.add_message(&stored).await? {
            self.emit(MessengerEvent::Message(stored));
        }
        Ok(Progress::Done(Done::Received))
    }

    pub(super) fn undecryptable(&mut self, message: &MessageEvent, reason: Undecryptable) {
        let (sender, device) = (message.sender.clone(), message.sender_device.clone());
        self.emit(MessengerEvent::Undecryptable { sender, device, reason });
    }

    async fn decrypt(&mut self, message: &MessageEvent, list_fetched: bool) -> Result<Decrypted, E2eeError> {
        let (user, device) = (&message.sender, &message.sender_device);
        let ciphertext = &message.ciphertext.0;
        // The current session first, then superseded ones (messages still in flight on a
        // session that a simultaneous start by both sides, or the peer starting over, replaced).
        if let Some(bytes) = self.store.session(user, device).await? {
            let mut session = match Ratchet::from_bytes(&bytes) {
                Ok(session) => session,
                Err(e) => return Ok(Decrypted::Failed(Undecryptable::Crypto(e.into()))),
            };
            if let Ok(plaintext) = session.decrypt(ciphertext) {
                self.store.save_session(user, device, &session.to_bytes()).await?;
                return Ok(Decrypted::Plaintext(Zeroizing::new(plaintext)));
            }
        }
        for previous in self.store.previous_sessions(user, device).await? {
            let mut session = match Ratchet::from_bytes(&previous.state) {
                Ok(session) => session,
                Err(e) => return Ok(Decrypted::Failed(Undecryptable::Crypto(e.into()))),
            };
            if let Ok(plaintext) = session.decrypt(ciphertext) {
                self.store.save_previous_session(user, device, previous.slot, &session.to_bytes()).await?;
                return Ok(Decrypted::Plaintext(Zeroizing::new(plaintext)));
            }
        }
        let Ok(Some(header)) = ratchet::initial_header(ciphertext) else {
            return Ok(Decrypted::Failed(Undecryptable::NoSession));
        };
        // A first message is accepted once: a replay would otherwise rewind the session (for
        // sessions on the last-resort prekey or without a one-time prekey, whose secrets stay).
        let seen = InitialMessageId(initial_message_id(&header));
        if self.store.initial_message_seen(&seen).await? {
            return Ok(Decrypted::Failed(Undecryptable::ReplayedFirstMessage));
        }
        let prekeys = self.load_prekeys(&header).await?;
        let accepted = match Ratchet::accept_initial(&prekeys, ciphertext) {
            Ok(accepted) => accepted,
            Err(e) => return Ok(Decrypted::Failed(Undecryptable::Crypto(CryptoError::from(e)))),
        };
        // The sender's identity key must be the one its verified device list names.
        let known = self.known_device_list(user).await?;
        let Some(listed) = known.as_ref().and_then(|list| list.device(device)) else {
            if !list_fetched {
                return Ok(Decrypted::NeedDeviceList);
            }
            let reason = Untrust::UnlistedSender(device.clone());
            self.untrusted(user, reason.clone());
            return Ok(Decrypted::Failed(Undecryptable::Untrusted(reason)));
        };
        if listed.identity_key().as_bytes() != accepted.session.remote_identity_key().as_bytes() {
            let reason = Untrust::SenderKeyMismatch(device.clone());
            self.untrusted(user, reason.clone());
            return Ok(Decrypted::Failed(Undecryptable::Untrusted(reason)));
        }
        if let Some(PrekeyRef::OneTime(id)) = accepted.used_prekey {
            self.store.delete_prekey(PrekeyKind::OneTime, id).await?;
        }
        self.store.archive_session(user, device).await?;
        self.store.save_session(user, device, &accepted.session.to_bytes()).await?;
        self.store.mark_initial_message_seen(&seen).await?;
        Ok(Decrypted::Plaintext(Zeroizing::new(accepted.plaintext)))
    }

    /// The secrets `header` names, as far as this device still holds them.
    async fn load_prekeys(&self, header: &InitialHeader) -> Result<LoadedPrekeys, E2eeError> {
        let mut keys = LoadedPrekeys::new(&self.device);
        if let Some(secret) = self.store.prekey(PrekeyKind::Signed, header.signed_prekey_id).await? {
            keys = keys.with_signed(header.signed_prekey_id, secret);
        }
        match header.one_time_prekey {
            Some(PrekeyRef::OneTime(id)) => {
                if let Some(secret) = self.store.prekey(PrekeyKind::OneTime, id).await? {
                    keys = keys.with_one_time(id, secret);
                }
            }
            Some(PrekeyRef::LastResort(id)) => {
                if let Some(secret) = self.store.prekey(PrekeyKind::LastResort, id).await? {
                    keys = keys.with_last_resort(id, secret);
                }
            }
            None => {}
        }
        Ok(keys)
    }

    /// A receipt arrived. One for our messages applies only to those that went to its `by`
    /// user (the server could name anyone); ids that match none of them while a `sent` answer
    /// is on its way are applied again once it arrived (today's server stores the message
    /// before it answers, so its receipt can overtake the answer). A read marker set on another
    /// own device is recorded for that peer's messages.
    pub async fn receive_receipt(&mut self, receipt: ReceiptEvent) -> Result<(), E2eeError> {
        if receipt.sender != self.user_id {
            if receipt.by == self.user_id && receipt.kind == ReceiptKind::Read {
                self.store.mark_receipt(&receipt.sender, &receipt.sender, &receipt.message_ids, true).await?;
            }
            return Ok(());
        }
        if let Some(rest) = self.apply_receipt(receipt).await? {
            if self.pending.values().any(|p| matches!(p, super::Pending::Send(_))) {
                self.deferred_receipts.push(rest);
            } else {
                tracing::debug!(by = %rest.by, "receipt for none of our messages to its author; ignored");
            }
        }
        Ok(())
    }

    /// Applies a receipt for our messages; returns it with the ids that matched none of them.
    async fn apply_receipt(&mut self, mut receipt: ReceiptEvent) -> Result<Option<ReceiptEvent>, E2eeError> {
        let read = receipt.kind == ReceiptKind::Read;
        let marked = self.store.mark_receipt(&receipt.by, &self.user_id, &receipt.message_ids, read).await?;
        if !marked.is_empty() {
            let (by, message_ids) = (receipt.by.clone(), marked.clone());
            self.emit(if read {
                MessengerEvent::Read { by, message_ids }
            } else {
                MessengerEvent::Delivered { by, message_ids }
            });
        }
        receipt.message_ids.retain(|id| !marked.contains(id));
        Ok((!receipt.message_ids.is_empty()).then_some(receipt))
    }

    /// Applies deferred receipts again after a `sent` answer recorded a server id.
    pub(super) async fn apply_deferred_receipts(&mut self) -> Result<(), E2eeError> {
        for receipt in std::mem::take(&mut self.deferred_receipts) {
            if let Some(rest) = self.apply_receipt(receipt).await? {
                self.deferred_receipts.push(rest);
            }
        }
        Ok(())
    }
}
