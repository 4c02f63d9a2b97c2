//! Users of other servers as seen from here: their devices (cached, refreshed when a send does
//! not match or their server says they changed), prekey claims, and telling watching servers
//! when a local user's devices change.

use crate::app::AppState;
use crate::error::{Error, RemoteFailure, Result};
use crate::federation::sender::outbound;
use crate::storage::{Effects, UserPk};
use parley_federation::transport::FederationError;
use parley_spec::error::DeviceRef;
use parley_spec::federation::v1::claim::{ClaimKeyPackages as FedClaimKeyPackages, ClaimKeys as FedClaimKeys, ClaimRequest};
use parley_spec::federation::v1::transaction::{DeviceListChanged, GetUserDevices, Item, UserDevices};
use parley_spec::v1::keypackages::ClaimKeyPackagesResponse;
use parley_spec::v1::keys::ClaimResponse;
use parley_spec::{ErrorCode, ServerName, UserId};
use std::collections::BTreeMap;
use std::sync::Arc;

/// `Ok` if this server federates with `server`.
pub fn check_reachable(state: &AppState, server: &ServerName) -> Result<()> {
    match &state.federation {
        Some(fed) => fed.check_allowed(server),
        None => Err(Error::new(ErrorCode::ServerDenied, "federation is disabled on this server")),
    }
}

/// What a failed request to `server` means for the client whose request made it.
pub(crate) fn remote_error(server: &ServerName, error: FederationError) -> Error {
    let failure = match error {
        // Its answer to what was asked (no such user, say), relayed.
        FederationError::Status { status: 404, body } => {
            return Error::new(
                body.as_ref().map(|b| b.code).unwrap_or(ErrorCode::UnknownUser),
                body.map(|b| b.message).unwrap_or_else(|| "not found".into()),
            )
        }
        FederationError::Status { body: Some(body), .. } if body.code == ErrorCode::ServerDenied => RemoteFailure::Denied,
        other => RemoteFailure::Unreachable(Box::new(other)),
    };
    Error::Remote { server: server.clone(), failure }
}

/// The devices of remote user `user`: from the cache unless `refresh`, else from their server
/// (falling back to the cache when it cannot be reached).
pub async fn devices(state: &AppState, user: &UserId, refresh: bool) -> Result<Arc<UserDevices>> {
    let server = user.server_name();
    check_reachable(state, &server)?;
    let fed = state.federation.as_ref().ok_or_else(|| Error::internal("federation state missing"))?;
    let mut cached = fed.cached_devices(user);
    if cached.is_none() {
        if let Some(json) = state.store.remote_devices(user).await? {
            cached = serde_json::from_slice::<UserDevices>(&json).ok().map(Arc::new);
            fed.cache_devices(user, cached.clone());
        }
    }
    if let (false, Some(cached)) = (refresh, &cached) {
        return Ok(cached.clone());
    }
    let fetched = fed.client.call::<GetUserDevices>(&server, &[user.as_str()], None).await;
    match fetched {
        Ok(mut answer) => {
            if &answer.user_id != user {
                let failure = RemoteFailure::BadAnswer("answered for another user");
                return Err(Error::Remote { server: server.clone(), failure });
            }
            // A list that does not verify is dropped here; clients verify again anyway.
            if let Some(list) = &answer.device_list {
                if parley_crypto::identity::verify_device_list(list, user, None, None).is_err() {
                    tracing::warn!(%user, "remote device list does not verify; ignored");
                    answer.device_list = None;
                }
            }
            answer.devices.truncate(state.config.limits.max_devices_per_user * 4);
            let json = serde_json::to_vec(&answer).map_err(Error::internal)?;
            state.store.put_remote_devices(user, &json).await?;
            let answer = Arc::new(answer);
            fed.cache_devices(user, Some(answer.clone()));
            Ok(answer)
        }
        Err(error) => match (cached, &error) {
            // Unreachable, failing or refusing for now (a 401 while it rotates its key, say):
            // the last known devices are still the best answer. "No such user" is not.
            (Some(cached), error) if !matches!(error, FederationError::Status { status: 404, .. }) => {
                tracing::debug!(%user, %error, "device refresh failed; using the cached devices");
                Ok(cached)
            }
            _ => Err(remote_error(&server, error)),
        },
    }
}

