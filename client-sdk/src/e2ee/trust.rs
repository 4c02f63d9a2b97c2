//! Device lists: loading the verified ones, fetching and verifying new ones against the pinned
//! identity key and the last version seen, and reporting changes.

use super::{
    AfterList, CryptoError, CryptoStore, Done, E2eeError, E2eeMachine, Failure, MessengerEvent, OutgoingRequest, Pending,
};
use super::{Progress, StoreError, Undecryptable, Untrust};
use parley_crypto::identity::{verify_device_list, DeviceListDiff, VerifiedDeviceList};
use parley_crypto::PublicKey;
use parley_spec::v1::keys::SignedDeviceList;
use parley_spec::UserId;
use rand::{CryptoRng, RngCore};

impl<S: CryptoStore, R: RngCore + CryptoRng + Send> E2eeMachine<S, R> {
    /// The verified device list of `user` known locally, if any (the stored one, verified again
    /// against its own pinned identity key when first loaded).
    pub async fn known_device_list(&mut self, user: &UserId) -> Result<Option<VerifiedDeviceList>, E2eeError> {
        if let Some(list) = self.lists.get(user) {
            return Ok(Some(list.clone()));
        }
        let Some(signed) = self.store.device_list(user).await? else { return Ok(None) };
        let pinned = PublicKey::from_bytes(&signed.identity_key.0).map_err(|_| StoreError::Damaged("device list"))?;
        let list = verify_device_list(&signed, user, Some(&pinned), None).map_err(CryptoError::from)?;
        self.lists.insert(user.clone(), list.clone());
        Ok(Some(list))
    }

    /// Asks for `user`'s current device list from the server. Its answer ends in
    /// [`Done::DeviceList`] (verified, stored, changes reported) or an
    /// [`E2eeError::Untrusted`].
    pub fn fetch_device_list(&mut self, user: &UserId) -> OutgoingRequest {
        self.fetch_list(user, AfterList::Report)
    }

    pub(super) fn fetch_list(&mut self, user: &UserId, then: AfterList) -> OutgoingRequest {
        let pending = Pending::DeviceList { user: user.clone(), then };
        self.request(pending, |id| OutgoingRequest::FetchDeviceList { id, user: user.clone() })
    }

    /// Forgets `user`'s verified list and pinned identity key (after the user accepted a new
    /// identity): the next fetch pins what the server serves.
    pub async fn forget_device_list(&mut self, user: &UserId) -> Result<(), E2eeError> {
        self.store.forget_device_list(user).await?;
        self.lists.remove(user);
        Ok(())
    }

    /// Verifies a list fetched from the server against the pinned identity key (the stored
    /// list's, the own one for the own user, none on first contact) and the last version
    /// accepted; stores it and reports which devices changed.
    async fn accept_device_list(&mut self, user: &UserId, fetched: &SignedDeviceList) -> Result<VerifiedDeviceList, E2eeError> {
        let stored = self.known_device_list(user).await?;
        let pinned = match &stored {
            Some(list) => Some(*list.identity_key()),
            None if user == &self.user_id => Some(self.identity.public()),
            None => None,
        };
        let checkpoint = stored.as_ref().map(VerifiedDeviceList::checkpoint);
        let verified = match verify_device_list(fetched, user, pinned.as_ref(), checkpoint.as_ref()) {
            Ok(verified) => verified,
            Err(e) => return Err(self.untrusted(user, Untrust::DeviceList(e))),
        };
        if let Some(old) = &stored {
            let diff = DeviceListDiff::between(old, &verified);
            if !diff.is_empty() {
                self.emit(MessengerEvent::DevicesChanged {
                    user: user.clone(),
                    added: diff.added.iter().map(|d| d.device_id().clone()).collect(),
                    removed: diff.removed.iter().map(|d| d.device_id().clone()).collect(),
                });
            }
        }
        self.store.save_device_list(&verified).await?;
        self.lists.insert(user.clone(), verified.clone());
        Ok(verified)
    }

    /// A device list (or the failure to fetch it) arrived for whatever waits for it.
    pub(super) async fn on_device_list(
        &mut self,
        user: UserId,
        fetched: Result<SignedDeviceList, Failure>,
        then: AfterList,
    ) -> Result<Progress, E2eeError> {
        match (then, fetched) {
            (AfterList::Report, Err(failure)) => Ok(Progress::Done(Done::Failed(failure))),
            (AfterList::Report, Ok(list)) => {
                Ok(Progress::Done(Done::DeviceList(Box::new(self.accept_device_list(&user, &list).await?))))
            }
            (AfterList::Send(_), Err(failure)) => Ok(Progress::Done(Done::Failed(failure))),
            (AfterList::Send(mut job), Ok(list)) => {
                self.accept_device_list(&user, &list).await?;
                job.refreshed(&user);
                self.advance(job).await
            }
            (AfterList::Receive(message), Err(failure)) => {
                self.undecryptable(&message, Undecryptable::DeviceListUnavailable(failure));
                Ok(Progress::Done(Done::Received))
            }
            (AfterList::Receive(message), Ok(list)) => match self.accept_device_list(&user, &list).await {
                Ok(_) => self.receive_one_to_one(message, true).await,
                Err(E2eeError::Untrusted { reason, .. }) => {
                    self.undecryptable(&message, Undecryptable::Untrusted(reason));
                    Ok(Progress::Done(Done::Received))
                }
                Err(e) => Err(e),
            },
        }
    }
}
