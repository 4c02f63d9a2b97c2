//! Web Push message encryption (RFC 8291: ECDH on P-256 with the device's key and auth secret,
//! HKDF-SHA256, the `aes128gcm` content coding of RFC 8188 in one record), so that a push
//! service relaying a wake-up sees only ciphertext. The server side is [`PushKeys::encrypt`];
//! the device side (the SDK, tests) is [`PushReceiver`].

use p256::elliptic_curve::sec1::ToEncodedPoint as _;

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

/// The server's VAPID key (RFC 8292): an ECDSA P-256 key derived from the server's signing-key
/// seed with HKDF-SHA256, so every process holding that key signs alike and nothing else is
/// stored. Push services that want it check `Authorization: vapid t=<JWT>, k=<public key>`.
pub struct VapidKey(p256::ecdsa::SigningKey);

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VapidKey(..)")
    }
}

/// The claims of a VAPID token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VapidClaims {
    /// The push service's origin (`https://host[:port]`).
    pub aud: String,
    /// Expiry, seconds since the epoch (at most 24 h ahead).
    pub exp: u64,
    /// Who runs the server (`mailto:` or `https:`).
    pub sub: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64url(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()
}

/// The JOSE header of every VAPID token.
const VAPID_HEADER: &[u8] = br#"{"typ":"JWT","alg":"ES256"}"#;

impl VapidKey {
    /// Derives the key from the server signing key's 32-byte seed.
    pub fn derive(server_seed: &[u8; 32]) -> Self {
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(None, server_seed);
        let mut counter = 0u8;
        loop {
            let mut scalar = zeroize::Zeroizing::new([0u8; 32]);
            hkdf.expand_multi_info(&[b"parley push vapid key v1", &[counter]], scalar.as_mut_slice())
                .expect("32 bytes is a valid HKDF-SHA256 output length"); // invariant
                                                                          // Out of range (probability ~2^-32): derive again with the next counter.
            if let Ok(key) = p256::ecdsa::SigningKey::from_slice(scalar.as_slice()) {
                return Self(key);
            }
            counter = counter.wrapping_add(1);
        }
    }

    /// The public key, uncompressed (65 bytes), as push services and apps take it.
    pub fn public_key(&self) -> Vec<u8> {
        self.0.verifying_key().to_encoded_point(false).as_bytes().to_vec()
    }

    /// The `Authorization` header value for a push to `audience` (the endpoint's origin).
    pub fn authorization(&self, claims: &VapidClaims) -> String {
        use p256::ecdsa::signature::Signer as _;
        let claims = serde_json::to_vec(claims).expect("claims serialize"); // invariant: plain strings and a number
        let input = format!("{}.{}", b64url(VAPID_HEADER), b64url(&claims));
        let signature: p256::ecdsa::Signature = self.0.sign(input.as_bytes());
        format!("vapid t={input}.{}, k={}", b64url(&signature.to_bytes()), b64url(&self.public_key()))
    }
}

/// Checks a VAPID `Authorization` header as a push service does: the token's ES256 signature
/// against the key `k` it names. Returns the key and the claims.
pub fn verify_vapid(header: &str) -> Option<(Vec<u8>, VapidClaims)> {
    use p256::ecdsa::signature::Verifier as _;
    let rest = header.strip_prefix("vapid ")?;
    let (mut token, mut key) = (None, None);
    for part in rest.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => token = Some(value),
            Some(("k", value)) => key = Some(value),
            _ => {}
        }
    }
    let key = unb64url(key?)?;
    let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key).ok()?;
    let (input, signature) = token?.rsplit_once('.')?;
    let signature = p256::ecdsa::Signature::from_slice(&unb64url(signature)?).ok()?;
    verifying.verify(input.as_bytes(), &signature).ok()?;
    let (header, claims) = input.split_once('.')?;
    if unb64url(header)? != VAPID_HEADER {
        return None;
    }
    Some((key, serde_json::from_slice(&unb64url(claims)?).ok()?))
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

    #[test]
    fn vapid_tokens_verify_with_the_key_they_name_and_only_as_signed() {
        let key = VapidKey::derive(&[9; 32]);
        assert_eq!(key.public_key(), VapidKey::derive(&[9; 32]).public_key(), "derived alike");
        assert_ne!(key.public_key(), VapidKey::derive(&[8; 32]).public_key());
        let claims =
            VapidClaims { aud: "https://push.example.net".into(), exp: 1_900_000_000, sub: "mailto:ops@a.example".into() };
        let header = key.authorization(&claims);
        assert_eq!(verify_vapid(&header), Some((key.public_key(), claims)));
        let tampered = header.replacen("vapid t=ey", "vapid t=eY", 1);
        assert_eq!(verify_vapid(&tampered), None);
        let other = VapidKey::derive(&[8; 32]);
        let swapped = format!("{}, k={}", header.split(", k=").next().unwrap_or(""), b64url(&other.public_key()));
        assert_eq!(verify_vapid(&swapped), None, "another key does not verify it");
    }
}