/// Claims prekey bundles for devices of other servers on behalf of local user `requester`,
/// one request per server.
pub async fn claim(state: &AppState, requester: &UserId, devices: Vec<DeviceRef>) -> Result<ClaimResponse> {
    let mut by_server: BTreeMap<ServerName, Vec<DeviceRef>> = BTreeMap::new();
    for device in devices {
        by_server.entry(device.user.server_name()).or_default().push(device);
    }
    let mut total = ClaimResponse::new(Vec::new(), Vec::new());
    for (server, devices) in by_server {
        let answer = match (check_reachable(state, &server), &state.federation) {
            (Ok(()), Some(fed)) => {
                let request = ClaimRequest::new(requester.clone(), devices.clone());
                let body = serde_json::to_vec(&request).map_err(Error::internal)?;
                let answer = fed.client.call::<FedClaimKeys>(&server, &[], Some(body)).await;
                answer.map_err(|error| remote_error(&server, error))
            }
            (Err(error), _) => Err(error),
            (Ok(()), None) => Err(Error::internal("federation state missing")),
        };
        match answer {
            Ok(answer) => {
                // Only bundles for the devices asked for, of that server's users.
                total.bundles.extend(answer.bundles.into_iter().filter(|b| {
                    b.device_keys.user_id.is_of(&server)
                        && devices.iter().any(|d| d.user == b.device_keys.user_id && d.device == b.device_keys.device_id)
                }));
                total.missing.extend(answer.missing.into_iter().filter(|d| d.user.is_of(&server)));
            }
            // Unreachable for now: its devices are missing from this answer, not an error.
            Err(error @ Error::Remote { failure: RemoteFailure::Unreachable(_), .. }) => {
                tracing::debug!(%error, "claim failed");
                total.missing.extend(devices);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

/// Claims KeyPackages of devices of other servers on behalf of local user `requester`, one
/// request per server. A server that cannot be reached leaves its devices missing.
pub async fn claim_keypackages(
    state: &AppState,
    requester: &UserId,
    devices: Vec<DeviceRef>,
) -> Result<ClaimKeyPackagesResponse> {
    let mut by_server: BTreeMap<ServerName, Vec<DeviceRef>> = BTreeMap::new();
    for device in devices {
        by_server.entry(device.user.server_name()).or_default().push(device);
    }
    let mut total = ClaimKeyPackagesResponse::new(Vec::new(), Vec::new());
    for (server, devices) in by_server {
        let answer = match (check_reachable(state, &server), &state.federation) {
            (Ok(()), Some(fed)) => {
                let request = ClaimRequest::new(requester.clone(), devices.clone());
                let body = serde_json::to_vec(&request).map_err(Error::internal)?;
                let answer = fed.client.call::<FedClaimKeyPackages>(&server, &[], Some(body)).await;
                answer.map_err(|error| remote_error(&server, error))
            }
            (Err(error), _) => Err(error),
            (Ok(()), None) => Err(Error::internal("federation state missing")),
        };
        match answer {
            Ok(answer) => {
                // Only KeyPackages of the devices asked for, of that server's users, one each
                // (clients check the KeyPackages themselves against the signed device lists).
                let mut answered = std::collections::BTreeSet::new();
                total.key_packages.extend(answer.key_packages.into_iter().filter(|kp| {
                    kp.user.is_of(&server)
                        && devices.iter().any(|d| d.user == kp.user && d.device == kp.device)
                        && answered.insert((kp.user.clone(), kp.device.clone()))
                }));
                total.missing.extend(answer.missing.into_iter().filter(|d| d.user.is_of(&server)));
            }
            // Unreachable for now: its devices are missing from this answer, not an error.
            Err(error @ Error::Remote { failure: RemoteFailure::Unreachable(_), .. }) => {
                tracing::debug!(%error, "KeyPackage claim failed");
                total.missing.extend(devices);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

/// A local user's devices changed: every server that fetched them hears it (durably).
pub async fn device_list_changed(state: &AppState, user_pk: UserPk, user: &UserId) -> Result<()> {
    if state.federation.is_none() {
        return Ok(());
    }
    let watchers = state.store.device_list_watchers(user_pk).await?;
    if watchers.is_empty() {
        return Ok(());
    }
    let item = Item::DeviceListChanged(DeviceListChanged::new(user.clone()));
    let mut effects = Effects::default();
    for server in watchers {
        effects.outbound.push(outbound(&server, &item)?);
    }
    state.store.append(effects).await?;
    Ok(())
}
