//! Chunked media encryption (attachments), in constant memory.
//!
//! # Construction
//!
//! Each file gets a fresh random 32-byte ChaCha20-Poly1305 key and a random 7-byte nonce
//! prefix ([`MediaKey`]). The plaintext is cut into chunks of [`CHUNK_SIZE`] (64 KiB) bytes;
//! every chunk but the last is exactly that long, the last one holds the rest (1 to 64 KiB;
//! 0 bytes only for an empty file; a streaming writer may also end with an empty last chunk).
//! Chunks are sealed with the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár:
//! *Online Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance*) as implemented by
//! `aead::stream::EncryptorBE32`: chunk `i` is sealed with the 12-byte nonce
//!
//! ```text
//! nonce_prefix (7 bytes) || i as u32 big endian (4 bytes) || last (1 byte: 1 for the last chunk, else 0)
//! ```
//!
//! and no associated data. The ciphertext is the sealed chunks concatenated, each
//! `len + 16` bytes (Poly1305 tag at its end), so a reader splits it at fixed
//! [`CIPHERTEXT_CHUNK_SIZE`] boundaries, the last piece being the last chunk.
//!
//! The counter in the nonce binds each chunk to its position (reordering fails) and the flag
//! binds the end (dropping trailing chunks fails: the new last chunk was not sealed as last;
//! appending fails: the old last chunk is no longer last). A chunk from another file fails
//! because that file has another key or nonce prefix.
//!
//! # In a message
//!
//! The sender uploads the ciphertext and sends, inside the end-to-end encrypted message, a
//! [`MediaRef`]: key, nonce prefix, SHA-256 of the *ciphertext*, plaintext size and MIME type.
//! The receiver downloads, checks the SHA-256 (ChaCha20-Poly1305 does not commit to its key, so
//! the hash is what pins the exact ciphertext the sender meant), and decrypts
//! ([`MediaRefExt::decrypt`]).
//!
//! # Streaming caveat
//!
//! [`MediaDecryptor`] hands out each chunk's plaintext once that chunk authenticates, but the
//! file as a whole is authentic only once [`MediaDecryptor::decrypt_last`] succeeds; a caller
//! that streams must be ready to discard what it already received if a later chunk fails.

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::KeyInit as _;
use chacha20poly1305::ChaCha20Poly1305;
use rand::{CryptoRng, RngCore};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Plaintext bytes per chunk (every chunk but the last is exactly this long).
pub const CHUNK_SIZE: usize = 64 * 1024;
/// Poly1305 tag bytes added to each chunk.
pub const TAG_SIZE: usize = 16;
/// Ciphertext bytes per full chunk.
pub const CIPHERTEXT_CHUNK_SIZE: usize = CHUNK_SIZE + TAG_SIZE;
/// Key length.
pub const KEY_SIZE: usize = 32;
/// Nonce prefix length (the 12-byte nonce minus the 4-byte counter and the 1-byte flag).
pub const NONCE_PREFIX_SIZE: usize = 7;

/// Why media could not be encrypted or decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// A chunk handed to the streaming API has the wrong length.
    #[error("wrong chunk length")]
    ChunkSize,
    /// The key or nonce prefix has the wrong length.
    #[error("malformed media key")]
    BadKey,
    /// The ciphertext cannot be a sealed file (too short, or a last chunk shorter than a tag).
    #[error("malformed media ciphertext")]
    Malformed,
    /// A chunk did not authenticate: wrong key, tampered, reordered, truncated or extended.
    #[error("media chunk failed authentication")]
    Decrypt,
    /// The ciphertext is not the one the message refers to (SHA-256 differs).
    #[error("media ciphertext does not match its hash")]
    HashMismatch,
    /// The plaintext is not as long as the message says.
    #[error("media size differs from the announced size")]
    SizeMismatch,
    /// More chunks than the 32-bit counter allows (about 256 TiB).
    #[error("media too long")]
    TooLong,
}

