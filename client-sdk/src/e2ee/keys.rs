//! This device's prekeys: the signed and last-resort prekeys and the first batch of one-time
//! prekeys when the device is set up, and a new batch whenever the server says they run low.
//! Secrets are stored before their public halves are handed out for upload.

use super::{CryptoStore, E2eeError, E2eeMachine, OutgoingRequest, Pending, PrekeyKind};
use parley_crypto::prekeys::PrekeySecret;
use parley_spec::v1::keys::{OneTimePrekey, UploadKeysRequest};
use rand::{CryptoRng, RngCore};

/// One-time prekeys uploaded at a time.
pub const PREKEY_BATCH: u32 = 50;
/// The id of the signed prekey.
pub const SIGNED_PREKEY_ID: u32 = 1;
/// The id of the last-resort prekey.
pub const LAST_RESORT_ID: u32 = 2;
/// The id of the first one-time prekey.
pub const FIRST_ONE_TIME_ID: u32 = 1000;

impl<S: CryptoStore, R: RngCore + CryptoRng + Send> E2eeMachine<S, R> {
    /// The keys a new device uploads: its device keys, a signed prekey, a last-resort prekey
    /// and a first batch of one-time prekeys (their secrets are stored now).
    pub async fn initial_keys(&mut self) -> Result<OutgoingRequest, E2eeError> {
        let mut upload = UploadKeysRequest::default();
        upload.device_keys = Some(self.device.device_keys(&self.user_id, &self.device_id));
        let signed = PrekeySecret::generate(&mut self.rng);
        self.store.save_prekey(PrekeyKind::Signed, SIGNED_PREKEY_ID, &signed).await?;
        upload.signed_prekey = Some(signed.signed_prekey(&self.device, SIGNED_PREKEY_ID));
        let last_resort = PrekeySecret::generate(&mut self.rng);
        self.store.save_prekey(PrekeyKind::LastResort, LAST_RESORT_ID, &last_resort).await?;
        upload.last_resort_prekey = Some(last_resort.signed_prekey(&self.device, LAST_RESORT_ID));
        upload.one_time_prekeys = self.new_one_time_prekeys(PREKEY_BATCH).await?;
        Ok(self.request(Pending::UploadKeys, |id| OutgoingRequest::UploadKeys { id, request: upload }))
    }

    /// A new batch of one-time prekeys to upload (the server said they run low).
    pub async fn replenish_prekeys(&mut self) -> Result<OutgoingRequest, E2eeError> {
        let mut upload = UploadKeysRequest::default();
        upload.one_time_prekeys = self.new_one_time_prekeys(PREKEY_BATCH).await?;
        Ok(self.request(Pending::UploadKeys, |id| OutgoingRequest::UploadKeys { id, request: upload }))
    }

    async fn new_one_time_prekeys(&mut self, count: u32) -> Result<Vec<OneTimePrekey>, E2eeError> {
        let next = self.store.next_one_time_prekey_id().await?.unwrap_or(FIRST_ONE_TIME_ID);
        let mut prekeys = Vec::with_capacity(count as usize);
        for id in next..next + count {
            let secret = PrekeySecret::generate(&mut self.rng);
            self.store.save_prekey(PrekeyKind::OneTime, id, &secret).await?;
            prekeys.push(secret.one_time_prekey(id));
        }
        self.store.set_next_one_time_prekey_id(next + count).await?;
        Ok(prekeys)
    }
}
