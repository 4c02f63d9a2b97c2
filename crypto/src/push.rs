//! Web Push message encryption (RFC 8291: ECDH on P-256 with the device's key and auth secret,
//! HKDF-SHA256, the `aes128gcm` content coding of RFC 8188 in one record), so that a push
//! service relaying a wake-up sees only ciphertext. The server side is [`PushKeys::encrypt`];
//! the device side (the SDK, tests) is [`PushReceiver`].

use web_push_native::p256;

/// Length of the device's public key (uncompressed SEC1 point).
pub const PUBLIC_KEY_LEN: usize = 65;
/// Length of the auth secret.
pub const AUTH_LEN: usize = 16;

/// Why push keys or a push message were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// `p256dh` is not an uncompressed P-256 point on the curve.
    #[error("p256dh is not a P-256 public key")]
    BadPublicKey,
    /// `auth` is not 16 bytes.
    #[error("auth must be 16 bytes")]
    BadAuth,
    /// Encryption or decryption failed.
    #[error("push message encryption failed")]
    Crypto,
}

/// A device's subscription keys, as the server holds them.
#[derive(Clone, PartialEq, Eq)]
pub struct PushKeys {
    public: p256::PublicKey,
    auth: [u8; AUTH_LEN],
}

impl std::fmt::Debug for PushKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushKeys(..)")
    }
}

impl PushKeys {
    /// Parses `p256dh` (65 bytes, uncompressed) and `auth` (16 bytes).
    pub fn parse(p256dh: &[u8], auth: &[u8]) -> Result<Self, PushError> {
        if p256dh.len() != PUBLIC_KEY_LEN || p256dh.first() != Some(&4) {
            return Err(PushError::BadPublicKey);
        }
        let public = p256::PublicKey::from_sec1_bytes(p256dh).map_err(|_| PushError::BadPublicKey)?;
        let auth = auth.try_into().map_err(|_| PushError::BadAuth)?;
        Ok(Self { public, auth })
    }

    /// `message` encrypted for the device (a fresh ephemeral key and salt each time).
    pub fn encrypt(&self, message: &[u8]) -> Result<Vec<u8>, PushError> {
        let auth = web_push_native::Auth::clone_from_slice(&self.auth);
        web_push_native::encrypt(message.to_vec(), &self.public, &auth).map_err(|_| PushError::Crypto)
    }
}

/// A device's side: its P-256 key pair and auth secret.
pub struct PushReceiver {
    secret: p256::SecretKey,
    auth: [u8; AUTH_LEN],
}

impl std::fmt::Debug for PushReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushReceiver(..)")
    }
}

impl PushReceiver {
    /// A fresh key pair and auth secret.
    pub fn generate(rng: &mut (impl rand::RngCore + rand::CryptoRng)) -> Self {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        let secret = loop {
            rng.fill_bytes(seed.as_mut_slice());
            if let Ok(secret) = p256::SecretKey::from_slice(seed.as_slice()) {
                break secret;
            }
        };
        let mut auth = [0u8; AUTH_LEN];
        rng.fill_bytes(&mut auth);
        Self { secret, auth }
    }

    /// The public key to register (`p256dh`, 65 bytes).
    pub fn public_key(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        self.secret.public_key().to_encoded_point(false).as_bytes().to_vec()
    }

    /// The auth secret to register.
    pub fn auth(&self) -> [u8; AUTH_LEN] {
        self.auth
    }

    /// Decrypts a push message body.
    pub fn decrypt(&self, body: &[u8]) -> Result<Vec<u8>, PushError> {
        let auth = web_push_native::Auth::clone_from_slice(&self.auth);
        web_push_native::decrypt(body.to_vec(), &self.secret, &auth).map_err(|_| PushError::Crypto)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_encrypted_to_a_device_decrypts_only_there() {
        let mut rng = rand::thread_rng();
        let device = PushReceiver::generate(&mut rng);
        let keys = PushKeys::parse(&device.public_key(), &device.auth()).expect("valid keys");
        let body = keys.encrypt(b"{\"v\":1}").expect("encrypts");
        assert!(!body.windows(7).any(|w| w == b"{\"v\":1}"), "ciphertext only");
        assert_eq!(device.decrypt(&body).expect("decrypts"), b"{\"v\":1}");
        assert_ne!(keys.encrypt(b"{\"v\":1}").expect("encrypts"), body, "fresh salt and key each time");
        let other = PushReceiver::generate(&mut rng);
        assert!(other.decrypt(&body).is_err());
        assert_eq!(PushKeys::parse(&[4; 65], &[0; 16]), Err(PushError::BadPublicKey));
        assert_eq!(PushKeys::parse(&device.public_key(), &[0; 15]), Err(PushError::BadAuth));
    }
}