/// A file's key and nonce prefix. Zeroized on drop, never printed, compared in constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MediaKey {
    key: [u8; KEY_SIZE],
    nonce_prefix: [u8; NONCE_PREFIX_SIZE],
}

impl std::fmt::Debug for MediaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaKey(..)")
    }
}

impl ConstantTimeEq for MediaKey {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.key.ct_eq(&other.key) & self.nonce_prefix.ct_eq(&other.nonce_prefix)
    }
}

impl PartialEq for MediaKey {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for MediaKey {}

impl MediaKey {
    /// A fresh random key and nonce prefix.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut key = Self { key: [0; KEY_SIZE], nonce_prefix: [0; NONCE_PREFIX_SIZE] };
        rng.fill_bytes(&mut key.key);
        rng.fill_bytes(&mut key.nonce_prefix);
        key
    }

    /// Rebuilds a key from its parts (as carried in a [`MediaRef`]).
    pub fn from_parts(key: &[u8], nonce_prefix: &[u8]) -> Result<Self, MediaError> {
        Ok(Self {
            key: key.try_into().map_err(|_| MediaError::BadKey)?,
            nonce_prefix: nonce_prefix.try_into().map_err(|_| MediaError::BadKey)?,
        })
    }

    /// The 32-byte ChaCha20-Poly1305 key. Keep it secret.
    pub fn key_bytes(&self) -> &[u8; KEY_SIZE] {
        &self.key
    }

    /// The 7-byte nonce prefix.
    pub fn nonce_prefix(&self) -> &[u8; NONCE_PREFIX_SIZE] {
        &self.nonce_prefix
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new((&self.key).into())
    }
}

/// Encrypts a file chunk by chunk: [`encrypt_chunk`](Self::encrypt_chunk) for each full
/// 64 KiB chunk, then [`finish`](Self::finish) with the rest (which may be empty). The output
/// pieces, concatenated, are the ciphertext.
pub struct MediaEncryptor {
    stream: EncryptorBE32<ChaCha20Poly1305>,
}

impl std::fmt::Debug for MediaEncryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaEncryptor(..)")
    }
}

impl MediaEncryptor {
    /// A new encryptor under a fresh key, and that key.
    pub fn new(rng: &mut (impl RngCore + CryptoRng)) -> (Self, MediaKey) {
        let key = MediaKey::generate(rng);
        (Self::with_key(&key), key)
    }

    /// An encryptor under a given key. A key (with its nonce prefix) must seal one file only,
    /// so this stays private: [`new`](Self::new) always draws a fresh one.
    fn with_key(key: &MediaKey) -> Self {
        Self { stream: EncryptorBE32::from_aead(key.cipher(), (&key.nonce_prefix).into()) }
    }

    /// Seals one full chunk: `plaintext` must be exactly [`CHUNK_SIZE`] bytes. Returns
    /// [`CIPHERTEXT_CHUNK_SIZE`] bytes.
    pub fn encrypt_chunk(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, MediaError> {
        if plaintext.len() != CHUNK_SIZE {
            return Err(MediaError::ChunkSize);
        }
        self.stream.encrypt_next(plaintext).map_err(|_| MediaError::TooLong)
    }

    /// Seals the last chunk (0 to [`CHUNK_SIZE`] bytes) and ends the file.
    pub fn finish(self, last_chunk: &[u8]) -> Result<Vec<u8>, MediaError> {
        if last_chunk.len() > CHUNK_SIZE {
            return Err(MediaError::ChunkSize);
        }
        self.stream.encrypt_last(last_chunk).map_err(|_| MediaError::TooLong)
    }
}

/// Decrypts a file chunk by chunk: [`decrypt_chunk`](Self::decrypt_chunk) for each full
/// [`CIPHERTEXT_CHUNK_SIZE`] piece but the last, then [`decrypt_last`](Self::decrypt_last).
/// After any error, discard the file (see the module docs).
pub struct MediaDecryptor {
    stream: DecryptorBE32<ChaCha20Poly1305>,
}

impl std::fmt::Debug for MediaDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MediaDecryptor(..)")
    }
}

