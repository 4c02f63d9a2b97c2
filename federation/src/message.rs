//! Origin signatures on relayed messages: the origin server signs each [`SignedMessage`] with
//! its server key, so whoever relays it, the receiver can check who wrote it.

use crate::ServerKey;
use parley_crypto::PublicKey;
use parley_spec::federation::v1::transaction::{SignedMessage, MESSAGE_CONTEXT};

/// Signs `message` in place with the origin's key (sets `key_id` and `signature`).
pub fn sign_message(message: &mut SignedMessage, key: &ServerKey) {
    message.key_id = key.key_id.clone();
    // A message of strings, integers and base64 always has a canonical encoding.
    let signature = key.key.sign_object(MESSAGE_CONTEXT, message).map(|s| s.to_vec()).unwrap_or_default();
    message.signature = signature.into();
}

/// Checks the origin signature of `message` with the origin key `key` (the caller looks the key
/// up by `message.origin` and `message.key_id`).
pub fn verify_message(message: &SignedMessage, key: &PublicKey) -> Result<(), parley_crypto::SignatureError> {
    key.verify_object(MESSAGE_CONTEXT, message, &message.signature.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_spec::federation::v1::transaction::FedEnvelope;
    use parley_spec::{DeviceId, ServerMsgId, ServerName, Timestamp, UserId};

    #[test]
    fn signed_messages_verify_and_tampering_is_caught() {
        let key = ServerKey::generate();
        let mut message = SignedMessage::new(
            ServerMsgId::new(7),
            UserId::parse("@alice:a.example").unwrap(),
            DeviceId::parse("DEV1").unwrap(),
            UserId::parse("@bob:b.example").unwrap(),
            Timestamp::from_millis(1_000),
            vec![FedEnvelope::new(DeviceId::parse("DEV2").unwrap(), vec![1, 2, 3])],
            ServerName::parse("a.example").unwrap(),
            String::new(),
        );
        sign_message(&mut message, &key);
        verify_message(&message, &key.public()).unwrap();
        let mut tampered = message.clone();
        tampered.envelopes[0].ciphertext.0[0] ^= 1;
        assert!(verify_message(&tampered, &key.public()).is_err());
        let mut tampered = message.clone();
        tampered.to = UserId::parse("@carol:b.example").unwrap();
        assert!(verify_message(&tampered, &key.public()).is_err());
        assert!(verify_message(&message, &ServerKey::generate().public()).is_err());
    }
}
