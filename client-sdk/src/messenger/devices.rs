//! This user's other devices: [`Messenger::remove_device`] takes one out of the user's signed
//! device list, out of every group it is a member of, and off the server.

use super::groups::DeviceRemoval;
use super::{Messenger, MessengerError, ProfileError};
use crate::e2ee::{AccountStore as _, CryptoError};
use crate::Error;
use parley_crypto::identity::VerifiedDevice;
use parley_spec::DeviceId;

impl Messenger {
    /// Removes `device_id`, another device of this user, for good, in this order:
    ///
    /// 1. signs the user's device list again without it (version + 1, with the user identity
    ///    every device of the user holds) and publishes it, so no one encrypts to it any more;
    /// 2. removes its leaf from every active group it is a member of, one pruning commit per
    ///    group ([`DeviceRemoval`] says which; a failed group is reported, and the next committer
    ///    there removes it, since its list no longer names it). These commits go out while the
    ///    device still has its session, so it reads its removal (`GroupRemoved`);
    /// 3. deletes it on the server (`DELETE /v1/devices/{device_id}`, which needs `password`):
    ///    its session ends.
    ///
    /// Each step is skipped when already done (the device is not in the list, in no group), so
    /// after a failure (a wrong password at step 3, for instance) the same call finishes the
    /// job. Refuses this device itself ([`MessengerError::InvalidRequest`]): log out instead.
    #[tracing::instrument(skip(self, password), fields(user = %self.session().user_id))]
    pub async fn remove_device(&self, device_id: &DeviceId, password: &str) -> Result<DeviceRemoval, MessengerError> {
        let me = self.session().user_id.clone();
        if device_id == &self.session().device_id {
            return Err(MessengerError::InvalidRequest("a device cannot remove itself; log out instead".into()));
        }
        let current = self.inner.driver.device_list(&me, true).await?;
        if current.device(device_id).is_some() {
            let (identity, _) =
                self.inner.store.account().await.map_err(Error::from)?.ok_or(ProfileError::Missing("user identity"))?;
            let entries = current.devices().iter().filter(|d| d.device_id() != device_id).map(VerifiedDevice::to_entry).collect();
            let list = identity.sign_device_list(&me, current.version() + 1, entries).map_err(CryptoError::from)?;
            self.api().put_device_list(&list).await?;
            // Verified and stored as this device's known list: the pruning commits see it.
            let published = self.inner.driver.device_list(&me, true).await?;
            tracing::info!(device = %device_id, version = published.version(), "device dropped from the signed device list");
        }
        let removal = self.prune_device(device_id).await?;
        match self.api().delete_device(device_id, password).await {
            Ok(()) => {}
            // Already gone from the server, and from the list and the groups now.
            Err(error) if error.server_code() == Some(crate::ErrorCode::NotFound) && current.device(device_id).is_some() => {}
            Err(error) => return Err(error.into()),
        }
        Ok(removal)
    }
}