impl MediaDecryptor {
    /// A decryptor for a file sealed under `key`.
    pub fn new(key: &MediaKey) -> Self {
        Self { stream: DecryptorBE32::from_aead(key.cipher(), (&key.nonce_prefix).into()) }
    }

    /// Opens a chunk that is not the last: `ciphertext` must be exactly
    /// [`CIPHERTEXT_CHUNK_SIZE`] bytes.
    pub fn decrypt_chunk(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError> {
        if ciphertext.len() != CIPHERTEXT_CHUNK_SIZE {
            return Err(MediaError::ChunkSize);
        }
        self.stream.decrypt_next(ciphertext).map_err(|_| MediaError::Decrypt)
    }

    /// Opens the last chunk ([`TAG_SIZE`] to [`CIPHERTEXT_CHUNK_SIZE`] bytes); only then is the
    /// whole file authentic.
    pub fn decrypt_last(self, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError> {
        if ciphertext.len() < TAG_SIZE || ciphertext.len() > CIPHERTEXT_CHUNK_SIZE {
            return Err(MediaError::ChunkSize);
        }
        self.stream.decrypt_last(ciphertext).map_err(|_| MediaError::Decrypt)
    }
}

/// Ciphertext length of a plaintext of `plaintext_len` bytes sealed by [`encrypt`].
pub fn ciphertext_len(plaintext_len: u64) -> u64 {
    let chunks = plaintext_len.div_ceil(CHUNK_SIZE as u64).max(1);
    plaintext_len + chunks * TAG_SIZE as u64
}

/// Seals `plaintext` under `key`; see the module docs for the chunking.
fn encrypt_with_key(key: &MediaKey, plaintext: &[u8]) -> Result<Vec<u8>, MediaError> {
    let mut out = Vec::with_capacity(usize::try_from(ciphertext_len(plaintext.len() as u64)).unwrap_or(0));
    let mut encryptor = MediaEncryptor::with_key(key);
    // All chunks but the last are full; the last holds the rest (a full chunk if the length
    // is a multiple of CHUNK_SIZE, empty only for an empty file).
    let full = plaintext.len().saturating_sub(1) / CHUNK_SIZE;
    let (body, last) = plaintext.split_at(full * CHUNK_SIZE);
    for chunk in body.chunks_exact(CHUNK_SIZE) {
        out.extend_from_slice(&encryptor.encrypt_chunk(chunk)?);
    }
    out.extend_from_slice(&encryptor.finish(last)?);
    Ok(out)
}

/// Encrypts a whole file under a fresh key. Returns the ciphertext, the key and the SHA-256
/// of the ciphertext (for the [`MediaRef`]).
///
/// # Panics
///
/// If `plaintext` has 2^32 or more chunks (256 TiB).
pub fn encrypt(rng: &mut (impl RngCore + CryptoRng), plaintext: &[u8]) -> (Vec<u8>, MediaKey, [u8; 32]) {
    let key = MediaKey::generate(rng);
    let ciphertext = encrypt_with_key(&key, plaintext).expect("media larger than 256 TiB");
    let digest = Sha256::digest(&ciphertext).into();
    (ciphertext, key, digest)
}

/// Decrypts a whole file (split at [`CIPHERTEXT_CHUNK_SIZE`] boundaries; the last piece is
/// the last chunk).
pub fn decrypt(key: &MediaKey, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError> {
    if ciphertext.len() < TAG_SIZE {
        return Err(MediaError::Malformed);
    }
    let chunks = ciphertext.len().div_ceil(CIPHERTEXT_CHUNK_SIZE);
    let (body, last) = ciphertext.split_at((chunks - 1) * CIPHERTEXT_CHUNK_SIZE);
    if last.len() < TAG_SIZE {
        return Err(MediaError::Malformed);
    }
    let mut out = Vec::with_capacity(ciphertext.len() - chunks * TAG_SIZE);
    let mut decryptor = MediaDecryptor::new(key);
    for chunk in body.chunks_exact(CIPHERTEXT_CHUNK_SIZE) {
        out.extend_from_slice(&decryptor.decrypt_chunk(chunk)?);
    }
    out.extend_from_slice(&decryptor.decrypt_last(last)?);
    Ok(out)
}

pub use parley_spec::v1::content::MediaRef;

/// What `parley-crypto` does with a [`MediaRef`] (the wire type lives in `parley-spec`).
pub trait MediaRefExt: Sized {
    /// Describes a file encrypted under `key`.
    fn new(key: &MediaKey, sha256: [u8; 32], size: u64, mime: impl Into<String>) -> Self;

    /// Encrypts `plaintext` under a fresh key and describes it: the ciphertext to upload and
    /// the reference to send.
    fn encrypt(rng: &mut (impl RngCore + CryptoRng), plaintext: &[u8], mime: impl Into<String>) -> (Vec<u8>, Self);

    /// Checks a ciphertext's SHA-256 (computed piece by piece) against this reference, in
    /// constant time.
    fn check_digest(&self, digest: &[u8; 32]) -> Result<(), MediaError>;

    /// The key and nonce prefix.
    fn media_key(&self) -> Result<MediaKey, MediaError>;

    /// Checks the ciphertext against the SHA-256, decrypts it and checks the size.
    fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError>;
}

impl MediaRefExt for MediaRef {
    fn new(key: &MediaKey, sha256: [u8; 32], size: u64, mime: impl Into<String>) -> Self {
        MediaRef::from_parts(key.key.to_vec(), key.nonce_prefix.to_vec(), sha256.to_vec(), size, mime)
    }

    fn encrypt(rng: &mut (impl RngCore + CryptoRng), plaintext: &[u8], mime: impl Into<String>) -> (Vec<u8>, Self) {
        let (ciphertext, key, sha256) = encrypt(rng, plaintext);
        let reference = <Self as MediaRefExt>::new(&key, sha256, plaintext.len() as u64, mime);
        (ciphertext, reference)
    }

    fn check_digest(&self, digest: &[u8; 32]) -> Result<(), MediaError> {
        match self.sha256.0.len() == 32 && bool::from(digest.as_slice().ct_eq(&self.sha256.0)) {
            true => Ok(()),
            false => Err(MediaError::HashMismatch),
        }
    }

    fn media_key(&self) -> Result<MediaKey, MediaError> {
        MediaKey::from_parts(&self.key.0, &self.nonce_prefix.0)
    }

    fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError> {
        let key = self.media_key()?;
        self.check_digest(&Sha256::digest(ciphertext).into())?;
        let plaintext = decrypt(&key, ciphertext)?;
        if plaintext.len() as u64 != self.size {
            return Err(MediaError::SizeMismatch);
        }
        Ok(plaintext)
    }
}

/// SHA-256 of a ciphertext computed piece by piece, for files too large to hold at once.
#[derive(Debug, Clone, Default)]
pub struct CiphertextHasher(Sha256);

impl CiphertextHasher {
    /// A hasher over nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The digest of everything added.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// SHA-256 of `bytes` (an identifier, such as the name of a local transfer's state file).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The server's key for the upload URLs it hands out: HMAC-SHA256 with a key derived by
/// HKDF-SHA256 from the server's signing-key seed, so every process holding that key agrees
/// without another secret to store. Zeroized on drop; checks run in constant time.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct UrlKey([u8; 32]);

impl std::fmt::Debug for UrlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlKey(..)")
    }
}

/// The HKDF `info` of [`UrlKey`].
const URL_KEY_INFO: &[u8] = b"parley media upload url key v1";

impl UrlKey {
    /// Derives the key from the server signing key's 32-byte seed.
    pub fn derive(server_seed: &[u8; 32]) -> Self {
        let mut key = [0u8; 32];
        hkdf::Hkdf::<Sha256>::new(None, server_seed)
            .expand(URL_KEY_INFO, &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length"); // invariant: fixed length
        Self(key)
    }

    fn mac(&self, message: &[u8]) -> hmac::Hmac<Sha256> {
        let mut mac = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length"); // invariant
        hmac::Mac::update(&mut mac, message);
        mac
    }

    /// The tag of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 32] {
        hmac::Mac::finalize(self.mac(message)).into_bytes().into()
    }

    /// Whether `tag` is the tag of `message` (constant time).
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        hmac::Mac::verify_slice(self.mac(message), tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_support::{check_vector_file, hex, unhex};
    use chacha20poly1305::aead::{Aead as _, Payload};
    use rand::SeedableRng as _;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(11)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn rfc8439_section_2_8_2_aead() {
        // Through the same cipher type media uses, with the RFC's 12-byte nonce.
        let key = unhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
        let nonce = unhex("070000004041424344454647");
        let aad = unhex("50515253c0c1c2c3c4c5c6c7");
        let plaintext =
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let cipher = MediaKey::from_parts(&key, &[0; 7]).unwrap().cipher();
        let sealed = cipher.encrypt(nonce.as_slice().into(), Payload { msg: plaintext, aad: &aad }).unwrap();
        assert_eq!(
            hex(&sealed),
            concat!(
                "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6",
                "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36",
                "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc",
                "3ff4def08e4b7a9de576d26586cec64b6116",
                "1ae10b594f09e26a7e902ecbd0600691",
            )
        );
        let opened = cipher.decrypt(nonce.as_slice().into(), Payload { msg: &sealed, aad: &aad }).unwrap();
        assert_eq!(opened, plaintext);
    }

    #[test]
    fn stream_nonce_layout() {
        // Chunk i uses prefix || i (u32 BE) || last flag: check against the bare AEAD.
        let key = MediaKey::from_parts(&[7; 32], &[1, 2, 3, 4, 5, 6, 7]).unwrap();
        let plaintext = pattern(CHUNK_SIZE + 3);
        let sealed = encrypt_with_key(&key, &plaintext).unwrap();
        let nonce = |i: u32, last: u8| {
            let mut n = [0u8; 12];
            n[..7].copy_from_slice(key.nonce_prefix());
            n[7..11].copy_from_slice(&i.to_be_bytes());
            n[11] = last;
            n
        };
        let cipher = key.cipher();
        let first = cipher.encrypt((&nonce(0, 0)).into(), &plaintext[..CHUNK_SIZE]).unwrap();
        let second = cipher.encrypt((&nonce(1, 1)).into(), &plaintext[CHUNK_SIZE..]).unwrap();
        assert_eq!(sealed, [first, second].concat());
    }

    #[test]
    fn round_trips() {
        let mut rng = rng();
        for len in [0, 1, 65535, 65536, 65537, 3 * 65536 + 5, 2 * 65536] {
            let plaintext = pattern(len);
            let (ciphertext, key, digest) = encrypt(&mut rng, &plaintext);
            assert_eq!(ciphertext.len() as u64, ciphertext_len(len as u64), "{len}");
            assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&ciphertext)));
            assert_eq!(decrypt(&key, &ciphertext).unwrap(), plaintext, "{len}");

            // Streaming, with an empty last chunk when the length is a multiple of CHUNK_SIZE.
            let (mut encryptor, key) = MediaEncryptor::new(&mut rng);
            let mut streamed = Vec::new();
            let mut chunks = plaintext.chunks_exact(CHUNK_SIZE);
            for chunk in chunks.by_ref() {
                streamed.extend(encryptor.encrypt_chunk(chunk).unwrap());
            }
            streamed.extend(encryptor.finish(chunks.remainder()).unwrap());
            assert_eq!(decrypt(&key, &streamed).unwrap(), plaintext, "{len}");
            let mut decryptor = MediaDecryptor::new(&key);
            let mut pieces = streamed.chunks(CIPHERTEXT_CHUNK_SIZE).collect::<Vec<_>>();
            let last = pieces.pop().unwrap();
            let mut opened = Vec::new();
            for piece in pieces {
                opened.extend(decryptor.decrypt_chunk(piece).unwrap());
            }
            opened.extend(decryptor.decrypt_last(last).unwrap());
            assert_eq!(opened, plaintext);

            // Through a MediaRef, serialized.
            let (ciphertext, reference) = MediaRef::encrypt(&mut rng, &plaintext, "application/octet-stream");
            let reference: MediaRef = serde_json::from_str(&serde_json::to_string(&reference).unwrap()).unwrap();
            assert_eq!(reference.decrypt(&ciphertext).unwrap(), plaintext);
        }
    }

    #[test]
    fn tampering_is_detected() {
        let mut rng = rng();
        let plaintext = pattern(3 * CHUNK_SIZE + 5);
        let (ciphertext, key, _) = encrypt(&mut rng, &plaintext);
        let c = CIPHERTEXT_CHUNK_SIZE;

        // Truncation: drop the last chunk, or the last two; or cut inside a chunk.
        assert_eq!(decrypt(&key, &ciphertext[..3 * c]), Err(MediaError::Decrypt));
        assert_eq!(decrypt(&key, &ciphertext[..2 * c]), Err(MediaError::Decrypt));
        assert_eq!(decrypt(&key, &ciphertext[..ciphertext.len() - 1]), Err(MediaError::Decrypt));
        assert_eq!(decrypt(&key, &ciphertext[..3 * c + 10]), Err(MediaError::Malformed));
        assert_eq!(decrypt(&key, &[]), Err(MediaError::Malformed));
        // Extension: append a chunk.
        let extended = [&ciphertext[..], &ciphertext[..c]].concat();
        assert_eq!(decrypt(&key, &extended), Err(MediaError::Decrypt));

        // Reordering two chunks.
        let mut reordered = ciphertext.clone();
        reordered[..c].copy_from_slice(&ciphertext[c..2 * c]);
        reordered[c..2 * c].copy_from_slice(&ciphertext[..c]);
        assert_eq!(decrypt(&key, &reordered), Err(MediaError::Decrypt));

        // A chunk from another file under the same key (but its own nonce prefix, as every file
        // gets), at the same position.
        let mut sibling_key = MediaKey::generate(&mut rng);
        sibling_key.key = *key.key_bytes();
        let sibling = encrypt_with_key(&sibling_key, &pattern(3 * CHUNK_SIZE + 5)).unwrap();
        let mut swapped = ciphertext.clone();
        swapped[c..2 * c].copy_from_slice(&sibling[c..2 * c]);
        assert_eq!(decrypt(&key, &swapped), Err(MediaError::Decrypt));
        assert_eq!(decrypt(&sibling_key, &sibling).unwrap(), plaintext);

        // Flipped bits anywhere: in a chunk body, a tag, the last chunk.
        for position in [0, c - 1, c + 100, 3 * c, ciphertext.len() - 1] {
            let mut flipped = ciphertext.clone();
            flipped[position] ^= 0x01;
            assert_eq!(decrypt(&key, &flipped), Err(MediaError::Decrypt), "{position}");
        }

        // Wrong key.
        let other = MediaKey::generate(&mut rng);
        assert_eq!(decrypt(&other, &ciphertext), Err(MediaError::Decrypt));

        // Streaming misuse.
        let mut decryptor = MediaDecryptor::new(&key);
        assert_eq!(decryptor.decrypt_chunk(&ciphertext[..c - 1]), Err(MediaError::ChunkSize));
        let (mut encryptor, _) = MediaEncryptor::new(&mut rng);
        assert_eq!(encryptor.encrypt_chunk(&plaintext[..10]), Err(MediaError::ChunkSize));
        assert_eq!(encryptor.finish(&plaintext[..CHUNK_SIZE + 1]), Err(MediaError::ChunkSize));
    }

    #[test]
    fn media_ref_checks() {
        let mut rng = rng();
        let plaintext = pattern(1000);
        let (ciphertext, reference) = MediaRef::encrypt(&mut rng, &plaintext, "image/png");
        let mut flipped = ciphertext.clone();
        flipped[3] ^= 1;
        assert_eq!(reference.decrypt(&flipped), Err(MediaError::HashMismatch));
        let mut wrong_size = reference.clone();
        wrong_size.size += 1;
        assert_eq!(wrong_size.decrypt(&ciphertext), Err(MediaError::SizeMismatch));
        let mut bad_key = reference.clone();
        bad_key.key.0.pop();
        assert_eq!(bad_key.decrypt(&ciphertext), Err(MediaError::BadKey));
        let json = serde_json::to_value(&reference).unwrap();
        assert_eq!(json["size"], 1000);
        assert_eq!(json["mime"], "image/png");
        assert_eq!(reference.media_key().unwrap(), reference.media_key().unwrap());
        assert_eq!(format!("{:?}", reference.media_key().unwrap()), "MediaKey(..)");
    }

    #[test]
    fn media_vectors() {
        use serde_json::json;
        let key = MediaKey::from_parts(&std::array::from_fn::<u8, 32, _>(|i| 0x20 + i as u8), b"parley!").unwrap();
        let small = b"Parley media v1 test vector.";
        let small_ct = encrypt_with_key(&key, small).unwrap();
        let empty_ct = encrypt_with_key(&key, &[]).unwrap();
        let large = pattern(2 * CHUNK_SIZE + 10);
        let large_ct = encrypt_with_key(&key, &large).unwrap();
        let small_ref = MediaRef::new(&key, Sha256::digest(&small_ct).into(), small.len() as u64, "text/plain");
        let generated = json!({
            "description": "Parley media v1: ChaCha20-Poly1305 in the STREAM construction (nonce = nonce_prefix (7) || chunk index u32 BE || last flag (1 byte)), no associated data, 65536-byte plaintext chunks each followed by its 16-byte tag; all chunks but the last are full. The 'large' case gives only lengths and SHA-256 (its plaintext is byte i = i mod 251).",
            "key_hex": hex(key.key_bytes()),
            "nonce_prefix_hex": hex(key.nonce_prefix()),
            "chunk_size": CHUNK_SIZE,
            "cases": [
                {"name": "empty", "plaintext_hex": "", "ciphertext_hex": hex(&empty_ct)},
                {"name": "small", "plaintext_hex": hex(small), "ciphertext_hex": hex(&small_ct),
                 "media_ref": small_ref},
                {"name": "large", "plaintext_len": large.len(), "ciphertext_len": large_ct.len(),
                 "plaintext_sha256_hex": hex(&Sha256::digest(&large)), "ciphertext_sha256_hex": hex(&Sha256::digest(&large_ct))},
            ],
        });
        check_vector_file(concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/vectors/media_v1.json"), &generated);
        let reference: MediaRef = serde_json::from_value(generated["cases"][1]["media_ref"].clone()).unwrap();
        assert_eq!(reference.decrypt(&unhex(generated["cases"][1]["ciphertext_hex"].as_str().unwrap())).unwrap(), small);
        assert_eq!(decrypt(&key, &large_ct).unwrap(), large);
    }

    #[test]
    fn url_tags_verify_only_for_their_message_and_key() {
        let key = UrlKey::derive(&[7; 32]);
        let tag = key.sign(b"upload 1 part 2");
        assert!(key.verify(b"upload 1 part 2", &tag));
        assert!(!key.verify(b"upload 1 part 3", &tag));
        assert!(!key.verify(b"upload 1 part 2", &tag[..31]));
        assert!(!UrlKey::derive(&[8; 32]).verify(b"upload 1 part 2", &tag));
        assert_eq!(format!("{key:?}"), "UrlKey(..)");
    }
}
